"""The task registry: every benchmark task by name, and task files registered at run time; framework-free."""

import math
import typing
from pathlib import Path

from tasks.cifar_cnn import CIFAR_CNN
from tasks.finetune import FINETUNE
from tasks.gpt2 import GPT2, GPT2_FINETUNE, gpt2, gpt2_finetune
from tasks.mnist_mlp import MNIST_MLP
from tasks.spec import SpecError, TaskSpec
from tasks.tiny_gpt import TINY_GPT, TINY_GPT_FINETUNE, tiny_gpt, tiny_gpt_finetune

TASKS: dict[str, TaskSpec] = {t.name: t for t in (MNIST_MLP, CIFAR_CNN, FINETUNE, TINY_GPT, TINY_GPT_FINETUNE, GPT2,
                                                  GPT2_FINETUNE)}
# Tasks whose model sizes --override can change: name -> the function that builds the spec from sizes.
BUILDERS = {"tiny-gpt": tiny_gpt, "tiny-gpt-finetune": tiny_gpt_finetune, "gpt2": gpt2, "gpt2-finetune": gpt2_finetune}
BUILTIN_TASKS = tuple(TASKS)
# What runs when no --task is given: the GPT-2 tasks (124M parameters) only when asked for by name.
DEFAULT_TASKS = tuple(t for t in TASKS if t not in (GPT2.name, GPT2_FINETUNE.name))
TASK_FILE_SUFFIX = ".toml"


def is_task_file(name: str) -> bool:
    return name.endswith(TASK_FILE_SUFFIX)


def load_task(name: str) -> TaskSpec:
    """A built-in task by name, or the task a .toml file describes (registered under its spec name)."""
    if not is_task_file(name):
        return get_task(name)
    from tasks.taskfile import load_task_file

    return register(load_task_file(Path(name)), source=name)


def register(spec: TaskSpec, *, source: str) -> TaskSpec:
    """Add a task from a file (or a results folder's run.json) under its spec name."""
    if spec.name in TASKS and TASKS[spec.name] != spec:
        from tasks.taskfile import TaskFileError

        raise TaskFileError(f"{source}: task name {spec.name!r} is already taken by another task")
    TASKS[spec.name] = spec
    return spec


def get_task(name: str) -> TaskSpec:
    try:
        return TASKS[name]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; valid: {', '.join(TASKS)}") from None


def parse_override(text: str) -> dict:
    """`d_model=768,layers=12` -> {"d_model": 768, "layers": 12}; numbers become int or float."""
    changes = {}
    for item in (i.strip() for i in text.split(",") if i.strip()):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SpecError(f"--override: {item!r} is not key=value")
        for convert in (int, float, str):
            try:
                changes[key.strip()] = convert(value.strip())
                break
            except ValueError:
                continue
        number = changes[key.strip()]
        if isinstance(number, float) and not math.isfinite(number):
            raise SpecError(f"--override: {item!r}: not a finite number")
    return changes


def override_task(name: str, changes: dict) -> TaskSpec:
    """Rebuild a task with new sizes (its builder's arguments) or TaskSpec fields, and register it under its name.

    Always built from the builder's defaults, so applying the same override twice gives the same spec.
    """
    builder = BUILDERS.get(name)
    if builder is None:
        raise SpecError(f"--override: task {name!r} has no size parameters; tasks that do: {', '.join(BUILDERS)}")
    import inspect

    from tasks.taskfile import fits_type

    valid = list(dict.fromkeys(p for b in (builder, tiny_gpt) for p in inspect.signature(b).parameters
                               if p not in ("name", "spec_fields")))
    # Scalar spec fields only: the structures (layers, optimizer, stages) come from the builder.
    fields = set(TaskSpec.__dataclass_fields__) - {"name", "layers", "optimizer", "input_shape", "dataset", "loss",
                                                   "stages"}
    unknown = sorted(set(changes) - set(valid) - fields)
    if unknown:
        raise SpecError(f"--override: unknown key {unknown[0]!r} for {name}; "
                        f"valid: {', '.join(valid + sorted(fields))}")
    hints = {**typing.get_type_hints(TaskSpec), **typing.get_type_hints(tiny_gpt), **typing.get_type_hints(builder)}
    for key, value in changes.items():
        if key in hints and not fits_type(value, hints[key]):
            raise SpecError(f"--override: {key}={value!r} is not a valid {key}")
    try:
        TASKS[name] = builder(name=name, **changes)
    except (TypeError, ValueError, ZeroDivisionError) as exc:
        raise SpecError(f"--override: {exc}") from None
    return TASKS[name]
