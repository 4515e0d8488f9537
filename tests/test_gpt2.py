"""The gpt2 task: GPT-2 small's exact parameter count and layout, and GPT-2's initialisation."""

import math

import numpy as np

from harness.weights import initial_weights
from tasks import DEFAULT_TASKS, TASKS
from tasks.gpt2 import gpt2


def test_gpt2_small_has_its_124m_parameters_and_a_tied_head():
    spec = gpt2(vocab=50257)
    assert spec.param_count() == 124_439_808  # GPT2LMHeadModel's count: wte shared with lm_head
    names = [e.name for e in spec.params()]
    assert "head.kernel" not in names and "head.bias" not in names
    head = spec.layers[-1]
    assert (head.tied_to, head.use_bias) == ("tok_emb", False)
    assert {layer.activation for layer, _, _ in spec.walk() if layer.kind == "dense" and layer.name != "head"} \
        == {"gelu_tanh", "linear"}
    assert spec.optimizer.decay == "matrices"
    assert "gpt2" in TASKS and "gpt2" not in DEFAULT_TASKS  # 124M parameters: run only when named


def test_gpt2_initialisation_and_decay_groups():
    layers = 4
    spec = gpt2(vocab=300, d_model=128, layers=layers, heads=2, context=64)
    w = dict(zip((e.name for e in spec.params()), initial_weights(spec, 0)))
    residual = 0.02 / math.sqrt(2 * layers)
    for name, std in (("tok_emb.table", 0.02), ("pos_emb.table", 0.02), ("block0_fc.kernel", 0.02),
                      ("block1_attn_mhsa.query_kernel", 0.02), ("block2_proj.kernel", residual),
                      ("block3_attn_mhsa.out_kernel", residual)):
        assert abs(w[name].std() / std - 1) < 0.05 and abs(w[name].mean()) < 3 * std / math.sqrt(w[name].size), name
    assert not w["block0_fc.bias"].any() and not w["block0_attn_mhsa.query_bias"].any()
    assert np.all(w["ln_f.scale"] == 1)
    decayed = {e.name for e in spec.params() if spec.decays(e)}
    assert {"tok_emb.table", "pos_emb.table", "block0_fc.kernel", "block0_attn_mhsa.out_kernel"} <= decayed
    assert not any(n.endswith(("bias", "scale", "offset")) for n in decayed)  # (heads, head_dim) biases too
