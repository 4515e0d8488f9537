"""One epoch of a task on one backend with N data-parallel replicas, in a fresh process; and how the tests judge it.

Replicas need their devices before the framework starts (logical CPU devices, XLA's
host device count, a process group), so each configuration gets its own process:

    python tests/data_parallel_run.py BACKEND TASK REPLICAS OUT.npz [--rank R --address HOST:PORT]

TASK is a built-in task name or a task file. The data is synthetic and small: SAMPLES
training samples, so one epoch is a few steps, the same batches in the same order for
every N.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SAMPLES = 512
EVAL_SAMPLES = 200


def load_spec(task: str):
    """A built-in task by name, or a task file (.toml) relative to the repository."""
    from tasks import get_task
    from tasks.taskfile import load_task_file

    root = Path(__file__).resolve().parents[1]
    return load_task_file(root / task) if task.endswith(".toml") else get_task(task)


# The tests train in float64 (--precision fp64): N replicas and one device compute the same
# math, so they agree to float64 rounding on any CPU, and a data-parallel defect (a gradient
# summed not averaged, per-replica BatchNorm statistics, a step on the wrong slice) moves the
# weights by 1e-2 to 1. In float32 the same runs differ by up to 1.2e-2 relative on an AVX-512
# Xeon (cifar-cnn, torch): rounding that Adam amplifies ~1e5-fold over 8 steps, by an amount
# that depends on the CPU's kernels. The measured float64 gaps: each test_data_parallel_<backend>.py.
REL_TOL = 1e-9  # per parameter, ||w2 - w1|| / ||w1 - w0||: float64 rounding (1e-16) x float32's 1e5 is 1e-11
ABS_TOL = 1e-9  # largest element
LOSS_TOL = 1e-10  # per-step and evaluation losses, absolute (values ~2; worst measured 1.2e-13)


def biases_feeding_batchnorm(layers) -> set[str]:
    """Canonical names of biases of layers followed straight by a BatchNorm, composite bodies included.

    The BatchNorm's mean subtraction cancels such a bias, so its true gradient is zero and it
    moves only by rounding noise that Adam divides by (sqrt(v_hat) + eps): in float32 into
    lr-sized steps of random sign, in float64 by ~1e-13 (the noise, ~1e-17, far below eps).
    Its relative error is ~1 between any two summation orders, so only its absolute
    difference is held (to ABS_TOL).
    """
    names = set()
    for layer, following in zip(layers, layers[1:]):
        if layer.kind in ("conv2d", "dense") and following.kind == "batchnorm":
            names.add(f"{layer.name}.bias")
    for layer in layers:
        names |= biases_feeding_batchnorm(layer.children())
    return names


def mismatches(spec, one, two, *, eval_samples: int = EVAL_SAMPLES) -> list[str]:
    """What differs beyond float64 rounding between the N=1 and N=2 results (npz results of main()).

    Per parameter: the relative L2 error ||w2 - w1|| / ||w1 - w0|| (w0 the initial weights)
    and the largest absolute difference; a bias feeding a BatchNorm only the latter. Then the
    per-step losses, the evaluation loss and the evaluation accuracy (equal: a near-tie
    within float64 rounding is not expected in 200 predictions).
    """
    from harness.weights import initial_weights

    noise_only = biases_feeding_batchnorm(spec.layers)
    steps = len(one["losses"])
    failures = []
    for i, (entry, initial) in enumerate(zip(spec.params(), initial_weights(spec, seed=0))):
        w1, w2 = one[f"w{i:03d}"], two[f"w{i:03d}"]
        if w1.dtype != np.float64 or w2.dtype != np.float64:
            failures.append(f"{entry.name}: {w1.dtype} and {w2.dtype}, not float64")
            continue
        diff = float(np.abs(w2 - w1).max())
        if entry.name in noise_only:
            if diff > ABS_TOL:
                failures.append(f"{entry.name}: abs {diff:.2e} (tol {ABS_TOL:.0e}; a bias feeding a BatchNorm)")
            continue
        moved = float(np.linalg.norm(w1 - initial))
        if moved == 0:
            failures.append(f"{entry.name} did not train: the comparison would be empty")
            continue
        rel = float(np.linalg.norm(w2 - w1)) / moved
        if rel > REL_TOL or diff > ABS_TOL:
            failures.append(f"{entry.name}: rel {rel:.2e} (tol {REL_TOL:.0e}), abs {diff:.2e} (tol {ABS_TOL:.0e})")
    if one["losses"].shape != two["losses"].shape or steps < 2:
        failures.append(f"losses: shapes {one['losses'].shape} and {two['losses'].shape}")
    elif float(np.abs(two["losses"] - one["losses"]).max()) > LOSS_TOL:
        failures.append(f"losses: {two['losses'].tolist()} vs {one['losses'].tolist()}")
    if abs(two["eval"][0] - one["eval"][0]) > LOSS_TOL:
        failures.append(f"evaluation loss: {two['eval'][0]!r} vs {one['eval'][0]!r}")
    if two["eval"][1] != one["eval"][1]:
        failures.append(f"evaluation accuracy: {two['eval'][1]} vs {one['eval'][1]} of {eval_samples}")
    return failures


def main(argv=None) -> int:
    from backends import get_backend
    from backends.base import Replicas
    from harness.data import synthetic
    from harness.loop import epoch_order
    from harness.weights import initial_weights

    parser = argparse.ArgumentParser()
    parser.add_argument("backend")
    parser.add_argument("task")
    parser.add_argument("replicas", type=int)
    parser.add_argument("out", type=Path)
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--address")
    parser.add_argument("--mode", default="eager")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--precision", default="fp64")
    args = parser.parse_args(argv)

    spec = load_spec(args.task).with_overrides(batch_size=args.batch_size)
    backend = get_backend(args.backend)
    backend.configure(device="cpu", threads=1, precision=args.precision,
                      replicas=Replicas(args.replicas, args.rank, args.address))
    data = synthetic("cifar10" if spec.input_shape == (32, 32, 3) else "mnist",
                     n_train=SAMPLES, n_test=EVAL_SAMPLES, seed=0)
    train = backend.put_data(data.x_train, data.y_train)
    test = backend.put_data(data.x_test, data.y_test)
    model = backend.build(spec, initial_weights(spec, seed=0), trainable=None, mode=args.mode)
    losses = backend.train_epoch(model, train, epoch_order(0, 0, 0, SAMPLES, spec.batch_size), spec.batch_size)
    loss, accuracy = backend.evaluate(model, test, spec.eval_batch_size)
    if args.rank == 0:
        weights = backend.get_weights(model)
        np.savez(args.out, losses=losses, eval=np.array([loss, accuracy]),
                 **{f"w{i:03d}": w for i, w in enumerate(weights)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
