"""A run's configuration: built from flags or from a results folder's run.json, checked, written, resumed."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from backends import BACKENDS, backend_info
from harness import confine, folderlock, schema
from harness import data as data_mod
from harness.confine import UntrustedInput
from harness.errors import UsageError
from harness.results import SCHEMA_VERSION, git_state, total_memory_bytes, tribench_version, utc_now
from tasks import BUILTIN_TASKS, get_task
from tasks.targets import for_dataset

log = logging.getLogger(__name__)

# --quick, the one place that says what it means: QUICK_EPOCHS epochs (unless --epochs says otherwise)
# on the first (train, test) samples of each dataset kind (windows for text), enough to see every
# backend learn; the whole matrix, probes included, is measured in docs/modes.md.
QUICK_SUBSETS = {"mnist": (12000, 2000), "cifar10": (4000, 1000), "text": (256, 64)}
QUICK_EPOCHS = 1

RUN_FILE = "run.json"


def available_cores() -> int:
    """The cores this process may run on (its affinity), which can be fewer than the machine's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass
class RunConfig:
    tasks: list[str]
    backends: list[str]
    out: Path
    repeats: int = 1
    seed: int = 0
    data: str = "auto"
    data_dir: str | None = None
    epochs: int | None = None
    batch_size: int | None = None
    device: str = "auto"
    threads: int = field(default_factory=available_cores)
    precision: str = "fp32"
    mode: str = "best"
    timeout: float | None = None
    quick: bool = False
    init_from: str | None = None
    allow_download: bool = True
    shard: list[int] | None = None  # [index, count]: run only that shard of the planned cells (harness.shard)
    override: str | None = None  # --override "d_model=768,layers=12": sizes of tasks that have them (tasks.BUILDERS)
    data_parallel: int = 1  # replicas per cell, each taking an even slice of every global batch
    export: list[str] = field(default_factory=list)  # --export onnx,native: deployment formats (harness.exporting)

    def overrides(self) -> dict:
        changes = {}
        if self.epochs is not None or self.quick:
            changes["epochs"] = self.epochs or QUICK_EPOCHS
        if self.batch_size is not None:
            changes["batch_size"] = self.batch_size
        return changes

    def spec_dict(self, task: str, data: str | None = None) -> dict:
        """The spec built for real dataset `data` (if given), as it reads back from JSON (tuples become lists)."""
        spec = for_dataset(get_task(task), data) if data else get_task(task)
        return json.loads(json.dumps(spec.with_overrides(**self.overrides(), seed=self.seed).to_dict()))

    def to_json(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(self).items()}


def framework_versions(backends: list[str]) -> dict[str, str | None]:
    """Installed versions of every backend's packages, read without importing them."""
    versions = {}
    for name in backends:
        for module in backend_info(name).requires:
            try:
                versions[module] = metadata.version(module)
            except metadata.PackageNotFoundError:
                versions[module] = None
    return versions


def check_resume(cfg: RunConfig, saved: dict) -> None:
    """Refuse to mix cells run under other specs or framework versions into one table."""
    data = saved.get("data") if isinstance(saved.get("data"), dict) else {}
    for task in cfg.tasks:
        if saved["specs"].get(task) != cfg.spec_dict(task, data.get(task)):
            raise UsageError(f"--resume {cfg.out}: the spec of task {task!r} differs from the one this run "
                             "started with (code or flags changed); start a new run")
    now = framework_versions(cfg.backends)
    for module, version in saved["versions"].items():
        if now.get(module) != version:
            raise UsageError(f"--resume {cfg.out}: {module} is {now.get(module)} now but was {version} "
                             "when this run started; start a new run")
    if saved.get("tribench_commit") != _commit():
        log.warning("resuming a run started at another commit (%s)", saved.get("tribench_commit"))


def check_resumed_data(cfg: RunConfig, sources: dict[str, tuple[str, str, str]]) -> None:
    """A resume trains each task on the dataset, and with the spec built for it, that the run started with."""
    try:  # load_resume checked the whole file; here only its data and specs are read back
        saved = json.loads(confine.read_bytes(cfg.out / RUN_FILE, limit=schema.MAX_RUN_FILE_BYTES))
    except (OSError, ValueError, RecursionError):
        saved = {}
    saved = saved if isinstance(saved, dict) else {}
    data = saved.get("data") if isinstance(saved.get("data"), dict) else {}
    specs = saved.get("specs") if isinstance(saved.get("specs"), dict) else {}
    for task, (name, _, _) in sources.items():
        if data.get(task, name) != name:
            raise UsageError(f"--resume {cfg.out}: task {task!r} started on {data[task]} but would now get {name}; "
                             "start a new run")
        # A run.json from before the data was recorded: the spec built for today's data must still match.
        if task in specs and specs[task] != cfg.spec_dict(task, name):
            raise UsageError(f"--resume {cfg.out}: task {task!r} on {name} now has another spec (input shape or "
                             "target) than the one this run started with; start a new run")


