"""Confinement of results folders: names that become paths, no symlink followed, regular files only."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

# A name that may become a file or folder name: letters, digits, '-', '_' and '.', not
# leading with '.', so never '..', a hidden file or a path separator. Defined with the task
# spec, which checks its task and stage names against it at the source.
from tasks.spec import SAFE_NAME

NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
CLOEXEC = getattr(os, "O_CLOEXEC", 0)
NONBLOCK = getattr(os, "O_NONBLOCK", 0)


class UntrustedInput(ValueError):
    """A file, folder or name from someone else that tribench refuses: exit 2, one line."""


def is_safe_name(text) -> bool:
    return isinstance(text, str) and SAFE_NAME.fullmatch(text) is not None


def check_name(text, what: str) -> str:
    """`text` if it is a safe name, else UntrustedInput saying what it was to name."""
    if not is_safe_name(text):
        raise UntrustedInput(f"{what} {text!r} is not a safe name (letters, digits, '-', '_', '.' not leading; "
                             "at most 128)")
    return text


def inside(root: Path, *names: str) -> Path:
    """root/names..., each a safe name, with no symlink and no non-folder on the way below root.

    root itself is what the user gave and may be a link; everything tribench adds below
    it must be a real folder or file of that folder.
    """
    path = Path(root)
    for i, name in enumerate(names):
        path = path / check_name(name, "path component")
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            continue
        if stat.S_ISLNK(mode):
            raise UntrustedInput(f"{path} is a symbolic link; tribench follows none inside a results folder")
        if i < len(names) - 1 and not stat.S_ISDIR(mode):
            raise UntrustedInput(f"{path} is not a folder")
    return path


def make_dir(root: Path, *names: str) -> Path:
    """Create root/names... (inside) as real folders; refuse a link or a file in the way."""
    path = inside(root, *names)
    path.mkdir(parents=True, exist_ok=True)
    inside(root, *names)  # a link put there between the check and the mkdir
    if not path.is_dir():
        raise UntrustedInput(f"{path} is not a folder")
    return path


def open_file(path: Path, flags: int, mode: int = 0o644) -> int:
    """os.open that follows no symlink in the last component and accepts only a regular file.

    O_NONBLOCK while opening, so a FIFO planted where a file belongs cannot block the
    open; it is cleared once the file is known to be regular.
    """
    try:
        fd = os.open(path, flags | NOFOLLOW | CLOEXEC | NONBLOCK, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UntrustedInput(f"{path} is a symbolic link; tribench follows none inside a results folder") \
                from None
        if exc.errno == errno.ENXIO:  # a FIFO opened for writing with no reader
            raise UntrustedInput(f"{path} is not a regular file") from None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UntrustedInput(f"{path} is not a regular file")
        if NONBLOCK:
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_bytes(path: Path, *, limit: int) -> bytes:
    """The bytes of a regular file (no symlink), refused if it holds more than `limit`."""
    fd = open_file(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise UntrustedInput(f"{path} is {size:,} bytes, more than the {limit:,} tribench reads from such a file")
        chunks, left = [], size
        while left > 0:
            block = os.read(fd, min(left, 1 << 20))
            if not block:
                break
            chunks.append(block)
            left -= len(block)
        return b"".join(chunks)
    finally:
        os.close(fd)


def open_text(path: Path):
    """A text reader over a regular file (no symlink): UTF-8, bad bytes replaced."""
    return os.fdopen(open_file(path, os.O_RDONLY), encoding="utf-8", errors="replace")


def is_regular(path: Path) -> bool:
    """Whether `path` is a regular file and not a symlink (what may be read or copied out of a results folder)."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False
