"""The task registry: every benchmark task by name, framework-free."""

from tasks.cifar_cnn import CIFAR_CNN
from tasks.finetune import FINETUNE
from tasks.mnist_mlp import MNIST_MLP
from tasks.spec import TaskSpec

TASKS: dict[str, TaskSpec] = {t.name: t for t in (MNIST_MLP, CIFAR_CNN, FINETUNE)}


def get_task(name: str) -> TaskSpec:
    try:
        return TASKS[name]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; valid: {', '.join(TASKS)}") from None
