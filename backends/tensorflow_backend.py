"""TensorFlow/Keras 3 adapter: a Keras model from the spec, paper-form Adam, whole epochs in tf.function."""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from backends.base import Backend, BackendUnavailable, check_build, check_options
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


@dataclass
class _Model:
    """Everything one built model needs: the Keras model, optimizer state, traced functions."""

    spec: TaskSpec
    keras_model: Any
    param_layers: list  # Keras layers holding parameters, spec order
    train_vars: list  # tf.Variables updated by Adam (the trainable layers' kernel, bias)
    m: list
    v: list
    step: Any  # tf.Variable int64: Adam's t
    mode: str
    fns: dict = field(default_factory=dict)  # traced tf.functions keyed by (kind, batch_size)


class TensorFlowBackend(Backend):
    name = "tensorflow"

    def __init__(self):
        self._tf = None
        self._keras = None
        self._device = None  # "cpu" | "gpu"
        self._device_name = None  # "/CPU:0" | "/GPU:0"
        self._threads = None
        self._precision = None

    # -- set-up --------------------------------------------------------------------------

    def configure(self, *, device: str, threads: int, precision: str) -> None:
        check_options(device=device, precision=precision)
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
        # TF32 is on by default in TF on Ampere+; the spec pins one precision per run.
        tf.config.experimental.enable_tensor_float_32_execution(precision == "tf32")
        # Layers compute in bf16 with float32 variables; the loss casts logits to float32.
        keras.mixed_precision.set_global_policy("mixed_bfloat16" if precision == "bf16" else "float32")
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

    def _require_configured(self):
        if self._tf is None:
            raise RuntimeError("TensorFlowBackend.configure() must be called first")
        return self._tf

    def environment(self) -> dict:
        tf = self._require_configured()
        device_name = "cpu"
        if self._device == "gpu":
            details = tf.config.experimental.get_device_details(tf.config.list_physical_devices("GPU")[0])
            device_name = details.get("device_name", "unknown gpu")
        return {
            "framework": "tensorflow",
            "framework_version": f"{tf.__version__} (keras {self._keras.__version__})",
            "device": self._device,
            "device_name": device_name,
            "threads": self._threads,
            "precision": self._precision,
        }

    def devices(self) -> list[str]:
        tf = self._require_configured()
        return ["cpu"] + (["gpu"] if tf.config.list_physical_devices("GPU") else [])

    def synchronize(self) -> None:
        tf = self._require_configured()
        # Results are read with .numpy(), which already waits; this makes explicit timing
        # around un-fetched work honest too.
        if self._device == "gpu":
            tf.test.experimental.sync_devices()

    def memory(self) -> dict:
        tf = self._require_configured()
        if self._device != "gpu":
            return {"device_peak_mb": None}
        return {"device_peak_mb": tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2**20}

    # -- model ---------------------------------------------------------------------------

    def put_data(self, x: np.ndarray, y: np.ndarray) -> Any:
        tf = self._require_configured()
        with tf.device(self._device_name):
            return (tf.constant(np.asarray(x, np.float32)), tf.constant(np.asarray(y, np.int32)))

    def _layer(self, layer):
        keras = self._keras
        # Zero initialisers: Keras's own draws would be thrown away by the load below; the
        # canonical weights always decide.
        init = {"kernel_initializer": "zeros", "bias_initializer": "zeros"}
        make = {
            "dense": lambda s: keras.layers.Dense(s.units, activation=s.activation, name=s.name, **init),
            "conv2d": lambda s: keras.layers.Conv2D(s.filters, s.kernel_size, padding=s.padding,
                                                    activation=s.activation, data_format="channels_last",
                                                    name=s.name, **init),
            "maxpool2d": lambda s: keras.layers.MaxPooling2D(s.pool_size, data_format="channels_last",
                                                             name=s.name),
            "flatten": lambda s: keras.layers.Flatten(data_format="channels_last", name=s.name),
        }
        try:
            return make[layer.kind](layer)
        except KeyError:
            raise ValueError(f"layer {layer.name!r}: kind {layer.kind!r} has no tensorflow mapping") from None

    def build(self, spec: TaskSpec, weights: list[np.ndarray], *,
              trainable: tuple[str, ...] | None, mode: str) -> Any:
        tf = self._require_configured()
        keras = self._keras
        param_names = check_build(spec, trainable=trainable, mode=mode)
        with tf.device(self._device_name):
            layers = [self._layer(layer) for layer in spec.layers]
            model = keras.Sequential([keras.Input(shape=tuple(spec.input_shape)), *layers], name=spec.name)
            param_layers = [model.get_layer(n) for n in param_names]
            for layer in param_layers:
                layer.trainable = trainable is None or layer.name in trainable
            train_vars = [v.value for layer in param_layers if layer.trainable
                          for v in (layer.kernel, layer.bias)]
            m = [tf.Variable(tf.zeros_like(p), trainable=False, name="adam_m") for p in train_vars]
            v = [tf.Variable(tf.zeros_like(p), trainable=False, name="adam_v") for p in train_vars]
            step = tf.Variable(0, dtype=tf.int64, trainable=False, name="adam_t")
        handle = _Model(spec=spec, keras_model=model, param_layers=param_layers, train_vars=train_vars,
                        m=m, v=v, step=step, mode=mode)
        self.set_weights(handle, weights)
        return handle

    def get_weights(self, model: _Model) -> list[np.ndarray]:
        return [np.array(v.value.numpy(), dtype=np.float32, copy=True)
                for layer in model.param_layers for v in (layer.kernel, layer.bias)]

    def set_weights(self, model: _Model, weights: list[np.ndarray]) -> None:
        shapes = [s for _, k, b in model.spec.param_shapes() for s in (k, b)]
        if len(weights) != len(shapes):
            raise ValueError(f"{len(weights)} arrays given, task {model.spec.name!r} needs {len(shapes)}")
        variables = [v for layer in model.param_layers for v in (layer.kernel, layer.bias)]
        for var, w, shape in zip(variables, weights, shapes):
            w = np.asarray(w, np.float32)
            if w.shape != tuple(shape):
                raise ValueError(f"{var.path}: shape {w.shape}, expected {tuple(shape)}")
            var.value.assign(w)  # canonical layout is Keras's own: Dense (in, out), Conv2D HWIO
        # Fresh optimizer state through assignments: the traced functions capture these
        # variables, so nothing retraces.
        for slot in (*model.m, *model.v):
            slot.assign(self._tf.zeros_like(slot))
        model.step.assign(0)

    # -- traced functions ----------------------------------------------------------------

    def _loss_terms(self, model: _Model, xb, yb, training: bool):
        tf = self._tf
        logits = tf.cast(model.keras_model(xb, training=training), tf.float32)
        losses = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=yb, logits=logits)
        return logits, losses

    def _step_fn(self, model: _Model):
        tf = self._tf
        opt = model.spec.optimizer
        lr, b1, b2, eps = (tf.constant(c, tf.float32) for c in (opt.lr, opt.beta1, opt.beta2, opt.eps))

        def step(xb, yb):
            # Only the trainable layers' variables are watched, so the backward pass stops
            # at the first of them: frozen convolutions cost no gradient work.
            with tf.GradientTape(watch_accessed_variables=False) as tape:
                tape.watch(model.train_vars)
                _, losses = self._loss_terms(model, xb, yb, training=True)
                loss = tf.reduce_mean(losses)
            grads = tape.gradient(loss, model.train_vars)
            t = tf.cast(model.step.assign_add(1), tf.float32)
            bc1, bc2 = 1.0 - tf.pow(b1, t), 1.0 - tf.pow(b2, t)
            # The paper's Algorithm 1, as torch and optax: eps added to sqrt(v_hat). Stock
            # Keras Adam adds it to sqrt(v) before bias correction ("epsilon hat").
            for p, g, m, v in zip(model.train_vars, grads, model.m, model.v):
                m_new = m.assign(b1 * m + (1.0 - b1) * g)
                v_new = v.assign(b2 * v + (1.0 - b2) * tf.square(g))
                p.assign_sub(lr * (m_new / bc1) / (tf.sqrt(v_new / bc2) + eps))
            return loss

        # Compiled mode compiles the step, not the epoch loop: XLA needs static shapes, and
        # the batch has them while the epoch length does not, so one compile serves every
        # epoch length (warm-up's two steps included) and every dataset size.
        return tf.function(step, jit_compile=model.mode == "compiled")

    def _epoch_fn(self, model: _Model, batch_size: int):
        key = ("epoch", batch_size)
        if key in model.fns:
            return model.fns[key]
        tf = self._tf
        step = self._step_fn(model)
        shape = (None, *model.spec.input_shape)

        @tf.function(input_signature=[tf.TensorSpec(shape, tf.float32), tf.TensorSpec([None], tf.int32),
                                      tf.TensorSpec([None], tf.int32)])
        def epoch(x, y, order):
            steps = tf.shape(order)[0] // batch_size
            losses = tf.TensorArray(tf.float32, size=steps)
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
            correct = tf.cast(tf.equal(tf.argmax(logits, axis=1, output_type=tf.int32), yb), tf.float32)
            return tf.reduce_sum(losses), tf.reduce_sum(correct)

        # XLA compiles once per batch shape: the full batch and the last partial one.
        batch_sums = tf.function(batch_sums, jit_compile=model.mode == "compiled")
        shape = (None, *model.spec.input_shape)

        @tf.function(input_signature=[tf.TensorSpec(shape, tf.float32), tf.TensorSpec([None], tf.int32)])
        def evaluate(x, y):
            n = tf.shape(y)[0]
            loss_sum, correct = tf.constant(0.0), tf.constant(0.0)
            for start in tf.range(0, n, batch_size):
                stop = tf.minimum(start + batch_size, n)
                b_loss, b_correct = batch_sums(x[start:stop], y[start:stop])
                loss_sum += b_loss
                correct += b_correct
            count = tf.cast(n, tf.float32)
            return tf.stack([loss_sum / count, correct / count])

        model.fns[key] = evaluate
        return evaluate

    def _logits_fn(self, model: _Model):
        if "logits" not in model.fns:
            tf = self._tf
            model.fns["logits"] = tf.function(
                lambda x: tf.cast(model.keras_model(x, training=False), tf.float32),
                input_signature=[tf.TensorSpec((None, *model.spec.input_shape), tf.float32)],
                jit_compile=model.mode == "compiled")
        return model.fns["logits"]

    # -- primitive steps the harness loop calls -----------------------------------------

    def train_epoch(self, model: _Model, data: Any, order: np.ndarray, batch_size: int) -> np.ndarray:
        tf = self._tf
        order = np.asarray(order)
        if len(order) % batch_size:
            raise ValueError(f"len(order)={len(order)} is not a multiple of batch_size={batch_size}")
        x, y = data
        with tf.device(self._device_name):
            order_t = tf.constant(order.astype(np.int32, copy=False))  # one upload per epoch
            losses = self._epoch_fn(model, int(batch_size))(x, y, order_t)
        return losses.numpy().astype(np.float32, copy=False)  # the one host read

    def evaluate(self, model: _Model, data: Any, batch_size: int) -> tuple[float, float]:
        tf = self._tf
        x, y = data
        with tf.device(self._device_name):
            loss, acc = self._eval_fn(model, int(batch_size))(x, y).numpy()
        return float(loss), float(acc)

    def logits(self, model: _Model, x: np.ndarray) -> np.ndarray:
        tf = self._tf
        with tf.device(self._device_name):
            out = self._logits_fn(model)(tf.constant(np.asarray(x, np.float32)))
        return out.numpy().astype(np.float32, copy=False)

    def trace_counts(self, model: _Model) -> dict[str, int]:
        """How often each traced function has been traced (tests check nothing retraces)."""
        return {f"{k[0]}:{k[1]}" if isinstance(k, tuple) else k: fn.experimental_get_tracing_count()
                for k, fn in model.fns.items()}
