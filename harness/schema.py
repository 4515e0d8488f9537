"""The schemas of records and run.json (pydantic), checked on every read: types and ranges of what tribench uses."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator

from harness.confine import SAFE_NAME, UntrustedInput, read_bytes
from tasks.spec import MAX_SEED

STATUSES = ("ok", "failed", "skipped", "diverged")
# Bounds before any work: a plan, a thread pool or a shard count this large is a typo or an attack.
MAX_REPEATS = 1000
MAX_THREADS = 4096
MAX_DATA_PARALLEL = 1024
MAX_SHARDS = 10_000
MAX_RUN_FILE_BYTES = 64 << 20

SafeName = Annotated[str, StringConstraints(pattern=f"^{SAFE_NAME.pattern}$")]
Finite = Annotated[float, Field(allow_inf_nan=False)]
NonNegative = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Fraction = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]
Count = Annotated[int, Field(ge=0)]


class _Model(BaseModel):
    # strict: a string is no number, a number no bool; fields tribench does not use pass unchecked.
    model_config = ConfigDict(strict=True, extra="allow")


class Metrics(_Model):
    test_accuracy: Fraction | None = None
    initial_test_accuracy: Fraction | None = None
    finetuned_accuracy: Fraction | None = None
    scratch_accuracy: Fraction | None = None
    roofline_fraction: NonNegative | None = None
    test_loss: Finite | None = None
    initial_test_loss: Finite | None = None
    scratch_loss: Finite | None = None
    target_loss: Finite | None = None
    bits_per_byte: Finite | None = None
    time_to_target_s: NonNegative | None = None
    train_samples_per_s: NonNegative | None = None
    eval_samples_per_s: NonNegative | None = None
    train_tokens_per_s: NonNegative | None = None
    eval_tokens_per_s: NonNegative | None = None
    frozen_train_samples_per_s: NonNegative | None = None
    full_train_samples_per_s: NonNegative | None = None
    warmup_s: NonNegative | None = None
    wall_s: NonNegative | None = None
    epoch_test_accuracy: list[Finite | None] | None = None
    epoch_train_loss: list[Finite | None] | None = None
    epoch_s: list[Finite | None] | None = None
    epoch_train_time_s: list[Finite | None] | None = None
    stages: dict[str, dict] | None = None
    mode_probe: dict | None = None


class Memory(_Model):
    peak_rss_mb: NonNegative | None = None
    rss_after_import_mb: NonNegative | None = None
    device_peak_mb: NonNegative | None = None


class Data(_Model):
    name: str | None = None
    source: str | None = None
    synthetic: bool | None = None
    n_train: Count | None = None
    n_test: Count | None = None


class Env(_Model):
    device: str | None = None
    device_name: str | None = None
    framework: str | None = None
    framework_version: str | None = None
    precision: str | None = None
    mode: str | None = None
    threads: Count | None = None
    git_commit: str | None = None
    git_dirty: bool | None = None
    hostname: str | None = None
    cpu: str | None = None
    python: str | None = None
    numpy_version: str | None = None


class Spec(_Model):
    name: str | None = None
    epochs: Annotated[int, Field(ge=1)] | None = None
    batch_size: Annotated[int, Field(ge=1)] | None = None
    seed: Count | None = None
    target_accuracy: Finite | None = None
    target_loss: Finite | None = None


class Record(_Model):
    schema_version: int | None = None
    tribench_version: str | None = None
    task: SafeName
    objective: Literal["accuracy", "loss"] | None = None
    backend: SafeName
    repeat: Annotated[int, Field(ge=0, lt=MAX_REPEATS)]
    seed: Count | None = None
    status: Literal[STATUSES]
    error: str | None = None
    failure: dict | None = None
    data: Data | None = None
    metrics: Metrics | None = None
    memory: Memory | None = None
    env: Env | None = None
    spec: Spec | None = None
    node: dict | None = None
    started_at: str | None = None
    finished_at: str | None = None


class Config(_Model):
    """run.json's config: every RunConfig field typed and bounded; an unknown field is refused."""

    tasks: Annotated[list[SafeName], Field(min_length=1, max_length=1000)]
    backends: Annotated[list[SafeName], Field(min_length=1, max_length=100)]
    out: str | None = None
    repeats: Annotated[int, Field(ge=1, le=MAX_REPEATS)] = 1
    seed: Annotated[int, Field(ge=0, le=MAX_SEED)] = 0
    data: str = "auto"
    data_dir: str | None = None
    epochs: Annotated[int, Field(ge=1)] | None = None
    batch_size: Annotated[int, Field(ge=1)] | None = None
    device: str = "auto"
    threads: Annotated[int, Field(ge=1, le=MAX_THREADS)] = 1
    precision: str = "fp32"
    mode: str = "best"
    timeout: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None
    quick: bool = False
    init_from: str | None = None
    allow_download: bool = True
    shard: Annotated[list[int], Field(min_length=2, max_length=2)] | None = None
    override: str | None = None
    data_parallel: Annotated[int, Field(ge=1, le=MAX_DATA_PARALLEL)] = 1
    export: Annotated[list[SafeName], Field(max_length=8)] = []

    @model_validator(mode="after")
    def _known_and_shard(self):
        from harness.run_config import RunConfig

        unknown = sorted(set(self.model_extra or {}) - {f.name for f in dataclasses.fields(RunConfig)})
        if unknown:
            raise ValueError(f"unknown config field {unknown[0]!r}")
        if self.shard is not None:
            index, count = self.shard
            if not (1 <= count <= MAX_SHARDS and 0 <= index < count):
                raise ValueError(f"shard {self.shard}: need [I, N] with 0 <= I < N <= {MAX_SHARDS}")
        return self


