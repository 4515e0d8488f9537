"""The one backend interface. It names frameworks but never imports one."""

from __future__ import annotations

import abc
from typing import Any

import numpy as np

from tasks.spec import TaskSpec

MODES = ("compiled", "eager")
DEVICES = ("auto", "cpu", "gpu")
PRECISIONS = ("fp32", "tf32", "bf16")


class BackendUnavailable(RuntimeError):
    """The backend cannot run here: framework missing, or the device asked for absent."""


def check_options(*, device: str, precision: str) -> None:
    """Every adapter's configure() starts here, so all refuse the same bad values the same way."""
    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r}; valid: {', '.join(DEVICES)}")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")


def check_build(spec: TaskSpec, *, trainable: tuple[str, ...] | None, mode: str) -> list[str]:
    """Every adapter's build() starts here; returns the spec's parameter layer names."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; valid: {', '.join(MODES)}")
    names = spec.param_layer_names()
    unknown = set(trainable or ()) - set(names)
    if unknown:
        raise ValueError(f"trainable names unknown parameter layers {sorted(unknown)}; valid: {names}")
    return names


class Backend(abc.ABC):
    """What every framework adapter supplies; the training loop itself is the harness's.

    Canonical layout (framework-free): a list of float32 numpy arrays, kernel then bias
    for every parameter layer in spec order; Dense kernel (in, out), Conv2D kernel HWIO;
    images NHWC. Loss: softmax cross-entropy on logits with integer labels.
    Adam follows spec.optimizer exactly, epsilon placement included.
    """

    name: str = ""  # registry key, e.g. "torch"

    # -- set-up --------------------------------------------------------------------------

    @abc.abstractmethod
    def configure(self, *, device: str, threads: int, precision: str) -> None:
        """Import the framework and pin device, thread pools and precision.

        Called once per process before anything else. Raises BackendUnavailable when
        `device` ("cpu" | "gpu" | "auto") cannot be honoured.
        """

    @abc.abstractmethod
    def environment(self) -> dict:
        """framework, framework_version (one string: "2.21.0 (keras 3.15.1)"), device ("cpu" | "gpu": the one actually
        used), device_name (e.g. the GPU model), threads, precision."""

    @abc.abstractmethod
    def synchronize(self) -> None:
        """Wait until all queued device work has finished (for honest timing)."""

    def memory(self) -> dict:
        """Device allocator statistics: {"device_peak_mb": float | None}."""
        return {"device_peak_mb": None}

    # -- model ---------------------------------------------------------------------------

    @abc.abstractmethod
    def put_data(self, x: np.ndarray, y: np.ndarray) -> Any:
        """Move a dataset (x float32 NHWC, y int32) to the device once; returns a handle."""

    @abc.abstractmethod
    def build(self, spec: TaskSpec, weights: list[np.ndarray], *,
              trainable: tuple[str, ...] | None, mode: str) -> Any:
        """Build spec.layers with these canonical weights and a fresh spec.optimizer.

        Only the layers named in `trainable` (None: all) are updated, and the backward
        pass must not compute gradients for the others.
        """

    @abc.abstractmethod
    def get_weights(self, model: Any) -> list[np.ndarray]:
        """The current weights in canonical layout (fresh float32 copies)."""

    @abc.abstractmethod
    def set_weights(self, model: Any, weights: list[np.ndarray]) -> None:
        """Load canonical weights and reset the optimizer state to its initial value."""

    # -- primitive steps the harness loop calls -----------------------------------------

    @abc.abstractmethod
    def train_epoch(self, model: Any, data: Any, order: np.ndarray, batch_size: int) -> np.ndarray:
        """One Adam step per batch; batch i is samples order[i*batch_size:(i+1)*batch_size].

        len(order) is a multiple of batch_size. Returns the per-step losses as float32,
        read from the device once at the end (no per-step host sync).
        """

    @abc.abstractmethod
    def evaluate(self, model: Any, data: Any, batch_size: int) -> tuple[float, float]:
        """(mean loss, accuracy) over the whole dataset, the last partial batch included."""

    @abc.abstractmethod
    def logits(self, model: Any, x: np.ndarray) -> np.ndarray:
        """Forward pass on a host array; returns float32 logits (for parity checks)."""

    def warmup(self, model: Any, data: Any, order: np.ndarray, batch_size: int,
               eval_data: Any, eval_batch_size: int) -> None:
        """Compile and warm caches so that the timed epochs are steady state.

        The default runs a few real steps and one evaluation, then restores the weights
        and optimizer state, so training starts exactly where it would have. Adapters
        whose compiled code depends on the epoch length override this.
        """
        initial = self.get_weights(model)
        self.train_epoch(model, data, order[: 2 * batch_size], batch_size)
        self.evaluate(model, eval_data, eval_batch_size)
        self.synchronize()
        self.set_weights(model, initial)
