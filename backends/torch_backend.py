"""PyTorch adapter: a TaskSpec as functional torch ops over parameters in torch layouts; replicas through DDP."""

from __future__ import annotations

import atexit
import datetime
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from backends.base import Backend, BackendUnavailable, InferencePath, ModelHandle
from tasks.spec import TaskSpec

# Memory format of the 4-D activations: channels_last (NHWC in memory, logical NCHW).
# Measured on the cifar-cnn training step (batch 128, fused Adam, 2 threads, torch 2.13,
# on the shared 2-core CPU while other benchmarks ran: 25 interleaved chunks of 4 steps,
# samples/s): NCHW best 486 / p90 401 / median 269, channels_last best 647 / p90 566 /
# median 350, i.e. ~1.3x for channels_last; it also makes the NHWC input a free view.
# (compiled mode with channels_last was slower still: see _make_steps.)
CHANNELS_LAST = True

# How long a replica process waits for its peers in a collective (process-group set-up
# included) before it raises: finite, so a replica that died or hangs cannot block the
# others forever, and long enough for the slowest peer's first compile (torch.compile on
# a loaded CPU takes tens of seconds) or a dataset load before the first collective.
REPLICA_TIMEOUT_S = 300.0
REPLICA_TIMEOUT_ENV = "TRIBENCH_REPLICA_TIMEOUT_S"  # overrides it (the fault tests set a short one)


def _flush_denormals(torch) -> bool:
    """Flushes float32 denormals to zero on this thread and every OpenMP worker; True when a probe shows all do."""
    if not torch.set_flush_denormal(True):
        return False  # the CPU has no denormals-are-zero mode
    # The flag lives per thread (x86 MXCSR) and a new thread starts with its creator's, so
    # workers started before this call keep theirs: measured on 8M denormals over 2 threads,
    # 4M came out unflushed when any parallel op had run first. Run the flag on each worker.
    import ctypes

    set_flag = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(lambda _: torch.set_flush_denormal(True))
    for runtime in _openmp_runtimes():
        runtime.GOMP_parallel(set_flag, None, ctypes.c_uint(torch.get_num_threads()), ctypes.c_uint(0))
    return _denormals_survive(torch) == 0


def _denormals_survive(torch) -> int:
    """How many of a parallel multiply's denormal inputs come out non-zero (0 when every worker flushes)."""
    # Built and compared as bits: a float 1e-39 converted, or compared with 0, on a flushing
    # thread is 0 already, which would make the probe pass whatever the workers do.
    tiny = torch.ones(max(torch.get_num_threads(), 1) * 65536, dtype=torch.int32).view(torch.float32)
    return int((tiny * 1.0).view(torch.int32).count_nonzero())


def _openmp_runtimes() -> list:
    """The OpenMP runtimes loaded in this process (GNU, LLVM and Intel all export GOMP_parallel); none off Linux."""
    import ctypes

    try:
        with open("/proc/self/maps") as maps:
            paths = sorted({line.split()[-1] for line in maps if "/" in line})
    except OSError:
        return []  # not Linux: the calling thread and the workers it starts later are flushed
    runtimes = [ctypes.CDLL(p) for p in paths if os.path.basename(p).startswith(("libgomp", "libomp", "libiomp5"))]
    return [r for r in runtimes if hasattr(r, "GOMP_parallel")]


class _Ctx:
    """What a layer function may need beyond its input: parameters, mode, frozen layers, and the
    data-parallel replicas a training step's batch statistics span (replica_sum: the collective)."""

    def __init__(self, params: dict, *, train: bool, frozen: frozenset, replicas: int = 1, replica_sum=None):
        self.params, self.train, self.frozen = params, train, frozen
        self.replicas, self.replica_sum = replicas, replica_sum

    def p(self, layer, name: str):
        return self.params[f"{layer.name}.{name}"]


def _run(layers, h, ctx: _Ctx):
    for layer in layers:
        h = LAYERS[layer.kind].forward(layer, h, ctx)
    return h


# Every activation the spec names, as (torch.nn.functional, tensor) -> tensor; base.build checks coverage.
ACTIVATIONS = {
    "linear": lambda F, v: v, "relu": lambda F, v: F.relu(v), "tanh": lambda F, v: F.tanh(v),
    "silu": lambda F, v: F.silu(v), "gelu": lambda F, v: F.gelu(v, approximate="none"),
    "gelu_tanh": lambda F, v: F.gelu(v, approximate="tanh"),
}


