"""The JAX adapter: jax.numpy/lax layers on canonical params, optax, lax.scan epochs, data parallel on a Mesh."""

from __future__ import annotations

import collections
import functools
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from backends.base import Backend, BackendUnavailable, InferencePath, ModelHandle
from tasks.spec import TaskSpec

log = logging.getLogger(__name__)

# jax_default_matmul_precision per run precision. Without "highest", XLA on Ampere and
# Hopper GPUs runs float32 matmuls and convolutions in TF32; PyTorch does not.
_MATMUL_PRECISION = {"fp32": "highest", "tf32": "tensorfloat32", "bf16": "default", "fp64": "highest"}
# The one mesh axis of data parallelism: each step's global batch is split along it.
DATA_AXIS = "data"
_HOST_DEVICES_FLAG = "--xla_force_host_platform_device_count"
# Eager steps in flight on a multi-device CPU run: past XLA:CPU's 32 per device an all-reduce step
# deadlocks; waiting on the 16th step back stays under it (docs/performance.md).
_CPU_MAX_STEPS_IN_FLIGHT = 16
# The eager step reads its batch rows from a chunk of this many steps of the epoch's order (the
# last padded): one compiled step serves every epoch length, the --mode best probe's short one too.
_EAGER_CHUNK = 64
# Programs kept per backend (JaxBackend._programs): a stage that trains what an earlier stage
# trained, on data of the same shapes (tiny-gpt-finetune's scratch control), reuses its compiles.
_PROGRAMS_KEPT = 8


class _Ctx:
    """What a layer function may need beyond its input: parameters, mode, randomness, new state."""

    def __init__(self, params: dict, *, train: bool, frozen: frozenset, key=None):
        self.params, self.train, self.frozen, self.key = params, train, frozen, key
        self.state: dict = {}  # updated BatchNorm running statistics, by canonical name
        self.dropouts = 0

    def p(self, layer, name: str):
        return self.params[f"{layer.name}.{name}"]


def _run(layers, h, ctx: _Ctx):
    for layer in layers:
        h = LAYERS[layer.kind](layer, h, ctx)
    return h


# Every activation the spec names, as (jax, array) -> array; base.build checks coverage.
ACTIVATIONS = {
    "linear": lambda jax, v: v, "relu": lambda jax, v: jax.nn.relu(v), "tanh": lambda jax, v: jax.numpy.tanh(v),
    "silu": lambda jax, v: jax.nn.silu(v), "gelu": lambda jax, v: jax.nn.gelu(v, approximate=False),
    "gelu_tanh": lambda jax, v: jax.nn.gelu(v, approximate=True),
}


def _activation(name: str, h):
    import jax

    return ACTIVATIONS[name](jax, h)


def _dense(layer, h, ctx):
    # A tied head multiplies by its embedding's (vocab, dim) table, transposed.
    kernel = ctx.params[f"{layer.tied_to}.table"].T if layer.tied_to else ctx.p(layer, "kernel")
    y = h @ kernel.astype(h.dtype)
    if layer.use_bias:
        y = y + ctx.p(layer, "bias").astype(h.dtype)
    return _activation(layer.activation, y)


