"""A worker dies with its driver: a parent-death signal on Linux, a watchdog everywhere, its cell folder removed."""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

PR_SET_PDEATHSIG = 1  # from <sys/prctl.h>
POLL_S = 0.5
CELL_DIR_PREFIX = "tribench-cell-"


def parent_death_signal(sig: int) -> bool:
    """Ask Linux to send `sig` when the parent dies, so even a worker stuck in C code hears of it."""
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def tie_to_driver(driver_pid: int, cell_dir: Path | None) -> None:
    """Call first thing in a worker, before any framework starts its threads.

    SIGTERM, from the driver (timeout, Ctrl-C) or from the kernel (the driver died), is
    blocked in every thread but one watchdog that waits for it with sigtimedwait: a main
    thread inside a long compiled epoch never runs a Python signal handler, a dedicated
    thread does. The watchdog also polls the parent PID, which covers the moment before
    the prctl and systems without it. An orphaned worker removes its cell folder (the
    dead driver cannot) and terminates.
    """
    if sys.platform.startswith("linux"):
        parent_death_signal(signal.SIGTERM)
    catch = hasattr(signal, "sigtimedwait")
    if catch:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    if cell_dir is not None and not Path(cell_dir).name.startswith(CELL_DIR_PREFIX):
        cell_dir = None  # never remove a folder the runner did not make for this cell
    threading.Thread(target=_watch, args=(driver_pid, cell_dir, catch), name="driver-watchdog", daemon=True).start()


def _watch(driver_pid: int, cell_dir: Path | None, catch: bool) -> None:
    while True:
        if catch:
            terminated = signal.sigtimedwait({signal.SIGTERM}, POLL_S) is not None
        else:
            time.sleep(POLL_S)
            terminated = False
        orphaned = _orphaned(driver_pid, settle_s=POLL_S if terminated else 0.0)
        if orphaned and cell_dir is not None:
            shutil.rmtree(cell_dir, ignore_errors=True)
        if terminated or orphaned:
            _terminate()


def _orphaned(driver_pid: int, *, settle_s: float) -> bool:
    """Whether the driver is gone, waiting up to `settle_s` for it to show.

    The kernel may deliver the parent-death signal a moment before getppid() reports the
    new parent, so a SIGTERM is followed by a short look before it counts as the driver's own.
    """
    deadline = time.monotonic() + settle_s
    while True:
        if os.getppid() != driver_pid:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)


def _terminate() -> None:
    """Die of SIGTERM, so the driver (if alive) sees the signal it sent."""
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(1.0)  # a framework may have installed its own SIGTERM handler: do not outlive it
    os._exit(128 + signal.SIGTERM)
