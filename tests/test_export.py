"""Exports read back with the trackers' own readers: MLflow's client and TensorBoard's EventAccumulator."""

from __future__ import annotations

import pytest
from conftest import need
from record_factory import make_record, make_run, write_run

from harness.cli import main
from harness.export_common import spec_hash


@pytest.fixture
def run_dir(tmp_path):
    from harness.report import write_report

    records = make_run(tasks=("mnist-mlp", "finetune"), backends=("torch", "jax"), repeats=2, epochs=3)
    records.append(make_record("mnist-mlp", "tensorflow", 0, status="failed"))
    folder = write_run(tmp_path / "run", records)
    write_report(folder)
    return folder


def test_mlflow_export_gives_one_run_per_record_with_per_epoch_metrics(run_dir, tmp_path, capsys):
    mlflow = need("mlflow")
    from harness.results import read_records

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["export", str(run_dir), "--mlflow", uri]) == 0
    assert "9 runs (one per record; 9 new)" in capsys.readouterr().out
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("tribench")
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(parents) == 1 and len(children) == 9
    records = {f"{r['task']}/{r['backend']}/r{r['repeat']}": r for r in read_records(run_dir)}
    assert {c.info.run_name for c in children} == set(records)
    child = next(c for c in children if c.info.run_name == "finetune/jax/r1")
    record = records["finetune/jax/r1"]
    p = child.data.params
    assert (p["task"], p["backend"], p["device"], p["precision"], p["mode"], p["seed"]) == (
        "finetune", "jax", "cpu", "fp32", "compiled", "0")
    assert p["spec_hash"] == spec_hash(record) and p["framework_version"] == "0.4.30"
    history = client.get_metric_history(child.info.run_id, "epoch/test_accuracy")
    history = sorted(history, key=lambda m: m.step)
    assert [m.step for m in history] == [0, 1, 2, 3]
    assert [m.value for m in history] == pytest.approx(
        [record["metrics"]["initial_test_accuracy"], *record["metrics"]["epoch_test_accuracy"]])
    assert child.data.metrics["train_samples_per_s"] == pytest.approx(record["metrics"]["train_samples_per_s"])
    assert child.data.tags["tribench.status"] == "ok" and child.info.status == "FINISHED"
    failed = next(c for c in children if c.info.run_name == "mnist-mlp/tensorflow/r0")
    assert failed.info.status == "FAILED" and "signal 9" in failed.data.tags["tribench.error"]
    artifacts = {a.path for a in client.list_artifacts(parents[0].info.run_id)}
    assert {"report.md", "report.html", "epoch_curves.png"} <= artifacts


def test_tensorboard_export_gives_per_epoch_scalars_and_hparams_per_cell(run_dir, tmp_path, capsys):
    need("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    from harness.results import read_records

    logdir = tmp_path / "tb"
    assert main(["export", str(run_dir), "--tensorboard", str(logdir)]) == 0
    assert "9 runs" in capsys.readouterr().out
    record = next(r for r in read_records(run_dir)
                  if (r["task"], r["backend"], r["repeat"]) == ("mnist-mlp", "torch", 1))
    acc = EventAccumulator(str(logdir / "mnist-mlp" / "torch" / "r1"))
    acc.Reload()
    losses = acc.Scalars("epoch/train_loss")
    assert [e.step for e in losses] == [1, 2, 3]
    assert [e.value for e in losses] == pytest.approx(record["metrics"]["epoch_train_loss"])
    assert acc.Scalars("final/test_accuracy")[0].value == pytest.approx(record["metrics"]["test_accuracy"])
    content = acc.PluginTagToContent("hparams")
    start = next(plugin_data_pb2.HParamsPluginData.FromString(c) for c in content.values()
                 if plugin_data_pb2.HParamsPluginData.FromString(c).HasField("session_start_info"))
    hparams = start.session_start_info.hparams
    assert hparams["backend"].string_value == "torch" and hparams["repeat"].string_value == "1"
    assert hparams["spec_hash"].string_value == spec_hash(record)

    # Exported again (into a folder that also holds someone else's event file): the same
    # points once, and the other file left alone.
    foreign = logdir / "mnist-mlp" / "torch" / "r1" / "events.out.tfevents.0.someone-else"
    foreign.write_bytes(b"")
    assert main(["export", str(run_dir), "--tensorboard", str(logdir)]) == 0
    again = EventAccumulator(str(logdir / "mnist-mlp" / "torch" / "r1"))
    again.Reload()
    assert [e.step for e in again.Scalars("epoch/train_loss")] == [1, 2, 3] and foreign.exists()


def test_export_needs_a_destination_and_records(tmp_path, capsys):
    assert main(["export", str(tmp_path), "--mlflow", "sqlite:///x.db"]) == 2
    assert "no records" in capsys.readouterr().err
    folder = write_run(tmp_path / "r", make_run(backends=("torch",)))
    assert main(["export", str(folder)]) == 2
    assert "--mlflow URI and/or --tensorboard LOGDIR" in capsys.readouterr().err


def test_a_missing_extra_exits_2_with_the_install_hint(tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    folder = write_run(tmp_path / "r", make_run(backends=("torch",)))
    assert main(["export", str(folder), "--mlflow", "sqlite:///x.db"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == 'tribench: error: mlflow is not installed: pip install "tribench[mlflow]"'


def test_mlflow_export_of_the_same_folder_twice_duplicates_nothing(run_dir, tmp_path, capsys):
    """A second export reuses the parent run and writes only records it has not seen (a resumed run's new cells)."""
    mlflow = need("mlflow")
    from harness.results import read_records

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["export", str(run_dir), "--mlflow", uri]) == 0
    assert main(["export", str(run_dir), "--mlflow", uri]) == 0
    assert "9 runs (one per record; 0 new)" in capsys.readouterr().out
    records = read_records(run_dir)
    records.append(make_record("finetune", "tensorflow", 0))
    write_run(run_dir, records)
    assert main(["export", str(run_dir), "--mlflow", uri]) == 0
    assert "10 runs (one per record; 1 new)" in capsys.readouterr().out
    client = mlflow.MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("tribench").experiment_id], max_results=100)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and len(runs) == 1 + 10
    assert sorted(r.info.run_name for r in runs if r is not parents[0]) == sorted(
        f"{r['task']}/{r['backend']}/r{r['repeat']}" for r in records)


def test_a_loss_judged_task_exports_its_held_out_loss_curve_to_both_trackers(tmp_path, capsys):
    """tiny-gpt is judged by held-out loss: its per-epoch test loss (epoch 0 the untrained model) reaches both."""
    mlflow = need("mlflow")
    need("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    record = make_record("tiny-gpt", "jax", 0, epochs=3)
    folder = write_run(tmp_path / "run", [record])
    expected = [record["metrics"]["initial_test_loss"], *record["metrics"]["epoch_test_loss"]]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["export", str(folder), "--mlflow", uri, "--tensorboard", str(tmp_path / "tb")]) == 0
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("tribench")
    child = next(r for r in client.search_runs([experiment.experiment_id]) if r.info.run_name == "tiny-gpt/jax/r0")
    history = sorted(client.get_metric_history(child.info.run_id, "epoch/test_loss"), key=lambda m: m.step)
    assert [m.step for m in history] == [0, 1, 2, 3]
    assert [m.value for m in history] == pytest.approx(expected)
    acc = EventAccumulator(str(tmp_path / "tb" / "tiny-gpt" / "jax" / "r0"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("epoch/test_loss")] == [0, 1, 2, 3]
    assert [e.value for e in acc.Scalars("epoch/test_loss")] == pytest.approx(expected)
