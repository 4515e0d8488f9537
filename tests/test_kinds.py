"""Every layer kind, optimizer, schedule and clipping on every backend against the float64 numpy reference.

Each case puts a parameter layer ("pre") before the kind under test, so the kind's input
gradient is checked through pre's parameter gradients (the public API exposes no input
gradients); the reference's own input gradient is checked by finite differences.

The backends run in float64 (precision fp64), so they and the reference compute the same
math to rounding on any CPU; in float32 the errors depend on the CPU's kernels (on an AMD
EPYC: logits 3.2e-7, gradients 3.0e-6, ten AdamW steps 2.0e-5 relative L2). Tolerances:
- Reference gradients against central finite differences (h = 1e-6, float64): 1e-6
  relative to each array's largest gradient. FD truncation is ~h^2 and round-off ~1e-16/h,
  both far below; a wrong backward formula is off by O(1). Measured worst: 5.6e-8.
- Backends against the reference, all 1e-12: forward logits relative to the largest logit;
  gradients (one SGD step with lr = 1, so g = w - w_new) relative to each array's largest
  |g| (attention's key bias, zero in exact arithmetic, relative to the largest gradient of
  all); running statistics after one step, absolute; losses, relative; ten steps of AdamW +
  warmup-cosine + clipping (and each optimizer on an MLP), relative L2 error per array
  ||w_backend - w_ref|| / ||w_ref - w_0||. Measured on a 2-core Xeon (torch 2.13, TF 2.21,
  jax 0.10.2), the first checks to fail at 1e-15: 1.0e-15 to 6.6e-15 (logits) and up to
  7.5e-15 (ten steps). A transposed kernel, a wrong padding or a float32 constant on the way
  (tf.nn.gelu's and Keras attention's, caught here: ~5e-9) is far above.
Dropout is 0 wherever parity is exact: masks come from each framework's own generator,
so with dropout on backends agree only in distribution (checked: evaluation is the
identity, and training with dropout on differs from training without).
"""

import dataclasses

import numpy as np
import numpy_reference as ref
import pytest
from conftest import configured, seed_framework

from harness.weights import initial_weights
from tasks.spec import (
    SGD,
    Activation,
    Adam,
    AdamW,
    AvgPool2D,
    BatchNorm,
    Conv2D,
    Dense,
    Dropout,
    Embedding,
    Flatten,
    GlobalAvgPool2D,
    LayerNorm,
    MaxPool2D,
    MultiHeadSelfAttention,
    PositionalEmbedding,
    Reshape,
    Residual,
    TaskSpec,
    WarmupCosine,
)

CLASSES, BATCH, VOCAB = 3, 8, 11
PRECISION = "fp64"  # the backends against the float64 reference: the same math, so rounding apart on any CPU
FD_TOL, FWD_TOL, GRAD_TOL, STATE_TOL, L2_TOL, LOSS_RTOL = 1e-6, 1e-12, 1e-12, 1e-12, 1e-12, 1e-12


def _pre_conv():
    # A parameter layer before the kind under test: its gradients carry the kind's input gradient.
    # tanh: a bias straight into a BatchNorm would have zero gradient, leaving only noise to compare.
    return Conv2D(filters=4, kernel_size=1, activation="tanh", name="pre")


def _pre_dense():
    return Dense(units=6, activation="tanh", name="pre")


def _pre_embedding():
    return Embedding(vocab_size=VOCAB, dim=6, name="pre")


