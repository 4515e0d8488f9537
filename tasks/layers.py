"""The layer vocabulary: frozen dataclasses that know their own output shape, parameters and FLOPs.

Shapes here never include the batch axis. Images are HWC (NHWC with the batch), sequences
are (seq,) token ids or (seq, features). Every parameter's canonical layout is written in
tasks/README.md; `params()` below is where it is defined.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


class SpecError(ValueError):
    """A task specification that cannot describe a valid model or run."""


def require(condition: bool, message: str) -> None:
    if not condition:
        raise SpecError(message)


LORA_TARGETS = ("query", "key", "value", "out")  # the attention projections LoRA can adapt
# Per target, LoRA's two products as einsums over the canonical layouts: (x, A) -> x A, then
# (x A, B) -> (x A) B. x: (batch, seq, D) into query/key/value, (batch, seq, heads, head_dim) into out.
LORA_EINSUMS = {**dict.fromkeys(("query", "key", "value"), ("btd,dr->btr", "btr,rhk->bthk")),
                "out": ("bthk,hkr->btr", "btr,rd->btd")}
# "gelu" is the exact erf form (torch and Keras default); "gelu_tanh" the tanh
# approximation (flax's default). Naming both keeps either from being picked silently.
ACTIVATIONS = ("linear", "relu", "gelu", "gelu_tanh", "tanh", "silu")
PADDINGS = ("valid", "same")
INITS = ("glorot_uniform", "zeros", "ones", "normal")
KERNEL_INITS = ("glorot_uniform", "normal")  # "normal": N(0, init_std), GPT-2's initialisation
EMBEDDING_STD = 0.02  # N(0, 0.02) for embedding tables (GPT-2's choice); frameworks differ


@dataclass(frozen=True)
class Param:
    """One canonical array of a layer: its name within the layer, shape and how it starts.

    `trainable=False` marks state that the optimizer never touches (BatchNorm running
    statistics): it is part of the canonical weights and of checkpoints all the same.
    """

    name: str
    shape: tuple[int, ...]
    init: str = "zeros"
    fans: tuple[int, int] = (0, 0)  # (fan_in, fan_out) for glorot_uniform
    trainable: bool = True
    std: float = EMBEDDING_STD  # for init "normal"

    def __post_init__(self):
        # harness.weights.draw knows exactly these: an unknown one must not become zeros.
        if self.init not in INITS:
            raise SpecError(f"parameter {self.name!r}: init {self.init!r} is not one of {', '.join(INITS)}")


def _positive_int(layer, attr: str) -> None:
    value = getattr(layer, attr)
    require(isinstance(value, int) and not isinstance(value, bool) and value > 0,
            f"layer {layer.name!r}: {attr} must be a positive int, got {value!r}")


def _in_range(layer, attr: str, low: float, high: float, says: str) -> None:
    """low < value <= high, a number (not a bool)."""
    value = getattr(layer, attr)
    require(isinstance(value, (int, float)) and not isinstance(value, bool) and low < value <= high,
            f"layer {layer.name!r}: {attr} must {says}, got {value!r}")


def _one_of(layer, attr: str, valid) -> None:
    value = getattr(layer, attr)
    require(value in valid, f"layer {layer.name!r}: unknown {attr} {value!r}; valid: {', '.join(valid)}")


def _kernel_init(layer, *stds: str) -> None:
    _one_of(layer, "kernel_init", KERNEL_INITS)
    for attr in stds:
        _in_range(layer, attr, 0, math.inf, "be positive")


def _kernel(layer, name: str, shape, fans, std: float) -> Param:
    """A kernel drawn as the layer's kernel_init says: Glorot over `fans`, or N(0, std)."""
    return Param(name, tuple(shape), layer.kernel_init, fans, std=std)


def _rank(layer, shape, ranks, what: str) -> None:
    require(len(shape) in ranks, f"layer {layer.name!r}: {type(layer).__name__} needs {what}, got {tuple(shape)}")


