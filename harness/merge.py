"""tribench merge: the shard folders of one matrix -> one run folder that report, compare and --resume read."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from harness.checkpoint import NPZ_SUFFIX, SUFFIX
from harness.results import RECORDS_FILE, append_record, read_records, write_json_atomic
from harness.runner import RUN_FILE, RunConfig, UsageError, plan, prepare_out_dir
from harness.worker import utc_now

log = logging.getLogger(__name__)

# What may differ between the shards of one matrix: where each wrote, and which shard it was.
PER_SHARD = ("out", "shard")


def load_run(folder: Path) -> dict:
    try:
        return json.loads((folder / RUN_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"{folder}: no readable {RUN_FILE} there ({exc.__class__.__name__}); not a run folder") \
            from None


def matrix_of(saved: dict) -> dict:
    """What makes two runs parts of the same matrix: the config minus PER_SHARD, the specs, the versions."""
    config = {f"--{k.replace('_', '-')}": v for k, v in saved["config"].items() if k not in PER_SHARD}
    specs = {f"the spec of task {t!r}": spec for t, spec in (saved.get("specs") or {}).items()}
    versions = {f"the version of {m}": v for m, v in (saved.get("versions") or {}).items()}
    return {**config, **specs, **versions}


def check_same_matrix(folders: list[Path], runs: list[dict]) -> None:
    """Refuse folders that are not distinct shards of one matrix, naming the first difference."""
    first = matrix_of(runs[0])
    for folder, saved in zip(folders[1:], runs[1:]):
        other = matrix_of(saved)
        for key in [*first, *(k for k in other if k not in first)]:
            if first.get(key) != other.get(key):
                shown = "" if key.startswith("the spec") else f" ({other.get(key)!r} vs {first.get(key)!r})"
                raise UsageError(f"{folder} is not part of the same matrix as {folders[0]}: {key} differs{shown}")
    seen: dict[tuple, Path] = {}
    for folder, saved in zip(folders, runs):
        shard = saved["config"].get("shard")
        if shard is None and len(folders) > 1:
            raise UsageError(f"{folder} holds the whole matrix (run without --shard); nothing to merge it with")
        key = tuple(shard or ())
        if key in seen:
            raise UsageError(f"{folder} and {seen[key]} are the same shard {shard[0]}/{shard[1]}")
        if seen and key[1] != next(iter(seen))[1]:
            raise UsageError(f"{folder} is shard {shard[0]}/{shard[1]}, but {folders[0]} splits the matrix in "
                             f"{next(iter(seen))[1]}")
        seen[key] = folder


def merge_runs(folders: list[Path], out: Path) -> tuple[list[dict], list[str]]:
    """Write one run folder from shard folders; returns (its records, labels of cells in no shard)."""
    folders = [Path(f) for f in folders]
    runs = [load_run(f) for f in folders]
    check_same_matrix(folders, runs)
    commits = sorted({str(saved.get("tribench_commit")) for saved in runs})
    if len(commits) > 1:  # as --resume does: the specs and versions match, so warn rather than refuse
        log.warning("merging shards run at different tribench commits: %s", ", ".join(commits))
    if any(f.resolve() == Path(out).resolve() for f in folders):
        raise UsageError(f"--out {out} is one of the folders to merge; merge into a new folder")
    prepare_out_dir(out)
    if (out / RECORDS_FILE).exists() and (out / RECORDS_FILE).stat().st_size:
        raise UsageError(f"{out} already holds records; merge into a new folder")
    cfg = RunConfig(**dict(runs[0]["config"], out=Path(out), shard=None))
    order = {cell.key: i for i, cell in enumerate(plan(cfg))}
    records = [r for f in folders for r in read_records(f)]
    records.sort(key=lambda r: order.get((r["task"], r["backend"], r["repeat"]), len(order)))
    write_json_atomic(out / RUN_FILE, {**runs[0], "config": cfg.to_json(), "created_at": utc_now(),
                                       "merged_from": [str(f) for f in folders]})
    for record in records:
        append_record(out / RECORDS_FILE, record)
    for folder in folders:
        for checkpoint in sorted(p for p in (folder / "checkpoints").glob("*") if p.suffix in (SUFFIX, NPZ_SUFFIX)):
            (out / "checkpoints").mkdir(exist_ok=True)
            shutil.copy2(checkpoint, out / "checkpoints" / checkpoint.name)
    present = {(r["task"], r["backend"], r["repeat"]) for r in records}
    missing = [cell.label for cell in plan(cfg) if cell.key not in present]
    return read_records(out), missing
