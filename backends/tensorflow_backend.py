"""TensorFlow adapter: keras_common's Keras 3 model and optimizers in tf.function (XLA), on a device or replicas."""

from __future__ import annotations

import functools
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from backends import keras_common
from backends.base import Backend, BackendUnavailable, InferencePath, ModelHandle
from backends.keras_common import OptimizerState
from tasks.spec import TaskSpec

log = logging.getLogger(__name__)


def _import_tf():
    """Import tensorflow and keras with the environment pinned first (no work at module import)."""
    # Must precede the first tensorflow import to have any effect: quiet C++ logs, and no
    # grabbing of (almost) all GPU memory at start-up, which would falsify device peaks.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ["TF_FORCE_GPU_ALLOW_GROWTH"] = "true"
    if "keras" not in sys.modules:  # once keras is imported its backend is fixed; checked below
        os.environ["KERAS_BACKEND"] = "tensorflow"
    try:
        import keras
        import tensorflow as tf
    except ImportError as exc:
        raise BackendUnavailable(f"tensorflow/keras not importable: {exc}") from None
    if keras.backend.backend() != "tensorflow":
        raise BackendUnavailable(f"keras was already imported with backend {keras.backend.backend()!r}; "
                                 "the tensorflow adapter needs KERAS_BACKEND=tensorflow")
    return tf, keras


@functools.cache
def _mirrored_strategy(devices: tuple[str, ...]):
    """One MirroredStrategy per process and device set. Each strategy numbers its collective
    all-reduces from the same start, and the runtime remembers an instance's shape: a second
    strategy in the process (a second configure) fails with "Shape mismatch in the collective
    instance 100" on its first all-reduce of a different model."""
    return sys.modules["tensorflow"].distribute.MirroredStrategy(list(devices))


@dataclass
class _Model(ModelHandle):
    """Everything one built model needs beyond the handle: the Keras model, optimizer state, traced functions."""

    keras_model: Any
    variables: list  # one per canonical array, spec order
    optimizer: OptimizerState  # its variables: tf.Variables under the model's device or strategy
    fns: dict = field(default_factory=dict)  # traced tf.functions keyed by (kind, batch_size)


