"""--quick forks each cell's worker from a zygote per backend; other runs spawn a fresh interpreter per cell."""

import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from harness.report import task_source
from harness.results import read_records
from harness.run_config import RunConfig
from harness.runner import run_matrix

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="workers fork on Linux only")]


def config(tmp_path, backend, *, quick=True, repeats=1):
    return RunConfig(tasks=["mnist-mlp"], backends=[backend], out=tmp_path / "run", repeats=repeats, quick=quick,
                     epochs=1, data="synthetic", mode="eager")


def children(pid: int) -> dict[int, bytes]:
    """pid's living children and their command lines."""
    found = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                stat = (proc / "stat").read_text().rsplit(")", 1)[1].split()
                cmd = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            if int(stat[1]) == pid and stat[0] not in "ZX":
                found[int(proc.name)] = cmd
    return found


def zygotes() -> set[int]:
    """This test process's zygotes (children running harness.forkserver)."""
    return {pid for pid, cmd in children(os.getpid()).items() if b"harness.forkserver" in cmd}


def test_quick_forks_its_workers_says_so_and_ends_its_zygote(tmp_path, fast_backend):
    assert run_matrix(config(tmp_path, fast_backend, repeats=2)) == 0
    records = read_records(tmp_path / "run")
    assert [r["status"] for r in records] == ["ok", "ok"]
    starts = [r["env"]["worker_start"] for r in records]
    assert all(s["how"] == "fork" and s["preload_s"] > 0 for s in starts)
    assert starts[0]["preload_s"] == starts[1]["preload_s"], "both cells forked from one zygote"
    assert "workers forked" in task_source(records)
    assert zygotes() == set(), "the zygote outlived the run"


def test_a_full_run_spawns_a_fresh_interpreter_per_cell(tmp_path, fast_backend):
    assert run_matrix(config(tmp_path, fast_backend, quick=False)) == 0
    (record,) = read_records(tmp_path / "run")
    assert record["env"]["worker_start"] == {"how": "spawn"}
    assert "workers forked" not in task_source([record])


def test_a_zygote_killed_mid_cell_fails_that_cell_and_the_next_gets_a_new_one(tmp_path, monkeypatch, fast_backend):
    monkeypatch.setenv("TRIBENCH_FAULT", f"hang@mnist-mlp/{fast_backend}/0")
    killed = []

    def kill_the_zygote():  # once it has forked the hanging worker
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed:
            for pid in zygotes():
                if children(pid):
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
            time.sleep(0.5)

    threading.Thread(target=kill_the_zygote, daemon=True).start()
    assert run_matrix(config(tmp_path, fast_backend, repeats=2)) == 1
    bad, good = sorted(read_records(tmp_path / "run"), key=lambda r: r["repeat"])
    assert killed
    assert bad["status"] == "failed" and bad["failure"]["reason"] == "signal", bad["error"]
    assert good["status"] == "ok" and good["env"]["worker_start"]["how"] == "fork"
    assert zygotes() == set()
