"""Canonical initial weights drawn from the seed, and .npz checkpoints that cross backends."""

from __future__ import annotations

import io
import json
import math
import zipfile
import zlib
from pathlib import Path

import numpy as np

from harness.storage import write_atomic
from tasks.spec import TaskSpec

CHECKPOINT_FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint that does not fit the task it is loaded into."""


def draw_layer(seed: int, stream: tuple[int, ...], kernel_shape, bias_shape) -> list[np.ndarray]:
    """Glorot-uniform kernel and zero bias, from their own random stream.

    Every layer draws from np.random.default_rng([seed, *stream]) so redrawing one layer
    (a fresh head) never shifts the numbers any other layer gets.
    """
    receptive = math.prod(kernel_shape[:-2])  # 1 for Dense, kh*kw for HWIO convs
    fan_in, fan_out = kernel_shape[-2] * receptive, kernel_shape[-1] * receptive
    limit = math.sqrt(6.0 / (fan_in + fan_out))
    rng = np.random.default_rng([seed, *stream])
    kernel = rng.uniform(-limit, limit, size=kernel_shape).astype(np.float32)
    return [kernel, np.zeros(bias_shape, np.float32)]


def initial_weights(spec: TaskSpec, seed: int, *, stream: int = 0) -> list[np.ndarray]:
    """Canonical weights for every parameter layer: [kernel0, bias0, kernel1, bias1, ...]."""
    weights: list[np.ndarray] = []
    for index, (_, kernel_shape, bias_shape) in enumerate(spec.param_shapes()):
        weights += draw_layer(seed, (stream, index), kernel_shape, bias_shape)
    return weights


def reinitialise(spec: TaskSpec, weights: list[np.ndarray], names, seed: int, *, stream: int) -> list[np.ndarray]:
    """A copy of `weights` with the named layers redrawn from (seed, stream)."""
    out = [w.copy() for w in weights]
    for index, (name, kernel_shape, bias_shape) in enumerate(spec.param_shapes()):
        if name in names:
            out[2 * index: 2 * index + 2] = draw_layer(seed, (stream, index), kernel_shape, bias_shape)
    return out


def check_weights(spec: TaskSpec, weights: list[np.ndarray], *, source: str = "weights") -> None:
    """Raise CheckpointError naming the first array whose shape does not fit the spec."""
    expected = [s for _, k, b in spec.param_shapes() for s in (k, b)]
    names = [f"{n}.{part}" for n, _, _ in spec.param_shapes() for part in ("kernel", "bias")]
    if len(weights) != len(expected):
        raise CheckpointError(f"{source}: {len(weights)} arrays, task {spec.name!r} needs {len(expected)}")
    for name, array, shape in zip(names, weights, expected):
        if tuple(array.shape) != tuple(shape):
            raise CheckpointError(f"{source}: {name} has shape {tuple(array.shape)}, "
                                  f"task {spec.name!r} needs {tuple(shape)}")


def save_checkpoint(path: Path, spec: TaskSpec, weights: list[np.ndarray], *, meta: dict | None = None) -> None:
    """Write canonical arrays plus the spec as JSON; atomic (temp file, then rename)."""
    check_weights(spec, weights)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {"format": CHECKPOINT_FORMAT, "spec": spec.to_dict(), "meta": meta or {}}
    arrays = {f"w{i:03d}": np.asarray(w, np.float32) for i, w in enumerate(weights)}
    buffer = io.BytesIO()
    np.savez(buffer, header=np.array(json.dumps(header, sort_keys=True)), **arrays)
    write_atomic(path, buffer.getvalue())  # checked, and no .tmp left on a full disk


def load_checkpoint(path: Path) -> tuple[dict, list[np.ndarray]]:
    """(header, weights) from a checkpoint written by save_checkpoint; anything else is a CheckpointError.

    Read with allow_pickle=False: a checkpoint holds numbers and a JSON header, never
    objects. Truncated or bad-CRC archives, a header that is not a JSON object, and
    arrays that are not finite real numbers are all refused.
    """
    try:
        with np.load(Path(path), allow_pickle=False) as npz:
            header = json.loads(str(npz["header"]))
            keys = sorted(k for k in npz.files if k.startswith("w"))
            raw = [npz[k] for k in keys]
    except (OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile, zlib.error) as exc:
        raise CheckpointError(f"{path}: not a tribench checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a tribench checkpoint (its header is a JSON {type(header).__name__}, "
                              "not an object)")
    if header.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {header.get('format')!r}, expected {CHECKPOINT_FORMAT}")
    weights = []
    for key, array in zip(keys, raw):
        if array.dtype.kind not in "fiu":
            raise CheckpointError(f"{path}: array {key} is {array.dtype}, a checkpoint holds real numbers")
        array = array.astype(np.float32, copy=False)
        if not np.isfinite(array).all():
            raise CheckpointError(f"{path}: array {key} holds NaN or infinite values")
        weights.append(array)
    return header, weights


def load_checkpoint_for(path: Path, spec: TaskSpec) -> list[np.ndarray]:
    """Weights from `path`, refused with the first mismatch when they do not fit `spec`."""
    header, weights = load_checkpoint(path)
    saved = header.get("spec")
    saved_layers = saved.get("layers") if isinstance(saved, dict) else None
    if not isinstance(saved_layers, list):
        raise CheckpointError(f"{path}: the checkpoint header has no spec with a list of layers")
    layers = spec.to_dict()["layers"]
    for i, (a, b) in enumerate(zip(saved_layers, layers)):
        if a != b:
            raise CheckpointError(f"{path}: layer {i} is {a} in the checkpoint but {b} in task {spec.name!r}")
    if len(saved_layers) != len(layers):
        raise CheckpointError(f"{path}: {len(saved_layers)} layers in the checkpoint, "
                              f"{len(layers)} in task {spec.name!r}")
    check_weights(spec, weights, source=str(path))
    return weights
