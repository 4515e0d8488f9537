"""JAX export of a trained model: jax.export's serialized StableHLO, weights inside, batch size symbolic."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from backends.base import Exported, ExportUnsupported, InferencePath


def export(backend, model, fmt: str, *, folder: Path) -> Exported:
    if fmt == "onnx":
        raise ExportUnsupported("jax: no maintained JAX-to-ONNX exporter (jax2onnx is third-party and "
                                "jax.experimental.jax2tf + tf2onnx is deprecated); use --export native")
    jax = backend._jax
    spec = model.spec
    params = {**model.frozen_params, **model.train_params}
    dtype = np.int32 if spec.takes_tokens else np.float32
    (batch,) = jax.export.symbolic_shape("batch")
    exported = jax.export.export(jax.jit(lambda x: model.forward(params, x)))(
        jax.ShapeDtypeStruct((batch, *spec.input_shape), dtype))
    path = (folder / f"{spec.name}-jax").with_suffix(".stablehlo")
    path.write_bytes(exported.serialize())
    call = jax.jit(jax.export.deserialize(bytearray(path.read_bytes())).call)

    def put(x):
        return jax.block_until_ready(jax.device_put(x, backend._device))

    def run(x):
        return jax.block_until_ready(call(x))

    return Exported(files=(path,), serve=InferencePath(put=put, run=run, name="jax.export.deserialize(...).call"),
                    logits=lambda x: np.asarray(run(put(x)), np.float32),
                    exporter="jax.export.export(jax.jit(forward)).serialize() -> deserialize().call")
