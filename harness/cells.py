"""The cells of a run (task x backend x repeat), the data each task gets, and what a worker is told to run."""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import ConfigDict, Field, TypeAdapter, ValidationError

from backends.base import BEST
from harness import confine
from harness import data as data_mod
from harness.confine import UntrustedInput
from harness.run_config import QUICK_SUBSETS, RunConfig
from harness.schema import MAX_DATA_PARALLEL, MAX_REPEATS, MAX_THREADS, Count, SafeName, first_error
from tasks import get_task

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


@dataclass(frozen=True)
class CellConfig:
    """What a worker is told to run: one cell, with every setting and path it needs.

    It crosses to the worker process as JSON (to_json, from_json) and to a Ray task as this
    object; the fields past `out` are the process's own, set by whoever starts it.
    """

    # The file a worker reads is checked as strictly as run.json: no unknown field, no coercion.
    __pydantic_config__ = ConfigDict(strict=True, extra="forbid")

    task: SafeName  # the task's name, for records and file names
    task_spec: dict[str, Any]  # the whole spec as JSON (TaskSpec.to_dict), so a task file need not travel
    backend: SafeName  # the adapter's name (backends.BACKENDS)
    repeat: Annotated[int, Field(ge=0, lt=MAX_REPEATS)]
    seed: Count  # weights and batch order: the run's seed + repeat
    data_seed: Count  # synthetic data and subsets: the run's seed, the same draw for every repeat
    data: str  # the resolved source ("synthetic", "mnist", a file name)
    data_folder: str | None  # where that source lies (None for synthetic data); a Ray node may use its own copy
    subset: tuple[Count, Count] | None  # (n_train, n_test) under --quick, else the whole dataset
    overrides: dict[str, int]  # spec fields the run's flags change (epochs, batch_size)
    device: str  # --device: auto, cpu or gpu
    threads: Annotated[int, Field(ge=1, le=MAX_THREADS)]  # the cell's thread budget, shared by its replicas
    precision: str  # --precision, for the adapter's configure
    mode: str  # the --mode asked for; "best" lets the probe choose
    pinned_mode: str | None  # --mode best: the mode the cell's first repeat chose, when it has run
    init_from: str | None  # a checkpoint or Hugging Face folder the first stage starts from
    data_parallel: Annotated[int, Field(ge=1, le=MAX_DATA_PARALLEL)]  # replicas of the cell
    export: tuple[SafeName, ...]  # --export formats of the trained model
    checkpoint_prefix: str | None  # where the stages' checkpoints go; None: not written (replicas past rank 0)
    out: str  # the run's results folder (git_dirty leaves it out)
    rank: Annotated[int, Field(ge=0, lt=MAX_DATA_PARALLEL)] = 0  # this process's replica; rank 0 writes the record
    address: str | None = None  # host:port of rank 0 when replicas are processes
    driver_pid: int | None = None  # the process whose death ends this one (lifeline.py)
    cell_dir: str | None = None  # the cell's scratch folder, removed if the driver dies

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes, where: str) -> CellConfig:
        """The config `text` holds; UntrustedInput naming `where` and the first bad field otherwise."""
        try:
            return _adapter().validate_json(text)
        except ValidationError as exc:
            raise UntrustedInput(f"{where}: not a cell config: {first_error(exc)}") from None


@functools.cache
def _adapter() -> TypeAdapter:
    return TypeAdapter(CellConfig)


def cell_config(cfg: RunConfig, cell: Cell, source: tuple[str, str]) -> CellConfig:
    spec = get_task(cell.task)
    return CellConfig(
        task=cell.task, task_spec=json.loads(json.dumps(spec.to_dict())), backend=cell.backend, repeat=cell.repeat,
        # Repeat r of every backend uses seed + r: identical weights and batch order across
        # backends within a repeat, a fresh draw between repeats (so the spread is real).
        seed=cfg.seed + cell.repeat, data_seed=cfg.seed,
        data=source[0], data_folder=None if source[0] == "synthetic" else source[1],
        subset=QUICK_SUBSETS[spec.dataset] if cfg.quick else None,
        overrides=cfg.overrides(), device=cfg.device, threads=cfg.threads,
        precision=cfg.precision, mode=cfg.mode, pinned_mode=cell.pinned_mode, init_from=cfg.init_from,
        data_parallel=cfg.data_parallel, export=tuple(cfg.export),
        checkpoint_prefix=str(confine.inside(cfg.out, "checkpoints", f"{cell.task}-{cell.backend}-r{cell.repeat}")),
        out=str(cfg.out),
    )
