"""Results folders, task files and shards from someone else: nothing written outside, no forged result believed."""

import contextlib
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from record_factory import make_record

from harness import confine, data, folderlock, report
from harness.cells import plan
from harness.cli import main
from harness.results import RECORDS_FILE, read_records, total_memory_bytes
from harness.run_config import RunConfig, write_run_file
from harness.shard import in_shard
from tasks import TASKS

Q = ["--backend", "torch", "--data", "synthetic", "--quick", "--mode", "eager", "--threads", "1"]


@pytest.fixture(autouse=True)
def task_registry():
    """Task files register their tasks; take them out again, so that no later test runs a 24 GiB model."""
    saved = dict(TASKS)
    yield
    TASKS.clear()
    TASKS.update(saved)


def one_line_error(capsys, *words):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert all(w in err for w in words), err
    return err


def run_folder(path, **changes):
    path.mkdir()
    write_run_file(RunConfig(**{**dict(tasks=["mnist-mlp"], backends=["torch"], out=path, data="synthetic",
                                       quick=True, threads=1), **changes}))
    return path


def run_file(folder):
    return json.loads((folder / "run.json").read_text())


# -- writes confined: the lock, records.jsonl, checkpoints/ -----------------------------

@pytest.mark.parametrize("how", ["resume", "out"])
def test_a_symlinked_lock_is_refused_and_its_target_untouched(tmp_path, capsys, how):
    precious = tmp_path / "V"
    precious.write_text("precious\n")
    folder = tmp_path / "d"
    folder.mkdir()
    (folder / folderlock.LOCK_FILE).symlink_to(precious)
    (folder / "run.json").write_text("{")
    args = ["run", "--resume", str(folder)] if how == "resume" else ["run", "--task", "mnist-mlp", *Q, "--out",
                                                                      str(folder)]
    assert main(args) == 2
    one_line_error(capsys, "symbolic link")
    assert precious.read_text() == "precious\n"


def test_a_symlinked_records_file_is_refused_and_its_target_untouched(tmp_path, capsys):
    outside = tmp_path / "outside.txt"
    outside.write_text("line\nunterminated tail")
    folder = run_folder(tmp_path / "d")
    (folder / RECORDS_FILE).symlink_to(outside)
    assert main(["run", "--resume", str(folder)]) == 2
    one_line_error(capsys, "symbolic link")
    assert outside.read_text() == "line\nunterminated tail"
    assert not list(tmp_path.glob("outside.txt.torn-*"))


def test_a_symlinked_checkpoints_folder_is_refused_before_any_cell(tmp_path, capsys):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    folder = run_folder(tmp_path / "d")
    (folder / "checkpoints").symlink_to(elsewhere, target_is_directory=True)
    assert main(["run", "--resume", str(folder)]) == 2
    one_line_error(capsys, "checkpoints", "symbolic link")
    assert list(elsewhere.iterdir()) == [] and not (folder / RECORDS_FILE).exists()


def test_storage_never_writes_through_a_symlink(tmp_path):
    from harness.storage import append_line

    target = tmp_path / "target"
    target.write_text("x")
    (tmp_path / "link").symlink_to(target)
    with pytest.raises(confine.UntrustedInput, match="symbolic link"):
        append_line(tmp_path / "link", b"record\n")
    assert target.read_text() == "x"


# -- names that become paths ----------------------------------------------------------------

def task_toml(name: str = "tiny", *, hidden: int | None = None) -> str:
    """test_taskfile's good task file, renamed, with a Dense layer of `hidden` units before the head if given."""
    from test_taskfile import GOOD

    text = GOOD.replace('name = "tiny"', f'name = "{name}"', 1)
    head = '[[layers]]\nkind = "dense"\nname = "head"'
    assert head in text
    return text.replace(head, f'[[layers]]\nkind = "dense"\nname = "hidden"\nunits = {hidden}\n\n{head}') \
        if hidden else text


@pytest.mark.parametrize("name", ["../../../../escape/pwn", ".hidden", "a/b", "x" * 129, ""])
def test_a_task_name_that_is_not_a_safe_name_is_refused_at_the_source(tmp_path, capsys, name):
    path = tmp_path / "task.toml"
    path.write_text(task_toml(name))
    assert main(["run", "--task", str(path), *Q, "--out", str(tmp_path / "out")]) == 2
    one_line_error(capsys, "not a safe name")
    assert not (tmp_path / "out").exists() and not (tmp_path.parent / "escape").exists()