class TensorFlowBackend(Backend):
    name = "tensorflow"
    EXECUTIONS = {"eager": "tf.function step", "compiled": "tf.function+XLA step"}

    def __init__(self):
        self._tf = None
        self._keras = None
        self._device = None  # "cpu" | "gpu"
        self._device_name = None  # "/CPU:0" | "/GPU:0"
        self._threads = None
        self._precision = None
        self._float = None  # tf.float32, or tf.float64 under fp64: features, losses, logits, lr
        self._strategy = None  # MirroredStrategy over the replica devices, when replicas.count > 1
        self._replica_devices = None  # their names, e.g. ["/device:CPU:0", "/device:CPU:1"]

    # -- set-up --------------------------------------------------------------------------

    # The Keras layers, activations and optimizers are keras.ops code any Keras 3 backend can run.
    LAYERS = keras_common.LAYERS
    ACTIVATIONS = keras_common.ACTIVATIONS
    OPTIMIZERS = keras_common.OPTIMIZERS

    def import_framework(self) -> None:
        _import_tf()

    def _configure(self, *, device: str, threads: int, precision: str) -> None:
        tf, keras = _import_tf()
        self._tf, self._keras = tf, keras
        gpus = tf.config.list_physical_devices("GPU")
        if device == "gpu" and not gpus:
            raise BackendUnavailable("device 'gpu' asked for, but tensorflow sees no GPU "
                                     f"(tensorflow {tf.__version__}, built with CUDA: "
                                     f"{tf.test.is_built_with_cuda()})")
        self._device = "gpu" if (device == "gpu" or (device == "auto" and gpus)) else "cpu"
        self._device_name = "/GPU:0" if self._device == "gpu" else "/CPU:0"
        self._set_threads(tf, threads)
        self._strategy = self._replica_devices = None
        if self.replicas.count > 1:
            self._replica_devices = self._make_replica_devices(tf, self.replicas.count)
            self._strategy = _mirrored_strategy(tuple(self._replica_devices))
        # TF32 is on by default in TF on Ampere+; the spec pins one precision per run.
        tf.config.experimental.enable_tensor_float_32_execution(precision == "tf32")
        # Layers compute in bf16 with float32 variables; the loss casts logits to float32 (float64 under fp64).
        policy = {"bf16": "mixed_bfloat16", "fp64": "float64"}.get(precision, "float32")
        keras.mixed_precision.set_global_policy(policy)
        # Keras's default float for what it makes from Python numbers; keras_common's attention reads it too.
        keras.config.set_floatx("float64" if precision == "fp64" else "float32")
        self._float = tf.float64 if precision == "fp64" else tf.float32
        self._precision = precision

    def _set_threads(self, tf, threads: int) -> None:
        # Thread pools can only be set before the TF runtime starts; a second configure in
        # the same process (tests) keeps the pools it has and says so.
        try:
            tf.config.threading.set_intra_op_parallelism_threads(int(threads))
            tf.config.threading.set_inter_op_parallelism_threads(1)
        except RuntimeError:
            current = tf.config.threading.get_intra_op_parallelism_threads()
            if current != threads:
                log.warning("tensorflow runtime already started with %s intra-op threads; %s asked for "
                            "cannot be applied in this process", current, threads)
        self._threads = tf.config.threading.get_intra_op_parallelism_threads() or int(threads)

    def _make_replica_devices(self, tf, count: int) -> list[str]:
        """The devices of `count` replicas: the first `count` GPUs, or the CPU split into `count` logical CPUs."""
        if self._device == "gpu":
            gpus = tf.config.list_physical_devices("GPU")
            if len(gpus) < count:
                raise BackendUnavailable(f"{count} data-parallel replicas asked for on GPUs, but tensorflow "
                                         f"sees {len(gpus)} GPU(s)")
            return [d.name for d in tf.config.list_logical_devices("GPU")[:count]]
        cpu = tf.config.list_physical_devices("CPU")[0]
        try:
            # The logical CPUs share the process's one intra-op thread pool: on a CPU,
            # replicas test the data-parallel arithmetic, not a speed-up.
            tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * count)
        except RuntimeError:
            # The runtime has started (TF was used earlier in this process) and its CPU
            # devices are fixed: a split made by an earlier configure serves, nothing else can.
            made = len(tf.config.get_logical_device_configuration(cpu) or ())
            if made < count:
                raise BackendUnavailable(
                    f"{count} data-parallel replicas need {count} logical CPU devices, made before the "
                    f"tensorflow runtime starts; it has already started here with {max(made, 1)} CPU "
                    "device(s). Configure replicas in a fresh process, before any other tensorflow use."
                ) from None
        return [d.name for d in tf.config.list_logical_devices("CPU")[:count]]

    def _environment(self) -> dict:
        tf = self._tf
        device_name = "cpu"
        if self._device == "gpu":
            details = tf.config.experimental.get_device_details(tf.config.list_physical_devices("GPU")[0])
            device_name = details.get("device_name", "unknown gpu")
        env = {
            "framework": "tensorflow",
            "framework_version": f"{tf.__version__} (keras {self._keras.__version__})",
            "device": self._device,
            "device_name": device_name,
            "threads": self._threads,
            "precision": self._precision,
        }
        if self._strategy is not None:  # absent with one device, as for the other adapters
            env["replica_devices"] = list(self._strategy.extended.worker_devices)
        return env

    def _synchronize(self) -> None:
        tf = self._tf
        # Results are read with .numpy(), which already waits; this makes explicit timing
        # around un-fetched work honest too.
        if self._device == "gpu":
            tf.test.experimental.sync_devices()

    def _memory(self) -> dict:
        tf = self._tf

        def peak_mb(device):
            # A CPU device answers {"current": 0, "peak": 0}: it keeps no statistics, which is None, not 0.
            return tf.config.experimental.get_memory_info(device)["peak"] / 2**20 if self._device == "gpu" else None

        # device_peak_mb is the first device's: it holds the data and runs evaluation, as the one device does.
        out = {"device_peak_mb": peak_mb("GPU:0")}
        if self._replica_devices:
            out["replica_peak_mb"] = [peak_mb(d.rsplit("device:", 1)[-1]) for d in self._replica_devices]
        return out

    # -- model ---------------------------------------------------------------------------

    def _put_data(self, x: np.ndarray, y: np.ndarray) -> Any:
        tf = self._tf
        with tf.device(self._device_name):
            return tf.constant(x), tf.constant(y)

    def _build(self, spec: TaskSpec, weights: list[np.ndarray], *,
               trainable: tuple[str, ...] | None, mode: str) -> Any:
        tf, keras = self._tf, self._keras
        if self._strategy is not None and mode == "compiled" and self._device == "cpu" and any(
                layer.kind == "batchnorm" and (trainable is None or layer.name in trainable)
                for layer, _, _ in spec.walk()):
            # A training BatchNorm all-reduces its batch statistics inside the forward and
            # backward pass, so that sync point lands inside the per-replica XLA function.
            # MirroredStrategy on CPUs can only all-reduce through merge_call, which a nested
            # (jit_compile) tf.function cannot hold: tracing fails with "`merge_call` called
            # while defining a new graph or a tf.function". One XLA function around
            # strategy.run fails too, as an XLA cluster lives on one device: "Trying to access
            # resource dense/kernel/replica_1 located in device CPU:1 from device CPU:0".
            # On GPUs MirroredStrategy skips merge_call inside XLA (its _use_merge_call), so
            # this refusal is for CPUs only; the GPU path has not been run here.
            raise BackendUnavailable("tensorflow: compiled mode cannot train BatchNorm with synchronized "
                                     f"statistics over {self.replicas.count} CPU replicas (XLA cannot hold "
                                     "MirroredStrategy's CPU all-reduce); use mode 'eager'")
        # Under the strategy's scope every variable (weights, running statistics, optimizer
        # state) is a MirroredVariable: one copy per replica device, kept identical.
        scope = self._strategy.scope() if self._strategy is not None else tf.device(self._device_name)
        with scope:
            # Language models take any length up to the context (logits of a shorter window); the
            # training and evaluation functions still trace the full context, a static shape.
            shape = (None,) if spec.any_length else tuple(spec.input_shape)
            inputs = keras.Input(shape=shape, dtype="int32" if spec.takes_tokens else self._float.name)
            # Keras normalises by each replica's own batch statistics unless told to synchronise them.
            graph = keras_common.Graph(synchronized_batchnorm=self._strategy is not None)
            model = keras.Model(inputs, graph.apply(spec.layers, inputs), name=spec.name)
            by_layer = {}
            for layer in spec.param_layer_names():
                keras_layer = model.get_layer(layer)
                # A frozen Keras BatchNorm runs in inference mode: the spec's rule.
                keras_layer.trainable = trainable is None or layer in trainable
                by_layer[layer] = list(keras_layer.weights)
            variables = [by_layer[e.layer].pop(0) for e in spec.params()]
            train_vars = [v.value for e, v in zip(spec.params(), variables)
                          if spec.trains(e, trainable)]
            slots = [[tf.Variable(tf.zeros_like(p), trainable=False)
                      for _ in range(keras_common.slot_count(spec.optimizer))] for p in train_vars]
            optimizer = OptimizerState(
                variables=train_vars, slots=slots,
                decays=[spec.decays(e) for e in spec.params() if spec.trains(e, trainable)],
                step=tf.Variable(0, dtype=tf.int64, trainable=False, name="step"),
                lr_table=tf.constant(spec.optimizer.lr_table(), self._float))
        handle = _Model(spec=spec, trainable_layers=trainable, mode=mode, keras_model=model, variables=variables,
                        optimizer=optimizer)
        self._set_weights(handle, weights)
        return handle

    def _get_weights(self, model: _Model) -> list[np.ndarray]:
        return [np.array(v.value.numpy(), dtype=self.float_dtype, copy=True) for v in model.variables]

    def _set_weights(self, model: _Model, weights: list[np.ndarray]) -> None:
        for var, w, entry in zip(model.variables, weights, model.spec.params()):
            if tuple(var.shape) != entry.param.shape:  # a Keras layout change would land here, not silently
                raise ValueError(f"{var.path}: Keras shape {tuple(var.shape)}, canonical {entry.param.shape}")
            var.value.assign(w)  # every kind's Keras layout is the canonical one
        keras_common.reset(model.optimizer)  # by assignments: the traced functions keep their variables

    # -- traced functions ----------------------------------------------------------------

    def _loss_terms(self, model: _Model, xb, yb, training: bool):
        tf = self._tf
        logits = tf.cast(model.keras_model(xb, training=training), self._float)
        losses = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=yb, logits=logits)
        return logits, losses

    def _update(self, model: _Model, grads) -> None:
        """One optimizer step on the trainable variables, in tasks/optim.py's pinned forms."""
        # An Embedding's gradient arrives as IndexedSlices, TensorFlow's own type; the pinned optimizers
        # update every row (Adam's moments decay everywhere), as torch's dense gradient and optax do.
        keras_common.update(model.spec.optimizer, model.optimizer, [self._tf.convert_to_tensor(g) for g in grads])

    def _step_fn(self, model: _Model):
        tf = self._tf

        def step(xb, yb):
            # Only the trainable layers' variables are watched, so the backward pass stops
            # at the first of them: frozen convolutions cost no gradient work.
            with tf.GradientTape(watch_accessed_variables=False) as tape:
                tape.watch(model.optimizer.variables)
                _, losses = self._loss_terms(model, xb, yb, training=True)
                loss = tf.reduce_mean(losses)
            self._update(model, tape.gradient(loss, model.optimizer.variables))
            return loss

        # Compiled mode compiles the step, not the epoch loop: XLA needs static shapes, and
        # the batch has them while the epoch length does not, so one compile serves every
        # epoch length (the warm-up's one step included) and every dataset size.
        return tf.function(step, jit_compile=model.mode == "compiled")

    def _replicated_step_fn(self, model: _Model, batch_size: int):
        """One step on the global batch with the strategy's replicas: replica r takes the r-th slice."""
        tf = self._tf
        strategy = self._strategy
        per_replica = batch_size // strategy.num_replicas_in_sync
        # Each replica's loss is the sum over its slice divided by the global batch's count of
        # positions (tf.nn.compute_average_loss's rule, per position for per-position labels):
        # summed over replicas, loss and gradient are the global mean one device computes.
        global_positions = float(batch_size * int(np.prod(model.spec.layer_shapes()[-1][:-1], dtype=np.int64)))

        def loss_and_grads(xb, yb):
            with tf.GradientTape(watch_accessed_variables=False) as tape:
                tape.watch(model.optimizer.variables)  # in replica context: this replica's copies
                _, losses = self._loss_terms(model, xb, yb, training=True)
                loss = tf.reduce_sum(losses) / global_positions
            # Dense before the all-reduce, as _update wants them (an Embedding's gradient is
            # IndexedSlices): then loss and gradients all-reduce as one batch of tensors.
            return loss, [tf.convert_to_tensor(g) for g in tape.gradient(loss, model.optimizer.variables)]

        update = functools.partial(self._update, model)
        if model.mode == "compiled":
            # XLA compiles each replica's forward/backward and its update (traced once per
            # device); the all-reduce between them stays outside, as on CPUs MirroredStrategy
            # can only all-reduce through merge_call, which a nested tf.function cannot hold.
            loss_and_grads = tf.function(loss_and_grads, jit_compile=True)
            update = tf.function(update, jit_compile=True)

        def replica_step(xb, yb):
            loss, grads = loss_and_grads(xb, yb)
            # The strategy's own collective sums loss and gradients over the replicas; every
            # replica then applies the same update to its own copies (the variables'
            # aggregation is NONE, so each assign stays local), which keeps them identical:
            # the same ops on the same values. Clipping sees the summed gradient.
            loss, grads = tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, (loss, grads))
            update(grads)
            return loss

        def split(t):
            # Sliced where the global batch lies, so each replica device receives only its slice.
            return strategy.experimental_distribute_values_from_function(
                lambda ctx: t[ctx.replica_id_in_sync_group * per_replica:
                              (ctx.replica_id_in_sync_group + 1) * per_replica])

        def step(xb, yb):
            loss = strategy.run(replica_step, args=(split(xb), split(yb)))
            return strategy.experimental_local_results(loss)[0]  # all-reduced: the same on every replica

        return step

    def _signatures(self, model: _Model):
        """TensorSpecs of x and y: float features or int32 ids; one label per sample or per position."""
        tf = self._tf
        spec = model.spec
        x_dtype = tf.int32 if spec.takes_tokens else self._float
        return (tf.TensorSpec((None, *spec.input_shape), x_dtype),
                tf.TensorSpec((None, *spec.layer_shapes()[-1][:-1]), tf.int32))

    def _epoch_fn(self, model: _Model, batch_size: int):
        key = ("epoch", batch_size)
        if key in model.fns:
            return model.fns[key]
        tf = self._tf
        step = self._step_fn(model) if self._strategy is None else self._replicated_step_fn(model, batch_size)

        @tf.function(input_signature=[*self._signatures(model), tf.TensorSpec([None], tf.int32)])
        def epoch(x, y, order):
            steps = tf.shape(order)[0] // batch_size
            losses = tf.TensorArray(self._float, size=steps)
            for i in tf.range(steps):
                idx = tf.slice(order, [i * batch_size], [batch_size])  # static batch shape
                losses = losses.write(i, step(tf.gather(x, idx), tf.gather(y, idx)))
            return losses.stack()

        model.fns[key] = epoch
        return epoch

    def _eval_fn(self, model: _Model, batch_size: int):
        key = ("eval", batch_size)
        if key in model.fns:
            return model.fns[key]
        tf = self._tf

        def batch_sums(xb, yb):
            logits, losses = self._loss_terms(model, xb, yb, training=False)
            correct = tf.cast(tf.equal(tf.argmax(logits, axis=-1, output_type=tf.int32), yb), self._float)
            return tf.reduce_sum(losses), tf.reduce_sum(correct)

        # XLA compiles once per batch shape: the full batch and the last partial one.
        batch_sums = tf.function(batch_sums, jit_compile=model.mode == "compiled")

        @tf.function(input_signature=list(self._signatures(model)))
        def evaluate(x, y):
            n = tf.shape(y)[0]
            loss_sum, correct = tf.constant(0.0, self._float), tf.constant(0.0, self._float)
            for start in tf.range(0, n, batch_size):
                stop = tf.minimum(start + batch_size, n)
                b_loss, b_correct = batch_sums(x[start:stop], y[start:stop])
                loss_sum += b_loss
                correct += b_correct
            count = tf.cast(tf.size(y), self._float)  # every position of every sample
            return tf.stack([loss_sum / count, correct / count])

        model.fns[key] = evaluate
        return evaluate

    def _logits_fn(self, model: _Model):
        if "logits" not in model.fns:
            tf = self._tf
            x_spec = self._signatures(model)[0]
            if model.spec.any_length:  # any window length up to the context
                x_spec = tf.TensorSpec((None, None), x_spec.dtype)
            model.fns["logits"] = tf.function(
                lambda x: tf.cast(model.keras_model(x, training=False), self._float),
                input_signature=[x_spec],
                jit_compile=model.mode == "compiled")
        return model.fns["logits"]

    # -- primitive steps the harness loop calls -----------------------------------------

    def _train_epoch(self, model: _Model, data: Any, order: np.ndarray, batch_size: int) -> np.ndarray:
        tf = self._tf
        x, y = data
        with tf.device(self._device_name):
            order_t = tf.constant(order.astype(np.int32, copy=False))  # one upload per epoch
            losses = self._epoch_fn(model, int(batch_size))(x, y, order_t)
        return losses.numpy().astype(self.float_dtype, copy=False)  # the one host read

    def _evaluate(self, model: _Model, data: Any, batch_size: int) -> tuple[float, float]:
        tf = self._tf
        x, y = data
        # With replicas too, evaluation (and logits) runs once, outside strategy.run, on the
        # first replica's device, which holds the data: there a MirroredVariable reads that
        # device's copy, bit-equal to the others, so the figures are one device's.
        with tf.device(self._device_name):
            loss, acc = self._eval_fn(model, int(batch_size))(x, y).numpy()
        return float(loss), float(acc)

    def _logits(self, model: _Model, x: np.ndarray) -> np.ndarray:
        tf = self._tf
        with tf.device(self._device_name):
            out = self._logits_fn(model)(tf.constant(x))
        return out.numpy().astype(self.float_dtype, copy=False)

    def _export(self, model: _Model, fmt: str, folder):
        from backends.tensorflow_export import export

        return export(self, model, fmt, folder=folder)

    def _generator(self, model: _Model, *, batch: int, prompt_len: int, new_tokens: int):
        from backends.tensorflow_generate import generator

        return generator(self, model, batch=batch, prompt_len=prompt_len, new_tokens=new_tokens)

    def _inference(self, model: _Model) -> InferencePath:
        fn = self._logits_fn(model)

        def run(x):
            return self._served(fn, x)

        name = "tf.function" + (" (jit_compile=True, XLA)" if model.mode == "compiled" else " (graph, no XLA)")
        return InferencePath(put=self._device_input, run=run, name=name)

    def _device_input(self, x: np.ndarray):
        """A host array placed on the model's device, the copy finished (serving's inputs)."""
        tf = self._tf
        with tf.device(self._device_name):
            t = tf.identity(tf.constant(x))  # constant() may alias host memory; identity places it
        self._synchronize()
        return t

    def _served(self, fn, *args):
        """fn(*args) on the model's device, returned once its results are ready (serving's calls)."""
        with self._tf.device(self._device_name):
            out = fn(*args)
        self._synchronize()
        return out

    def trace_counts(self, model: _Model) -> dict[str, int]:
        """How often each traced function has been traced (tests check nothing retraces)."""
        return {f"{k[0]}:{k[1]}" if isinstance(k, tuple) else k: fn.experimental_get_tracing_count()
                for k, fn in model.fns.items()}