def _commit() -> str | None:
    return git_state()["git_commit"]


def config_from_saved(saved, out: Path) -> RunConfig:
    """The RunConfig a run.json describes, refused with one line when anything in it is off.

    A results folder may come from someone else: every value is checked against
    harness.schema.Config (types and bounds), names against the registries,
    and paths in it (data_dir, init_from) are taken relative to the folder, not to
    wherever the user happens to stand.
    """
    where = f"--resume {out}: {RUN_FILE}"
    config = saved.get("config") if isinstance(saved, dict) else None
    if not isinstance(config, dict) or not isinstance(saved.get("specs"), dict) \
            or not isinstance(saved.get("versions"), dict):
        raise UsageError(f"{where} is not a tribench run file (no config, specs and versions objects)")
    try:
        schema.check_config(config, where)
    except UntrustedInput as exc:
        raise UsageError(str(exc)) from None
    args = {k: v for k, v in config.items() if k != "out"}
    for name in ("data_dir", "init_from"):
        if args.get(name):
            args[name] = str((Path(out) / args[name]).resolve())
    cfg = RunConfig(**args, out=Path(out))
    try:
        apply_override(cfg)
        check_config(cfg)
    except UsageError as exc:
        raise UsageError(f"{where}: {exc}") from None
    return cfg


def apply_override(cfg: RunConfig) -> None:
    """Rebuild the run's tasks that have sizes with cfg.override (registered under their names, sent to workers).

    A Hugging Face GPT-2 folder given to --init-from sizes the gpt2 task from its config.json
    first; --override still wins (context=N trains on the first N positions).
    """
    from harness.hf_gpt2 import HF_TASKS, is_hf_folder, sizes_from_config

    hf = cfg.init_from is not None and is_hf_folder(cfg.init_from)
    if not cfg.override and not hf:
        return
    from harness.checkpoint import CheckpointError
    from tasks import BUILDERS, override_task, parse_override
    from tasks.spec import SpecError

    sized = [t for t in cfg.tasks if t in BUILDERS]
    try:
        if cfg.override and not sized:
            raise SpecError(f"--override: none of the tasks {', '.join(cfg.tasks)} has sizes; "
                            f"tasks that do: {', '.join(BUILDERS)}")
        changes = parse_override(cfg.override or "")
        from_folder = sizes_from_config(Path(cfg.init_from)) if hf else {}
        for task in sized:
            override_task(task, {**from_folder, **changes} if task in HF_TASKS else changes)
    except SpecError as exc:
        raise UsageError(str(exc)) from None
    except CheckpointError as exc:
        raise UsageError(f"--init-from: {exc}") from None


