"""Records survive a full disk, a torn line, a second run and a killed driver."""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness import folderlock, storage
from harness.cli import main
from harness.results import RECORDS_FILE, append_record

ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def full_disk(monkeypatch, *, when):
    """From the first write `when(data)` picks on, half of it lands and then the disk is full."""
    real = storage.write_all
    state = {"full": False}

    def write_all(fd, data):
        if state["full"] or when(bytes(data)):
            state["full"] = True
            os.write(fd, bytes(data[: len(data) // 2]))  # a short write first, as a filling disk gives
            raise ENOSPC
        real(fd, data)

    monkeypatch.setattr(storage, "write_all", write_all)
    return state


def leftovers(folder: Path) -> list[str]:
    """Temporary files and empty PNGs: what a full disk must not leave behind."""
    return sorted(str(p) for p in folder.rglob("*") if p.is_file() and (
        p.name.endswith(".tmp") or (p.suffix == ".png" and p.stat().st_size == 0)))


def whole_lines(path: Path) -> list[dict]:
    text = path.read_text()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def quick_args(backend, out, *, repeats=1):
    return ["run", "--task", "mnist-mlp", "--backend", backend, "--data", "synthetic", "--quick",
            "--repeats", str(repeats), "--out", str(out)]


# -- the write layer -------------------------------------------------------------------------------

def test_short_writes_are_continued_not_ignored(tmp_path, monkeypatch):
    real = os.write
    monkeypatch.setattr(storage.os, "write", lambda fd, data: real(fd, bytes(data[:7])))
    append_record(tmp_path / "r.jsonl", {"task": "t", "status": "ok", "pad": "x" * 100})
    monkeypatch.undo()
    assert whole_lines(tmp_path / "r.jsonl") == [{"task": "t", "status": "ok", "pad": "x" * 100}]


def test_a_failed_append_takes_back_its_partial_line(tmp_path, monkeypatch):
    path = tmp_path / "r.jsonl"
    append_record(path, {"task": "a"})
    full_disk(monkeypatch, when=lambda data: True)
    with pytest.raises(OSError, match="No space left") as info:
        append_record(path, {"task": "b"})
    assert info.value.filename == str(path)
    assert whole_lines(path) == [{"task": "a"}]


def test_a_record_always_starts_on_a_new_line(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"task": "a"}')  # no newline at the end
    append_record(path, {"task": "b"})
    assert [r["task"] for r in whole_lines(path)] == ["a", "b"]


def test_a_torn_tail_is_set_aside_in_a_side_file(tmp_path):
    path = tmp_path / RECORDS_FILE
    path.write_text('{"task": "a"}\n{"task": "b", "sta')
    side = storage.set_aside_torn_tail(path)
    assert side.read_text() == '{"task": "b", "sta' and side.parent == tmp_path
    assert path.read_text() == '{"task": "a"}\n'
    assert storage.set_aside_torn_tail(path) is None


def test_an_atomic_write_that_fails_leaves_no_temporary_file(tmp_path, monkeypatch):
    from harness.checkpoint import save_checkpoint
    from harness.weights import initial_weights
    from tasks import get_task

    full_disk(monkeypatch, when=lambda data: True)
    spec = get_task("mnist-mlp")
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(tmp_path / "c.npz", spec, initial_weights(spec, 0))
    assert list(tmp_path.iterdir()) == []


# -- a full disk during a run ------------------------------------------------------------------------

@pytest.mark.slow
def test_a_full_disk_stops_the_run_with_one_line_and_resume_completes_it(tmp_path, monkeypatch, capsys,
                                                                         fast_backend):
    out = tmp_path / "run"
    appends = {"n": 0}

    def second_record(data):
        appends["n"] += data.startswith(b'{"backend"')
        return appends["n"] == 2

    full_disk(monkeypatch, when=second_record)
    assert main(quick_args(fast_backend, out, repeats=3)) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("tribench: error:")]
    assert len(errors) == 1 and "Traceback" not in err
    assert f"{out / RECORDS_FILE}: No space left on device" in errors[0] and "--resume" in errors[0]
    assert [r["repeat"] for r in whole_lines(out / RECORDS_FILE)] == [0]
    assert leftovers(out) == []

    monkeypatch.undo()  # space freed
    assert main(["run", "--resume", str(out)]) == 0
    records = whole_lines(out / RECORDS_FILE)
    assert sorted(r["repeat"] for r in records) == [0, 1, 2] and all(r["status"] == "ok" for r in records)
    assert leftovers(out) == []


@pytest.mark.slow
def test_a_full_disk_while_writing_the_report_leaves_no_empty_png(tmp_path, monkeypatch, capsys, fast_backend):
    out = tmp_path / "run"
    full_disk(monkeypatch, when=lambda data: data.startswith(b"\x89PNG"))
    assert main(quick_args(fast_backend, out)) == 1
    err = capsys.readouterr().err
    assert "tribench: error: report not written" in err and "No space left on device" in err
    assert "Traceback" not in err
    assert [r["status"] for r in whole_lines(out / RECORDS_FILE)] == ["ok"]
    assert leftovers(out) == [] and not list(out.glob("*.png"))


def test_nothing_writable_exits_2(tmp_path, monkeypatch, capsys):
    full_disk(monkeypatch, when=lambda data: True)
    assert main(quick_args("torch", tmp_path / "run")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot write results" in err and "No space left" in err
    assert leftovers(tmp_path) == [] and not (tmp_path / "run" / "run.json").exists()


@pytest.mark.slow
def test_resume_sets_a_torn_tail_aside_and_appends_whole_records(tmp_path, capsys, fast_backend):
    out = tmp_path / "run"
    assert main(quick_args(fast_backend, out, repeats=2)) == 0
    lines = (out / RECORDS_FILE).read_text().splitlines()
    torn = lines[1][:40]
    (out / RECORDS_FILE).write_text(lines[0] + "\n" + torn)  # repeat 1 lost half its line
    capsys.readouterr()
    assert main(["run", "--resume", str(out)]) == 0
    err = capsys.readouterr().err
    sides = list(out.glob(f"{RECORDS_FILE}.torn-*"))
    assert len(sides) == 1 and sides[0].read_text() == torn and str(sides[0]) in err
    records = whole_lines(out / RECORDS_FILE)
    assert [r["repeat"] for r in records] == [0, 1] and all(r["status"] == "ok" for r in records)


# -- one run per folder ------------------------------------------------------------------------------

def test_a_second_run_or_resume_into_a_live_folder_exits_2_with_the_pid(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    with folderlock.hold(out):
        for args in (quick_args("torch", out), ["run", "--resume", str(out)]):
            (out / "run.json").write_text(json.dumps({"config": "left alone"}))
            assert main(args) == 2
            err = capsys.readouterr().err.strip()
            assert len(err.splitlines()) == 1 and f"PID {os.getpid()}" in err and "in use" in err, err
            assert json.loads((out / "run.json").read_text()) == {"config": "left alone"}
    with folderlock.hold(out):  # released with the block
        pass


def test_the_lock_dies_with_its_holder(tmp_path):
    code = ("import sys, time; from pathlib import Path; from harness import folderlock\n"
            "with folderlock.hold(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(folderlock.FolderBusy, match=f"PID {holder.pid}"), folderlock.hold(tmp_path):
            pass
    finally:
        holder.kill()
        holder.wait()
    with folderlock.hold(tmp_path):  # SIGKILL released it: no stale lock
        pass


# -- workers die with their driver -------------------------------------------------------------------

def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")  # a zombie has exited; only its reaper is missing


def cmdline(pid: int | str) -> list[bytes]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return []


def parent(pid: int | str) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def worker_of(cell_dir: Path, driver: int) -> int | None:
    """The cell's worker: a fresh interpreter names its cell.json; a forked one is a zygote's child."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        if str(cell_dir / "cell.json").encode() in cmdline(proc.name):
            return int(proc.name)
        zygote = parent(proc.name)
        if b"harness.forkserver" in cmdline(proc.name) and parent(zygote) == driver:
            forked = [p for p in Path("/proc").iterdir() if p.name.isdigit() and parent(p.name) == zygote]
            if forked:
                return int(forked[0].name)
    return None


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc to find the worker")
@pytest.mark.parametrize("start", ["fork", "spawn"])
def test_a_worker_dies_and_cleans_up_when_its_driver_is_killed(tmp_path, fast_backend, start):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp), "TRIBENCH_FAULT": f"hang@mnist-mlp/{fast_backend}"}
    args = quick_args(fast_backend, tmp_path / "run")
    if start == "spawn":  # without --quick every cell is a fresh interpreter (the hang comes before training)
        args[args.index("--quick")] = "--epochs=1"
    driver = subprocess.Popen([sys.executable, "-m", "harness", *args],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline, worker, cells = time.monotonic() + 120, None, []
        while time.monotonic() < deadline and worker is None:
            time.sleep(0.5)
            cells = list(tmp.glob("tribench-cell-*"))
            worker = worker_of(cells[0], driver.pid) if cells else None
        assert worker is not None, "the worker never started"
        zygote = parent(worker)
        time.sleep(3)  # let it reach the hang, deep inside the cell
        driver.kill()
        driver.wait()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (alive(worker) or alive(zygote) or cells[0].exists()):
            time.sleep(0.2)
        assert not alive(worker), "the orphaned worker is still running"
        assert not cells[0].exists(), "the orphaned worker left its cell folder"
        assert zygote == driver.pid or not alive(zygote), "the zygote outlived its driver"
    finally:
        driver.kill()
        if worker is not None and alive(worker):
            os.kill(worker, signal.SIGKILL)


def test_the_fault_hook_is_dead_outside_the_test_suite(monkeypatch):
    from harness.worker import injected_fault

    monkeypatch.setenv("TRIBENCH_FAULT", "raise")
    assert injected_fault("mnist-mlp", "torch", 0) == "raise"
    monkeypatch.delenv("TRIBENCH_TESTING")
    assert injected_fault("mnist-mlp", "torch", 0) is None


def test_a_full_disk_under_tribench_report_is_one_line(tmp_path, monkeypatch, capsys):
    from record_factory import make_run, write_run

    run = write_run(tmp_path / "run", make_run())
    full_disk(monkeypatch, when=lambda data: True)
    assert main(["report", str(run)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "No space left on device" in err and "Traceback" not in err
    assert leftovers(run) == [] and not (run / "report.md").exists()


def test_atomic_files_get_the_usual_permissions_not_mkstemps_0600(tmp_path):
    umask = os.umask(0o022)
    try:
        storage.write_atomic(tmp_path / "f", b"x")
    finally:
        os.umask(umask)
    assert (tmp_path / "f").stat().st_mode & 0o777 == 0o644
