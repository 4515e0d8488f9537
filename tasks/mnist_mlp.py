"""The MNIST MLP task: 784 -> Dense 128 ReLU -> Dense 10, Adam 1e-3, batch 128."""

from tasks.spec import Adam, Dense, Flatten, TaskSpec

MNIST_MLP = TaskSpec(
    name="mnist-mlp",
    dataset="mnist",
    input_shape=(28, 28, 1),
    layers=(
        Flatten(name="flatten"),
        Dense(units=128, activation="relu", name="fc1"),
        Dense(units=10, name="head"),
    ),
    optimizer=Adam(lr=1e-3),
    batch_size=128,
    epochs=5,
    target_accuracy=0.97,
)