def check_config(cfg: RunConfig) -> None:
    """Names and ranges every run must satisfy, whether its config came from flags or from run.json."""
    from backends.base import DEVICES, EXPORT_FORMATS, PRECISIONS, RUN_MODES
    from tasks import TASKS

    for name, values, valid in (("task", cfg.tasks, TASKS), ("backend", cfg.backends, BACKENDS),
                                ("device", [cfg.device], DEVICES), ("precision", [cfg.precision], PRECISIONS),
                                ("mode", [cfg.mode], RUN_MODES)):
        if not values or not all(isinstance(v, str) and v in valid for v in values):
            raise UsageError(f"{name} {values!r} is not valid; valid: {', '.join(valid)}")
    for name, low in (("repeats", 1), ("threads", 1), ("epochs", 1), ("batch_size", 1), ("seed", 0),
                      ("data_parallel", 1)):
        value = getattr(cfg, name)
        if value is not None and value < low:
            raise UsageError(f"{name} {value} is below {low}")
    if not all(isinstance(f, str) and f in EXPORT_FORMATS for f in cfg.export):
        raise UsageError(f"export format {cfg.export!r} is not valid; valid: {', '.join(EXPORT_FORMATS)}")
    if cfg.timeout is not None and not cfg.timeout > 0:
        raise UsageError(f"timeout {cfg.timeout} is not positive")
    try:  # the same types and bounds whether the config came from flags or from run.json
        schema.check_config(cfg.to_json(), "run settings")
    except UntrustedInput as exc:
        raise UsageError(str(exc).replace("run settings: config.", "")) from None
    for task in cfg.tasks:
        check_fits_memory(get_task(task))
        batch = cfg.batch_size or get_task(task).batch_size
        if batch % cfg.data_parallel:
            raise UsageError(f"task {task!r}: batch size {batch} does not split evenly over --data-parallel "
                             f"{cfg.data_parallel} replicas")
        try:
            data_mod.choice_for(data_mod.accepted_for(get_task(task)), cfg.data)
        except data_mod.DataError as exc:
            raise UsageError(f"task {task!r}: {exc}") from None
    if cfg.data_dir is not None and not cfg.data_dir.strip():  # Path("") would be the current folder
        raise UsageError("--data-dir is empty")
    # A text task reads any UTF-8 file or folder given as --data-dir (harness.text).
    text_only = all(get_task(t).dataset == data_mod.text.KIND for t in cfg.tasks)
    if cfg.data_dir is not None and not Path(cfg.data_dir).is_dir() \
            and not (text_only and Path(cfg.data_dir).is_file()):
        state = "is not a folder" if Path(cfg.data_dir).exists() else "does not exist"
        raise UsageError(f"--data-dir {cfg.data_dir} {state}")
    if cfg.init_from is not None:
        from harness.checkpoint import CheckpointError, load_checkpoint_for
        from harness.tokens import load_tokenizer, tokenizer_file

        tokenizer = tokenizer_file(cfg.init_from)
        vocab = load_tokenizer(tokenizer)[1] if tokenizer else None
        for task in cfg.tasks:
            try:
                load_checkpoint_for(Path(cfg.init_from), get_task(task))
            except CheckpointError as exc:
                raise UsageError(f"--init-from: {exc}") from None
            if vocab is not None and vocab > get_task(task).num_classes:
                raise UsageError(f"--init-from: {tokenizer} has {vocab} tokens, task {task!r} only "
                                 f"{get_task(task).num_classes}")


# fp32 weights and their gradients: the least any backend holds while training (optimizer
# state, activations and the framework's own copies come on top).
BYTES_PER_PARAMETER = 8


def check_fits_memory(spec) -> None:
    """Refuse, before anything is allocated, a model whose parameters alone outgrow this machine's memory."""
    total = total_memory_bytes()
    need = spec.param_count() * BYTES_PER_PARAMETER
    if total is not None and need > total:
        raise UsageError(f"task {spec.name!r}: {spec.param_count():,} parameters need at least {need / 2**30:,.1f} "
                         f"GiB ({BYTES_PER_PARAMETER} bytes each: weights and gradients), more than this machine's "
                         f"{total / 2**30:,.1f} GiB")


def load_resume(out: Path) -> RunConfig:
    try:
        folderlock.check_free(out)  # a live run's folder: say so, rather than judge its run.json
    except folderlock.FolderBusy as exc:
        raise UsageError(str(exc)) from None
    path = Path(out) / RUN_FILE
    try:
        saved = schema.load_run_file(path, f"--resume {out}")
    except UntrustedInput as exc:
        raise UsageError(str(exc)) from None
    register_task_files(saved, path)
    cfg = config_from_saved(saved, Path(out))
    check_resume(cfg, saved)
    return cfg


def register_task_files(saved, path: Path) -> None:
    """The run's tasks that came from .toml files, registered from run.json: the files need not exist now."""
    from tasks import register
    from tasks.taskfile import TaskFileError, spec_from_dict

    files = saved.get("task_files", {}) if isinstance(saved, dict) else {}
    if not isinstance(files, dict):
        raise UsageError(f"--resume: {path}: task_files is not an object")
    for name, table in files.items():
        try:
            register(spec_from_dict(table), source=f"{path} task_files.{name}")
        except (TaskFileError, AttributeError, TypeError, ValueError) as exc:
            raise UsageError(f"--resume: {path} task_files.{name}: {exc}") from None


def write_run_file(cfg: RunConfig, sources: dict[str, tuple[str, str, str]] | None = None) -> None:
    """run.json: the config, the dataset each task got and its spec built for it, versions, commit."""
    from harness.results import write_json_atomic

    data = {t: sources[t][0] for t in cfg.tasks} if sources else {}
    write_json_atomic(cfg.out / RUN_FILE, {
        "schema_version": SCHEMA_VERSION, "config": cfg.to_json(), "created_at": utc_now(),
        "data": data, "specs": {t: cfg.spec_dict(t, data.get(t)) for t in cfg.tasks},
        # A task from a .toml file, as the file described it: --resume registers it from here.
        "task_files": {t: get_task(t).to_dict() for t in cfg.tasks if t not in BUILTIN_TASKS},
        "versions": framework_versions(cfg.backends), "tribench_commit": _commit(),
        "tribench_version": tribench_version(), "git_dirty": git_state(cfg.out)["git_dirty"],
    })
