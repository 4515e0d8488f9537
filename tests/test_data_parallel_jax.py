"""JAX data parallel over a jax.sharding Mesh: 2 replicas train, lose and evaluate as 1 device does."""

from __future__ import annotations

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
pytestmark = pytest.mark.xdist_group("test_data_parallel_jax")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "data_parallel_run.py"
RESNET_BN = "examples/tasks/cifar-resnet-bn.toml"

# Runs with SCAN_CONV_ON_CPU forced on, and fewer samples, go through this wrapper round
# the script: XLA:CPU runs convolutions inside lax.scan ~20x slower than as jitted steps,
# so the adapter never fuses a CNN epoch on a CPU, yet that is the path a GPU takes.
_WRAPPER = """
import sys
sys.path[:0] = [{tests!r}, {root!r}]
import backends.jax_backend as jb
import data_parallel_run
jb.SCAN_CONV_ON_CPU = True
data_parallel_run.SAMPLES = {samples}
sys.exit(data_parallel_run.main(sys.argv[1:]))
"""

# case -> (task, mode, fused conv scan with this many samples or None). All on synthetic
# data, batch 64 (32 per replica), one epoch from harness.weights.initial_weights(seed=0).
CASES = {
    "mnist-mlp-eager": ("mnist-mlp", "eager", None),  # one jitted step per batch
    "mnist-mlp-compiled": ("mnist-mlp", "compiled", None),  # the fused lax.scan epoch
    "cifar-cnn-eager": ("cifar-cnn", "eager", None),
    # The fused scan with convolutions; 2 steps keep it to seconds on a CPU.
    "cifar-cnn-compiled": ("cifar-cnn", "compiled", 128),
    # BatchNorm. Its "compiled" on a CPU is the jitted-step path eager already covers.
    "cifar-resnet-bn-eager": (RESNET_BN, "eager", None),
    # LayerNorm and dropout: the masks must not depend on how the batch is split.
    "mnist-mlp-ln-compiled": ("examples/tasks/mnist-mlp-ln.toml", "compiled", None),
}

# Every case trains in float64 and is held to data_parallel_run.mismatches (1e-9 on the weights,
# 1e-10 on the losses). Measured N=2 against N=1 (2-core Xeon, jax 0.10.2, XLA:CPU, 2 logical
# host devices), worst relative L2 per parameter / largest element / largest loss difference:
# mnist-mlp eager and compiled 1.9e-15 / 8.0e-16 / 4.4e-16; mnist-mlp-ln compiled 4.3e-14 /
# 2.2e-16 / 4.4e-16; cifar-cnn eager 1.9e-14 / 1.1e-14 / 4.4e-16, fused (2 steps) 7.7e-15 /
# 1.2e-15 / 4.4e-16; cifar-resnet-bn 1.9e-13 (stem_bn.running_mean) / 8.1e-14 / 8.9e-16, its
# biases feeding a BatchNorm 3.3e-13; evaluation losses <= 2.7e-15, accuracies equal.
# In float32 the same runs differ by up to 6.8e-5 relative (cifar-cnn fused) on an AMD EPYC and
# 1.7e-5 on ln1.scale (mnist-mlp-ln) on an AVX-512 Xeon: GSPMD's all-reduce of per-replica
# partial sums reorders float32 sums, and Adam amplifies that by a CPU-dependent amount. The
# per-replica BatchNorm statistics the tests must refuse measured 0.10-0.22 relative.


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("XLA_FLAGS", None)  # the adapter sets the host device count itself
    return env


def _start(task: str, replicas: int, out: Path, *, mode: str, fused_samples: int | None) -> subprocess.Popen:
    args = ["jax", task, str(replicas), str(out), "--mode", mode]
    if fused_samples is None:
        cmd = [sys.executable, str(SCRIPT), *args]
    else:
        code = _WRAPPER.format(tests=str(ROOT / "tests"), root=str(ROOT), samples=fused_samples)
        cmd = [sys.executable, "-c", code, *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _result(proc: subprocess.Popen, out: Path) -> dict:
    try:
        _, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert proc.returncode == 0, f"{' '.join(map(str, proc.args[-6:]))} failed:\n{stderr[-3000:]}"
    with np.load(out) as npz:
        return {k: npz[k] for k in npz.files}


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_path_factory):
    """(spec, N=1 result, N=2 result) of one case, each from its own fresh process."""
    require("jax")
    task, mode, fused_samples = CASES[request.param]
    tmp = tmp_path_factory.mktemp(request.param)
    # Both at once: most of each run is single-threaded start-up and compilation.
    procs = {n: _start(task, n, tmp / f"n{n}.npz", mode=mode, fused_samples=fused_samples) for n in (1, 2)}
    one, two = (_result(procs[n], tmp / f"n{n}.npz") for n in (1, 2))
    return load_spec(task).with_overrides(batch_size=64), one, two


