"""The task registry: every benchmark task by name, and task files registered at run time; framework-free."""

from pathlib import Path

from tasks.cifar_cnn import CIFAR_CNN
from tasks.finetune import FINETUNE
from tasks.mnist_mlp import MNIST_MLP
from tasks.spec import TaskSpec

TASKS: dict[str, TaskSpec] = {t.name: t for t in (MNIST_MLP, CIFAR_CNN, FINETUNE)}
BUILTIN_TASKS = tuple(TASKS)
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
