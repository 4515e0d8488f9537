"""Plans the task x backend x repeat matrix and runs each cell in a fresh worker subprocess."""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from backends import BACKENDS, backend_info
from backends.base import BEST
from harness import data as data_mod
from harness import folderlock
from harness.lifeline import CELL_DIR_PREFIX
from harness.node import describe_node
from harness.results import (
    RECORDS_FILE,
    REPO_ROOT,
    SCHEMA_VERSION,
    append_record,
    empty_record,
    git_state,
    read_records,
    tribench_version,
)
from harness.shard import in_shard
from harness.storage import set_aside_torn_tail
from harness.worker import PROGRESS_PREFIX, utc_now
from tasks import BUILTIN_TASKS, get_task
from tasks.targets import for_dataset

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
STDERR_TAIL_LINES = 30
# --quick, the one place that says what it means: QUICK_EPOCHS epochs (unless --epochs says otherwise)
# on the first (train, test) samples of each dataset kind (windows for text), enough to see every
# backend learn; the whole matrix, probes included, is measured in docs/modes.md.
QUICK_SUBSETS = {"mnist": (12000, 2000), "cifar10": (4000, 1000), "text": (256, 64)}
QUICK_EPOCHS = 1
FINISHED = ("ok", "diverged")  # cells --resume does not run again; failed and skipped cells are retried

