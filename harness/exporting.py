"""Exported models in their deployment runtimes: logits parity with the framework, file size, inference figures."""

from __future__ import annotations

import importlib.util
import logging
import time
from pathlib import Path

import numpy as np

from backends.base import EXPORT_FORMATS, Backend, ExportUnsupported
from harness.inference import time_path

log = logging.getLogger(__name__)

# Float32 logits of an exported graph against the framework's own, relative to the logits' scale:
# the same arithmetic, reordered by the exporter's graph rewrites.
PARITY_RTOL = 1e-5
PARITY_SAMPLES = 64
# Per format and backend, the modules its exporter and runtime need: all in the `onnx` extra.
NEEDS = {"onnx": {"torch": ("onnx", "onnxruntime", "onnxscript"), "tensorflow": ("onnx", "onnxruntime", "tf2onnx"),
                  "jax": ()}, "native": {}}
INSTALL_HINT = 'pip install "tribench[onnx]"'


def parse_formats(text: str) -> tuple[str, ...]:
    """'onnx,native' -> ('onnx', 'native'); ValueError naming the valid formats otherwise."""
    formats = tuple(dict.fromkeys(f.strip() for f in str(text).split(",") if f.strip()))
    unknown = [f for f in formats if f not in EXPORT_FORMATS]
    if not formats or unknown:
        raise ValueError(f"--export {text!r}: valid formats are {', '.join(EXPORT_FORMATS)} (comma-separated)")
    return formats


def missing_modules(formats, backends) -> list[str]:
    """The exporter and runtime modules these formats need for these backends that are not installed."""
    needed = {m for f in formats for b in backends for m in NEEDS.get(f, {}).get(b, ())}
    return sorted(m for m in needed if importlib.util.find_spec(m) is None)


def _size(files) -> int:
    return sum(Path(f).stat().st_size for f in files)


def export_figures(backend: Backend, model, x_test: np.ndarray, *, formats, folder: Path, batch_size: int,
                   train_s: float) -> dict:
    """{format: figures} for each format: where the export failed or is unsupported, its error instead."""
    x = x_test[:PARITY_SAMPLES]
    reference = backend.logits(model, x)
    scale = max(1.0, float(np.abs(reference).max()))
    out = {}
    for fmt in formats:
        started = time.perf_counter()
        try:
            exported = backend.export(model, fmt, folder)
            export_s = time.perf_counter() - started
            diff = float(np.abs(exported.logits(x) - reference).max())
            out[fmt] = {"exporter": exported.exporter, "files": [Path(f).name for f in exported.files],
                        "size_bytes": _size(exported.files), "export_s": export_s,
                        "max_abs_logit_diff": diff, "parity_rtol": PARITY_RTOL,
                        "parity_ok": diff <= PARITY_RTOL * scale,
                        **time_path(exported.serve, x_test, batch_size=batch_size, train_s=train_s)}
        except ExportUnsupported as exc:
            out[fmt] = {"error": str(exc), "unsupported": True}
        except Exception as exc:  # the exporter's own error is the finding: kept in the record
            log.warning("%s: %s export failed: %s", backend.name, fmt, exc)
            out[fmt] = {"error": f"{type(exc).__name__}: {str(exc)[:500]}"}
    return out
