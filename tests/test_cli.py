"""The command line: bad input gives exit 2 and one line; good input runs end to end."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import need, require

from harness.cli import main
from harness.results import read_records
from tasks.datasets import DATASETS

EXAMPLES = Path(__file__).parent.parent / "examples" / "tasks"


def run_cli(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "harness", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)


@pytest.mark.parametrize("args, bad, valid", [
    (["run", "--task", "mnist-mpl"], "mnist-mpl", "mnist-mlp"),
    (["run", "--backend", "pytorch"], "pytorch", "torch"),
    (["run", "--data", "imagenet"], "imagenet", "fashion-mnist"),
    (["run", "--device", "tpu"], "tpu", "gpu"),
    (["run", "--mode", "fast"], "fast", "eager"),
    (["run", "--precision", "fp8"], "fp8", "bf16"),
    (["run", "--task", "mnist-mlp", "--backend", "torch", "--data", "cifar10"], "cifar10", "fashion-mnist"),
])
def test_bad_names_exit_2_with_one_line(args, bad, valid, capsys, tmp_path):
    assert main([*args, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and bad in err and valid in err and "Traceback" not in err


@pytest.mark.parametrize("flag, value", [("--epochs", "0"), ("--repeats", "-1"), ("--batch-size", "0"),
                                         ("--timeout", "-5"), ("--threads", "0"), ("--epochs", "two")])
def test_out_of_range_flags_exit_2(flag, value, capsys):
    assert main(["run", flag, value]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and flag in err


def test_unwritable_out_fails_before_any_cell(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["run", "--task", "mnist-mlp", "--backend", "torch", "--out", str(blocker / "sub")]) == 2
    assert "cannot write results" in capsys.readouterr().err
    assert not (blocker.parent / "sub").exists()


def test_bad_checkpoint_is_refused_up_front(tmp_path, capsys):
    from harness.checkpoint import save_checkpoint
    from harness.weights import initial_weights
    from tasks import get_task

    save_checkpoint(tmp_path / "mlp.npz", get_task("mnist-mlp"), initial_weights(get_task("mnist-mlp"), 0))
    assert main(["run", "--task", "finetune", "--backend", "torch", "--init-from", str(tmp_path / "mlp.npz")]) == 2
    assert "layer 0" in capsys.readouterr().err


def test_missing_real_data_exits_2_naming_the_places(tmp_path):
    out = run_cli("run", "--task", "cifar-cnn", "--backend", "torch", "--data", "cifar10", "--no-download",
                  "--out", str(tmp_path / "o"),
                  env={"XDG_CACHE_HOME": str(tmp_path / "cache"), "TRIBENCH_DATA": str(tmp_path / "nothing")})
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr and str(tmp_path / "nothing") in out.stderr
    assert "cifar-10-python.tar.gz" in out.stderr


def test_compare_of_missing_folder_is_a_usage_error(tmp_path, capsys):
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_list_shows_backends_and_data():
    out = run_cli("list")
    assert out.returncode == 0
    for word in ("mnist-mlp", "cifar-cnn", "finetune", "torch", "tensorflow", "jax", "synthetic"):
        assert word in out.stdout


@pytest.mark.slow
def test_quick_run_end_to_end(tmp_path, fast_backend):
    out_dir = tmp_path / "run"
    out = run_cli("run", "--task", "mnist-mlp", "--backend", fast_backend, "--quick", "--data", "synthetic",
                  "--out", str(out_dir))
    assert out.returncode == 0, out.stderr[-3000:]
    (record,) = read_records(out_dir)
    assert record["status"] == "ok" and record["data"]["synthetic"] is True
    assert record["data"]["subset"] and record["metrics"]["test_accuracy"] > 0.5
    m = record["metrics"]
    assert len(m["epoch_s"]) == 1 and m["warmup_s"] > 0 and m["train_samples_per_s"] > 0
    assert record["memory"]["peak_rss_mb"] >= record["memory"]["rss_after_import_mb"] > 0
    assert record["env"]["framework_version"] and record["schema_version"] == 1
    # The default mode probes and trains in the faster mode; the record says which and why. A quick
    # epoch may be shorter than trying the compiled program would take: then eager trains, untried
    # rival named (harness.probe.PROBE_BUDGET).
    probe = m["mode_probe"]
    assert record["env"]["mode_requested"] == "best" and record["env"]["mode"] == probe["chosen"]
    assert probe["eager"] > 0 and probe["probe_s"] > 0 and probe["budget_s"] > 0
    if "untried" in probe:
        assert probe["chosen"] == "eager" and probe["compiled"] is None and list(probe["untried"]) == ["compiled"]
    else:
        assert probe["chosen"] == max(("compiled", "eager"), key=lambda mode: probe[mode]) and probe["compiled"] > 0
    assert f"{probe['chosen']} (best)" in out.stdout
    assert "SYNTHETIC" in out.stdout + out.stderr
    for name in ("report.md", "report.html", "run.json"):
        assert (out_dir / name).exists()
    assert json.loads((out_dir / "run.json").read_text())["config"]["quick"] is True


@pytest.fixture
def fake_fashion_mnist(tmp_path, monkeypatch):
    """Fashion-MNIST files in the real IDX format under tmp_path/datasets, the only copy tribench finds."""
    from test_data import fake_source, write_mnist

    from harness import data
    from tasks.datasets import DATASETS

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(data, "SYSTEM_DIRS", ())
    write_mnist(tmp_path / "datasets" / "fashion-mnist", n_train=300, n_test=100)
    monkeypatch.setitem(DATASETS, "fashion-mnist",
                        fake_source(tmp_path / "datasets" / "fashion-mnist", "fashion-mnist"))


def test_cnn_task_takes_real_fashion_mnist_when_cifar10_is_absent(tmp_path, fast_backend, fake_fashion_mnist,
                                                                  capsys):
    out_dir = tmp_path / "run"
    assert main(["run", "--task", "cifar-cnn", "--backend", fast_backend, "--quick", "--no-download",
                 "--data-dir", str(tmp_path / "datasets"), "--out", str(out_dir)]) == 0
    said = capsys.readouterr()
    assert "cifar-cnn: real data fashion-mnist" in said.out + said.err
    assert "cifar10 and mnist not found" in said.out + said.err
    (record,) = read_records(out_dir)
    assert record["status"] == "ok" and record["data"]["name"] == "fashion-mnist"
    assert record["data"]["synthetic"] is False
    assert record["spec"]["input_shape"] == [28, 28, 1] and record["spec"]["target_accuracy"] == 0.88
    assert json.loads((out_dir / "run.json").read_text())["data"] == {"cifar-cnn": "fashion-mnist"}
    assert record["tribench_version"] and record["env"]["git_dirty"] is not None


@pytest.mark.slow
def test_missing_backend_is_skipped_with_its_extra(tmp_path, fast_backend, monkeypatch):
    # A backend whose module cannot be found: simulated by pointing its requirement elsewhere.
    from backends import BACKENDS, BackendInfo
    from harness.run_config import RunConfig
    from harness.runner import run_matrix

    missing = next(name for name in BACKENDS if name != fast_backend)
    monkeypatch.setitem(BACKENDS, missing, BackendInfo(missing, "x:y", ("no_such_module_xyz",), missing))
    cfg = RunConfig(tasks=["mnist-mlp"], backends=[missing, fast_backend], out=tmp_path / "o", quick=True,
                    data="synthetic")
    assert run_matrix(cfg) == 0
    records = {r["backend"]: r for r in read_records(tmp_path / "o")}
    assert records[missing]["status"] == "skipped"
    assert f'pip install "tribench[{missing}]"' in records[missing]["error"]
    assert records[fast_backend]["status"] == "ok"


@pytest.mark.slow
def test_sweep_writes_a_table_and_a_plot(tmp_path, fast_backend):
    out = run_cli("sweep", "--task", "mnist-mlp", "--backend", fast_backend, "--quick", "--data", "synthetic",
                  "--batch-size", "64,256", "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    table = (tmp_path / "sweep.md").read_text()
    assert "| 64 |" in table and "| 256 |" in table and "SYNTHETIC" in table
    assert "| mode |" in table and "(best) |" in table  # each point's probe may choose differently
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    sizes = {r["spec"]["batch_size"] for d in ("batch-64", "batch-256") for r in read_records(tmp_path / d)}
    assert sizes == {64, 256}


def test_sweep_rejects_a_bad_batch_size(capsys):
    assert main(["sweep", "--batch-size", "64,0"]) == 2
    assert "must be positive" in capsys.readouterr().err


@pytest.mark.slow
def test_gpu_asked_for_and_absent_is_skipped_with_the_reason(tmp_path, backend_name):
    from conftest import configured

    from harness.run_config import RunConfig
    from harness.runner import run_matrix

    if configured(backend_name).environment()["device"] != "cpu":
        pytest.skip("this machine has a GPU")
    cfg = RunConfig(tasks=["mnist-mlp"], backends=[backend_name], out=tmp_path / "o", quick=True, data="synthetic",
                    device="gpu")
    assert run_matrix(cfg) == 0
    (record,) = read_records(tmp_path / "o")
    assert record["status"] == "skipped" and "gpu" in record["error"].lower()


@pytest.mark.parametrize("args, words", [
    (["run", "--seed", "-1"], ["--seed", "0 or more", "-1"]),
    (["run", "--task", ""], ["no task given", "mnist-mlp"]),
    (["run", "--backend", " , "], ["no backend given", "torch"]),
])
def test_more_bad_flags_exit_2_naming_the_flag(args, words, capsys, tmp_path):
    assert main([*args, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and all(w in err for w in words), err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("kind", ["missing", "file"])
def test_a_data_dir_that_is_not_a_folder_exits_2(tmp_path, capsys, kind):
    target = tmp_path / "data"
    if kind == "file":
        target.write_text("x")
    assert main(["run", "--task", "mnist-mlp", "--backend", "torch", "--data-dir", str(target),
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    state = "is not a folder" if kind == "file" else "does not exist"
    assert len(err.splitlines()) == 1 and f"--data-dir {target} {state}" in err


def saved_run(tmp_path):
    from harness.run_config import RunConfig, write_run_file

    out = tmp_path / "run"
    out.mkdir()
    write_run_file(RunConfig(tasks=["mnist-mlp"], backends=["torch"], out=out, data="synthetic", quick=True))
    return out


def test_resume_refuses_other_flags(tmp_path, capsys):
    out = saved_run(tmp_path)
    assert main(["run", "--resume", str(out), "--seed", "3", "--task", "mnist-mlp"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "(got --task, --seed)" in err and "--resume takes no other" in err
    assert not (out / "records.jsonl").exists()


def test_resume_may_choose_where_cells_run(tmp_path, capsys):
    """--executor is not part of the matrix: a resume may finish a Ray run locally (and back)."""
    out = saved_run(tmp_path)
    code = main(["run", "--resume", str(out), "--executor", "local"])
    assert "--resume takes no other" not in capsys.readouterr().err
    assert code == 0  # the cell ran (or was skipped where torch is not installed)
    assert (out / "records.jsonl").read_text().count("\n") == 1


@pytest.mark.parametrize("edit, words", [
    (lambda s: "[1, 2]", "not a tribench run file"),
    (lambda s: "{not json", "no readable run.json"),
    (lambda s: {**s, "config": []}, "not a tribench run file"),
    (lambda s: {**s, "config": {**s["config"], "tasks": "mnist-mlp"}}, 'config.tasks is "mnist-mlp"'),
    (lambda s: {**s, "config": {**s["config"], "tasks": ["nope"]}}, "task ['nope'] is not valid"),
    (lambda s: {**s, "config": {**s["config"], "repeats": "3"}}, 'config.repeats is "3"'),
    (lambda s: {**s, "config": {**s["config"], "repeats": 0}}, "repeats 0 is below 1"),
    (lambda s: {**s, "config": {**s["config"], "seed": -1}}, "seed -1 is below 0"),
    (lambda s: {**s, "config": {**s["config"], "quick": 1}}, "config.quick is 1"),
    (lambda s: {**s, "config": {**s["config"], "evil": 1}}, "unknown config field 'evil'"),
    (lambda s: {**s, "config": {**s["config"], "data_dir": "nowhere"}}, "nowhere does not exist"),
])
def test_a_malformed_run_json_exits_2_with_one_line(tmp_path, capsys, edit, words):
    out = saved_run(tmp_path)
    saved = json.loads((out / "run.json").read_text())
    changed = edit(saved)
    (out / "run.json").write_text(changed if isinstance(changed, str) else json.dumps(changed))
    assert main(["run", "--resume", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "run.json" in err and words in err and "Traceback" not in err, err


def test_compare_of_an_empty_run_is_an_error_naming_it(tmp_path, capsys):
    from record_factory import make_run, write_run

    base = write_run(tmp_path / "a", make_run())
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "records.jsonl").write_text("")
    assert main(["compare", str(base), str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(tmp_path / "b" / "records.jsonl") in err and "no records" in err


@pytest.mark.parametrize("kind", ["binary", "empty-folder", "empty-flag", "too-short"])
def test_a_corpus_no_worker_could_read_exits_2_before_any_worker_starts(tmp_path, capsys, monkeypatch, kind):
    from harness import executor

    monkeypatch.setattr(executor, "run_worker", lambda *a, **k: pytest.fail("a worker started"))
    target = tmp_path / "corpus"
    if kind == "binary":
        target.write_bytes(b"\x7fELF\x00\x01\xff")
    elif kind == "empty-folder":
        target.mkdir()
    elif kind == "too-short":
        target.write_text("too short for one window of 128 bytes")
    data_dir = "" if kind == "empty-flag" else str(target)
    assert main(["run", "--task", "tiny-gpt", "--backend", "torch", "--data-dir", data_dir,
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    words = {"binary": "not UTF-8 text", "empty-folder": "no UTF-8 text files", "empty-flag": "--data-dir is empty",
             "too-short": "make no window"}[kind]
    assert len(err.splitlines()) == 1 and words in err, err
    assert not (tmp_path / "o" / "records.jsonl").exists()


@pytest.mark.slow
def test_a_toml_language_model_trains_on_every_backend_and_its_loss_curve_reaches_mlflow(tmp_path):
    """The example task file is a GPT on real text (fortunes); its held-out loss per epoch is exported."""
    for name in ("torch", "tensorflow", "jax"):
        require(name)
    mlflow = need("mlflow")
    from harness import text

    if text.system_corpus("fortunes") is None:
        pytest.skip("the fortunes package is not installed here")  # CI installs it (.ci/run)
    out_dir = tmp_path / "run"
    # Three framework start-ups and probes: about 3 CPU-minutes, 10 minutes of wall time on a loaded 2-core VM.
    out = run_cli("run", "--task", str(EXAMPLES / "fortunes-gpt.toml"), "--backend", "torch,tensorflow,jax",
                  "--quick", "--no-download", "--out", str(out_dir), timeout=1800)
    assert out.returncode == 0, out.stderr[-3000:]
    records = read_records(out_dir)
    assert sorted(r["backend"] for r in records) == ["jax", "tensorflow", "torch"]
    for record in records:
        assert record["status"] == "ok" and record["task"] == "fortunes-gpt" and record["objective"] == "loss"
        assert record["data"]["name"] == "fortunes" and record["data"]["synthetic"] is False
        assert (record["data"]["n_train"], record["data"]["n_test"]) == DATASETS["fortunes"].quick
        m = record["metrics"]
        assert len(m["epoch_test_loss"]) == 1 and m["epoch_test_loss"][0] < m["initial_test_loss"]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["export", str(out_dir), "--mlflow", uri]) == 0
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("tribench")
    for record in records:
        child = next(r for r in client.search_runs([experiment.experiment_id])
                     if r.info.run_name == f"fortunes-gpt/{record['backend']}/r0")
        history = sorted(client.get_metric_history(child.info.run_id, "epoch/test_loss"), key=lambda m: m.step)
        assert [m.value for m in history] == pytest.approx(
            [record["metrics"]["initial_test_loss"], *record["metrics"]["epoch_test_loss"]])


FASHION_MLP = """
name = "fashion-mlp"
dataset = "fashion-mnist"
input_shape = [28, 28, 1]
batch_size = 128
epochs = 1
target_accuracy = 0.7

