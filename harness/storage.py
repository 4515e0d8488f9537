"""Checked writes into results folders: whole lines, atomic files, torn tails set aside."""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import os
import secrets
from pathlib import Path

from harness.confine import open_file


def write_all(fd: int, data: bytes) -> None:
    """os.write until every byte is down.

    A nearly full disk gives short writes before it gives ENOSPC; ignoring one leaves a
    torn line. Every byte tribench writes into a results folder goes through here.
    """
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view = view[written:]


def _named(exc: OSError, path: Path) -> OSError:
    """The same error with the file named, so the one line the user sees says where."""
    return OSError(exc.errno, exc.strerror or str(exc), str(path))


def append_line(path: Path, line: bytes) -> None:
    """Append one line and fsync it; on any failure take back the part that landed.

    The line always starts on a new line, whatever the file ends with, so a torn tail
    left by something else can never swallow it.
    """
    path = Path(path)
    fd = open_file(path, os.O_RDWR | os.O_APPEND | os.O_CREAT)  # never through a symlink planted there
    try:
        size = os.fstat(fd).st_size
        prefix = b"" if size == 0 or os.pread(fd, 1, size - 1) == b"\n" else b"\n"
        try:
            write_all(fd, prefix + line)
            os.fsync(fd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, size)
                os.fsync(fd)
            raise _named(exc, path) from None
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, fsync, rename over it; no temporary file survives a failure."""
    path = Path(path)
    # Not mkstemp: its files are 0600, and results are shared; 0666 less the umask, like open().
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = open_file(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        try:
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise _named(exc, path) from None


def set_aside_torn_tail(path: Path) -> Path | None:
    """Move bytes after the last newline (half a record) into a side file; return it, or None.

    Called before anything is appended: the fragment is kept for the curious, and the
    file ends on a whole line again. Only the tail is read, block by block from the end.
    """
    path = Path(path)
    if not os.path.lexists(path):
        return None
    fd = open_file(path, os.O_RDWR)  # a symlink or a FIFO here is refused, never followed
    try:
        size = os.fstat(fd).st_size
        end, tail = size, b""
        while end > 0:
            start = max(0, end - (1 << 16))
            block = os.pread(fd, end - start, start)
            cut = block.rfind(b"\n")
            if cut >= 0:
                tail = block[cut + 1:] + tail
                end = start + cut + 1
                break
            tail, end = block + tail, start
        if not tail:
            return None
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        side = path.with_name(f"{path.name}.torn-{stamp}-{os.getpid()}")
        write_atomic(side, tail)
        os.ftruncate(fd, end)
        os.fsync(fd)
    finally:
        os.close(fd)
    return side
