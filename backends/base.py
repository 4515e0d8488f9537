"""The one backend interface: public methods enforce the contract, adapters implement hooks. No framework import."""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tasks.spec import TaskSpec

MODES = ("compiled", "eager")  # what a model is built and trained in
# What a run may ask for: "best" probes both MODES on each cell and trains in the faster (harness/probe.py).
BEST = "best"
RUN_MODES = (BEST, *MODES)
DEVICES = ("auto", "cpu", "gpu")
# fp64: float64 weights, data and arithmetic throughout, so that two computations of the same
# math (N replicas vs one device, eager vs compiled, backend vs backend) agree to ~1e-12 on
# any CPU; float32 rounding, which kernels amplify differently per CPU, is out of the picture.
PRECISIONS = ("fp32", "tf32", "bf16", "fp64")
# Deployment formats `tribench run --export` writes: ONNX (served by ONNX Runtime) and each
# framework's own (torch.export, a Keras SavedModel, jax.export's serialized StableHLO).
EXPORT_FORMATS = ("onnx", "native")


@dataclass(frozen=True)
class Replicas:
    """Data-parallel replicas of one cell: each step's global batch is split evenly over `count`.

    Replica r of a step takes the r-th contiguous slice of that step's global batch; the
    gradient is the mean over the whole global batch, as one device computes it.
    """

    count: int = 1
    rank: int = 0  # this process's replica, for backends whose replicas are processes
    address: str | None = None  # "host:port" where replica processes meet (rank 0 listens)

    def __post_init__(self):
        if self.count < 1:
            raise ValueError(f"data-parallel replicas must be >= 1, got {self.count}")
        if not 0 <= self.rank < self.count:
            raise ValueError(f"replica rank {self.rank} is outside 0..{self.count - 1}")


@dataclass(frozen=True)
class InferencePath:
    """A trained model served by its framework: no gradients, compiled or not as the model's mode says.

    `put(x)` makes a device-resident input from a host array (the host-to-device copy,
    finished when it returns); `run(xd)` computes the logits and returns once they are
    ready on the device; `name` says what runs (e.g. "torch.inference_mode + torch.compile").
    """

    put: Callable[[np.ndarray], Any]
    run: Callable[[Any], Any]
    name: str


@dataclass(frozen=True)
class Generator:
    """Greedy decoding with a KV cache, for one batch size and prompt length.

    `put(prompts)` puts (batch, prompt_len) int32 ids on the device; `first(xd)` fills the
    cache from the prompts and returns the first new token once it is ready (the time to
    first token); `rest(state)` decodes the other new tokens from `first`'s state and returns
    every new id as a host (batch, new_tokens) int32 array; `name` says what runs.
    """

    put: Callable[[np.ndarray], Any]
    first: Callable[[Any], Any]
    rest: Callable[[Any], np.ndarray]
    name: str


class ExportUnsupported(RuntimeError):
    """The adapter has no exporter for this format (the message says why)."""


@dataclass(frozen=True)
class Exported:
    """A trained model written in a deployment format and loaded back in the runtime that serves it.

    `files`: what was written; `serve`: the runtime's inference path (its `put` takes canonical
    host arrays); `logits(x)`: host float32 logits from the runtime, for the parity check;
    `exporter`: what wrote it and what serves it.
    """

    files: tuple[Path, ...]
    serve: InferencePath
    logits: Callable[[np.ndarray], np.ndarray]
    exporter: str


def is_causal_lm(spec: TaskSpec) -> bool:
    """Whether the model reads token ids through causal attention: a language model that can generate."""
    return spec.takes_tokens and any(layer.kind == "multiheadselfattention" and layer.causal
                                     for layer, _, _ in spec.walk())


@dataclass
class ModelHandle:
    """A built model as the base class sees it: what `build` was asked for. Each adapter's handle
    extends it with its framework's state; the base class and the harness read these fields only."""

    spec: TaskSpec
    trainable_layers: tuple[str, ...] | None  # the trainable names build was given (None: all)
    mode: str  # the mode whose program it runs (Backend.execution)
    # What Backend.warmup compiled it for (Backend._warm_key), set on the instance: not a field, so
    # adapters' handles may add fields without defaults.
    warmed_for = None