CASES = {
    **{f"dense-{a}": ((5,), (_pre_dense(), Dense(units=7, activation=a, name="k")))
       for a in ("linear", "relu", "gelu", "gelu_tanh", "tanh", "silu")},
    "dense-no-bias": ((5,), (_pre_dense(), Dense(units=7, use_bias=False, name="k"))),
    # A head tied to the embedding before it: the table's gradient sums both of its uses.
    "dense-tied": ((4,), (_pre_embedding(), Dense(units=VOCAB, tied_to="pre", name="k"))),
    "dense-tied-no-bias-gelu_tanh": ((4,), (_pre_embedding(), Dense(units=VOCAB, tied_to="pre", use_bias=False,
                                                                     activation="gelu_tanh", name="k"))),
    "activation-gelu": ((5,), (_pre_dense(), Activation(activation="gelu", name="k"))),
    "conv2d-valid-relu": ((6, 6, 3), (_pre_conv(), Conv2D(filters=5, kernel_size=3, activation="relu", name="k"),
                                      Flatten(name="f"))),
    "conv2d-same-stride2": ((7, 7, 3), (_pre_conv(), Conv2D(filters=5, kernel_size=3, padding="same", stride=2,
                                                            name="k"), Flatten(name="f"))),
    "conv2d-same-even-kernel": ((6, 6, 3), (_pre_conv(), Conv2D(filters=5, kernel_size=4, padding="same", name="k"),
                                            Flatten(name="f"))),
    "maxpool2d": ((6, 6, 3), (_pre_conv(), MaxPool2D(pool_size=2, name="k"), Flatten(name="f"))),
    "avgpool2d-floor": ((7, 7, 3), (_pre_conv(), AvgPool2D(pool_size=2, name="k"), Flatten(name="f"))),
    "globalavgpool2d": ((6, 6, 3), (_pre_conv(), GlobalAvgPool2D(name="k"))),
    "flatten": ((4, 3, 2), (_pre_conv(), Flatten(name="k"))),
    "reshape-sequence-to-image": ((4,), (_pre_embedding(), Reshape(target_shape=(2, 2, 6), name="k"),
                                         Conv2D(filters=3, kernel_size=2, name="c"), Flatten(name="f"))),
    "reshape-image-to-sequence": ((4, 4, 3), (_pre_conv(), Reshape(target_shape=(8, 8), name="k"),
                                              MultiHeadSelfAttention(heads=2, name="a"), Flatten(name="f"))),
    "batchnorm-image": ((5, 5, 3), (_pre_conv(), BatchNorm(momentum=0.2, eps=1e-3, name="k"), Flatten(name="f"))),
    "batchnorm-features": ((5,), (_pre_dense(), BatchNorm(name="k"))),
    "layernorm": ((5,), (_pre_dense(), LayerNorm(eps=1e-3, name="k"))),
    "layernorm-image": ((4, 4, 3), (_pre_conv(), LayerNorm(name="k"), Flatten(name="f"))),
    "dropout-0": ((5,), (_pre_dense(), Dropout(rate=0.0, name="k"))),
    "embedding": ((4,), (Embedding(vocab_size=VOCAB, dim=6, name="k"),)),
    "positionalembedding": ((4,), (_pre_embedding(), PositionalEmbedding(max_len=5, name="k"))),
    "attention": ((4,), (_pre_embedding(), MultiHeadSelfAttention(heads=2, name="k"))),
    "attention-causal-head_dim": ((4,), (_pre_embedding(), MultiHeadSelfAttention(heads=2, head_dim=4, causal=True,
                                                                                   name="k"))),
    "attention-lora": ((4,), (_pre_embedding(), MultiHeadSelfAttention(heads=2, causal=True, lora_rank=2,
                                                                        lora_alpha=4.0, name="k"))),
    "attention-lora-qv-rank3": ((4,), (_pre_embedding(), MultiHeadSelfAttention(
        heads=2, lora_rank=3, lora_targets=("query", "value"), name="k"))),
    "residual-nested": ((5,), (Dense(units=6, name="pre"), Residual(name="k", body=(
        Dense(units=6, activation="relu", name="r1"), Residual(name="k2", body=(LayerNorm(name="r2"),)),
        Dense(units=6, name="r3"))))),
}