def _conv2d(layer, h, ctx):
    from jax import lax

    s = layer.stride
    # lax's "SAME" puts the odd padding row/column at the bottom/right, as TensorFlow does.
    y = lax.conv_general_dilated(h, ctx.p(layer, "kernel").astype(h.dtype), (s, s), layer.padding.upper(),
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return _activation(layer.activation, y + ctx.p(layer, "bias").astype(h.dtype))


def _avgpool(layer, h, ctx):
    import flax.linen as nn

    p = layer.pool_size
    # "VALID" floors H and W, as the spec's out_shape has it.
    return nn.avg_pool(h, (p, p), strides=(p, p), padding="VALID")


def _normalise(h, mean, var, eps, scale, offset):
    from jax import lax

    return (h - mean) * lax.rsqrt(var + eps) * scale.astype(h.dtype) + offset.astype(h.dtype)


def _batchnorm(layer, h, ctx):
    if not ctx.train or layer.name in ctx.frozen:
        mean, var = ctx.p(layer, "running_mean"), ctx.p(layer, "running_var")
    else:
        axes = tuple(range(h.ndim - 1))
        # Biased variance, for normalising and for the running one. With data-parallel
        # replicas h is sharded along the batch axis, and GSPMD reduces over the whole
        # logical array (per-replica partial sums, then an all-reduce): these are the
        # synchronized global-batch statistics the project pins, what one device computes.
        # tests/test_data_parallel_jax.py checks it on cifar-resnet-bn (N=2 equals N=1).
        mean, var = h.mean(axes), h.var(axes)
        m = layer.momentum
        ctx.state[f"{layer.name}.running_mean"] = (1 - m) * ctx.p(layer, "running_mean") + m * mean
        ctx.state[f"{layer.name}.running_var"] = (1 - m) * ctx.p(layer, "running_var") + m * var
    return _normalise(h, mean.astype(h.dtype), var.astype(h.dtype), layer.eps, ctx.p(layer, "scale"),
                      ctx.p(layer, "offset"))


def _layernorm(layer, h, ctx):
    mean, var = h.mean(-1, keepdims=True), h.var(-1, keepdims=True)
    return _normalise(h, mean, var, layer.eps, ctx.p(layer, "scale"), ctx.p(layer, "offset"))


def _dropout(layer, h, ctx):
    import jax

    if not ctx.train or layer.rate == 0:
        return h
    ctx.dropouts += 1
    # Under jit a random array's values never depend on its sharding, so replicas that
    # split the batch draw the mask one device does (mnist-mlp-ln: N=2 equals N=1 with
    # jax_threefry_partitionable on, jax's default since 0.5, and off).
    keep = jax.random.bernoulli(jax.random.fold_in(ctx.key, ctx.dropouts), 1 - layer.rate, h.shape)
    return jax.numpy.where(keep, h / (1 - layer.rate), 0).astype(h.dtype)


def _embedding(layer, h, ctx):
    return ctx.p(layer, "table")[h]


def _positional(layer, h, ctx):
    return h + ctx.p(layer, "table")[: h.shape[1]].astype(h.dtype)


def _lora(layer, ctx, target, x):
    """The spec's LoRA term of projection `target` on its input x (tasks/layers.py), 0 where LoRA does not adapt it."""
    import jax

    if not layer.lora_adapts(target):
        return 0
    return layer.lora(target, x, ctx.p(layer, f"{target}_lora_a").astype(x.dtype),
                      ctx.p(layer, f"{target}_lora_b").astype(x.dtype), einsum=jax.numpy.einsum)


def attention_qkv(layer, h, ctx):
    """q, k, v of (b, t, d) inputs, each (b, t, heads, head_dim)."""
    import jax
    jnp = jax.numpy

    return tuple(jnp.einsum("btd,dhk->bthk", h, ctx.p(layer, f"{n}_kernel").astype(h.dtype))
                 + ctx.p(layer, f"{n}_bias").astype(h.dtype) + _lora(layer, ctx, n, h)
                 for n in ("query", "key", "value"))


def attention_out(layer, o, ctx):
    """The output projection of attention values o (b, t, heads, head_dim): (b, t, d)."""
    import jax
    jnp = jax.numpy

    return (jnp.einsum("bqhk,hkd->bqd", o, ctx.p(layer, "out_kernel").astype(o.dtype)) + ctx.p(layer, "out_bias")
            + _lora(layer, ctx, "out", o))


def _attention(layer, h, ctx):
    q, k, v = attention_qkv(layer, h, ctx)
    return attention_out(layer, _dot_product_attention(q, k, v, causal=layer.causal), ctx)


# Attention: jax.nn.dot_product_attention's cuDNN kernel in bf16/fp16 on a GPU, the einsums below
# elsewhere (XLA's op is no faster on a CPU; measured in docs/performance.md).
_FUSED_DTYPES = ("bfloat16", "float16")
_fused_refused: set = set()  # shapes/dtypes cuDNN refused, warned about once each


def _dot_product_attention(q, k, v, *, causal: bool):
    """softmax(q k^T / sqrt(head_dim) [causal]) v over (batch, seq, heads, head_dim) arrays."""
    import jax
    jnp = jax.numpy

    if jax.default_backend() == "gpu" and q.dtype.name in _FUSED_DTYPES:
        try:
            return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn")
        except (NotImplementedError, RuntimeError, ValueError, TypeError) as exc:
            key = (q.shape, q.dtype.name)
            if key not in _fused_refused:
                _fused_refused.add(key)
                log.warning("jax: cuDNN attention refused %s %s (%s); using XLA einsums", q.shape, q.dtype, exc)
    # Scores and softmax in at least float32 whatever the compute dtype (as torch's kernels and jax's
    # own op do): bf16 scores would round the softmax's inputs to 3 significant digits.
    score_dtype = jnp.promote_types(q.dtype, jnp.float32)
    scores = jnp.einsum("bqhk,bshk->bhqs", q, k, preferred_element_type=score_dtype)
    scores = scores / np.sqrt(q.shape[-1]).astype(score_dtype)
    if causal:
        t = q.shape[1]
        scores = jnp.where(jnp.tril(jnp.ones((t, t), bool)), scores, jnp.finfo(scores.dtype).min)
    return jnp.einsum("bhqs,bshk->bqhk", jax.nn.softmax(scores, axis=-1).astype(v.dtype), v)


def _residual(layer, h, ctx):
    return h + _run(layer.body, h, ctx)


@functools.cache
def _window_max(p: int):
    """Max over non-overlapping p x p windows of NHWC input ("VALID"), as strided slices; jax-differentiable.

    The gradient goes to each window's first maximum in row-major order, as torch's, TensorFlow's
    and lax.reduce_window's (select-and-scatter) max-pool gradients send it. Not reduce_window:
    on XLA:CPU its gradient becomes a reduce-window over the input and four int32 iotas of its
    size plus a scatter (issue 13, jax.profiler over a 24-step cifar-cnn window of 3.1 s: the
    iotas alone 0.87 s of per-op time). Here both directions are element-wise over the p*p
    strided views, which XLA fuses: the CNN's CPU step went from 960 to 1,500 samples/s (10
    interleaved rounds); on an H200 164k against 162k, no change.
    """
    import jax
    import jax.numpy as jnp

    def taps(h):
        rows, cols = h.shape[1] // p * p, h.shape[2] // p * p
        return [h[:, i:rows:p, j:cols:p, :] for i in range(p) for j in range(p)]

    @jax.custom_vjp
    def window_max(h):
        return functools.reduce(jnp.maximum, taps(h))

    def forward(h):
        out = window_max(h)
        return out, (h, out)

    def backward(saved, g):
        h, out = saved
        taken = jnp.zeros(out.shape, bool)
        parts = []
        for tap in taps(h):
            first = (tap == out) & ~taken
            taken = taken | first
            parts.append(jnp.where(first, g, jnp.zeros_like(g)))
        n, rows, cols, c = out.shape
        # (n, rows, cols, i*p+j, c) -> (n, rows, i, cols, j, c): the taps back in their places.
        grid = jnp.stack(parts, axis=3).reshape(n, rows, cols, p, p, c).transpose(0, 1, 3, 2, 4, 5)
        dense = grid.reshape(n, rows * p, cols * p, c)
        return (jnp.pad(dense, ((0, 0), (0, h.shape[1] - rows * p), (0, h.shape[2] - cols * p), (0, 0))),)

    window_max.defvjp(forward, backward)
    return window_max


def _maxpool(layer, h, ctx):
    return _window_max(layer.pool_size)(h)


# The one map from spec layer kinds to jax: functions of (layer, input, context) over the
# canonical arrays, which are flax's own layout (Dense (in, out), Conv HWIO on NHWC,
# attention (dim, heads, head_dim)), so weights load and export without conversion.
LAYERS = {
    "dense": _dense, "activation": lambda layer, h, ctx: _activation(layer.activation, h),
    "conv2d": _conv2d, "maxpool2d": _maxpool,
    "avgpool2d": _avgpool, "globalavgpool2d": lambda layer, h, ctx: h.mean(axis=(1, 2)),
    "flatten": lambda layer, h, ctx: h.reshape(h.shape[0], -1),  # NHWC row-major: the canonical order
    "reshape": lambda layer, h, ctx: h.reshape(h.shape[0], *layer.target_shape),
    "batchnorm": _batchnorm, "layernorm": _layernorm, "dropout": _dropout, "embedding": _embedding,
    "positionalembedding": _positional, "multiheadselfattention": _attention, "residual": _residual,
}

SCAN_UNROLL = 1
# XLA:CPU (jaxlib 0.10.2) runs convolutions inside a while loop ~20x slower than the same
# convolutions in a straight-line jit (measured: CNN 40 vs 850 samples/s; again after the
# max pool stopped scattering, issue 13: 155 vs 1,492, 5 epochs of 3,072), so on CPU a
# model with convolutions runs "compiled" as jitted steps over device-resident data.
SCAN_CONV_ON_CPU = False


# Every optimizer kind of tasks/optim.py, as (optax, optimizer spec, lr schedule, decay mask) -> transformation.
OPTIMIZERS = {
    "sgd": lambda optax, o, lr, decays: optax.sgd(lr, momentum=o.momentum or None, nesterov=o.nesterov),
    # optax.adam: p -= lr * m_hat / (sqrt(v_hat) + eps), the spec's "sqrt_v_hat"; eps_root stays 0.
    "adam": lambda optax, o, lr, decays: optax.adam(lr, b1=o.beta1, b2=o.beta2, eps=o.eps, eps_root=0.0),
    # optax.adamw: p -= lr * (adam + weight_decay * p), torch's decoupled decay.
    "adamw": lambda optax, o, lr, decays: optax.adamw(lr, b1=o.beta1, b2=o.beta2, eps=o.eps, eps_root=0.0,
                                                      weight_decay=o.weight_decay, mask=decays),
}


def _optimizer(o, decays: dict[str, bool]):
    """optax for the spec's optimizer: the same formulas tasks/optim.py pins (optax's own forms).

    decays: trainable array name -> whether AdamW's weight decay applies to it (optax's mask)."""
    import jax.numpy as jnp
    import optax

    table = jnp.asarray(o.lr_table(), jnp.result_type(float))  # float64 under fp64 (jax_enable_x64)

    def lr(count):
        return table[jnp.minimum(count, len(table) - 1)]

    opt = OPTIMIZERS[o.kind](optax, o, lr, decays)
    return opt if o.clip_norm is None else optax.chain(optax.clip_by_global_norm(o.clip_norm), opt)


@dataclass
class _Data:
    x: Any  # device float32 (fp64: float64) NHWC, or int32 token ids
    y: Any  # device int32
    n: int
    eval_index: dict = field(default_factory=dict)  # batch_size -> (index, mask) on device


@dataclass
class _Model(ModelHandle):
    train_names: tuple[str, ...]  # canonical names the optimizer updates
    train_params: dict
    frozen_params: dict  # learned arrays that do not train, and running statistics
    opt: Any
    opt_state: Any
    step: Any  # jitted one-step function (eager mode)
    epoch: Any  # jitted fused epoch (compiled mode)
    evaluate: Any
    forward: Any
    steps_done: Any = None  # device int32: steps taken, the dropout stream's counter
    executables: dict = field(default_factory=dict)  # shapes -> compiled epoch
    fused: bool = True  # compiled mode runs the epoch as one lax.scan


class JaxBackend(Backend):
    name = "jax"
    LAYERS = LAYERS
    ACTIVATIONS = ACTIVATIONS
    OPTIMIZERS = OPTIMIZERS
    EXECUTIONS = {"eager": "jax.jit step", "compiled": "jax lax.scan epoch"}

    def __init__(self):
        self._jax = None
        self._device = None  # the first replica device: the one environment() names
        self._devices = ()  # one per data-parallel replica
        self._placement = None  # where arrays live: the device, or replicated over the mesh
        self._batch_sharding = None  # NamedSharding of a global batch over the mesh; None with one replica
        self._threads = None
        self._precision = None
        self._last = None  # the last result dispatched, for synchronize()
        self._compute_dtype = None
        self._programs = collections.OrderedDict()  # what a model's programs depend on -> (optimizer, jitted fns)

    # -- set-up --------------------------------------------------------------------------

    def import_framework(self) -> None:
        # Importing starts no XLA client: the flags _configure sets are read at first use, after it.
        import flax.linen  # noqa: F401
        import jax  # noqa: F401
        import optax  # noqa: F401

    def _configure(self, *, device: str, threads: int, precision: str) -> None:
        import sys

        already = "jax" in sys.modules
        count = self.replicas.count
        if count > 1 and device != "gpu":
            # N logical host devices for N replicas on a CPU. XLA reads this when jax starts
            # its CPU client (first use, not import), so it must be in place before then;
            # a process that already started jax with fewer devices is refused below.
            flags = re.sub(rf"{_HOST_DEVICES_FLAG}=\S*", "", os.environ.get("XLA_FLAGS", ""))
            os.environ["XLA_FLAGS"] = f"{flags.strip()} {_HOST_DEVICES_FLAG}={count}".strip()
        # These only take effect before jax initialises its backends; a worker process
        # configures first, so they do. Tests that imported jax earlier keep its settings.
        os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"  # no up-front grab of 75% of GPU memory
        platforms = os.environ.get("JAX_PLATFORMS")
        if device == "cpu":
            os.environ["JAX_PLATFORMS"] = "cpu"
        elif device == "gpu":
            os.environ["JAX_PLATFORMS"] = "cuda"
        if threads == 1:
            # The only thread setting XLA:CPU honours reliably; larger intra-op counts in
            # XLA_FLAGS are ignored or crash some versions, so >1 means "all cores".
            # (No "intra_op_parallelism_threads=1": it is no XLA flag, and XLA ignored every
            # flag written after it, the host device count included.)
            flags = os.environ.get("XLA_FLAGS", "")
            if "--xla_cpu_multi_thread_eigen" not in flags:
                os.environ["XLA_FLAGS"] = f"{flags} --xla_cpu_multi_thread_eigen=false".strip()
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
            # Child processes inherit the environment: do not leave them a platform that is not here.
            if platforms is None:
                os.environ.pop("JAX_PLATFORMS", None)
            else:
                os.environ["JAX_PLATFORMS"] = platforms
            raise BackendUnavailable(f"jax: device {device!r} is not available here ({exc or 'no such platform'}); "
                                     "a GPU needs jax[cuda12] and a visible NVIDIA device") from None
        if not devices:
            raise BackendUnavailable(f"jax: no {device} device found")
        if len(devices) < count:
            platform = devices[0].platform
            if platform == "cpu" and already:
                raise BackendUnavailable(
                    f"jax: {count} replicas need {count} CPU devices, but jax was initialised in this process "
                    f"before configure() with {len(devices)}; configure in a fresh process, or set "
                    f"XLA_FLAGS={_HOST_DEVICES_FLAG}={count} before jax is imported")
            raise BackendUnavailable(f"jax: {count} replicas need {count} {platform} devices; "
                                     f"only {len(devices)} exist here")
        self._devices = tuple(devices[:count])
        self._device = devices[0]
        if count > 1:
            from jax.sharding import Mesh, NamedSharding, PartitionSpec

            mesh = Mesh(np.array(self._devices), (DATA_AXIS,))
            # Parameters, optimizer state and datasets are replicated (PartitionSpec()):
            # only the batch is split, so XLA's GSPMD partitions each step along the batch
            # axis and inserts the gradient all-reduce itself.
            self._placement = NamedSharding(mesh, PartitionSpec())
            self._batch_sharding = NamedSharding(mesh, PartitionSpec(DATA_AXIS))
        else:
            self._placement = self._device
        if self._device.platform == "cpu" and precision == "tf32":
            log.warning("jax: tf32 asked for on CPU, where matmuls run in float32 anyway")
        jax.config.update("jax_default_matmul_precision", _MATMUL_PRECISION[precision])
        jax.config.update("jax_enable_x64", precision == "fp64")  # without it jax has no float64
        self._compute_dtype = {"bf16": jax.numpy.bfloat16, "fp64": jax.numpy.float64}.get(precision, jax.numpy.float32)
        self._jax = jax
        self._precision = precision
        self._threads = threads if threads == 1 else (os.cpu_count() if self._device.platform == "cpu" else threads)
        if threads not in (1, os.cpu_count()) and self._device.platform == "cpu":
            log.warning("jax: XLA:CPU cannot pin %d threads; it uses all %d cores", threads, os.cpu_count())

    def _environment(self) -> dict:
        """The base's fields; with replicas > 1 also "replica_devices", one string per replica
        device in rank order (absent with one replica, so a one-device record is unchanged)."""
        jax = self._jax
        import flax
        import jaxlib
        import optax

        env = {
            "framework": "jax",
            "framework_version": f"{jax.__version__} (jaxlib {jaxlib.__version__}, "
                                 f"flax {flax.__version__}, optax {optax.__version__})",
            "device": "cpu" if self._device.platform == "cpu" else "gpu",
            "device_name": self._device.device_kind,
            "threads": self._threads,
            "precision": self._precision,
        }
        if len(self._devices) > 1:
            env["replica_devices"] = [str(d) for d in self._devices]
        return env

    def _synchronize(self) -> None:
        if self._last is not None:
            self._jax.block_until_ready(self._last)

    @staticmethod
    def _peak_mb(device) -> float | None:
        try:
            stats = device.memory_stats()
        except (NotImplementedError, RuntimeError, AttributeError):
            return None
        if not stats or "peak_bytes_in_use" not in stats:
            return None  # XLA:CPU keeps no allocator statistics
        return stats["peak_bytes_in_use"] / 2**20

    def _memory(self) -> dict:
        """device_peak_mb is the first replica device's (as a replica process's rank 0 reports
        its own); with replicas > 1, "replica_peak_mb" lists every replica device's, in rank order."""
        out = {"device_peak_mb": None if self._device is None else self._peak_mb(self._device)}
        if len(self._devices) > 1:
            out["replica_peak_mb"] = [self._peak_mb(d) for d in self._devices]
        return out

    def _put(self, tree):
        """Host arrays (or a pytree of them) onto the device, or replicated on every replica device."""
        return self._jax.device_put(tree, self._placement)

    # -- model ---------------------------------------------------------------------------

    def _put_data(self, x: np.ndarray, y: np.ndarray) -> _Data:
        # Replicated on every replica device: each step gathers a random subset of the
        # whole set, so every device would need the rows of any slice anyway; a local
        # gather costs no per-step communication, and the set fits one device already.
        return _Data(self._put(x), self._put(y), len(x))

    def _split(self, model_spec: TaskSpec, weights: list[np.ndarray], train_names) -> tuple[dict, dict]:
        """(trainable, frozen) dicts of device arrays by canonical name, from canonical weights."""
        # Own copies: the epoch donates parameter buffers, which must never alias a caller's array.
        params = {e.name: self._put(np.array(w, self.float_dtype, copy=True))
                  for e, w in zip(model_spec.params(), weights)}
        return ({n: params[n] for n in train_names}, {n: a for n, a in params.items() if n not in train_names})

    def _runs_as(self, spec: TaskSpec, mode: str) -> str:
        # With convolutions on a CPU, "compiled" dispatches the eager program's jitted steps (SCAN_CONV_ON_CPU).
        if mode == "compiled" and not SCAN_CONV_ON_CPU and self._device.platform == "cpu" \
                and any(layer.kind == "conv2d" for layer, _, _ in spec.walk()):
            return "eager"
        return mode

    def _build(self, spec: TaskSpec, weights: list[np.ndarray], *,
               trainable: tuple[str, ...] | None, mode: str) -> _Model:
        train_names = tuple(e.name for e in spec.params()
                            if spec.trains(e, trainable))
        frozen_layers = frozenset(n for n in spec.param_layer_names() if trainable is not None and n not in trainable)
        opt, fns = self._programs_for(spec, train_names, frozen_layers)
        model = _Model(fused=mode == "compiled", spec=spec, mode=mode, trainable_layers=trainable,
                       train_names=train_names, train_params={}, frozen_params={}, opt=opt, opt_state=None, **fns)
        self._set_weights(model, weights)
        return model

    def _programs_for(self, spec: TaskSpec, train_names: tuple[str, ...], frozen_layers: frozenset) -> tuple:
        """(optimizer, jitted functions) for a model: the same objects for a model that trains the same
        arrays of the same layers with the same optimizer, so jax.jit's cache serves its compiles again."""
        key = (spec.layers, spec.seed, spec.optimizer, train_names, frozen_layers, str(self._compute_dtype))
        if key not in self._programs:
            opt = _optimizer(spec.optimizer, {e.name: spec.decays(e) for e in spec.params() if e.name in train_names})
            self._programs[key] = opt, {**self._functions(spec, opt, frozen_layers), "executables": {}}
            while len(self._programs) > _PROGRAMS_KEPT:
                self._programs.popitem(last=False)
        self._programs.move_to_end(key)
        return self._programs[key]

    def _functions(self, spec: TaskSpec, opt, frozen_layers: frozenset) -> dict:
        jax = self._jax
        jnp = jax.numpy
        import optax
        from jax import lax

        layers = spec.layers
        compute_dtype, out_dtype = self._compute_dtype, self.float_dtype
        base_key = jax.random.PRNGKey(spec.seed)
        batch_sharding = self._batch_sharding

        def split(a):
            # Replica r takes the r-th contiguous slice of the global batch (axis 0); the
            # losses below stay means over the global batch, so GSPMD all-reduces the
            # gradients and every replica applies the update one device would.
            return a if batch_sharding is None else lax.with_sharding_constraint(a, batch_sharding)

        def gather(x, rows):
            # Splitting the row indices first makes each replica gather only its own rows
            # from its replicated copy of the dataset.
            return split(jnp.take(x, split(rows), axis=0))

        def forward(params, x, train=False, key=None):
            ctx = _Ctx(params, train=train, frozen=frozen_layers, key=key)
            h = x.astype(compute_dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x
            return _run(layers, h, ctx).astype(out_dtype), ctx.state

        def cross_entropy(logits, y):
            return optax.softmax_cross_entropy_with_integer_labels(logits, y)

        def loss_fn(train_params, frozen_params, count, x, y):
            logits, state = forward({**frozen_params, **train_params}, x, True, jax.random.fold_in(base_key, count))
            return cross_entropy(logits, y).mean(), state

        def step(train_params, frozen_params, count, opt_state, x, y):
            # Only the trainable subtree is differentiated: XLA drops the frozen layers'
            # weight gradients, and the backward pass stops at the first trainable layer.
            (loss, state), grads = jax.value_and_grad(loss_fn, has_aux=True)(train_params, frozen_params, count, x, y)
            updates, opt_state = opt.update(grads, opt_state, train_params)
            return optax.apply_updates(train_params, updates), {**frozen_params, **state}, count + 1, opt_state, loss

        def eager_step(train_params, frozen_params, count, opt_state, losses, x, y, index, i):
            # Each step writes its loss into the epoch's loss buffer (donated off CPU): stacking the
            # per-step scalars afterwards compiled a stack of `steps` operands inside the
            # first timed epoch (H100: first eager MLP epoch at 64k samples/s, then 670k).
            rows = lax.dynamic_index_in_dim(index, i, keepdims=False)
            *state, loss = step(train_params, frozen_params, count, opt_state, gather(x, rows), gather(y, rows))
            return (*state, losses.at[i].set(loss))

        def epoch(train_params, frozen_params, count, opt_state, x, y, index):
            def body(carry, rows):
                tp, fp, c, st = carry
                tp, fp, c, st, loss = step(tp, fp, c, st, gather(x, rows), gather(y, rows))
                return (tp, fp, c, st), loss

            carry, losses = lax.scan(body, (train_params, frozen_params, count, opt_state), index, unroll=SCAN_UNROLL)
            return (*carry, losses)

        def evaluate(params, x, y, index, mask):
            # index/mask: (batches, batch_size); the last batch is padded with a valid row
            # and masked out, so one compiled body serves every batch. With replicas the
            # batches split like training's, and the sums are over the global batch.
            def body(carry, inputs):
                rows, m = inputs
                logits, _ = forward(params, gather(x, rows))
                yb, m = gather(y, rows), split(m)
                m = m.reshape(m.shape + (1,) * (yb.ndim - 1))  # per-position labels: mask every position
                correct = (jnp.argmax(logits, axis=-1) == yb).astype(out_dtype)
                return (carry[0] + jnp.sum(cross_entropy(logits, yb) * m), carry[1] + jnp.sum(correct * m)), None

            (loss_sum, correct), _ = lax.scan(body, (jnp.zeros((), out_dtype), jnp.zeros((), out_dtype)), (index, mask))
            return loss_sum, correct

        # With replicas every output is pinned replicated, as the inputs are: the next call
        # then has the same argument shardings and hits the same compiled step.
        out = {} if batch_sharding is None else {"out_shardings": self._placement}
        return {
            # Donate parameters, state and optimizer state: updated in place, no second copy.
            # Not the eager step on a CPU: there donation made the CNN's step 4.5-7% slower
            # (issue 13; 3 interleaved A/Bs on 49,920 samples, 48-step windows: 949 vs 991,
            # 873 vs 938, 967 vs 1,013 samples/s) although its program differs only by 9
            # small copies (0.49 MB), and host memory has room for one more copy of the state.
            "step": jax.jit(eager_step, donate_argnums=self._eager_donation(), **out),
            "epoch": jax.jit(epoch, donate_argnums=(0, 1, 3), **out),
            "evaluate": jax.jit(evaluate),
            "forward": jax.jit(lambda params, x: forward(params, x)[0]),
        }

    def _eager_donation(self) -> tuple[int, ...]:
        """The eager step's donated arguments: parameters, state, optimizer state and loss buffer, except on a CPU."""
        return () if self._device.platform == "cpu" else (0, 1, 3, 4)

    def _get_weights(self, model: _Model) -> list[np.ndarray]:
        params = {**model.frozen_params, **model.train_params}
        return [np.array(params[e.name], self.float_dtype, copy=True) for e in model.spec.params()]

    def _set_weights(self, model: _Model, weights: list[np.ndarray]) -> None:
        model.train_params, model.frozen_params = self._split(model.spec, weights, model.train_names)
        model.opt_state = self._init_state(model.opt, model.train_params)
        model.steps_done = self._put(np.int32(0))

    def _init_state(self, opt, train_params):
        # Committed to the device like every step's output: an uncommitted first state
        # gives the eager step a second jit signature and a recompile in the first epoch.
        return self._put(opt.init(train_params))

    # -- primitive steps -----------------------------------------------------------------

    def _index(self, order: np.ndarray, batch_size: int):
        index = np.ascontiguousarray(order.reshape(len(order) // batch_size, batch_size), dtype=np.int32)
        return self._put(index)  # one upload per epoch

    def _eager_chunks(self, order: np.ndarray, batch_size: int) -> list:
        """The epoch's batch rows as device arrays of _EAGER_CHUNK steps each, the last padded with row 0."""
        steps = len(order) // batch_size
        padded = np.zeros((-(-steps // _EAGER_CHUNK) * _EAGER_CHUNK, batch_size), np.int32)
        padded[:steps] = order[: steps * batch_size].reshape(steps, batch_size)
        return [self._put(chunk) for chunk in padded.reshape(-1, _EAGER_CHUNK, batch_size)]

    @staticmethod
    def _state(model: _Model) -> tuple:
        return model.train_params, model.frozen_params, model.steps_done, model.opt_state

    def _epoch_executable(self, model: _Model, data: _Data, index):
        # The scan's code depends on the step count, so executables are cached by shapes.
        key = (index.shape, data.x.shape, data.y.shape)
        exe = model.executables.get(key)
        if exe is None:
            exe = model.epoch.lower(*self._state(model), data.x, data.y, index).compile()
            model.executables[key] = exe
        return exe

    def _loss_buffer(self, index):
        # Committed like the step's outputs, so the first step hits the warmed jit entry.
        return self._put(np.zeros(index.shape[0], self.float_dtype))

    def _train_epoch(self, model: _Model, data: _Data, order: np.ndarray, batch_size: int) -> np.ndarray:
        if model.fused:
            index = self._index(order, batch_size)
            *state, losses = self._epoch_executable(model, data, index)(*self._state(model), data.x, data.y, index)
            buffers = [losses]
        else:
            state, buffers = self._eager_epoch(model, data, order, batch_size)
        model.train_params, model.frozen_params, model.steps_done, model.opt_state = state
        self._last = buffers[-1]
        # The epoch's one wait: the host reads the losses after its last step is dispatched.
        return np.concatenate([np.asarray(b, dtype=self.float_dtype) for b in buffers])[: len(order) // batch_size]

    def _eager_epoch(self, model: _Model, data: _Data, order: np.ndarray, batch_size: int) -> tuple[list, list]:
        """Dispatch the epoch's steps one jitted step at a time; returns (state, loss buffers of each chunk)."""
        state, steps, buffers = list(self._state(model)), len(order) // batch_size, []
        # Step counters of the steps still in flight; bounded only with replicas on a CPU.
        window = collections.deque()
        bounded = len(self._devices) > 1 and self._device.platform == "cpu"
        for first, chunk in zip(range(0, steps, _EAGER_CHUNK), self._eager_chunks(order, batch_size)):
            losses = self._loss_buffer(chunk)
            for i in range(min(_EAGER_CHUNK, steps - first)):
                *state, losses = model.step(*state, losses, data.x, data.y, chunk, i)
                if bounded:
                    window.append(state[2])  # the step counter: not donated, so it outlives the next step
                    if len(window) > _CPU_MAX_STEPS_IN_FLIGHT:
                        window.popleft().block_until_ready()
            buffers.append(losses)
        return state, buffers

    def _warm_key(self, model: _Model, order: np.ndarray, batch_size: int, eval_batch_size: int) -> tuple:
        # The fused epoch takes the epoch's index whole; the eager step takes a chunk of any epoch's.
        return len(order) // batch_size if model.fused else None, batch_size, eval_batch_size

    def _warmup(self, model: Any, data: Any, order: np.ndarray, batch_size: int,
                eval_data: Any, eval_batch_size: int) -> None:
        """Compile what the epoch runs without running a training step.

        Compiled mode lowers and compiles the fused epoch for its length ahead of time (the
        executable is cached by shapes); eager mode runs its step once on throw-away copies of the state,
        since donation (off a CPU) would otherwise consume the model's buffers. Evaluation runs once.
        """
        self._require_configured()
        jax = self._jax
        if model.fused:
            self._epoch_executable(model, data, self._index(np.asarray(order), batch_size))
        else:
            # Committed copies on the model's device, so that the call's signature (and the
            # jit cache entry it fills) is the one train_epoch will use.
            copy = jax.tree_util.tree_map(lambda a: self._put(a.copy()), self._state(model))
            chunk = self._eager_chunks(np.asarray(order)[:batch_size], batch_size)[0]
            self._last = model.step(*copy, self._loss_buffer(chunk), data.x, data.y, chunk, 0)
        self.evaluate(model, eval_data, eval_batch_size)
        self.synchronize()

    def _evaluate(self, model: _Model, data: _Data, batch_size: int) -> tuple[float, float]:
        if data.n == 0:
            raise ValueError("evaluate on an empty dataset")
        cached = data.eval_index.get(batch_size)
        if cached is None:
            # With replicas the batch is rounded up to split evenly (by at most N - 1 masked
            # rows): evaluation pads and masks anyway, so only the padding changes.
            width = -(-batch_size // self.replicas.count) * self.replicas.count
            batches = -(-data.n // width)
            flat = np.arange(batches * width)
            mask = (flat < data.n).astype(self.float_dtype).reshape(batches, width)
            index = np.minimum(flat, data.n - 1).astype(np.int32).reshape(batches, width)
            cached = (self._put(index), self._put(mask))
            data.eval_index[batch_size] = cached
        params = {**model.frozen_params, **model.train_params}
        loss_sum, correct = model.evaluate(params, data.x, data.y, *cached)
        self._last = correct
        count = data.n * int(np.prod(data.y.shape[1:]))  # every position of every sample
        return float(loss_sum) / count, float(correct) / count

    def _export(self, model: _Model, fmt: str, folder):
        from backends.jax_export import export

        return export(self, model, fmt, folder=folder)

    def _generator(self, model: _Model, *, batch: int, prompt_len: int, new_tokens: int):
        from backends.jax_generate import generator

        return generator(self, model, batch=batch, prompt_len=prompt_len, new_tokens=new_tokens)

    def _inference(self, model: _Model) -> InferencePath:
        jax = self._jax
        params = {**model.frozen_params, **model.train_params}

        def put(x):
            return jax.block_until_ready(self._put(x))

        def run(x):
            return jax.block_until_ready(model.forward(params, x))

        # Both modes serve the same jitted forward pass: they differ in how training dispatches steps.
        return InferencePath(put=put, run=run, name="jax.jit forward")

    def _logits(self, model: _Model, x: np.ndarray) -> np.ndarray:
        params = {**model.frozen_params, **model.train_params}
        # Replicated, not split: a parity check's batch need not divide by the replica count.
        out = model.forward(params, self._put(x))
        self._last = out
        return np.array(out, self.float_dtype)