def test_a_traversing_task_name_in_run_json_is_refused_on_resume(tmp_path, capsys):
    folder = run_folder(tmp_path / "d")
    saved = run_file(folder)
    spec = dict(saved["specs"]["mnist-mlp"], name="../../../../escape/pwn")
    saved["task_files"] = {"../../../../escape/pwn": spec}
    saved["config"]["tasks"] = ["../../../../escape/pwn"]
    (folder / "run.json").write_text(json.dumps(saved))
    assert main(["run", "--resume", str(folder)]) == 2
    one_line_error(capsys, "run.json")
    assert not list(folder.glob("**/*.npz"))


def test_export_skips_a_record_whose_task_would_leave_the_logdir(tmp_path, capsys, caplog):
    pytest.importorskip("tensorboard")
    run = tmp_path / "run"
    run.mkdir()
    (run / RECORDS_FILE).write_text(json.dumps(make_record(task="../../../../../tb_escape/x")) + "\n"
                                    + json.dumps(make_record()) + "\n")
    logdir = tmp_path / "a" / "b" / "c" / "d" / "logs"
    assert main(["export", str(run), "--tensorboard", str(logdir)]) == 0
    assert f"{run / RECORDS_FILE}:1: skipping an invalid record: task" in caplog.text
    assert not (tmp_path / "tb_escape").exists()
    assert [p.relative_to(logdir).parts[:3] for p in logdir.glob("*/*/*")] == [("mnist-mlp", "torch", "r0")]


def test_report_md_escapes_figure_captions():
    md = report._render_md([], report.summary_table([]), [(Path("x.png"), "<script>alert(1)</script>")], "t")
    assert "<script>" not in md and "&lt;script&gt;" in md


# -- records and run.json checked against one schema ------------------------------------------

@pytest.mark.parametrize("field, value", [("repeat", "1"), ("repeat", [1]), ("env", "x"), ("data", "x"),
                                          ("spec", [1]), ("metrics", {"test_accuracy": "0.9"}),
                                          ("metrics", {"test_accuracy": float("nan")}), ("repeat", True)])
@pytest.mark.parametrize("command", ["report", "compare", "history", "export"])
def test_a_crafted_record_is_skipped_with_a_warning_by_every_reader(tmp_path, capsys, caplog, field, value, command):
    run = tmp_path / "run"
    run.mkdir()
    bad = dict(make_record(backend="jax"), **{field: value})
    (run / RECORDS_FILE).write_text(json.dumps(make_record()) + "\n" + json.dumps(bad) + "\n")
    args = {"report": ["report", str(run)], "compare": ["compare", str(run), str(run)],
            "history": ["history", str(tmp_path)],
            "export": ["export", str(run), "--tensorboard", str(tmp_path / "tb")]}[command]
    if command == "export":
        pytest.importorskip("tensorboard")
    assert main(args) == 0
    assert f"{run / RECORDS_FILE}:2: skipping" in caplog.text and field in caplog.text
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize("edit, words", [
    (lambda s: {**s, "config": {**s["config"], "shard": "0/2"}}, "config.shard"),
    (lambda s: {**s, "config": {**s["config"], "shard": [5, 2]}}, "shard [5, 2]"),
    (lambda s: {**s, "config": {**s["config"], "threads": 10**6}}, "config.threads 1000000 is above 4096"),
    (lambda s: {**s, "config": {**s["config"], "repeats": 10**12}}, "config.repeats 1000000000000 is above 1000"),
    (lambda s: {**s, "config": {**s["config"], "data": [1]}}, "config.data"),
    (lambda s: {**s, "data": "x"}, "data"),
    (lambda s: "[" * 100_000 + "]" * 100_000, "no readable run.json"),
])
def test_a_crafted_run_json_exits_2_with_one_line_on_resume(tmp_path, capsys, edit, words):
    folder = run_folder(tmp_path / "d")
    changed = edit(run_file(folder))
    (folder / "run.json").write_text(changed if isinstance(changed, str) else json.dumps(changed))
    assert main(["run", "--resume", str(folder)]) == 2
    one_line_error(capsys, words)
    assert not (folder / RECORDS_FILE).exists()


# -- bounds before work ----------------------------------------------------------------------

