"""Starts and watches the other replica processes of a data-parallel cell (backends whose replicas are processes)."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from harness.cell_config import CellConfig

POLL_S = 0.2
STOP_GRACE_S = 5.0


def free_address() -> str:
    """A loopback host:port nobody listens on now, for rank 0 to listen at."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def replica_threads(threads: int, count: int) -> int:
    """Intra-op threads per replica process: the cell's thread budget shared, at least one each."""
    return max(1, int(threads) // count)


class ReplicaProcesses:
    """Ranks 1..N-1 of a cell, each a worker process running the same cell; rank 0 is this process.

    A watcher thread polls them: the first that exits with an error is reported through
    `on_failure(rank, error)` (rank 0 is then usually blocked in a collective waiting
    for it, so the callback must end this process). Each replica writes its record (with
    its error) and its stderr in `folder`; all die with this process (lifeline.py).
    """

    def __init__(self, cfg: CellConfig, folder: Path, on_failure: Callable[[int, str], None]):
        self.cfg, self.folder, self.on_failure = cfg, Path(folder), on_failure
        self.procs: dict[int, subprocess.Popen] = {}
        self._done = threading.Event()

    def start(self) -> None:
        for rank in range(1, self.cfg.data_parallel):
            # Rank 0 alone writes checkpoints and the record the runner reads.
            cfg = dataclasses.replace(self.cfg, rank=rank, driver_pid=os.getpid(), cell_dir=None,
                                      checkpoint_prefix=None)
            cfg_path = self.folder / f"replica-{rank}.json"
            cfg_path.write_text(cfg.to_json())
            with open(self.folder / f"replica-{rank}.log", "w") as log:
                # Same process group as rank 0: the runner's killpg on a timeout reaches them too.
                self.procs[rank] = subprocess.Popen(
                    [sys.executable, "-m", "harness.worker", str(cfg_path), str(self.record_path(rank))],
                    stdout=subprocess.DEVNULL, stderr=log)
        threading.Thread(target=self._watch, name="replica-watcher", daemon=True).start()

    def record_path(self, rank: int) -> Path:
        return self.folder / f"replica-{rank}-record.json"

    def error_of(self, rank: int, returncode: int) -> str:
        """What a replica said in its record, or how it died."""
        try:
            error = json.loads(self.record_path(rank).read_text()).get("error")
        except (OSError, ValueError):
            error = None
        if error:
            return error
        if returncode < 0:
            return f"killed by {signal.Signals(-returncode).name}"
        return f"exited with code {returncode} without writing a record"

    def _watch(self) -> None:
        while not self._done.wait(POLL_S):
            for rank, proc in self.procs.items():
                code = proc.poll()
                if code:  # None: running; 0: finished its part
                    self._done.set()
                    self.on_failure(rank, self.error_of(rank, code))
                    return

    def finish(self, timeout_s: float) -> dict[int, str]:
        """Wait for the replicas after rank 0's part; returns {rank: error} for those that failed or lingered."""
        failures = {}
        for rank, proc in self.procs.items():
            try:
                code = proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                code = None
            if code != 0:
                failures[rank] = (self.error_of(rank, code) if code is not None
                                  else f"still running {timeout_s:g} s after rank 0 finished")
        self.stop()
        return failures

    def stop(self) -> None:
        """Stop watching and end every replica still running (SIGTERM, then SIGKILL)."""
        self._done.set()
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
