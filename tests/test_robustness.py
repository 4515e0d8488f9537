"""Faults in a cell, interruption and resume: nothing finished is ever lost.

Faults are injected through TRIBENCH_FAULT, read only by the worker and only under the
test suite (tests/conftest.py sets TRIBENCH_TESTING=1), so the real adapters carry no test hooks.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from harness.errors import UsageError
from harness.results import read_records
from harness.run_config import RunConfig, load_resume
from harness.runner import run_matrix

pytestmark = pytest.mark.slow


def matrix(tmp_path, backend, *, repeats=2, timeout=None):
    return RunConfig(tasks=["mnist-mlp"], backends=[backend], out=tmp_path / "run", repeats=repeats, quick=True,
                     data="synthetic", timeout=timeout)


def by_repeat(tmp_path):
    return {r["repeat"]: r for r in read_records(tmp_path / "run")}


@pytest.mark.parametrize("fault, reason, words", [
    ("raise", "exception", ["RuntimeError: injected fault"]),
    ("segfault", "signal", ["SIGSEGV"]),
    ("oom", "signal", ["SIGKILL", "out-of-memory"]),
])
def test_a_failing_cell_is_recorded_and_the_matrix_continues(tmp_path, monkeypatch, fast_backend, fault, reason,
                                                             words):
    monkeypatch.setenv("TRIBENCH_FAULT", f"{fault}@mnist-mlp/{fast_backend}/0")
    assert run_matrix(matrix(tmp_path, fast_backend)) == 1
    records = by_repeat(tmp_path)
    bad, good = records[0], records[1]
    assert bad["status"] == "failed" and bad["failure"]["reason"] == reason
    assert all(w in bad["error"] for w in words), bad["error"]
    assert good["status"] == "ok"
    # Whether the worker wrote the record or died before it could, the fault used is on record.
    assert bad["env"]["injected_fault"] == fault and "injected_fault" not in good["env"]
    if fault == "raise":
        assert any("injected fault" in line for line in bad["failure"]["stderr_tail"])


def test_a_hanging_cell_is_killed_at_the_timeout(tmp_path, monkeypatch, fast_backend):
    monkeypatch.setenv("TRIBENCH_FAULT", f"hang@mnist-mlp/{fast_backend}/0")
    t0 = time.monotonic()
    assert run_matrix(matrix(tmp_path, fast_backend, repeats=1, timeout=20)) == 1
    assert time.monotonic() - t0 < 60
    (record,) = read_records(tmp_path / "run")
    assert record["status"] == "failed" and record["failure"]["reason"] == "timeout"
    assert "--timeout 20" in record["error"]


def test_a_nan_loss_is_recorded_as_diverged_with_epoch_and_step(tmp_path, monkeypatch, fast_backend):
    monkeypatch.setenv("TRIBENCH_FAULT", f"nan@mnist-mlp/{fast_backend}/0")
    assert run_matrix(matrix(tmp_path, fast_backend, repeats=1)) == 1
    (record,) = read_records(tmp_path / "run")
    assert record["status"] == "diverged"
    assert (record["failure"]["stage"], record["failure"]["epoch"], record["failure"]["step"]) == ("train", 0, 0)
    assert "nan" in record["error"].lower()


def test_sigterm_keeps_finished_cells_and_resume_completes_the_rest(tmp_path, fast_backend):
    out = tmp_path / "run"
    env = {**os.environ, "TRIBENCH_FAULT": f"hang@mnist-mlp/{fast_backend}/1"}
    proc = subprocess.Popen([sys.executable, "-m", "harness", "run", "--task", "mnist-mlp", "--backend", fast_backend,
                             "--quick", "--data", "synthetic", "--repeats", "3", "--out", str(out)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(read_records(out)) < 1:
        time.sleep(0.5)
    time.sleep(3)  # repeat 1 is now hanging inside its worker
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    lines = (out / "records.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["repeat"] == 0  # complete lines only
    assert (out / "report.md").exists() and "--resume" in err
    first = json.loads(lines[0])

    assert run_matrix(load_resume(out), resume=True) == 0
    records = read_records(out)
    assert sorted(r["repeat"] for r in records) == [0, 1, 2]  # repeat 0 was not run again
    assert records[0] == first


def test_resume_refuses_a_changed_spec(tmp_path, fast_backend):
    cfg = matrix(tmp_path, fast_backend, repeats=1)
    cfg.out.mkdir()
    from harness.run_config import RUN_FILE, write_run_file

    write_run_file(cfg)
    saved = json.loads((cfg.out / RUN_FILE).read_text())
    saved["specs"]["mnist-mlp"]["batch_size"] = 64
    (cfg.out / RUN_FILE).write_text(json.dumps(saved))
    with pytest.raises(UsageError, match="spec of task 'mnist-mlp' differs"):
        load_resume(cfg.out)
    saved["specs"]["mnist-mlp"]["batch_size"] = 128
    saved["versions"] = {"numpy_like_module": "0.0"}
    (cfg.out / RUN_FILE).write_text(json.dumps(saved))
    with pytest.raises(UsageError, match="numpy_like_module is None now but was 0.0"):
        load_resume(cfg.out)


def test_a_torn_last_line_is_skipped_not_fatal(tmp_path):
    path = tmp_path / "records.jsonl"
    path.write_text('{"task": "a", "backend": "torch", "repeat": 0, "status": "ok"}\n{"task": "b", "sta')
    assert [r["task"] for r in read_records(path)] == ["a"]


def test_a_retried_cell_reads_back_as_its_latest_record(tmp_path):
    from harness.results import append_record

    path = tmp_path / "records.jsonl"
    for status in ("failed", "ok"):
        append_record(path, {"task": "t", "backend": "b", "repeat": 0, "status": status})
    append_record(path, {"task": "t", "backend": "b", "repeat": 1, "status": "ok"})
    assert [r["status"] for r in read_records(path)] == ["ok", "ok"]
    assert [r["status"] for r in read_records(path, history=True)] == ["failed", "ok", "ok"]


def test_resume_refuses_a_task_that_would_now_get_other_data(tmp_path, monkeypatch):
    import json

    from harness.errors import UsageError
    from harness.run_config import RUN_FILE, RunConfig, check_resumed_data

    cfg = RunConfig(tasks=["cifar-cnn"], backends=["torch"], out=tmp_path, data="auto")
    # A run.json from before issue 12: no "data", and the spec built for synthetic CIFAR-shaped data.
    (tmp_path / RUN_FILE).write_text(json.dumps({"specs": {"cifar-cnn": cfg.spec_dict("cifar-cnn")}}))
    check_resumed_data(cfg, {"cifar-cnn": ("synthetic", "synthetic", "auto")})
    with pytest.raises(UsageError, match="now has another spec"):
        check_resumed_data(cfg, {"cifar-cnn": ("fashion-mnist", "/data", "auto")})
    (tmp_path / RUN_FILE).write_text(json.dumps({"data": {"cifar-cnn": "synthetic"}, "specs": {}}))
    with pytest.raises(UsageError, match="started on synthetic but would now get fashion-mnist"):
        check_resumed_data(cfg, {"cifar-cnn": ("fashion-mnist", "/data", "auto")})