class LayerBase:
    """Defaults for layers without parameters, FLOPs or a shape change."""

    def children(self) -> tuple:
        return ()

    def out_shape(self, x: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(x)

    def params(self, x: tuple[int, ...]) -> tuple[Param, ...]:
        return ()

    def flops(self, x: tuple[int, ...]) -> int:
        """Forward FLOPs per sample: 2 x multiply-adds of the matmul-like work.

        Elementwise work (activations, pooling, normalisation, dropout) is memory bound
        and counted as zero, as in the usual 6 x params estimate.
        """
        return 0


@dataclass(frozen=True)
class Dense(LayerBase):
    """x W + b. `tied_to` names an Embedding whose (vocab, dim) table is W transposed (GPT-2's
    head): no kernel of its own, and the table's gradient sums both uses."""

    units: int
    name: str
    activation: str = "linear"
    use_bias: bool = True
    tied_to: str = ""
    kernel_init: str = "glorot_uniform"
    init_std: float = EMBEDDING_STD  # with kernel_init "normal"
    kind: str = field(default="dense", init=False)

    def __post_init__(self):
        _positive_int(self, "units")
        _one_of(self, "activation", ACTIVATIONS)
        require(isinstance(self.use_bias, bool), f"layer {self.name!r}: use_bias must be true or false")
        require(isinstance(self.tied_to, str), f"layer {self.name!r}: tied_to must be a layer name")
        _kernel_init(self, "init_std")

    def out_shape(self, x):
        _rank(self, x, (1, 2), "a flat (features,) or (seq, features) input; add a Flatten")
        return (*x[:-1], self.units)

    def params(self, x):
        kernel = () if self.tied_to else (_kernel(self, "kernel", (x[-1], self.units), (x[-1], self.units),
                                                  self.init_std),)
        return kernel + ((Param("bias", (self.units,)),) if self.use_bias else ())

    def flops(self, x):
        return 2 * math.prod(x) * self.units


@dataclass(frozen=True)
class Activation(LayerBase):
    """An activation on its own, for where it follows a normalisation (conv -> BatchNorm -> relu)."""

    activation: str
    name: str
    kind: str = field(default="activation", init=False)

    def __post_init__(self):
        _one_of(self, "activation", ACTIVATIONS)


@dataclass(frozen=True)
class Conv2D(LayerBase):
    filters: int
    kernel_size: int
    name: str
    padding: str = "valid"  # "same": TensorFlow's rule, the extra row/column at the bottom/right
    activation: str = "linear"
    stride: int = 1
    kind: str = field(default="conv2d", init=False)

    def __post_init__(self):
        for attr in ("filters", "kernel_size", "stride"):
            _positive_int(self, attr)
        _one_of(self, "padding", PADDINGS)
        _one_of(self, "activation", ACTIVATIONS)

    def out_shape(self, x):
        _rank(self, x, (3,), "an HWC input")
        k, s = self.kernel_size, self.stride
        if self.padding == "same":
            h, w = -(-x[0] // s), -(-x[1] // s)
        else:
            h, w = (x[0] - k) // s + 1, (x[1] - k) // s + 1
        return (h, w, self.filters)

    def params(self, x):
        k, cin = self.kernel_size, x[2]
        return (Param("kernel", (k, k, cin, self.filters), "glorot_uniform", (k * k * cin, k * k * self.filters)),
                Param("bias", (self.filters,)))

    def flops(self, x):
        h, w, _ = self.out_shape(x)
        return 2 * h * w * self.filters * self.kernel_size ** 2 * x[2]


@dataclass(frozen=True)
class _Pool2D(LayerBase):
    """Non-overlapping windows (stride = pool_size), "valid": H and W are floored."""

    def __post_init__(self):
        _positive_int(self, "pool_size")

    def out_shape(self, x):
        _rank(self, x, (3,), "an HWC input")
        return (x[0] // self.pool_size, x[1] // self.pool_size, x[2])


@dataclass(frozen=True)
class MaxPool2D(_Pool2D):
    pool_size: int
    name: str
    kind: str = field(default="maxpool2d", init=False)


@dataclass(frozen=True)
class AvgPool2D(_Pool2D):
    pool_size: int
    name: str
    kind: str = field(default="avgpool2d", init=False)


@dataclass(frozen=True)
class GlobalAvgPool2D(LayerBase):
    name: str
    kind: str = field(default="globalavgpool2d", init=False)

    def out_shape(self, x):
        _rank(self, x, (3,), "an HWC input")
        return (x[2],)


@dataclass(frozen=True)
class Flatten(LayerBase):
    """Flattens in NHWC (row-major canonical) order, whatever the framework computes in."""

    name: str
    kind: str = field(default="flatten", init=False)

    def out_shape(self, x):
        return (math.prod(x),)


@dataclass(frozen=True)
class Reshape(LayerBase):
    """Row-major reshape of the canonical layout (NHWC, or (seq, features)), e.g. a sequence into an image."""

    target_shape: tuple[int, ...]
    name: str
    kind: str = field(default="reshape", init=False)

    def __post_init__(self):
        require(bool(self.target_shape) and all(isinstance(d, int) and d > 0 for d in self.target_shape),
                f"layer {self.name!r}: target_shape must be positive ints, got {self.target_shape!r}")

    def out_shape(self, x):
        require(math.prod(x) == math.prod(self.target_shape),
                f"layer {self.name!r}: cannot reshape {tuple(x)} into {tuple(self.target_shape)}")
        return tuple(self.target_shape)


def _norm_params(x) -> tuple[Param, ...]:
    return Param("scale", (x[-1],), "ones"), Param("offset", (x[-1],))


@dataclass(frozen=True)
class BatchNorm(LayerBase):
    """Normalises the last (channel) axis over every other axis, batch included.

    Training uses the batch's mean and biased variance and updates the running
    statistics as running = (1 - momentum) * running + momentum * batch (torch's
    convention: torch 0.1 is Keras's and flax's 0.9), also with the biased variance (as
    Keras and flax; torch's own BatchNorm uses the unbiased one, its adapter does not).
    Evaluation, and a frozen BatchNorm, use the running statistics (Keras's rule).
    """

    name: str
    momentum: float = 0.1
    eps: float = 1e-5  # torch's default; Keras 1e-3, flax 1e-5
    kind: str = field(default="batchnorm", init=False)

    def __post_init__(self):
        _in_range(self, "momentum", 0, 1, "lie in (0, 1]")
        _in_range(self, "eps", 0, math.inf, "be positive")

    def params(self, x):
        return (*_norm_params(x), Param("running_mean", (x[-1],), trainable=False),
                Param("running_var", (x[-1],), "ones", trainable=False))


@dataclass(frozen=True)
class LayerNorm(LayerBase):
    """Normalises the last axis of each position: (x - mean) / sqrt(biased var + eps) * scale + offset."""

    name: str
    eps: float = 1e-5  # torch's default; Keras 1e-3, flax 1e-6
    kind: str = field(default="layernorm", init=False)

    def __post_init__(self):
        _in_range(self, "eps", 0, math.inf, "be positive")

    def params(self, x):
        return _norm_params(x)


@dataclass(frozen=True)
class Dropout(LayerBase):
    """Inverted dropout in training (kept units scaled by 1 / (1 - rate)); identity in evaluation."""

    rate: float
    name: str
    kind: str = field(default="dropout", init=False)

    def __post_init__(self):
        require(isinstance(self.rate, (int, float)) and 0 <= self.rate < 1,
                f"layer {self.name!r}: rate must lie in [0, 1), got {self.rate!r}")


@dataclass(frozen=True)
class Embedding(LayerBase):
    """Token ids (seq,) -> vectors (seq, dim); the model's input is then int32 ids."""

    vocab_size: int
    dim: int
    name: str
    kind: str = field(default="embedding", init=False)

    def __post_init__(self):
        _positive_int(self, "vocab_size")
        _positive_int(self, "dim")

    def out_shape(self, x):
        _rank(self, x, (1,), "a (seq,) input of token ids")
        return (x[0], self.dim)

    def params(self, x):
        return (Param("table", (self.vocab_size, self.dim), "normal"),)


@dataclass(frozen=True)
class PositionalEmbedding(LayerBase):
    """Adds a learned vector per position: x + table[:seq]."""

    max_len: int
    name: str
    kind: str = field(default="positionalembedding", init=False)

    def __post_init__(self):
        _positive_int(self, "max_len")

    def out_shape(self, x):
        _rank(self, x, (2,), "a (seq, features) input")
        require(x[0] <= self.max_len, f"layer {self.name!r}: sequence length {x[0]} exceeds max_len {self.max_len}")
        return tuple(x)

    def params(self, x):
        return (Param("table", (self.max_len, x[1]), "normal"),)


@dataclass(frozen=True)
class MultiHeadSelfAttention(LayerBase):
    """softmax(q k^T / sqrt(head_dim) [+ causal mask]) v, heads concatenated, then projected.

    Kernels in flax's layout: query/key/value (dim, heads, head_dim), output
    (heads, head_dim, dim); biases (heads, head_dim) and (dim,).
    """

    heads: int
    name: str
    head_dim: int = 0  # 0: dim // heads
    causal: bool = False
    # LoRA: rank 0 is off. Each target projection W gets x W + (lora_alpha / lora_rank) x A B,
    # A drawn from the seed (Glorot over (in, rank)), B zero, so the output starts unchanged.
    lora_rank: int = 0
    lora_alpha: float = 1.0
    lora_targets: tuple[str, ...] = LORA_TARGETS
    kernel_init: str = "glorot_uniform"
    init_std: float = EMBEDDING_STD  # q, k, v kernels with kernel_init "normal"
    out_init_std: float = EMBEDDING_STD  # the output kernel's (GPT-2: 0.02 / sqrt(2 layers), a residual projection)
    kind: str = field(default="multiheadselfattention", init=False)

    def __post_init__(self):
        _positive_int(self, "heads")
        require(isinstance(self.head_dim, int) and self.head_dim >= 0,
                f"layer {self.name!r}: head_dim must be a non-negative int, got {self.head_dim!r}")
        require(isinstance(self.causal, bool), f"layer {self.name!r}: causal must be true or false")
        require(isinstance(self.lora_rank, int) and not isinstance(self.lora_rank, bool) and self.lora_rank >= 0,
                f"layer {self.name!r}: lora_rank must be a non-negative int, got {self.lora_rank!r}")
        _in_range(self, "lora_alpha", 0, math.inf, "be positive")
        require(bool(self.lora_targets) and set(self.lora_targets) <= set(LORA_TARGETS)
                and len(set(self.lora_targets)) == len(self.lora_targets),
                f"layer {self.name!r}: lora_targets must be distinct names of {', '.join(LORA_TARGETS)}")
        _kernel_init(self, "init_std", "out_init_std")

    def lora_scale(self) -> float:
        return self.lora_alpha / self.lora_rank

    def lora_adapts(self, target: str) -> bool:
        """Whether LoRA adds a term to projection `target` (one of LORA_TARGETS)."""
        return bool(self.lora_rank) and target in self.lora_targets

    def lora(self, target: str, x, a, b, *, einsum):
        """LoRA's term (alpha / r) (x A) B, added to projection `target`'s output x W + bias: the one
        formula every adapter applies, with its framework's `einsum` (numpy's signature) and A, B
        (`<target>_lora_a`, `<target>_lora_b`) in the canonical layouts (lora_params)."""
        xa, out = LORA_EINSUMS[target]
        return self.lora_scale() * einsum(out, einsum(xa, x, a), b)

    def dims(self, x) -> tuple[int, int, int]:
        """(dim, heads, head_dim) for a (seq, dim) input."""
        d = x[-1]
        # Without head_dim the heads split the features: a remainder would drop features silently.
        require(self.head_dim or d % self.heads == 0,
                f"layer {self.name!r}: {d} features are not a multiple of heads {self.heads} (or set head_dim)")
        hd = self.head_dim or d // self.heads
        return d, self.heads, hd

    def out_shape(self, x):
        _rank(self, x, (2,), "a (seq, features) input")
        self.dims(x)
        return tuple(x)

    def params(self, x):
        d, h, hd = self.dims(x)
        qkv = [p for part in ("query", "key", "value")
               for p in (_kernel(self, f"{part}_kernel", (d, h, hd), (d, h * hd), self.init_std),
                         Param(f"{part}_bias", (h, hd)))]
        base = (*qkv, _kernel(self, "out_kernel", (h, hd, d), (h * hd, d), self.out_init_std), Param("out_bias", (d,)))
        return base + self.lora_params(x)

    def lora_params(self, x) -> tuple[Param, ...]:
        """A (in, r) and B (r, out) per target, in LORA_TARGETS order, each side in its kernel's layout:
        query/key/value A (D, r), B (r, heads, head_dim); out A (heads, head_dim, r), B (r, D)."""
        if not self.lora_rank:
            return ()
        d, h, hd, r = *self.dims(x), self.lora_rank
        out = []
        for t in (t for t in LORA_TARGETS if t in self.lora_targets):
            a_shape, b_shape, fan_in = ((h, hd, r), (r, d), h * hd) if t == "out" else ((d, r), (r, h, hd), d)
            out += [Param(f"{t}_lora_a", a_shape, "glorot_uniform", (fan_in, r)), Param(f"{t}_lora_b", b_shape)]
        return tuple(out)

    def flops(self, x):
        t, (d, h, hd) = x[0], self.dims(x)
        lora = 2 * t * self.lora_rank * (d + h * hd) * len(self.lora_targets) if self.lora_rank else 0
        return 2 * t * d * h * hd * 4 + 2 * 2 * t * t * h * hd + lora  # q, k, v, out projections; scores, mix


@dataclass(frozen=True)
class Residual(LayerBase):
    """x + body(x); the body must keep the shape. Nestable; its layers' names are global."""

    name: str
    body: tuple = ()
    kind: str = field(default="residual", init=False)

    def __post_init__(self):
        require(bool(self.body), f"layer {self.name!r}: a residual needs a body")

    def children(self):
        return tuple(self.body)

    def out_shape(self, x):
        y = x
        for layer in self.body:
            y = layer.out_shape(y)
        require(tuple(y) == tuple(x), f"layer {self.name!r}: the body maps {tuple(x)} to {tuple(y)}; "
                "a residual needs the same shape back")
        return tuple(x)


Layer = (Dense | Activation | Conv2D | MaxPool2D | AvgPool2D | GlobalAvgPool2D | Flatten | Reshape | BatchNorm
         | LayerNorm | Dropout | Embedding | PositionalEmbedding | MultiHeadSelfAttention | Residual)
# kind -> class: what task files and saved specs are read with.
LAYER_TYPES = {cls.__dataclass_fields__["kind"].default: cls for cls in Layer.__args__}
KINDS = tuple(LAYER_TYPES)
