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


def biases_feeding_batchnorm(layers) -> set[str]:
    """Canonical names of biases of layers followed straight by a BatchNorm, composite bodies included.

    The BatchNorm's mean subtraction cancels such a bias, so its true gradient is zero and
    Adam turns float32 noise into lr-sized steps: any two summation orders move it apart
    (relative error ~1 even between one device's eager and compiled runs). The tests bound
    only its absolute difference.
    """
    names = set()
    for layer, following in zip(layers, layers[1:]):
        if layer.kind in ("conv2d", "dense") and following.kind == "batchnorm":
            names.add(f"{layer.name}.bias")
    for layer in layers:
        names |= biases_feeding_batchnorm(layer.children())
    return names


def weight_mismatches(spec, one, two, *, rel_tol: float, abs_tol: float, noise_abs: float) -> list[str]:
    """What differs beyond tolerance between the N=1 and N=2 weights (npz results of main()).

    Per parameter: the relative L2 error ||w2 - w1|| / ||w1 - w0|| (w0 the initial weights)
    and the largest absolute difference; a bias feeding a BatchNorm only by `noise_abs`.
    """
    from harness.weights import initial_weights

    noise_only = biases_feeding_batchnorm(spec.layers)
    failures = []
    for i, (entry, initial) in enumerate(zip(spec.params(), initial_weights(spec, seed=0))):
        w1, w2 = one[f"w{i:03d}"], two[f"w{i:03d}"]
        diff = float(np.abs(w2 - w1).max())
        if entry.name in noise_only:
            if diff > noise_abs:
                failures.append(f"{entry.name}: abs {diff:.2e} > {noise_abs:.2e} (a bias feeding a BatchNorm)")
            continue
        moved = float(np.linalg.norm(w1 - initial))
        if moved == 0:
            failures.append(f"{entry.name} did not train: the comparison would be empty")
            continue
        rel = float(np.linalg.norm(w2 - w1)) / moved
        if rel > rel_tol or diff > abs_tol:
            failures.append(f"{entry.name}: rel {rel:.2e} (tol {rel_tol:.0e}), abs {diff:.2e} (tol {abs_tol:.0e})")
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
    args = parser.parse_args(argv)

    spec = load_spec(args.task).with_overrides(batch_size=args.batch_size)
    backend = get_backend(args.backend)
    backend.configure(device="cpu", threads=1, precision="fp32",
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
