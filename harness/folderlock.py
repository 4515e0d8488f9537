"""One run per results folder: an flock the kernel releases when the process holding it dies."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from harness.confine import open_file

LOCK_FILE = ".tribench.lock"


class FolderBusy(RuntimeError):
    """Another live process holds the folder's lock; the message gives its PID."""


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        text = ""
    return f"PID {text}" if text.isdigit() else "another process"


@contextlib.contextmanager
def hold(folder: Path):
    """Hold DIR/.tribench.lock for the block; raise FolderBusy at once if a live process holds it.

    An flock, not a PID file: it cannot go stale, since the kernel drops it with the
    process (kill -9 included). The PID written inside is only there for the message.
    Workers do not inherit it (subprocess closes their file descriptors).
    """
    try:
        import fcntl
    except ImportError:  # not POSIX: no flock; one run per folder is then the user's care
        yield
        return
    path = Path(folder) / LOCK_FILE
    # A symlink planted as the lock would have its target truncated: refused (confine.open_file).
    fd = open_file(path, os.O_RDWR | os.O_CREAT)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FolderBusy(f"{folder} is in use by a running tribench ({_holder(fd)}); wait for it to end "
                             "or use another --out") from None
        with contextlib.suppress(OSError):  # a full disk must not stop the lock itself from working
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # the file stays: unlinking it would race with a process that has just opened it


def check_free(folder: Path) -> None:
    """Raise FolderBusy if a live process holds `folder`; for reads that come before the run takes the lock."""
    if os.path.lexists(Path(folder) / LOCK_FILE):
        try:
            with hold(folder):
                pass
        except OSError:  # not ours to open: the run itself will say the folder is not writable
            pass
