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
from tasks.layers import EMBEDDING_STD, Param
from tasks.spec import TaskSpec, WeightsError

CHECKPOINT_FORMAT = 1


class CheckpointError(WeightsError):
    """A checkpoint that does not fit the task it is loaded into."""


def draw(param: Param, rng: np.random.Generator) -> np.ndarray:
    """One canonical array: Glorot-uniform kernels, N(0, 0.02) embeddings, zeros or ones otherwise.

    Only the random inits consume the layer's stream, in parameter order, so a Dense or
    Conv2D layer's kernel is the first draw of its stream, as it always was.
    """
    if param.init == "glorot_uniform":
        limit = math.sqrt(6.0 / sum(param.fans))
        return rng.uniform(-limit, limit, size=param.shape).astype(np.float32)
    if param.init == "normal":
        return (rng.standard_normal(param.shape) * EMBEDDING_STD).astype(np.float32)
    return np.full(param.shape, 1.0 if param.init == "ones" else 0.0, np.float32)


def _draw_layers(spec: TaskSpec, seed: int, stream: int, keep) -> list[np.ndarray | None]:
    """Fresh arrays for the parameters whose layer passes `keep`, None for the others.

    Every layer draws from np.random.default_rng([seed, stream, index]), index counting
    the layers that have parameters, so redrawing one layer (a fresh head) never shifts
    the numbers any other layer gets.
    """
    out, rngs = [], {}
    for entry in spec.params():
        if not keep(entry.layer):
            out.append(None)
            continue
        rng = rngs.setdefault(entry.layer_index, np.random.default_rng([seed, stream, entry.layer_index]))
        out.append(draw(entry.param, rng))
    return out


def initial_weights(spec: TaskSpec, seed: int, *, stream: int = 0) -> list[np.ndarray]:
    """Canonical weights, flat in spec order (`spec.params()`): e.g. [fc1.kernel, fc1.bias, head.kernel, ...]."""
    return _draw_layers(spec, seed, stream, lambda layer: True)


def reinitialise(spec: TaskSpec, weights: list[np.ndarray], names, seed: int, *, stream: int) -> list[np.ndarray]:
    """A copy of `weights` with the named layers redrawn from (seed, stream)."""
    fresh = _draw_layers(spec, seed, stream, lambda layer: layer in names)
    return [w.copy() if f is None else f for w, f in zip(weights, fresh)]


def check_weights(spec: TaskSpec, weights: list[np.ndarray], *, source: str = "weights") -> None:
    """spec.check_weights, raising CheckpointError: the one validator, with the one message."""
    try:
        spec.check_weights(weights, source=source)
    except WeightsError as exc:
        raise CheckpointError(str(exc)) from None


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
    """Weights from `path`, refused with the first mismatch when they do not fit `spec`.

    Saved layers are read back as spec layers, so a checkpoint written before a layer
    gained a field (Conv2D's stride) compares equal with that field at its default.
    """
    from tasks.taskfile import TaskFileError, layer_from_dict

    header, weights = load_checkpoint(path)
    saved_spec = header.get("spec")
    saved_layers = saved_spec.get("layers") if isinstance(saved_spec, dict) else None
    if not isinstance(saved_layers, list):
        raise CheckpointError(f"{path}: the checkpoint header has no spec with a list of layers")
    for i, (table, layer) in enumerate(zip(saved_layers, spec.layers)):
        try:
            saved = layer_from_dict(table, f"layers[{i}]")
        except TaskFileError as exc:
            raise CheckpointError(f"{path}: {exc}") from None
        if saved != layer:
            raise CheckpointError(f"{path}: layer {i} is {table} in the checkpoint but "
                                  f"{spec.to_dict()['layers'][i]} in task {spec.name!r}")
    if len(saved_layers) != len(spec.layers):
        raise CheckpointError(f"{path}: {len(saved_layers)} layers in the checkpoint, "
                              f"{len(spec.layers)} in task {spec.name!r}")
    check_weights(spec, weights, source=str(path))
    return weights
