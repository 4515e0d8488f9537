"""tribench run --data-parallel N: refusals, N-versus-1 checkpoints end to end, replica faults, the scaling sweep."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from conftest import INSTALLED, require
from record_factory import make_record
from test_cli import run_cli

from harness.checkpoint import load_checkpoint
from harness.cli import main
from harness.results import read_records
from harness.sweep import DATA_PARALLEL, scaling_efficiency, write_sweep
from harness.weights import initial_weights
from tasks import get_task

# Its module fixture is costly: every test of the module runs in the same test process (pytest-xdist).
pytestmark = pytest.mark.xdist_group("test_data_parallel")

BACKENDS = ("torch", "tensorflow", "jax")


def test_a_batch_that_does_not_split_is_refused_with_one_line(capsys, tmp_path):
    assert main(["run", "--task", "mnist-mlp", "--backend", "torch", "--data", "synthetic", "--data-parallel", "3",
                 "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert "batch size 128 does not split evenly over --data-parallel 3" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_the_sweep_refuses_a_count_that_does_not_split_before_running_anything(capsys, tmp_path):
    assert main(["sweep", "--task", "mnist-mlp", "--backend", "torch", "--data", "synthetic",
                 "--data-parallel", "1,2,3", "--out", str(tmp_path / "sweep")]) == 2
    assert "--data-parallel 3" in capsys.readouterr().err
    assert not (tmp_path / "sweep").exists()


def _dp_record(backend: str, n: int, rate: float, repeat: int = 0) -> dict:
    r = make_record("mnist-mlp", backend, repeat, throughput=rate, synthetic=True)
    r["env"].update(data_parallel=n, per_replica_batch=128 // n)
    r["spec"]["batch_size"] = 128
    return r


def test_the_sweep_reports_scaling_efficiency_against_one_replica(tmp_path):
    records = [_dp_record("jax", 1, 1000.0), _dp_record("jax", 2, 1500.0), _dp_record("jax", 4, 2000.0),
               _dp_record("torch", 2, 900.0)]  # no 1-replica point: no efficiency to give
    md, png = write_sweep(records, tmp_path, DATA_PARALLEL)
    table = md.read_text()
    assert "# Data-parallel sweep" in table and "scaling efficiency" in table
    rows = {line.split("|")[2].strip() + line.split("|")[4].strip(): line for line in table.splitlines()
            if line.startswith("| mnist-mlp")}
    assert "| 75% |" in rows["jax2"] and "| 50% |" in rows["jax4"] and "| 100% |" in rows["jax1"]
    assert "| n/a |" in rows["torch2"]
    assert "sharing the same cores" in table  # what CPU figures mean
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_scaling_efficiency_uses_the_medians():
    from harness.sweep import _rows

    records = [_dp_record("jax", 1, rate, repeat) for repeat, rate in enumerate((900.0, 1000.0, 1100.0))]
    records += [_dp_record("jax", 2, rate, repeat) for repeat, rate in enumerate((1000.0, 1200.0, 5000.0))]
    eff = scaling_efficiency(_rows(records, DATA_PARALLEL))
    assert eff[("mnist-mlp", "jax", "cpu", 2)] == pytest.approx(1200.0 / 2000.0)


# --- end to end: every backend, N = 2 against N = 1 -------------------------------------------

def _run(out: Path, replicas: int, backends: list[str]):
    return run_cli("run", "--task", TASK, "--backend", ",".join(backends), "--data", "synthetic",
                   "--quick", "--epochs", "1", "--batch-size", str(BATCH), "--mode", "eager", "--device", "cpu",
                   "--precision", "fp64", "--threads", "2", "--data-parallel", str(replicas), "--out", str(out),
                   timeout=1200)


@pytest.fixture(scope="module")
def one_and_two(tmp_path_factory):
    backends = [b for b in BACKENDS if b in INSTALLED]
    root = tmp_path_factory.mktemp("dp")
    done = {n: _run(root / f"n{n}", n, backends) for n in (1, 2)}
    return root, done


# End to end, the MLP (the CNN's and BatchNorm's replicas are held per adapter,
# test_data_parallel_<backend>.py; what is held here is the CLI's wiring: records, checkpoints,
# replica devices): one epoch of the --quick subset (12,000 samples) at global batch 512
# (23 Adam steps), in float64: N = 2 against N = 1 changes only the summation order (the
# all-reduce, the split batch's reductions), ~1e-16 relative, which Adam amplifies ~1e5-fold at
# most (tests/data_parallel_run.py). In float32 that amplified rounding is the whole signal and
# depends on the CPU's kernels and the step count: cifar-cnn torch gave 1.1e-4 after 7 steps,
# 3.5e-3 after 3 and 0.16 after 6 on this 2-core EPYC, up to 1.2e-2 after 8 on an AVX-512 Xeon.
# The checkpoints hold float32, so what is left is their rounding: at most one float32 ulp of a
# weight (|w| < 1: 1.2e-7) against each one's ~lr x steps of training (2e-2), under 1e-4 however
# many elements round apart (measured: 0.0 for every backend, for the MLP and for cifar-cnn).
# A wrong split (a replica training on its half alone, gradients summed not averaged) gives
# order 1e-2 to 1. The MLP's cells take ~45 s of the CNN's ~125 s (both N, every backend).
TASK = "mnist-mlp"
BATCH = 512
REL_L2 = 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_two_replicas_end_where_one_device_ends(one_and_two, backend):
    require(backend)
    root, done = one_and_two
    task = TASK
    records = {n: {r["backend"]: r for r in read_records(root / f"n{n}")} for n in (1, 2)}
    for n in (1, 2):
        assert records[n][backend]["status"] == "ok", (records[n][backend].get("error"), done[n].stderr[-2000:])
    env = records[2][backend]["env"]
    assert env["data_parallel"] == 2 and env["per_replica_batch"] == BATCH // 2 and len(env["replica_devices"]) == 2
    assert records[1][backend]["env"]["data_parallel"] == 1
    spec = get_task(task)
    w0 = initial_weights(spec, seed=0)
    (c1,), (c2,) = (sorted((root / f"n{n}" / "checkpoints").glob(f"{task}-{backend}-r0-*.safetensors")) for n in (1, 2))
    (_, w1), (_, w2) = load_checkpoint(c1), load_checkpoint(c2)
    worst = max(np.linalg.norm(b - a) / max(np.linalg.norm(a - i), 1e-12) for a, b, i in zip(w1, w2, w0))
    assert worst < REL_L2, f"{backend} {task}: N=2 vs N=1 relative L2 {worst:.2e}"
    m1, m2 = records[1][backend]["metrics"], records[2][backend]["metrics"]
    assert m2["test_accuracy"] == pytest.approx(m1["test_accuracy"], abs=1e-9)
    assert np.allclose(m2["epoch_train_loss"], m1["epoch_train_loss"], rtol=1e-9)


# --- faults --------------------------------------------------------------------------------

MARKER = "TRIBENCH_TEST_RUN"  # set in this test's run only; every process it starts inherits it


def _processes_marked(marker: str) -> set[int]:
    """PIDs of processes alive now whose environment holds MARKER=marker: this test's own, none of
    another tribench run on the machine (a user's, another test's)."""
    pids = set()
    needle = f"{MARKER}={marker}".encode()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                environ = Path(f"/proc/{entry}/environ").read_bytes()
            except OSError:  # gone, or another user's
                continue
            if needle in environ.split(b"\0"):
                pids.add(int(entry))
    return pids


@pytest.mark.slow
@pytest.mark.parametrize("fault, says", [("oom", "SIGKILL"), ("raise", "injected fault")])
def test_a_dead_replica_fails_its_cell_with_its_rank_and_leaves_no_process(tmp_path, fault, says):
    require("torch")
    marker = f"{os.getpid()}-{tmp_path.name}"
    out = run_cli("run", "--task", "mnist-mlp", "--backend", "torch", "--data", "synthetic", "--quick",
                  "--epochs", "1", "--repeats", "2", "--mode", "eager", "--data-parallel", "2", "--out", str(tmp_path),
                  env={"TRIBENCH_FAULT": f"{fault}@mnist-mlp/torch/0", "TRIBENCH_FAULT_RANK": "1", MARKER: marker},
                  timeout=600)
    assert out.returncode == 1, out.stderr[-3000:]
    records = {r["repeat"]: r for r in read_records(tmp_path)}
    failed = records[0]
    assert failed["status"] == "failed" and failed["failure"]["reason"] == "replica"
    assert failed["failure"]["rank"] == 1 and "replica rank 1 failed" in failed["error"] and says in failed["error"]
    assert records[1]["status"] == "ok"  # the repeat went down, not the matrix
    assert _processes_marked(marker) == set()  # the run, its workers and their replica processes all ended
