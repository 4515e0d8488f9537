"""Export a run to an MLflow tracking store: a parent run with the report and plots, one child run per record."""

from __future__ import annotations

import json
import time
from pathlib import Path

from harness.export_common import cell_name, epoch_series, params, scalars, tags
from harness.results import read_records

EXPERIMENT = "tribench"
ARTIFACTS = ("report.md", "report.html", "run.json", "accuracy_vs_time.png", "epoch_curves.png", "throughput.png",
             "memory.png")


def _artifact_location(uri: str) -> str | None:
    """For a new experiment in a local sqlite store, artifacts beside the database (not in the current folder)."""
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        return (db.parent / f"{db.stem}-artifacts").resolve().as_uri()
    return None


def export(run_dir: Path, uri: str, *, experiment: str = EXPERIMENT) -> tuple[str, list[str]]:
    """(parent run id, child run ids, one per record) written into the tracking store at `uri`."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    run_dir = Path(run_dir)
    records = read_records(run_dir)
    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(
        experiment, artifact_location=_artifact_location(uri))
    run_info = _run_json(run_dir)
    parent = client.create_run(experiment_id, run_name=run_dir.name, tags={
        "tribench.run_dir": str(run_dir.resolve()), "tribench.records": str(len(records)),
        "tribench.created_at": str(run_info.get("created_at")), "tribench.commit": str(run_info.get("tribench_commit")),
    }).info.run_id
    config = run_info.get("config") or {}
    client.log_batch(parent, params=[Param(k, str(config[k])) for k in sorted(config) if config[k] is not None])
    for name in ARTIFACTS:
        if (run_dir / name).is_file():
            client.log_artifact(parent, str(run_dir / name))
    children = []
    now = int(time.time() * 1000)
    for record in records:
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
    client.set_terminated(parent, status="FINISHED")
    return parent, children


def _run_json(run_dir: Path) -> dict:
    try:
        value = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}
