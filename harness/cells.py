"""The cells of a run (task x backend x repeat), the data each task gets, and what a worker is told to run."""

from __future__ import annotations

from dataclasses import dataclass

from harness import confine
from harness import data as data_mod
from harness.run_config import RunConfig
from tasks import get_task

# --quick: one epoch on the first samples of each split (enough to see every backend
# learn, small enough for a 2-core laptop to finish all tasks in about two minutes).
QUICK_SUBSETS = {"mnist": (12000, 2000), "cifar10": (4000, 1000), "text": (256, 64)}  # text: windows


@dataclass
class Cell:
    task: str
    backend: str
    repeat: int

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
    return resolved


def cell_config(cfg: RunConfig, cell: Cell, source: tuple[str, str]) -> dict:
    kind = get_task(cell.task).dataset
    return {
        "task": cell.task, "task_spec": get_task(cell.task).to_dict(), "backend": cell.backend, "repeat": cell.repeat,
        # Repeat r of every backend uses seed + r: identical weights and batch order across
        # backends within a repeat, a fresh draw between repeats (so the spread is real).
        "seed": cfg.seed + cell.repeat, "data_seed": cfg.seed,
        "data": source[0], "data_folder": None if source[0] == "synthetic" else source[1],
        "subset": QUICK_SUBSETS[kind] if cfg.quick else None,
        "overrides": cfg.overrides(), "device": cfg.device, "threads": cfg.threads,
        "precision": cfg.precision, "mode": cfg.mode, "init_from": cfg.init_from,
        "data_parallel": cfg.data_parallel,
        "checkpoint_prefix": str(confine.inside(cfg.out, "checkpoints",
                                                f"{cell.task}-{cell.backend}-r{cell.repeat}")),
        "out": str(cfg.out),  # git_dirty leaves the run's own output out
    }