@pytest.mark.parametrize("flags, words", [
    (["--repeats", "1000000000000"], "repeats 1000000000000 is above 1000"),
    (["--threads", "1000000"], "threads 1000000 is above 4096"),
    (["--seed", "4294967296"], "seed 4294967296 is above 4294967295"),
])
def test_out_of_bound_flags_exit_2_before_any_plan(tmp_path, capsys, flags, words):
    args = ["run", "--task", "mnist-mlp", *[a for a in Q if a not in ("--threads", "1")], *flags]
    assert main([*args, "--out", str(tmp_path / "o")]) == 2
    one_line_error(capsys, words)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("override, words", [("lr=inf", "not a finite number"), ("lr=nan", "not a finite number"),
                                             ("stages=x", "unknown key 'stages'"), ("seed=-4", "seed must be in"),
                                             ("d_model=abc", "d_model='abc' is not a valid d_model")])
def test_a_bad_override_exits_2_with_one_line(tmp_path, capsys, override, words):
    assert main(["run", "--task", "tiny-gpt", *Q, "--override", override, "--out", str(tmp_path / "o")]) == 2
    one_line_error(capsys, words)


def test_a_model_larger_than_memory_is_refused_from_its_parameter_count(tmp_path, capsys):
    units = total_memory_bytes() // (8 * 784) + 1  # 8 bytes per parameter: weights and gradients alone
    path = tmp_path / "big.toml"
    path.write_text(task_toml("big", hidden=units))
    assert main(["run", "--task", str(path), *Q, "--out", str(tmp_path / "o")]) == 2
    one_line_error(capsys, "parameters need at least", "more than this machine's")


def test_a_large_toml_is_refused_by_its_size(tmp_path, capsys):
    path = tmp_path / "big.toml"
    path.write_text(task_toml() + "# pad\n" * 200_000)
    assert main(["show", str(path)]) == 2
    one_line_error(capsys, "more than the 1,048,576")


@pytest.mark.parametrize("body", ["x = " + "[" * 600 + "]" * 600, "x = " + "[" * 200_000 + "]" * 200_000,
                                  "x = " + "{a = " * 600 + "1" + "}" * 600])
def test_a_deeply_nested_toml_is_refused_with_one_line(tmp_path, capsys, body):
    path = tmp_path / "deep.toml"
    path.write_bytes(body.encode()[:1 << 20])
    assert main(["show", str(path)]) == 2
    one_line_error(capsys, str(path))


def test_a_spec_of_many_layers_is_validated(tmp_path):
    """Layer-name uniqueness is a Counter, not names.count per layer (quadratic: 5k layers took 4 s)."""
    from tasks import get_task
    from tasks.taskfile import spec_from_dict

    layers = [{"kind": "flatten", "name": "flat"}] + [
        {"kind": "dense", "name": f"d{i}", "units": 4, "activation": "relu"} for i in range(20_000)]
    table = dict(json.loads(json.dumps(get_task("mnist-mlp").to_dict())),
                 layers=[*layers, {"kind": "dense", "name": "head", "units": 10}])
    assert len(spec_from_dict(table).layers) == 20_002


# -- special files where a file is expected -----------------------------------------------

