"""What a record says about where it ran: version, git state (its own output excluded), CPU and memory."""

from __future__ import annotations

import subprocess
import sys

import pytest

from harness import __version__, results


def _git(repo, *args):
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)


def test_a_runs_own_output_in_a_tracked_folder_does_not_make_the_tree_dirty(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    (repo / "results" / "reference").mkdir(parents=True)
    (repo / "code.py").write_text("x = 1\n")
    (repo / "results" / "reference" / "records.jsonl").write_text("{}\n")
    _git(repo, "init", "-q")
    _git(repo, "add", ".")
    _git(repo, "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "init")
    monkeypatch.setattr(results, "REPO_ROOT", repo)
    (repo / "results" / "reference" / "records.jsonl").write_text("{}\n{}\n")  # the run rewrites its records
    assert results.git_state()["git_dirty"] is True
    assert results.git_state(repo / "results" / "reference")["git_dirty"] is False
    (repo / "code.py").write_text("x = 2\n")  # a change to the code still counts
    assert results.git_state(repo / "results" / "reference")["git_dirty"] is True
    assert results.git_state(tmp_path / "elsewhere")["git_dirty"] is True


def test_cpu_and_memory_come_from_the_libraries_with_a_fallback(monkeypatch, tmp_path):
    env = results.host_environment()
    assert env["cpu"] and env["memory_total_mb"] > 0 and env["cpu_physical_cores"] >= 1
    cpuinfo = pytest.importorskip("cpuinfo")
    if results.PROC_CPUINFO.exists():  # Linux's own name is py-cpuinfo's, without its process
        assert results.cpu_name() == cpuinfo.get_cpu_info()["brand_raw"]

    def broken():
        raise RuntimeError("cannot read this CPU")

    monkeypatch.setattr(cpuinfo, "get_cpu_info", broken)
    monkeypatch.setattr(results, "PROC_CPUINFO", tmp_path / "absent")
    results.cpu_name.cache_clear()
    try:
        assert results.cpu_name()  # the platform module's name instead, never an exception
    finally:
        results.cpu_name.cache_clear()
    with_psutil = results.memory_facts()["memory_total_mb"]
    monkeypatch.setitem(sys.modules, "psutil", None)  # as if psutil were not installed
    # No physical core count without psutil; the memory from sysconf, the same figure.
    assert results.memory_facts() == {"cpu_physical_cores": None, "memory_total_mb": with_psutil}


def test_every_record_says_which_tribench_made_it():
    assert results.empty_record(task="t", backend="b", repeat=0, seed=0)["tribench_version"] == __version__


def test_version_flag_prints_the_version():
    out = subprocess.run([sys.executable, "-m", "harness", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == f"tribench {__version__}"


@pytest.mark.parametrize("argv", [["bogus"], ["run", "--nope"], ["compare", "a"]])
def test_errors_carry_the_prefix_once(argv, capsys):
    from harness.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("tribench: error: ") and err.count("tribench") == 1