def make_spec(input_shape, layers, optimizer=None, name="case"):
    return TaskSpec(name=name, dataset="synthetic", input_shape=input_shape,
                    layers=(*layers, Dense(units=CLASSES, name="head")), optimizer=optimizer or SGD(lr=1.0),
                    batch_size=BATCH, epochs=1, target_accuracy=0.5, num_classes=CLASSES)


def random_weights(spec, seed=0):
    """The seed's weights with every zero/one init made non-trivial, so biases, offsets and statistics count."""
    rng = np.random.default_rng([seed, 99])
    out = []
    for e, w in zip(spec.params(), initial_weights(spec, seed)):
        if e.param.name == "running_var":
            w = rng.uniform(0.5, 1.5, w.shape)
        elif e.param.init == "normal":  # embeddings of order 1, so attention scores are far from uniform
            w = rng.standard_normal(w.shape)
        elif e.param.init in ("zeros", "ones"):
            w = w + 0.2 * rng.standard_normal(w.shape)
        out.append(np.asarray(w, np.float32))
    return out


def batch(spec, seed=0, n=BATCH):
    rng = np.random.default_rng([seed, 7])
    label_shape = spec.layer_shapes()[-1][:-1]
    y = rng.integers(0, CLASSES, (n, *label_shape)).astype(np.int32)
    if spec.takes_tokens:
        return rng.integers(0, VOCAB, (n, *spec.input_shape)).astype(np.int32), y
    return rng.standard_normal((n, *spec.input_shape)).astype(np.float32), y


def scaled_err(got, want):
    return float(np.abs(np.asarray(got, np.float64) - want).max() / max(np.abs(want).max(), 1e-12))


# -- the reference itself ------------------------------------------------------------------------------


def finite_difference(loss, array, index, h=1e-6):
    saved = array[index]
    array[index] = saved + h
    up = loss()
    array[index] = saved - h
    down = loss()
    array[index] = saved
    return (up - down) / (2 * h)


@pytest.mark.parametrize("case", CASES)
def test_reference_gradients_match_finite_differences(case):
    spec = make_spec(*CASES[case])
    w = [a.astype(np.float64) for a in random_weights(spec)]
    x, y = batch(spec)
    x = x if spec.takes_tokens else x.astype(np.float64)
    _, grads, dx, _ = ref.loss_and_grads(spec, w, x, y)

    def loss():
        return ref.loss_and_grads(spec, w, x, y)[0]

    rng = np.random.default_rng(0)
    checks = [(e.name, a, g) for e, a, g in zip(spec.params(), w, grads) if e.param.trainable]
    if not spec.takes_tokens:
        checks.append(("input", x, dx))
    for name, array, grad in checks:
        flat = rng.choice(array.size, size=min(array.size, 12), replace=False)
        for i in zip(*np.unravel_index(flat, array.shape)):
            fd = finite_difference(loss, array, i)
            assert abs(fd - grad[i]) <= FD_TOL * max(np.abs(grad).max(), 1e-3), f"{name}{i}: {fd} vs {grad[i]}"


# -- every backend against the reference ----------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_kind_forward_and_gradients_match_the_reference(backend_name, case):
    backend = configured(backend_name, PRECISION)
    spec = make_spec(*CASES[case])
    w = random_weights(spec)
    x, y = batch(spec)
    model = backend.build(spec, w, trainable=None, mode="eager")
    logits = backend.logits(model, x)
    want = ref.forward(spec, w, x)
    assert logits.shape == want.shape
    assert scaled_err(logits, want) <= FWD_TOL, f"logits off by {scaled_err(logits, want):.2e} (relative)"

    # One SGD step with lr = 1: the weights move by exactly the gradient.
    losses = backend.train_epoch(model, backend.put_data(x, y), np.arange(BATCH, dtype=np.int32), BATCH)
    loss, grads, _, stated = ref.loss_and_grads(spec, w, x, y)
    assert losses[0] == pytest.approx(loss, rel=LOSS_RTOL, abs=0)
    largest = max(np.abs(g).max() for g in grads)
    for e, before, after, g, st in zip(spec.params(), w, backend.get_weights(model), grads, stated):
        got = before.astype(np.float64) - after
        if e.param.name == "key_bias":
            # Zero in exact arithmetic (softmax ignores a constant per query): float32 noise only.
            assert np.abs(got).max() <= GRAD_TOL * largest, f"{e.name}: {np.abs(got).max():.2e}"
        elif e.param.trainable:
            err = scaled_err(got, g)
            assert err <= GRAD_TOL, f"{e.name}: gradient off by {err:.2e} (relative)"
        else:  # running statistics: one training step's update, momentum in the spec's convention
            np.testing.assert_allclose(after, st, atol=STATE_TOL, rtol=0, err_msg=e.name)


