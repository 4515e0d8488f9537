"""ONNX Runtime serving an exported .onnx file, for every adapter's ONNX export (no framework import)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from backends.base import InferencePath


def onnx_session(path: Path, feed: Callable[[np.ndarray], np.ndarray]) -> tuple[InferencePath, Callable]:
    """(inference path, host logits function) of the ONNX file at `path` on ONNX Runtime's CPU provider.

    `feed` turns a canonical host array into the exported graph's input (layout and dtype).
    """
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run(x):
        return session.run(None, {name: x})[0]

    return (InferencePath(put=feed, run=run, name=f"onnxruntime {ort.__version__} CPUExecutionProvider"),
            lambda x: run(feed(x)))
