"""Executors run cells and hand back records; the local one runs each cell in its own worker process here."""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from backends import backend_info
from harness import forkserver
from harness.cell_config import CellConfig
from harness.cells import Cell, cell_config
from harness.forkserver import ForkedWorker, ForkServer
from harness.lifeline import CELL_DIR_PREFIX
from harness.node import describe_node
from harness.results import REPO_ROOT, empty_record, utc_now
from harness.run_config import RunConfig
from harness.worker import PROGRESS_PREFIX


class Executor(Protocol):
    """Where the cells of a run execute: the runner calls start, run, then close (stop on an interruption)."""

    name: str

    def start(self, cfg: RunConfig) -> None:
        """Connect to whatever runs the cells; raise UsageError when that cannot be done."""

    def run(self, cfg: RunConfig, cells: list[Cell], sources: dict, *, bar, on_record) -> None:
        """Run `cells`, calling on_record(cell, record) as each one ends."""

    def stop(self) -> None:
        """End the cells still running (Ctrl-C, SIGTERM, a full disk)."""

    def close(self) -> None:
        """Release what start took; always called at the end of a run."""


STDERR_TAIL_LINES = 30


def worker_env(threads: int) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # Same thread budget for every framework, set before any of them is imported.
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    root = str(REPO_ROOT)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def run_worker(cell_cfg: CellConfig, workdir: Path, *, timeout: float | None, threads: int,
               on_event: Callable[[dict], None], state: dict, zygote: ForkServer | None = None) -> dict:
    """Run one worker process, forked by `zygote` or else a fresh interpreter; always returns a record,
    whatever happened to the process."""
    cfg_path, rec_path = workdir / "cell.json", workdir / "record.json"
    # The worker watches this PID and, if it dies, removes `cell_dir` itself (lifeline.py).
    cfg_path.write_text(dataclasses.replace(cell_cfg, driver_pid=os.getpid(), cell_dir=str(workdir)).to_json())
    faults: list[str] = []
    tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)

    def on_line(line: str) -> None:
        if line.startswith(PROGRESS_PREFIX):
            try:
                event = json.loads(line[len(PROGRESS_PREFIX):])
            except ValueError:
                return
            if event.get("event") == "fault":
                faults.append(str(event.get("fault")))
            on_event(event)
        else:
            tail.append(line.rstrip("\n"))

    reader = None
    if zygote is not None:  # its reader thread hands us the worker's lines, up to the worker's exit
        proc = zygote.start(str(cfg_path), str(rec_path), on_line)
    else:
        proc = subprocess.Popen([sys.executable, "-m", "harness.worker", str(cfg_path), str(rec_path)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, errors="replace",
                                env=worker_env(threads), start_new_session=True)
        reader = threading.Thread(target=lambda: [on_line(line) for line in proc.stderr], daemon=True)
        reader.start()
    state["proc"] = proc
    timed_out = False
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        stop_process(proc)
    if reader is not None:
        reader.join(timeout=5)
    state["proc"] = None

    record = None
    if rec_path.exists():
        try:
            record = json.loads(rec_path.read_text())
        except ValueError:
            record = None
    if record is None:
        record = empty_record(task=cell_cfg.task, backend=cell_cfg.backend, repeat=cell_cfg.repeat,
                              seed=cell_cfg.seed)
        record["finished_at"] = utc_now()
        if timed_out:
            reason, error = "timeout", f"worker exceeded --timeout {timeout:g} s and was killed"
        elif proc.returncode < 0:
            name = signal.Signals(-proc.returncode).name
            hint = " (SIGKILL: often the kernel's out-of-memory killer)" if name == "SIGKILL" else ""
            reason, error = "signal", f"worker killed by {name}{hint}"
        else:
            reason, error = "exit", f"worker exited with code {proc.returncode} without writing a record"
        record.update(status="failed", error=error,
                      failure={"reason": reason, "exit_code": proc.returncode,
                               "signal": signal.Signals(-proc.returncode).name if (proc.returncode or 0) < 0 else None})
    if record["status"] in ("failed", "diverged"):
        record["failure"] = {**(record.get("failure") or {}), "stderr_tail": list(tail)}
    if faults:  # test-only fault injection: a record made under it says so
        record["env"] = {**(record.get("env") or {}), "injected_fault": faults[0]}
    return record


def stop_process(proc: subprocess.Popen | ForkedWorker, grace_s: float = 5.0) -> None:
    """SIGTERM the worker's process group, then SIGKILL what is left after a grace period."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if proc.pid is None:  # a zygote that never forked it
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace_s)
            return
        except subprocess.TimeoutExpired:
            continue


def skipped_record(cell: Cell, seed: int, error: str) -> dict:
    record = empty_record(task=cell.task, backend=cell.backend, repeat=cell.repeat, seed=seed)
    record.update(status="skipped", error=error, started_at=utc_now(), finished_at=utc_now())
    return record


def missing_backend_record(cfg: RunConfig, cell: Cell) -> dict | None:
    """A skipped record when the cell's framework is not installed here, else None."""
    info = backend_info(cell.backend)
    if not info.missing():
        return None
    return skipped_record(cell, cfg.seed + cell.repeat,
                          f"{', '.join(info.missing())} not installed: {info.install_hint}")


class LocalExecutor:
    """The default executor: cells one after another, each in its own worker process on this machine.

    Each worker is a fresh interpreter; under --quick on Linux a zygote per backend imports the
    framework once and forks each cell's worker (harness.forkserver), saving an import per cell.
    """

    name = "local"

    def __init__(self):
        self.state: dict = {"proc": None}
        self.zygotes: dict[str, ForkServer] = {}

    def zygote(self, cfg: RunConfig, backend: str) -> ForkServer | None:
        """The backend's zygote under --quick, started at its first cell (again if it died); None: spawn."""
        if not (cfg.quick and forkserver.available()):
            return None
        server = self.zygotes.get(backend)
        if server is None or not server.alive():
            if server is not None:
                server.close()  # reaped now, not left a zombie for the rest of the run
            server = self.zygotes[backend] = ForkServer(backend, worker_env(cfg.threads))
        return server

    def start(self, cfg: RunConfig) -> None:
        """Nothing to connect to; an executor raises UsageError here when it cannot run."""

    def run(self, cfg: RunConfig, cells: list[Cell], sources: dict, *, bar, on_record) -> None:
        """Run `cells`, calling on_record(cell, record) as each one ends."""
        # The zygotes import side by side before any cell, never beside one that is being timed.
        starting = [self.zygote(cfg, b) for b in dict.fromkeys(c.backend for c in cells)
                    if not backend_info(b).missing()]
        for server in filter(None, starting):
            server.wait_ready()
        for cell in cells:
            bar.start_cell(cell.label)
            record = missing_backend_record(cfg, cell)
            if record is None:
                zygote = self.zygote(cfg, cell.backend)
                if zygote is not None:
                    zygote.wait_ready()  # a zygote started again (it died) imports before its cell
                with tempfile.TemporaryDirectory(prefix=CELL_DIR_PREFIX) as tmp:
                    record = run_worker(cell_config(cfg, cell, sources[cell.task]), Path(tmp), timeout=cfg.timeout,
                                        threads=cfg.threads, on_event=bar.event, state=self.state, zygote=zygote)
            record["node"] = describe_node(executor=self.name)
            on_record(cell, record)

    def stop(self) -> None:
        """On Ctrl-C / SIGTERM: end the cell that is running."""
        if self.state.get("proc") is not None:
            stop_process(self.state["proc"])

    def close(self) -> None:
        """Always called at the end of a run, interrupted or not: the zygotes end."""
        for server in self.zygotes.values():
            server.close()
        self.zygotes.clear()
