"""One epoch of a task on one backend with N data-parallel replicas, in a fresh process; writes weights and losses.

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


def main(argv=None) -> int:
    from backends import get_backend
    from backends.base import Replicas
    from harness.data import synthetic
    from harness.loop import epoch_order
    from harness.weights import initial_weights
    from tasks import get_task
    from tasks.taskfile import load_task_file

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

    spec = load_task_file(Path(args.task)) if args.task.endswith(".toml") else get_task(args.task)
    spec = spec.with_overrides(batch_size=args.batch_size)
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
