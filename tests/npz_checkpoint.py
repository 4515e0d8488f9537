"""Writes checkpoints in the npz format version 1 (arrays w000... by position, a JSON header), as tribench once did."""

import json

import numpy as np


def save_npz_checkpoint(path, spec, weights, *, meta=None) -> None:
    header = {"format": 1, "spec": spec.to_dict(), "meta": meta or {}}
    arrays = {f"w{i:03d}": np.asarray(w, np.float32) for i, w in enumerate(weights)}
    with open(path, "wb") as f:
        np.savez(f, header=np.array(json.dumps(header, sort_keys=True)), **arrays)
