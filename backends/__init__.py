"""Backend registry: the only place that maps a backend name to its adapter."""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from backends.base import Backend


@dataclass(frozen=True)
class BackendInfo:
    name: str
    adapter: str  # "module:Class", imported only when the backend is used
    requires: tuple[str, ...]  # import names, checked with importlib.util.find_spec
    extra: str  # pip extra

    @property
    def install_hint(self) -> str:
        return f'pip install "tribench[{self.extra}]"'

    def missing(self) -> list[str]:
        import importlib.util

        return [m for m in self.requires if importlib.util.find_spec(m) is None]

    def available(self) -> bool:
        return not self.missing()


BACKENDS: dict[str, BackendInfo] = {
    info.name: info
    for info in (
        BackendInfo("torch", "backends.torch_backend:TorchBackend", ("torch",), "torch"),
        BackendInfo("tensorflow", "backends.tensorflow_backend:TensorFlowBackend",
                    ("tensorflow", "keras"), "tensorflow"),
        BackendInfo("jax", "backends.jax_backend:JaxBackend", ("jax", "flax", "optax"), "jax"),
    )
}


def backend_info(name: str) -> BackendInfo:
    try:
        return BACKENDS[name]
    except KeyError:
        raise KeyError(f"unknown backend {name!r}; valid: {', '.join(BACKENDS)}") from None


def get_backend(name: str) -> Backend:
    """A fresh adapter instance; imports its module (not yet the framework)."""
    module_name, class_name = backend_info(name).adapter.split(":")
    return getattr(importlib.import_module(module_name), class_name)()
