"""TensorFlow adapter: canonical weights, NHWC forward, paper-form Adam, freezing, modes."""

import numpy as np
import pytest

pytest.importorskip("tensorflow")
pytest.importorskip("keras")

from backends.base import BackendUnavailable  # noqa: E402
from backends.tensorflow_backend import TensorFlowBackend  # noqa: E402
from harness.weights import initial_weights  # noqa: E402
from tasks.cifar_cnn import CIFAR_CNN  # noqa: E402
from tasks.mnist_mlp import MNIST_MLP  # noqa: E402
from tasks.spec import Adam, Dense, Flatten, TaskSpec  # noqa: E402


@pytest.fixture(scope="module")
def backend():
    b = TensorFlowBackend()
    b.configure(device="cpu", threads=2, precision="fp32")
    return b


def _data(spec, n, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, *spec.input_shape)).astype(np.float32)
    return x, rng.integers(0, spec.layers[-1].units, n).astype(np.int32)


# -- numpy references (float64) -----------------------------------------------------------

def _np_forward(spec, weights, x):
    """Plain NHWC forward: valid/same conv as a sliding-window contraction over HWIO kernels."""
    h = x.astype(np.float64)
    params = iter(weights)
    for layer in spec.layers:
        if layer.kind == "conv2d":
            k, b = next(params).astype(np.float64), next(params).astype(np.float64)
            if layer.padding == "same":
                lo = (layer.kernel_size - 1) // 2
                hi = layer.kernel_size - 1 - lo
                h = np.pad(h, ((0, 0), (lo, hi), (lo, hi), (0, 0)))
            win = np.lib.stride_tricks.sliding_window_view(h, (layer.kernel_size, layer.kernel_size), axis=(1, 2))
            h = np.einsum("nxycij,ijco->nxyo", win, k) + b  # win: (N, H', W', C, kh, kw)
        elif layer.kind == "maxpool2d":
            p = layer.pool_size
            n, hh, ww, c = h.shape
            h = h[:, : hh // p * p, : ww // p * p].reshape(n, hh // p, p, ww // p, p, c).max(axis=(2, 4))
        elif layer.kind == "flatten":
            h = h.reshape(len(h), -1)  # NHWC order, as the canonical layout defines
        elif layer.kind == "dense":
            h = h @ next(params).astype(np.float64) + next(params).astype(np.float64)
        if getattr(layer, "activation", "linear") == "relu":
            h = np.maximum(h, 0.0)
    return h


def _np_linear_grads(w, b, x, y):
    """Mean softmax cross-entropy gradients of a single linear layer on flattened x."""
    xf = x.reshape(len(x), -1).astype(np.float64)
    logits = xf @ w + b
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    p[np.arange(len(y)), y] -= 1.0
    dlogits = p / len(y)
    return xf.T @ dlogits, dlogits.sum(axis=0)


def _paper_adam(params, grads, state, opt):
    """Kingma & Ba Algorithm 1 (torch, optax): p -= lr * m_hat / (sqrt(v_hat) + eps)."""
    state["t"] += 1
    t = state["t"]
    out = []
    for i, (p, g) in enumerate(zip(params, grads)):
        state["m"][i] = opt.beta1 * state["m"][i] + (1 - opt.beta1) * g
        state["v"][i] = opt.beta2 * state["v"][i] + (1 - opt.beta2) * g * g
        m_hat = state["m"][i] / (1 - opt.beta1 ** t)
        v_hat = state["v"][i] / (1 - opt.beta2 ** t)
        out.append(p - opt.lr * m_hat / (np.sqrt(v_hat) + opt.eps))
    return out


TINY = TaskSpec(name="tiny-linear", dataset="synthetic", input_shape=(2, 2, 1),
                layers=(Flatten(name="flatten"), Dense(units=10, name="head")),
                optimizer=Adam(lr=1e-3, eps=1e-7), batch_size=8, epochs=1, target_accuracy=0.5)


# -- tests --------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", [MNIST_MLP, CIFAR_CNN], ids=lambda s: s.name)
def test_weight_round_trip_is_bit_identical(backend, spec):
    weights = initial_weights(spec, seed=3)
    model = backend.build(spec, weights, trainable=None, mode="eager")
    got = backend.get_weights(model)
    assert len(got) == len(weights)
    for a, b in zip(got, weights):
        assert a.dtype == np.float32 and a.shape == b.shape
        assert a.tobytes() == b.tobytes()
    got[0][...] = 123.0  # fresh copies: mutating them must not reach the model
    assert backend.get_weights(model)[0].tobytes() == weights[0].tobytes()


def test_cnn_logits_match_numpy_nhwc_reference(backend):
    weights = initial_weights(CIFAR_CNN, seed=1)
    model = backend.build(CIFAR_CNN, weights, trainable=None, mode="eager")
    x, _ = _data(CIFAR_CNN, 4)
    got = backend.logits(model, x)
    want = _np_forward(CIFAR_CNN, weights, x)
    assert got.dtype == np.float32 and got.shape == (4, 10)
    # float32 sums of up to 576 products (conv3 has 3*3*64 inputs per output), in an
    # order oneDNN chooses, against a float64 reference: ~1e-6 relative per layer, so
    # 1e-4 absolute on O(1) logits has ample room, while a layout error (HWIO read as
    # OIHW, NCHW flattening) moves logits by O(0.1).
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


def test_adam_follows_the_paper_not_keras_epsilon_hat(backend):
    import keras

    opt = TINY.optimizer
    weights = initial_weights(TINY, seed=0)
    rng = np.random.default_rng(0)
    # Inputs of 1e-5 make the kernel gradients ~1e-6, comparable to eps=1e-7 (and to
    # eps/sqrt(1-beta2) ~3e-6, Keras's effective epsilon at step 1): there the two
    # placements give updates of ~0.9*lr versus ~0.25*lr.
    x = (rng.standard_normal((8, 2, 2, 1)) * 1e-5).astype(np.float32)
    y = rng.integers(0, 10, 8).astype(np.int32)
    model = backend.build(TINY, weights, trainable=None, mode="eager")
    data = backend.put_data(x, y)
    order = np.arange(8)

    state = {"t": 0, "m": [0.0, 0.0], "v": [0.0, 0.0]}
    ref = [w.astype(np.float64) for w in weights]
    first_grads = _np_linear_grads(ref[0], ref[1], x, y)
    for step in range(3):
        grads = _np_linear_grads(ref[0], ref[1], x, y)
        ref = _paper_adam(ref, grads, state, opt)
        backend.train_epoch(model, data, order, 8)
        got = backend.get_weights(model)
        for g, r in zip(got, ref):
            np.testing.assert_allclose(g, r, rtol=0, atol=1e-6, err_msg=f"step {step + 1}")

    # Stock Keras Adam on the same first-step gradients: it must land clearly elsewhere,
    # so a regression to it would fail the check above.
    assert np.abs(first_grads[0]).max() < 1e-5
    stock = [keras.Variable(w) for w in weights]
    keras.optimizers.Adam(learning_rate=opt.lr, beta_1=opt.beta1, beta_2=opt.beta2, epsilon=opt.eps).apply(
        [np.asarray(g, np.float32) for g in first_grads], stock)
    paper_step1 = _paper_adam([w.astype(np.float64) for w in weights], first_grads,
                              {"t": 0, "m": [0.0, 0.0], "v": [0.0, 0.0]}, opt)
    gap = np.abs(np.asarray(stock[0].numpy(), np.float64) - paper_step1[0]).max()
    assert gap > 2e-4, f"stock Keras Adam differs from the paper form by only {gap:.2e}"


def test_frozen_layers_stay_bit_identical(backend):
    weights = initial_weights(CIFAR_CNN, seed=2)
    model = backend.build(CIFAR_CNN, weights, trainable=("fc1", "head"), mode="eager")
    x, y = _data(CIFAR_CNN, 128)
    backend.train_epoch(model, backend.put_data(x, y), np.arange(128), 64)
    after = backend.get_weights(model)
    names = [f"{n}.{p}" for n, _, _ in CIFAR_CNN.param_shapes() for p in ("kernel", "bias")]
    for name, a, b in zip(names, after, weights):
        if name.split(".")[0] in ("fc1", "head"):
            assert not np.array_equal(a, b), f"{name} did not train"
        else:
            assert a.tobytes() == b.tobytes(), f"frozen {name} changed"


def test_eager_and_compiled_agree(backend):
    weights = initial_weights(MNIST_MLP, seed=4)
    x, y = _data(MNIST_MLP, 512)
    order = np.random.default_rng(1).permutation(512)
    results = {}
    for mode in ("eager", "compiled"):
        model = backend.build(MNIST_MLP, weights, trainable=None, mode=mode)
        data = backend.put_data(x, y)
        losses = backend.train_epoch(model, data, order, 128)
        results[mode] = (losses, backend.get_weights(model), backend.evaluate(model, data, 100),
                         backend.logits(model, x[:16]))
    (le, we, ee, ge), (lc, wc, ec, gc) = results["eager"], results["compiled"]
    np.testing.assert_allclose(le, lc, rtol=0, atol=1e-5)
    for a, b in zip(we, wc):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
    np.testing.assert_allclose(ee, ec, rtol=0, atol=1e-5)
    np.testing.assert_allclose(ge, gc, rtol=0, atol=1e-5)


def test_train_epoch_losses_and_no_retrace(backend):
    weights = initial_weights(MNIST_MLP, seed=5)
    x, y = _data(MNIST_MLP, 1000)
    model = backend.build(MNIST_MLP, weights, trainable=None, mode="eager")
    data = backend.put_data(x, y)
    order = np.random.default_rng(0).permutation(1000)[:896]
    backend.warmup(model, data, order, 128, data, 300)
    assert [w.tobytes() for w in backend.get_weights(model)] == [w.tobytes() for w in weights]
    traces = backend.trace_counts(model)
    losses = backend.train_epoch(model, data, order, 128)
    assert losses.dtype == np.float32 and losses.shape == (896 // 128,)
    assert np.isfinite(losses).all()
    backend.evaluate(model, data, 300)
    assert backend.trace_counts(model) == traces, "the real epoch retraced after warm-up"
    # set_weights resets Adam: the same epoch from the same weights gives the same losses.
    backend.set_weights(model, weights)
    np.testing.assert_allclose(backend.train_epoch(model, data, order, 128), losses, rtol=0, atol=1e-6)
    with pytest.raises(ValueError):
        backend.train_epoch(model, data, order[:100], 128)


def test_evaluate_includes_last_partial_batch(backend):
    weights = initial_weights(MNIST_MLP, seed=6)
    x, y = _data(MNIST_MLP, 250)
    model = backend.build(MNIST_MLP, weights, trainable=None, mode="eager")
    loss, acc = backend.evaluate(model, backend.put_data(x, y), 100)
    logits = _np_forward(MNIST_MLP, weights, x)
    shifted = logits - logits.max(axis=1, keepdims=True)
    ce = np.log(np.exp(shifted).sum(axis=1)) - shifted[np.arange(250), y]
    assert loss == pytest.approx(ce.mean(), abs=1e-5)
    assert acc == pytest.approx((logits.argmax(axis=1) == y).mean(), abs=1e-6)  # float32 ratio


def test_environment_and_device_checks(backend):
    env = backend.environment()
    assert env["framework"] == "tensorflow" and env["device"] == "cpu" and env["precision"] == "fp32"
    assert "keras" in env["framework_version"] and env["threads"] >= 1
    assert backend.memory() == {"device_peak_mb": None}
    backend.synchronize()
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):
        pytest.skip("a GPU is present")
    with pytest.raises(BackendUnavailable, match="GPU"):
        TensorFlowBackend().configure(device="gpu", threads=2, precision="fp32")
