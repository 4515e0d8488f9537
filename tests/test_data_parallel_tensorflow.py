"""TensorFlow data parallel: a MirroredStrategy over 2 logical CPUs trains one epoch as one device does.

Each replica count needs its own process (the logical CPUs exist only if made before TF
starts), and TF takes ~5 s to start here, so one process per count runs every (task,
mode) below through tests/data_parallel_run.py's main, writing its npz files; the two
processes run side by side. 512 synthetic samples, batch 64: 8 steps, then evaluation
on 200 samples.

Every run trains in float64 and is held to data_parallel_run.mismatches (1e-9 on the
weights, 1e-10 on the losses). Measured N=2 against N=1 (2-core Xeon, TF 2.21 CPU), worst
relative L2 per parameter / largest element / largest loss difference:
mnist-mlp eager 2.0e-15 / 1.5e-15 / 4.4e-16, compiled 1.5e-15 / 1.2e-15 / 4.4e-16; cifar-cnn
eager 9.9e-15 / 3.8e-15 / 0, compiled 1.1e-14 / 6.0e-15 / 8.9e-16; cifar-resnet-bn eager 3.0e-12
(stem_bn.running_mean) / 8.7e-13 / 4.4e-16, its biases feeding a BatchNorm 4.7e-12, evaluation
loss 1.2e-13 (the largest); accuracies equal.
In float32 the same runs differed by up to 1.3e-5 relative (cifar-cnn) and 4.3e-3
(cifar-resnet-bn, whose BatchNorm gradients cancel) on an AMD EPYC: rounding that Adam
amplifies by a CPU-dependent amount. Per-replica batch statistics (Keras's default,
synchronized=False) measured 0.086 to 0.16 relative on every conv kernel: the float64
bounds catch them by eight orders of magnitude.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import require
from data_parallel_run import load_spec, mismatches

# Its module fixture is costly: every test of the module runs in the same test process (pytest-xdist).
pytestmark = pytest.mark.xdist_group("test_data_parallel_tensorflow")

TESTS = Path(__file__).resolve().parent
BN_TASK = str(TESTS.parent / "examples" / "tasks" / "cifar-resnet-bn.toml")
RUNS = [("mnist-mlp", "eager"), ("mnist-mlp", "compiled"), ("cifar-cnn", "eager"),
        ("cifar-cnn", "compiled"), (BN_TASK, "eager")]
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
    one, two = (np.load(results[n] / f"{index}.npz") for n in (1, 2))
    failures = mismatches(spec, one, two)
    assert not failures, "N=2 differs from N=1:\n" + "\n".join(failures)


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
