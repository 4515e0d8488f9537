"""An unpickler that builds only plain containers and numpy arrays: CIFAR-10 batches, never code."""

from __future__ import annotations

import io
import pickle

import numpy as np

# What the official CIFAR-10 python batches (pickled by Python 2's cPickle) refer to, under
# numpy 1's and numpy 2's module names, plus numpy scalars and Python 3's protocol-2 bytes
# (pickles re-made by numpy users).
# Each is a C constructor of plain data; none of them runs code named by the file.
_RECONSTRUCT = np.ndarray.__reduce__(np.zeros(1))[0]
_SCALAR = np.float32(0).__reduce__()[0]
_FROMBUFFER = np.zeros(1).__reduce_ex__(5)[0]  # protocol 5 arrays: numpy's _frombuffer


def _latin1_bytes(text: str, encoding: str = "latin1") -> bytes:
    """How Python 3 writes bytes into protocol-2 pickles (_codecs.encode(text, 'latin1')), and nothing else."""
    if encoding != "latin1" or not isinstance(text, str):
        raise pickle.UnpicklingError(f"refused _codecs.encode with {encoding!r}")
    return text.encode("latin1")


ALLOWED = {
    **{(module, "_reconstruct"): _RECONSTRUCT for module in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(module, "scalar"): _SCALAR for module in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(module, "_frombuffer"): _FROMBUFFER for module in ("numpy.core.numeric", "numpy._core.numeric")},
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_bytes,
}


class RestrictedUnpickler(pickle.Unpickler):
    """pickle.Unpickler whose find_class knows only ALLOWED: any other global is refused before it is looked up."""

    def find_class(self, module: str, name: str):
        try:
            return ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refused global {module}.{name}: only numpy arrays and plain "
                                         "containers may appear in a data file") from None


def loads(blob: bytes):
    """Unpickle data (bytes keys as in Python 2 pickles); object arrays are refused too."""
    obj = RestrictedUnpickler(io.BytesIO(blob), encoding="bytes").load()
    _refuse_object_arrays(obj)
    return obj


def _refuse_object_arrays(obj) -> None:
    if isinstance(obj, np.ndarray) and obj.dtype.hasobject:
        raise pickle.UnpicklingError("refused an object array: data files hold numbers")
    if isinstance(obj, dict):
        for value in obj.values():
            _refuse_object_arrays(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            _refuse_object_arrays(value)
