"""The tribench command line: parse, validate, call. No logic of its own."""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import logging
import os
import sys
from pathlib import Path

from backends import BACKENDS
from backends.base import DEVICES, PRECISIONS, RUN_MODES
from harness import __version__
from harness import data as data_mod
from harness.confine import UntrustedInput
from harness.errors import EXIT_CELL_FAILED, EXIT_OK, EXIT_USAGE, UsageError
from harness.exporting import INSTALL_HINT, missing_modules, parse_formats
from harness.figures import TEST_ACCURACY, TRAIN_RATE
from harness.run_config import QUICK_EPOCHS, RunConfig, apply_override, check_config, load_resume
from harness.runner import available_backends, run_matrix
from harness.shard import parse_shard
from tasks import DEFAULT_TASKS, TASKS, get_task, is_task_file, load_task
from tasks.datasets import DATASETS, IMAGE, TEXT, findable, of_kind
from tasks.targets import TARGETS, accepted

DATA_CHOICES = ["auto", *findable(), "synthetic"]
EXECUTORS = ("local", "ray")


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument on one line, with exit code 2."""

    def error(self, message: str):
        # main() adds "tribench: error: "; a subcommand's parser names itself after it once.
        sub = self.prog.removeprefix("tribench").strip()
        raise UsageError(f"{sub}: {message}" if sub else message)


def names(value: str, valid, what: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    for item in items:
        if item not in valid:
            raise UsageError(f"unknown {what} {item!r}; valid: {', '.join(valid)}")
    if not items:
        raise UsageError(f"no {what} given; valid: {', '.join(valid)}")
    return list(dict.fromkeys(items))


def positive(kind, *, zero_ok: bool = False):
    """An argparse type: a number above 0 (or from 0 with zero_ok); argparse names the flag in the error."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if value < 0 or (value == 0 and not zero_ok):
            raise argparse.ArgumentTypeError(f"must be {'0 or more' if zero_ok else 'positive'}, got {text}")
        return value
    return parse


