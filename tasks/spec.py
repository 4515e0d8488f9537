"""Backend-neutral task specification: frozen dataclasses validated when built."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

ACTIVATIONS = ("relu", "linear")
PADDINGS = ("valid", "same")
# Where Adam's epsilon sits. "sqrt_v_hat" is the paper's Algorithm 1 and what torch
# and optax do: p -= lr * m_hat / (sqrt(v_hat) + eps). Keras adds eps to sqrt(v)
# before bias correction ("epsilon hat"); its adapter converts. One formulation is
# allowed so that no backend can silently run another.
EPSILON_PLACEMENTS = ("sqrt_v_hat",)


class SpecError(ValueError):
    """A task specification that cannot describe a valid model or run."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise SpecError(message)


@dataclass(frozen=True)
class Dense:
    units: int
    name: str
    activation: str = "linear"
    kind: str = field(default="dense", init=False)

    def __post_init__(self):
        _require(isinstance(self.units, int) and self.units > 0,
                 f"layer {self.name!r}: units must be a positive int, got {self.units!r}")
        _require(self.activation in ACTIVATIONS,
                 f"layer {self.name!r}: unknown activation {self.activation!r}; valid: {', '.join(ACTIVATIONS)}")


@dataclass(frozen=True)
class Conv2D:
    filters: int
    kernel_size: int
    name: str
    padding: str = "valid"
    activation: str = "linear"
    kind: str = field(default="conv2d", init=False)

    def __post_init__(self):
        _require(isinstance(self.filters, int) and self.filters > 0,
                 f"layer {self.name!r}: filters must be a positive int, got {self.filters!r}")
        _require(isinstance(self.kernel_size, int) and self.kernel_size > 0,
                 f"layer {self.name!r}: kernel_size must be a positive int, got {self.kernel_size!r}")
        _require(self.padding in PADDINGS,
                 f"layer {self.name!r}: unknown padding {self.padding!r}; valid: {', '.join(PADDINGS)}")
        _require(self.activation in ACTIVATIONS,
                 f"layer {self.name!r}: unknown activation {self.activation!r}; valid: {', '.join(ACTIVATIONS)}")


@dataclass(frozen=True)
class MaxPool2D:
    pool_size: int
    name: str
    kind: str = field(default="maxpool2d", init=False)

    def __post_init__(self):
        _require(isinstance(self.pool_size, int) and self.pool_size > 0,
                 f"layer {self.name!r}: pool_size must be a positive int, got {self.pool_size!r}")


@dataclass(frozen=True)
class Flatten:
    name: str
    kind: str = field(default="flatten", init=False)


Layer = Dense | Conv2D | MaxPool2D | Flatten
PARAM_KINDS = ("dense", "conv2d")


@dataclass(frozen=True)
class Adam:
    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-7
    epsilon_placement: str = "sqrt_v_hat"
    name: str = field(default="adam", init=False)

    def __post_init__(self):
        _require(self.lr > 0, f"Adam lr must be positive, got {self.lr}")
        _require(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "Adam betas must lie in [0, 1)")
        _require(self.eps > 0, f"Adam eps must be positive, got {self.eps}")
        _require(self.epsilon_placement in EPSILON_PLACEMENTS,
                 f"unknown epsilon_placement {self.epsilon_placement!r}; valid: {', '.join(EPSILON_PLACEMENTS)}")


@dataclass(frozen=True)
class Stage:
    """One training phase: which classes, where its weights start, what trains."""

    name: str
    classes: tuple[int, ...] | None = None  # None: every class; else relabelled 0..k-1
    init: str = "seed"  # "seed": fresh canonical weights; "previous": the last stage's
    trainable: tuple[str, ...] | None = None  # None: every parameter layer
    reinit: tuple[str, ...] = ()  # layers redrawn from the seed before training


