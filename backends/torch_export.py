"""torch exports of a trained model: ONNX through torch.onnx.export(dynamo=True), native through torch.export."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from backends.base import Exported, InferencePath
from backends.onnx_runtime import onnx_session


def _module(torch, model):
    """The evaluation forward pass as the nn.Module both exporters trace (weights become graph constants)."""

    class Forward(torch.nn.Module):
        def forward(self, x):
            return model.forward(x, False)

    return Forward().eval()


def _feed(x: np.ndarray) -> np.ndarray:
    """Canonical host input -> what the traced graph takes: NCHW float32 images, int64 token ids."""
    if np.issubdtype(x.dtype, np.integer):
        return x.astype(np.int64)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2)) if x.ndim == 4 else x


def export(backend, model, fmt: str, *, folder: Path) -> Exported:
    torch = backend._torch()
    spec = model.spec
    dtype = np.int32 if spec.takes_tokens else np.float32
    example = torch.from_numpy(_feed(np.zeros((2, *spec.input_shape), dtype))).to(backend._device)
    dynamic = ({0: torch.export.Dim("batch")},)
    stem = folder / f"{spec.name}-torch"
    if fmt == "onnx":
        path = stem.with_suffix(".onnx")
        # One self-contained file (the default writes weights apart for models over 2 GB only).
        torch.onnx.export(_module(torch, model), (example,), str(path), dynamo=True, dynamic_shapes=dynamic,
                          external_data=False)
        serve, logits = onnx_session(path, _feed)
        return Exported(files=(path,), serve=serve, logits=logits,
                        exporter="torch.onnx.export(dynamo=True) -> onnxruntime")
    path = stem.with_suffix(".pt2")
    with torch.no_grad():
        program = torch.export.export(_module(torch, model), (example,), dynamic_shapes=dynamic)
    torch.export.save(program, str(path))
    loaded = torch.export.load(str(path)).module()

    def run(x):
        return backend._served(loaded, x)

    serve = InferencePath(put=backend._device_input, run=run, name="torch.export.load(...).module()")
    return Exported(files=(path,), serve=serve, logits=lambda x: run(backend._device_input(x)).float().cpu().numpy(),
                    exporter="torch.export.export -> .pt2")
