"""The JAX adapter: flax.linen layers over an explicit params pytree, optax Adam, epochs fused by lax.scan."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from backends.base import Backend, BackendUnavailable, check_build, check_options
from tasks.spec import TaskSpec

log = logging.getLogger(__name__)

# jax_default_matmul_precision per run precision. Without "highest", XLA on Ampere and
# Hopper GPUs runs float32 matmuls and convolutions in TF32; PyTorch does not.
_MATMUL_PRECISION = {"fp32": "highest", "tf32": "tensorfloat32", "bf16": "default"}


def _dense(layer, params, x, compute_dtype):
    import flax.linen as nn
    import jax

    y = nn.Dense(layer.units, dtype=compute_dtype).apply({"params": params}, x)
    return jax.nn.relu(y) if layer.activation == "relu" else y


def _conv2d(layer, params, x, compute_dtype):
    import flax.linen as nn
    import jax

    k = layer.kernel_size
    y = nn.Conv(layer.filters, (k, k), padding=layer.padding.upper(), dtype=compute_dtype).apply({"params": params}, x)
    return jax.nn.relu(y) if layer.activation == "relu" else y


def _maxpool2d(layer, params, x, compute_dtype):
    import flax.linen as nn

    p = layer.pool_size
    # "VALID" floors H and W, as the spec's layer_shapes (and Keras) have it.
    return nn.max_pool(x, (p, p), strides=(p, p), padding="VALID")


def _flatten(layer, params, x, compute_dtype):
    return x.reshape(x.shape[0], -1)  # NHWC row-major: the canonical feature order


# The one map from spec layer kinds to flax.linen layers, applied with explicit params:
# params[layer.name] = {"kernel", "bias"} is flax's own layout and the canonical one
# (Dense (in, out), Conv HWIO on NHWC), so weights load and export without conversion.
SCAN_UNROLL = 1
# XLA:CPU (jaxlib 0.10.2) runs convolutions inside a while loop ~20x slower than the same
# convolutions in a straight-line jit (measured: CNN 40 vs 850 samples/s), so on CPU a
# model with convolutions runs "compiled" as jitted steps over device-resident data.
SCAN_CONV_ON_CPU = False

LAYERS = {"dense": _dense, "conv2d": _conv2d, "maxpool2d": _maxpool2d, "flatten": _flatten}


@dataclass
class _Data:
    x: Any  # device float32 NHWC
    y: Any  # device int32
    n: int
    eval_index: dict = field(default_factory=dict)  # batch_size -> (index, mask) on device


@dataclass
class _Model:
    spec: TaskSpec
    mode: str
    trainable: tuple[str, ...]
    frozen: tuple[str, ...]
    train_params: dict
    frozen_params: dict
    opt: Any
    opt_state: Any
    step: Any  # jitted one-step function (eager mode)
    epoch: Any  # jitted fused epoch (compiled mode)
    evaluate: Any
    forward: Any
    executables: dict = field(default_factory=dict)  # shapes -> compiled epoch
    fused: bool = True  # compiled mode runs the epoch as one lax.scan


class JaxBackend(Backend):
    name = "jax"

    def __init__(self):
        self._jax = None
        self._device = None
        self._threads = None
        self._precision = None
        self._last = None  # the last result dispatched, for synchronize()
        self._compute_dtype = None

    # -- set-up --------------------------------------------------------------------------

    def configure(self, *, device: str, threads: int, precision: str) -> None:
        check_options(device=device, precision=precision)
        import sys

        already = "jax" in sys.modules
        # These only take effect before jax initialises its backends; a worker process
        # configures first, so they do. Tests that imported jax earlier keep its settings.
        os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"  # no up-front grab of 75% of GPU memory
        if device == "cpu":
            os.environ["JAX_PLATFORMS"] = "cpu"
        elif device == "gpu":
            os.environ["JAX_PLATFORMS"] = "cuda"
        if threads == 1:
            # The only thread setting XLA:CPU honours reliably; larger intra-op counts in
            # XLA_FLAGS are ignored or crash some versions, so >1 means "all cores".
            flags = os.environ.get("XLA_FLAGS", "")
            if "intra_op_parallelism_threads" not in flags:
                os.environ["XLA_FLAGS"] = (flags + " --xla_cpu_multi_thread_eigen=false "
                                           "intra_op_parallelism_threads=1").strip()
        try:
            import jax
        except ImportError as exc:
            raise BackendUnavailable(f"jax is not installed ({exc}); pip install \"tribench[jax]\"") from None
        if already and device == "cpu":
            try:
                jax.config.update("jax_platforms", "cpu")
            except Exception:  # noqa: BLE001 - backends already initialised: pick the CPU below
                pass
        try:
            if device == "gpu":
                devices = jax.devices("gpu")
            elif device == "cpu":
                devices = jax.devices("cpu")
            else:
                devices = jax.devices()
        except (RuntimeError, AssertionError) as exc:  # jax 0.10 asserts when JAX_PLATFORMS names no backend
            raise BackendUnavailable(f"jax: device {device!r} is not available here ({exc or 'no such platform'}); "
                                     "a GPU needs jax[cuda12] and a visible NVIDIA device") from None
        if not devices:
            raise BackendUnavailable(f"jax: no {device} device found")
        self._device = devices[0]
        if self._device.platform == "cpu" and precision == "tf32":
            log.warning("jax: tf32 asked for on CPU, where matmuls run in float32 anyway")
        jax.config.update("jax_default_matmul_precision", _MATMUL_PRECISION[precision])
        self._compute_dtype = jax.numpy.bfloat16 if precision == "bf16" else jax.numpy.float32
        self._jax = jax
        self._precision = precision
        self._threads = threads if threads == 1 else (os.cpu_count() if self._device.platform == "cpu" else threads)
        if threads not in (1, os.cpu_count()) and self._device.platform == "cpu":
            log.warning("jax: XLA:CPU cannot pin %d threads; it uses all %d cores", threads, os.cpu_count())

    def _require(self):
        if self._jax is None:
            raise RuntimeError("JaxBackend.configure() must be called first")
        return self._jax

    def environment(self) -> dict:
        jax = self._require()
        import flax
        import jaxlib
        import optax

        return {
            "framework": "jax",
            "framework_version": f"{jax.__version__} (jaxlib {jaxlib.__version__}, "
                                 f"flax {flax.__version__}, optax {optax.__version__})",
            "device": "cpu" if self._device.platform == "cpu" else "gpu",
            "device_name": self._device.device_kind,
            "threads": self._threads,
            "precision": self._precision,
        }

    def synchronize(self) -> None:
        if self._last is not None:
            self._jax.block_until_ready(self._last)

    def memory(self) -> dict:
        stats = None
        if self._device is not None:
            try:
                stats = self._device.memory_stats()
            except (NotImplementedError, RuntimeError, AttributeError):
                stats = None
        if not stats or "peak_bytes_in_use" not in stats:
            return {"device_peak_mb": None}  # XLA:CPU keeps no allocator statistics
        return {"device_peak_mb": stats["peak_bytes_in_use"] / 2**20}

    # -- model ---------------------------------------------------------------------------

    def put_data(self, x: np.ndarray, y: np.ndarray) -> _Data:
        jax = self._require()
        x = np.asarray(x, np.float32)
        y = np.asarray(y, np.int32)
        if len(x) != len(y):
            raise ValueError(f"x has {len(x)} samples, y has {len(y)}")
        return _Data(jax.device_put(x, self._device), jax.device_put(y, self._device), len(x))

    def _to_params(self, spec: TaskSpec, weights: list[np.ndarray]) -> dict:
        jax = self._require()
        shapes = spec.param_shapes()
        if len(weights) != 2 * len(shapes):
            raise ValueError(f"{len(weights)} weight arrays, task {spec.name!r} needs {2 * len(shapes)}")
        params = {}
        for i, (name, kshape, bshape) in enumerate(shapes):
            kernel, bias = weights[2 * i], weights[2 * i + 1]
            for part, array, shape in (("kernel", kernel, kshape), ("bias", bias, bshape)):
                if tuple(array.shape) != tuple(shape):
                    raise ValueError(f"{name}.{part} has shape {tuple(array.shape)}, expected {tuple(shape)}")
            # Own copies: the epoch donates parameter buffers, which must never alias a caller's array.
            params[name] = {"kernel": jax.device_put(np.array(kernel, np.float32, copy=True), self._device),
                            "bias": jax.device_put(np.array(bias, np.float32, copy=True), self._device)}
        return params

    def build(self, spec: TaskSpec, weights: list[np.ndarray], *,
              trainable: tuple[str, ...] | None, mode: str) -> _Model:
        self._require()
        import optax

        names = check_build(spec, trainable=trainable, mode=mode)
        train_names = tuple(names) if trainable is None else tuple(n for n in names if n in trainable)
        frozen_names = tuple(n for n in names if n not in train_names)
        params = self._to_params(spec, weights)
        o = spec.optimizer
        # optax.adam: p -= lr * m_hat / (sqrt(v_hat) + eps), the spec's "sqrt_v_hat"; eps_root stays 0.
        opt = optax.adam(learning_rate=o.lr, b1=o.beta1, b2=o.beta2, eps=o.eps, eps_root=0.0)
        train_params = {n: params[n] for n in train_names}
        frozen_params = {n: params[n] for n in frozen_names}
        fns = self._functions(spec, opt)
        fused = mode == "compiled" and (SCAN_CONV_ON_CPU or self._device.platform != "cpu"
                                        or not any(layer.kind == "conv2d" for layer in spec.layers))
        if mode == "compiled" and not fused:
            log.warning("jax: %s has convolutions; XLA:CPU runs them slowly inside lax.scan, so "
                        "'compiled' dispatches one jitted step per batch instead of a fused epoch", spec.name)
        return _Model(fused=fused, spec=spec, mode=mode, trainable=train_names, frozen=frozen_names,
                      train_params=train_params, frozen_params=frozen_params, opt=opt,
                      opt_state=self._init_state(opt, train_params), **fns)

    def _functions(self, spec: TaskSpec, opt) -> dict:
        jax = self._jax
        jnp = jax.numpy
        import optax
        from jax import lax

        layers = spec.layers
        compute_dtype = self._compute_dtype

        def forward(params, x):
            h = x.astype(compute_dtype)
            for layer in layers:
                h = LAYERS[layer.kind](layer, params.get(layer.name), h, compute_dtype)
            return h.astype(jnp.float32)

        def loss_fn(train_params, frozen_params, x, y):
            logits = forward({**frozen_params, **train_params}, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        def step(train_params, frozen_params, opt_state, x, y):
            # Only the trainable subtree is differentiated: XLA drops the frozen layers'
            # weight gradients, and the backward pass stops at the first trainable layer.
            loss, grads = jax.value_and_grad(loss_fn)(train_params, frozen_params, x, y)
            updates, opt_state = opt.update(grads, opt_state, train_params)
            return optax.apply_updates(train_params, updates), opt_state, loss

        def eager_step(train_params, frozen_params, opt_state, losses, x, y, index, i):
            # Each step writes its loss into the epoch's donated loss buffer: stacking the
            # per-step scalars afterwards compiled a stack of `steps` operands inside the
            # first timed epoch (H100: first eager MLP epoch at 64k samples/s, then 670k).
            rows = lax.dynamic_index_in_dim(index, i, keepdims=False)
            train_params, opt_state, loss = step(train_params, frozen_params, opt_state,
                                                 jnp.take(x, rows, axis=0), jnp.take(y, rows, axis=0))
            return train_params, opt_state, losses.at[i].set(loss)

        def epoch(train_params, frozen_params, opt_state, x, y, index):
            def body(carry, rows):
                tp, st = carry
                tp, st, loss = step(tp, frozen_params, st, jnp.take(x, rows, axis=0), jnp.take(y, rows, axis=0))
                return (tp, st), loss

            (train_params, opt_state), losses = lax.scan(body, (train_params, opt_state), index,
                                                         unroll=SCAN_UNROLL)
            return train_params, opt_state, losses

        def evaluate(params, x, y, index, mask):
            # index/mask: (batches, batch_size); the last batch is padded with a valid row
            # and masked out, so one compiled body serves every batch.
            def body(carry, inputs):
                rows, m = inputs
                logits = forward(params, jnp.take(x, rows, axis=0))
                yb = jnp.take(y, rows, axis=0)
                losses = optax.softmax_cross_entropy_with_integer_labels(logits, yb)
                correct = (jnp.argmax(logits, axis=-1) == yb).astype(jnp.float32)
                return (carry[0] + jnp.sum(losses * m), carry[1] + jnp.sum(correct * m)), None

            (loss_sum, correct), _ = lax.scan(body, (jnp.float32(0), jnp.float32(0)), (index, mask))
            return loss_sum, correct

        return {
            # Donate parameters and optimizer state: updated in place, no second copy.
            "step": jax.jit(eager_step, donate_argnums=(0, 2, 3)),
            "epoch": jax.jit(epoch, donate_argnums=(0, 2)),
            "evaluate": jax.jit(evaluate),
            "forward": jax.jit(forward),
        }

    def get_weights(self, model: _Model) -> list[np.ndarray]:
        out = []
        for name in model.spec.param_layer_names():
            p = model.train_params.get(name) or model.frozen_params[name]
            out += [np.array(p["kernel"], np.float32, copy=True), np.array(p["bias"], np.float32, copy=True)]
        return out

    def set_weights(self, model: _Model, weights: list[np.ndarray]) -> None:
        params = self._to_params(model.spec, weights)
        model.train_params = {n: params[n] for n in model.trainable}
        model.frozen_params = {n: params[n] for n in model.frozen}
        model.opt_state = self._init_state(model.opt, model.train_params)

    def _init_state(self, opt, train_params):
        # Committed to the device like every step's output: an uncommitted first state
        # gives the eager step a second jit signature and a recompile in the first epoch.
        return self._jax.device_put(opt.init(train_params), self._device)

    # -- primitive steps -----------------------------------------------------------------

    def _index(self, order: np.ndarray, batch_size: int):
        order = np.asarray(order)
        steps = len(order) // batch_size
        if steps * batch_size != len(order):
            raise ValueError(f"len(order)={len(order)} is not a multiple of batch_size={batch_size}")
        index = np.ascontiguousarray(order.reshape(steps, batch_size), dtype=np.int32)
        return self._jax.device_put(index, self._device)  # one upload per epoch

    def _epoch_executable(self, model: _Model, data: _Data, index):
        # The scan's code depends on the step count, so executables are cached by shapes.
        key = (index.shape, data.x.shape, data.y.shape)
        exe = model.executables.get(key)
        if exe is None:
            exe = model.epoch.lower(model.train_params, model.frozen_params, model.opt_state,
                                    data.x, data.y, index).compile()
            model.executables[key] = exe
        return exe

    def _loss_buffer(self, index):
        # Committed like the step's outputs, so the first step hits the warmed jit entry.
        return self._jax.device_put(np.zeros(index.shape[0], np.float32), self._device)

    def train_epoch(self, model: _Model, data: _Data, order: np.ndarray, batch_size: int) -> np.ndarray:
        self._require()
        index = self._index(order, batch_size)
        if model.fused:
            exe = self._epoch_executable(model, data, index)
            model.train_params, model.opt_state, losses = exe(
                model.train_params, model.frozen_params, model.opt_state, data.x, data.y, index)
        else:
            tp, st, losses = model.train_params, model.opt_state, self._loss_buffer(index)
            for i in range(index.shape[0]):
                tp, st, losses = model.step(tp, model.frozen_params, st, losses, data.x, data.y, index, i)
            model.train_params, model.opt_state = tp, st
        self._last = losses
        return np.asarray(losses, dtype=np.float32)  # the one host read of the epoch

    def warmup(self, model: Any, data: Any, order: np.ndarray, batch_size: int,
               eval_data: Any, eval_batch_size: int) -> None:
        """Compile for the real epoch length without running a training step.

        Compiled mode lowers and compiles the fused epoch ahead of time (the executable is
        cached by shapes); eager mode runs its step once on throw-away copies of the state,
        since donation would otherwise consume the model's buffers. Evaluation runs once.
        """
        jax = self._require()
        index = self._index(order, batch_size)
        if model.fused:
            self._epoch_executable(model, data, index)
        else:
            # Committed copies on the model's device, so that the call's signature (and the
            # jit cache entry it fills) is the one train_epoch will use.
            copy = jax.tree_util.tree_map(lambda a: jax.device_put(a.copy(), self._device),
                                          (model.train_params, model.opt_state))
            self._last = model.step(copy[0], model.frozen_params, copy[1], self._loss_buffer(index),
                                    data.x, data.y, index, 0)
        self.evaluate(model, eval_data, eval_batch_size)
        self.synchronize()

    def evaluate(self, model: _Model, data: _Data, batch_size: int) -> tuple[float, float]:
        jax = self._require()
        if data.n == 0:
            raise ValueError("evaluate on an empty dataset")
        cached = data.eval_index.get(batch_size)
        if cached is None:
            batches = -(-data.n // batch_size)
            flat = np.arange(batches * batch_size)
            mask = (flat < data.n).astype(np.float32).reshape(batches, batch_size)
            index = np.minimum(flat, data.n - 1).astype(np.int32).reshape(batches, batch_size)
            cached = (jax.device_put(index, self._device), jax.device_put(mask, self._device))
            data.eval_index[batch_size] = cached
        params = {**model.frozen_params, **model.train_params}
        loss_sum, correct = model.evaluate(params, data.x, data.y, *cached)
        self._last = correct
        return float(loss_sum) / data.n, float(correct) / data.n

    def logits(self, model: _Model, x: np.ndarray) -> np.ndarray:
        jax = self._require()
        params = {**model.frozen_params, **model.train_params}
        out = model.forward(params, jax.device_put(np.asarray(x, np.float32), self._device))
        self._last = out
        return np.array(out, np.float32)
