"""torch data parallel: two gloo replica processes (DDP) against one process on the same global batches.

Each run is tests/data_parallel_run.py (one epoch, 512 synthetic samples, global batch
64: 8 steps) in fresh processes, as the replicas' process group must exist before
training starts. The runs train in float64, where N=2 and N=1 agree to rounding on any
CPU, and data_parallel_run.mismatches holds them to 1e-9 (weights, relative and absolute)
and 1e-10 (losses). Measured N=2 against N=1 (2-core Xeon, torch 2.13 CPU, one thread per
process): worst relative L2 per parameter / largest element / largest loss difference
mnist-mlp eager 2.1e-15 / 1.4e-15 / 4.4e-16, compiled 2.1e-15 / 1.4e-15 / 4.4e-16;
cifar-cnn eager 1.1e-14 / 5.5e-15 / 4.4e-16; cifar-resnet-bn eager 4.0e-13 (stem_bn.running_mean)
/ 1.2e-13 / 8.9e-16, its biases feeding a BatchNorm 4.9e-13; evaluation losses <= 5.3e-15,
accuracies equal. So data parallelism is right: the float32 gap is rounding.
The same runs in float32 differ by up to 1.2e-2 relative (cifar-cnn conv1.kernel, on an
AVX-512 Xeon; 1.2e-5 on an AMD EPYC): rounding, which Adam amplifies ~1e5-fold over 8
steps by an amount that depends on the CPU's kernels; float64 takes that out.

What the tolerances catch: per-replica BatchNorm statistics (torch's default under DDP,
what the adapter must NOT do) move every conv kernel by 0.1-0.16 relative; a gradient
summed instead of averaged, or a replica stepping on another slice, by order 1.
Biases feeding a BatchNorm have a zero true gradient and move only by rounding noise, so
their relative error means nothing: they are held to the absolute bound alone.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import require
from data_parallel_run import load_spec, mismatches

# Its module fixture is costly: every test of the module runs in the same test process (pytest-xdist).
pytestmark = pytest.mark.xdist_group("test_data_parallel_torch")

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "tests" / "data_parallel_run.py"
BN_TASK = str(ROOT / "examples" / "tasks" / "cifar-resnet-bn.toml")
BATCH = 64  # data_parallel_run.py's default global batch
WAIT_S = 300  # a run that takes longer than this has hung
# The replicas' collective timeout for these runs: a broken run fails in a minute, not five.
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "TRIBENCH_REPLICA_TIMEOUT_S": "60"}

CASES = [("mnist-mlp", "eager"), ("cifar-cnn", "eager"), ("mnist-mlp", "compiled"), (BN_TASK, "eager")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(args: list[str], env: dict = ENV) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_all(procs: list[subprocess.Popen], timeout: float = WAIT_S) -> list[tuple[int, str, str]]:
    """(exit code, stdout, stderr tail) per process; kills them all (they are this test's) on a hang."""
    deadline = time.monotonic() + timeout
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=max(deadline - time.monotonic(), 1))
            results.append((p.returncode, out, err[-3000:]))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
            p.communicate()
        pytest.fail(f"replica processes still running after {timeout} s")
    return results


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def one_device() -> dict:
    """task -> its N=1 eager results, shared by the task's modes."""
    return {}


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"{Path(c[0]).stem}-{c[1]}")
def pair(request, one_device, tmp_path_factory):
    """(spec, N=1 eager results, N=2 results in the mode) for one case, in float64.

    The N=1 reference is eager for every mode: in float64, compiled and eager compute the
    same math too, and a third inductor compile is ~13 s. The N=1 process runs beside the
    two replica processes.
    """
    require("torch")
    task, mode = request.param
    tmp = tmp_path_factory.mktemp("dp")
    one, two, port = tmp / "n1.npz", tmp / "n2.npz", free_port()
    base = [str(RUN), "torch", task]
    cmds = [base + ["2", str(two), "--mode", mode, "--rank", str(r), "--address", f"127.0.0.1:{port}"]
            for r in (0, 1)]
    if task not in one_device:
        cmds.append(base + ["1", str(one), "--mode", "eager"])
    for rc, _, err in wait_all([spawn(c) for c in cmds]):
        assert rc == 0, err
    if task not in one_device:
        one_device[task] = dict(np.load(one))
    spec = load_spec(task).with_overrides(batch_size=BATCH)
    return spec, one_device[task], dict(np.load(two))


