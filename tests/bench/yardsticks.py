"""Tutorial-style training loops per framework: the yardsticks the harness's own overhead is measured against."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np

from harness.weights import initial_weights
from tasks.cifar_cnn import CIFAR_CNN
from tasks.mnist_mlp import MNIST_MLP
from tasks.spec import TaskSpec

# The yardsticks are hand-written models, not built from the spec (that is the harness's
# job); they exist only for the two benchmark tasks. Loading the canonical weights into them
# fails loudly if a spec change makes the hand-written model differ from the task's.
TASKS: dict[str, TaskSpec] = {MNIST_MLP.name: MNIST_MLP, CIFAR_CNN.name: CIFAR_CNN}
FRAMEWORKS = ("torch", "tensorflow", "jax")
TORCH_LOG_EVERY = 100  # the PyTorch tutorial reads loss.item() every 100 batches to print it
# Warm-up steps before timing: enough for every framework to trace/compile its step and
# settle its allocator; a whole warm-up epoch would double the CNN's share of the bench time.
WARMUP_STEPS = 4


@dataclass(frozen=True)
class EpochTiming:
    seconds: float
    samples: int  # counted by the framework's own loop (steps taken x batch size), not assumed


def _check_task(task_name: str) -> TaskSpec:
    if task_name not in TASKS:
        raise KeyError(f"no yardstick for task {task_name!r}; valid: {', '.join(TASKS)}")
    return TASKS[task_name]


class Yardstick:
    """Built once, warmed once, then `epoch(order)` times one steady-state epoch per call.

    Keeping the model alive between epochs lets a benchmark interleave yardstick and
    harness epochs (A B A B) without paying a rebuild and re-trace for every repeat.
    """

    framework = ""

    def __init__(self, task_name: str, x: np.ndarray, y: np.ndarray, batch_size: int, *, seed: int = 0):
        self.task_name, self.batch_size = task_name, int(batch_size)
        self.spec = _check_task(task_name)
        self.weights = initial_weights(self.spec, seed)
        self.x = np.asarray(x, np.float32)
        self.y = np.asarray(y, np.int32)
        self._setup()

    def _setup(self) -> None:
        raise NotImplementedError

    def epoch(self, order: np.ndarray) -> EpochTiming:
        raise NotImplementedError

    def warmup(self, order: np.ndarray, *, steps: int | None = WARMUP_STEPS) -> None:
        """Untimed steps (None: a whole epoch) that pay for tracing, compiling and first allocations."""
        self.epoch(order if steps is None else order[: steps * self.batch_size])


# -- PyTorch: nn.Sequential and the quickstart tutorial's loop ----------------------------

class TorchYardstick(Yardstick):
    framework = "torch"

    def _setup(self) -> None:
        import torch
        from torch import nn

        if self.task_name == MNIST_MLP.name:
            model = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 128), nn.ReLU(), nn.Linear(128, 10))
        else:
            model = nn.Sequential(
                nn.Conv2d(3, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(64, 64, 3), nn.ReLU(),
                nn.Flatten(), nn.Linear(64 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10))
        self._load(model, torch)
        # The quickstart's device line: the model on the GPU if there is one, each batch
        # moved there as the DataLoader yields it.
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        model = model.to(self.device)
        o = self.spec.optimizer
        self.model = model
        self.loss_fn = nn.CrossEntropyLoss()
        # The optimizer as a tutorial writes it: framework defaults for the implementation
        # (no fused/foreach flag), the task's hyper-parameters.
        self.optimizer = torch.optim.Adam(model.parameters(), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
        # In-memory tensors in torch's own NCHW, converted once (torchvision's ToTensor would).
        self.xt = torch.from_numpy(np.ascontiguousarray(self.x.transpose(0, 3, 1, 2)))
        self.yt = torch.from_numpy(self.y.astype(np.int64))
        self._torch = torch

    def _load(self, model, torch) -> None:
        """Canonical weights: conv HWIO -> OIHW, dense (in, out) -> (out, in), and the first
        dense after a spatial Flatten takes its rows in NCHW-flattening order."""
        layers = [m for m in model if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
        shapes = self.spec.layer_shapes()
        flat_hwc = next((shapes[i - 1] for i, layer in enumerate(self.spec.layers)
                         if layer.kind == "flatten" and i > 0 and len(shapes[i - 1]) == 3), None)
        first_dense = True
        with torch.no_grad():
            for i, layer in enumerate(layers):
                kernel, bias = self.weights[2 * i], self.weights[2 * i + 1]
                if isinstance(layer, torch.nn.Conv2d):
                    kernel = kernel.transpose(3, 2, 0, 1)
                else:
                    if first_dense and flat_hwc is not None:
                        h, w, c = flat_hwc
                        kernel = kernel[np.arange(h * w * c).reshape(h, w, c).transpose(2, 0, 1).ravel()]
                    first_dense = False
                    kernel = kernel.T
                layer.weight.copy_(torch.from_numpy(np.ascontiguousarray(kernel)))
                layer.bias.copy_(torch.from_numpy(bias))

    def epoch(self, order: np.ndarray) -> EpochTiming:
        torch = self._torch
        model, loss_fn, optimizer = self.model, self.loss_fn, self.optimizer
        batches = torch.from_numpy(np.asarray(order, np.int64)).split(self.batch_size)
        t0 = time.perf_counter()
        model.train()
        steps = 0
        for batch, idx in enumerate(batches):
            X, y = self.xt[idx].to(self.device), self.yt[idx].to(self.device)
            pred = model(X)
            loss = loss_fn(pred, y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if batch % TORCH_LOG_EVERY == 0:
                loss = loss.item()
            steps += 1
        # On CPU the loop is already synchronous; on CUDA the clock waits for the device.
        if self.device == "cuda":
            torch.cuda.synchronize()
        return EpochTiming(time.perf_counter() - t0, steps * self.batch_size)


# -- Keras: Sequential, compile, fit -------------------------------------------------------

class KerasYardstick(Yardstick):
    framework = "tensorflow"

    def _setup(self) -> None:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        os.environ.setdefault("KERAS_BACKEND", "tensorflow")
        import keras
        from keras import layers

        if keras.backend.backend() != "tensorflow":
            raise RuntimeError(f"keras runs on {keras.backend.backend()!r}; the yardstick needs tensorflow")
        if self.task_name == MNIST_MLP.name:
            model = keras.Sequential([keras.Input(shape=(28, 28, 1)), layers.Flatten(),
                                      layers.Dense(128, activation="relu"), layers.Dense(10)])
        else:  # TensorFlow's CNN tutorial, layer for layer
            model = keras.Sequential([
                keras.Input(shape=(32, 32, 3)),
                layers.Conv2D(32, (3, 3), activation="relu"), layers.MaxPooling2D((2, 2)),
                layers.Conv2D(64, (3, 3), activation="relu"), layers.MaxPooling2D((2, 2)),
                layers.Conv2D(64, (3, 3), activation="relu"),
                layers.Flatten(), layers.Dense(64, activation="relu"), layers.Dense(10)])
        model.set_weights(self.weights)  # canonical layout is Keras's own
        o = self.spec.optimizer
        # No metrics: the harness's train_epoch computes none, so neither side pays for one.
        model.compile(optimizer=keras.optimizers.Adam(learning_rate=o.lr, beta_1=o.beta1, beta_2=o.beta2,
                                                      epsilon=o.eps),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        self.model = model

    def epoch(self, order: np.ndarray) -> EpochTiming:
        # The harness's batch order applied up front, so fit(shuffle=False) sees the same
        # batches; the gather is data preparation, outside the clock.
        x, y = self.x[order], self.y[order]
        before = int(self.model.optimizer.iterations.numpy())
        t0 = time.perf_counter()
        self.model.fit(x, y, batch_size=self.batch_size, epochs=1, shuffle=False, verbose=0)
        seconds = time.perf_counter() - t0  # fit returns after its last step's logs are read
        steps = int(self.model.optimizer.iterations.numpy()) - before
        return EpochTiming(seconds, steps * self.batch_size)


# -- flax + optax: linen Module, TrainState, a jitted step per batch ----------------------

class FlaxYardstick(Yardstick):
    framework = "jax"

    def _setup(self) -> None:
        import flax.linen as nn
        import jax
        import optax
        from flax.training import train_state

        class MLP(nn.Module):
            @nn.compact
            def __call__(self, x):
                x = x.reshape((x.shape[0], -1))
                x = nn.relu(nn.Dense(128, name="fc1")(x))
                return nn.Dense(10, name="head")(x)

        class CNN(nn.Module):
            @nn.compact
            def __call__(self, x):
                x = nn.relu(nn.Conv(32, (3, 3), padding="VALID", name="conv1")(x))
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
                x = nn.relu(nn.Conv(64, (3, 3), padding="VALID", name="conv2")(x))
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
                x = nn.relu(nn.Conv(64, (3, 3), padding="VALID", name="conv3")(x))
                x = x.reshape((x.shape[0], -1))
                x = nn.relu(nn.Dense(64, name="fc1")(x))
                return nn.Dense(10, name="head")(x)

        module = MLP() if self.task_name == MNIST_MLP.name else CNN()
        # Canonical layout is flax's own (Dense (in, out), Conv HWIO, NHWC flattening).
        params = {name: {"kernel": jax.numpy.asarray(self.weights[2 * i]),
                         "bias": jax.numpy.asarray(self.weights[2 * i + 1])}
                  for i, name in enumerate(self.spec.param_layer_names())}
        o = self.spec.optimizer
        tx = optax.adam(learning_rate=o.lr, b1=o.beta1, b2=o.beta2, eps=o.eps)
        self.state = train_state.TrainState.create(apply_fn=module.apply, params=params, tx=tx)

        @jax.jit
        def train_step(state, images, labels):
            def loss_fn(params):
                logits = state.apply_fn({"params": params}, images)
                return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

            loss, grads = jax.value_and_grad(loss_fn)(state.params)
            return state.apply_gradients(grads=grads), loss

        self.train_step = train_step
        self._jax = jax

    def epoch(self, order: np.ndarray) -> EpochTiming:
        jax = self._jax
        perms = np.asarray(order).reshape(-1, self.batch_size)
        before = int(self.state.step)
        t0 = time.perf_counter()
        state, epoch_loss = self.state, []
        for perm in perms:  # host numpy batches, as flax's examples/mnist feeds them
            state, loss = self.train_step(state, self.x[perm, ...], self.y[perm, ...])
            epoch_loss.append(loss)
        jax.block_until_ready(state)
        float(np.mean(jax.device_get(epoch_loss)))  # the example's end-of-epoch loss read
        seconds = time.perf_counter() - t0
        self.state = state
        return EpochTiming(seconds, (int(state.step) - before) * self.batch_size)


YARDSTICKS: dict[str, type[Yardstick]] = {c.framework: c for c in (TorchYardstick, KerasYardstick, FlaxYardstick)}


def make_yardstick(framework: str, task_name: str, x: np.ndarray, y: np.ndarray, batch_size: int, *,
                   seed: int = 0) -> Yardstick:
    try:
        cls = YARDSTICKS[framework]
    except KeyError:
        raise KeyError(f"no yardstick for framework {framework!r}; valid: {', '.join(YARDSTICKS)}") from None
    return cls(task_name, x, y, batch_size, seed=seed)


def _one_epoch(framework: str, task_name, x, y, order, batch_size) -> float:
    stick = make_yardstick(framework, task_name, x, y, batch_size)
    stick.warmup(order, steps=None)
    return stick.epoch(order).seconds


def yardstick_torch(task_name: str, x: np.ndarray, y: np.ndarray, order: np.ndarray, batch_size: int) -> float:
    """Seconds for one steady-state epoch of the PyTorch tutorial loop (after an untimed warm-up epoch)."""
    return _one_epoch("torch", task_name, x, y, order, batch_size)


def yardstick_tensorflow(task_name: str, x: np.ndarray, y: np.ndarray, order: np.ndarray,
                         batch_size: int) -> float:
    """Seconds for one steady-state Keras model.fit epoch (after an untimed warm-up epoch)."""
    return _one_epoch("tensorflow", task_name, x, y, order, batch_size)


def yardstick_jax(task_name: str, x: np.ndarray, y: np.ndarray, order: np.ndarray, batch_size: int) -> float:
    """Seconds for one steady-state epoch of the flax/optax jitted-step loop (after an untimed warm-up epoch)."""
    return _one_epoch("jax", task_name, x, y, order, batch_size)
