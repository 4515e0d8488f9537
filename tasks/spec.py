"""TaskSpec: a model (layers), an optimizer and a training budget; it walks its layers for every derived fact."""

from __future__ import annotations

import collections
import dataclasses
import math
import re
from dataclasses import dataclass, field

from tasks.datasets import is_text
from tasks.layers import (  # noqa: F401 - re-exported: tasks.spec is where task modules import from
    KINDS,
    Activation,
    AvgPool2D,
    BatchNorm,
    Conv2D,
    Dense,
    Dropout,
    Embedding,
    Flatten,
    GlobalAvgPool2D,
    Layer,
    LayerNorm,
    MaxPool2D,
    MultiHeadSelfAttention,
    Param,
    PositionalEmbedding,
    Reshape,
    Residual,
    SpecError,
    require,
)
from tasks.optim import SGD, Adam, AdamW, Constant, Optimizer, WarmupCosine  # noqa: F401 - re-exported

# A name that may become a file name (checkpoints, export folders): letters, digits, '-', '_',
# '.' not leading, so never '..', a hidden file or a path separator. harness.confine uses it too.
SAFE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}")
MAX_SEED = 2**32 - 1  # every framework's generator takes a 32-bit seed


class WeightsError(ValueError):
    """Canonical weights that do not fit the task: wrong count or a wrong shape."""


@dataclass(frozen=True)
class ParamEntry:
    """One canonical array in spec order: `<layer>.<param>`, its layer and its Param."""

    name: str
    layer: str
    param: Param
    layer_index: int  # index among the layers that have parameters: the weights' random stream


@dataclass(frozen=True)
class Stage:
    """One training phase: which classes, where its weights start, what trains."""

    name: str
    classes: tuple[int, ...] | None = None  # None: every class; else relabelled 0..k-1
    init: str = "seed"  # "seed": fresh canonical weights; "previous": the last stage's; or an earlier stage's name
    # None: every parameter layer. Names are layers, or single arrays `<layer>.<param>` (LoRA
    # adapters trained alone: "block0_attn_mhsa.query_lora_a").
    trainable: tuple[str, ...] | None = None
    reinit: tuple[str, ...] = ()  # layers redrawn from the seed before training
    # Another corpus for this stage (a --data value, e.g. "licenses"), for tasks whose stages
    # change domain (tiny-gpt-finetune); None: the run's data. With synthetic run data the
    # stage gets synthetic data of another seed (another domain), labelled synthetic.
    data: str | None = None
    # This stage is the control of the named stage: the same budget from fresh weights, so the
    # task's derived figures (TaskSpec.stage_figures) say whether that stage's start helped.
    control_for: str | None = None


def walk(layers, shape):
    """Yield (layer, input shape, output shape) depth first: a composite, then its body, in spec order."""
    for layer in layers:
        yield layer, tuple(shape), layer.out_shape(shape)
        yield from walk(layer.children(), shape)
        shape = layer.out_shape(shape)


