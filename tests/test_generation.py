"""Greedy generation with a KV cache: the same ids as decoding without one, and the same ids on every backend."""

import numpy as np
import pytest
from conftest import configured

from harness.generation import fixed_prompts, generate, greedy_uncached, measure_generation, prompt_shape
from harness.weights import initial_weights
from tasks.tiny_gpt import tiny_gpt


def small_gpt():
    """tiny-gpt's architecture at a size the CPU decodes in seconds: 2 blocks, context 40 (schedule sized
    for one step per epoch: the loop sizes it for its data; these tests take no training step)."""
    return tiny_gpt(name="tiny-gpt-test", d_model=64, layers=2, heads=4, context=40, batch_size=8,
                    epochs=1).sized_for(1)


def prompts(batch: int, prompt_len: int) -> np.ndarray:
    return np.random.default_rng(7).integers(0, 256, (batch, prompt_len)).astype(np.int32)


@pytest.mark.parametrize("mode", ["eager", "compiled"])
def test_cached_generation_gives_the_ids_of_uncached_decoding(backend_name, mode):
    backend = configured(backend_name)
    spec = small_gpt()
    model = backend.build(spec, initial_weights(spec, 0), trainable=None, mode=mode)
    x = prompts(3, 16)
    ids, first_s, total_s = generate(backend, model, x, new_tokens=24)
    assert ids.shape == (3, 24) and ids.dtype == np.int32
    assert np.array_equal(ids, greedy_uncached(backend, model, x, new_tokens=24))
    assert 0 < first_s <= total_s


@pytest.mark.slow  # about 100 s a pair on the loaded 2-core CI machine: two frameworks decode at batch 1 and 32
def test_generation_figures_and_ids_are_the_same_on_every_backend(backend_pair):
    """Fresh seeded weights: float32 logits of the three frameworks differ by ~1e-6, and no step's top two
    logits are that close here (the smallest margin on this seed is asserted below), so greedy ids agree."""
    spec = small_gpt()
    weights = initial_weights(spec, 0)
    x_test = prompts(40, 40)
    runs = {}
    for name in backend_pair:
        backend = configured(name)
        model = backend.build(spec, weights, trainable=None, mode="eager")
        runs[name] = measure_generation(backend, model, x_test)
        prompt_len, new = prompt_shape(40)
        ids32, _, _ = generate(backend, model, fixed_prompts(x_test, 32, prompt_len), new_tokens=new)
        runs[name]["ids32"] = ids32
        if name == backend_pair[0]:
            seq = np.concatenate([fixed_prompts(x_test, 32, prompt_len), ids32], 1)
            logits = backend.logits(model, seq)[:, prompt_len - 1: prompt_len + new - 1]
            top2 = np.sort(logits, -1)[..., -2:]
            assert (top2[..., 1] - top2[..., 0]).min() > 1e-4  # the margin the agreement rests on
    a, b = (runs[n] for n in backend_pair)
    assert a["generated_tokens"] == b["generated_tokens"] and len(a["generated_tokens"]) == 20
    assert np.array_equal(a["ids32"], b["ids32"])
    for run in runs.values():
        assert run["generate_tokens_per_s_b1"] > 0 and run["generate_tokens_per_s_b32"] > 0
        assert run["time_to_first_token_ms"] > 0