def add_run_options(p: argparse.ArgumentParser, *, sweep: bool = False) -> None:
    p.add_argument("--task", help=f"comma-separated names or task files (.toml); default: {','.join(DEFAULT_TASKS)} "
                   f"(every task but {', '.join(t for t in TASKS if t not in DEFAULT_TASKS)})")
    p.add_argument("--backend", help=f"comma-separated; default every installed one of: {','.join(BACKENDS)}")
    p.add_argument("--data", default="auto", help=f"one of {', '.join(DATA_CHOICES)} (default auto: per task "
                   "the first real dataset found that fits it, its own first (MNIST, then Fashion-MNIST for the MLP; "
                   "CIFAR-10, then MNIST, then Fashion-MNIST for the CNN tasks), else synthetic, said loudly); "
                   "comma-separated, each task takes the first that fits it, e.g. cifar10,synthetic")
    p.add_argument("--data-dir", help=f"look here first for datasets (then ${data_mod.ENV_VAR}, the user cache, "
                   "/usr/share/datasets)")
    p.add_argument("--epochs", type=positive(int), help="override every task's epochs")
    p.add_argument("--override", metavar="KEY=VALUE,...", help="model sizes and spec fields of tasks that have "
                   "sizes, e.g. --override d_model=768,layers=12,heads=12,context=1024 (tiny-gpt: d_model, layers, "
                   "heads, context, batch_size, epochs, lr, and TaskSpec fields)")
    if sweep:
        p.add_argument("--data-parallel", metavar="N,N,...", help="sweep data-parallel replicas instead of the "
                       "batch size, e.g. 1,2,4,8, at one batch size; reports scaling efficiency")
        p.add_argument("--batch-size", default=None,
                       help="comma-separated batch sizes (default 32,64,128,256,512,1024)")
    else:
        p.add_argument("--batch-size", type=positive(int), help="override every task's batch size")
        p.add_argument("--data-parallel", type=positive(int), default=1, metavar="N",
                       help="replicas per cell (default 1): each step's batch split evenly over N devices "
                            "(torch DDP processes, tf.distribute.MirroredStrategy, a jax.sharding Mesh; on a "
                            "CPU, N logical devices sharing its cores)")
    p.add_argument("--repeats", type=positive(int), default=1, help="fresh worker processes per cell (default 1)")
    p.add_argument("--seed", type=positive(int, zero_ok=True), default=0, help="0 or more (default 0)")
    p.add_argument("--device", default="auto", help=f"one of {', '.join(DEVICES)}")
    p.add_argument("--threads", type=positive(int), help="intra-op threads for every framework (default: all cores)")
    p.add_argument("--precision", default="fp32", help=f"one of {', '.join(PRECISIONS)} (default fp32)")
    p.add_argument("--mode", default="best", help=f"one of {', '.join(RUN_MODES)} (default best: each cell's first "
                   "repeat probes the modes' training steps, every repeat trains in the faster; docs/modes.md)")
    p.add_argument("--timeout", type=positive(float), help="seconds before a cell's worker is killed")
    p.add_argument("--quick", action="store_true",
                   help=f"a smoke run: {QUICK_EPOCHS} epoch(s) on the first train/test samples the dataset table "
                   "gives the task's dataset (" + ", ".join(f"{d.name} {d.quick[0]}/{d.quick[1]}" for d in
                                                            DATASETS.values() if d.name in (*of_kind(IMAGE), TEXT))
                   + " windows)")
    p.add_argument("--init-from", type=Path, metavar="CHECKPOINT",
                   help="start from a checkpoint (.safetensors, or .npz) written by any backend, or a Hugging "
                   "Face GPT-2 folder for the gpt2 tasks (docs/finetune-hf.md); for finetune, skips pretraining")
    p.add_argument("--no-download", action="store_true", help="never try to download datasets")
    p.add_argument("--export", metavar="FORMATS", help="after training, export the model as onnx and/or native "
                   "(torch.export, Keras SavedModel, jax.export) and time it in its runtime, ONNX Runtime for onnx; "
                   f"needs the onnx extra: {INSTALL_HINT}")
    p.add_argument("--out", type=Path, help="results folder (default results/runs/<UTC time>)")
    if not sweep:
        p.add_argument("--resume", type=Path, metavar="DIR", help="run only the cells missing from DIR")
        p.add_argument("--executor", default="local", help=f"where cells run: {' or '.join(EXECUTORS)} "
                       "(default local: one subprocess at a time on this machine; ray: one Ray task per cell)")
        p.add_argument("--ray-address", metavar="ADDRESS", help="with --executor ray: join the cluster at "
                       "HOST:PORT or 'auto' (default: start a Ray instance on this machine for the run)")
        p.add_argument("--shard", metavar="I/N", help="run only shard I of N of the matrix (0 <= I < N); "
                       "join the shard folders with tribench merge")