@dataclass(frozen=True)
class TaskSpec:
    name: str
    dataset: str
    input_shape: tuple[int, ...]  # without the batch axis: HWC images, or (seq,) token ids
    layers: tuple[Layer, ...]
    optimizer: Optimizer
    batch_size: int
    epochs: int
    target_accuracy: float
    seed: int = 0
    # The loss is fixed, not configurable: softmax cross-entropy on the logits of the
    # last Dense layer with integer labels (one per sample, or one per position when the
    # logits are (seq, classes)). Tutorials that put softmax before CrossEntropyLoss, or
    # a single sigmoid unit under ten classes, cannot be written.
    loss: str = field(default="softmax_cross_entropy_integer_labels", init=False)
    stages: tuple[Stage, ...] = (Stage(name="train"),)
    primary_stage: str = "train"  # the stage whose metrics head the record
    eval_batch_size: int = 1000
    num_classes: int = 10
    # Loss-based tasks (language models) reach their target when the held-out loss falls
    # to this; None: only target_accuracy counts.
    target_loss: float | None = None

    def __post_init__(self):
        # The task and stage names become file names (checkpoints, report folders): safe names only.
        require(isinstance(self.name, str) and SAFE_NAME.fullmatch(self.name) is not None,
                f"task name {self.name!r} is not a safe name (letters, digits, '-', '_', '.' not leading; "
                "at most 128)")
        require(bool(self.layers), f"task {self.name!r}: no layers")
        require(isinstance(self.seed, int) and 0 <= self.seed <= MAX_SEED,
                f"task {self.name!r}: seed must be in [0, {MAX_SEED}], got {self.seed!r}")
        counts = collections.Counter(layer.name for layer, _, _ in self.walk())  # linear: specs can be long
        dupes = sorted(n for n, c in counts.items() if c > 1)
        require(not dupes, f"task {self.name!r}: layer name used twice: {', '.join(dupes)}")
        require(self.batch_size > 0, f"task {self.name!r}: batch_size must be positive")
        require(self.eval_batch_size > 0, f"task {self.name!r}: eval_batch_size must be positive")
        require(self.epochs > 0, f"task {self.name!r}: epochs must be positive")
        require(0 < self.target_accuracy <= 1, f"task {self.name!r}: target_accuracy must lie in (0, 1]")
        require(self.target_loss is None or self.target_loss > 0, f"task {self.name!r}: target_loss must be positive")
        last = self.layers[-1]
        require(isinstance(last, Dense) and last.activation == "linear",
                 f"task {self.name!r}: the last layer must be a linear Dense (logits); "
                 "the loss applies softmax itself")
        stage_names = [s.name for s in self.stages]
        bad = [n for n in stage_names if not (isinstance(n, str) and SAFE_NAME.fullmatch(n))]
        require(not bad, f"task {self.name!r}: stage name {bad[0]!r} is not a safe name" if bad else "")
        require(len(set(stage_names)) == len(stage_names), f"task {self.name!r}: stage name used twice")
        require(self.primary_stage in stage_names,
                 f"task {self.name!r}: primary_stage {self.primary_stage!r} is not a stage")
        param_names = set(self.param_layer_names()) | {e.name for e in self.params()}
        decay = getattr(self.optimizer, "decay", "all")
        require(not isinstance(decay, tuple) or set(decay) <= param_names,
                f"task {self.name!r}: optimizer decay names unknown arrays {sorted(set(decay) - param_names)}")
        for i, stage in enumerate(self.stages):
            n_out = len(stage.classes) if stage.classes is not None else self.num_classes
            require(last.units == n_out,
                     f"task {self.name!r} stage {stage.name!r}: the head has {last.units} units "
                     f"but the stage trains {n_out} classes")
            if stage.classes is not None:
                require(all(0 <= c < self.num_classes for c in stage.classes)
                         and len(set(stage.classes)) == len(stage.classes),
                         f"stage {stage.name!r}: classes must be distinct and in [0, {self.num_classes})")
            require(stage.init in ("seed", "previous", *stage_names[:i]),
                     f"stage {stage.name!r}: init must be 'seed', 'previous' or an earlier stage's name, "
                     f"got {stage.init!r}")
            require(i > 0 or stage.init == "seed", f"stage {stage.name!r}: the first stage has no previous")
            require(stage.control_for in (None, *stage_names) and stage.control_for != stage.name,
                    f"stage {stage.name!r}: control_for must name another stage, got {stage.control_for!r}")
            for group, valid in (("trainable", param_names), ("reinit", set(self.param_layer_names()))):
                unknown = set(getattr(stage, group) or ()) - valid
                require(not unknown,
                         f"stage {stage.name!r}: {group} names unknown parameter layers {sorted(unknown)}; "
                         f"valid: {sorted(valid)}")
        tables = {}
        for layer, shape, out in self.walk():
            require(all(d > 0 for d in out), f"layer {layer.name!r}: output shape {out} is empty")
            if isinstance(layer, Embedding):
                tables[layer.name] = (layer.vocab_size, layer.dim)
            if isinstance(layer, Dense) and layer.tied_to:
                want = (layer.units, shape[-1])
                require(tables.get(layer.tied_to) == want,
                        f"layer {layer.name!r}: tied_to must name an earlier Embedding with a {want} table, "
                        f"got {layer.tied_to!r}" + (f" {tables[layer.tied_to]}" if layer.tied_to in tables else ""))
        # The loss takes one row of logits per label: one label per sample, or, for token ids, one
        # per position (a text corpus has only those).
        head, per_sample, per_position = self.layer_shapes()[-1], (last.units,), (self.input_shape[0], last.units)
        valid = [per_position] if is_text(self.dataset) else [per_sample] + [per_position] * self.takes_tokens
        require(head in valid, f"task {self.name!r}: the head {last.name!r} outputs {head} per sample but the "
                f"labels need logits {' or '.join(map(str, valid))}"
                + (" (a Flatten before the head?)" if len(head) > len(valid[0]) else ""))

    def stage_figures(self, stages: dict[str, dict]) -> dict:
        """Figures that compare this task's stages, from their metrics by stage name (what ran of them).

        A multi-stage token model reports each stage's held-out loss and trainable size; a
        stage with a control (Stage.control_for) reports its figures beside the control's.
        """
        figures = {}
        if self.takes_tokens and len(stages) > 1:
            figures["stage_test_loss"] = {name: m["test_loss"] for name, m in stages.items()}
            figures["stage_params_trainable"] = {name: m["params_trainable"] for name, m in stages.items()}
        for control in self.stages:
            treated = stages.get(control.control_for)
            if control.control_for is None or treated is None or control.name not in stages:
                continue
            scratch = stages[control.name]
            if self.takes_tokens:
                figures["scratch_loss"] = scratch["test_loss"]
            figures.update(finetuned_accuracy=treated["test_accuracy"], scratch_accuracy=scratch["test_accuracy"],
                           frozen_train_samples_per_s=treated["train_samples_per_s"],
                           full_train_samples_per_s=scratch["train_samples_per_s"])
        return figures

    # -- derived facts, computed by walking the layers ------------------------------------

    def walk(self):
        """(layer, input shape, output shape) for every layer, composites before their bodies."""
        return walk(self.layers, self.input_shape)

    @property
    def objective(self) -> str:
        """What the task is judged by: "loss" (held-out loss, lower is better) where it sets target_loss, else
        "accuracy". Written into every record, so no reader infers it."""
        return "loss" if self.target_loss is not None else "accuracy"

    @property
    def takes_tokens(self) -> bool:
        """Whether the input is int32 token ids (an Embedding first) rather than float32 features."""
        return isinstance(self.layers[0], Embedding)

    @property
    def any_length(self) -> bool:
        """Whether the model takes token windows of any length up to the context: a language model
        (token ids in, logits per position out) whose layers keep the sequence axis throughout."""
        return self.takes_tokens and all(len(out) == 2 and out[0] == self.input_shape[0] for _, _, out in self.walk())

    def layer_shapes(self) -> list[tuple[int, ...]]:
        """Output shape (without batch) of every top-level layer."""
        shape, shapes = tuple(self.input_shape), []
        for layer in self.layers:
            shape = layer.out_shape(shape)
            shapes.append(shape)
        return shapes

    def params(self) -> list[ParamEntry]:
        """Every canonical array, flat in spec order: the order of the weights list."""
        entries, index = [], 0
        for layer, shape, _ in self.walk():
            params = layer.params(shape)
            entries += [ParamEntry(f"{layer.name}.{p.name}", layer.name, p, index) for p in params]
            index += bool(params)
        return entries

    def param_layer_names(self) -> list[str]:
        return list(dict.fromkeys(e.layer for e in self.params()))

    @staticmethod
    def trains(entry: ParamEntry, trainable: tuple[str, ...] | None) -> bool:
        """Whether a stage with this `trainable` updates the array: learned, and its layer or itself named."""
        return entry.param.trainable and (trainable is None or entry.layer in trainable or entry.name in trainable)

    def decays(self, entry: ParamEntry) -> bool:
        """Whether AdamW's weight decay applies to this (trainable) array; False for other optimizers."""
        o = self.optimizer
        return o.kind == "adamw" and o.weight_decay > 0 and o.decays(entry.name, entry.layer, entry.param.shape)

    def param_count(self, trainable: tuple[str, ...] | None = None) -> int:
        """Learned parameters (running statistics excluded) of the named layers or arrays (None: all)."""
        return sum(math.prod(e.param.shape) for e in self.params() if self.trains(e, trainable))

    def check_weights(self, weights, *, source: str = "weights") -> None:
        """The one weights validator: raise WeightsError naming the first array that does not fit."""
        entries = self.params()
        if len(weights) != len(entries):
            raise WeightsError(f"{source}: {len(weights)} arrays, task {self.name!r} needs {len(entries)}")
        for entry, array in zip(entries, weights):
            if tuple(array.shape) != entry.param.shape:
                raise WeightsError(f"{source}: {entry.name} has shape {tuple(array.shape)}, "
                                   f"task {self.name!r} needs {entry.param.shape}")

    def train_flops_per_sample(self, trainable: tuple[str, ...] | None = None) -> int:
        """Training FLOPs per sample of the matmul-like layers (see LayerBase.flops).

        Forward: 2 x multiply-adds per layer. Backward: 2 x forward for every layer from
        the lowest trainable one up (its weight gradient and its input gradient), the
        usual 1:2 rule; with nothing frozen that is 3 x forward. Frozen layers below
        the lowest trainable one cost their forward pass only.
        """
        trains = {e.layer for e in self.params() if self.trains(e, trainable)}
        per_layer = [(layer.name, layer.flops(shape)) for layer, shape, _ in self.walk()
                     if not layer.children()]  # a composite's cost is its body's
        lowest = next((i for i, (name, _) in enumerate(per_layer) if name in trains), len(per_layer))
        return sum(f for _, f in per_layer) + sum(2 * f for _, f in per_layer[lowest:])

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)

    def sized_for(self, steps_per_epoch: int) -> TaskSpec:
        """This spec with its schedule's open lengths filled in: epochs x steps_per_epoch steps in all."""
        schedule = self.optimizer.schedule.sized(self.epochs * steps_per_epoch)
        return dataclasses.replace(self, optimizer=dataclasses.replace(self.optimizer, schedule=schedule))

    def with_overrides(self, **changes) -> TaskSpec:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
