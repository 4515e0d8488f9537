"""TensorFlow data parallel: a MirroredStrategy over 2 logical CPUs trains one epoch as one device does.

Each replica count needs its own process (the logical CPUs exist only if made before TF
starts), and TF takes ~5 s to start here, so one process per count runs every (task,
mode) below through tests/data_parallel_run.py's main, writing its npz files; the two
processes run side by side. 512 synthetic samples, batch 64: 8 steps, then evaluation
on 200 samples.

Tolerances, measured on the 2-core VM (N=2 against N=1, same task and mode):
- mnist-mlp and cifar-cnn (Adam, lr 1e-3): relative L2 error ||w2 - w1|| / ||w1 - w0||
  per parameter at most 6.2e-7 / 1.0e-6 (mnist eager / compiled) and 1.1e-5 / 1.3e-5
  (cifar eager / compiled), max abs difference at most 7.5e-6; the bounds 1e-4 and 5e-5
  leave ~8x. Per-step losses differ by at most 2.4e-7 (1 ulp at ~2), bound 2e-6;
  evaluation loss by at most 1.2e-7, bound 1e-6.
- cifar-resnet-bn (AdamW, clip 1.0, warm-up: lr 2e-5 .. 1.6e-4 over these 8 steps): the
  BatchNorm gradients cancel (dy - mean(dy) - x_hat mean(dy x_hat)), so float32
  summation order alone moves kernels and BatchNorm scales by up to 5.9e-3 relative:
  that is one device's eager run against its compiled one. N=2 against N=1 measured at
  most 4.3e-3 relative, loss 7.2e-7, evaluation loss 1.7e-5; bounds 1e-2, 1e-5, 1e-4.
  Max abs: 4.3e-5 on kernels, 1.9e-4 on running means (they track the noisy biases
  below; 1.6e-4 between one device's eager and compiled runs); bound 5e-4.
  Per-replica batch statistics (Keras's default, synchronized=False) measured 0.086 to
  0.16 relative on every conv kernel and up to 4.7e-3 on the losses: the bounds catch them.
  A convolution's bias feeding a BatchNorm has a true gradient of zero (BatchNorm
  subtracts the batch mean), so Adam turns float32 noise into ~lr-sized steps of either
  sign: relative error 1.1 to 1.9 even between one device's eager and compiled runs.
  Those biases are held only to twice the steps' summed learning rate x 1.03 (the most
  |m_hat / sqrt(v_hat)| reaches in 8 steps, by Cauchy-Schwarz): 1.5e-3, measured 9.1e-4.
- Accuracy: equal in every measurement; one prediction (1/200) may flip on an argmax
  near-tie, so that is the bound.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import require
from data_parallel_run import load_spec, weight_mismatches

TESTS = Path(__file__).resolve().parent
BN_TASK = str(TESTS.parent / "examples" / "tasks" / "cifar-resnet-bn.toml")
RUNS = [("mnist-mlp", "eager"), ("mnist-mlp", "compiled"), ("cifar-cnn", "eager"),
        ("cifar-cnn", "compiled"), (BN_TASK, "eager")]
# (relative L2 per parameter, max abs, per-step loss, evaluation loss), from the docstring's measurements.
TOLERANCES = {"mnist-mlp": (1e-4, 5e-5, 2e-6, 1e-6), "cifar-cnn": (1e-4, 5e-5, 2e-6, 1e-6),
              BN_TASK: (1e-2, 5e-4, 1e-5, 1e-4)}
EVAL_SAMPLES = 200  # tests/data_parallel_run.py's
BATCH_SIZE = 64  # tests/data_parallel_run.py's default

# Runs in each child: every (task, mode) of RUNS, then with 2 replicas a probe of the
# backend itself (what runs where, memory, what it refuses).
CHILD = r"""
import json, sys
import numpy as np
sys.path.insert(0, sys.argv[1])
from data_parallel_run import main
n, out, runs = int(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4])
for i, (task, mode) in enumerate(runs):
    main(["tensorflow", task, str(n), f"{out}/{i}.npz", "--mode", mode])
