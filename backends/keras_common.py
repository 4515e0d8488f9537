"""The spec in Keras 3 over keras.ops only, for any Keras backend: the layer table, attention, the pinned optimizers."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np


def _keras():
    """keras, as its adapter imported it (the adapter picks Keras's backend before the first import)."""
    import keras

    return keras


def _gelu(v, *, approximate: bool):
    """tf.nn.gelu's formulas with Python-float constants, which take v's dtype: tf.nn.gelu casts
    1/sqrt(2) and 0.044715 from float32, which leaves a float64 GELU ~5e-9 off (float32's is the same)."""
    ops = _keras().ops
    if approximate:
        return 0.5 * v * (1.0 + ops.tanh(0.7978845608028654 * (v + 0.044715 * ops.power(v, 3))))
    return 0.5 * v * ops.erfc(-v * 0.7071067811865476)


# Every activation the spec names, as what a Keras layer's `activation` takes; base.build checks coverage.
ACTIVATIONS = {
    "linear": None, "relu": "relu", "tanh": "tanh", "silu": "silu",
    "gelu": functools.partial(_gelu, approximate=False), "gelu_tanh": functools.partial(_gelu, approximate=True),
}

# Keras's own draws would be overwritten by the canonical weights, which always decide.
ZERO_INIT = {"kernel_initializer": "zeros", "bias_initializer": "zeros"}


class Graph:
    """Spec layers applied to a functional Keras graph, each Keras layer remembered by spec name (a tied
    head reads its embedding's table). synchronized_batchnorm: batch statistics over every replica."""

    def __init__(self, *, synchronized_batchnorm: bool = False):
        self.built: dict = {}
        self.synchronized_batchnorm = synchronized_batchnorm

    def apply(self, layers, h):
        for layer in layers:
            h = LAYERS[layer.kind](layer, h, self)
        return h


def _keras_layer(factory):
    """A table entry that applies one Keras layer made by factory(keras, spec layer, graph)."""
    def apply(layer, h, graph: Graph):
        keras_layer = factory(_keras(), layer, graph)
        graph.built[layer.name] = keras_layer
        return keras_layer(h)
    return apply


@functools.cache
def _positional_embedding_class():
    """A learned table added per position; Keras has no built-in one (keras_hub's lives elsewhere)."""
    keras = _keras()

    class PositionalEmbedding(keras.layers.Layer):
        def __init__(self, max_len, **kwargs):
            super().__init__(**kwargs)
            self.max_len = max_len

        def build(self, input_shape):
            self.table = self.add_weight(shape=(self.max_len, input_shape[-1]), initializer="zeros", name="table")

        def call(self, x):
            # The dynamic length: a model built for any length up to max_len (logits of a shorter window).
            return x + keras.ops.cast(self.table[: keras.ops.shape(x)[1]], x.dtype)

    return PositionalEmbedding


@functools.cache
def _tied_dense_class():
    """A Dense whose kernel is an Embedding's table transposed (GPT-2's head); only its bias is its own."""
    keras = _keras()

    class TiedDense(keras.layers.Layer):
        def __init__(self, spec_layer, embedding, **kwargs):
            super().__init__(name=spec_layer.name, **kwargs)
            self.spec_layer = spec_layer
            # A function, not the layer: an attribute holding the Embedding would make its table
            # this layer's weight too, and the canonical weights would count it twice.
            self.table = lambda: embedding.embeddings

        def build(self, input_shape):
            if self.spec_layer.use_bias:
                self.bias = self.add_weight(name="bias", shape=(self.spec_layer.units,), initializer="zeros")

        def call(self, x):
            y = keras.ops.matmul(x, keras.ops.transpose(keras.ops.cast(self.table(), x.dtype)))
            if self.spec_layer.use_bias:
                y = y + keras.ops.cast(self.bias, x.dtype)
            return keras.activations.get(ACTIVATIONS[self.spec_layer.activation])(y)

    return TiedDense


_plain_dense = _keras_layer(lambda k, s, g: k.layers.Dense(
    s.units, activation=ACTIVATIONS[s.activation], use_bias=s.use_bias, name=s.name, **ZERO_INIT))


def _dense(layer, h, graph: Graph):
    if layer.tied_to:
        return _tied_dense_class()(layer, graph.built[layer.tied_to])(h)
    return _plain_dense(layer, h, graph)


def _residual(layer, h, graph: Graph):
    return _keras().layers.Add(name=layer.name)([h, graph.apply(layer.body, h)])


# Each projection's einsum over the canonical kernel layouts: x W (+ bias).
_PROJECTIONS = {**dict.fromkeys(("query", "key", "value"), "btd,dhk->bthk"), "out": "bthk,hkd->btd"}


@functools.cache
def _spec_attention_class():
    """A Keras layer computing the spec's attention from keras.ops, with LoRA adapters (Keras's own
    MultiHeadAttention has none): weights in the canonical order and layouts, so they load as they are."""
    keras = _keras()
    ops = keras.ops

    class SpecAttention(keras.layers.Layer):
        def __init__(self, spec_layer, **kwargs):
            super().__init__(name=spec_layer.name, **kwargs)
            self.spec_layer, self.p = spec_layer, {}

        def build(self, input_shape):
            for param in self.spec_layer.params(tuple(input_shape[1:])):
                self.p[param.name] = self.add_weight(name=param.name, shape=param.shape, initializer="zeros")

        def project(self, name, x):
            """Projection `name` of x: x W + bias, plus the spec's LoRA term where LoRA adapts it."""
            layer = self.spec_layer
            y = ops.einsum(_PROJECTIONS[name], x, self.p[f"{name}_kernel"]) + self.p[f"{name}_bias"]
            if layer.lora_adapts(name):
                y = y + layer.lora(name, x, self.p[f"{name}_lora_a"], self.p[f"{name}_lora_b"], einsum=ops.einsum)
            return y

        def call(self, x):
            q, k, v = (self.project(n, x) for n in ("query", "key", "value"))
            scores = ops.einsum("bqhk,bshk->bhqs", q, k) / float(np.sqrt(q.shape[-1]))
            if self.spec_layer.causal:
                t = ops.shape(x)[1]
                scores = ops.where(ops.tril(ops.ones((t, t), "bool")), scores, float(np.finfo(np.float32).min))
            o = ops.einsum("bhqs,bshk->bqhk", ops.softmax(scores, axis=-1), v)
            return self.project("out", o)

    return SpecAttention


# Attention: Keras's MultiHeadAttention where the spec allows (as fast as the einsums), the spec's
# einsums for LoRA, which Keras's layer lacks (measured in docs/performance.md).
def _attention(layer, h, graph: Graph):
    keras = _keras()
    # Under fp64 the spec's own einsums too: MultiHeadAttention rounds 1/sqrt(key_dim) through float32.
    if layer.lora_rank or keras.config.floatx() == "float64":
        return _spec_attention_class()(layer)(h)
    d, heads, hd = layer.dims(tuple(h.shape[1:]))
    mha = keras.layers.MultiHeadAttention(num_heads=heads, key_dim=hd, value_dim=hd, name=layer.name,
                                          kernel_initializer="zeros")
    return mha(h, h, use_causal_mask=layer.causal)


# The one map from spec layer kinds to Keras 3 layers, applied on the functional graph. Each
# layer's `weights` come in the canonical parameter order, in the canonical layouts (Dense
# (in, out), Conv2D HWIO, attention (dim, heads, head_dim)).
LAYERS = {
    "dense": _dense,
    "activation": _keras_layer(lambda k, s, g: k.layers.Activation(ACTIVATIONS[s.activation] or "linear",
                                                                   name=s.name)),
    "conv2d": _keras_layer(lambda k, s, g: k.layers.Conv2D(
        s.filters, s.kernel_size, strides=s.stride, padding=s.padding, activation=ACTIVATIONS[s.activation],
        data_format="channels_last", name=s.name, **ZERO_INIT)),
    "maxpool2d": _keras_layer(lambda k, s, g: k.layers.MaxPooling2D(
        s.pool_size, data_format="channels_last", name=s.name)),
    "avgpool2d": _keras_layer(lambda k, s, g: k.layers.AveragePooling2D(
        s.pool_size, data_format="channels_last", name=s.name)),
    "globalavgpool2d": _keras_layer(lambda k, s, g: k.layers.GlobalAveragePooling2D(
        data_format="channels_last", name=s.name)),
    "flatten": _keras_layer(lambda k, s, g: k.layers.Flatten(data_format="channels_last", name=s.name)),
    "reshape": _keras_layer(lambda k, s, g: k.layers.Reshape(s.target_shape, name=s.name)),
    # Keras's momentum is the decay of the running statistics: 1 - the spec's (torch's).
    # With data-parallel replicas Keras normalises each replica by its own slice's statistics
    # (synchronized=False, the default); the project pins the global batch's, so that N
    # replicas compute what one device does: synchronized=True all-reduces the sums and
    # counts. Only with replicas: its E[x^2] - E[x]^2 variance is not the two-pass one that
    # one device keeps.
    "batchnorm": _keras_layer(lambda k, s, g: k.layers.BatchNormalization(
        momentum=1 - s.momentum, epsilon=s.eps, name=s.name, synchronized=g.synchronized_batchnorm)),
    "layernorm": _keras_layer(lambda k, s, g: k.layers.LayerNormalization(epsilon=s.eps, name=s.name)),
    "dropout": _keras_layer(lambda k, s, g: k.layers.Dropout(s.rate, name=s.name)),
    "embedding": _keras_layer(lambda k, s, g: k.layers.Embedding(
        s.vocab_size, s.dim, embeddings_initializer="zeros", name=s.name)),
    "positionalembedding": _keras_layer(lambda k, s, g: _positional_embedding_class()(s.max_len, name=s.name)),
    "multiheadselfattention": _attention,
    "residual": _residual,
}


# -- the pinned optimizers (tasks/optim.py) ---------------------------------------------------------


@dataclass
class OptimizerState:
    """One model's optimizer state. Variables are anything with Keras's assign/assign_sub (a keras.Variable,
    or the backend's own variable): the update reads them and assigns, so a traced step captures them."""

    variables: list  # the trained variables, in spec order
    slots: list  # per trained variable: [m, v] for Adam(W), [buf] for SGD with momentum, [] for plain SGD
    decays: list  # per trained variable: whether AdamW's weight decay applies
    step: Any  # integer variable: steps taken
    lr_table: Any  # float tensor (float64 under fp64): lr per step, the last entry holding


def _sgd(o, state: OptimizerState, grads, *, lr, step) -> None:
    for p, g, slots in zip(state.variables, grads, state.slots):
        if slots:
            buf = o.momentum * slots[0] + g
            slots[0].assign(buf)
            g = g + o.momentum * buf if o.nesterov else buf
        p.assign_sub(lr * g)


def _adam(o, state: OptimizerState, grads, *, lr, step) -> None:
    """Adam, and AdamW's decoupled decay on the arrays that decay (state.decays)."""
    ops = _keras().ops
    # A Python float takes the step's dtype: float64 powers under fp64, not float32 constants.
    bc1 = 1.0 - ops.power(o.beta1, step)
    bc2 = 1.0 - ops.power(o.beta2, step)
    for p, g, (m, v), decays in zip(state.variables, grads, state.slots, state.decays):
        if decays:
            p.assign_sub(lr * o.weight_decay * p)  # decoupled decay, scaled by lr, before the Adam step
        # The paper's Algorithm 1, as torch and optax: eps added to sqrt(v_hat). Stock
        # Keras Adam adds it to sqrt(v) before bias correction ("epsilon hat").
        m_new = o.beta1 * m + (1.0 - o.beta1) * g
        v_new = o.beta2 * v + (1.0 - o.beta2) * ops.square(g)
        m.assign(m_new)
        v.assign(v_new)
        p.assign_sub(lr * (m_new / bc1) / (ops.sqrt(v_new / bc2) + o.eps))


# Every optimizer kind of tasks/optim.py, in its pinned form: (slots per trained variable, update step).
OPTIMIZERS = {
    "sgd": (lambda o: 1 if o.momentum else 0, _sgd),
    "adam": (lambda o: 2, _adam),
    "adamw": (lambda o: 2, _adam),
}


def slot_count(o) -> int:
    """Slots per trained variable of optimizer spec `o`."""
    return OPTIMIZERS[o.kind][0](o)


def reset(state: OptimizerState) -> None:
    """Fresh optimizer state (moments, step count, schedule), through assignments: a traced step keeps its variables."""
    ops = _keras().ops
    for slot in (s for slots in state.slots for s in slots):
        slot.assign(ops.zeros_like(slot))
    state.step.assign(0)


def update(o, state: OptimizerState, grads) -> None:
    """One step of optimizer spec `o` with dense gradients: clipping, the lr of this step, the kind's update."""
    ops = _keras().ops
    if o.clip_norm is not None:
        norm = ops.sqrt(ops.sum(ops.stack([ops.sum(ops.square(g)) for g in grads])))
        factor = ops.minimum(o.clip_norm / norm, 1.0)  # norm first: 1.0 takes its dtype
        grads = [g * factor for g in grads]
    steps_before = state.step.assign_add(1) - 1
    lr = ops.take(state.lr_table, ops.minimum(steps_before, int(state.lr_table.shape[0]) - 1))
    OPTIMIZERS[o.kind][1](o, state, grads, lr=lr, step=ops.cast(steps_before + 1, state.lr_table.dtype))
