"""Which datasets each task accepts, in order, and its accuracy target per (task, dataset)."""

import pytest

from tasks import TASKS
from tasks.datasets import DATASETS
from tasks.targets import TARGETS, accepted, for_dataset


def test_each_task_prefers_its_own_dataset_then_the_others_that_fit():
    assert accepted(TASKS["mnist-mlp"]) == ("mnist", "fashion-mnist")
    # The CNN tasks are built for any image shape their layers fit; the MLP keeps to its own shape.
    assert accepted(TASKS["cifar-cnn"]) == ("cifar10", "mnist", "fashion-mnist")
    assert accepted(TASKS["finetune"]) == ("cifar10", "mnist", "fashion-mnist")


@pytest.mark.parametrize("task", list(TASKS))
def test_every_accepted_pair_has_a_stated_target_and_builds(task):
    spec = TASKS[task]
    for dataset in accepted(spec):
        assert (task, dataset) in TARGETS
        built = for_dataset(spec, dataset)
        assert built.input_shape == DATASETS[dataset].shape
        assert built.target_accuracy == TARGETS[(task, dataset)]
        assert built.param_count() > 0  # the layers fit the shape


def test_the_mlp_on_fashion_mnist_is_held_to_its_own_target_not_mnists():
    assert for_dataset(TASKS["mnist-mlp"], "fashion-mnist").target_accuracy < 0.9
    assert for_dataset(TASKS["mnist-mlp"], "mnist").target_accuracy == 0.97


def test_the_cnn_built_for_fashion_mnist_takes_one_channel():
    spec = for_dataset(TASKS["finetune"], "fashion-mnist")
    first = spec.params()[0]
    assert first.name == "conv1.kernel" and tuple(first.param.shape) == (3, 3, 1, 32)
    assert [s.classes for s in spec.stages][:2] == [(0, 1, 2, 3, 4), (5, 6, 7, 8, 9)]


def test_synthetic_data_keeps_the_tasks_own_spec():
    assert for_dataset(TASKS["cifar-cnn"], "synthetic") is TASKS["cifar-cnn"]


def test_a_task_of_fashion_mnist_takes_it_first():
    import dataclasses

    spec = dataclasses.replace(TASKS["mnist-mlp"], dataset="fashion-mnist")
    assert accepted(spec) == ("fashion-mnist", "mnist")