[optimizer]
kind = "adam"
lr = 1e-3

[[layers]]
kind = "flatten"
name = "flatten"

[[layers]]
kind = "dense"
name = "fc1"
units = 64
activation = "relu"

[[layers]]
kind = "dense"
name = "head"
units = 10
"""


def test_a_toml_task_of_fashion_mnist_trains_on_it(tmp_path, fast_backend, fake_fashion_mnist, capsys):
    """dataset = "fashion-mnist" in a task file: its own data, found, checked and trained on (files in
    the real format here; the real dataset where Debian's dataset-fashion-mnist is installed)."""
    task = tmp_path / "fashion.toml"
    task.write_text(FASHION_MLP)
    out_dir = tmp_path / "run"
    assert main(["run", "--task", str(task), "--backend", fast_backend, "--quick", "--no-download",
                 "--data-dir", str(tmp_path / "datasets"), "--out", str(out_dir)]) == 0
    said = capsys.readouterr()
    assert "fashion-mlp: real data fashion-mnist" in said.out + said.err
    (record,) = read_records(out_dir)
    assert record["status"] == "ok" and record["data"]["name"] == "fashion-mnist"
    assert record["data"]["synthetic"] is False and record["data"]["n_train"] == 300
    assert json.loads((out_dir / "run.json").read_text())["data"] == {"fashion-mlp": "fashion-mnist"}


@pytest.mark.slow
def test_a_toml_task_of_fashion_mnist_trains_on_the_real_dataset(tmp_path, fast_backend):
    from harness import data
    from tasks.datasets import DATASETS

    folder, _ = data.find_source(DATASETS["fashion-mnist"], None)
    if folder is None:
        pytest.skip("Fashion-MNIST is not installed here")  # CI installs it (.ci/run: dataset-fashion-mnist)
    task = tmp_path / "fashion.toml"
    task.write_text(FASHION_MLP)
    out = run_cli("run", "--task", str(task), "--backend", fast_backend, "--quick", "--no-download",
                  "--out", str(tmp_path / "run"))
    assert out.returncode == 0, out.stderr[-3000:]
    (record,) = read_records(tmp_path / "run")
    assert record["status"] == "ok" and record["data"]["name"] == "fashion-mnist"
    assert (record["data"]["n_train"], record["data"]["n_test"]) == (12000, 2000)  # the table's quick subset
    assert record["metrics"]["test_accuracy"] > 0.7


def test_a_task_with_fewer_classes_than_its_data_exits_2_before_any_worker(tmp_path, capsys, monkeypatch):
    from harness import executor

    monkeypatch.setattr(executor, "run_worker", lambda *a, **k: pytest.fail("a worker started"))
    monkeypatch.setattr("harness.data.SYSTEM_DIRS", ())
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    task = tmp_path / "five.toml"
    task.write_text(FASHION_MLP.replace('name = "fashion-mlp"', 'name = "five"').replace(
        "units = 10", "units = 5").replace("epochs = 1", "epochs = 1\nnum_classes = 5"))
    data_dir = tmp_path / "datasets"
    from test_data import fake_source, write_mnist

    from tasks.datasets import DATASETS

    write_mnist(data_dir / "fashion-mnist", n_train=30, n_test=10)
    monkeypatch.setitem(DATASETS, "fashion-mnist", fake_source(data_dir / "fashion-mnist", "fashion-mnist"))
    assert main(["run", "--task", str(task), "--backend", "torch", "--no-download", "--data-dir", str(data_dir),
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "fashion-mnist has 10 classes but task 'five' has num_classes 5" in err
