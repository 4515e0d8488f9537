"""The PyTorch adapter against numpy references: layout, forward, Adam, freezing, modes."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from backends.base import BackendUnavailable  # noqa: E402
from backends.torch_backend import TorchBackend, _flatten_permutation  # noqa: E402
from harness.weights import initial_weights  # noqa: E402
from tasks import get_task  # noqa: E402

N = 512  # small data keeps the file fast on a 2-core CPU


@pytest.fixture(scope="module")
def backend():
    b = TorchBackend()
    b.configure(device="cpu", threads=2, precision="fp32")
    return b


def _data(spec, n=N, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, *spec.input_shape)).astype(np.float32)
    y = rng.integers(0, spec.num_classes, n).astype(np.int32)
    return x, y


def _weights_with_bias(spec, seed=0):
    """Canonical weights with non-zero biases, so that bias handling is checked too."""
    rng = np.random.default_rng(seed + 100)
    w = initial_weights(spec, seed)
    return [a if i % 2 == 0 else rng.uniform(-0.1, 0.1, a.shape).astype(np.float32) for i, a in enumerate(w)]


@pytest.mark.parametrize("task", ["mnist-mlp", "cifar-cnn"])
def test_weights_round_trip_bit_identical(backend, task):
    spec = get_task(task)
    w = _weights_with_bias(spec)
    model = backend.build(spec, w, trainable=None, mode="eager")
    back = backend.get_weights(model)
    assert len(back) == len(w)
    for a, b in zip(w, back):
        assert b.dtype == np.float32 and b.shape == a.shape
        assert np.array_equal(a, b)
    back[0][...] = 0  # fresh copies, not views of the live parameters
    assert not np.array_equal(backend.get_weights(model)[0], back[0])


def _numpy_cnn_logits(spec, weights, x):
    """Reference forward in float64, all in NHWC/HWIO, straight from the definitions."""
    h = x.astype(np.float64)
    i = 0
    for layer in spec.layers:
        if layer.kind == "conv2d":
            k, b = weights[i].astype(np.float64), weights[i + 1].astype(np.float64)
            i += 2
            kh, kw = k.shape[:2]
            oh, ow = h.shape[1] - kh + 1, h.shape[2] - kw + 1  # the task uses "valid"
            out = np.zeros((h.shape[0], oh, ow, k.shape[3])) + b
            for di in range(kh):  # a sum over kernel taps
                for dj in range(kw):
                    out += h[:, di:di + oh, dj:dj + ow, :] @ k[di, dj]
            h = out
        elif layer.kind == "maxpool2d":
            p = layer.pool_size
            n, hh, ww, c = h.shape
            h = h[:, :hh // p * p, :ww // p * p].reshape(n, hh // p, p, ww // p, p, c).max(axis=(2, 4))
        elif layer.kind == "flatten":
            h = h.reshape(h.shape[0], -1)  # NHWC order: the canonical Dense rows
        elif layer.kind == "dense":
            h = h @ weights[i].astype(np.float64) + weights[i + 1]
            i += 2
        if getattr(layer, "activation", "linear") == "relu":
            h = np.maximum(h, 0)
    return h


def test_cnn_logits_match_numpy_nhwc_reference(backend):
    """Exercises the Flatten permutation: conv3 outputs 4x4x64, torch flattens it NCHW.

    Without permuting fc1's rows the logits would be those of a scrambled fc1 and miss
    by O(1). Tolerance 1e-4: torch sums in float32 in its own order over up to
    3*3*64 = 576-term (conv) and 1024-term (fc1) dot products; the reference is float64.
    """
    spec = get_task("cifar-cnn")
    assert not np.array_equal(_flatten_permutation((4, 4, 64)), np.arange(4 * 4 * 64))
    w = _weights_with_bias(spec)
    x, _ = _data(spec, n=8)
    model = backend.build(spec, w, trainable=None, mode="eager")
    got = backend.logits(model, x)
    want = _numpy_cnn_logits(spec, w, x)
    assert got.dtype == np.float32 and got.shape == (8, 10)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    assert np.abs(want).max() > 1e-2  # a meaningful comparison, not two near-zero arrays


def test_adam_step_matches_numpy_reference(backend):
    spec = get_task("cifar-cnn")
    opt = spec.optimizer
    w = _weights_with_bias(spec)
    x, y = _data(spec, n=64)
    model = backend.build(spec, w, trainable=None, mode="eager")
    data = backend.put_data(x, y)
    # The gradients torch computes at the initial weights from the very batch tensor the
    # step sees: where |g| ~ eps the update lr*g/(|g|+eps) amplifies a last-bit change in
    # g (another conv algorithm for another memory layout) by ~lr/(4*eps) = 2500.
    xb, yb = backend._batch(data, torch.arange(64))
    loss = torch.nn.functional.cross_entropy(model.module(xb), yb)
    grads = torch.autograd.grad(loss, model.params)
    before = [p.detach().clone().numpy().astype(np.float64) for p in model.params]
    losses = backend.train_epoch(model, data, np.arange(64), 64)
    assert losses.shape == (1,) and abs(losses[0] - loss.item()) < 1e-6
    t = 1
    for p, p0, g in zip(model.params, before, grads):
        g = g.numpy().astype(np.float64)
        m = (1 - opt.beta1) * g
        v = (1 - opt.beta2) * g * g
        m_hat, v_hat = m / (1 - opt.beta1 ** t), v / (1 - opt.beta2 ** t)
        want = p0 - opt.lr * m_hat / (np.sqrt(v_hat) + opt.eps)  # eps on sqrt(v_hat)
        np.testing.assert_allclose(p.detach().numpy(), want, atol=1e-6, rtol=0)


def test_frozen_layers_bit_identical_trainable_ones_change(backend):
    spec = get_task("cifar-cnn")
    w = initial_weights(spec, 0)
    model = backend.build(spec, w, trainable=("fc1", "head"), mode="eager")
    x, y = _data(spec, n=256)
    losses = backend.train_epoch(model, backend.put_data(x, y), np.random.default_rng(0).permutation(256), 128)
    assert np.isfinite(losses).all()
    after = backend.get_weights(model)
    names = [n for n in spec.param_layer_names() for _ in (0, 1)]
    for name, a, b in zip(names, w, after):
        if name in ("fc1", "head"):
            assert not np.array_equal(a, b), name
        else:
            assert np.array_equal(a, b), name
    frozen = [p for name, mod, _, _ in model.param_layers if name.startswith("conv") for p in (mod.weight, mod.bias)]
    assert all(not p.requires_grad and p.grad is None for p in frozen)


def test_train_epoch_returns_one_finite_loss_per_step_and_set_weights_resets(backend):
    spec = get_task("mnist-mlp")
    w = initial_weights(spec, 0)
    model = backend.build(spec, w, trainable=None, mode="eager")
    data = backend.put_data(*_data(spec))
    order = np.random.default_rng(0).permutation(N)
    first = backend.train_epoch(model, data, order, 64)
    assert first.dtype == np.float32 and first.shape == (N // 64,)
    assert np.isfinite(first).all() and first[-1] < first[0]
    # set_weights restores the weights and resets Adam (moments and step count):
    # the same epoch again gives bit-identical losses.
    backend.set_weights(model, w)
    again = backend.train_epoch(model, data, order, 64)
    np.testing.assert_array_equal(first, again)


def test_evaluate_includes_last_partial_batch(backend):
    spec = get_task("mnist-mlp")
    w = _weights_with_bias(spec)
    model = backend.build(spec, w, trainable=None, mode="eager")
    x, y = _data(spec, n=300)
    loss, acc = backend.evaluate(model, backend.put_data(x, y), 128)  # 128 + 128 + 44
    z = backend.logits(model, x).astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    nll = np.log(np.exp(z).sum(axis=1)) - z[np.arange(300), y]
    assert abs(loss - nll.mean()) < 1e-5
    assert acc == pytest.approx((z.argmax(axis=1) == y).mean())


@pytest.mark.parametrize("task", ["mnist-mlp", "cifar-cnn"])
def test_eager_and_compiled_agree(backend, task):
    spec = get_task(task)
    w = initial_weights(spec, 0)
    x, y = _data(spec, n=256)
    data = backend.put_data(x, y)
    order = np.random.default_rng(0).permutation(256)
    results = {}
    for mode in ("eager", "compiled"):
        model = backend.build(spec, w, trainable=None, mode=mode)
        losses = backend.train_epoch(model, data, order, 64)
        results[mode] = losses, backend.evaluate(model, data, 100)  # 100: a partial last batch
    np.testing.assert_allclose(results["compiled"][0], results["eager"][0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(results["compiled"][1], results["eager"][1], atol=1e-5, rtol=0)


def test_gpu_without_cuda_is_unavailable():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(BackendUnavailable, match="no CUDA device"):
        TorchBackend().configure(device="gpu", threads=1, precision="fp32")


def test_environment_names_framework_and_device(backend):
    env = backend.environment()
    assert env["framework"] == "torch" and env["device"] == "cpu"
    assert env["framework_version"] == torch.__version__ and env["precision"] == "fp32"
