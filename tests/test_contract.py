"""The backend contract, checked the same way on every installed backend."""

import numpy as np
import numpy_reference
import pytest
from conftest import configured

from harness.loop import epoch_order
from harness.weights import initial_weights
from tasks import get_task

N = 512


def small_data(kind: str, n: int = N, seed: int = 0):
    from harness.data import synthetic

    return synthetic(kind, n_train=n, n_test=n // 2, seed=seed)


@pytest.mark.parametrize("task", ["mnist-mlp", "cifar-cnn"])
def test_weights_round_trip_bit_identical(backend_name, task):
    backend = configured(backend_name)
    spec = get_task(task)
    w = initial_weights(spec, 0)
    model = backend.build(spec, w, trainable=None, mode="eager")
    out = backend.get_weights(model)
    assert [a.shape for a in out] == [a.shape for a in w]
    assert all(a.dtype == np.float32 and np.array_equal(a, b) for a, b in zip(out, w))


@pytest.mark.parametrize("mode", ["eager", "compiled"])
def test_train_epoch_returns_one_finite_loss_per_step_and_learns(backend_name, mode):
    backend = configured(backend_name)
    spec = get_task("mnist-mlp")
    d = small_data("mnist", 2048)
    model = backend.build(spec, initial_weights(spec, 0), trainable=None, mode=mode)
    train, test = backend.put_data(d.x_train, d.y_train), backend.put_data(d.x_test, d.y_test)
    loss0, acc0 = backend.evaluate(model, test, 1000)
    order = epoch_order(0, 0, 0, len(d.y_train), 128)
    losses = backend.train_epoch(model, train, order, 128)
    assert losses.shape == (len(order) // 128,) and losses.dtype == np.float32 and np.all(np.isfinite(losses))
    loss1, acc1 = backend.evaluate(model, test, 1000)
    assert loss1 < loss0 and acc1 > max(acc0, 0.3)  # well above 10% chance after 16 steps


def test_evaluate_counts_the_last_partial_batch(backend_name):
    backend = configured(backend_name)
    spec = get_task("mnist-mlp")
    d = small_data("mnist", 300)
    model = backend.build(spec, initial_weights(spec, 0), trainable=None, mode="compiled")
    x, y = d.x_train[:250], d.y_train[:250]
    logits = backend.logits(model, x)
    expected_acc = float((logits.argmax(1) == y).mean())
    shifted = logits - logits.max(1, keepdims=True)
    expected_loss = float(np.mean(np.log(np.exp(shifted).sum(1)) - shifted[np.arange(250), y]))
    loss, acc = backend.evaluate(model, backend.put_data(x, y), 100)  # batches of 100, 100, 50
    assert acc == pytest.approx(expected_acc, abs=1e-6)
    assert loss == pytest.approx(expected_loss, rel=1e-5)


def test_set_weights_resets_the_optimizer(backend_name):
    """Two runs from the same weights give the same losses: no optimizer state leaks over."""
    backend = configured(backend_name)
    spec = get_task("mnist-mlp")
    d = small_data("mnist")
    w = initial_weights(spec, 0)
    model = backend.build(spec, w, trainable=None, mode="compiled")
    train = backend.put_data(d.x_train, d.y_train)
    order = epoch_order(0, 0, 0, N, 128)
    first = backend.train_epoch(model, train, order, 128)
    backend.set_weights(model, w)
    second = backend.train_epoch(model, train, order, 128)
    np.testing.assert_allclose(first, second, rtol=1e-6)


def test_warmup_leaves_training_where_it_started(backend_name):
    backend = configured(backend_name)
    spec = get_task("mnist-mlp")
    d = small_data("mnist")
    w = initial_weights(spec, 0)
    order = epoch_order(0, 0, 0, N, 128)
    a = backend.build(spec, w, trainable=None, mode="compiled")
    train, test = backend.put_data(d.x_train, d.y_train), backend.put_data(d.x_test, d.y_test)
    backend.warmup(a, train, order, 128, test, 100)
    assert all(np.array_equal(x, y) for x, y in zip(backend.get_weights(a), w))
    after_warmup = backend.train_epoch(a, train, order, 128)
    b = backend.build(spec, w, trainable=None, mode="compiled")
    cold = backend.train_epoch(b, train, order, 128)
    np.testing.assert_allclose(after_warmup, cold, rtol=1e-6)


def test_frozen_layers_stay_bit_identical(backend_name):
    backend = configured(backend_name)
    spec = get_task("finetune")
    d = small_data("cifar10", 256).classes((5, 6, 7, 8, 9))
    w = initial_weights(spec, 0)
    model = backend.build(spec, w, trainable=("fc1", "head"), mode="compiled")
    order = epoch_order(0, 1, 0, len(d.y_train), 32)
    backend.train_epoch(model, backend.put_data(d.x_train, d.y_train), order, 32)
    after = backend.get_weights(model)
    names = [e.name for e in spec.params()]
    for name, before, now in zip(names, w, after):
        if name.split(".")[0] in ("conv1", "conv2", "conv3"):
            assert np.array_equal(before, now), f"{name} changed although frozen"
        elif name.endswith("kernel"):
            assert not np.array_equal(before, now), f"{name} did not train"


def test_environment_reports_what_ran(backend_name):
    env = configured(backend_name).environment()
    assert {"framework", "framework_version", "device", "threads", "precision"} <= set(env)
    assert env["precision"] == "fp32" and env["framework_version"]
    assert configured(backend_name).memory().keys() >= {"device_peak_mb"}


@pytest.mark.parametrize("task", ["mnist-mlp", "cifar-cnn"])
def test_logits_match_the_numpy_reference(backend_name, task):
    # float32 sums of up to 1,024 products against float64: ~1e-6 relative per layer on
    # logits of order 1, so 1e-4 leaves margin, while a transposed kernel or a wrong
    # flatten order (torch's NCHW permutation) is off by ~1e-1.
    backend = configured(backend_name)
    spec = get_task(task)
    w = initial_weights(spec, 3)
    w[1] = np.linspace(-0.1, 0.1, w[1].size, dtype=np.float32)  # non-zero biases, so they count
    x = small_data(spec.dataset, 16).x_train
    got = backend.logits(backend.build(spec, w, trainable=None, mode="eager"), x)
    np.testing.assert_allclose(got, numpy_reference.forward(spec, w, x), atol=1e-4, rtol=0)


def test_one_adam_step_follows_the_paper(backend_name):
    backend = configured(backend_name)
    spec = get_task("mnist-mlp")
    w = initial_weights(spec, 1)
    d = small_data("mnist", 64)
    model = backend.build(spec, w, trainable=None, mode="compiled")
    losses = backend.train_epoch(model, backend.put_data(d.x_train, d.y_train), np.arange(64, dtype=np.int32), 64)
    loss, grads, _, _ = numpy_reference.loss_and_grads(spec, w, d.x_train, d.y_train)
    want, _ = numpy_reference.train(spec, w, [(d.x_train, d.y_train)])
    np.testing.assert_allclose(losses, [loss], rtol=1e-5)
    # The first step moves a weight by lr * g / (|g| + eps). Where |g| is within a few eps
    # of zero that is ill-conditioned (d update / d g ~ lr / eps = 1e4), so float32
    # round-off in g alone moves it by ~1e-5: those weights are held to |update| <= lr.
    # Elsewhere 1e-6 holds, tight enough to tell Keras's "epsilon hat" placement apart.
    for got, ref, g in zip(backend.get_weights(model), want, grads):
        well = np.abs(g) >= 100 * spec.optimizer.eps
        assert well.mean() > 0.5
        np.testing.assert_allclose(got[well], ref[well], atol=1e-6, rtol=0)
        np.testing.assert_allclose(got[~well], ref[~well], atol=spec.optimizer.lr, rtol=0)


@pytest.mark.parametrize("task", ["mnist-mlp", "cifar-cnn"])
def test_eager_and_compiled_modes_agree(backend_name, task):
    # Same math, other kernels and fusion: float32 round-off only, over 4 steps.
    backend = configured(backend_name)
    spec = get_task(task)
    w = initial_weights(spec, 4)
    d = small_data(spec.dataset, 256)
    order = epoch_order(0, 0, 0, 256, 64)
    out = {}
    for mode in ("eager", "compiled"):
        model = backend.build(spec, w, trainable=None, mode=mode)
        data = backend.put_data(d.x_train, d.y_train)
        out[mode] = (backend.train_epoch(model, data, order, 64), backend.get_weights(model),
                     backend.evaluate(model, data, 100))
    # Losses: 3e-5. Measured: torch cifar-cnn (functional ops since spec v2) differs by
    # 1.05e-5 at step 4 while its step-1 gradients agree to 9e-7 relative: Adam turns that
    # round-off on near-zero gradients into lr-sized steps; a wrong step is off by ~1e-2.
    np.testing.assert_allclose(out["eager"][0], out["compiled"][0], atol=3e-5, rtol=0)
    (loss_e, acc_e), (loss_c, acc_c) = out["eager"][2], out["compiled"][2]
    assert loss_e == pytest.approx(loss_c, rel=1e-4) and abs(acc_e - acc_c) <= 1 / 256  # one prediction
    # Weights: where an implementation choice routes a gradient differently (max-pool
    # ties, ReLU at exactly 0: XLA and oneDNN differ) a weight's Adam step flips by up to
    # lr, and Adam's m/sqrt(v) amplifies round-off where gradients cancel across steps
    # (measured: TF conv3, max 1.2e-3, mean 1.8e-6, over a movement of 4e-3; torch cifar-cnn
    # since spec v2: one of fc1's 64 biases ends at -5.8e-4 in one mode and +5.8e-4 in the
    # other, which alone is 1.4% of that array's mean movement). So each array, leaving
    # out its max(1, 1%) largest differences, agrees on average to 1% of how far it moved,
    # and no weight by more than the 4 steps' bound of 4 lr; a mode that skipped or
    # mis-scaled updates is off by ~100%.
    for start, a, b in zip(w, out["eager"][1], out["compiled"][1]):
        moved = np.abs(a - start).mean()
        diff = np.sort(np.abs(a - b).ravel())
        assert moved > 0 and diff[: -max(1, a.size // 100)].mean() <= 0.01 * moved
        assert diff[-1] <= 4 * spec.optimizer.lr


def test_a_missing_gpu_is_unavailable_not_a_crash(backend_name):
    from backends import get_backend
    from backends.base import BackendUnavailable

    if configured(backend_name).environment()["device"] != "cpu":
        pytest.skip("this machine has a GPU")
    with pytest.raises(BackendUnavailable, match="(?i)gpu|cuda"):
        get_backend(backend_name).configure(device="gpu", threads=2, precision="fp32")


# -- rules the Backend base class enforces, the same way on every backend ----------------------------------


def test_bad_weights_get_the_one_message_everywhere(backend_name):
    from tasks.spec import WeightsError

    backend = configured(backend_name)
    spec = get_task("mnist-mlp")
    w = initial_weights(spec, 0)
    bad = [*w[:2], np.zeros((128, 11), np.float32), w[3]]
    with pytest.raises(WeightsError) as build_error:
        backend.build(spec, bad, trainable=None, mode="eager")
    model = backend.build(spec, w, trainable=None, mode="eager")
    with pytest.raises(WeightsError) as set_error:
        backend.set_weights(model, w[:3])
    assert str(build_error.value) == "weights: head.kernel has shape (128, 11), task 'mnist-mlp' needs (128, 10)"
    assert str(set_error.value) == "weights: 3 arrays, task 'mnist-mlp' needs 4"


def test_ragged_orders_and_mismatched_data_are_refused(backend_name):
    backend = configured(backend_name)
    spec = get_task("mnist-mlp")
    d = small_data("mnist", 256)
    model = backend.build(spec, initial_weights(spec, 0), trainable=None, mode="eager")
    data = backend.put_data(d.x_train, d.y_train)
    with pytest.raises(ValueError, match="not a multiple of batch_size"):
        backend.train_epoch(model, data, np.arange(200, dtype=np.int32), 128)  # torch once truncated this
    with pytest.raises(ValueError, match="x has 256 samples but y has 255"):
        backend.put_data(d.x_train, d.y_train[:255])


def test_unknown_layer_kinds_and_unconfigured_backends_are_refused(backend_name, monkeypatch):
    from backends import get_backend

    backend = configured(backend_name)
    spec = get_task("mnist-mlp")
    monkeypatch.setattr(type(backend), "LAYERS", {k: v for k, v in backend.LAYERS.items() if k != "dense"})
    with pytest.raises(ValueError, match=f"{backend_name}: no implementation of layer kind"):
        backend.build(spec, initial_weights(spec, 0), trainable=None, mode="eager")
    with pytest.raises(RuntimeError, match="configure\\(\\) must be called first"):
        get_backend(backend_name).put_data(np.zeros((1, 2)), np.zeros(1))


def test_every_adapter_table_covers_the_vocabulary(backend_name):
    from tasks.layers import KINDS

    assert set(configured(backend_name).LAYERS) == set(KINDS)


def test_every_adapter_covers_every_activation_and_optimizer(backend_name):
    from tasks.layers import ACTIVATIONS
    from tasks.optim import OPTIMIZERS

    backend = configured(backend_name)
    assert set(backend.ACTIVATIONS) == set(ACTIVATIONS)
    assert set(backend.OPTIMIZERS) == set(OPTIMIZERS)


@pytest.mark.parametrize("table, entry, task", [
    ("OPTIMIZERS", "adamw", "tiny-gpt"), ("OPTIMIZERS", "adam", "mnist-mlp"),
    ("ACTIVATIONS", "relu", "mnist-mlp"), ("ACTIVATIONS", "gelu", "tiny-gpt"),
])
def test_a_missing_table_entry_is_refused_naming_it_before_anything_is_built(backend_name, monkeypatch, table, entry,
                                                                              task):
    backend = configured(backend_name)
    spec = get_task(task)
    kept = {k: v for k, v in getattr(backend, table).items() if k != entry}
    monkeypatch.setattr(type(backend), table, kept)
    monkeypatch.setattr(type(backend), "_build", lambda *a, **k: pytest.fail("built with a missing table entry"))
    what = "optimizer" if table == "OPTIMIZERS" else "activation"
    with pytest.raises(ValueError, match=f"{backend_name}: no implementation of {what} {entry}"):
        backend.build(spec, initial_weights(spec, 0), trainable=None, mode="eager")


def test_build_returns_the_base_handle_and_refuses_anything_else(backend_name, monkeypatch):
    from backends.base import ModelHandle

    backend = configured(backend_name)
    spec = get_task("mnist-mlp")
    weights = initial_weights(spec, 0)
    model = backend.build(spec, weights, trainable=("head",), mode="eager")
    assert isinstance(model, ModelHandle)
    assert (model.spec, model.trainable_layers, model.mode) == (spec, ("head",), "eager")
    monkeypatch.setattr(type(backend), "_build", lambda *a, **k: object())
    with pytest.raises(TypeError, match=f"{backend_name}: _build returned a object, not a ModelHandle"):
        backend.build(spec, weights, trainable=None, mode="eager")
