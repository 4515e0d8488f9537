"""The JAX adapter against numpy references: weights, forward, Adam, freezing, modes, warm-up."""

import dataclasses

import numpy as np
import pytest

pytest.importorskip("jax")
pytest.importorskip("optax")

from backends.base import BackendUnavailable  # noqa: E402
from backends.jax_backend import JaxBackend  # noqa: E402
from harness.weights import initial_weights  # noqa: E402
from tasks.cifar_cnn import CIFAR_CNN  # noqa: E402
from tasks.mnist_mlp import MNIST_MLP  # noqa: E402


@pytest.fixture(scope="module")
def backend():
    b = JaxBackend()
    b.configure(device="cpu", threads=2, precision="fp32")
    return b


def _data(spec, n, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.random((n, *spec.input_shape), dtype=np.float32)
    y = rng.integers(0, spec.layers[-1].units, n).astype(np.int32)
    return x, y


# -- numpy references (float64, NHWC / HWIO like the canonical layout) ---------------------

def _np_forward(spec, weights, x):
    h = x.astype(np.float64)
    params = iter(weights)
    for layer in spec.layers:
        if layer.kind == "conv2d":
            k, b = next(params).astype(np.float64), next(params).astype(np.float64)
            assert layer.padding == "valid"
            win = np.lib.stride_tricks.sliding_window_view(h, (layer.kernel_size, layer.kernel_size), axis=(1, 2))
            h = np.einsum("nhwcij,ijco->nhwo", win, k) + b
        elif layer.kind == "dense":
            k, b = next(params).astype(np.float64), next(params).astype(np.float64)
            h = h @ k + b
        elif layer.kind == "maxpool2d":
            p = layer.pool_size
            n, hh, ww, c = h.shape
            h = h[:, : hh // p * p, : ww // p * p].reshape(n, hh // p, p, ww // p, p, c).max(axis=(2, 4))
        elif layer.kind == "flatten":
            h = h.reshape(len(h), -1)
        if getattr(layer, "activation", "linear") == "relu":
            h = np.maximum(h, 0)
    return h


def _np_mlp_grads(weights, x, y):
    """Loss and gradients of Flatten -> Dense relu -> Dense, mean softmax cross-entropy."""
    k1, b1, k2, b2 = (w.astype(np.float64) for w in weights)
    a = x.reshape(len(x), -1).astype(np.float64)
    z1 = a @ k1 + b1
    h1 = np.maximum(z1, 0)
    logits = h1 @ k2 + b2
    shifted = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)
    loss = -np.log(p[np.arange(len(y)), y]).mean()
    dlogits = p.copy()
    dlogits[np.arange(len(y)), y] -= 1
    dlogits /= len(y)
    dk2, db2 = h1.T @ dlogits, dlogits.sum(0)
    dz1 = (dlogits @ k2.T) * (z1 > 0)
    dk1, db1 = a.T @ dz1, dz1.sum(0)
    return loss, [dk1, db1, dk2, db2]


# -- tests ---------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", [MNIST_MLP, CIFAR_CNN], ids=lambda s: s.name)
def test_weight_round_trip_is_bit_identical(backend, spec):
    weights = initial_weights(spec, 3)
    model = backend.build(spec, weights, trainable=None, mode="compiled")
    out = backend.get_weights(model)
    assert len(out) == len(weights)
    for a, b in zip(out, weights):
        assert a.dtype == np.float32 and a.shape == b.shape
        assert np.array_equal(a, b)
    out[0][...] = 0  # fresh copies: scribbling on them leaves the model alone
    assert np.array_equal(backend.get_weights(model)[0], weights[0])
    other = initial_weights(spec, 4)
    backend.set_weights(model, other)
    assert all(np.array_equal(a, b) for a, b in zip(backend.get_weights(model), other))


def test_cnn_logits_match_numpy_reference(backend):
    weights = initial_weights(CIFAR_CNN, 0)
    x, _ = _data(CIFAR_CNN, 6)
    model = backend.build(CIFAR_CNN, weights, trainable=None, mode="eager")
    got = backend.logits(model, x)
    want = _np_forward(CIFAR_CNN, weights, x)
    assert got.dtype == np.float32 and got.shape == (6, 10)
    # float32 sums of up to 576 products in XLA's order versus a float64 reference:
    # relative error ~1e-6 per layer on logits of order 1, so 1e-4 leaves a wide margin
    # while a transposed kernel or a wrong flatten order is off by ~1e-1.
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_one_adam_step_matches_numpy_paper_formulation(backend):
    spec = MNIST_MLP
    weights = initial_weights(spec, 1)
    x, y = _data(spec, 16, seed=1)
    data = backend.put_data(x, y)
    model = backend.build(spec, weights, trainable=None, mode="compiled")
    losses = backend.train_epoch(model, data, np.arange(16), 16)
    loss, grads = _np_mlp_grads(weights, x, y)
    opt = spec.optimizer
    t = 1
    want = []
    for w, g in zip(weights, grads):
        m = (1 - opt.beta1) * g
        v = (1 - opt.beta2) * g * g
        m_hat, v_hat = m / (1 - opt.beta1 ** t), v / (1 - opt.beta2 ** t)
        want.append(w - opt.lr * m_hat / (np.sqrt(v_hat) + opt.eps))  # eps outside sqrt(v_hat)
    np.testing.assert_allclose(losses, [loss], rtol=1e-5)
    # A first Adam step moves each weight by lr * g / (|g| + eps). Where |g| is within a
    # few eps of zero that is ill-conditioned (d update / d g ~ lr / eps = 1e4), so float32
    # round-off in g alone can move it by 1e-5; those few weights are held only to the
    # bound |update| <= lr. Elsewhere 1e-6 holds, tight enough to tell Keras's
    # "epsilon hat" placement apart (it differs by >= 3e-6 for |g| <= 1e-3).
    for got, ref, g in zip(backend.get_weights(model), want, grads):
        well = np.abs(g) >= 100 * opt.eps
        assert well.mean() > 0.5
        np.testing.assert_allclose(got[well], ref[well], atol=1e-6, rtol=0)
        np.testing.assert_allclose(got[~well], ref[~well], atol=opt.lr, rtol=0)


def test_frozen_layers_stay_bit_identical(backend):
    weights = initial_weights(CIFAR_CNN, 0)
    x, y = _data(CIFAR_CNN, 32)
    data = backend.put_data(x, y)
    model = backend.build(CIFAR_CNN, weights, trainable=("fc1", "head"), mode="compiled")
    # optimizer state exists only for the trainable subtree
    import jax

    state_leaves = sum(leaf.size for leaf in jax.tree_util.tree_leaves(model.opt_state) if leaf.ndim > 0)
    assert state_leaves == 2 * CIFAR_CNN.param_count(("fc1", "head"))
    losses = backend.train_epoch(model, data, np.arange(32), 16)
    assert np.all(np.isfinite(losses))
    after = backend.get_weights(model)
    names = [n for n, _, _ in CIFAR_CNN.param_shapes() for _ in (0, 1)]
    for name, before, now in zip(names, weights, after):
        if name in ("fc1", "head"):
            assert not np.array_equal(before, now), name
        else:
            assert np.array_equal(before, now), name


@pytest.mark.parametrize("spec", [MNIST_MLP, CIFAR_CNN], ids=lambda s: s.name)
def test_eager_and_compiled_agree(backend, spec, monkeypatch):
    import backends.jax_backend as jb

    # force the fused lax.scan epoch even for convolutions on CPU (slow there, tiny here)
    monkeypatch.setattr(jb, "SCAN_CONV_ON_CPU", True)
    weights = initial_weights(spec, 2)
    x, y = _data(spec, 64, seed=2)
    data = backend.put_data(x, y)
    order = np.random.default_rng(2).permutation(64)
    results = {}
    for mode in ("eager", "compiled"):
        model = backend.build(spec, weights, trainable=None, mode=mode)
        assert model.fused == (mode == "compiled")
        results[mode] = backend.train_epoch(model, data, order, 16), backend.get_weights(model)
    np.testing.assert_allclose(results["eager"][0], results["compiled"][0], atol=1e-5, rtol=0)
    for a, b in zip(results["eager"][1], results["compiled"][1]):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", ["eager", "compiled"])
def test_warmup_does_not_consume_training_state(backend, mode):
    weights = initial_weights(MNIST_MLP, 5)
    x, y = _data(MNIST_MLP, 96, seed=5)
    data = backend.put_data(x, y)
    order = np.random.default_rng(5).permutation(96)
    cold = backend.build(MNIST_MLP, weights, trainable=None, mode=mode)
    cold_losses = backend.train_epoch(cold, data, order, 32)
    warm = backend.build(MNIST_MLP, weights, trainable=None, mode=mode)
    backend.warmup(warm, data, order, 32, data, 40)
    compiled = (warm.step._cache_size(), len(warm.executables))
    assert all(np.array_equal(a, b) for a, b in zip(backend.get_weights(warm), weights))
    np.testing.assert_array_equal(backend.train_epoch(warm, data, order, 32), cold_losses)
    # warm-up compiled exactly what the epoch runs: no second signature, no recompile
    assert (warm.step._cache_size(), len(warm.executables)) == compiled
    assert all(np.array_equal(a, b) for a, b in zip(backend.get_weights(warm), backend.get_weights(cold)))


@pytest.mark.parametrize("mode", ["eager", "compiled"])
def test_train_epoch_returns_one_finite_loss_per_step(backend, mode):
    x, y = _data(MNIST_MLP, 100)
    data = backend.put_data(x, y)
    model = backend.build(MNIST_MLP, initial_weights(MNIST_MLP, 0), trainable=None, mode=mode)
    order = np.random.default_rng(0).permutation(100)[:96]
    losses = backend.train_epoch(model, data, order, 16)
    assert losses.dtype == np.float32 and losses.shape == (6,)
    assert np.all(np.isfinite(losses))
    with pytest.raises(ValueError):
        backend.train_epoch(model, data, order[:20], 16)


def test_evaluate_counts_the_last_partial_batch(backend):
    weights = initial_weights(MNIST_MLP, 0)
    x, y = _data(MNIST_MLP, 23)
    model = backend.build(MNIST_MLP, weights, trainable=None, mode="compiled")
    loss, acc = backend.evaluate(model, backend.put_data(x, y), 10)
    logits = _np_forward(MNIST_MLP, weights, x)
    shifted = logits - logits.max(axis=1, keepdims=True)
    ref_loss = (np.log(np.exp(shifted).sum(axis=1)) - shifted[np.arange(23), y]).mean()
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    assert acc == pytest.approx((logits.argmax(axis=1) == y).mean())


def test_finetune_head_shape_and_environment(backend):
    spec = dataclasses.replace(CIFAR_CNN, name="tiny")
    model = backend.build(spec, initial_weights(spec, 0), trainable=("head",), mode="eager")
    assert model.trainable == ("head",)
    env = backend.environment()
    assert env["framework"] == "jax" and env["precision"] == "fp32" and env["device"] == "cpu"
    assert all(name in env["framework_version"] for name in ("jax", "jaxlib", "flax", "optax"))
    assert backend.memory() == {"device_peak_mb": None} or backend.memory()["device_peak_mb"] is not None


def test_gpu_absent_raises_backend_unavailable(monkeypatch):
    import jax

    try:
        has_gpu = bool(jax.devices("gpu"))
    except RuntimeError:
        has_gpu = False
    if has_gpu:
        pytest.skip("a GPU is present")
    # configure writes these; monkeypatch restores them for the tests that follow
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    with pytest.raises(BackendUnavailable, match="gpu"):
        JaxBackend().configure(device="gpu", threads=2, precision="fp32")
