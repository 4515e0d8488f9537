"""Greedy decoding with a KV cache for the JAX adapter: jitted prefill, then a lax.scan of cached steps."""

from __future__ import annotations

import numpy as np

from backends.base import Generator
from backends.jax_backend import LAYERS, _Ctx, attention_out, attention_qkv


def _cached_run(layers, h, ctx: _Ctx, *, cache: dict, pos):
    """The spec's layers on the tokens at positions pos.. (traced), updating `cache` (a dict of
    (keys, values) arrays, replaced functionally); the other layers as in training."""
    import jax

    for layer in layers:
        if layer.kind == "positionalembedding":
            table = ctx.p(layer, "table")
            h = h + jax.lax.dynamic_slice_in_dim(table, pos, h.shape[1]).astype(h.dtype)
        elif layer.kind == "multiheadselfattention":
            h = _cached_attention(layer, h, ctx, cache=cache, pos=pos)
        elif layer.kind == "residual":
            h = h + _cached_run(layer.body, h, ctx, cache=cache, pos=pos)
        else:
            h = LAYERS[layer.kind](layer, h, ctx)
    return h


def _cached_attention(layer, h, ctx: _Ctx, *, cache: dict, pos):
    import jax
    jnp = jax.numpy

    q, k, v = attention_qkv(layer, h, ctx)  # (b, t, heads, head_dim)
    keys, values = (jax.lax.dynamic_update_slice(c, new.astype(c.dtype), (0, pos, 0, 0))
                    for c, new in zip(cache[layer.name], (k, v)))
    cache[layer.name] = (keys, values)
    # Every cache slot is scored; slots after a query's own position are masked out, as in training.
    scores = jnp.einsum("bqhk,bshk->bhqs", q, keys, preferred_element_type=jnp.float32)
    scores = scores / np.sqrt(q.shape[-1]).astype(np.float32)
    seen = jnp.arange(keys.shape[1])[None, :] <= pos + jnp.arange(q.shape[1])[:, None]
    scores = jnp.where(seen, scores, jnp.finfo(scores.dtype).min)
    o = jnp.einsum("bhqs,bshk->bqhk", jax.nn.softmax(scores, axis=-1).astype(values.dtype), values)
    return attention_out(layer, o, ctx)


def generator(backend, model, *, batch: int, prompt_len: int, new_tokens: int) -> Generator:
    jax = backend._jax
    jnp = jax.numpy
    spec = model.spec
    length = prompt_len + new_tokens
    shapes = {layer.name: layer.dims(shape) for layer, shape, _ in spec.walk()
              if layer.kind == "multiheadselfattention"}

    def logits_at(params, tokens, cache, pos):
        ctx = _Ctx(params, train=False, frozen=frozenset())
        cache = dict(cache)
        out = _cached_run(spec.layers, tokens, ctx, cache=cache, pos=pos)
        return jnp.argmax(out[:, -1].astype(jnp.float32), axis=-1).astype(jnp.int32), cache

    @jax.jit
    def prefill(params, prompts):
        cache = {name: tuple(jnp.zeros((batch, length, heads, hd), jnp.float32) for _ in range(2))
                 for name, (_, heads, hd) in shapes.items()}
        return logits_at(params, prompts, cache, 0)

    @jax.jit
    def decode(params, token, cache):
        def body(carry, pos):
            token, cache = carry
            token, cache = logits_at(params, token[:, None], cache, pos)
            return (token, cache), token

        _, tokens = jax.lax.scan(body, (token, cache), prompt_len + jnp.arange(new_tokens - 1))
        return tokens.T

    params = {**model.frozen_params, **model.train_params}

    def put(x):
        return jax.block_until_ready(backend._put(x))

    def first(x):
        return jax.block_until_ready(prefill(params, x))

    def rest(state):
        token, cache = state
        return np.concatenate([np.asarray(token)[:, None], np.asarray(decode(params, token, cache))], 1).astype(
            np.int32)

    return Generator(put=put, first=first, rest=rest,
                     name="jax.jit prefill, lax.scan of steps writing the KV cache with dynamic_update_slice")
