"""--executor ray on a real local Ray instance (2 CPUs): same records as local, retries, cancel and resume.

Run by `tox -e parity` (and `tox -e ray`), where a missing Ray fails the tests (TRIBENCH_REQUIRE_RAY);
elsewhere they skip only when Ray is not installed.
"""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_cli import run_cli

from harness.results import read_records
from harness.run_config import load_resume
from harness.runner import run_matrix

# One test process runs them all (pytest-xdist), one local Ray instance after another, never two at once.
pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.xdist_group("ray")]

# Small cells, two at a time on the 2-CPU instance: one thread each.
RUN = ("run", "--task", "mnist-mlp", "--data", "synthetic", "--quick", "--threads", "1")


@pytest.fixture(autouse=True)
def ray_installed():
    if importlib.util.find_spec("ray") is None:
        if os.environ.get("TRIBENCH_REQUIRE_RAY"):
            pytest.fail('Ray is required here (TRIBENCH_REQUIRE_RAY) but not installed: pip install "tribench[ray]"')
        pytest.skip('Ray not installed: pip install "tribench[ray]"')


def cell_view(record: dict) -> tuple:
    """What must not depend on the executor: the cell, its outcome, its weights (initial loss), its data."""
    m = record["metrics"]
    return (record["task"], record["backend"], record["repeat"], record["seed"], record["status"],
            m.get("initial_test_loss"), record["data"]["n_train"], record["spec"]["epochs"])


def test_a_matrix_on_ray_gives_the_same_ok_records_as_local(tmp_path):
    runs = {}
    for executor in ("local", "ray"):
        out = run_cli(*RUN, "--backend", "torch,jax", "--executor", executor, "--out", str(tmp_path / executor))
        assert out.returncode == 0, out.stderr[-3000:]
        runs[executor] = read_records(tmp_path / executor)
    assert sorted(map(cell_view, runs["ray"])) == sorted(map(cell_view, runs["local"]))
    assert {r["status"] for r in runs["ray"]} == {"ok"} and len(runs["ray"]) == 2
    for record in runs["ray"]:
        node = record["node"]
        assert node["executor"] == "ray" and len(node["node_id"]) >= 40 and node["hostname"]
        assert node["cpu"] and node["cpu_count"] >= 1 and node["memory_gb"] > 0 and node["attempt"] == 1
        assert node["resources"] == {"CPU": 1.0} and node["gpu_ids"] == []  # what Ray reserved: --threads 1
    assert {r["node"]["node_id"] for r in runs["local"]} == {None}
    # The checkpoints each task wrote on its node came back to the run folder ...
    names = {executor: sorted(p.name for p in (tmp_path / executor / "checkpoints").iterdir()) for executor in runs}
    assert names["ray"] == names["local"] and len(names["ray"]) == 2
    # ... and one of them, shipped to a task as --init-from, starts torch from jax's trained weights.
    out = run_cli(*RUN, "--backend", "torch", "--executor", "ray", "--out", str(tmp_path / "init"),
                  "--init-from", str(tmp_path / "ray" / "checkpoints" / "mnist-mlp-jax-r0-train.safetensors"))
    assert out.returncode == 0, out.stderr[-3000:]
    (record,) = read_records(tmp_path / "init")
    assert record["metrics"]["initial_test_accuracy"] > 0.5  # random weights give ~0.1


def test_a_killed_worker_is_retried_once_then_failed_and_the_rest_finishes(tmp_path, monkeypatch):
    monkeypatch.setenv("TRIBENCH_FAULT", "oom@mnist-mlp/jax/0")
    out = run_cli(*RUN, "--backend", "jax", "--repeats", "2", "--executor", "ray", "--out", str(tmp_path / "run"))
    assert out.returncode == 1, out.stderr[-3000:]
    records = {r["repeat"]: r for r in read_records(tmp_path / "run")}
    bad, good = records[0], records[1]
    assert bad["status"] == "failed" and bad["failure"]["signal"] == "SIGKILL"
    # The record is the retry's own (Ray's attempt 2), not a claim made after one attempt.
    assert bad["failure"]["attempts"] == 2 and bad["node"]["attempt"] == 2
    assert "after 1 retry" in bad["error"]
    assert good["status"] == "ok" and good["node"]["attempt"] == 1


SEED = 4242  # marks this file's worker processes among any others on the machine


def workers(seed: int = SEED) -> dict[int, dict]:
    """{pid: cell config} of the live tribench worker processes of runs with this seed."""
    found = {}
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            if b"harness.worker" not in argv:
                continue
            cfg = json.loads(Path(argv[argv.index(b"harness.worker") + 1].decode()).read_text())
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile, or not ours
        if cfg.get("data_seed") == seed:
            found[int(proc.name)] = cfg
    return found


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def wait_for(predicate, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout} s waiting for {predicate.__name__}")