if n > 1:
    from backends import get_backend
    from backends.base import BackendUnavailable, Replicas
    from harness.data import synthetic
    from harness.weights import initial_weights
    from tasks import get_task
    from tasks.taskfile import load_task_file
    backend = get_backend("tensorflow")
    backend.configure(device="cpu", threads=1, precision="fp32", replicas=Replicas(n))
    spec = get_task("mnist-mlp").with_overrides(batch_size=64)
    data = synthetic("mnist", n_train=128, n_test=10, seed=0)
    model = backend.build(spec, initial_weights(spec, seed=0), trainable=None, mode="eager")
    backend.train_epoch(model, backend.put_data(data.x_train, data.y_train), np.arange(128), 64)
    copies = [[c.numpy() for c in v.value.values] for v in model.variables]
    probe = {"env": backend.environment(), "memory": backend.memory(),
             "in_sync": backend._strategy.num_replicas_in_sync,
             "copy_devices": [c.device for c in model.variables[0].value.values],
             "copies_max_diff": max(float(np.abs(c - cs[0]).max()) for cs in copies for c in cs)}
    bn = load_task_file(sys.argv[5])
    try:
        backend.build(bn, initial_weights(bn, seed=0), trainable=None, mode="compiled")
    except BackendUnavailable as exc:
        probe["compiled_bn"] = str(exc)
    try:
        get_backend("tensorflow").configure(device="cpu", threads=1, precision="fp32", replicas=Replicas(n + 1))
    except BackendUnavailable as exc:
        probe["late_split"] = str(exc)
    with open(f"{out}/probe.json", "w") as f:
        json.dump(probe, f)
"""


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """{N: folder} of the npz files (index into RUNS) and, for N=2, probe.json."""
    require("tensorflow")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(TESTS.parent)}
    procs = {}
    for n in (1, 2):
        out = tmp_path_factory.mktemp(f"replicas{n}")
        cmd = [sys.executable, "-c", CHILD, str(TESTS), str(n), str(out), json.dumps(RUNS), BN_TASK]
        procs[n] = out, subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for n, (_, proc) in procs.items():
        output, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"N={n} failed:\n{output[-4000:]}"
    return {n: out for n, (out, _) in procs.items()}


def _spec(task):
    return load_spec(task).with_overrides(batch_size=BATCH_SIZE)


@pytest.mark.parametrize("index", range(len(RUNS)),
                         ids=[f"{Path(t).stem}-{m}" for t, m in RUNS])
def test_two_replicas_train_as_one_device(results, index):
    task, _ = RUNS[index]
    spec = _spec(task)
    rel_tol, abs_tol, loss_tol, eval_tol = TOLERANCES[task]
    one, two = (np.load(results[n] / f"{index}.npz") for n in (1, 2))
    noise_bound = 2 * 1.03 * float(np.sum(spec.optimizer.lr_table()[: len(one["losses"])]))
    failures = weight_mismatches(spec, one, two, rel_tol=rel_tol, abs_tol=abs_tol, noise_abs=noise_bound)
    assert not failures, "N=2 weights differ from N=1:\n" + "\n".join(failures)
    np.testing.assert_allclose(two["losses"], one["losses"], rtol=0, atol=loss_tol)
    assert abs(two["eval"][0] - one["eval"][0]) <= eval_tol
    assert abs(two["eval"][1] - one["eval"][1]) <= 1 / EVAL_SAMPLES + 1e-9


def test_two_replicas_are_two_devices_with_identical_copies(results):
    probe = json.loads((results[2] / "probe.json").read_text())
    assert probe["in_sync"] == 2
    devices = probe["env"]["replica_devices"]
    assert len(devices) == 2 and devices[0].endswith("CPU:0") and devices[1].endswith("CPU:1")
    assert [d.rsplit("/", 1)[-1] for d in probe["copy_devices"]] == ["device:CPU:0", "device:CPU:1"]
    # Every replica applies the same update to the same values: its copies stay bit-equal.
    assert probe["copies_max_diff"] == 0.0
    # CPUs keep no allocator statistics: None per replica, not a made-up 0.
    assert probe["memory"] == {"device_peak_mb": None, "replica_peak_mb": [None, None]}


def test_refusals_are_clear(results):
    probe = json.loads((results[2] / "probe.json").read_text())
    assert "compiled mode cannot train BatchNorm" in probe["compiled_bn"]
    assert "already started" in probe["late_split"] and "fresh process" in probe["late_split"]