EXIT_OK, EXIT_CELL_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def available_cores() -> int:
    """The cores this process may run on (its affinity), which can be fewer than the machine's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class UsageError(ValueError):
    """Bad input from the user: exit code 2 and one line."""


class Interrupted(Exception):
    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


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


def prepare_out_dir(out: Path) -> None:
    """Fail before any cell runs when the results cannot be written."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise UsageError(f"cannot write results to {out}: {exc.strerror or exc}") from None


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
    try:
        saved = json.loads((cfg.out / RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        saved = {}
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


# run.json config field -> the JSON types it may hold (None where the flag is optional). A
# RunConfig field missing here is accepted unchecked: add it when it can carry a path or a name.
CONFIG_TYPES = {
    "tasks": list, "backends": list, "repeats": int, "seed": int, "data": str, "data_dir": (str, type(None)),
    "epochs": (int, type(None)), "batch_size": (int, type(None)), "device": str, "threads": int, "precision": str,
    "mode": str, "timeout": (int, float, type(None)), "quick": bool, "init_from": (str, type(None)),
    "allow_download": bool, "override": (str, type(None)), "data_parallel": int,
}


def config_from_saved(saved, out: Path) -> RunConfig:
    """The RunConfig a run.json describes, refused with one line when anything in it is off.

    A results folder may come from someone else: every value is type- and name-checked,
    and paths in it (data_dir, init_from) are taken relative to the folder, not to
    wherever the user happens to stand.
    """
    where = f"--resume {out}: {RUN_FILE}"
    config = saved.get("config") if isinstance(saved, dict) else None
    if not isinstance(config, dict) or not isinstance(saved.get("specs"), dict) \
            or not isinstance(saved.get("versions"), dict):
        raise UsageError(f"{where} is not a tribench run file (no config, specs and versions objects)")
    unknown = sorted(set(config) - {f.name for f in dataclasses.fields(RunConfig)})
    if unknown:
        raise UsageError(f"{where}: unknown config field {unknown[0]!r}")
    for name, types in CONFIG_TYPES.items():
        if name not in config and name not in ("tasks", "backends"):
            continue  # the default, as for a run.json from before the field existed
        value = config.get(name)
        if not isinstance(value, types) or (isinstance(value, bool) and types is not bool):
            raise UsageError(f"{where}: config.{name} is {json.dumps(value)}, not a valid value")
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
    """Rebuild the run's tasks that have sizes with cfg.override (registered under their names, sent to workers)."""
    if not cfg.override:
        return
    from tasks import BUILDERS, override_task, parse_override
    from tasks.spec import SpecError

    sized = [t for t in cfg.tasks if t in BUILDERS]
    try:
        if not sized:
            raise SpecError(f"--override: none of the tasks {', '.join(cfg.tasks)} has sizes; "
                            f"tasks that do: {', '.join(BUILDERS)}")
        changes = parse_override(cfg.override)
        for task in sized:
            override_task(task, changes)
    except SpecError as exc:
        raise UsageError(str(exc)) from None


def check_config(cfg: RunConfig) -> None:
    """Names and ranges every run must satisfy, whether its config came from flags or from run.json."""
    from backends.base import DEVICES, PRECISIONS, RUN_MODES
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
    if cfg.timeout is not None and not cfg.timeout > 0:
        raise UsageError(f"timeout {cfg.timeout} is not positive")
    for task in cfg.tasks:
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
        from harness.weights import CheckpointError, load_checkpoint_for

        for task in cfg.tasks:
            try:
                load_checkpoint_for(Path(cfg.init_from), get_task(task))
            except CheckpointError as exc:
                raise UsageError(f"--init-from: {exc}") from None


def load_resume(out: Path) -> RunConfig:
    try:
        folderlock.check_free(out)  # a live run's folder: say so, rather than judge its run.json
    except folderlock.FolderBusy as exc:
        raise UsageError(str(exc)) from None
    path = Path(out) / RUN_FILE
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UsageError(f"--resume {out}: no readable {RUN_FILE} there ({exc})") from None
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
        "precision": cfg.precision, "mode": cfg.mode, "pinned_mode": cell.pinned_mode, "init_from": cfg.init_from,
        "data_parallel": cfg.data_parallel,
        "checkpoint_prefix": str(cfg.out / "checkpoints" / f"{cell.task}-{cell.backend}-r{cell.repeat}"),
        "out": str(cfg.out),  # git_dirty leaves the run's own output out
    }


def worker_env(threads: int) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # Same thread budget for every framework, set before any of them is imported.
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    root = str(REPO_ROOT)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def run_worker(cell_cfg: dict, workdir: Path, *, timeout: float | None, threads: int,
               on_event: Callable[[dict], None], state: dict) -> dict:
    """Run one worker process; always returns a record, whatever happened to the process."""
    cfg_path, rec_path = workdir / "cell.json", workdir / "record.json"
    # The worker watches this PID and, if it dies, removes `cell_dir` itself (lifeline.py).
    cfg_path.write_text(json.dumps({**cell_cfg, "driver_pid": os.getpid(), "cell_dir": str(workdir)}))
    faults: list[str] = []
    tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
    proc = subprocess.Popen([sys.executable, "-m", "harness.worker", str(cfg_path), str(rec_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, errors="replace",
                            env=worker_env(threads), start_new_session=True)
    state["proc"] = proc

    def pump():
        for line in proc.stderr:
            if line.startswith(PROGRESS_PREFIX):
                try:
                    event = json.loads(line[len(PROGRESS_PREFIX):])
                except ValueError:
                    continue
                if event.get("event") == "fault":
                    faults.append(str(event.get("fault")))
                on_event(event)
            else:
                tail.append(line.rstrip("\n"))

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = False
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        stop_process(proc)
    reader.join(timeout=5)
    state["proc"] = None

    record = None
    if rec_path.exists():
        try:
            record = json.loads(rec_path.read_text())
        except ValueError:
            record = None
    if record is None:
        record = empty_record(task=cell_cfg["task"], backend=cell_cfg["backend"], repeat=cell_cfg["repeat"],
                              seed=cell_cfg["seed"])
        record["finished_at"] = utc_now()
        if timed_out:
            reason, error = "timeout", f"worker exceeded --timeout {timeout:g} s and was killed"
        elif proc.returncode < 0:
            name = signal.Signals(-proc.returncode).name
            hint = " (SIGKILL: often the kernel's out-of-memory killer)" if name == "SIGKILL" else ""
            reason, error = "signal", f"worker killed by {name}{hint}"
        else:
            reason, error = "exit", f"worker exited with code {proc.returncode} without writing a record"
        record.update(status="failed", error=error,
                      failure={"reason": reason, "exit_code": proc.returncode,
                               "signal": signal.Signals(-proc.returncode).name if (proc.returncode or 0) < 0 else None})
    if record["status"] in ("failed", "diverged"):
        record["failure"] = {**(record.get("failure") or {}), "stderr_tail": list(tail)}
    if faults:  # test-only fault injection: a record made under it says so
        record["env"] = {**(record.get("env") or {}), "injected_fault": faults[0]}
    return record


def stop_process(proc: subprocess.Popen, grace_s: float = 5.0) -> None:
    """SIGTERM the worker's process group, then SIGKILL what is left after a grace period."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace_s)
            return
        except subprocess.TimeoutExpired:
            continue


def skipped_record(cell: Cell, seed: int, error: str) -> dict:
    record = empty_record(task=cell.task, backend=cell.backend, repeat=cell.repeat, seed=seed)
    record.update(status="skipped", error=error, started_at=utc_now(), finished_at=utc_now())
    return record


def missing_backend_record(cfg: RunConfig, cell: Cell) -> dict | None:
    """A skipped record when the cell's framework is not installed here, else None."""
    info = backend_info(cell.backend)
    if not info.missing():
        return None
    return skipped_record(cell, cfg.seed + cell.repeat,
                          f"{', '.join(info.missing())} not installed: {info.install_hint}")


class LocalExecutor:
    """The default executor: cells one after another, each in a fresh worker subprocess on this machine."""

    name = "local"

    def __init__(self):
        self.state: dict = {"proc": None}

    def start(self, cfg: RunConfig) -> None:
        """Nothing to connect to; an executor raises UsageError here when it cannot run."""

    def run(self, cfg: RunConfig, cells: list[Cell], sources: dict, *, bar, on_record) -> None:
        """Run `cells`, calling on_record(cell, record) as each one ends."""
        for cell in cells:
            bar.start_cell(cell.label)
            record = missing_backend_record(cfg, cell)
            if record is None:
                with tempfile.TemporaryDirectory(prefix=CELL_DIR_PREFIX) as tmp:
                    record = run_worker(cell_config(cfg, cell, sources[cell.task]), Path(tmp), timeout=cfg.timeout,
                                        threads=cfg.threads, on_event=bar.event, state=self.state)
            record["node"] = describe_node(executor=self.name)
            on_record(cell, record)

    def stop(self) -> None:
        """On Ctrl-C / SIGTERM: end the cell that is running."""
        if self.state.get("proc") is not None:
            stop_process(self.state["proc"])

    def close(self) -> None:
        """Always called at the end of a run, interrupted or not."""


def run_matrix(cfg: RunConfig, *, resume: bool = False, ui=None, write_report: bool = True, executor=None) -> int:
    """Run every planned cell of this shard not already finished; returns the process exit code.

    `executor` decides where cells run (default: LocalExecutor, one subprocess at a time here).
    The folder is locked for the whole run (folderlock), so a second run or a resume
    into a live folder stops before it reads or writes anything.
    """
    from harness.progress import Progress

    ui = ui or Progress()
    prepare_out_dir(cfg.out)
    try:
        with folderlock.hold(cfg.out):
            return _run_locked(cfg, resume=resume, ui=ui, write_report=write_report, executor=executor)
    except folderlock.FolderBusy as exc:
        raise UsageError(str(exc)) from None


def _run_locked(cfg: RunConfig, *, resume: bool, ui, write_report: bool, executor) -> int:
    records_path = cfg.out / RECORDS_FILE
    if resume:
        for name in ("data_dir", "init_from"):
            if getattr(cfg, name):
                ui.info(f"--resume: {name} from {cfg.out / RUN_FILE}: {getattr(cfg, name)}")
    sources = resolve_data(cfg)
    try:
        side = set_aside_torn_tail(records_path)
        if not resume:
            if records_path.exists() and records_path.stat().st_size:
                raise UsageError(f"{cfg.out} already holds records; use --resume {cfg.out} or another --out")
            write_run_file(cfg, sources)
    except OSError as exc:
        raise UsageError(f"cannot write results to {cfg.out}: {_os_error(exc)}") from None
    if side:
        ui.warn(f"{records_path} ended in half a record (a crash or a full disk); it was moved to {side}")
    done = {(r.get("task"), r.get("backend"), r.get("repeat")) for r in read_records(records_path)
            if r.get("status") in FINISHED} if resume else set()
    if resume:
        check_resumed_data(cfg, sources)
    for task, (name, where, why) in sources.items():
        if name == "synthetic":
            ui.warn(f"{task}: SYNTHETIC data (generated from the seed, not {get_task(task).dataset}) [{why}]")
        else:
            ui.info(f"{task}: real data {name} from {where} [{why}]")
    cells = [c for c in in_shard(plan(cfg), cfg.shard) if c.key not in done]
    if done:
        ui.info(f"resuming {cfg.out}: {len(done)} cells already finished, {len(cells)} to run")

    executor = executor or LocalExecutor()
    # Before our handlers go in: starting Ray installs a SIGTERM handler of its own.
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    executor.start(cfg)

    def interrupt(signum, frame):
        raise Interrupted(signum)

    for sig in previous:
        signal.signal(sig, interrupt)
    code, stored = EXIT_OK, 0
    try:
        with ui.matrix(len(cells)) as bar:
            def on_record(cell: Cell, record: dict) -> None:
                nonlocal stored
                append_record(records_path, record)
                stored += 1
                bar.finish_cell(cell.label, record)

            if cfg.mode == BEST:  # each cell's first repeat decides; the others then train in its choice
                deciding, rest = deciding_first(cells, pinned_modes(read_records(records_path)))
                executor.run(cfg, deciding, sources, bar=bar, on_record=on_record)
                pins = pinned_modes(read_records(records_path))
                for cell in rest:
                    cell.pinned_mode = pins.get((cell.task, cell.backend))
                executor.run(cfg, rest, sources, bar=bar, on_record=on_record)
            else:
                executor.run(cfg, cells, sources, bar=bar, on_record=on_record)
    except Interrupted as exc:
        executor.stop()
        ui.warn(f"interrupted by {exc}: finished cells are in {records_path}; "
                f"continue with: tribench run --resume {cfg.out}")
        code = 128 + exc.signum
    except OSError as exc:  # a full disk, mostly: stop at once, keep every whole record
        executor.stop()
        records = read_records(records_path)
        ui.error(f"run stopped after {stored} of {len(cells)} cells: {_os_error(exc)}; the {len(records)} "
                 f"records in {records_path} are whole; free space, then: tribench run --resume {cfg.out}")
        return EXIT_CELL_FAILED if records else EXIT_USAGE
    finally:
        executor.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    records = read_records(records_path)
    if not finish(cfg.out, records, ui, write_report=write_report) and code == EXIT_OK:
        code = EXIT_CELL_FAILED
    if code == EXIT_OK and any(r.get("status") in ("failed", "diverged") for r in records):
        code = EXIT_CELL_FAILED
    return code


def _os_error(exc: OSError) -> str:
    """'PATH: reason' of an OSError, on one line."""
    reason = exc.strerror or str(exc)
    return f"{exc.filename}: {reason}" if exc.filename else reason


def finish(out: Path, records: list[dict], ui, *, write_report: bool = True) -> bool:
    """The summary table and the report, also after an interruption; False if the report could not be written."""
    from harness import report

    ui.print(report.render_terminal(records))
    written = True
    if write_report:
        try:
            paths = report.write_report(out, records=records)
            ui.info(f"report: {paths[0].parent / 'report.html'}")
        except OSError as exc:  # a full disk: one line, the records are safe
            ui.error(f"report not written: cannot write {_os_error(exc)}; the records are in {out / RECORDS_FILE}")
            written = False
        except Exception:  # a broken plot must not hide the records that are safe on disk
            log.exception("writing the report failed; the records are in %s", out / RECORDS_FILE)
    for r in records:
        if r.get("status") in ("failed", "diverged"):
            ui.warn(f"{r['status'].upper()}: {r.get('task')} / {r.get('backend')} / repeat {r.get('repeat')}: "
                    f"{r.get('error')}")
    return written


def available_backends() -> list[str]:
    return [name for name, info in BACKENDS.items() if info.available()]