def test_a_ray_worker_that_dies_mid_cell_is_retried_then_recorded(tmp_path):
    # Repeat 0 hangs; killing the Ray worker that runs it (with its worker, as a dying node
    # takes both) must make Ray run it again, and after the second death record it failed.
    proc = subprocess.Popen([sys.executable, "-m", "harness", *RUN, "--backend", "jax", "--repeats", "2",
                             "--seed", str(SEED), "--executor", "ray", "--out", str(tmp_path / "run")],
                            env={**os.environ, "TRIBENCH_FAULT": "hang@mnist-mlp/jax/0"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed = []
    try:
        for _ in range(2):
            def hanging_repeat_0():
                return [pid for pid, cfg in workers().items() if cfg["repeat"] == 0 and pid not in killed]

            (pid,) = wait_for(hanging_repeat_0)
            time.sleep(1)
            for victim in (parent_of(pid), pid):
                os.kill(victim, signal.SIGKILL)
            killed.append(pid)
        _, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, err[-3000:]
    records = {r["repeat"]: r for r in read_records(tmp_path / "run")}
    assert records[1]["status"] == "ok"
    bad = records[0]
    assert bad["status"] == "failed" and bad["failure"]["reason"] == "ray" and bad["failure"]["attempts"] == 2
    assert "Ray:" in bad["error"] and "after 1 retry" in bad["error"]
    assert len(killed) == 2  # the second worker of repeat 0 exists only because Ray retried the cell


def test_a_node_that_dies_mid_cell_is_retried_on_another_then_recorded(tmp_path):
    # Two 1-CPU nodes beside a head that runs nothing. Repeat 0 hangs: its node is removed
    # (raylet and Ray workers gone, as when a machine dies), Ray runs it again on the other
    # node, that one is removed too, and the cell is failed while repeat 1 finished.
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        out = tmp_path / "run"
        # A forced mode: under --mode best repeat 1 waits for repeat 0's choice, and this test needs
        # repeat 1 finished while repeat 0 hangs on a dying node.
        proc = subprocess.Popen([sys.executable, "-m", "harness", *RUN, "--backend", "jax", "--repeats", "2",
                                 "--mode", "eager",
                                 "--seed", str(SEED + 2), "--executor", "ray", "--ray-address", cluster.address,
                                 "--out", str(out)],
                                env={**os.environ, "TRIBENCH_FAULT": "hang@mnist-mlp/jax/0"},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            removed = []
            for _ in range(2):
                def repeat_0_hangs_and_repeat_1_is_done():
                    hanging = [pid for pid, cfg in workers(SEED + 2).items() if cfg["repeat"] == 0]
                    return len(read_records(out)) == 1 and [p for p in hanging if p not in removed]

                (pid,) = wait_for(repeat_0_hangs_and_repeat_1_is_done)
                raylet = parent_of(parent_of(pid))  # worker <- Ray worker <- the node's raylet
                (node,) = [n for n in cluster.worker_nodes if n.all_processes["raylet"][0].process.pid == raylet]
                cluster.remove_node(node)
                os.kill(pid, signal.SIGKILL)  # the machine took its processes with it
                removed.append(pid)
            _, err = proc.communicate(timeout=180)
        finally:
            if proc.poll() is None:
                proc.kill()
    finally:
        cluster.shutdown()
    assert proc.returncode == 1, err[-3000:]
    records = {r["repeat"]: r for r in read_records(out)}
    assert records[1]["status"] == "ok"
    bad = records[0]
    assert bad["status"] == "failed" and bad["failure"]["exception"] == "NodeDiedError"
    assert bad["failure"]["attempts"] == 2 and "node it was running on is dead" in bad["error"]


def test_sigterm_cancels_outstanding_cells_and_resume_completes_the_matrix(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "harness", *RUN, "--backend", "jax", "--repeats", "3",
                             "--seed", str(SEED + 1), "--executor", "ray", "--out", str(out)],
                            env={**os.environ, "TRIBENCH_FAULT": "hang@mnist-mlp/jax/1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        def two_finished_and_one_hanging():
            return len(read_records(out)) == 2 and workers(SEED + 1)

        wait_for(two_finished_and_one_hanging)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    finished = {r["repeat"]: r for r in read_records(out)}
    assert sorted(finished) == [0, 2] and "--resume" in err and (out / "report.md").exists()

    def no_worker_left():
        return not workers(SEED + 1)

    wait_for(no_worker_left, timeout=30)  # cancelling the cell stopped its hanging worker

    assert run_matrix(load_resume(out), resume=True) == 0  # the local executor completes it
    records = {r["repeat"]: r for r in read_records(out)}
    assert sorted(records) == [0, 1, 2] and all(r["status"] == "ok" for r in records.values())
    assert records[0] == finished[0] and records[2] == finished[2]  # not run again
    assert records[1]["node"]["executor"] == "local"


def test_an_unreachable_ray_address_exits_2_at_once(tmp_path):
    t0 = time.monotonic()
    out = run_cli(*RUN, "--backend", "jax", "--executor", "ray", "--ray-address", "127.0.0.1:9",
                  "--out", str(tmp_path / "run"))
    assert out.returncode == 2 and time.monotonic() - t0 < 60
    assert "cannot join that Ray cluster" in out.stderr.strip().splitlines()[-1] and "Traceback" not in out.stderr


def test_joining_an_existing_cluster_runs_there_and_leaves_it_up(tmp_path):
    import ray

    ray.init(num_cpus=1, include_dashboard=False)  # this test process holds the cluster
    try:
        address = ray.get_runtime_context().gcs_address
        (node_id,) = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
        args = ("run", "--task", "mnist-mlp", "--backend", "jax", "--data", "synthetic", "--quick",
                "--executor", "ray", "--ray-address", address)
        too_big = run_cli(*args, "--threads", "2", "--out", str(tmp_path / "big"))
        fits = run_cli(*args, "--threads", "1", "--out", str(tmp_path / "fits"))
        still_up = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    finally:
        ray.shutdown()
    assert too_big.returncode == 2, too_big.stderr[-2000:]
    assert "--threads 2: no node of the Ray cluster has that many CPUs (largest: 1)" in too_big.stderr
    assert fits.returncode == 0, fits.stderr[-3000:]
    (record,) = read_records(tmp_path / "fits")
    assert record["status"] == "ok" and record["node"]["node_id"] == node_id
    assert still_up == [node_id]  # the run disconnected from the cluster, it did not stop it