def cli(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "harness", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": os.getcwd()})


@pytest.mark.parametrize("which, command", [(RECORDS_FILE, "report"), (RECORDS_FILE, "compare"),
                                            ("run.json", "resume"), (RECORDS_FILE, "resume")])
def test_a_fifo_in_a_results_folder_is_refused_not_waited_on(tmp_path, which, command):
    folder = run_folder(tmp_path / "d")
    (folder / which).unlink(missing_ok=True)
    os.mkfifo(folder / which)
    args = {"report": ["report", str(folder)], "compare": ["compare", str(folder), str(folder)],
            "resume": ["run", "--resume", str(folder)]}[command]
    done = cli(*args)
    assert done.returncode == 2, done.stderr
    assert "not a regular file" in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr


# -- merge verifies what it joins -------------------------------------------------------------

def shard(tmp_path, name, index, *, count=2, backends=("torch", "jax"), repeats=2):
    cfg = RunConfig(tasks=["mnist-mlp"], backends=list(backends), out=tmp_path / name, data="synthetic", quick=True,
                    threads=1, repeats=repeats, shard=[index, count])
    cfg.out.mkdir()
    write_run_file(cfg)
    spec = run_file(cfg.out)["specs"]["mnist-mlp"]
    lines = []
    for cell in in_shard(plan(cfg), cfg.shard):
        record = make_record(backend=cell.backend, repeat=cell.repeat, seed=cell.repeat)
        record["spec"] = dict(spec, seed=cell.repeat)
        lines.append(json.dumps(record))
    (cfg.out / RECORDS_FILE).write_text("\n".join(lines) + "\n")
    return cfg.out


def test_merge_of_honest_shards_keeps_every_record(tmp_path):
    s0, s1 = shard(tmp_path, "s0", 0), shard(tmp_path, "s1", 1)
    assert main(["merge", str(s0), str(s1), "--out", str(tmp_path / "m")]) == 0
    assert len(read_records(tmp_path / "m")) == 4


@pytest.mark.parametrize("forge, words", [
    (lambda r: dict(r, metrics=dict(r["metrics"], test_accuracy=0.12345, train_samples_per_s=1e9)),
     ["s1/records.jsonl:3", "is not a cell of this folder's shard 1/2", "s0/records.jsonl:1 holds it"]),
    (lambda r: dict(r, backend="tensorflow"), ["is not a cell of this folder's shard"]),
    (lambda r: dict(r, task="cifar-cnn"), ["is not a cell of this folder's shard"]),
    (lambda r: dict(r, repeat=7), ["repeat 7 is not a cell"]),
])
def test_merge_refuses_a_forged_or_foreign_record_naming_both(tmp_path, capsys, forge, words):
    s0, s1 = shard(tmp_path, "s0", 0), shard(tmp_path, "s1", 1)
    first = json.loads((s0 / RECORDS_FILE).read_text().splitlines()[0])
    with open(s1 / RECORDS_FILE, "a") as f:
        f.write(json.dumps(forge(first)) + "\n")
    assert main(["merge", str(s0), str(s1), "--out", str(tmp_path / "m")]) == 2
    one_line_error(capsys, *words)
    assert not (tmp_path / "m").exists()


def test_merge_refuses_a_record_of_another_spec(tmp_path, capsys):
    s0, s1 = shard(tmp_path, "s0", 0), shard(tmp_path, "s1", 1)
    lines = (s1 / RECORDS_FILE).read_text().splitlines()
    record = json.loads(lines[0])
    record["spec"]["epochs"] = 99
    (s1 / RECORDS_FILE).write_text("\n".join([json.dumps(record), *lines[1:]]) + "\n")
    assert main(["merge", str(s0), str(s1), "--out", str(tmp_path / "m")]) == 2
    one_line_error(capsys, "s1/records.jsonl:1", "is not the one its run.json gives")


@pytest.mark.parametrize("edit", [lambda s: {k: v for k, v in s.items() if k != "config"}, lambda s: [s],
                                  lambda s: {**s, "config": {**s["config"], "evil": 1}}])
def test_merge_refuses_a_malformed_run_json(tmp_path, capsys, edit):
    s0, s1 = shard(tmp_path, "s0", 0), shard(tmp_path, "s1", 1)
    (s1 / "run.json").write_text(json.dumps(edit(run_file(s1))))
    assert main(["merge", str(s0), str(s1), "--out", str(tmp_path / "m")]) == 2
    one_line_error(capsys, "run.json")


def test_merge_refuses_a_non_empty_or_live_folder(tmp_path, capsys):
    s0, s1 = shard(tmp_path, "s0", 0), shard(tmp_path, "s1", 1)
    live = tmp_path / "live"
    live.mkdir()
    with folderlock.hold(live):
        assert main(["merge", str(s0), str(s1), "--out", str(live)]) == 2
        one_line_error(capsys, "in use by a running tribench")
    (live / "run.json").write_text("{}")
    assert main(["merge", str(s0), str(s1), "--out", str(live)]) == 2
    one_line_error(capsys, "is not empty")
    assert (live / "run.json").read_text() == "{}" and not (live / RECORDS_FILE).exists()


def test_merge_copies_no_symlinked_checkpoint(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("secret")
    s0, s1 = shard(tmp_path, "s0", 0), shard(tmp_path, "s1", 1)
    (s0 / "checkpoints").mkdir()
    (s0 / "checkpoints" / "mnist-mlp-torch-r0-train.npz").symlink_to(secret)
    (s1 / "checkpoints").mkdir()
    (s1 / "checkpoints" / "mnist-mlp-jax-r1-train.npz").write_bytes(b"npz")
    assert main(["merge", str(s0), str(s1), "--out", str(tmp_path / "m")]) == 0
    assert sorted(p.name for p in (tmp_path / "m" / "checkpoints").iterdir()) == ["mnist-mlp-jax-r1-train.npz"]


# -- compare: what new did not measure never passes ------------------------------------------

def write_run(folder, records):
    folder.mkdir()
    (folder / RECORDS_FILE).write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


@pytest.mark.parametrize("new, code, words", [
    ([make_record(status="skipped"), make_record(repeat=1, status="skipped")], 3, "INCOMPLETE"),
    ([make_record(), make_record(repeat=1, status="failed")], 1, "repeat 1 failed in new"),
    ([make_record()], 3, "repeat 1 missing in new"),
    ([make_record(), make_record(repeat=1, status="skipped")], 3, "repeat 1 skipped in new"),
])
def test_compare_never_passes_a_cell_new_did_not_measure(tmp_path, capsys, new, code, words):
    base = write_run(tmp_path / "base", [make_record(), make_record(repeat=1)])
    assert main(["compare", str(base), str(write_run(tmp_path / "new", new))]) == code
    out = capsys.readouterr().out
    assert words in out and "RESULT: no regression" not in out


# -- data, services -------------------------------------------------------------------------

def test_a_verified_cifar_folder_unpickles_only_its_listed_files(tmp_path):
    from test_untrusted import Payload

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    batch = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]}
    for name in data.CIFAR_BATCHES:
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    marker = tmp_path / "pwned"
    (folder / "data_batch_1.orig").write_bytes(pickle.dumps({b"data": Payload(marker)}, protocol=2))
    x_train, *_ = data.load_cifar(folder)
    assert len(x_train) == 10 and not marker.exists()