def _activation(name: str, h):
    import torch.nn.functional as F

    return ACTIVATIONS[name](F, h)


def _dense(layer, h, ctx):
    import torch.nn.functional as F

    # A tied head: the embedding's (vocab, dim) table is already F.linear's (out, in) weight.
    weight = ctx.params[f"{layer.tied_to}.table"] if layer.tied_to else ctx.p(layer, "kernel")
    return _activation(layer.activation, F.linear(h, weight, ctx.p(layer, "bias") if layer.use_bias else None))


def _same_padding(size: int, k: int, s: int) -> tuple[int, int]:
    """TensorFlow's "same": total padding split with the odd row/column at the end."""
    total = max((-(-size // s) - 1) * s + k - size, 0)
    return total // 2, total - total // 2


def _conv2d(layer, h, ctx):
    import torch.nn.functional as F

    k, s, padding = layer.kernel_size, layer.stride, 0
    if layer.padding == "same":
        (top, bottom), (left, right) = (_same_padding(n, k, s) for n in h.shape[2:])
        if (top, left) == (bottom, right):
            padding = (top, left)
        else:  # torch pads symmetrically only
            h = F.pad(h, (left, right, top, bottom))
    y = F.conv2d(h, ctx.p(layer, "kernel"), ctx.p(layer, "bias"), stride=s, padding=padding)
    return _activation(layer.activation, y)


def _channel_view(h, v):
    """A per-channel vector shaped to broadcast against h: channels are dim 1 of NCHW, else last."""
    return v.view(1, -1, 1, 1) if h.dim() == 4 else v


def _replica_sum_op():
    """A differentiable sum over the replica processes (its backward sums the gradients likewise).

    torch's functional all_reduce, which torch 2.13 gives an autograd formula and which
    torch.compile traces; torch 2.13 deprecates torch.distributed.nn.functional.all_reduce
    in its favour, and that one refuses to run under torch.compile. A torch whose
    functional all_reduce has no gradient would silently drop it: refuse instead.
    """
    import torch
    import torch.distributed as dist

    if not torch._C._dispatch_has_kernel_for_dispatch_key("_c10d_functional::all_reduce", "Autograd"):
        raise BackendUnavailable(f"torch {torch.__version__}: data-parallel BatchNorm needs a differentiable "
                                 "functional all_reduce (torch 2.13 has one)")
    import torch.distributed._functional_collectives as funcol

    group = dist.group.WORLD
    return lambda t: funcol.all_reduce(t, "sum", group)


def _batch_moments(h, reduce, ctx: _Ctx):
    """(biased variance, mean) per channel over the batch: the GLOBAL batch when replicas > 1.

    torch's default under DDP is per-replica statistics (plain BatchNorm normalises each
    replica's slice by its own mean and variance; SyncBatchNorm is torch's opt-in). The
    project pins synchronised statistics, so N replicas compute what one device does:
    the per-channel sums are all-reduced (differentiably, as SyncBatchNorm does), in two
    passes (the mean, then squared deviations from it) as var_mean does, because
    E[x^2] - mean^2 in float32 loses the variance to cancellation.
    """
    import torch

    if ctx.replicas == 1:
        return torch.var_mean(h, dim=reduce, correction=0)
    total = ctx.replica_sum
    count = ctx.replicas * (h.numel() // h.shape[1 if h.dim() == 4 else -1])  # equal slices (base checks)
    # At least float32 sums whatever autocast made h, so the all-reduced sums keep float32 precision.
    dtype = torch.promote_types(h.dtype, torch.float32)
    mean = total(h.sum(dim=reduce, dtype=dtype)) / count
    var = total((h - _channel_view(h, mean)).square().sum(dim=reduce, dtype=dtype)) / count
    return var, mean


def _batchnorm(layer, h, ctx):
    import torch

    reduce = [d for d in range(h.dim()) if d != (1 if h.dim() == 4 else h.dim() - 1)]
    mean, var = ctx.p(layer, "running_mean"), ctx.p(layer, "running_var")
    if ctx.train and layer.name not in ctx.frozen:
        # By hand, not F.batch_norm: torch updates running_var with the unbiased batch
        # variance, the spec (as Keras and flax) with the biased one.
        batch_var, batch_mean = _batch_moments(h, reduce, ctx)
        with torch.no_grad():
            mean.mul_(1 - layer.momentum).add_(batch_mean.detach(), alpha=layer.momentum)
            var.mul_(1 - layer.momentum).add_(batch_var.detach(), alpha=layer.momentum)
        mean, var = batch_mean, batch_var
    scale = ctx.p(layer, "scale") * torch.rsqrt(var + layer.eps)
    return h * _channel_view(h, scale) + _channel_view(h, ctx.p(layer, "offset") - mean * scale)


def _layernorm(layer, h, ctx):
    import torch.nn.functional as F

    nhwc = h.dim() == 4  # the canonical last axis is torch's channel axis: normalise in NHWC
    x = h.permute(0, 2, 3, 1) if nhwc else h
    y = F.layer_norm(x, x.shape[-1:], ctx.p(layer, "scale"), ctx.p(layer, "offset"), layer.eps)
    return y.permute(0, 3, 1, 2) if nhwc else y


def _flatten(layer, h, ctx):
    # Canonical flattening is NHWC order. With channels_last storage the NHWC permute is
    # a free view, and no Dense kernel needs its rows permuted.
    return (h.permute(0, 2, 3, 1) if h.dim() == 4 else h).reshape(h.shape[0], -1)


def _reshape(layer, h, ctx):
    # Reshape the canonical (NHWC) layout, and hand images back in torch's logical NCHW.
    y = (h.permute(0, 2, 3, 1) if h.dim() == 4 else h).reshape(h.shape[0], *layer.target_shape)
    return y.permute(0, 3, 1, 2) if y.dim() == 4 else y


def _lora(layer, ctx, target, x):
    """The spec's LoRA term of projection `target` on its input x (tasks/layers.py; A and B canonical)."""
    import torch

    return layer.lora(target, x, ctx.p(layer, f"{target}_lora_a"), ctx.p(layer, f"{target}_lora_b"),
                      einsum=torch.einsum)


def attention_qkv(layer, h, ctx):
    """q, k, v of (b, t, d) inputs, each (b, heads, t, head_dim)."""
    import torch
    import torch.nn.functional as F

    b, t, d = h.shape
    names = ("query", "key", "value")
    # q, k and v as one product with the kernels stacked, as nanoGPT's packed c_attn: three
    # (b t, d) x (d, d) products spent 11% more time in matmuls than one (d, 3d) on the CPU
    # (tiny-gpt, torch.profiler over 10 steps: 1.12 s vs nanoGPT's 1.01 s). Stacking copies 3 d^2 floats a step.
    packed = F.linear(h, torch.cat([ctx.p(layer, f"{n}_kernel") for n in names]),
                      torch.cat([ctx.p(layer, f"{n}_bias") for n in names]))
    out = []
    for n, y in zip(names, packed.chunk(3, -1)):
        y = y.view(b, t, layer.heads, -1)
        if layer.lora_adapts(n):
            y = y + _lora(layer, ctx, n, h)
        out.append(y.transpose(1, 2))
    return tuple(out)


def attention_out(layer, o, ctx):
    """The output projection of attention values o (b, heads, t, head_dim): (b, t, d)."""
    import torch.nn.functional as F

    b, _, t, _ = o.shape
    o = o.transpose(1, 2)  # (b, t, heads, head_dim)
    y = F.linear(o.reshape(b, t, -1), ctx.p(layer, "out_kernel"), ctx.p(layer, "out_bias"))
    return y + _lora(layer, ctx, "out", o) if layer.lora_adapts("out") else y


def _attention(layer, h, ctx):
    import torch.nn.functional as F

    q, k, v = attention_qkv(layer, h, ctx)
    o = F.scaled_dot_product_attention(q, k, v, is_causal=layer.causal)  # scale 1/sqrt(head_dim)
    return attention_out(layer, o, ctx)


def _pool(fn_name):
    def forward(layer, h, ctx):
        import torch.nn.functional as F

        return getattr(F, fn_name)(h, layer.pool_size)  # stride = window, floored: "valid"
    return forward


@dataclass(frozen=True)
class _Kind:
    """One layer kind in torch: its forward, and the parameters whose torch layout is not the canonical one.

    layouts: param name -> (to_torch(canonical array), to_canonical(torch array, canonical shape));
    any other parameter is stored as it is.
    """

    forward: Any
    layouts: dict = field(default_factory=dict)


# A kernel torch keeps as F.linear's (out, in) matrix: canonical (in, ...) flattened, transposed.
_MATRIX = (lambda a: np.ascontiguousarray(a.reshape(a.shape[0], -1).T), lambda a, shape: a.T.reshape(shape))
_OUT_MATRIX = (lambda a: np.ascontiguousarray(a.reshape(-1, a.shape[-1]).T), lambda a, shape: a.T.reshape(shape))
_FLAT = (lambda a: a.reshape(-1), lambda a, shape: a.reshape(shape))
_OIHW = (lambda a: np.ascontiguousarray(a.transpose(3, 2, 0, 1)), lambda a, shape: a.transpose(2, 3, 1, 0))

# The one map from spec layer kinds to torch: functional ops on parameters kept in
# torch's layouts (Linear (out, in), Conv2d OIHW), converted only when weights cross.
LAYERS = {
    "dense": _Kind(_dense, {"kernel": _MATRIX}),
    "activation": _Kind(lambda layer, h, ctx: _activation(layer.activation, h)),
    "conv2d": _Kind(_conv2d, {"kernel": _OIHW}),
    "maxpool2d": _Kind(_pool("max_pool2d")),
    "avgpool2d": _Kind(_pool("avg_pool2d")),
    "globalavgpool2d": _Kind(lambda layer, h, ctx: h.mean(dim=(2, 3))),
    "flatten": _Kind(_flatten),
    "reshape": _Kind(_reshape),
    "batchnorm": _Kind(_batchnorm),
    "layernorm": _Kind(_layernorm),
    "dropout": _Kind(lambda layer, h, ctx: _functional().dropout(h, layer.rate, training=ctx.train)),
    "embedding": _Kind(lambda layer, h, ctx: _functional().embedding(h, ctx.p(layer, "table"))),
    "positionalembedding": _Kind(lambda layer, h, ctx: h + ctx.p(layer, "table")[: h.shape[1]]),
    "multiheadselfattention": _Kind(_attention, {
        **{f"{n}_kernel": _MATRIX for n in ("query", "key", "value")},
        **{f"{n}_bias": _FLAT for n in ("query", "key", "value")}, "out_kernel": _OUT_MATRIX}),
    "residual": _Kind(lambda layer, h, ctx: h + _run(layer.body, h, ctx)),
}


def _functional():
    import torch.nn.functional as F

    return F


@dataclass
class _Data:
    x: Any  # torch tensor on the device, storage layout (see _to_storage)
    y: Any  # int64 labels on the device
    n: int


@dataclass
class _Model(ModelHandle):
    params: dict  # canonical name -> tensor in torch layout (nn.Parameter where it trains)
    trainable: list  # parameters that train (requires_grad True)
    frozen: frozenset  # names of frozen layers
    optimizer: Any
    scheduler: Any = None
    train_step: Any = None
    eval_step: Any = None
    forward: Any = None


def _sgd(torch, model, o):
    # torch's SGD is the spec's form (dampening 0): buf = momentum buf + g.
    return torch.optim.SGD(model.trainable, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov)


def _adam(torch, model, o, cls=None, groups=None):
    # fused=True: one kernel over all parameters (CPU and CUDA); faster than foreach and the
    # default on the MNIST-MLP step (docs/performance.md).
    groups = groups or [{"params": model.trainable}]
    return (cls or torch.optim.Adam)([g for g in groups if g["params"]], lr=o.lr, betas=(o.beta1, o.beta2),
                                     eps=o.eps, fused=True)


def _adamw(torch, model, o):
    """Two groups: the arrays that decay and those that do not (AdamW.decay)."""
    spec = model.spec
    named = [(e, model.params[e.name]) for e in spec.params() if spec.trains(e, model.trainable_layers)]
    return _adam(torch, model, o, cls=torch.optim.AdamW, groups=[
        {"params": [t for e, t in named if spec.decays(e)], "weight_decay": o.weight_decay},
        {"params": [t for e, t in named if not spec.decays(e)], "weight_decay": 0.0}])


# Every optimizer kind of tasks/optim.py, as (torch, model, optimizer spec) -> torch optimizer.
OPTIMIZERS = {"sgd": _sgd, "adam": _adam, "adamw": _adamw}


class TorchBackend(Backend):
    name = "torch"
    # compiled: forward, loss and their backward through torch.compile; the optimizer step stays eager.
    EXECUTIONS = {"eager": "torch eager", "compiled": "torch.compile(forward+backward)"}
    # Data-parallel replicas are processes meeting in a torch.distributed process group;
    # DistributedDataParallel averages the gradients (see _make_steps). Collective, so
    # every rank must make them in the same order: configure, build, train_epoch (and
    # warmup), rank0_value, and memory on CUDA. evaluate, logits, get/set_weights and
    # environment are each rank's own.
    REPLICA_PROCESSES = True

    def __init__(self):
        self._device = None
        self._threads = None
        self._precision = "fp32"

    # -- set-up --------------------------------------------------------------------------

    LAYERS = LAYERS
    ACTIVATIONS = ACTIVATIONS
    OPTIMIZERS = OPTIMIZERS

    def import_framework(self) -> None:
        # torch.optim's first optimizer imports torch._dynamo (2-3 s on 2 cores): in the import phase,
        # not inside the first build, where it would count as the --mode best probe's time.
        import torch  # noqa: F401
        import torch._dynamo  # noqa: F401

    def _configure(self, *, device: str, threads: int, precision: str) -> None:
        try:
            self.import_framework()
            import torch
        except ImportError as exc:  # pragma: no cover - the registry checks first
            raise BackendUnavailable(f"torch is not installed ({exc})") from None
        if device == "gpu":
            if not torch.cuda.is_available():
                raise BackendUnavailable("torch: device 'gpu' asked for but there is no CUDA device")
            self._device = torch.device("cuda")
        elif device == "auto":
            self._device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        else:
            self._device = torch.device("cpu")
        # Denormals flushed to zero on the CPU, as TensorFlow's kernels and XLA's matmuls do
        # (checked: 1e-39 * 1.0 is 0 in TensorFlow; a JAX matmul of 1e-39s gives 0, its fused
        # element-wise code keeps them). Left to the process, it varied: the cifar-cnn's steps run into
        # denormals, and whether they were flushed depended on whether torch.compile had run
        # earlier in the process (issue 13, 24-step windows, samples/s: tutorial loop 2,195
        # without, 3,136 after a compile, 3,249 with this flag; harness 2,912 / 4,677 / 4,823).
        self._flush_denormal = _flush_denormals(torch)
        if threads:
            torch.set_num_threads(int(threads))
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:
            pass  # it can be set only once per process, before any inter-op work
        tf32 = precision == "tf32"
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
        torch.set_float32_matmul_precision("high" if tf32 else "highest")
        self._threads = torch.get_num_threads()
        self._precision = precision
        if self.replicas.count > 1:
            self._join_replicas()

    def _join_replicas(self) -> None:
        """Join the process group of the cell's replica processes: gloo on CPU, NCCL with one GPU per rank."""
        torch = self._torch()
        import torch.distributed as dist

        count, rank = self.replicas.count, self.replicas.rank
        if not dist.is_available():
            raise BackendUnavailable(f"torch {torch.__version__} was built without torch.distributed")
        if self._device.type == "cuda":
            if torch.cuda.device_count() < count:
                raise BackendUnavailable(f"torch: {count} replicas need {count} CUDA devices, "
                                         f"there are {torch.cuda.device_count()}")
            self._device = torch.device("cuda", rank)  # one process per GPU, all on this host
            torch.cuda.set_device(self._device)
        backend = "nccl" if self._device.type == "cuda" else "gloo"
        # The timeout bounds every collective (and the rendezvous), so a replica that died
        # or hangs turns into an error on the others instead of a wait without end.
        timeout = datetime.timedelta(seconds=float(os.environ.get(REPLICA_TIMEOUT_ENV, REPLICA_TIMEOUT_S)))
        dist.init_process_group(backend, init_method=f"tcp://{self.replicas.address}", rank=rank,
                                world_size=count, timeout=timeout,
                                **({"device_id": self._device} if backend == "nccl" else {}))
        # NCCL warns (and may leak its communicators) when a process exits with its group alive.
        atexit.register(lambda: dist.destroy_process_group() if dist.is_initialized() else None)

    @staticmethod
    def _torch():
        import torch

        return torch

    def _environment(self) -> dict:
        torch = self._torch()
        on_cuda = self._device.type == "cuda"
        return {
            "framework": "torch",
            "framework_version": torch.__version__,
            "device": "gpu" if on_cuda else "cpu",
            "device_name": torch.cuda.get_device_name(self._device) if on_cuda else "cpu",
            "threads": self._threads,
            "interop_threads": torch.get_num_interop_threads(),
            "precision": self._precision,
            "memory_format": "channels_last" if CHANNELS_LAST else "nchw",
            "flush_denormal": self._flush_denormal,
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if on_cuda else None,
            **self._replica_environment(),
        }

    def _replica_environment(self) -> dict:
        if self.replicas.count == 1:
            return {}
        import torch.distributed as dist

        # Rank r drives cuda:r (_join_replicas), or the shared CPU.
        devices = [f"cuda:{r}" if self._device.type == "cuda" else "cpu" for r in range(self.replicas.count)]
        return {"replica_devices": devices, "process_group": dist.get_backend()}

    def _synchronize(self) -> None:
        torch = self._torch()
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)

    def _memory(self) -> dict:
        torch = self._torch()
        peak = torch.cuda.max_memory_allocated(self._device) / 2**20 if self._device.type == "cuda" else None
        out = {"device_peak_mb": peak}
        if self.replicas.count > 1:
            peaks = [None] * self.replicas.count  # the CPU allocator keeps no peak
            if self._device.type == "cuda":
                import torch.distributed as dist

                dist.all_gather_object(peaks, peak)  # every rank calls memory(), in the same order
            out["replica_peak_mb"] = peaks
        return out

    def _rank0_value(self, value: Any) -> Any:
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    # -- data ----------------------------------------------------------------------------

    def _to_storage(self, x):
        """NHWC host array -> device tensor in storage layout (NCHW, or NHWC for channels_last)."""
        torch = self._torch()
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=self.float_dtype)).to(self._device)
        if t.dim() == 4 and not CHANNELS_LAST:
            t = t.permute(0, 3, 1, 2).contiguous()  # converted once, here, not per batch
        return t

    @staticmethod
    def _compute_view(t):
        """Storage tensor -> the logical NCHW tensor torch layers take (a view, no copy).

        With channels_last the storage is NHWC and permuting it is exactly a
        channels_last-strided NCHW tensor, so gathering batches stays a contiguous copy.
        """
        return t.permute(0, 3, 1, 2) if (CHANNELS_LAST and t.dim() == 4) else t

    def _put_data(self, x: np.ndarray, y: np.ndarray) -> _Data:
        torch = self._torch()
        yt = torch.from_numpy(y.astype(np.int64)).to(self._device)
        if np.issubdtype(x.dtype, np.integer):  # token ids: int64, as F.embedding and indexing like them
            return _Data(torch.from_numpy(x.astype(np.int64)).to(self._device), yt, len(y))
        return _Data(self._to_storage(x), yt, len(y))

    # -- model ---------------------------------------------------------------------------

    def _build(self, spec: TaskSpec, weights: list[np.ndarray], *,
               trainable: tuple[str, ...] | None, mode: str) -> _Model:
        torch = self._torch()
        params, train_params = {}, []
        kinds = {layer.name: layer.kind for layer, _, _ in spec.walk()}
        for entry, w in zip(spec.params(), weights):
            to_torch = LAYERS[kinds[entry.layer]].layouts.get(entry.param.name, (lambda a: a, None))[0]
            t = torch.from_numpy(np.array(to_torch(w), self.float_dtype)).to(self._device)
            if CHANNELS_LAST and t.dim() == 4:
                t = t.contiguous(memory_format=torch.channels_last)
            if spec.trains(entry, trainable):
                # An nn.Parameter, so a module can own it for DistributedDataParallel.
                t = torch.nn.Parameter(t, requires_grad=True)
                train_params.append(t)
            params[entry.name] = t
        frozen = frozenset(n for n in spec.param_layer_names() if trainable is not None and n not in trainable)
        model = _Model(spec=spec, trainable_layers=trainable, params=params, trainable=train_params, frozen=frozen,
                       optimizer=None, mode=mode)
        self._set_weights(model, weights)
        self._make_steps(model)
        return model

    def _new_optimizer(self, model: _Model):
        torch = self._torch()
        o = model.spec.optimizer
        if not model.trainable:
            return None, None
        opt = OPTIMIZERS[o.kind](torch, model, o)
        table = o.lr_table()
        if len(table) == 1:
            return opt, None
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: table[min(s, len(table) - 1)] / o.lr)

    def _autocast(self):
        torch = self._torch()
        if self._precision == "bf16":
            return torch.autocast(device_type=self._device.type, dtype=torch.bfloat16)
        import contextlib

        return contextlib.nullcontext()

    def _make_steps(self, model: _Model) -> None:
        torch = self._torch()
        import torch.nn.functional as F

        autocast = self._autocast
        layers, params, frozen = model.spec.layers, model.params, model.frozen
        clip = model.spec.optimizer.clip_norm
        replicas = self.replicas.count
        batchnorm = any(layer.kind == "batchnorm" for layer, _, _ in model.spec.walk())
        replica_sum = _replica_sum_op() if replicas > 1 and batchnorm else None
        logits_dtype = torch.float64 if self.float_dtype == np.float64 else torch.float32

        def forward(x, train):
            # A training step's batch statistics span the replicas; evaluation needs none.
            ctx = _Ctx(params, train=train, frozen=frozen, replicas=replicas if train else 1, replica_sum=replica_sum)
            with autocast():
                return _run(layers, x, ctx).to(logits_dtype)

        def loss_fn(xb, yb):
            logits = forward(xb, True)
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), yb.reshape(-1))

        def eval_fn(xb, yb):
            logits = forward(xb, False)
            losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), yb.reshape(-1), reduction="sum")
            correct = (logits.argmax(dim=-1) == yb).sum()
            return losses, correct

        if model.mode == "compiled":
            # torch.compile of forward + loss (the fused Adam step stays eager), one graph per batch
            # shape; with replicas, DDP's inner module. Why, and what it measured: docs/performance.md.
            loss_fn = torch.compile(loss_fn, dynamic=False)
            eval_fn = torch.compile(eval_fn, dynamic=False)

        replicated = replicas > 1 and bool(model.trainable)
        step_loss = self._replicated(model, loss_fn) if replicated else loss_fn

        def clip_gradients():
            # The spec's form, g *= min(1, clip / ||g||); clip_grad_norm_ would add 1e-6 to the norm.
            grads = [p.grad for p in model.trainable]
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
            torch._foreach_mul_(grads, torch.clamp(clip / norm, max=1.0))

        def train_step(xb, yb):
            loss = step_loss(xb, yb)
            loss.backward()  # with replicas, DDP has all-reduced: .grad is the mean over the global batch
            if clip is not None:
                clip_gradients()  # so clipping acts on the global gradient, as on one device
            model.optimizer.step()
            # DDP's gradients are views into its all-reduce buckets (gradient_as_bucket_view):
            # zeroed in place they stay so and backward accumulates straight into the buckets;
            # set to None, every step would allocate new gradients and copy them in.
            model.optimizer.zero_grad(set_to_none=not replicated)
            if model.scheduler is not None:
                model.scheduler.step()
            return loss.detach()

        model.train_step = train_step
        model.eval_step = eval_fn
        model.forward = forward

    def _replicated(self, model: _Model, loss_fn):
        """loss_fn under DistributedDataParallel: after backward, every trainable .grad is the replicas' mean."""
        torch = self._torch()
        from torch.nn.parallel import DistributedDataParallel

        class Loss(torch.nn.Module):
            """Owns the trainable Parameters (DDP hooks their gradients); forward is the functional loss."""

            def __init__(self):
                super().__init__()
                self.trainable = torch.nn.ParameterList(model.trainable)  # the same objects, not copies

            def forward(self, xb, yb):
                return loss_fn(xb, yb)

        # The module owns no buffers (BatchNorm's running statistics come out identical on
        # every rank, from the synchronised batch statistics), so DDP has none to broadcast.
        # Each rank mean-reduces its slice and DDP divides the summed gradients by N: the
        # global batch's mean gradient. init_sync (the default) checks the shapes agree and
        # broadcasts rank 0's weights once, a cheap guard; frozen tensors do not require
        # grad and are not the module's, so DDP neither syncs nor reduces them.
        return DistributedDataParallel(Loss(), gradient_as_bucket_view=True)

    def _layouts(self, model: _Model):
        """(canonical name, tensor, layout pair or None) in spec order."""
        kinds = {layer.name: layer.kind for layer, _, _ in model.spec.walk()}
        return [(e, model.params[e.name], LAYERS[kinds[e.layer]].layouts.get(e.param.name))
                for e in model.spec.params()]

    def _get_weights(self, model: _Model) -> list[np.ndarray]:
        out = []
        with self._torch().no_grad():
            for entry, t, layout in self._layouts(model):
                a = t.detach().to("cpu").numpy()
                a = layout[1](a, entry.param.shape) if layout else a
                out.append(np.array(a, dtype=self.float_dtype, order="C"))
        return out

    def _set_weights(self, model: _Model, weights: list[np.ndarray]) -> None:
        torch = self._torch()
        with torch.no_grad():
            for (_, t, layout), w in zip(self._layouts(model), weights):
                a = layout[0](w) if layout else w
                # copy_ keeps the tensor objects (and their memory format), so the
                # optimizer and any compiled graph keep pointing at the same tensors.
                t.copy_(torch.from_numpy(np.ascontiguousarray(a, self.float_dtype)))
                t.grad = None
        # A fresh optimizer: zero moments, step count 0, the schedule at its start.
        model.optimizer, model.scheduler = self._new_optimizer(model)

    # -- primitive steps -----------------------------------------------------------------

    def _batch(self, data: _Data, idx):
        return self._compute_view(data.x.index_select(0, idx)), data.y.index_select(0, idx)

    def _train_epoch(self, model: _Model, data: _Data, order: np.ndarray, batch_size: int) -> np.ndarray:
        torch = self._torch()
        steps = len(order) // batch_size
        if steps == 0:
            return np.zeros(0, self.float_dtype)
        replicas, rank = self.replicas.count, self.replicas.rank
        if replicas > 1:  # this rank's contiguous slice of every step's global batch
            batch_size //= replicas
            order = order.reshape(steps, replicas, batch_size)[:, rank].reshape(-1)
        order_t = torch.from_numpy(order.astype(np.int64)).to(self._device)
        losses = []
        for i in range(steps):
            xb, yb = self._batch(data, order_t[i * batch_size:(i + 1) * batch_size])
            losses.append(model.train_step(xb, yb))
        losses = torch.stack(losses)
        if replicas > 1:
            # Reporting only (the gradients went through DDP): the mean of the slices' mean
            # losses is the global batch's, and after the all-reduce every rank has the same.
            import torch.distributed as dist

            dist.all_reduce(losses)
            losses /= replicas
        return losses.to("cpu").numpy().astype(self.float_dtype)

    def _evaluate(self, model: _Model, data: _Data, batch_size: int) -> tuple[float, float]:
        torch = self._torch()
        total = torch.zeros((), dtype=torch.float64, device=self._device)
        correct = torch.zeros((), dtype=torch.int64, device=self._device)
        with torch.no_grad():
            for start in range(0, data.n, batch_size):
                xb = self._compute_view(data.x[start:start + batch_size])
                loss_sum, hits = model.eval_step(xb, data.y[start:start + batch_size])
                total += loss_sum
                correct += hits
        result = torch.stack([total, correct.double()]).to("cpu").numpy()
        count = data.y.numel()  # every position of every sample
        return float(result[0] / count), float(result[1] / count)

    def _logits(self, model: _Model, x: np.ndarray) -> np.ndarray:
        torch = self._torch()
        data = self._put_data(x, np.zeros(len(x), np.int32))
        with torch.no_grad():
            out = model.forward(self._compute_view(data.x), False)
        return out.to("cpu").numpy().astype(self.float_dtype)

    def _export(self, model: _Model, fmt: str, folder):
        from backends.torch_export import export

        return export(self, model, fmt, folder=folder)

    def _generator(self, model: _Model, *, batch: int, prompt_len: int, new_tokens: int):
        from backends.torch_generate import generator

        return generator(self, model, batch=batch, prompt_len=prompt_len, new_tokens=new_tokens)

    def _inference(self, model: _Model) -> InferencePath:
        torch = self._torch()

        def logits(x):
            return model.forward(x, False)

        if model.mode == "compiled":
            logits = torch.compile(logits, dynamic=False)  # one graph per batch shape, as in training

        name = "torch.inference_mode" + (" + torch.compile" if model.mode == "compiled" else " (eager)")
        return InferencePath(put=self._device_input, run=lambda x: self._served(logits, x), name=name)

    def _device_input(self, x: np.ndarray):
        """A host array on the device in the layout the layers take, the copy finished (serving's inputs)."""
        t = self._put_data(x, np.zeros(len(x), np.int32)).x
        self._synchronize()
        return self._compute_view(t)

    def _served(self, fn, *args):
        """fn(*args) under inference_mode, returned once its results are ready (serving's calls)."""
        with self._torch().inference_mode():
            out = fn(*args)
        self._synchronize()
        return out
