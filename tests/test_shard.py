"""--shard I/N and `tribench merge`: shards partition the matrix, and merged shards read as one run."""

import json

import pytest
from test_cli import run_cli

from harness.cells import plan
from harness.cli import main
from harness.results import read_records
from harness.run_config import RUN_FILE, RunConfig, write_run_file
from harness.shard import in_shard


def config(tmp_path, name="run", **changes) -> RunConfig:
    base = dict(tasks=["mnist-mlp", "cifar-cnn"], backends=["torch", "tensorflow", "jax"], out=tmp_path / name,
                repeats=3, quick=True, data="synthetic", threads=1)
    return RunConfig(**{**base, **changes})


@pytest.mark.parametrize("count", [1, 2, 4, 7])
def test_shards_partition_the_matrix_and_keep_each_repeat_on_one_shard(tmp_path, count):
    cells = plan(config(tmp_path))
    shards = [in_shard(cells, [i, count]) for i in range(count)]
    keys = [c.key for shard in shards for c in shard]
    assert sorted(keys) == sorted(c.key for c in cells) and len(keys) == len(set(keys))
    for shard in shards:  # every backend of a (task, repeat) lands on the same shard
        groups = {(c.task, c.repeat) for c in shard}
        assert len(shard) == 3 * len(groups)
    assert [c.key for c in in_shard(cells, [1, count % 3 + 1])] == \
           [c.key for c in in_shard(plan(config(tmp_path)), [1, count % 3 + 1])]  # deterministic
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 3  # groups are dealt round-robin, not in blocks


@pytest.mark.parametrize("text", ["2/2", "1", "-1/2", "a/b", "0/0", "1/2/3"])
def test_a_bad_shard_exits_2_with_one_line(text, capsys):
    assert main(["run", "--task", "mnist-mlp", "--shard", text]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--shard" in err and "Traceback" not in err


def shard_folder(tmp_path, name, shard, **changes) -> RunConfig:
    cfg = config(tmp_path, name, shard=shard, **changes)
    cfg.out.mkdir()
    write_run_file(cfg)
    return cfg


@pytest.mark.parametrize("other, words", [
    ({"seed": 1}, ["--seed", "1"]),
    ({"epochs": 3}, ["--epochs", "3"]),
    ({"shard": [1, 3]}, ["1/3", "2"]),
    ({"shard": [0, 2]}, ["same shard 0/2"]),
    ({"shard": None}, ["whole matrix"]),
])
def test_merge_refuses_folders_of_other_matrices(tmp_path, capsys, other, words):
    a = shard_folder(tmp_path, "a", [0, 2])
    b = shard_folder(tmp_path, "b", **{"shard": [1, 2], **other})
    assert main(["merge", str(a.out), str(b.out), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert all(w in err for w in words), err
    assert not (tmp_path / "m" / "records.jsonl").exists()


def test_merge_refuses_a_folder_that_is_not_a_run(tmp_path, capsys):
    a = shard_folder(tmp_path, "a", [0, 2])
    (tmp_path / "b").mkdir()
    assert main(["merge", str(a.out), str(tmp_path / "b"), "--out", str(tmp_path / "m")]) == 2
    assert "run.json" in capsys.readouterr().err


def view(record: dict) -> tuple:
    m = record["metrics"]
    return (record["task"], record["backend"], record["repeat"], record["seed"], record["status"],
            m.get("initial_test_loss"), record["data"]["n_train"])


@pytest.mark.slow
def test_shards_0_and_1_of_2_merged_equal_the_whole_matrix(tmp_path, fast_backend):
    # A forced mode: under best, each repeat's probe may pick either mode when they are close (CI
    # saw jax MLP repeats pick compiled and eager), and compare rightly refuses mixed modes.
    args = ("run", "--task", "mnist-mlp", "--backend", fast_backend, "--data", "synthetic", "--quick",
            "--threads", "1", "--repeats", "2", "--mode", "compiled")
    for name, extra in (("whole", ()), ("s0", ("--shard", "0/2")), ("s1", ("--shard", "1/2"))):
        out = run_cli(*args, *extra, "--out", str(tmp_path / name))
        assert out.returncode == 0, out.stderr[-3000:]
    assert [r["repeat"] for r in read_records(tmp_path / "s0")] == [0]
    assert [r["repeat"] for r in read_records(tmp_path / "s1")] == [1]

    out = run_cli("merge", str(tmp_path / "s1"), str(tmp_path / "s0"), "--out", str(tmp_path / "merged"))
    assert out.returncode == 0, out.stderr[-3000:]
    merged = read_records(tmp_path / "merged")
    assert [r["repeat"] for r in merged] == [0, 1]  # in plan order, whatever the order of the folders
    assert sorted(map(view, merged)) == sorted(map(view, read_records(tmp_path / "whole")))
    saved = json.loads((tmp_path / "merged" / RUN_FILE).read_text())
    assert saved["config"]["shard"] is None and len(saved["merged_from"]) == 2
    assert sorted(p.name for p in (tmp_path / "merged" / "checkpoints").iterdir()) == \
           sorted(p.name for p in (tmp_path / "whole" / "checkpoints").iterdir())

    assert run_cli("report", str(tmp_path / "merged")).returncode == 0
    assert "repeats per cell: 2" in (tmp_path / "merged" / "report.md").read_text()
    compared = run_cli("compare", str(tmp_path / "whole"), str(tmp_path / "merged"), "--threshold", "1000%")
    assert compared.returncode == 0, compared.stdout + compared.stderr
    resumed = run_cli("run", "--resume", str(tmp_path / "merged"))  # nothing left to run
    assert resumed.returncode == 0 and "0 to run" in resumed.stderr


@pytest.mark.slow
def test_a_missing_shard_is_named_and_resume_completes_the_merge(tmp_path, fast_backend):
    args = ("run", "--task", "mnist-mlp", "--backend", fast_backend, "--data", "synthetic", "--quick",
            "--threads", "1", "--repeats", "2")
    assert run_cli(*args, "--shard", "0/2", "--out", str(tmp_path / "s0")).returncode == 0
    out = run_cli("merge", str(tmp_path / "s0"), "--out", str(tmp_path / "merged"))
    assert out.returncode == 0 and "in none of these folders: 1 of 2 cells" in out.stderr
    assert run_cli("run", "--resume", str(tmp_path / "merged")).returncode == 0
    assert sorted(r["repeat"] for r in read_records(tmp_path / "merged")) == [0, 1]