class RunFile(_Model):
    schema_version: int | None = None
    config: Config
    specs: dict[SafeName, dict]
    versions: dict[str, str | None]
    data: dict[SafeName, str] = {}
    task_files: dict[SafeName, dict] = {}
    created_at: str | None = None
    tribench_commit: str | None = None
    tribench_version: str | None = None
    git_dirty: bool | None = None
    merged_from: list[str] | None = None


# pydantic's bound errors, said the way tribench says them: "repeats 0 is below 1".
BOUND_WORDS = {"greater_than_equal": ("ge", "is below"), "less_than_equal": ("le", "is above"),
               "greater_than": ("gt", "is not above"), "less_than": ("lt", "is not below")}


def first_error(exc: ValidationError) -> str:
    """A pydantic error as one line: where, the value (cut short) and what is wrong with it."""
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "the top level"
    value = json.dumps(err.get("input"), default=str)
    value = value if len(value) <= 60 else value[:57] + "..."
    if err["type"] == "missing":
        return f"{where} is missing"
    if err["type"] in ("extra_forbidden", "unexpected_keyword_argument"):  # a model's, a dataclass's
        return f"unknown field {where!r}"
    if err["type"] in BOUND_WORDS:
        key, words = BOUND_WORDS[err["type"]]
        return f"{where} {value} {words} {err['ctx'][key]}"
    return f"{where} is {value}, not a valid value ({err['msg'].removeprefix('Value error, ')})"


def record_problem(obj: Any) -> str | None:
    """None for a valid record, else what it is in a few words ("a record without status")."""
    if not isinstance(obj, dict):
        return f"a line that is not a record (a JSON {type(obj).__name__})"
    try:
        Record.model_validate(obj)
    except ValidationError as exc:
        missing = [".".join(map(str, e["loc"])) for e in exc.errors() if e["type"] == "missing"]
        return f"a record without {', '.join(missing)}" if missing else f"an invalid record: {first_error(exc)}"
    return None


def check_config(config: dict, where: str) -> None:
    """Raise UntrustedInput naming the first bad field of a run config (from run.json or from flags)."""
    try:
        Config.model_validate(config)
    except ValidationError as exc:
        raise UntrustedInput(f"{where}: config.{first_error(exc)}") from None


def load_run_file(path: Path, where: str) -> dict:
    """A run.json's object: a regular file inside its folder, bounded in size, valid against RunFile.

    UntrustedInput with one line ("<where>: ...") otherwise; `where` says who reads it.
    """
    path = Path(path)
    try:
        blob = read_bytes(path, limit=MAX_RUN_FILE_BYTES)
    except OSError as exc:
        raise UntrustedInput(f"{where}: no readable {path.name} there ({exc.strerror or exc})") from None
    except UntrustedInput as exc:
        raise UntrustedInput(f"{where}: {exc}") from None
    try:
        saved = json.loads(blob)
    except (ValueError, RecursionError) as exc:
        raise UntrustedInput(f"{where}: no readable {path.name} there ({type(exc).__name__})") from None
    if not isinstance(saved, dict):
        raise UntrustedInput(f"{where}: {path.name} is not a tribench run file (a JSON {type(saved).__name__}, "
                             "not an object)")
    try:
        RunFile.model_validate(saved)
    except ValidationError as exc:
        raise UntrustedInput(f"{where}: {path.name} is not a tribench run file: {first_error(exc)}") from None
    return saved
