"""Keras exports of a trained model: ONNX through model.export(format="onnx") (tf2onnx), native as a SavedModel."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from backends.base import Exported, InferencePath
from backends.onnx_runtime import onnx_session


def export(backend, model, fmt: str, *, folder: Path) -> Exported:
    tf = backend._tf
    stem = folder / f"{model.spec.name}-tensorflow"
    if fmt == "onnx":
        path = stem.with_suffix(".onnx")
        model.keras_model.export(str(path), format="onnx", verbose=False)
        serve, logits = onnx_session(path, lambda x: x)
        return Exported(files=(path,), serve=serve, logits=logits,
                        exporter="keras Model.export(format='onnx') (tf2onnx) -> onnxruntime")
    path = stem.with_suffix(".savedmodel")
    model.keras_model.export(str(path), format="tf_saved_model", verbose=False)
    loaded = tf.saved_model.load(str(path))

    def run(x):
        return backend._served(loaded.serve, x)

    files = tuple(p for p in sorted(path.rglob("*")) if p.is_file())
    serve = InferencePath(put=backend._device_input, run=run, name="tf.saved_model.load(...).serve")
    return Exported(files=files, serve=serve,
                    logits=lambda x: np.asarray(run(backend._device_input(x)), np.float32),
                    exporter="keras Model.export(format='tf_saved_model') -> tf.saved_model.load")
