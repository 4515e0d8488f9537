"""Freeze-and-finetune: pretrain the CIFAR CNN on classes 0-4, finetune on 5-9."""

import dataclasses

from tasks.cifar_cnn import CNN_LAYERS
from tasks.spec import Adam, Dense, Stage, TaskSpec

SOURCE_CLASSES = (0, 1, 2, 3, 4)
TARGET_CLASSES = (5, 6, 7, 8, 9)

# Both stages classify five classes, so the head has five units; stage 2 redraws it.
_LAYERS = tuple(dataclasses.replace(layer, units=5) if isinstance(layer, Dense) and layer.name == "head"
                else layer for layer in CNN_LAYERS)

FINETUNE = TaskSpec(
    name="finetune",
    dataset="cifar10",
    input_shape=(32, 32, 3),
    layers=_LAYERS,
    optimizer=Adam(lr=1e-3),
    batch_size=128,
    epochs=5,
    target_accuracy=0.70,
    stages=(
        Stage(name="pretrain", classes=SOURCE_CLASSES),
        # The frozen layers are the convolutions, the ones that learnt general features;
        # training only fc1 and the fresh head is what "freeze early layers" means.
        Stage(name="finetune", classes=TARGET_CLASSES, init="previous",
              trainable=("fc1", "head"), reinit=("head",)),
        # The control: the same stage-2 budget from fresh weights, nothing frozen.
        Stage(name="scratch", classes=TARGET_CLASSES, control_for="finetune"),
    ),
    primary_stage="finetune",
)