def build_parser() -> Parser:
    parser = Parser(prog="tribench", description="Compare PyTorch, TensorFlow/Keras and JAX on one task spec.")
    parser.add_argument("--version", action="version", version=f"tribench {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    add_run_options(sub.add_parser("run", help="run the benchmark matrix"))
    add_run_options(sub.add_parser("sweep", help="throughput and memory against batch size, with a plot"),
                    sweep=True)
    sub.add_parser("list", help="tasks, backends and data sources found")
    show = sub.add_parser("show", help="a task's layer table: output shapes, parameters, FLOPs")
    show.add_argument("task", help="a task name or a task file (.toml)")
    report = sub.add_parser("report", help="write report.md/.html and plots for a results folder")
    report.add_argument("dir", type=Path)
    history = sub.add_parser("history", help="every run under a results folder across commits: tables and a "
                             "trend plot per task and backend")
    history.add_argument("dir", type=Path, nargs="?", help="default: results (then only printed without --out)")
    history.add_argument("--out", type=Path, help="where history.md and history.png go (default: DIR when named)")
    export = sub.add_parser("export", help="write a run into MLflow and/or TensorBoard")
    export.add_argument("dir", type=Path)
    export.add_argument("--mlflow", metavar="URI", help="tracking store, e.g. sqlite:///mlflow.db or http://host:5000")
    export.add_argument("--experiment", default="tribench", help="MLflow experiment name (default tribench)")
    export.add_argument("--tensorboard", type=Path, metavar="LOGDIR", help="write event files under LOGDIR")
    compare = sub.add_parser("compare", help="compare two results folders; exit 1 on a regression, "
                             "3 when new left a cell or repeat unmeasured")
    compare.add_argument("base", type=Path)
    compare.add_argument("new", type=Path)
    compare.add_argument("--threshold", default="5%",
                         help="smallest change called a regression: one for every figure (default 5%%; accuracy in "
                         f"points), or per figure, e.g. {TRAIN_RATE.name}=5%%,{TEST_ACCURACY.name}=0.5pt")
    compare.add_argument("--format", default="text", help="text, markdown or json (default text)")
    compare.add_argument("--force", action="store_true",
                         help="compare runs that differ in data, sizes, spec, device, versions... under a banner "
                         "naming the differences (without it they exit 2)")
    merge = sub.add_parser("merge", help="join the --shard folders of one matrix into one run folder")
    merge.add_argument("dirs", type=Path, nargs="+", metavar="DIR")
    merge.add_argument("--out", type=Path, required=True, help="the merged run folder (new)")
    convert = sub.add_parser("convert", help="write a GPT-2 checkpoint as a Hugging Face folder (LoRA: a PEFT "
                             "folder inside it); docs/finetune-hf.md")
    convert.add_argument("checkpoint", type=Path)
    convert.add_argument("--to", required=True, help="the format: hf-gpt2")
    convert.add_argument("--out", type=Path, required=True, help="the folder to write")
    return parser


def one_of(value: str, valid, flag: str) -> str:
    if value not in valid:
        raise UsageError(f"{flag} {value!r} is not valid; valid: {', '.join(valid)}")
    return value


def task_names(value: str) -> list[str]:
    """Task names from --task: built-in names, or .toml files loaded and registered under their spec name."""
    from tasks.taskfile import TaskFileError

    items = [v.strip() for v in value.split(",") if v.strip()]
    loaded = []
    for item in items:
        if not is_task_file(item):
            loaded.append(item)
            continue
        try:
            spec = load_task(item)
        except TaskFileError as exc:
            raise UsageError(str(exc)) from None
        loaded.append(spec.name)
    return names(",".join(loaded), TASKS, "task")


def run_config(args, *, batch_size: int | None = None, data_parallel: int = 1) -> RunConfig:
    tasks = task_names(args.task) if args.task is not None else list(DEFAULT_TASKS)
    backends = names(args.backend, BACKENDS, "backend") if args.backend is not None else available_backends()
    for value in args.data.split(","):
        one_of(value.strip(), DATA_CHOICES, "--data")
    out = args.out or Path("results") / "runs" / dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    cfg = RunConfig(tasks=tasks, backends=backends, out=out, repeats=args.repeats, seed=args.seed,
                    data=args.data, data_dir=str(Path(args.data_dir).resolve()) if args.data_dir else args.data_dir,
                    epochs=args.epochs, batch_size=batch_size,
                    device=one_of(args.device, DEVICES, "--device"),
                    precision=one_of(args.precision, PRECISIONS, "--precision"),
                    mode=one_of(args.mode, RUN_MODES, "--mode"), timeout=args.timeout, quick=args.quick,
                    init_from=str(args.init_from.resolve()) if args.init_from else None,
                    allow_download=not args.no_download, override=args.override, data_parallel=data_parallel)
    apply_override(cfg)
    if getattr(args, "export", None):
        try:
            cfg.export = list(parse_formats(args.export))
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        missing = missing_modules(cfg.export, backends)
        if missing:
            raise UsageError(f"--export {args.export} needs {', '.join(missing)}: {INSTALL_HINT}")
    if args.threads:
        cfg.threads = args.threads
    if getattr(args, "shard", None):
        try:
            cfg.shard = parse_shard(args.shard)
        except ValueError as exc:
            raise UsageError(f"--shard {exc}") from None
    if not backends:  # after the flags are read, so a wrong flag is named first on a machine without any
        raise UsageError(f"no backend installed; install one: pip install \"tribench[all]\" "
                         f"(or one of {', '.join(BACKENDS)})")
    check_config(cfg)
    return cfg


def flags_given(args, command: str) -> list[str]:
    """The options of `args` set to anything but their defaults, as flags."""
    defaults = vars(build_parser().parse_args([command]))
    return [f"--{k.replace('_', '-')}" for k, v in vars(args).items() if v != defaults.get(k)]


def make_executor(args):
    """None for the runner's default (local), else the executor --executor names."""
    one_of(args.executor, EXECUTORS, "--executor")
    if args.executor == "local":
        if args.ray_address:
            raise UsageError("--ray-address needs --executor ray")
        return None
    from harness.ray_executor import RayExecutor

    return RayExecutor(args.ray_address)


def cmd_run(args) -> int:
    executor = make_executor(args)
    if args.resume:
        # A resume runs the matrix run.json describes; a flag that changed it would mix two runs in one
        # table. Where the cells run (--executor, --ray-address) is not part of the matrix.
        where = ("--resume", "--executor", "--ray-address")
        others = [f for f in flags_given(args, "run") if f not in where]
        if others:
            raise UsageError(f"--resume takes no other run flags but --executor and --ray-address (got "
                             f"{', '.join(others)}): the cells and settings come from {args.resume / 'run.json'}; "
                             "start a new run to change them")
        return run_matrix(load_resume(args.resume), resume=True, executor=executor)
    return run_matrix(run_config(args, batch_size=args.batch_size, data_parallel=args.data_parallel),
                      executor=executor)


def sweep_values(text: str, flag: str) -> list[int]:
    values = sorted({positive(int)(v) for v in text.split(",") if v.strip()})
    if not values:
        raise UsageError(f"{flag}: give at least one value, e.g. 1,2,4")
    return values


def cmd_sweep(args) -> int:
    from harness.sweep import BATCH_SIZE, DATA_PARALLEL, run_sweep

    args.epochs = args.epochs or 1  # a sweep measures throughput; one epoch after warm-up is enough
    if args.data_parallel:
        replicas = sweep_values(args.data_parallel, "--data-parallel")
        batch = sweep_values(args.batch_size, "--batch-size") if args.batch_size else [None]
        if len(batch) > 1:
            raise UsageError("--data-parallel sweeps the replicas at one batch size: give one --batch-size")
        base = run_config(args, batch_size=batch[0])
        for n in replicas:  # refuse a count that does not divide before anything runs
            check_config(dataclasses.replace(base, data_parallel=n))
        return run_sweep(base, DATA_PARALLEL, replicas)
    sizes = sweep_values(args.batch_size or "32,64,128,256,512,1024", "--batch-size")
    return run_sweep(run_config(args), BATCH_SIZE, sizes)


def cmd_list(args) -> int:
    print("Tasks:")
    for spec in TASKS.values():
        print(f"  {spec.name}: {spec.param_count():,} parameters in {len(spec.param_layer_names())} parameter layers "
              f"(built for {spec.dataset}), {spec.epochs} epochs, batch {spec.batch_size}")
        print(f"    stages {', '.join(s.name for s in spec.stages)}; {_target_text(spec)}")
    print("Backends:")
    for name, info in BACKENDS.items():
        state = "installed" if info.available() else f"not installed ({info.install_hint})"
        print(f"  {name:10s} {state}")
    print("Data sources:")
    for name in findable():
        info = DATASETS[name]
        if info.system_dir:
            found = data_mod.text.system_corpus(name)
            where = f"found in {found}" if found else f"not found in {info.system_dir} ({info.how_to_get})"
        else:
            folder, looked = data_mod.find_source(info, None)
            where = f"found in {folder}" if folder else f"not found (looked in {', '.join(map(str, looked))})"
        print(f"  {name:14s} {where} ({info.kind})")
    print("  synthetic      always available (generated from the seed, labelled synthetic everywhere)")
    return 0


def _target_text(spec) -> str:
    """A task's target as `list` states it: the held-out loss for a loss-judged task, else accuracy per dataset."""
    if spec.target_loss is not None:
        stage = next(s for s in spec.stages if s.name == spec.primary_stage)
        where = f" (stage {stage.name}, on {stage.data})" if stage.data else ""
        return f"held-out loss target {spec.target_loss:g} nats{where}"
    targets = ", ".join(f"{d} {TARGETS.get((spec.name, d), spec.target_accuracy):g}" for d in accepted(spec))
    return f"test-accuracy target, data in order: {targets}"


def cmd_show(args) -> int:
    from tasks.summary import layer_table

    print(layer_table(get_task(task_names(args.task)[0])))
    return 0


def cmd_report(args) -> int:
    from harness import report
    from harness.results import RECORDS_FILE

    if not os.path.lexists(args.dir / RECORDS_FILE):
        raise UsageError(f"{args.dir}: no {RECORDS_FILE} there")
    for path in report.write_report(args.dir):
        print(path)
    return 0


def cmd_compare(args) -> int:
    from harness import compare

    try:
        thresholds = compare.parse_thresholds(args.threshold)
    except ValueError as exc:
        raise UsageError(f"--threshold: {exc}") from None
    fmt = one_of(args.format, compare.FORMATS, "--format")
    try:
        text, code = compare.compare_runs(args.base, args.new, threshold=thresholds, force=args.force, fmt=fmt)
    except (FileNotFoundError, compare.EmptyRun) as exc:
        raise UsageError(str(exc)) from None
    except compare.Incomparable as exc:
        print(f"tribench: error: {exc}:", file=sys.stderr)
        for line in exc.lines:
            print(f"  - {line}", file=sys.stderr)
        return EXIT_USAGE
    print(text, end="")
    return code


def cmd_merge(args) -> int:
    from harness.merge import merge_runs
    from harness.progress import Progress
    from harness.runner import finish

    records, missing = merge_runs(args.dirs, args.out)
    ui = Progress()
    finish(args.out, records, ui)
    if missing:
        ui.warn(f"in none of these folders: {len(missing)} of {len(missing) + len(records)} cells "
                f"(first: {missing[0]}); run them with: tribench run --resume {args.out}")
    return 0



def cmd_history(args) -> int:
    from harness import history

    root = args.dir or Path("results")
    if not root.is_dir():
        raise UsageError(f"{root}: not a folder")
    out = args.out or args.dir  # the default folder is read, and written into only when --out names it
    series, commits = history.collect(root)
    if not series:
        raise UsageError(f"{root}: no run with an ok record under it (looked for {history.RECORDS_FILE})")
    print(history.render_markdown(series, commits, root))
    if out is None:
        print(f"Tables only: name the folder or pass --out DIR to write {history.HISTORY_MD} and "
              f"{history.HISTORY_PNG}.")
        return 0
    for path in history.write_history(root, out):
        print(path)
    return 0


EXTRAS = {"mlflow": "mlflow", "tensorboard": "tensorboard"}  # import name -> tribench extra


def _require(module: str) -> None:
    """Exit 2 with the install hint when an optional extra is missing."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise UsageError(f"{module} is not installed: pip install \"tribench[{EXTRAS[module]}]\"")


def cmd_export(args) -> int:
    from harness.results import RECORDS_FILE, read_records

    if not args.mlflow and not args.tensorboard:
        raise UsageError("export: say where: --mlflow URI and/or --tensorboard LOGDIR")
    if not read_records(args.dir):
        raise UsageError(f"{args.dir}: no records in {args.dir / RECORDS_FILE}")
    for module, wanted in (("mlflow", args.mlflow), ("tensorboard", args.tensorboard)):
        if wanted:
            _require(module)
    if args.mlflow:
        from harness import export_mlflow

        try:
            parent, children, written = export_mlflow.export(args.dir, args.mlflow, experiment=args.experiment)
        except export_mlflow.ExportError as exc:
            raise UsageError(f"--mlflow {exc}") from None
        print(f"mlflow: {len(children)} runs (one per record; {written} new) under parent run {parent} in "
              f"experiment {args.experiment!r} at {args.mlflow}")
    if args.tensorboard:
        from harness import export_tensorboard

        folders = export_tensorboard.export(args.dir, args.tensorboard)
        print(f"tensorboard: {len(folders)} runs (one per record) under {args.tensorboard}; "
              f"view with: tensorboard --logdir {args.tensorboard}")
    return 0


def cmd_convert(args) -> int:
    from harness.checkpoint import CheckpointError
    from harness.hf_gpt2 import convert_to_hf

    one_of(args.to, ("hf-gpt2",), "--to")
    try:
        for folder in convert_to_hf(args.checkpoint, args.out):
            print(folder)
    except CheckpointError as exc:
        raise UsageError(str(exc)) from None
    return EXIT_OK


COMMANDS = {"run": cmd_run, "sweep": cmd_sweep, "list": cmd_list, "show": cmd_show, "report": cmd_report,
            "compare": cmd_compare, "merge": cmd_merge, "history": cmd_history, "export": cmd_export,
            "convert": cmd_convert}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command](args)
    except argparse.ArgumentTypeError as exc:
        print(f"tribench: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (UsageError, data_mod.DataError, UntrustedInput) as exc:
        print(f"tribench: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:  # a full disk or a vanished folder under report or sweep: one line
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"tribench: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return EXIT_CELL_FAILED


if __name__ == "__main__":
    sys.exit(main())