# Dropout in training raises the expected loss (Jensen: cross-entropy is convex in the logits and
# inverted dropout keeps their mean), so one step's loss with rate 0.5 exceeds the rate-0 loss.
# Over DROPOUT_SAMPLES samples the masks' effect is a mean of independent per-sample terms: for
# this model and batch, 4,000 numpy draws of the masks gave a mean rise of 0.087, standard
# deviation 0.0077, smallest 0.057. The assertion (> 0.01) fails by chance only ~10 standard
# deviations below the mean: probability ~1e-23 (normal approximation), for any seed.
DROPOUT_SAMPLES, DROPOUT_MIN_RISE = 4096, 0.01


def test_dropout_is_the_identity_in_evaluation_and_active_in_training(backend_name):
    backend = configured(backend_name, PRECISION)
    spec = make_spec((5,), (_pre_dense(), Dropout(rate=0.5, name="k")), optimizer=SGD(lr=0.1))
    seed_framework(backend_name, 0)  # before build: Keras layers take their seeds when made
    w = random_weights(spec)
    x, y = batch(spec, n=DROPOUT_SAMPLES)
    model = backend.build(spec, w, trainable=None, mode="eager")
    np.testing.assert_allclose(backend.logits(model, x), ref.forward(spec, w, x), atol=FWD_TOL, rtol=0)
    order = np.arange(DROPOUT_SAMPLES, dtype=np.int32)
    with_dropout = backend.train_epoch(model, backend.put_data(x, y), order, DROPOUT_SAMPLES)
    without = ref.loss_and_grads(dataclasses.replace(spec, layers=(*spec.layers[:1], Dropout(0.0, "k"),
                                                                  *spec.layers[2:])), w, x, y)[0]
    assert np.isfinite(with_dropout).all() and with_dropout[0] - without > DROPOUT_MIN_RISE  # masks were applied


# -- several steps: optimizers, schedules, clipping ----------------------------------------------------------

# One model with every kind: a causal transformer block over 16 tokens, reshaped into a
# 4x4x4 image for a small residual CNN.
EVERY_KIND = ((16,), (
    Embedding(vocab_size=VOCAB, dim=4, name="emb"), PositionalEmbedding(max_len=16, name="pos"),
    Residual(name="attn_block", body=(LayerNorm(name="ln_a"),
                                      MultiHeadSelfAttention(heads=2, causal=True, name="attn"))),
    Residual(name="mlp_block", body=(LayerNorm(name="ln_m"), Dense(units=8, activation="gelu", name="up"),
                                     Dropout(rate=0.0, name="drop"), Dense(units=4, name="down"))),
    Reshape(target_shape=(4, 4, 4), name="to_image"),
    # c1's activation comes before the BatchNorm: a bias straight into a BatchNorm has zero
    # gradient, and Adam would turn each backend's float32 noise there into lr-sized steps.
    Conv2D(filters=6, kernel_size=3, padding="same", name="c1"), Activation(activation="relu", name="a1"),
    BatchNorm(name="bn1"),
    Residual(name="res", body=(Conv2D(filters=6, kernel_size=3, padding="same", activation="silu", name="c2"),
                               LayerNorm(name="ln1"))),
    MaxPool2D(pool_size=2, name="mp"), Conv2D(filters=8, kernel_size=3, padding="same", stride=2,
                                              activation="tanh", name="c3"),
    AvgPool2D(pool_size=1, name="ap"), GlobalAvgPool2D(name="gap"),
    Dense(units=8, activation="gelu_tanh", name="fc"), Flatten(name="flat")))
