"""safetensors checkpoints: names, metadata, and headers checked before any array is read; hostile files refused."""

import json
import os
import struct
import threading
import zipfile

import numpy as np
import pytest
from npz_checkpoint import save_npz_checkpoint

from harness.checkpoint import (
    FORMAT,
    FORMAT_VERSION,
    MAX_HEADER_BYTES,
    CheckpointError,
    load_checkpoint,
    load_checkpoint_for,
    save_checkpoint,
)
from harness.cli import main
from harness.weights import initial_weights
from tasks import get_task

MLP = get_task("mnist-mlp")


def test_a_checkpoint_is_safetensors_with_names_spec_and_version(tmp_path):
    from safetensors import safe_open

    path = tmp_path / "c.safetensors"
    w = initial_weights(MLP, 3)
    save_checkpoint(path, MLP, w, meta={"stage": "train"})
    with safe_open(str(path), framework="numpy") as f:  # what any framework's safetensors reader sees
        assert list(f.keys()) == sorted(e.name for e in MLP.params())
        assert "fc1.kernel" in f.keys() and "head.bias" in f.keys()
        np.testing.assert_array_equal(f.get_tensor("fc1.kernel"), w[0])
        meta = f.metadata()
    assert meta["format"] == FORMAT and meta["format_version"] == str(FORMAT_VERSION)
    assert json.loads(meta["spec"])["name"] == "mnist-mlp" and json.loads(meta["meta"]) == {"stage": "train"}
    header, loaded = load_checkpoint(path)
    assert header["format_version"] == FORMAT_VERSION and all(np.array_equal(a, b) for a, b in zip(w, loaded))


def test_an_npz_checkpoint_of_format_1_still_loads(tmp_path):
    w = initial_weights(MLP, 1)
    save_npz_checkpoint(tmp_path / "old.npz", MLP, w)
    assert all(np.array_equal(a, b) for a, b in zip(w, load_checkpoint_for(tmp_path / "old.npz", MLP)))


def _never_read(monkeypatch):
    """Fail the test if any array's data is read: the refusal must come from the header alone."""
    import harness.checkpoint as ck

    def refuse(*args, **kwargs):
        raise AssertionError("an array was read before its header was checked")

    read_array = np.lib.format.read_array

    def read_npz_header_only(f, *args, **kwargs):  # the npz's JSON header member is read, no array
        return read_array(f, *args, **kwargs) if f.name == "header.npy" else refuse()

    monkeypatch.setattr(ck, "read_arrays", refuse)
    monkeypatch.setattr(np.lib.format, "read_array", read_npz_header_only)


def test_an_npz_zip_bomb_is_refused_from_its_header(tmp_path, monkeypatch):
    """An npz declaring a (784, 640000) array (2 GB) in place of fc1.kernel: refused before a byte of it is read."""
    path = tmp_path / "bomb.npz"
    save_npz_checkpoint(path, MLP, initial_weights(MLP, 0))
    with zipfile.ZipFile(path) as z:
        members = {n: z.read(n) for n in z.namelist()}
    header = np.lib.format.header_data_from_array_1_0(np.zeros((1,), np.float32))
    header["shape"] = (784, 640000)
    import io

    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, header)
    # Highly compressible zeros after the header: small on disk, 2 GB once read.
    members["w000.npy"] = buffer.getvalue() + bytes(1 << 20)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, blob in members.items():
            z.writestr(name, blob)
    assert path.stat().st_size < 1 << 20
    _never_read(monkeypatch)
    with pytest.raises(CheckpointError, match=r"fc1.kernel has shape \(784, 640000\)"):
        load_checkpoint_for(path, MLP)


def safetensors_file(path, header: dict, data: bytes = b"", *, declared_size: int | None = None):
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob) if declared_size is None else declared_size) + blob + data)
    return path


def good_header() -> dict:
    header, offset = {"__metadata__": {"format": FORMAT, "format_version": str(FORMAT_VERSION),
                                       "spec": json.dumps(MLP.to_dict())}}, 0
    for e in MLP.params():
        size = 4 * int(np.prod(e.param.shape))
        header[e.name] = {"dtype": "F32", "shape": list(e.param.shape), "data_offsets": [offset, offset + size]}
        offset += size
    return header


@pytest.mark.parametrize("change, words", [
    (lambda h: h["fc1.kernel"].update(shape=[784, 640000]), "do not fit"),  # offsets no longer match the shape
    (lambda h: h["fc1.kernel"].update(dtype="I64"), "not a supported safetensors entry"),
    (lambda h: h["fc1.kernel"].update(data_offsets=[0, 10**12]), "do not fit"),
    (lambda h: h.pop("head.bias"), "no array head.bias"),
    (lambda h: h.update(extra={"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}), "an array extra"),
    (lambda h: h["__metadata__"].update(format_version="99"), "format version '99'"),
    (lambda h: h["__metadata__"].pop("format"), "not a tribench checkpoint"),
], ids=["huge-shape", "dtype", "offsets", "missing", "extra", "version", "not-tribench"])
def test_a_safetensors_header_that_does_not_fit_is_refused_before_reading(tmp_path, monkeypatch, change, words):
    header = good_header()
    change(header)
    size = sum(4 * int(np.prod(e.param.shape)) for e in MLP.params())
    path = safetensors_file(tmp_path / "c.safetensors", header, bytes(size))
    _never_read(monkeypatch)
    with pytest.raises(CheckpointError, match=words):
        load_checkpoint_for(path, MLP)


def test_a_shape_that_does_not_fit_the_spec_is_refused_from_the_header(tmp_path, monkeypatch):
    header = good_header()
    header["fc1.kernel"].update(shape=[128, 784])  # the same bytes, the transposed shape
    size = sum(4 * int(np.prod(e.param.shape)) for e in MLP.params())
    path = safetensors_file(tmp_path / "c.safetensors", header, bytes(size))
    _never_read(monkeypatch)
    with pytest.raises(CheckpointError, match=r"fc1.kernel has shape \(128, 784\)"):
        load_checkpoint_for(path, MLP)


def test_a_huge_declared_header_size_is_refused_before_reading_it(tmp_path):
    path = safetensors_file(tmp_path / "c.safetensors", good_header(), declared_size=2**63)
    with pytest.raises(CheckpointError, match=f"at most {MAX_HEADER_BYTES}"):
        load_checkpoint(path)


def test_a_fifo_is_refused_without_hanging(tmp_path, capsys):
    fifo = tmp_path / "ckpt.safetensors"
    os.mkfifo(fifo)
    result = {}
    worker = threading.Thread(target=lambda: result.update(code=main(
        ["run", "--task", "mnist-mlp", "--backend", "torch", "--init-from", str(fifo), "--out", str(tmp_path / "o")])),
        daemon=True)
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive(), "reading a FIFO hung"
    err = capsys.readouterr().err.strip()
    assert result["code"] == 2 and len(err.splitlines()) == 1 and "a FIFO" in err, err


def test_a_plain_npy_array_is_refused_with_one_line(tmp_path, capsys):
    np.save(tmp_path / "x.npy", np.zeros(3, np.float32))
    assert main(["run", "--task", "mnist-mlp", "--backend", "torch", "--init-from", str(tmp_path / "x.npy"),
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "plain .npy array" in err and "Traceback" not in err, err
