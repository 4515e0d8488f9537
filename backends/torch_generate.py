"""Greedy decoding with a KV cache for the torch adapter: static cache tensors written in place."""

from __future__ import annotations

import numpy as np

from backends.base import Generator
from backends.torch_backend import LAYERS, _Ctx, attention_out, attention_qkv


def _cached_run(layers, h, ctx: _Ctx, *, cache: dict, pos: int):
    """The spec's layers on the tokens at positions pos.., reading and writing the cache; the others as in training."""
    for layer in layers:
        if layer.kind == "positionalembedding":
            h = h + ctx.p(layer, "table")[pos: pos + h.shape[1]]
        elif layer.kind == "multiheadselfattention":
            h = _cached_attention(layer, h, ctx, cache=cache, pos=pos)
        elif layer.kind == "residual":
            h = h + _cached_run(layer.body, h, ctx, cache=cache, pos=pos)
        else:
            h = LAYERS[layer.kind].forward(layer, h, ctx)
    return h


def _cached_attention(layer, h, ctx: _Ctx, *, cache: dict, pos: int):
    import torch.nn.functional as F

    q, k, v = attention_qkv(layer, h, ctx)  # (b, heads, t, head_dim)
    keys, values = cache[layer.name]
    t = h.shape[1]
    keys[:, :, pos: pos + t] = k
    values[:, :, pos: pos + t] = v
    # Only the prompt (pos 0) has several queries: its mask is the causal one; one new token sees all keys.
    return attention_out(layer, F.scaled_dot_product_attention(
        q, keys[:, :, : pos + t], values[:, :, : pos + t], is_causal=t > 1), ctx)


def generator(backend, model, *, batch: int, prompt_len: int, new_tokens: int) -> Generator:
    torch = backend._torch()
    ctx = _Ctx(model.params, train=False, frozen=model.frozen)
    length = prompt_len + new_tokens
    cache = {}
    for layer, shape, _ in model.spec.walk():
        if layer.kind == "multiheadselfattention":
            _, heads, head_dim = layer.dims(tuple(shape))
            cache[layer.name] = [torch.zeros(batch, heads, length, head_dim, device=backend._device)
                                 for _ in range(2)]

    def step(tokens, pos):
        with torch.inference_mode(), backend._autocast():
            logits = _cached_run(model.spec.layers, tokens, ctx, cache=cache, pos=pos)
        return logits[:, -1].float().argmax(-1)

    def first(x):
        token = step(x, 0)
        backend._synchronize()
        return token

    def rest(token):
        out = [token]
        for i in range(new_tokens - 1):
            out.append(step(out[-1][:, None], prompt_len + i))
        return torch.stack(out, 1).to("cpu").numpy().astype(np.int32)

    return Generator(put=backend._device_input, first=first, rest=rest,
                     name="torch.inference_mode, static KV cache written in place")
