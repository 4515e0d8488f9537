"""JAX-specific: optimizer state only for trainable layers, the fused scan, warm-up without recompiles."""

import logging

import numpy as np
import pytest

pytest.importorskip("jax")
pytest.importorskip("optax")

from backends.jax_backend import JaxBackend  # noqa: E402
from harness.weights import initial_weights  # noqa: E402
from tasks.cifar_cnn import CIFAR_CNN  # noqa: E402
from tasks.mnist_mlp import MNIST_MLP  # noqa: E402

# Its module fixture is costly: every test of the module runs in the same test process (pytest-xdist).
pytestmark = pytest.mark.xdist_group("test_jax_backend")


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


def test_frozen_layers_get_no_optimizer_state(backend):
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
    names = [e.layer for e in CIFAR_CNN.params()]
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




def test_one_eager_step_program_serves_every_epoch_length_and_a_later_identical_stage(backend):
    """The --mode best probe times a few steps, then the epoch trains: the eager step compiled for the
    probe serves the epoch (of several index chunks), and a later stage that trains the same arrays
    (tiny-gpt-finetune's scratch control) reuses it; the chunked epoch computes what the fused scan does."""
    import backends.jax_backend as jb

    weights = initial_weights(MNIST_MLP, 3)
    steps = 2 * jb._EAGER_CHUNK + 3  # three chunks, the last one partial
    x, y = _data(MNIST_MLP, 2 * steps, seed=3)
    data = backend.put_data(x, y)
    order = np.random.default_rng(3).permutation(2 * steps)
    probe = backend.build(MNIST_MLP, weights, trainable=None, mode="eager")
    backend.warmup(probe, data, order[:2], 2, data, 40)
    compiled = probe.step._cache_size()  # the module's backend may hold this program's other shapes already
    backend.train_epoch(probe, data, order[:10], 2)
    backend.set_weights(probe, weights)
    backend.warmup(probe, data, order, 2, data, 40)  # the training's warm-up: nothing new to compile
    eager = backend.train_epoch(probe, data, order, 2)
    assert eager.shape == (steps,) and probe.step._cache_size() == compiled
    again = backend.build(MNIST_MLP, weights, trainable=None, mode="eager")
    assert again.step is probe.step and again.opt is probe.opt
    other = backend.build(MNIST_MLP, weights, trainable=("head",), mode="eager")
    assert other.step is not probe.step  # another trainable set is another program
    fused = backend.build(MNIST_MLP, weights, trainable=None, mode="compiled")
    np.testing.assert_allclose(eager, backend.train_epoch(fused, data, order, 2), atol=1e-5, rtol=0)
    for a, b in zip(backend.get_weights(probe), backend.get_weights(fused)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", ["eager", "compiled"])
def test_no_compilation_inside_the_first_timed_epoch(backend, mode, caplog):
    """Warm-up compiles everything the epoch runs: on an H100 a stack of the per-step losses,
    compiled in the first epoch, made it 10x slower than the next (eager MLP, 64k vs 670k samples/s)."""
    import jax

    x, y = _data(MNIST_MLP, 96, seed=5)
    data = backend.put_data(x, y)
    order = np.random.default_rng(5).permutation(96)
    model = backend.build(MNIST_MLP, initial_weights(MNIST_MLP, 5), trainable=None, mode=mode)
    backend.warmup(model, data, order, 32, data, 40)
    jax.config.update("jax_log_compiles", True)
    try:
        with caplog.at_level(logging.WARNING):
            backend.train_epoch(model, data, order, 32)
    finally:
        jax.config.update("jax_log_compiles", False)
    compiles = [r.getMessage()[:80] for r in caplog.records if "Compiling" in r.getMessage()]
    assert not compiles, compiles


def test_eager_step_on_cpu_donates_nothing_and_keeps_its_inputs(backend):
    """Issue 13: donation made the CNN's eager step 4.5-7% slower on XLA:CPU (see the adapter).

    The compiled step must alias no input to an output, and the arrays passed in must
    still be readable after the step (a donated buffer would be deleted).
    """
    weights = initial_weights(CIFAR_CNN, 0)
    x, y = _data(CIFAR_CNN, 32)
    data = backend.put_data(x, y)
    model = backend.build(CIFAR_CNN, weights, trainable=None, mode="eager")
    index = backend._index(np.arange(32), 16)
    state, losses = backend._state(model), backend._loss_buffer(index)
    hlo = model.step.lower(*state, losses, data.x, data.y, index, 0).compile().as_text()
    assert "input_output_alias" not in hlo.splitlines()[0]
    model.step(*state, losses, data.x, data.y, index, 0)
    import jax

    assert not any(leaf.is_deleted() for leaf in jax.tree_util.tree_leaves((state, losses)))


@pytest.mark.parametrize("shape", [(4, 30, 30, 8), (3, 13, 13, 5), (2, 7, 9, 3)])
@pytest.mark.parametrize("values", ["random", "ties", "relu"])
def test_window_max_is_flax_max_pool_and_its_gradient(shape, values):
    """The adapter's max pool equals flax's (reduce_window) forward and backward, ties and odd sizes included.

    Rounded and ReLU'd inputs put equal maxima in one window: the gradient must go to the first
    in row-major order, as select-and-scatter (and torch, and TensorFlow) send it; odd sizes
    leave a last row/column outside every window, whose gradient is 0.
    """
    import flax.linen as nn
    import jax

    from backends.jax_backend import _window_max

    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(np.float32)
    x = {"random": x, "ties": np.round(x), "relu": np.maximum(x, 0)}[values]
    g = rng.standard_normal((shape[0], shape[1] // 2, shape[2] // 2, shape[3])).astype(np.float32)

    def flax_pool(h):
        return nn.max_pool(h, (2, 2), strides=(2, 2), padding="VALID")

    ours, theirs = jax.vjp(jax.jit(_window_max(2)), x), jax.vjp(flax_pool, x)
    np.testing.assert_array_equal(ours[0], theirs[0])
    np.testing.assert_array_equal(ours[1](g)[0], theirs[1](g)[0])


def test_cnn_training_step_has_no_scatter(backend):
    """Issue 13: reduce_window's gradient compiled to iotas and a scatter, a third of the CNN's CPU step."""
    x, y = _data(CIFAR_CNN, 32)
    data = backend.put_data(x, y)
    model = backend.build(CIFAR_CNN, initial_weights(CIFAR_CNN, 0), trainable=None, mode="eager")
    index = backend._index(np.arange(32), 16)
    hlo = model.step.lower(*backend._state(model), backend._loss_buffer(index), data.x, data.y, index,
                           0).compile().as_text()
    # The loss's integer-label lookup transposes to a scatter-add of (batch,) rows: allowed.
    big_scatters = [line for line in hlo.splitlines() if " scatter(" in line and "f32[16,10]" not in line]
    assert not big_scatters and "select-and-scatter" not in hlo, big_scatters[:2]
