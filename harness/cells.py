"""The cells of a run (task x backend x repeat), the data each task gets, and the config each worker gets."""

from __future__ import annotations

import json
from dataclasses import dataclass

from backends.base import BEST
from harness import confine
from harness import data as data_mod
from harness.cell_config import CellConfig
from harness.run_config import RunConfig
from tasks import get_task
from tasks.datasets import DATASETS

FINISHED = ("ok", "diverged")  # cells --resume does not run again; failed and skipped cells are retried


@dataclass
class Cell:
    task: str
    backend: str
    repeat: int
    pinned_mode: str | None = None  # --mode best: the mode the cell's first repeat chose, when it has run

    @property
    def key(self) -> tuple[str, str, int]:
        return self.task, self.backend, self.repeat

    @property
    def label(self) -> str:
        return f"{self.task} / {self.backend} / repeat {self.repeat}"


def plan(cfg: RunConfig) -> list[Cell]:
    """Cells task by task, and within a task every backend once per repeat (A B C A B C):
    a machine that slows down mid-run then slows every backend alike."""
    return [Cell(t, b, r) for t in cfg.tasks for r in range(cfg.repeats) for b in cfg.backends]


def resolve_data(cfg: RunConfig) -> dict[str, tuple[str, str, str]]:
    """(source name, folder, why) per task, resolved once so every cell sees the same data."""
    resolved = {}
    for task in cfg.tasks:
        real = data_mod.accepted_for(get_task(task))
        choice = data_mod.choice_for(real, cfg.data)
        resolved[task] = data_mod.resolve(real, choice, data_dir=cfg.data_dir, allow_download=cfg.allow_download)
        name, where, _ = resolved[task]
        data_mod.check_loadable(get_task(task), name, where)
    return resolved


def pinned_modes(records: list[dict]) -> dict[tuple[str, str], str]:
    """(task, backend) -> the mode --mode best chose in that cell's first finished repeat: later repeats train in it."""
    pins: dict[tuple[str, str], tuple[int, str]] = {}
    for r in records:
        env = r.get("env") or {}
        if r.get("status") in FINISHED and env.get("mode_requested") == BEST and env.get("mode"):
            key = (r.get("task"), r.get("backend"))
            if key not in pins or r.get("repeat", 0) < pins[key][0]:
                pins[key] = (r.get("repeat", 0), env["mode"])
    return {key: mode for key, (_, mode) in pins.items()}


def deciding_first(cells: list[Cell], pins: dict) -> tuple[list[Cell], list[Cell]]:
    """(cells that decide a mode: each unpinned (task, backend)'s lowest repeat, the rest), both in plan order."""
    first: dict[tuple[str, str], Cell] = {}
    for cell in cells:
        key = (cell.task, cell.backend)
        if key not in pins and (key not in first or cell.repeat < first[key].repeat):
            first[key] = cell
    keys = {c.key for c in first.values()}
    return [c for c in cells if c.key in keys], [c for c in cells if c.key not in keys]


def cell_config(cfg: RunConfig, cell: Cell, source: tuple[str, str]) -> CellConfig:
    spec = get_task(cell.task)
    return CellConfig(
        task=cell.task, task_spec=json.loads(json.dumps(spec.to_dict())), backend=cell.backend, repeat=cell.repeat,
        # Repeat r of every backend uses seed + r: identical weights and batch order across
        # backends within a repeat, a fresh draw between repeats (so the spread is real).
        seed=cfg.seed + cell.repeat, data_seed=cfg.seed,
        data=source[0], data_folder=None if source[0] == "synthetic" else source[1],
        subset=DATASETS[spec.dataset].quick if cfg.quick else None, quick=cfg.quick,
        overrides=cfg.overrides(), device=cfg.device, threads=cfg.threads,
        precision=cfg.precision, mode=cfg.mode, pinned_mode=cell.pinned_mode, init_from=cfg.init_from,
        data_parallel=cfg.data_parallel, export=tuple(cfg.export),
        checkpoint_prefix=str(confine.inside(cfg.out, "checkpoints", f"{cell.task}-{cell.backend}-r{cell.repeat}")),
        out=str(cfg.out),
    )