def test_two_replicas_compute_what_one_device_computes(pair):
    """Weights (running statistics included), per-step global-batch losses, evaluation: float64 rounding apart."""
    spec, one, two = pair
    failures = mismatches(spec, one, two)
    assert not failures, "N=2 differs from N=1:\n" + "\n".join(failures)


# Every rank: rank0_value, the environment and memory records, then a short BatchNorm
# epoch; prints what must be the same on both ranks. FAULT "kill"/"stop": rank 1 SIGKILLs
# or SIGSTOPs itself after building (DDP's set-up collectives done), before training.
SCRIPT = r"""
import hashlib, json, os, signal, sys, time
from pathlib import Path
import numpy as np
import torch  # imported before the rendezvous, so the two ranks reach it close together
from backends import get_backend
from backends.base import Replicas
from harness.data import synthetic
from harness.loop import epoch_order
from harness.weights import initial_weights
from tasks import get_task
from tasks.taskfile import load_task_file

rank, address, task, fault = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
backend = get_backend("torch")
backend.configure(device="cpu", threads=1, precision="fp32", replicas=Replicas(2, rank, address))
chosen = backend.rank0_value(f"rank {rank}'s choice")
env, memory = backend.environment(), backend.memory()
spec = load_task_file(Path(task)) if task.endswith(".toml") else get_task(task)
spec = spec.with_overrides(batch_size=32)
data = synthetic("cifar10" if spec.input_shape == (32, 32, 3) else "mnist", n_train=64, n_test=40, seed=0)
train, test = backend.put_data(data.x_train, data.y_train), backend.put_data(data.x_test, data.y_test)
model = backend.build(spec, initial_weights(spec, seed=0), trainable=None, mode="eager")
if fault != "none" and rank == 1:
    os.kill(os.getpid(), signal.SIGKILL if fault == "kill" else signal.SIGSTOP)
started = time.monotonic()
try:
    losses = backend.train_epoch(model, train, epoch_order(0, 0, 0, 64, 32), 32)
except Exception as exc:
    print(json.dumps({"error": f"{type(exc).__name__}: {exc}", "after_s": time.monotonic() - started}))
    sys.exit(3)
weights = backend.get_weights(model)
print(json.dumps({"chosen": chosen, "replica_devices": env.get("replica_devices"),
                  "process_group": env.get("process_group"), "replica_peak_mb": memory.get("replica_peak_mb"),
                  "losses": losses.tolist(), "eval": backend.evaluate(model, test, 16),
                  "weights": hashlib.sha256(b"".join(w.tobytes() for w in weights)).hexdigest()}))
"""


def test_replicas_agree_and_rank0_value_is_rank0s():
    require("torch")
    port = free_port()
    results = wait_all([spawn(["-c", SCRIPT, str(r), f"127.0.0.1:{port}", BN_TASK, "none"]) for r in (0, 1)])
    assert [rc for rc, _, _ in results] == [0, 0], [err for _, _, err in results]
    first, second = (last_json(out) for _, out, _ in results)
    assert first["chosen"] == second["chosen"] == "rank 0's choice"
    assert first["replica_devices"] == ["cpu", "cpu"] and first["process_group"] == "gloo"
    assert first["replica_peak_mb"] == [None, None]  # the CPU allocator keeps no peak
    # Bitwise the same on both ranks: losses (all-reduced), eval, weights with the running statistics.
    assert first == second


@pytest.mark.parametrize("fault", ["kill", "stop"])
def test_a_dead_or_stuck_peer_is_an_error_not_a_hang(fault):
    """Rank 1 SIGKILLed: gloo sees the connection reset at once. SIGSTOPped: the collective's timeout fires.

    The short timeout also bounds the rendezvous, so both ranks import torch first (the
    start-up that varies most) and meet within a second of each other.
    """
    require("torch")
    timeout_s = 5.0
    port = free_port()
    env = {**ENV, "TRIBENCH_REPLICA_TIMEOUT_S": str(timeout_s)}
    procs = [spawn(["-c", SCRIPT, str(r), f"127.0.0.1:{port}", "mnist-mlp", fault], env) for r in (0, 1)]
    try:
        [(rc, out, err)] = wait_all(procs[:1])
    finally:
        if procs[1].poll() is None:  # SIGSTOPped (or slow to die): ours to end
            procs[1].kill()
        procs[1].communicate()
    assert rc == 3, err
    report = last_json(out)
    assert "RuntimeError" in report["error"]
    assert report["after_s"] < timeout_s + 5, report
    if fault == "stop":
        assert report["after_s"] >= timeout_s - 0.5, report  # it waited for the timeout, not less
    assert procs[1].returncode == -signal.SIGKILL
