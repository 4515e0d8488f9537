"""tribench merge: the shard folders of one matrix -> one run folder that report, compare and --resume read."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from harness import confine, folderlock, schema
from harness.cells import plan
from harness.checkpoint import NPZ_SUFFIX, SUFFIX
from harness.confine import UntrustedInput
from harness.errors import UsageError
from harness.results import RECORDS_FILE, append_record, iter_records, read_records, utc_now, write_json_atomic
from harness.run_config import RUN_FILE, RunConfig
from harness.runner import prepare_out_dir
from harness.shard import in_shard
from harness.storage import write_atomic

log = logging.getLogger(__name__)

# What may differ between the shards of one matrix: where each wrote, and which shard it was.
PER_SHARD = ("out", "shard")
# The largest checkpoint copied from a shard (tiny-gpt at the sizes of GPT-2 XL is about 6 GiB).
MAX_CHECKPOINT_BYTES = 16 << 30


def load_run(folder: Path) -> dict:
    """A shard's run.json, checked against harness.schema.RunFile; UsageError with one line otherwise."""
    try:
        return schema.load_run_file(Path(folder) / RUN_FILE, str(folder))
    except UntrustedInput as exc:
        raise UsageError(f"{exc}; not a run folder to merge") from None


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


def _cell(record: dict) -> str:
    return f"{record['task']} / {record['backend']} / repeat {record['repeat']}"


def verified_records(folders: list[Path], runs: list[dict], cfg: RunConfig) -> list[dict]:
    """The latest record of each cell of each shard, each checked to belong where it is; UsageError otherwise.

    A record must be a cell of its own shard's slice of the plan (so each cell comes from
    exactly one shard), and carry that run's spec (seeded for its repeat) and dataset.
    A conflict names the record by file and line, and the other shard's record of that cell.
    """
    found: dict[tuple, str] = {}  # cell -> "file:line" of the record merged for it
    kept = []
    for folder, saved in zip(folders, runs):
        shard = saved["config"].get("shard")
        own = {cell.key for cell in in_shard(plan(cfg), shard)}
        latest = {}
        for number, record in iter_records(folder / RECORDS_FILE):
            latest[(record["task"], record["backend"], record["repeat"])] = (number, record)
        for key, (number, record) in latest.items():
            where = f"{folder / RECORDS_FILE}:{number}"
            if key not in own:
                other = f"; {found[key]} holds it" if key in found else ""
                part = f"shard {shard[0]}/{shard[1]}" if shard else "matrix"
                raise UsageError(f"{where}: {_cell(record)} is not a cell of this folder's {part} of the "
                                 f"matrix{other}")
            spec, data = saved["specs"].get(record["task"]), (saved.get("data") or {}).get(record["task"])
            seeded = record.get("spec")
            if seeded is not None and seeded.get("seed") != cfg.seed + record["repeat"]:
                raise UsageError(f"{where}: {_cell(record)} has seed {seeded.get('seed')}, but its repeat runs "
                                 f"seed {cfg.seed + record['repeat']}")
            if seeded is not None and {**seeded, "seed": None} != {**(spec or {}), "seed": None}:
                raise UsageError(f"{where}: the spec of {_cell(record)} is not the one its run.json gives")
            got = record.get("data") or {}
            # run.json names the source ("synthetic", "mnist"); a synthetic dataset calls itself synthetic-<kind>.
            same = got.get("synthetic") is True if data == "synthetic" else got.get("name") == data
            if got and data is not None and not same:
                raise UsageError(f"{where}: {_cell(record)} trained on {got.get('name')}, its run.json says {data}")
            found[key] = where
            kept.append(record)
    return kept


def refuse_nonempty(out: Path) -> None:
    """A merge writes a new run folder: refuse one that holds anything but a lock left by a refused run."""
    if os.path.lexists(out):
        if not out.is_dir() or out.is_symlink():
            raise UsageError(f"--out {out} is not a folder; merge into a new folder")
        entries = sorted(p.name for p in out.iterdir() if p.name != folderlock.LOCK_FILE)
        if entries:
            raise UsageError(f"--out {out} is not empty (it holds {entries[0]}); merge into a new folder")


def merge_runs(folders: list[Path], out: Path) -> tuple[list[dict], list[str]]:
    """Write one run folder from shard folders; returns (its records, labels of cells in no shard)."""
    folders, out = [Path(f) for f in folders], Path(out)
    runs = [load_run(f) for f in folders]
    check_same_matrix(folders, runs)
    commits = sorted({str(saved.get("tribench_commit")) for saved in runs})
    if len(commits) > 1:  # as --resume does: the specs and versions match, so warn rather than refuse
        log.warning("merging shards run at different tribench commits: %s", ", ".join(commits))
    if any(f.resolve() == out.resolve() for f in folders):
        raise UsageError(f"--out {out} is one of the folders to merge; merge into a new folder")
    refuse_nonempty(out)
    cfg = RunConfig(**dict(runs[0]["config"], out=out, shard=None))
    records = verified_records(folders, runs, cfg)
    prepare_out_dir(out)
    try:
        with folderlock.hold(out):
            refuse_nonempty(out)  # again under the lock: a run may have started there meanwhile
            _write(folders, runs, cfg, records)
    except folderlock.FolderBusy as exc:
        raise UsageError(str(exc)) from None
    present = {(r["task"], r["backend"], r["repeat"]) for r in records}
    missing = [cell.label for cell in plan(cfg) if cell.key not in present]
    return read_records(out), missing


def _write(folders: list[Path], runs: list[dict], cfg: RunConfig, records: list[dict]) -> None:
    """run.json, the records in plan order, and the shards' checkpoints (regular files only) into cfg.out."""
    out = cfg.out
    order = {cell.key: i for i, cell in enumerate(plan(cfg))}
    records = sorted(records, key=lambda r: order.get((r["task"], r["backend"], r["repeat"]), len(order)))
    write_json_atomic(out / RUN_FILE, {**runs[0], "config": cfg.to_json(), "created_at": utc_now(),
                                       "merged_from": [str(f) for f in folders]})
    for record in records:
        append_record(out / RECORDS_FILE, record)
    for folder in folders:
        source = folder / "checkpoints"
        if not source.is_dir() or source.is_symlink():
            continue
        for checkpoint in sorted(p for p in source.iterdir() if p.suffix in (SUFFIX, NPZ_SUFFIX)):
            if not (confine.is_safe_name(checkpoint.name) and confine.is_regular(checkpoint)):
                log.warning("%s: not copied (a symlink or not a regular file)", checkpoint)
                continue
            target = confine.inside(confine.make_dir(out, "checkpoints"), checkpoint.name)
            write_atomic(target, confine.read_bytes(checkpoint, limit=MAX_CHECKPOINT_BYTES))
