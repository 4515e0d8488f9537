"""Generation figures of a trained language model: greedy decoding with a KV cache at batch 1 and 32."""

from __future__ import annotations

import time

import numpy as np

from backends.base import Backend

NEW_TOKENS = 64
BATCHES = (1, 32)
QUICK_BATCHES = (1,)  # --quick: generation runs and is timed, at batch 1 only


def prompt_shape(context: int) -> tuple[int, int]:
    """(prompt length, new tokens): 64 new tokens after a prompt filling the rest of the context (or half each)."""
    new = NEW_TOKENS if context > NEW_TOKENS else context // 2
    return context - new, new


def fixed_prompts(x_test: np.ndarray, batch: int, prompt_len: int) -> np.ndarray:
    """The first `batch` held-out windows' first bytes: the same prompts on every backend."""
    rows = np.resize(np.arange(len(x_test)), batch)  # repeated where the held-out set is smaller
    return np.ascontiguousarray(x_test[rows, :prompt_len], np.int32)


def greedy_uncached(backend: Backend, model, prompts: np.ndarray, *, new_tokens: int) -> np.ndarray:
    """Greedy ids from full forward passes over the growing sequence: the reference the cache must match.

    Each pass sees the whole context, zero-padded on the right: causal attention keeps the
    padding out of every earlier position, and every pass has the shape the model was built for.
    """
    batch, prompt_len = prompts.shape
    seq = np.zeros((batch, model.spec.input_shape[0]), np.int32)
    seq[:, :prompt_len] = prompts
    for pos in range(prompt_len, prompt_len + new_tokens):
        seq[:, pos] = backend.logits(model, seq)[:, pos - 1].argmax(-1)
    return seq[:, prompt_len: prompt_len + new_tokens].copy()


def generate(backend: Backend, model, prompts: np.ndarray, *, new_tokens: int) -> tuple[np.ndarray, float, float]:
    """(new ids, time to first token s, whole generation s) of one timed run after a warm-up run of the same shape."""
    gen = backend.generator(model, batch=len(prompts), prompt_len=prompts.shape[1], new_tokens=new_tokens)
    x = gen.put(prompts)
    gen.rest(gen.first(x))  # traces and compiles
    t0 = time.perf_counter()
    state = gen.first(x)
    t1 = time.perf_counter()
    ids = gen.rest(state)
    return ids, t1 - t0, time.perf_counter() - t0


def measure_generation(backend: Backend, model, x_test: np.ndarray, *, batches: tuple[int, ...] = BATCHES) -> dict:
    """Tokens/s at each batch (new tokens over the whole generation, prompt included), time to first token."""
    prompt_len, new = prompt_shape(model.spec.input_shape[0])
    out: dict = {"generate_prompt_tokens": prompt_len, "generate_new_tokens": new}
    for batch in batches:
        ids, first_s, total_s = generate(backend, model, fixed_prompts(x_test, batch, prompt_len), new_tokens=new)
        out[f"generate_tokens_per_s_b{batch}"] = batch * new / total_s
        if batch == 1:
            out["time_to_first_token_ms"] = 1e3 * first_s
            out["generated_tokens"] = ids[0].tolist()
    return out
