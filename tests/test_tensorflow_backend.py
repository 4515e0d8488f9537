"""TensorFlow-specific: Adam in the paper's form, not Keras's epsilon hat; no retracing after warm-up."""

import numpy as np
import pytest

pytest.importorskip("tensorflow")
pytest.importorskip("keras")

from backends.tensorflow_backend import TensorFlowBackend  # noqa: E402
from harness.weights import initial_weights  # noqa: E402
from tasks.mnist_mlp import MNIST_MLP  # noqa: E402
from tasks.spec import Adam, Dense, Flatten, TaskSpec  # noqa: E402

# Its module fixture is costly: every test of the module runs in the same test process (pytest-xdist).
pytestmark = pytest.mark.xdist_group("test_tensorflow_backend")


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


