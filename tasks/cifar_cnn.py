"""The CIFAR-10 CNN task, shaped as TensorFlow's CNN tutorial."""

from tasks.spec import Adam, Conv2D, Dense, Flatten, MaxPool2D, TaskSpec

CNN_LAYERS = (
    Conv2D(filters=32, kernel_size=3, activation="relu", name="conv1"),
    MaxPool2D(pool_size=2, name="pool1"),
    Conv2D(filters=64, kernel_size=3, activation="relu", name="conv2"),
    MaxPool2D(pool_size=2, name="pool2"),
    Conv2D(filters=64, kernel_size=3, activation="relu", name="conv3"),
    Flatten(name="flatten"),
    Dense(units=64, activation="relu", name="fc1"),
    Dense(units=10, name="head"),
)

CIFAR_CNN = TaskSpec(
    name="cifar-cnn",
    dataset="cifar10",
    input_shape=(32, 32, 3),
    layers=CNN_LAYERS,
    optimizer=Adam(lr=1e-3),
    batch_size=128,
    epochs=10,
    target_accuracy=0.70,  # the tutorial reports "over 70%" on real CIFAR-10
)