SCHEDULE = WarmupCosine(warmup_steps=3, total_steps=10)
OPTIMIZERS = {
    "adamw-warmup_cosine-clip": AdamW(lr=1e-2, weight_decay=0.1, eps=1e-8, schedule=SCHEDULE, clip_norm=0.5),
    "adam": Adam(lr=1e-2),
    # Decay groups: the weight matrices only (biases and norms excluded), or named arrays and layers.
    "adamw-decay-matrices": AdamW(lr=1e-2, weight_decay=0.5, eps=1e-8, decay="matrices"),
    "adamw-decay-named": AdamW(lr=1e-2, weight_decay=0.5, eps=1e-8, decay=("fc.bias", "emb")),
    "sgd-momentum": SGD(lr=0.1, momentum=0.9, schedule=SCHEDULE),
    "sgd-nesterov-clip": SGD(lr=0.1, momentum=0.9, nesterov=True, clip_norm=0.5),
}


def ten_steps(backend_name, spec, mode="compiled", trainable=None):
    backend = configured(backend_name, PRECISION)
    w = random_weights(spec, seed=1)
    batches = [batch(spec, seed=s) for s in range(10)]
    x = np.concatenate([b[0] for b in batches])
    y = np.concatenate([b[1] for b in batches])
    model = backend.build(spec, w, trainable=trainable, mode=mode)
    losses = backend.train_epoch(model, backend.put_data(x, y), np.arange(10 * BATCH, dtype=np.int32), BATCH)
    want, want_losses = ref.train(spec, w, batches, trainable=trainable)
    np.testing.assert_allclose(losses, want_losses, rtol=LOSS_RTOL)
    worst = 0.0
    for e, w0, got, wr in zip(spec.params(), w, backend.get_weights(model), want):
        if e.param.trainable and not spec.trains(e, trainable):  # running statistics move in training anyway
            np.testing.assert_array_equal(got, w0, err_msg=f"{e.name} is frozen but moved")
            continue
        if e.param.name == "key_bias":
            # Its gradient is zero in exact arithmetic (softmax ignores a constant per query), so
            # Adam turns pure round-off into lr-sized steps, in the reference too: only bounded.
            assert np.abs(got - w0).max() <= 10 * spec.optimizer.lr * 1.1
            continue
        moved = np.linalg.norm(wr - w0)
        assert moved > 0, f"{e.name} did not move in the reference"
        err = float(np.linalg.norm(got - wr) / moved)
        worst = max(worst, err)
        assert err <= L2_TOL, f"{e.name}: relative L2 error {err:.2e}"
    return worst


def test_every_kind_ten_steps_adamw_warmup_cosine_clipping(backend_name):
    ten_steps(backend_name, make_spec(*EVERY_KIND, OPTIMIZERS["adamw-warmup_cosine-clip"]))


def test_lora_adapters_trained_alone_ten_steps(backend_name):
    # Array-level trainable names: every pretrained array frozen, the adapters (A and B) alone train.
    attention = MultiHeadSelfAttention(heads=2, causal=True, lora_rank=2, lora_alpha=4.0, name="k")
    spec = make_spec((4,), (_pre_embedding(), attention), OPTIMIZERS["adamw-warmup_cosine-clip"])
    adapters = tuple(e.name for e in spec.params() if "_lora_" in e.name)
    assert len(adapters) == 8 and spec.param_count(adapters) == 4 * (6 * 2 + 2 * 6)
    ten_steps(backend_name, spec, trainable=adapters)