@dataclass(frozen=True)
class TaskSpec:
    name: str
    dataset: str
    input_shape: tuple[int, ...]  # NHWC without the batch axis
    layers: tuple[Layer, ...]
    optimizer: Adam
    batch_size: int
    epochs: int
    target_accuracy: float
    seed: int = 0
    # The loss is fixed, not configurable: softmax cross-entropy on the logits of the
    # last Dense layer with integer labels. Tutorials that put softmax before
    # CrossEntropyLoss, or a single sigmoid unit under ten classes, cannot be written.
    loss: str = field(default="softmax_cross_entropy_integer_labels", init=False)
    stages: tuple[Stage, ...] = (Stage(name="train"),)
    primary_stage: str = "train"  # the stage whose metrics head the record
    eval_batch_size: int = 1000
    num_classes: int = 10

    def __post_init__(self):
        _require(bool(self.layers), f"task {self.name!r}: no layers")
        names = [layer.name for layer in self.layers]
        dupes = sorted({n for n in names if names.count(n) > 1})
        _require(not dupes, f"task {self.name!r}: layer name used twice: {', '.join(dupes)}")
        _require(self.batch_size > 0, f"task {self.name!r}: batch_size must be positive")
        _require(self.eval_batch_size > 0, f"task {self.name!r}: eval_batch_size must be positive")
        _require(self.epochs > 0, f"task {self.name!r}: epochs must be positive")
        _require(0 < self.target_accuracy <= 1, f"task {self.name!r}: target_accuracy must lie in (0, 1]")
        last = self.layers[-1]
        _require(isinstance(last, Dense) and last.activation == "linear",
                 f"task {self.name!r}: the last layer must be a linear Dense (logits); "
                 "the loss applies softmax itself")
        stage_names = [s.name for s in self.stages]
        _require(len(set(stage_names)) == len(stage_names), f"task {self.name!r}: stage name used twice")
        _require(self.primary_stage in stage_names,
                 f"task {self.name!r}: primary_stage {self.primary_stage!r} is not a stage")
        param_names = set(self.param_layer_names())
        for i, stage in enumerate(self.stages):
            n_out = len(stage.classes) if stage.classes is not None else self.num_classes
            _require(last.units == n_out,
                     f"task {self.name!r} stage {stage.name!r}: the head has {last.units} units "
                     f"but the stage trains {n_out} classes")
            if stage.classes is not None:
                _require(all(0 <= c < self.num_classes for c in stage.classes)
                         and len(set(stage.classes)) == len(stage.classes),
                         f"stage {stage.name!r}: classes must be distinct and in [0, {self.num_classes})")
            _require(stage.init in ("seed", "previous"),
                     f"stage {stage.name!r}: init must be 'seed' or 'previous', got {stage.init!r}")
            _require(i > 0 or stage.init == "seed", f"stage {stage.name!r}: the first stage has no previous")
            for group in ("trainable", "reinit"):
                unknown = set(getattr(stage, group) or ()) - param_names
                _require(not unknown,
                         f"stage {stage.name!r}: {group} names unknown parameter layers {sorted(unknown)}; "
                         f"valid: {sorted(param_names)}")
        self.layer_shapes()  # raises when the layers do not fit the input

    # -- derived facts, computed from the spec alone -----------------------------------

    def param_layer_names(self) -> list[str]:
        return [layer.name for layer in self.layers if layer.kind in PARAM_KINDS]

    def layer_shapes(self) -> list[tuple[int, ...]]:
        """Output shape (without batch) of every layer, in NHWC."""
        shape = tuple(self.input_shape)
        shapes = []
        for layer in self.layers:
            if layer.kind == "conv2d":
                _require(len(shape) == 3, f"layer {layer.name!r}: Conv2D needs an HWC input, got {shape}")
                h, w, _ = shape
                if layer.padding == "valid":
                    h, w = h - layer.kernel_size + 1, w - layer.kernel_size + 1
                shape = (h, w, layer.filters)
            elif layer.kind == "maxpool2d":
                _require(len(shape) == 3, f"layer {layer.name!r}: MaxPool2D needs an HWC input, got {shape}")
                shape = (shape[0] // layer.pool_size, shape[1] // layer.pool_size, shape[2])
            elif layer.kind == "flatten":
                shape = (math.prod(shape),)
            elif layer.kind == "dense":
                _require(len(shape) == 1, f"layer {layer.name!r}: Dense needs a flat input, got {shape}; "
                         "add a Flatten")
                shape = (layer.units,)
            _require(all(d > 0 for d in shape), f"layer {layer.name!r}: output shape {shape} is empty")
            shapes.append(shape)
        return shapes

    def param_shapes(self) -> list[tuple[str, tuple[int, ...], tuple[int, ...]]]:
        """(layer name, kernel shape, bias shape) per parameter layer, canonical layout."""
        out = []
        in_shape = tuple(self.input_shape)
        for layer, shape in zip(self.layers, self.layer_shapes()):
            if layer.kind == "dense":
                out.append((layer.name, (in_shape[0], layer.units), (layer.units,)))
            elif layer.kind == "conv2d":
                k = layer.kernel_size
                out.append((layer.name, (k, k, in_shape[2], layer.filters), (layer.filters,)))
            in_shape = shape
        return out

    def param_count(self, trainable: tuple[str, ...] | None = None) -> int:
        return sum(math.prod(k) + math.prod(b) for name, k, b in self.param_shapes()
                   if trainable is None or name in trainable)

    def train_flops_per_sample(self, trainable: tuple[str, ...] | None = None) -> int:
        """Training FLOPs per sample of the Dense and Conv2D layers (pooling is negligible).

        Forward: 2 x multiply-adds per layer. Backward: 2 x forward for every layer from
        the lowest trainable one up (its weight gradient and its input gradient), the
        usual 1:2 rule; with nothing frozen that is 3 x forward. Frozen layers below
        the lowest trainable one cost their forward pass only.
        """
        per_layer = []
        in_shape = tuple(self.input_shape)
        for layer, shape in zip(self.layers, self.layer_shapes()):
            if layer.kind == "dense":
                per_layer.append((layer.name, 2 * in_shape[0] * layer.units))
            elif layer.kind == "conv2d":
                macs = shape[0] * shape[1] * layer.filters * layer.kernel_size ** 2 * in_shape[2]
                per_layer.append((layer.name, 2 * macs))
            in_shape = shape
        lowest = next(i for i, (name, _) in enumerate(per_layer) if trainable is None or name in trainable)
        return sum(f for _, f in per_layer) + sum(2 * f for _, f in per_layer[lowest:])

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)

    def with_overrides(self, **changes) -> TaskSpec:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
