"""Export a run to an MLflow tracking store: a parent run with the report and plots, one child run per record."""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import time
from pathlib import Path

from harness import confine
from harness.confine import UntrustedInput
from harness.export_common import cell_name, epoch_series, params, scalars, tags
from harness.results import read_records
from harness.schema import load_run_file

log = logging.getLogger(__name__)

EXPERIMENT = "tribench"
ARTIFACTS = ("report.md", "report.html", "run.json", "accuracy_vs_time.png", "epoch_curves.png", "throughput.png",
             "memory.png")


def _artifact_location(uri: str) -> str | None:
    """For a new experiment in a local sqlite store, artifacts beside the database (not in the current folder)."""
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        return (db.parent / f"{db.stem}-artifacts").resolve().as_uri()
    return None


# An unreachable tracking server: MLflow's defaults (7 retries with backoff, 120 s timeouts)
# take minutes before failing; these make it a few seconds. Set only where the user has not.
HTTP_BOUNDS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
               "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


class ExportError(RuntimeError):
    """The tracking store refused or could not be reached; the message is one line."""


def export(run_dir: Path, uri: str, *, experiment: str = EXPERIMENT) -> tuple[str, list[str], int]:
    """(parent run id, child run ids one per record, how many of those this call wrote) in the store at `uri`.

    Exporting a folder again reuses its parent run and writes only the records not exported
    before (a resumed run's new cells), so the store never holds a run twice. Any failure of
    the store is an ExportError with one line.
    """
    if uri.startswith("sqlite:///"):
        _check_sqlite(uri)
    for name, value in HTTP_BOUNDS.items():
        os.environ.setdefault(name, value)
    # urllib3 logs each retry as a warning of its own: the one line below says it all.
    logging.getLogger("urllib3").setLevel(logging.ERROR)
    from mlflow.exceptions import MlflowException

    failures: tuple = (MlflowException, OSError)
    try:
        from sqlalchemy.exc import SQLAlchemyError

        failures += (SQLAlchemyError,)
    except ImportError:  # an http store needs no sqlalchemy
        pass
    try:
        return _export(Path(run_dir), uri, experiment)
    except failures as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        raise ExportError(f"{uri}: {type(exc).__name__}: {lines[0] if lines else 'failed'}") from None


def _check_sqlite(uri: str) -> None:
    """A local store must be a writable sqlite database in an existing folder: checked here, at once,
    because MLflow retries opening one for about 100 s and creates missing folders."""
    path = Path(uri[len("sqlite:///"):])
    if not path.parent.is_dir():
        raise ExportError(f"{uri}: the folder {path.parent} does not exist; tribench creates no folder for a "
                          "tracking store")
    try:
        with contextlib.closing(sqlite3.connect(path, timeout=5)) as db:
            db.execute("BEGIN IMMEDIATE")  # takes the write lock: fails on a read-only file or folder
            db.rollback()
    except sqlite3.Error as exc:
        raise ExportError(f"{uri}: cannot write that sqlite store ({exc})") from None


def _export(run_dir: Path, uri: str, experiment: str) -> tuple[str, list[str], int]:
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    records = read_records(run_dir)
    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(
        experiment, artifact_location=_artifact_location(uri))
    parent, exported = _earlier_export(client, experiment_id, run_dir)
    if parent is None:
        run_info = _run_json(run_dir)
        parent = client.create_run(experiment_id, run_name=run_dir.name, tags={
            "tribench.run_dir": str(run_dir.resolve()), "tribench.created_at": str(run_info.get("created_at")),
            "tribench.commit": str(run_info.get("tribench_commit")),
        }).info.run_id
        config = run_info.get("config") or {}
        client.log_batch(parent, params=[Param(k, str(config[k])) for k in sorted(config) if config[k] is not None])
    client.set_tag(parent, "tribench.records", str(len(records)))
    for name in ARTIFACTS:  # the report as it is now (a re-export overwrites the files)
        if confine.is_regular(run_dir / name):  # never a symlink: it could upload any readable file
            client.log_artifact(parent, str(run_dir / name))
    children, written = [], 0
    now = int(time.time() * 1000)
    for record in records:
        key = _record_key(cell_name(record), tags(record))
        if key in exported:
            children.append(exported[key])
            continue
        child = client.create_run(experiment_id, run_name=cell_name(record),
                                  tags={"mlflow.parentRunId": parent, **tags(record)}).info.run_id
        metrics = [Metric(k, v, now, 0) for k, v in scalars(record).items()]
        metrics += [Metric(f"epoch/{name}", v, now, step) for name, points in epoch_series(record).items()
                    for step, v in points]
        # log_batch takes at most 1000 metrics and 100 params per call.
        for i in range(0, max(len(metrics), 1), 1000):
            client.log_batch(child, metrics=metrics[i:i + 1000],
                             params=[Param(k, v) for k, v in params(record).items()] if i == 0 else [])
        client.set_terminated(child, status="FINISHED" if record.get("status") == "ok" else "FAILED")
        children.append(child)
        written += 1
    client.set_terminated(parent, status="FINISHED")
    return parent, children, written


def _record_key(name: str, record_tags: dict) -> tuple:
    """What tells one record's child run from another's: its cell and when it started."""
    return name, record_tags.get("tribench.started_at")


def _earlier_export(client, experiment_id: str, run_dir: Path) -> tuple[str | None, dict]:
    """The parent run an earlier export of this folder made (or None), and its children by record key."""
    where = str(run_dir.resolve())
    # Compared here, not in the filter: a path may hold quotes the filter syntax cannot.
    runs = [r for r in _search(client, experiment_id, "tags.`tribench.run_dir` LIKE '%'")
            if r.data.tags.get("tribench.run_dir") == where]
    if not runs:
        return None, {}
    parent = min(runs, key=lambda r: r.info.start_time).info.run_id
    return parent, {_record_key(c.info.run_name, c.data.tags): c.info.run_id
                    for c in _search(client, experiment_id, f"tags.mlflow.parentRunId = '{parent}'")}


def _search(client, experiment_id: str, filter_string: str):
    """Every run the filter matches, page after page."""
    token = None
    while True:
        page = client.search_runs([experiment_id], filter_string=filter_string, max_results=1000, page_token=token)
        yield from page
        token = page.token
        if not token:
            return


def _run_json(run_dir: Path) -> dict:
    try:
        return load_run_file(run_dir / "run.json", str(run_dir))
    except UntrustedInput as exc:
        log.warning("%s; the parent run gets no config", exc)
        return {}
