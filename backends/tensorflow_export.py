"""Keras exports of a trained model: ONNX through model.export(format="onnx") (tf2onnx), native as a SavedModel."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from backends.base import Exported, InferencePath
from backends.onnx_runtime import onnx_session


def export(backend, model, fmt: str, folder: Path) -> Exported:
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

    def put(x):
        with tf.device(backend._device_name):
            t = tf.identity(tf.constant(x))
        backend._synchronize()
        return t

    def run(x):
        with tf.device(backend._device_name):
            out = loaded.serve(x)
        backend._synchronize()
        return out

    files = tuple(p for p in sorted(path.rglob("*")) if p.is_file())
    return Exported(files=files, serve=InferencePath(put=put, run=run, name="tf.saved_model.load(...).serve"),
                    logits=lambda x: np.asarray(run(put(x)), np.float32),
                    exporter="keras Model.export(format='tf_saved_model') -> tf.saved_model.load")
