"""Files tribench reads can hold data, never code: data folders, results folders, checkpoints, caches, records."""

import dataclasses
import json
import os
import pickle
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from npz_checkpoint import save_npz_checkpoint

from harness import data, measure, safepickle
from harness.cli import main
from harness.results import RECORDS_FILE, read_records
from harness.weights import initial_weights
from tasks import get_task
from tasks.datasets import DATASETS

CIFAR_BATCHES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


class Payload:
    """Unpickling this runs a shell command: what a hostile data file does."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def hostile_cifar(root, marker):
    """root/cifar10/cifar-10-batches-py/ with every batch a code-running pickle."""
    folder = root / "cifar10" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in CIFAR_BATCHES:
        (folder / name).write_bytes(pickle.dumps({b"data": Payload(marker), b"labels": [0]}, protocol=2))
    return folder


def run_cli(*args, cwd=None, env=None):
    return subprocess.run([sys.executable, "-m", "harness", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "PYTHONPATH": os.getcwd(), **(env or {})}, timeout=300)


def test_the_restricted_unpickler_refuses_code_and_reads_arrays(tmp_path):
    marker = tmp_path / "pwned"
    with pytest.raises(pickle.UnpicklingError, match="refused global posix.system"):
        safepickle.loads(pickle.dumps({b"data": Payload(marker)}, protocol=2))
    assert not marker.exists()
    with pytest.raises(pickle.UnpicklingError, match="object array"):
        safepickle.loads(pickle.dumps(np.array([1, "a"], dtype=object)))
    batch = {b"data": np.arange(6, dtype=np.uint8).reshape(2, 3), b"labels": [1, 2], b"batch_label": b"x"}
    for protocol in (2, pickle.HIGHEST_PROTOCOL):
        back = safepickle.loads(pickle.dumps(batch, protocol=protocol))
        np.testing.assert_array_equal(back[b"data"], batch[b"data"])
        assert back[b"labels"] == [1, 2] and back[b"batch_label"] == b"x"


def test_a_hostile_cifar_folder_is_refused_even_when_its_checksums_pass(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    folder = hostile_cifar(tmp_path, marker)
    # Checksums that match the hostile files: only the unpickler stands between them and a shell.
    digests = {name: data.digest_of(folder / name, "md5") for name in CIFAR_BATCHES}
    monkeypatch.setitem(DATASETS, "cifar10", dataclasses.replace(DATASETS["cifar10"], extracted=digests))
    with pytest.raises(data.DataError, match="refused global posix.system"):
        data.load_real("cifar10", folder.parent)
    assert not marker.exists()


def test_an_extracted_cifar_folder_is_checked_against_the_published_digests(tmp_path, caplog):
    hostile_cifar(tmp_path, tmp_path / "pwned")
    folder, _ = data.find_source(DATASETS["cifar10"], tmp_path)
    assert folder is None
    assert "MD5 mismatch" in caplog.text and "data_batch_1" in caplog.text


@pytest.mark.parametrize("how", ["--data-dir", "TRIBENCH_DATA"])
def test_a_hostile_cifar_folder_runs_no_code_through_the_cli(tmp_path, how):
    marker = tmp_path / "pwned"
    hostile_cifar(tmp_path / "d", marker)
    args = ["run", "--task", "cifar-cnn", "--backend", "torch", "--no-download", "--out", str(tmp_path / "o")]
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    if how == "--data-dir":
        args += ["--data", "cifar10", "--data-dir", str(tmp_path / "d")]
    else:
        args += ["--data", "cifar10"]
        env["TRIBENCH_DATA"] = str(tmp_path / "d")
    out = run_cli(*args, env=env)
    assert not marker.exists()
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "MD5 mismatch" in out.stderr and "cifar10 not found" in out.stderr


def test_resume_of_a_crafted_results_folder_runs_no_code(tmp_path):
    from harness.run_config import RUN_FILE, RunConfig, write_run_file

    run = tmp_path / "runA"
    run.mkdir()
    write_run_file(RunConfig(tasks=["cifar-cnn"], backends=["torch"], out=run, data="cifar10", quick=True,
                             allow_download=False))
    saved = json.loads((run / RUN_FILE).read_text())
    saved["config"]["data_dir"] = "payload"  # relative: meant to be found beside wherever the victim stands
    (run / RUN_FILE).write_text(json.dumps(saved))
    marker = tmp_path / "pwned"
    hostile_cifar(run / "payload", marker)
    hostile_cifar(tmp_path / "cwd" / "payload", marker)
    out = run_cli("run", "--resume", str(run), cwd=tmp_path / "cwd", env={"XDG_CACHE_HOME": str(tmp_path / "c")})
    assert not marker.exists()
    assert out.returncode == 2 and "Traceback" not in out.stderr
    # The path is taken relative to the results folder and shown before it is used.
    assert f"data_dir from {run / RUN_FILE}: {run / 'payload'}" in out.stderr


# -- checkpoints ---------------------------------------------------------------------------------

def good_checkpoint(path):
    """A checkpoint in the npz format (version 1), which still loads: the members below are npz members."""
    spec = get_task("mnist-mlp")
    save_npz_checkpoint(path, spec, initial_weights(spec, 0))
    return path


def rewrite(path, **replace):
    """The checkpoint at `path` with some of its members replaced."""
    with np.load(path) as npz:
        members = {k: npz[k] for k in npz.files}
    members.update(replace)
    with open(path, "wb") as f:
        np.savez(f, **members)


def truncated(path):
    raw = good_checkpoint(path).read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


def bad_crc(path):
    raw = bytearray(good_checkpoint(path).read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # inside w000's stored bytes: the zip CRC no longer matches
    path.write_bytes(bytes(raw))


def header_list(path):
    rewrite(good_checkpoint(path), header=np.array(json.dumps([1, 2])))


def poisoned(value, dtype=np.float32):
    def make(path):
        with np.load(good_checkpoint(path)) as npz:
            w = npz["w001"].astype(dtype)
        w[0] = value
        rewrite(path, w001=w)
    return make


@pytest.mark.parametrize("make, words", [
    (truncated, "not a tribench checkpoint"),
    (bad_crc, "BadZipFile"),
    (header_list, "header is a JSON list"),
    (poisoned(np.nan), "NaN or infinite"),
    (poisoned(np.inf), "NaN or infinite"),
    (poisoned(1 + 2j, np.complex64), "complex64"),
], ids=["truncated", "bad-crc", "header-list", "nan", "inf", "complex"])
def test_a_bad_init_from_checkpoint_exits_2_with_one_line(tmp_path, capsys, make, words):
    path = tmp_path / "ckpt.npz"
    make(path)
    assert main(["run", "--task", "mnist-mlp", "--backend", "torch", "--init-from", str(path),
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--init-from" in err and str(path) in err and words in err, err
    assert not (tmp_path / "o").exists()


def test_the_bad_crc_case_really_has_a_bad_crc(tmp_path):
    bad_crc(tmp_path / "c.npz")
    with zipfile.ZipFile(tmp_path / "c.npz") as z:
        assert z.testzip() is not None


# -- caches and records ----------------------------------------------------------------------------

@pytest.mark.parametrize("content", ["not json", "[1, 2]", "{KEY: 1e-05}", "{KEY: \"fast\"}", "{KEY: NaN}",
                                     "{KEY: 1e12}"])
def test_a_corrupted_matmul_peak_cache_is_ignored_and_reprobed(tmp_path, monkeypatch, content):
    from harness.results import cpu_name

    key = f"{os.uname().nodename}|{cpu_name()}|{os.cpu_count()}"
    cache = tmp_path / "peak.json"
    cache.write_text(content.replace("KEY", json.dumps(key)))
    monkeypatch.setattr(measure, "_probe_gflops", lambda: 123.4)
    assert measure.matmul_peak_gflops(cache) == 123.4
    assert json.loads(cache.read_text()) == {key: 123.4}
    assert measure.matmul_peak_gflops(cache) == 123.4  # and the rewritten cache is used


def test_a_record_line_that_is_not_an_object_is_skipped_by_name(tmp_path, caplog, capsys):
    from record_factory import make_record

    path = tmp_path / RECORDS_FILE
    no_status = {k: v for k, v in make_record(backend="jax").items() if k != "status"}
    path.write_text("42\n" + json.dumps(make_record()) + "\n[1]\n" + json.dumps(no_status) + "\n")
    assert [r["task"] for r in read_records(path)] == ["mnist-mlp"]
    assert f"{path}:1: skipping a line that is not a record (a JSON int)" in caplog.text
    assert f"{path}:3:" in caplog.text
    assert f"{path}:4: skipping a record without status" in caplog.text
    assert main(["report", str(tmp_path)]) == 0
    assert "Traceback" not in capsys.readouterr().err


def test_the_report_escapes_strings_from_records(tmp_path):
    from record_factory import make_record, write_run

    from harness.report import write_report

    evil = "<script>alert(1)</script>"
    records = [make_record(), make_record(backend="jax", status="failed")]
    records[1]["error"] = evil
    records[0]["env"]["hostname"] = evil
    write_report(write_run(tmp_path, records))
    for name in ("report.md", "report.html"):
        text = (tmp_path / name).read_text()
        assert "<script" not in text and "&lt;script&gt;" in text, name


def test_a_checkpoint_holding_a_pickled_object_runs_no_code(tmp_path, capsys):
    path, marker = tmp_path / "ckpt.npz", tmp_path / "pwned"
    rewrite(good_checkpoint(path), w001=np.array([Payload(marker)], dtype=object))
    assert main(["run", "--task", "mnist-mlp", "--backend", "torch", "--init-from", str(path),
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "allow_pickle=False" in err, err
    assert not marker.exists()
