"""Cross-backend parity: the same canonical weights and batches give the same numbers.

The backends are compared in float64 (precision fp64): they compute the same math, so they
agree to float64 rounding on any CPU, and a layout, formula or default that differs shows as
1e-3 or more. In float32 the same comparisons differ by amounts that depend on the CPU's
kernels (summation order, convolution algorithm, thread count): an element whose gradient is
within float32 noise of zero can flip its Adam step's sign (2 lr), and 80 steps amplify
rounding into whole predictions. Measured in float64 (2-core Xeon, torch 2.13, TF 2.21,
jax 0.10.2), worst over the three pairs:
- logits: 1.3e-15 (MLP), 4.5e-16 (CNN) absolute; asserted 1e-12.
- weights after one Adam step: 2.7e-15 (MLP), 4.9e-15 (CNN) per element; asserted 1e-12.
- conv gradients (lr=1, eps=1: the update -g/(|g|+1) is nearly linear in g): 6.2e-15
  relative to each layer's largest update; asserted 1e-12.
- one epoch of mnist-mlp (80 Adam steps): weights 3.8e-15 relative L2 per parameter,
  evaluation loss and accuracy equal to the last digit; asserted 1e-10 relative, evaluation
  loss 1e-12, accuracy equal.
The margins (~300x after one step) leave room for another CPU's float64 kernels (fused
multiply-adds, another summation order), each a few ulps.
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

PRECISION = "fp64"
LOGITS_TOL, STEP_TOL, EPOCH_REL_TOL, EVAL_LOSS_TOL = 1e-12, 1e-12, 1e-10, 1e-12


def build(name, spec, weights, mode="compiled", trainable=None):
    backend = configured(name, PRECISION)
    return backend, backend.build(spec, weights, trainable=trainable, mode=mode)


@pytest.mark.parametrize("task, kind", [("mnist-mlp", "mnist"), ("cifar-cnn", "cifar10")])
def test_forward_logits_agree(backend_pair, task, kind):
    spec = get_task(task)
    w = initial_weights(spec, 0)
    x = synthetic(kind, n_train=64, n_test=1, seed=1).x_train
    logits = [b.logits(m, x) for b, m in (build(name, spec, w) for name in backend_pair)]
    assert logits[0].dtype == logits[1].dtype == np.float64
    assert np.abs(logits[0]).max() > 0.05  # not trivially zero
    np.testing.assert_allclose(logits[0], logits[1], atol=LOGITS_TOL, rtol=0)


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
    for i, (before, wa, wb) in enumerate(zip(w, a, b)):
        assert not np.array_equal(before, wa)
        diff = float(np.abs(wa - wb).max())
        assert diff <= STEP_TOL, f"array {i}: elements differ by up to {diff:.3g}"


def test_conv_gradients_agree(backend_pair):
    # lr=1, eps=1: the first Adam update is -g/(|g|+1), nearly linear in the gradient g.
    spec = dataclasses.replace(get_task("cifar-cnn"), optimizer=Adam(lr=1.0, eps=1.0))
    w = initial_weights(spec, 0)
    a, b = (one_step(name, spec, w, "cifar10", batch=64) for name in backend_pair)
    for before, wa, wb in zip(w, a, b):
        da, db = wa - before, wb - before
        scale = max(np.abs(da).max(), 1e-12)
        assert scale > 1e-6  # a real gradient reached every layer
        np.testing.assert_allclose(da / scale, db / scale, atol=STEP_TOL, rtol=0)


@pytest.mark.slow
def test_accuracy_after_one_epoch_agrees(backend_pair):
    spec = get_task("mnist-mlp")
    d = synthetic("mnist", n_train=10240, n_test=2000, seed=0)
    w = initial_weights(spec, 0)
    order = epoch_order(0, 0, 0, len(d.y_train), 128)
    evaluations, weights = [], []
    for name in backend_pair:
        backend, model = build(name, spec, w)
        backend.train_epoch(model, backend.put_data(d.x_train, d.y_train), order, 128)
        evaluations.append(backend.evaluate(model, backend.put_data(d.x_test, d.y_test), 1000))
        weights.append(backend.get_weights(model))
    (loss_a, acc_a), (loss_b, acc_b) = evaluations
    assert min(acc_a, acc_b) > 0.5  # learnt, so agreement is not two models at chance
    assert acc_a == acc_b and abs(loss_a - loss_b) <= EVAL_LOSS_TOL, evaluations
    for i, (before, wa, wb) in enumerate(zip(w, *weights)):
        rel = float(np.linalg.norm(wa - wb) / np.linalg.norm(wa - before))
        assert rel <= EPOCH_REL_TOL, f"array {i}: relative L2 {rel:.2e} after one epoch"
