"""What a worker is told to run (CellConfig), in a module light enough to read before any thread starts."""

# The worker reads this before lifeline.tie_to_driver blocks SIGTERM, so nothing imported here may
# start a thread (numpy's BLAS pool would, and a SIGTERM delivered to it kills the worker uncleaned).

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import ConfigDict, Field, TypeAdapter, ValidationError

from harness.confine import UntrustedInput
from harness.schema import MAX_DATA_PARALLEL, MAX_REPEATS, MAX_THREADS, Count, SafeName, first_error


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
    quick: bool  # --quick: also the serving figures' smaller call counts and the probe's bare budget (harness.loop)
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
