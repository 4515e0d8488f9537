"""The cell config a worker is told to run: typed, round-tripped through the worker's file, refused when malformed."""

import dataclasses
import json
import subprocess
import sys

import pytest
from record_factory import make_record

from harness import export_common, plots, worker
from harness.cell_config import CellConfig
from harness.cells import Cell, cell_config
from harness.confine import UntrustedInput
from harness.results import REPO_ROOT
from harness.run_config import RunConfig
from harness.schema import record_problem


def a_cell_config(tmp_path, **changes) -> CellConfig:
    cfg = RunConfig(tasks=["mnist-mlp"], backends=["torch"], out=tmp_path / "out", quick=True, threads=2,
                    export=["native"], init_from=str(tmp_path / "init.safetensors"))
    return dataclasses.replace(cell_config(cfg, Cell("mnist-mlp", "torch", 1, pinned_mode="compiled"),
                                           ("fashion-mnist", str(tmp_path / "fashion-mnist"))), **changes)


def test_a_cell_config_reads_back_from_its_json_as_it_was_built(tmp_path):
    cfg = a_cell_config(tmp_path, driver_pid=123, cell_dir=str(tmp_path / "cell"))
    back = CellConfig.from_json(cfg.to_json(), "cell.json")
    assert back == cfg
    assert back.subset == (12000, 2000) and back.export == ("native",) and back.seed == 1


def test_the_worker_runs_the_config_the_runner_wrote(tmp_path, monkeypatch):
    cfg = a_cell_config(tmp_path)
    seen = []

    def run_cell(got, record):
        seen.append(got)
        record["status"] = "ok"
        return record

    monkeypatch.setattr(worker, "run_cell", run_cell)
    (tmp_path / "cell.json").write_text(cfg.to_json())
    assert worker.main([str(tmp_path / "cell.json"), str(tmp_path / "record.json")]) == 0
    assert seen == [cfg]
    record = json.loads((tmp_path / "record.json").read_text())
    assert (record["task"], record["backend"], record["repeat"], record["seed"]) == ("mnist-mlp", "torch", 1, 1)


@pytest.mark.parametrize("change, words", [
    ({"colour": "red"}, "unknown field 'colour'"),
    ({"threads": "2"}, "threads is \"2\", not a valid value"),
    ({"repeat": True}, "repeat is true, not a valid value"),
    ({"export": ["../x"]}, "export.0"),
    ({"task": None}, "task is null"),
    ({"rank": 1024}, "rank 1024 is not below 1024"),
    ({"subset": [1, 2, 3]}, "subset"),
])
def test_a_malformed_config_is_refused_naming_the_field(tmp_path, change, words):
    text = json.dumps({**json.loads(a_cell_config(tmp_path).to_json()), **change})
    with pytest.raises(UntrustedInput) as info:
        CellConfig.from_json(text, "cell.json")
    assert str(info.value).startswith("cell.json: not a cell config: ") and words in str(info.value), info.value


def test_a_missing_field_is_refused_naming_it(tmp_path):
    fields = json.loads(a_cell_config(tmp_path).to_json())
    del fields["data_seed"]
    with pytest.raises(UntrustedInput, match="data_seed is missing"):
        CellConfig.from_json(json.dumps(fields), "cell.json")


def test_a_worker_given_a_bad_config_exits_2_with_one_line_and_writes_no_record(tmp_path):
    fields = {**json.loads(a_cell_config(tmp_path).to_json()), "threds": 4}
    (tmp_path / "cell.json").write_text(json.dumps(fields))
    out = subprocess.run([sys.executable, "-m", "harness.worker", str(tmp_path / "cell.json"),
                          str(tmp_path / "record.json")], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert out.returncode == 2
    (line,) = out.stderr.strip().splitlines()
    assert "cell.json: not a cell config: unknown field 'threds'" in line, line
    assert not (tmp_path / "record.json").exists()


def test_a_record_that_still_carries_the_old_eval_cadence_loads_and_plots(tmp_path):
    record = make_record(epochs=3)
    record["metrics"]["eval_every_epochs"] = 1  # written by tribench before the field was dropped
    assert record_problem(record) is None
    epochs, _, _ = plots._metric_points(record, plots._Metric([record]))
    assert epochs == [0, 1, 2, 3]
    assert [e for e, _ in export_common.epoch_series(record)["test_accuracy"]] == [0, 1, 2, 3]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts threads in /proc")
def test_the_worker_reads_its_config_before_any_thread_starts():
    """What worker.main imports before lifeline.tie_to_driver starts no thread: a thread made before
    SIGTERM is blocked (numpy's BLAS pool) takes the driver's death signal and kills the worker
    without removing its cell folder (tests/test_storage.py's orphan test)."""
    code = ("import os, harness.worker, harness.cell_config, harness.confine; "
            "print(len(os.listdir('/proc/self/task')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1"
