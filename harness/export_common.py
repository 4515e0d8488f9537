"""What every tracker export takes from a record: its parameters, tags, final figures and per-epoch series."""

from __future__ import annotations

import hashlib
import json

from harness import figures


def spec_hash(record: dict) -> str | None:
    """12 hex digits naming the spec without its seed: equal hashes, equal task definitions."""
    spec = record.get("spec")
    if not spec:
        return None
    blob = json.dumps({k: v for k, v in spec.items() if k != "seed"}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def cell_name(record: dict) -> str:
    return f"{record.get('task')}/{record.get('backend')}/r{record.get('repeat')}"


def params(record: dict) -> dict[str, str]:
    """Hyper-parameters and provenance of one record, as strings (what trackers store)."""
    env, data, spec = record.get("env") or {}, record.get("data") or {}, record.get("spec") or {}
    values = {
        "task": record.get("task"), "backend": record.get("backend"), "repeat": record.get("repeat"),
        "seed": record.get("seed"), "device": env.get("device"), "device_name": env.get("device_name"),
        "precision": env.get("precision"), "mode": env.get("mode"), "threads": env.get("threads"),
        "spec_hash": spec_hash(record), "epochs": spec.get("epochs"), "batch_size": spec.get("batch_size"),
        "target_accuracy": spec.get("target_accuracy"), "dataset": data.get("name"),
        "synthetic": data.get("synthetic"), "n_train": data.get("n_train"), "n_test": data.get("n_test"),
        "framework": env.get("framework"), "framework_version": env.get("framework_version"),
        "python": env.get("python"), "numpy_version": env.get("numpy_version"),
        "tribench_version": record.get("tribench_version"), "git_commit": env.get("git_commit"),
    }
    return {k: str(v) for k, v in values.items() if v is not None}


def tags(record: dict) -> dict[str, str]:
    env = record.get("env") or {}
    values = {"status": record.get("status"), "error": record.get("error"), "hostname": env.get("hostname"),
              "cpu": env.get("cpu"), "git_dirty": env.get("git_dirty"), "started_at": record.get("started_at"),
              "finished_at": record.get("finished_at")}
    return {f"tribench.{k}": str(v) for k, v in values.items() if v is not None}


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if value == value and abs(value) != float("inf") else None


def scalars(record: dict) -> dict[str, float]:
    """The record's final figures the registry exports, those that are finite numbers."""
    out = {}
    for name in figures.exported_scalars():
        for section in ("metrics", "memory"):
            value = _number((record.get(section) or {}).get(name))
            if value is not None:
                out[name] = value
                break
    return out


def epoch_series(record: dict) -> dict[str, list[tuple[int, float]]]:
    """The registry's per-epoch series of the primary stage: {exported name: [(epoch, value), ...]}.

    The loop evaluates after every epoch; held-out figures also have epoch 0, the untrained model.
    """
    m = record.get("metrics") or {}
    out: dict[str, list[tuple[int, float]]] = {}
    for key, name in figures.epoch_series().items():
        initial = _number(m.get(f"initial_{name}"))  # only the held-out figures have one
        points = [(epoch, _number(v)) for epoch, v in enumerate(m.get(key) or [], start=1)]
        out[name] = ([(0, initial)] if initial is not None else []) + [(s, v) for s, v in points if v is not None]
    return out

