"""GPU checks, collected only with TRIBENCH_GPU_TESTS=1: precision, timing honesty, device memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from numpy_reference import forward

from backends import BACKENDS, get_backend
from harness.data import synthetic
from harness.loop import epoch_order, timed
from harness.weights import initial_weights
from tasks import get_task

pytestmark = pytest.mark.gpu
REPO = Path(__file__).resolve().parents[2]
# TensorFlow is not installed on the GPU machine this was written on; it runs here where it is.
GPU_BACKENDS = [name for name, info in BACKENDS.items() if info.available()]
TASK_DATA = {"mnist-mlp": "mnist", "cifar-cnn": "cifar10"}
PRECISIONS = ("fp32", "tf32", "bf16")

# Largest |logit - float64 reference| per precision, and why (logits are ~1 in size):
# - fp32 1e-5 (MLP) / 1e-4 (CNN): the CPU parity tolerances; TF32 left on by mistake gives
#   ~1e-3, so this is the check that fp32 really is fp32.
# - tf32 3e-2: inputs rounded to a 10-bit mantissa (2^-11 ~ 5e-4 relative), over 784- and
#   576-term sums; the test also requires the error to be >= 10x the fp32 error, i.e. that
#   TF32 is really engaged when asked for.
# - bf16 1.5e-1: 8-bit mantissa (2^-8 ~ 4e-3 relative) on activations and weights.
REFERENCE_TOL = {"fp32": {"mnist-mlp": 1e-5, "cifar-cnn": 1e-4}, "tf32": 3e-2, "bf16": 1.5e-1}


def gpu_adapter(name: str, precision: str):
    backend = get_backend(name)
    backend.configure(device="gpu", threads=2, precision=precision)
    assert backend.environment()["device"] == "gpu"
    return backend


def gpu_logits(name: str, task: str, precision: str, x: np.ndarray) -> np.ndarray:
    spec = get_task(task)
    backend = gpu_adapter(name, precision)
    model = backend.build(spec, initial_weights(spec, 0), trainable=None, mode="eager")
    return backend.logits(model, x)


def tolerance(precision: str, task: str) -> float:
    tol = REFERENCE_TOL[precision]
    return tol[task] if isinstance(tol, dict) else tol


@pytest.mark.parametrize("task", list(TASK_DATA))
@pytest.mark.parametrize("name", GPU_BACKENDS)
def test_each_precision_does_what_it_says(name, task):
    spec = get_task(task)
    x = synthetic(TASK_DATA[task], n_train=64, n_test=1, seed=1).x_train
    want = forward(spec, initial_weights(spec, 0), x)
    errors = {p: float(np.abs(gpu_logits(name, task, p, x) - want).max()) for p in PRECISIONS}
    print(f"{name} {task} max |logit error| vs float64: {errors}")
    for precision, error in errors.items():
        assert error <= tolerance(precision, task), f"{precision}: {error:.3g}"
    assert errors["tf32"] >= 10 * errors["fp32"], f"tf32 is not engaged: {errors}"
    assert errors["bf16"] >= errors["tf32"], errors


# Torch against JAX, same weights, same inputs, on the GPU; the tolerances are the ones
# against the float64 reference above (each side is within it, so the pair is within 2x).
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("task", list(TASK_DATA))
def test_torch_and_jax_logits_agree_on_the_gpu(task, precision):
    if not {"torch", "jax"} <= set(GPU_BACKENDS):
        pytest.fail("this check needs torch and jax installed with CUDA")
    x = synthetic(TASK_DATA[task], n_train=64, n_test=1, seed=1).x_train
    a, b = (gpu_logits(name, task, precision, x) for name in ("torch", "jax"))
    gap = float(np.abs(a - b).max())
    print(f"{task} {precision}: max |torch - jax| = {gap:.3g}")
    assert np.abs(a).max() > 0.05
    assert gap <= 2 * tolerance(precision, task)


def trained_cell(name: str, task: str, mode: str, n: int = 8192):
    spec = get_task(task)
    backend = gpu_adapter(name, "fp32")
    d = synthetic(TASK_DATA[task], n_train=n, n_test=256, seed=0)
    model = backend.build(spec, initial_weights(spec, 0), trainable=None, mode=mode)
    train, test = backend.put_data(d.x_train, d.y_train), backend.put_data(d.x_test, d.y_test)
    order = epoch_order(0, 0, 0, n, spec.batch_size)
    backend.warmup(model, train, order, spec.batch_size, test, spec.eval_batch_size)
    return backend, model, train, order, spec.batch_size


@pytest.mark.parametrize("mode", ["eager", "compiled"])
@pytest.mark.parametrize("task", list(TASK_DATA))
def test_epoch_clock_matches_cuda_events(task, mode):
    """The harness's clock (synchronise, perf_counter, epoch, synchronise) against CUDA events."""
    if "torch" not in GPU_BACKENDS:
        pytest.fail("needs torch with CUDA")
    import torch

    backend, model, train, order, bs = trained_cell("torch", task, mode)
    ratios = []
    for _ in range(3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        _, seconds = timed(backend, backend.train_epoch, model, train, order, bs)
        end.record()
        end.synchronize()
        ratios.append(seconds / (start.elapsed_time(end) / 1e3))
    print(f"torch {task} {mode}: harness / CUDA-event epoch time {ratios}")
    # The events bracket the harness's clock, so its time can only be shorter, and it
    # must cover nearly all of the device's time (an unsynchronised clock reads << 1).
    assert all(0.9 <= r <= 1.02 for r in ratios), ratios


@pytest.mark.parametrize("mode", ["eager", "compiled"])
@pytest.mark.parametrize("task", list(TASK_DATA))
def test_jax_epoch_clock_waits_for_the_device(task, mode):
    """JAX has no CUDA events: around the harness's clock, a second one that also blocks on every parameter."""
    if "jax" not in GPU_BACKENDS:
        pytest.fail("needs jax with CUDA")
    import jax

    backend, model, train, order, bs = trained_cell("jax", task, mode)
    ratios = []
    for _ in range(3):
        t0 = time.perf_counter()
        _, harness_s = timed(backend, backend.train_epoch, model, train, order, bs)
        jax.block_until_ready((model.train_params, model.opt_state))
        ratios.append(harness_s / (time.perf_counter() - t0))
    print(f"jax {task} {mode}: harness / fully-blocked time of the same epoch {ratios}")
    # Blocking on everything after the harness's clock stopped must add (almost) nothing:
    # had the clock stopped before the device finished, the outer clock would be longer.
    assert all(0.95 <= r <= 1.0 for r in ratios), ratios


def nvidia_smi_used_mb() -> dict[int, float]:
    out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, check=True).stdout
    return {int(pid): float(mb) for pid, mb in (line.split(",") for line in out.strip().splitlines() if line)}


