"""--quick on Linux: a process per backend imports its framework once and forks each cell's worker from it.

Only --quick forks: a forked worker's peak RSS leaves out the shared-library pages it never
touches (the zygote loaded them), so its memory figures are not a fresh process's (docs/modes.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable

# The zygote's own lines on the shared stderr pipe: ready after its import, a cell's worker PID when forked,
# its exit status when reaped.
ZYGOTE_PREFIX = "@@tribench-zygote "
FORK_REPLY_S = 60.0  # a ready zygote forks in milliseconds; this bounds one that hangs
IMPORT_S = 300.0  # a framework's import: seconds, a few times that on a loaded machine; bounds one that hangs in it


def available() -> bool:
    """Whether workers can be forked here: Linux, where forking after a framework's import (no thread pool or
    device started yet) is safe; elsewhere each cell spawns a fresh interpreter."""
    return sys.platform.startswith("linux")


class ForkedWorker:
    """A cell's worker forked by a zygote: what the executor needs of a Popen (pid, wait, returncode)."""

    def __init__(self):
        self.pid: int | None = None
        self.returncode: int | None = None
        self._forked, self._exited = threading.Event(), threading.Event()

    def wait(self, timeout: float | None = None) -> int:
        if not self._exited.wait(timeout):
            raise subprocess.TimeoutExpired("forked worker", timeout)
        return self.returncode


class ForkServer:
    """Driver side: starts the zygote of one backend, asks it for a worker per cell, reads their stderr."""

    def __init__(self, backend: str, env: dict):
        self.backend = backend
        self.proc = subprocess.Popen([sys.executable, "-m", "harness.forkserver", backend],
                                     stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True, errors="replace", env=env, start_new_session=True)
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._worker: ForkedWorker | None = None
        self._on_line: Callable[[str], None] = lambda line: None
        self._reader = threading.Thread(target=self._read, name=f"zygote-{backend}", daemon=True)
        self._reader.start()

    def start(self, cfg_path: str, rec_path: str, on_line: Callable[[str], None]) -> ForkedWorker:
        """Fork a worker for one cell; its stderr lines go to on_line until it exits."""
        worker = ForkedWorker()
        with self._lock:
            self._worker, self._on_line = worker, on_line
        try:
            self.proc.stdin.write(json.dumps([cfg_path, rec_path]) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError):  # the zygote is gone: the cell fails like a dead worker
            self._zygote_gone()
        if not worker._forked.wait(FORK_REPLY_S) and not worker._exited.is_set():
            self.close()
            self._zygote_gone()
        return worker

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_ready(self, timeout: float = IMPORT_S) -> None:
        """Until the zygote has imported its framework (or died), so that no import runs beside a cell."""
        self._ready.wait(timeout)

    def _read(self) -> None:
        for line in self.proc.stderr:
            if not line.startswith(ZYGOTE_PREFIX):
                with self._lock:
                    on_line = self._on_line
                on_line(line)
                continue
            try:
                event = json.loads(line[len(ZYGOTE_PREFIX):])
            except ValueError:
                continue
            if "ready" in event:
                self._ready.set()
                continue
            with self._lock:
                worker = self._worker
            if worker is None or (worker.pid is not None and event.get("pid") != worker.pid):
                continue
            worker.pid = event.get("pid")
            worker._forked.set()
            if "exit" in event:
                self._finish(worker, int(event["exit"]))
        self._ready.set()
        self._zygote_gone()

    def _zygote_gone(self) -> None:
        """The zygote died (killed, or out of memory): the cell in flight ends as a worker killed with it."""
        with self._lock:
            worker = self._worker
        if worker is not None and not worker._exited.is_set():
            code = self.proc.poll()
            self._finish(worker, code if code is not None and code < 0 else -9)

    def _finish(self, worker: ForkedWorker, code: int) -> None:
        worker.returncode = code
        with self._lock:
            if self._worker is worker:
                self._worker, self._on_line = None, lambda line: None
        worker._forked.set()
        worker._exited.set()

    def close(self, grace_s: float = 5.0) -> None:
        """End the zygote: EOF on its stdin, then SIGKILL after `grace_s`."""
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _preload(backend: str) -> float:
    """Import the backend's framework and what a cell runs; returns the seconds it took. Errors surface in the cell."""
    started = time.perf_counter()
    try:
        from backends import get_backend
        from harness import loop, worker  # noqa: F401 - imported for the forked workers

        get_backend(backend).import_framework()
    except Exception:  # noqa: BLE001 - the cell's own configure reports it, as a fresh process would
        pass
    return time.perf_counter() - started


def _announce(event: dict) -> None:
    sys.stderr.write(ZYGOTE_PREFIX + json.dumps(event) + "\n")
    sys.stderr.flush()


def _run_child(cfg_path: str, rec_path: str, preload_s: float, zygote_pid: int) -> None:
    """In the forked child: become a worker with its own session, run the cell, exit without returning."""
    import atexit
    import traceback

    code = 1
    try:
        os.setsid()  # its own process group, as a spawned worker has: the driver signals the group
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        from harness import worker

        worker.WORKER_START.update(how="fork", preload_s=preload_s)
        code = worker.main([cfg_path, rec_path], parent_pid=zygote_pid)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001 - never return into the zygote's loop
        traceback.print_exc()
    finally:
        try:
            atexit._run_exitfuncs()  # what a fresh interpreter would run on exit
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def main(argv: list[str] | None = None) -> int:
    """The zygote: import once, then fork a worker per request line ("[config, record]") until EOF."""
    backend = (argv if argv is not None else sys.argv[1:])[0]
    import signal

    from harness.lifeline import parent_death_signal

    parent_death_signal(signal.SIGTERM)  # dies with the driver; its workers then see it gone (lifeline)
    preload_s = _preload(backend)
    _announce({"ready": preload_s})
    for line in sys.stdin:
        try:
            cfg_path, rec_path = json.loads(line)
        except ValueError:
            continue
        zygote_pid = os.getpid()
        pid = os.fork()
        if pid == 0:
            _run_child(str(cfg_path), str(rec_path), preload_s, zygote_pid)
        _announce({"pid": pid})
        _, status = os.waitpid(pid, 0)
        _announce({"pid": pid, "exit": os.waitstatus_to_exitcode(status)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
