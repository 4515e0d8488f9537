"""Checkpoints: safetensors files of canonical arrays named `<layer>.<param>`, the spec in the header; npz still read.

A checkpoint is untrusted input. Nothing in it executes (no pickle), only regular files
are opened (a FIFO would block forever), and every declared shape, dtype and offset is
checked against the spec, and the header's size bounded, before any array is read.
"""

from __future__ import annotations

import json
import os
import stat
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from harness.storage import write_atomic
from tasks.spec import TaskSpec, WeightsError

FORMAT = "tribench-checkpoint"
FORMAT_VERSION = 2  # 1: the npz of arrays w000... by position; 2: safetensors with names
NPZ_FORMAT_VERSION = 1
SUFFIX = ".safetensors"
NPZ_SUFFIX = ".npz"  # what format version 1 was written as
# A GPT-2 XL spec is tens of kilobytes of JSON; the safetensors library itself refuses 100 MB.
MAX_HEADER_BYTES = 16 * 2**20
SAFETENSORS_DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "F64": np.dtype("<f8")}


class CheckpointError(WeightsError):
    """A checkpoint that cannot be read, or does not fit the task it is loaded into."""


@dataclass(frozen=True)
class Declared:
    """One array as a file's header declares it, before a byte of it is read."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]


def check_weights(spec: TaskSpec, weights: list[np.ndarray], *, source: str = "weights") -> None:
    """spec.check_weights, raising CheckpointError: the one validator, with the one message."""
    try:
        spec.check_weights(weights, source=source)
    except WeightsError as exc:
        raise CheckpointError(str(exc)) from None


def save_checkpoint(path: Path, spec: TaskSpec, weights: list[np.ndarray], *, meta: dict | None = None) -> None:
    """Write the canonical arrays as safetensors, named `<layer>.<param>`, with the spec, the format
    and its version in the header metadata; atomic (a temporary file, then a rename)."""
    from safetensors.numpy import save

    check_weights(spec, weights)
    metadata = {"format": FORMAT, "format_version": str(FORMAT_VERSION),
                "spec": json.dumps(spec.to_dict(), sort_keys=True), "meta": json.dumps(meta or {}, sort_keys=True)}
    arrays = {e.name: np.ascontiguousarray(w, np.float32) for e, w in zip(spec.params(), weights)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, save(arrays, metadata=metadata))  # checked, and no .tmp left on a full disk


def open_regular(path: Path) -> int:
    """A read-only descriptor of `path`, refused unless it is a regular file.

    O_NONBLOCK: opening a FIFO with no writer would otherwise wait forever, before the
    check could refuse it.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot open ({exc.strerror or exc})") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = "a FIFO" if stat.S_ISFIFO(mode) else "a folder" if stat.S_ISDIR(mode) else "not a regular file"
        raise CheckpointError(f"{path}: {kind}; a checkpoint is a regular file")
    os.set_blocking(fd, True)
    return fd


def load_checkpoint(path: Path, spec: TaskSpec | None = None) -> tuple[dict, list[np.ndarray]]:
    """(header, weights) of a checkpoint: {"format_version", "spec", "meta"} and the arrays in spec order.

    With `spec`, the file's layers must be the task's; every declared array is checked
    against `spec` (None: the spec the file itself carries) before any is read; anything
    else is a CheckpointError naming the file.
    """
    with os.fdopen(open_regular(Path(path)), "rb") as f:
        magic = f.read(8)
        f.seek(0)
        if magic.startswith(b"\x93NUMPY"):
            raise CheckpointError(f"{path}: a plain .npy array, not a checkpoint (an .npz or .safetensors "
                                  "file written by tribench)")
        if magic.startswith(b"PK"):
            return _load_npz(f, path, spec)
        return _load_safetensors(f, path, spec)


def _spec_of(header: dict, path, spec: TaskSpec | None) -> TaskSpec:
    """The task the arrays must fit: `spec` once the saved layers match it, else the saved spec."""
    if spec is not None:
        check_saved_layers(path, header, spec)
        return spec
    return saved_spec(header, path)


