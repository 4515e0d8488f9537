"""Canonical initial weights drawn from the seed (checkpoints: harness/checkpoint.py)."""

from __future__ import annotations

import math

import numpy as np

from tasks.layers import Param
from tasks.spec import TaskSpec


def draw(param: Param, rng: np.random.Generator) -> np.ndarray:
    """One canonical array: Glorot-uniform kernels, N(0, param.std) (embeddings: 0.02), zeros or ones otherwise.

    Only the random inits consume the layer's stream, in parameter order, so a Dense or
    Conv2D layer's kernel is the first draw of its stream, as it always was.
    """
    if param.init == "glorot_uniform":
        limit = math.sqrt(6.0 / sum(param.fans))
        return rng.uniform(-limit, limit, size=param.shape).astype(np.float32)
    if param.init == "normal":
        return (rng.standard_normal(param.shape) * param.std).astype(np.float32)
    return np.full(param.shape, {"ones": 1.0, "zeros": 0.0}[param.init], np.float32)


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
