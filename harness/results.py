"""Result records: schema version, environment capture, atomic JSON-lines append and read."""

from __future__ import annotations

import datetime as dt
import functools
import json
import logging
import os
import platform
import subprocess
from pathlib import Path

from harness.confine import open_text
from harness.schema import STATUSES, record_problem  # noqa: F401 - STATUSES re-exported for readers
from harness.storage import append_line, write_atomic

SCHEMA_VERSION = 1
RECORDS_FILE = "records.jsonl"
REPO_ROOT = Path(__file__).resolve().parent.parent

log = logging.getLogger(__name__)


def utc_now() -> str:
    """A record's or run file's timestamp: UTC, to the second, ISO 8601."""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def git_state(exclude: Path | None = None) -> dict:
    """The commit the code ran at and whether the tree had uncommitted changes.

    `exclude` is the run's own results folder: a run writing into a tracked folder (a
    reference run) must not call its own code dirty.
    """
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    pathspec = []
    if exclude is not None:
        try:
            pathspec = ["--", ".", f":(exclude){Path(exclude).resolve().relative_to(REPO_ROOT)}"]
        except ValueError:
            pass  # outside the repository: it cannot make the tree dirty
    status = git("status", "--porcelain", "--untracked-files=no", *pathspec)
    return {"git_commit": commit, "git_dirty": None if status is None else bool(status)}


def tribench_version() -> str:
    from harness import __version__

    return __version__


PROC_CPUINFO = Path("/proc/cpuinfo")


@functools.cache
def cpu_name() -> str:
    """The CPU's brand name: Linux's /proc/cpuinfo, else py-cpuinfo's (which starts a process: 0.3 s), else the
    platform module's (often empty on Linux)."""
    try:
        for line in PROC_CPUINFO.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                return value.strip()
    except OSError:
        pass
    try:
        import cpuinfo

        name = cpuinfo.get_cpu_info().get("brand_raw")
        if name:
            return name
    except Exception:  # py-cpuinfo missing, or it cannot read this CPU: fall back, never fail a run for it
        log.debug("py-cpuinfo gave no CPU name", exc_info=True)
    return platform.processor() or platform.machine()


def total_memory_bytes() -> int | None:
    """This machine's physical memory: psutil's reading, else POSIX sysconf; None where neither answers."""
    try:
        import psutil

        return psutil.virtual_memory().total
    except ImportError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not every platform has these sysconf names
        return None


def memory_facts() -> dict:
    """Physical cores (psutil; None where it is missing) and total memory in MiB."""
    try:
        import psutil
    except ImportError:
        cores = None
    else:
        cores = psutil.cpu_count(logical=False)
    total = total_memory_bytes()
    return {"cpu_physical_cores": cores, "memory_total_mb": None if total is None else round(total / 2**20)}


def host_environment(exclude: Path | None = None) -> dict:
    """What is true of the machine, whatever the backend; `exclude`: see git_state."""
    import numpy

    return {
        "python": platform.python_version(),
        "numpy_version": numpy.__version__,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        **memory_facts(),
        "hostname": platform.node(),
        **git_state(exclude),
    }


def empty_record(*, task: str, backend: str, repeat: int, seed: int) -> dict:
    """A record with every schema field present, so readers never meet a missing key."""
    return {
        "schema_version": SCHEMA_VERSION,
        "tribench_version": tribench_version(),
        "task": task,
        "objective": None,
        "backend": backend,
        "repeat": repeat,
        "seed": seed,
        "status": "failed",
        "error": None,
        "failure": None,
        "data": None,
        "metrics": {},
        "memory": {},
        "env": {},
        "spec": None,
        "started_at": None,
        "finished_at": None,
    }


def append_record(path: Path, record: dict) -> None:
    """Append one complete line and fsync it, so a crash or a full disk never leaves half a record.

    storage.append_line checks every write and takes back a partial one; the fsync
    makes the line survive a power cut or a SIGKILL of the parent right after.
    """
    line = (json.dumps(record, sort_keys=True, allow_nan=False, default=str) + "\n").encode()
    append_line(path, line)


def iter_records(path: Path):
    """(line number, record) of every valid record of a records.jsonl, in file order.

    Every line is checked against harness.schema.Record: a torn line, or one that is not a
    valid record, is skipped with a warning naming the file and the line. The file must be
    a regular file, not a symlink (confine.open_text).
    """
    path = Path(path)
    if path.is_dir():
        path = path / RECORDS_FILE
    if not os.path.lexists(path):
        return
    with open_text(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (ValueError, RecursionError):
                log.warning("%s:%d: skipping an incomplete record", path, number)
                continue
            problem = record_problem(record)
            if problem:  # readers (report, sweep, compare, merge, export) rely on every checked field
                log.warning("%s:%d: skipping %s", path, number, problem)
                continue
            if record.get("objective") is None and isinstance(record.get("spec"), dict):
                # Records from before the objective was written down: the spec that defines it is in them.
                record["objective"] = "loss" if record["spec"].get("target_loss") is not None else "accuracy"
            yield number, record


def read_records(path: Path, *, history: bool = False) -> list[dict]:
    """The valid records of a records.jsonl (iter_records), the latest one per cell unless `history`.

    A resumed run appends a new record for a cell that failed before; readers want the latest.
    """
    records = [record for _, record in iter_records(path)]
    if history:
        return records
    latest = {(r["task"], r["backend"], r["repeat"]): r for r in records}
    return list(latest.values())


def write_json_atomic(path: Path, obj) -> None:
    """Write JSON to a temp file, fsync, then rename over `path` (storage.write_atomic)."""
    write_atomic(path, json.dumps(obj, sort_keys=True, indent=2, default=str).encode())