def saved_spec(header: dict, path) -> TaskSpec:
    """The spec a checkpoint's header carries, read as a task file is (no code, every field checked)."""
    from tasks.taskfile import TaskFileError, spec_from_dict

    saved = header.get("spec")
    try:
        return spec_from_dict(saved, f"{path} spec")
    except (TaskFileError, AttributeError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: the checkpoint's spec is not valid ({exc})") from None


def check_declared(path, spec: TaskSpec, declared: list[Declared]) -> None:
    """Names (or, in an npz, positions), dtypes and shapes as the header declares them, against the spec."""
    entries = spec.params()
    if len(declared) != len(entries):
        raise CheckpointError(f"{path}: {len(declared)} arrays, task {spec.name!r} needs {len(entries)}")
    for entry, d in zip(entries, declared):
        if d.dtype.kind not in "fiu":
            raise CheckpointError(f"{path}: array {d.name} is {d.dtype}, a checkpoint holds real numbers")
        if d.shape != entry.param.shape:
            raise CheckpointError(f"{path}: {entry.name} has shape {d.shape}, task {spec.name!r} needs "
                                  f"{entry.param.shape}")


def _finite(path, name: str, array: np.ndarray) -> np.ndarray:
    array = array.astype(np.float32, copy=False)
    if not np.isfinite(array).all():
        raise CheckpointError(f"{path}: array {name} holds NaN or infinite values")
    return array


# -- safetensors -----------------------------------------------------------------------------------

def read_safetensors_header(f, path) -> tuple[dict, dict[str, tuple[np.dtype, tuple, tuple]], int]:
    """(metadata, {name: (dtype, shape, (begin, end))}, where the data starts), checked against the file.

    The header's size is bounded before it is read; every array's offsets must lie in the
    file and match its dtype and shape, so nothing read later can run past the file.
    """
    size = os.fstat(f.fileno()).st_size
    head = f.read(8)
    if len(head) < 8:
        raise CheckpointError(f"{path}: not a tribench checkpoint (shorter than a safetensors header)")
    (n,) = struct.unpack("<Q", head)
    if n > min(MAX_HEADER_BYTES, size - 8):
        raise CheckpointError(f"{path}: not a tribench checkpoint (a safetensors header of {n} bytes in a file "
                              f"of {size}; at most {MAX_HEADER_BYTES})")
    try:
        header = json.loads(f.read(n))
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not a tribench checkpoint (its header is not JSON: {exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a tribench checkpoint (its header is a JSON {type(header).__name__})")
    metadata = header.pop("__metadata__", None) or {}
    data_bytes = size - 8 - n
    arrays = {}
    for name, info in header.items():
        try:
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: array {name}: not a supported safetensors entry ({exc!r}); "
                                  f"dtypes: {', '.join(SAFETENSORS_DTYPES)}") from None
        if min(shape, default=0) < 0 or not 0 <= begin <= end <= data_bytes \
                or end - begin != dtype.itemsize * int(np.prod(shape, dtype=object)):
            raise CheckpointError(f"{path}: array {name}: shape {shape} and offsets {[begin, end]} do not fit "
                                  f"its {data_bytes} data bytes")
        arrays[name] = (dtype, shape, (begin, end))
    return metadata, arrays, 8 + n


def read_arrays(f, path, arrays: dict, start: int, names: list[str]) -> list[np.ndarray]:
    """The named arrays, read after their header entries were checked (read_safetensors_header)."""
    out = []
    for name in names:
        dtype, shape, (begin, end) = arrays[name]
        f.seek(start + begin)
        blob = f.read(end - begin)
        if len(blob) != end - begin:
            raise CheckpointError(f"{path}: array {name} is cut short")
        out.append(_finite(path, name, np.frombuffer(bytearray(blob), dtype).reshape(shape)))  # writable
    return out


def _load_safetensors(f, path, spec: TaskSpec | None) -> tuple[dict, list[np.ndarray]]:
    metadata, arrays, start = read_safetensors_header(f, path)
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a tribench checkpoint (no format {FORMAT!r} in its metadata; "
                              "a Hugging Face model is a folder: pass the folder)")
    if metadata.get("format_version") != str(FORMAT_VERSION):
        raise CheckpointError(f"{path}: checkpoint format version {metadata.get('format_version')!r}, "
                              f"this tribench reads {FORMAT_VERSION} (and npz version {NPZ_FORMAT_VERSION})")
    try:
        header = {"format_version": FORMAT_VERSION, "spec": json.loads(metadata["spec"]),
                  "meta": json.loads(metadata.get("meta", "{}"))}
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"{path}: the checkpoint's metadata has no readable spec ({exc})") from None
    spec = _spec_of(header, path, spec)
    names = [e.name for e in spec.params()]
    missing = [n for n in names if n not in arrays]
    extra = sorted(set(arrays) - set(names))
    if missing or extra:
        what = f"no array {missing[0]}" if missing else f"an array {extra[0]} the task does not have"
        raise CheckpointError(f"{path}: {what} (task {spec.name!r})")
    check_declared(path, spec, [Declared(n, arrays[n][0], arrays[n][1]) for n in names])
    return header, read_arrays(f, path, arrays, start, names)


# -- npz (format version 1) ------------------------------------------------------------------------

def _npy_header(zf: zipfile.ZipFile, member: str) -> tuple[np.dtype, tuple[int, ...]]:
    """The dtype and shape an .npy member declares, read from its first bytes only."""
    with zf.open(member) as m:
        version = np.lib.format.read_magic(m)
        reader = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        if version not in reader:
            raise ValueError(f"npy version {version}")
        shape, _, dtype = reader[version](m)
    if dtype.hasobject:
        raise ValueError(f"member {member} holds Python objects, never unpickled (allow_pickle=False)")
    return dtype, tuple(shape)


def _load_npz(f, path, spec: TaskSpec | None) -> tuple[dict, list[np.ndarray]]:
    errors = (OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile, zlib.error)
    try:
        zf = zipfile.ZipFile(f)
        keys = sorted(n[:-4] for n in zf.namelist() if n.startswith("w") and n.endswith(".npy"))
        info = zf.getinfo("header.npy")
        if info.file_size > MAX_HEADER_BYTES:
            raise ValueError(f"its header is {info.file_size} bytes, at most {MAX_HEADER_BYTES}")
        declared = [Declared(k, *_npy_header(zf, f"{k}.npy")) for k in keys]
        with zf.open("header.npy") as m:
            header = json.loads(str(np.lib.format.read_array(m, allow_pickle=False)))
    except errors as exc:
        raise CheckpointError(f"{path}: not a tribench checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a tribench checkpoint (its header is a JSON {type(header).__name__}, "
                              "not an object)")
    if header.get("format") != NPZ_FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {header.get('format')!r}, expected {NPZ_FORMAT_VERSION}")
    header = {"format_version": NPZ_FORMAT_VERSION, "spec": header.get("spec"), "meta": header.get("meta", {})}
    check_declared(path, _spec_of(header, path, spec), declared)
    weights = []
    try:
        for d in declared:
            with zf.open(f"{d.name}.npy") as m:
                weights.append(_finite(path, d.name, np.lib.format.read_array(m, allow_pickle=False)))
    except errors as exc:
        raise CheckpointError(f"{path}: not a tribench checkpoint ({type(exc).__name__}: {exc})") from None
    return header, weights


# -- loading into a task ---------------------------------------------------------------------------

def check_saved_layers(path, header: dict, spec: TaskSpec) -> None:
    """The checkpoint's layers against the task's, the first difference named.

    Saved layers are read back as spec layers, so a checkpoint written before a layer
    gained a field (Conv2D's stride) compares equal with that field at its default.
    """
    from tasks.taskfile import TaskFileError, layer_from_dict

    saved_spec = header.get("spec")
    saved_layers = saved_spec.get("layers") if isinstance(saved_spec, dict) else None
    if not isinstance(saved_layers, list):
        raise CheckpointError(f"{path}: the checkpoint header has no spec with a list of layers")
    for i, (table, layer) in enumerate(zip(saved_layers, spec.layers)):
        try:
            saved = layer_from_dict(table, f"layers[{i}]")
        except TaskFileError as exc:
            raise CheckpointError(f"{path}: {exc}") from None
        if saved != layer:
            raise CheckpointError(f"{path}: layer {i} is {table} in the checkpoint but "
                                  f"{spec.to_dict()['layers'][i]} in task {spec.name!r}")
    if len(saved_layers) != len(spec.layers):
        raise CheckpointError(f"{path}: {len(saved_layers)} layers in the checkpoint, "
                              f"{len(spec.layers)} in task {spec.name!r}")


def load_checkpoint_for(path: Path, spec: TaskSpec, *, seed: int = 0) -> list[np.ndarray]:
    """Weights from `path` (a checkpoint, or a Hugging Face GPT-2 folder), refused with the first
    mismatch when they do not fit `spec`. `seed` draws what a Hugging Face base model lacks (LoRA adapters)."""
    if Path(path).is_dir():
        from harness.hf_gpt2 import load_hf_gpt2

        return load_hf_gpt2(path, spec, seed=seed)
    return load_checkpoint(path, spec)[1]