def test_a_refused_run_leaves_no_folder_behind(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(data, "search_dirs", lambda data_dir: [tmp_path / "empty"])
    out = tmp_path / "new"
    assert main(["run", "--task", "cifar-cnn", *Q[:2], "--data", "cifar10", "--no-download", "--quick",
                 "--threads", "1", "--out", str(out)]) == 2
    one_line_error(capsys)
    assert not out.exists()


@pytest.mark.parametrize("uri, words", [("sqlite:///{tmp}/missing/x.db", "does not exist"),
                                        ("sqlite:///{tmp}", "cannot write that sqlite store"),
                                        ("http://127.0.0.1:1", "MlflowException")])
def test_mlflow_failures_are_one_line_and_bounded(tmp_path, capsys, uri, words):
    pytest.importorskip("mlflow")
    run = write_run(tmp_path / "run", [make_record()])
    assert main(["export", str(run), "--mlflow", uri.format(tmp=tmp_path)]) == 2
    one_line_error(capsys, words)
    assert not (tmp_path / "missing").exists()


def test_mlflow_uploads_no_symlinked_report(tmp_path):
    mlflow = pytest.importorskip("mlflow")
    secret = tmp_path / "secret.md"
    secret.write_text("secret")
    run = write_run(tmp_path / "run", [make_record()])
    (run / "report.md").symlink_to(secret)
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    assert main(["export", str(run), "--mlflow", uri]) == 0
    client = mlflow.MlflowClient(tracking_uri=uri)
    parent = next(r for r in client.search_runs([client.get_experiment_by_name("tribench").experiment_id])
                  if "mlflow.parentRunId" not in r.data.tags)
    assert "report.md" not in [a.path for a in client.list_artifacts(parent.info.run_id)]


def silent_server():
    """A TCP service that accepts connections and never answers: not a Ray cluster."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    held = []  # the accepted connections stay open, unanswered, while the caller holds this list

    def accept():
        with contextlib.suppress(OSError):  # the test closed the server first
            held.append(server.accept())

    threading.Thread(target=accept, daemon=True).start()
    return server, held


def test_a_ray_address_that_is_no_ray_cluster_is_refused_within_seconds():
    from harness.ray_executor import _probe

    server, _held = silent_server()
    started = time.monotonic()
    with pytest.raises(ConnectionError, match="did not answer as a Ray cluster"):
        _probe(f"127.0.0.1:{server.getsockname()[1]}", timeout_s=1.0)
    assert time.monotonic() - started < 10
    server.close()


def test_sigterm_ends_the_ray_address_probe():
    server, _held = silent_server()
    code = (f"from harness.ray_executor import _probe; print('probing', flush=True); "
            f"_probe('127.0.0.1:{server.getsockname()[1]}', timeout_s=120)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert proc.stdout.readline().strip() == "probing"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == -signal.SIGTERM
    server.close()