class BackendUnavailable(RuntimeError):
    """The backend cannot run here: framework missing, or the device asked for absent."""


class Backend(abc.ABC):
    """What every framework adapter supplies; the training loop itself is the harness's.

    The public methods below hold the rules for every backend (checked once, here) and
    call the protected hooks `_configure`, `_build`, ... that an adapter implements.

    Canonical weights: float32 (fp64: float64) numpy arrays flat in spec order (`spec.params()`), each
    in the layout tasks/README.md writes down; images NHWC, token ids int32. Loss:
    softmax cross-entropy on logits with integer labels. The optimizer, schedule and
    clipping follow spec.optimizer exactly (tasks/optim.py).
    """

    name: str = ""  # registry key, e.g. "torch"
    # True: data-parallel replicas are processes (torch DDP), so the harness starts one
    # process per replica, each making the same calls in the same order; rank 0 reports.
    # False: one process drives every replica (tf.distribute, jax.sharding).
    REPLICA_PROCESSES: bool = False
    # The adapter's tables, checked for coverage of a spec before anything is built or traced:
    # layer kind -> its implementation; activation name -> the framework's; optimizer kind ->
    # its pinned form (tasks/optim.py) in the framework.
    LAYERS: dict = {}
    ACTIVATIONS: dict = {}
    OPTIMIZERS: dict = {}
    # mode -> the program it runs, as the framework names it (docs/modes.md), e.g. "jax lax.scan epoch";
    # a mode missing here is named "<backend> <mode>".
    EXECUTIONS: dict[str, str] = {}

    _configured = False
    replicas: Replicas = Replicas()
    float_dtype: type = np.float32  # of weights, features, losses and logits: float64 under precision fp64

    # -- set-up --------------------------------------------------------------------------

    def configure(self, *, device: str, threads: int, precision: str, replicas: Replicas = Replicas()) -> None:
        """Import the framework and pin device, thread pools, precision and data-parallel replicas.

        Called once per process before anything else; `self.replicas` is set before
        `_configure` runs, as the replica devices must exist before the framework starts
        (N logical CPU devices on a CPU). Raises BackendUnavailable when `device`
        ("cpu" | "gpu" | "auto") or `replicas.count` devices cannot be had.
        """
        if device not in DEVICES:
            raise ValueError(f"unknown device {device!r}; valid: {', '.join(DEVICES)}")
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
        if replicas.rank and not self.REPLICA_PROCESSES:
            raise ValueError(f"{self.name}: one process drives every replica; rank must be 0")
        if self.REPLICA_PROCESSES and replicas.count > 1 and not replicas.address:
            raise ValueError(f"{self.name}: replica processes need an address to meet at")
        self.replicas = replicas
        self.float_dtype = np.float64 if precision == "fp64" else np.float32
        self._configure(device=device, threads=threads, precision=precision)
        self._configured = True

    @abc.abstractmethod
    def import_framework(self) -> None:
        """Import the framework and set nothing (no device, threads or precision): harness.forkserver's
        zygote imports it once and forks a worker per cell, which then calls configure."""

    def _require_configured(self) -> None:
        if not self._configured:
            raise RuntimeError(f"{type(self).__name__}.configure() must be called first")

    def environment(self) -> dict:
        """framework, framework_version (one string: "2.21.0 (keras 3.15.1)"), device ("cpu" | "gpu": the one
        actually used), device_name (e.g. the GPU model), threads, precision."""
        self._require_configured()
        return self._environment()

    def synchronize(self) -> None:
        """Wait until all queued device work has finished (for honest timing)."""
        self._require_configured()
        self._synchronize()

    def memory(self) -> dict:
        """Device allocator statistics: {"device_peak_mb": float | None}; with replicas also
        "replica_peak_mb": [one per replica device, or None where the framework reports none]."""
        self._require_configured()
        return self._memory()

    def execution(self, spec: TaskSpec, mode: str) -> tuple[str, str]:
        """(the mode whose program `mode` runs for this spec here, that program's name).

        A mode that would run the same program as another is that other mode: built, probed
        and recorded as it (JAX's "compiled" for a model with convolutions on a CPU is "eager").
        """
        self._require_configured()
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; valid: {', '.join(MODES)}")
        runs = self._runs_as(spec, mode)
        return runs, self.EXECUTIONS.get(runs) or f"{self.name} {runs}"

    def distinct_modes(self, spec: TaskSpec) -> tuple[str, ...]:
        """The MODES that run different programs for this spec here: what --mode best chooses between."""
        return tuple(dict.fromkeys(self.execution(spec, mode)[0] for mode in MODES))

    # -- data and model ------------------------------------------------------------------

    def put_data(self, x: np.ndarray, y: np.ndarray) -> Any:
        """Move a dataset to the device once; returns a handle.

        x: float features (NHWC images, cast to float_dtype), or integer token ids (kept as int32); y: int32
        labels, one per sample or one per position.
        """
        self._require_configured()
        if len(x) != len(y):
            raise ValueError(f"x has {len(x)} samples but y has {len(y)}")
        return self._put_data(self._features(x), np.asarray(y, np.int32))

    def _features(self, x) -> np.ndarray:
        """Token ids as int32, anything else as float_dtype."""
        x = np.asarray(x)
        return x.astype(np.int32 if np.issubdtype(x.dtype, np.integer) else self.float_dtype, copy=False)

    def build(self, spec: TaskSpec, weights: list[np.ndarray], *,
              trainable: tuple[str, ...] | None, mode: str) -> ModelHandle:
        """Build spec.layers with these canonical weights and a fresh spec.optimizer.

        Only the layers named in `trainable` (None: all) are updated, and the backward
        pass must not compute gradients for the others; a frozen BatchNorm uses its
        running statistics.
        """
        self._require_configured()
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; valid: {', '.join(MODES)}")
        names = spec.param_layer_names()
        unknown = set(trainable or ()) - set(names) - {e.name for e in spec.params()}
        if unknown:
            raise ValueError(f"trainable names unknown parameter layers {sorted(unknown)}; valid: {names}")
        missing = self.uncovered(spec)
        if missing:
            raise ValueError(f"{self.name}: no implementation of {', '.join(missing)}")
        spec.check_weights(weights)
        mode = self.execution(spec, mode)[0]
        model = self._build(spec, [np.asarray(w, self.float_dtype) for w in weights], trainable=trainable, mode=mode)
        if not isinstance(model, ModelHandle):
            raise TypeError(f"{self.name}: _build returned a {type(model).__name__}, not a ModelHandle")
        return model

    def uncovered(self, spec: TaskSpec) -> list[str]:
        """What `spec` uses that this adapter's tables lack, named ("layer kind conv3d", "optimizer lion")."""
        kinds = {layer.kind for layer, _, _ in spec.walk()}
        activations = {layer.activation for layer, _, _ in spec.walk() if hasattr(layer, "activation")}
        return ([f"layer kind {k}" for k in sorted(kinds - set(self.LAYERS))]
                + [f"activation {a}" for a in sorted(activations - set(self.ACTIVATIONS))]
                + ([f"optimizer {spec.optimizer.kind}"] if spec.optimizer.kind not in self.OPTIMIZERS else []))

    def get_weights(self, model: ModelHandle) -> list[np.ndarray]:
        """The current weights in canonical layout (fresh copies in float_dtype), running statistics included."""
        self._require_configured()
        return self._get_weights(model)

    def set_weights(self, model: ModelHandle, weights: list[np.ndarray]) -> None:
        """Load canonical weights and reset the optimizer state (moments, step count, schedule)."""
        self._require_configured()
        model.spec.check_weights(weights)
        self._set_weights(model, [np.asarray(w, self.float_dtype) for w in weights])

    # -- primitive steps the harness loop calls -----------------------------------------

    def train_epoch(self, model: ModelHandle, data: Any, order: np.ndarray, batch_size: int) -> np.ndarray:
        """One optimizer step per batch; batch i is samples order[i*batch_size:(i+1)*batch_size].

        Returns the per-step losses in float_dtype, read from the device once at the end (no
        per-step host sync). With replicas, each loss is the mean over the global batch (the
        same on every replica process), and the weights after the step equal one device's
        up to float32 summation order.
        """
        self._require_configured()
        order = np.asarray(order)
        if batch_size <= 0 or len(order) % batch_size:
            raise ValueError(f"len(order)={len(order)} is not a multiple of batch_size={batch_size}")
        if batch_size % self.replicas.count:
            raise ValueError(f"batch_size={batch_size} does not split over {self.replicas.count} replicas")
        if len(order) and not model.spec.param_count(model.trainable_layers):
            raise RuntimeError("no trainable parameter layers: nothing to train")
        return self._train_epoch(model, data, order.astype(np.int32, copy=False), int(batch_size))

    def evaluate(self, model: ModelHandle, data: Any, batch_size: int) -> tuple[float, float]:
        """(mean loss, accuracy) over the whole dataset (every position), the last partial batch included;
        with replicas, the same figures on every replica process."""
        self._require_configured()
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        return self._evaluate(model, data, int(batch_size))

    def logits(self, model: ModelHandle, x: np.ndarray) -> np.ndarray:
        """Forward pass in evaluation mode on a host array; returns logits in float_dtype (for parity checks).

        A language model (spec.any_length) takes windows of any length up to its context: causal
        logits of a prefix are the full window's first positions."""
        self._require_configured()
        x = np.asarray(x)
        spec = model.spec
        if spec.any_length:  # a window of any length from 1 up to the context, on every backend
            if x.ndim != 2 or not 1 <= x.shape[1] <= spec.input_shape[0]:
                raise ValueError(f"token logits need (batch, length) ids with 1 <= length <= {spec.input_shape[0]}, "
                                 f"got shape {x.shape}")
        elif tuple(x.shape[1:]) != tuple(spec.input_shape):
            raise ValueError(f"logits need inputs of shape (batch, {', '.join(map(str, spec.input_shape))}), "
                             f"got {x.shape}")
        return self._logits(model, self._features(x))

    def inference(self, model: ModelHandle) -> InferencePath:
        """The model's forward pass as its framework serves it (see InferencePath); the harness times it."""
        self._require_configured()
        path = self._inference(model)
        return InferencePath(put=lambda x: path.put(self._features(x)), run=path.run, name=path.name)

    def generator(self, model: ModelHandle, *, batch: int, prompt_len: int, new_tokens: int) -> Generator:
        """Greedy decoding with a KV cache (see Generator) for a causal language model."""
        self._require_configured()
        spec = model.spec
        if not is_causal_lm(spec):
            raise ValueError(f"{spec.name}: generation needs a causal language model")
        if prompt_len < 1 or new_tokens < 1 or prompt_len + new_tokens > spec.input_shape[0]:
            raise ValueError(f"{prompt_len} prompt + {new_tokens} new tokens do not fit the context "
                             f"{spec.input_shape[0]}")
        gen = self._generator(model, batch=batch, prompt_len=prompt_len, new_tokens=new_tokens)
        return Generator(put=lambda x: gen.put(self._features(x)), first=gen.first, rest=gen.rest, name=gen.name)

    def export(self, model: ModelHandle, fmt: str, folder: Path) -> Exported:
        """Write `model` in `fmt` (EXPORT_FORMATS) under `folder` and load it back in its runtime.

        Raises ExportUnsupported where the adapter has no exporter for `fmt`.
        """
        self._require_configured()
        if fmt not in EXPORT_FORMATS:
            raise ValueError(f"unknown export format {fmt!r}; valid: {', '.join(EXPORT_FORMATS)}")
        Path(folder).mkdir(parents=True, exist_ok=True)
        exported = self._export(model, fmt, Path(folder))
        serve = exported.serve
        return Exported(files=exported.files, exporter=exported.exporter,
                        logits=lambda x: np.asarray(exported.logits(self._features(x)), np.float32),
                        serve=InferencePath(put=lambda x: serve.put(self._features(x)), run=serve.run, name=serve.name))

    def rank0_value(self, value: Any) -> Any:
        """Rank 0's `value` on every replica process, so a choice made from timings (the
        best-mode probe) is the same everywhere; with one process, `value` itself."""
        self._require_configured()
        return self._rank0_value(value) if self.REPLICA_PROCESSES and self.replicas.count > 1 else value

    def warmup(self, model: ModelHandle, data: Any, order: np.ndarray, batch_size: int,
               eval_data: Any, eval_batch_size: int) -> None:
        """Compile and warm caches so that the timed epochs are steady state.

        The default (_warmup) runs one real step and one evaluation, then restores the
        weights and optimizer state, so training starts exactly where it would have. Adapters
        whose compiled code depends on the epoch length override the hook.
        """
        self._require_configured()
        key = self._warm_key(model, np.asarray(order), int(batch_size), int(eval_batch_size))
        if model.warmed_for == key:  # e.g. the --mode best probe's model: warmed, then timed in rounds
            return
        self._warmup(model, data, np.asarray(order), int(batch_size), eval_data, int(eval_batch_size))
        model.warmed_for = key

    def _warm_key(self, model: ModelHandle, order: np.ndarray, batch_size: int, eval_batch_size: int) -> tuple:
        """What a warm-up compiles for: by default the batch sizes (a step's code does not depend on how
        many steps an epoch has); adapters whose compiled code does add the epoch length."""
        return batch_size, eval_batch_size

    def _warmup(self, model: ModelHandle, data: Any, order: np.ndarray, batch_size: int,
                eval_data: Any, eval_batch_size: int) -> None:
        initial = self.get_weights(model)
        # One step compiles and runs all that every later step runs (a second added a GPT step's
        # second, ~1 s under TensorFlow on 2 cores, to every stage's warm-up).
        self.train_epoch(model, data, order[:batch_size], batch_size)
        self.evaluate(model, eval_data, eval_batch_size)
        self.synchronize()
        self.set_weights(model, initial)

    # -- the adapter's part --------------------------------------------------------------

    @abc.abstractmethod
    def _configure(self, *, device: str, threads: int, precision: str) -> None: ...

    @abc.abstractmethod
    def _environment(self) -> dict: ...

    @abc.abstractmethod
    def _synchronize(self) -> None: ...

    def _memory(self) -> dict:
        return {"device_peak_mb": None}

    def _runs_as(self, spec: TaskSpec, mode: str) -> str:
        """The mode whose program `mode` runs for this spec here; by default itself."""
        return mode

    def _rank0_value(self, value: Any) -> Any:
        raise NotImplementedError(f"{self.name}: replica processes need _rank0_value")

    @abc.abstractmethod
    def _put_data(self, x: np.ndarray, y: np.ndarray) -> Any: ...

    @abc.abstractmethod
    def _build(self, spec: TaskSpec, weights: list[np.ndarray], *, trainable: tuple[str, ...] | None,
               mode: str) -> ModelHandle:
        """The adapter's handle (a ModelHandle subclass) of the model built in `mode`."""

    @abc.abstractmethod
    def _get_weights(self, model: ModelHandle) -> list[np.ndarray]: ...

    @abc.abstractmethod
    def _set_weights(self, model: ModelHandle, weights: list[np.ndarray]) -> None: ...

    @abc.abstractmethod
    def _train_epoch(self, model: ModelHandle, data: Any, order: np.ndarray, batch_size: int) -> np.ndarray: ...

    @abc.abstractmethod
    def _evaluate(self, model: ModelHandle, data: Any, batch_size: int) -> tuple[float, float]: ...

    @abc.abstractmethod
    def _logits(self, model: ModelHandle, x: np.ndarray) -> np.ndarray: ...

    def _export(self, model: ModelHandle, fmt: str, folder: Path) -> Exported:
        raise ExportUnsupported(f"{self.name}: no {fmt} exporter")

    def _generator(self, model: ModelHandle, *, batch: int, prompt_len: int, new_tokens: int) -> Generator:
        raise NotImplementedError(f"{self.name}: no cached generation")

    def _inference(self, model: ModelHandle) -> InferencePath:
        # The fallback composed from _logits: host arrays in and out, so the copies are timed with it.
        return InferencePath(put=lambda x: x, run=lambda x: self._logits(model, x),
                             name=f"{self.name} logits (host arrays in and out)")
