"""Cross-backend parity: the same canonical weights and batches give the same numbers.

Tolerances, and why:
- MLP logits 1e-5 absolute: |logits| ~ 1, float32 has ~6e-8 relative precision, and a
  784-term dot product summed in another order differs by ~1e-6 at most.
- CNN logits 1e-4 absolute: five layers, convolutions summing 288-576 terms with
  different algorithms (im2col, Winograd, direct); errors compound layer by layer.
- Weights after one Adam step: Adam's first update is lr * g / (|g| + eps), ~±lr for any
  gradient well above float32 noise, so 99% of each parameter's elements must agree to
  1e-5. A gradient within float32 noise of zero can have its sign flipped by another
  summation order: that element then differs by up to 2 lr, which no max-element
  tolerance survives. Measured on a 2-core AMD EPYC: 1 of the 864 conv1 kernel elements
  (0.12%) differed by 1.95e-3 (torch vs tensorflow, tensorflow vs jax); on the Xeon CI
  machine, none. So: at most 1% of elements outside 1e-5, and none beyond 2 lr (a
  bound no correct Adam step can exceed: a wrong learning rate or epsilon would).
- Gradients 1e-4 relative to each layer's largest |g|: measured through an Adam step
  with lr=1, eps=1, where the update -g/(|g|+1) is ~linear in g; a conv kernel's
  gradient sums batch x positions (~50k) products, so float32 order effects grow.
- Accuracy after one epoch 1 point: identical math diverges slowly through float32
  rounding over 80 steps; 1 point on 2,000 test samples is 20 predictions.
"""

import dataclasses

import numpy as np
import pytest
from conftest import configured

from harness.data import synthetic
from harness.loop import epoch_order
from harness.weights import initial_weights
from tasks import get_task
from tasks.spec import Adam


def build(name, spec, weights, mode="compiled", trainable=None):
    backend = configured(name)
    return backend, backend.build(spec, weights, trainable=trainable, mode=mode)


@pytest.mark.parametrize("task, kind, tol", [("mnist-mlp", "mnist", 1e-5), ("cifar-cnn", "cifar10", 1e-4)])
def test_forward_logits_agree(backend_pair, task, kind, tol):
    spec = get_task(task)
    w = initial_weights(spec, 0)
    x = synthetic(kind, n_train=64, n_test=1, seed=1).x_train
    logits = [b.logits(m, x) for b, m in (build(name, spec, w) for name in backend_pair)]
    assert np.abs(logits[0]).max() > 0.05  # not trivially zero
    np.testing.assert_allclose(logits[0], logits[1], atol=tol, rtol=0)


def one_step(name, spec, weights, kind, batch=128):
    d = synthetic(kind, n_train=batch, n_test=1, seed=2)
    backend, model = build(name, spec, weights)
    backend.train_epoch(model, backend.put_data(d.x_train, d.y_train), np.arange(batch, dtype=np.int32), batch)
    return backend.get_weights(model)


@pytest.mark.parametrize("task, kind", [("mnist-mlp", "mnist"), ("cifar-cnn", "cifar10")])
def test_weights_after_one_adam_step_agree(backend_pair, task, kind):
    spec = get_task(task)
    w = initial_weights(spec, 0)
    a, b = (one_step(name, spec, w, kind) for name in backend_pair)
    lr = spec.optimizer.lr
    for i, (before, wa, wb) in enumerate(zip(w, a, b)):
        assert not np.array_equal(before, wa)
        diff = np.abs(wa - wb)
        assert diff.max() <= 2 * lr + 1e-5, f"array {i}: {diff.max():.3g} is more than any two Adam steps differ"
        outside = np.count_nonzero(diff > 1e-5) / diff.size
        assert outside <= 0.01, f"array {i}: {outside:.2%} of elements differ by more than 1e-5"


def test_conv_gradients_agree(backend_pair):
    # lr=1, eps=1: the first Adam update is -g/(|g|+1), nearly linear in the gradient g.
    spec = dataclasses.replace(get_task("cifar-cnn"), optimizer=Adam(lr=1.0, eps=1.0))
    w = initial_weights(spec, 0)
    a, b = (one_step(name, spec, w, "cifar10", batch=64) for name in backend_pair)
    for before, wa, wb in zip(w, a, b):
        da, db = wa - before, wb - before
        scale = max(np.abs(da).max(), 1e-12)
        assert scale > 1e-6  # a real gradient reached every layer
        np.testing.assert_allclose(da / scale, db / scale, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_accuracy_after_one_epoch_agrees(backend_pair):
    spec = get_task("mnist-mlp")
    d = synthetic("mnist", n_train=10240, n_test=2000, seed=0)
    w = initial_weights(spec, 0)
    order = epoch_order(0, 0, 0, len(d.y_train), 128)
    accuracies = []
    for name in backend_pair:
        backend, model = build(name, spec, w)
        backend.train_epoch(model, backend.put_data(d.x_train, d.y_train), order, 128)
        accuracies.append(backend.evaluate(model, backend.put_data(d.x_test, d.y_test), 1000)[1])
    assert min(accuracies) > 0.5  # learnt, so agreement is not two models at chance
    assert abs(accuracies[0] - accuracies[1]) <= 0.01