def test_lora_with_zero_b_leaves_the_model_unchanged():
    """Canonical layout: the adapters are drawn after the layer's own arrays, so the base arrays are
    the same with LoRA on, and with B = 0 so are the logits."""
    plain = make_spec(*CASES["attention"])
    lora = make_spec((4,), (_pre_embedding(), MultiHeadSelfAttention(heads=2, lora_rank=2, name="k")))
    w_plain, w_lora = initial_weights(plain, 3), initial_weights(lora, 3)
    names = [e.name for e in lora.params()]
    by_name = dict(zip(names, w_lora))
    for e, a in zip(plain.params(), w_plain):
        np.testing.assert_array_equal(by_name[e.name], a)
    assert all(not by_name[n].any() for n in names if n.endswith("_lora_b"))
    assert all(by_name[n].std() > 0 for n in names if n.endswith("_lora_a"))
    x, _ = batch(lora)
    np.testing.assert_array_equal(ref.forward(lora, w_lora, x), ref.forward(plain, w_plain, x))


@pytest.mark.parametrize("target", ["query", "value", "out"])
def test_the_lora_formula_is_alpha_over_r_times_x_a_b_on_the_flattened_projection(target):
    """The one formula the adapters apply (tasks/layers.py), against LoRA's definition on the projection
    as a matrix: (alpha / r) x_flat A_flat B_flat, with A (in, r) and B (r, out) flattened."""
    layer = MultiHeadSelfAttention(heads=2, lora_rank=3, lora_alpha=4.5, name="k")
    d, h, hd, r = 6, 2, 3, 3
    params = {p.name: p.shape for p in layer.params((5, d))}
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal(params[f"{target}_lora_{side}"]) for side in "ab")
    x = rng.standard_normal((4, 5, h, hd) if target == "out" else (4, 5, d))
    flat = x.reshape(4, 5, -1) @ a.reshape(-1, r) @ b.reshape(r, -1) * (4.5 / 3)
    got = layer.lora(target, x, a, b, einsum=np.einsum)
    assert got.shape == ((4, 5, d) if target == "out" else (4, 5, h, hd))
    np.testing.assert_allclose(got.reshape(4, 5, -1), flat, rtol=1e-12, atol=0)
    assert layer.lora_adapts(target)
    assert not dataclasses.replace(layer, lora_targets=("key",)).lora_adapts(target)
    assert not dataclasses.replace(layer, lora_rank=0).lora_adapts(target)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_optimizers_ten_steps(backend_name, optimizer):
    # An Embedding first: its gradient is sparse in TensorFlow (IndexedSlices), once unsupported by Adam there.
    layers = (Embedding(vocab_size=VOCAB, dim=4, name="emb"), Flatten(name="flat"),
              Dense(units=16, activation="relu", name="fc"))
    ten_steps(backend_name, make_spec((6,), layers, OPTIMIZERS[optimizer]))


def test_covers_every_kind():
    from tasks.layers import KINDS
    from tasks.spec import walk

    def kinds(shape, layers):
        return {layer.kind for layer, _, _ in walk(layers, shape)}

    per_kind = set().union(*(kinds(*c) for c in CASES.values()))
    assert per_kind == set(KINDS)
    assert kinds(*EVERY_KIND) == set(KINDS)


def test_gpt2_architecture_ten_steps(backend_name):
    """GPT-2 exactly: a head tied to the token table without a bias, tanh GELU, AdamW decaying the
    weight matrices only, warm-up cosine and clipping: ten steps against the reference."""
    from tasks.gpt2 import gpt2

    spec = gpt2(name="gpt2-kinds", vocab=VOCAB, d_model=8, layers=2, heads=2, context=4, batch_size=BATCH,
                lr=1e-2).sized_for(10)
    assert spec.layers[-1].tied_to == "tok_emb" and not spec.layers[-1].use_bias
    ten_steps(backend_name, spec)