def test_two_replicas_compute_what_one_device_computes(pair):
    """Weights (running statistics included), per-step global-batch losses, evaluation: float64 rounding apart."""
    spec, one, two = pair
    failures = mismatches(spec, one, two)
    assert not failures, "N=2 differs from N=1:\n" + "\n".join(failures)


# Runs in a fresh process (N host devices exist only if set before jax starts): reports
# what the adapter built with 2 replicas, and the partitioned programs' batch shapes.
_PROBE = """
import json, re, sys
import numpy as np
from backends import get_backend
from backends.base import Replicas
from harness.weights import initial_weights
from tasks import get_task

spec = get_task("mnist-mlp").with_overrides(batch_size=64)
backend = get_backend("jax")
backend.configure(device="cpu", threads=1, precision="fp32", replicas=Replicas(2))
rng = np.random.default_rng(0)
data = backend.put_data(rng.random((128, *spec.input_shape), dtype=np.float32), rng.integers(0, 10, 128))
out = {"environment": backend.environment(), "memory": backend.memory(), "programs": {}}
for mode in ("eager", "compiled"):
    model = backend.build(spec, initial_weights(spec, 0), trainable=None, mode=mode)
    index = backend._index(np.arange(128, dtype=np.int32), 64)
    state = backend._state(model)
    if model.fused:
        text = model.epoch.lower(*state, data.x, data.y, index).compile().as_text()
    else:
        text = model.step.lower(*state, backend._loss_buffer(index), data.x, data.y, index, 0).compile().as_text()
    out["programs"][mode] = {"fused": model.fused, "all_reduce": "all-reduce" in text,
                             "batch_rows": sorted({int(m) for m in re.findall(r"f32\\[(\\d+),784\\]", text)})}
    backend.train_epoch(model, data, np.arange(128), 64)
    out["param_sharding"] = str(next(iter(model.train_params.values())).sharding)
try:
    backend.train_epoch(model, data, np.arange(66), 33)
except ValueError as exc:
    out["odd_batch"] = str(exc)
print(json.dumps(out))
"""


def test_two_replicas_split_each_batch():
    require("jax")
    proc = subprocess.run([sys.executable, "-c", _PROBE], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["environment"]["replica_devices"] == ["cpu:0", "cpu:1"]
    assert len(out["memory"]["replica_peak_mb"]) == 2  # None on XLA:CPU, which keeps no statistics
    assert "P()" in out["param_sharding"] and "'data': 2" in out["param_sharding"]  # replicated on the mesh
    assert out["programs"]["compiled"]["fused"] and not out["programs"]["eager"]["fused"]
    for mode, program in out["programs"].items():
        # GSPMD inserted the gradient all-reduce, and each device's program holds 32 of
        # the batch's 64 rows: the 784-feature input is never whole on one device (the
        # 128 rows are fc1's transposed kernel, 784 x 128).
        assert program["all_reduce"], mode
        assert 32 in program["batch_rows"] and 64 not in program["batch_rows"], (mode, program["batch_rows"])
    assert "does not split over 2 replicas" in out["odd_batch"]


def test_too_few_devices_is_unavailable():
    """jax started with one CPU device before configure(): 2 replicas cannot be had, and the message says why."""
    require("jax")
    code = """
import jax
jax.devices()
from backends import get_backend
from backends.base import BackendUnavailable, Replicas
try:
    get_backend("jax").configure(device="cpu", threads=1, precision="fp32", replicas=Replicas(2))
except BackendUnavailable as exc:
    print(exc)
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 replicas need 2 CPU devices" in proc.stdout and "initialised" in proc.stdout, proc.stdout