@pytest.mark.parametrize("name", GPU_BACKENDS)
def test_device_peak_is_within_what_nvidia_smi_sees(name, tmp_path):
    """A real cell in its own worker: the allocator's peak <= the process's memory as nvidia-smi reports it."""
    seen: dict[int, float] = {}
    done = threading.Event()

    def sample():
        while not done.is_set():
            for pid, mb in nvidia_smi_used_mb().items():
                seen[pid] = max(seen.get(pid, 0.0), mb)
            done.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out = tmp_path / "run"
    try:
        subprocess.run([sys.executable, "-m", "harness", "run", "--task", "cifar-cnn", "--backend", name,
                        "--device", "gpu", "--data", "synthetic", "--quick", "--out", str(out)],
                       cwd=REPO, check=True, capture_output=True, text=True)
    finally:
        done.set()
        sampler.join()
    record = json.loads((out / "records.jsonl").read_text().splitlines()[0])
    assert record["status"] == "ok", record.get("error")
    peak = record["memory"]["device_peak_mb"]
    data_mb = 5000 * 32 * 32 * 3 * 4 / 2**20  # the --quick train + test images the worker put on the device
    # This test process holds GPU memory of its own from earlier tests: the worker is every other one.
    worker_mb = max((mb for pid, mb in seen.items() if pid != os.getpid()), default=0.0)
    print(f"{name}: device_peak_mb {peak:.1f}, nvidia-smi peak for the worker {worker_mb:.1f}, data {data_mb:.1f}")
    assert data_mb <= peak <= worker_mb
