"""A float64 numpy reference of the spec: forward and backward of every layer kind, the loss, every optimizer.

It follows the formulas tasks/layers.py and tasks/optim.py pin, written out independently
of any framework; test_kinds.py checks its gradients against central finite differences.
Dropout is the identity here: parity is exact only with dropout off (rate 0, or evaluation).
"""

import math

import numpy as np

erf = np.vectorize(math.erf, otypes=[np.float64])  # float64 erf without a scipy dependency

SQRT2 = math.sqrt(2.0)
TANH_C = math.sqrt(2.0 / math.pi)


# -- activations: value and derivative ---------------------------------------------------------------


def _gelu_tanh(z):
    u = TANH_C * (z + 0.044715 * z ** 3)
    t = np.tanh(u)
    return 0.5 * z * (1 + t), 0.5 * (1 + t) + 0.5 * z * (1 - t * t) * TANH_C * (1 + 3 * 0.044715 * z * z)


def _silu(z):
    s = 1 / (1 + np.exp(-z))
    return z * s, s * (1 + z * (1 - s))


ACTIVATIONS = {
    "linear": lambda z: (z, np.ones_like(z)),
    "relu": lambda z: (np.maximum(z, 0), (z > 0).astype(np.float64)),
    "tanh": lambda z: (np.tanh(z), 1 - np.tanh(z) ** 2),
    "silu": _silu,
    "gelu": lambda z: (0.5 * z * (1 + erf(z / SQRT2)),
                       0.5 * (1 + erf(z / SQRT2)) + z * np.exp(-z * z / 2) / math.sqrt(2 * math.pi)),
    "gelu_tanh": _gelu_tanh,
}


def _act_forward(name, z):
    y, dy_dz = ACTIVATIONS[name](z)
    return y, dy_dz


# -- layers: forward(layer, P, x, train) -> (y, cache); backward(layer, P, cache, dy, grads) -> dx --------
# P(name) reads the layer's parameter; grads[name] accumulates its gradient; state updates go to P.new_state.


def _kernel(layer, P):
    """The Dense's (in, out) kernel: its own, or its tied embedding's table transposed."""
    return P.net.params[f"{layer.tied_to}.table"].T if layer.tied_to else P("kernel")


def _dense_f(layer, P, x, train):
    z = x @ _kernel(layer, P) + (P("bias") if layer.use_bias else 0.0)
    y, d = _act_forward(layer.activation, z)
    return y, (x, d)


def _dense_b(layer, P, cache, dy, grads):
    x, d = cache
    dz = dy * d
    dk = x.reshape(-1, x.shape[-1]).T @ dz.reshape(-1, dz.shape[-1])
    if layer.tied_to:  # the table's gradient sums its use as the embedding and as this kernel
        P.net.grads[f"{layer.tied_to}.table"] += dk.T
    else:
        grads["kernel"] += dk
    if layer.use_bias:
        grads["bias"] += dz.reshape(-1, dz.shape[-1]).sum(0)
    return dz @ _kernel(layer, P).T


def _activation_f(layer, P, x, train):
    return _act_forward(layer.activation, x)


def _same_pads(size, k, s):
    total = max((-(-size // s) - 1) * s + k - size, 0)
    return total // 2, total - total // 2


def _conv_f(layer, P, x, train):
    k, s = layer.kernel_size, layer.stride
    pads = ([(0, 0), (0, 0)] if layer.padding == "valid"
            else [_same_pads(x.shape[1], k, s), _same_pads(x.shape[2], k, s)])
    xp = np.pad(x, [(0, 0), *pads, (0, 0)])
    win = np.lib.stride_tricks.sliding_window_view(xp, (k, k), axis=(1, 2))[:, ::s, ::s]  # n ho wo c kh kw
    z = np.einsum("nhwcij,ijco->nhwo", win, P("kernel")) + P("bias")
    y, d = _act_forward(layer.activation, z)
    return y, (x.shape, xp.shape, pads, win, d)


def _conv_b(layer, P, cache, dy, grads):
    shape, padded, pads, win, d = cache
    k, s = layer.kernel_size, layer.stride
    dz = dy * d
    grads["kernel"] += np.einsum("nhwcij,nhwo->ijco", win, dz)
    grads["bias"] += dz.sum((0, 1, 2))
    dxp = np.zeros(padded)
    ho, wo = dz.shape[1:3]
    for i in range(k):
        for j in range(k):
            dxp[:, i:i + s * ho:s, j:j + s * wo:s, :] += dz @ P("kernel")[i, j].T
    (top, _), (left, _) = pads
    return dxp[:, top:top + shape[1], left:left + shape[2], :]


def _pool_windows(x, p):
    n, h, w, c = x.shape
    return x[:, : h // p * p, : w // p * p].reshape(n, h // p, p, w // p, p, c)


def _maxpool_f(layer, P, x, train):
    win = _pool_windows(x, layer.pool_size)
    y = win.max(axis=(2, 4))
    return y, (x.shape, win == y[:, :, None, :, None])


def _avgpool_f(layer, P, x, train):
    return _pool_windows(x, layer.pool_size).mean(axis=(2, 4)), (x.shape, None)


def _pool_b(layer, P, cache, dy, grads):
    shape, mask = cache
    p = layer.pool_size
    spread = np.broadcast_to(dy[:, :, None, :, None], (*dy.shape[:2], p, dy.shape[2], p, dy.shape[3]))
    spread = spread * mask if mask is not None else spread / (p * p)  # random inputs: no ties in max
    dx = np.zeros(shape)
    n, hp, _, wp, _, c = spread.shape
    dx[:, : hp * p, : wp * p] = spread.reshape(n, hp * p, wp * p, c)
    return dx


def _gap_f(layer, P, x, train):
    return x.mean(axis=(1, 2)), x.shape


def _gap_b(layer, P, shape, dy, grads):
    return np.broadcast_to(dy[:, None, None, :] / (shape[1] * shape[2]), shape).copy()


def _normalise_b(xhat, inv, dxhat, axes):
    """Input gradient of (x - mean(x)) * inv over `axes` with inv = 1 / sqrt(var + eps), var biased."""
    n = np.prod([xhat.shape[a] for a in axes])
    return inv / n * (n * dxhat - dxhat.sum(axes, keepdims=True) - xhat * (dxhat * xhat).sum(axes, keepdims=True))


def _batchnorm_f(layer, P, x, train):
    axes = tuple(range(x.ndim - 1))
    train = train and layer.name not in P.net.frozen  # a frozen BatchNorm uses its running statistics
    if train:
        mean, var = x.mean(axes), x.var(axes)
        m = layer.momentum
        P.new_state["running_mean"] = (1 - m) * P("running_mean") + m * mean
        P.new_state["running_var"] = (1 - m) * P("running_var") + m * var
    else:
        mean, var = P("running_mean"), P("running_var")
    inv = 1 / np.sqrt(var + layer.eps)
    xhat = (x - mean) * inv
    return xhat * P("scale") + P("offset"), (xhat, inv, axes, train)


def _batchnorm_b(layer, P, cache, dy, grads):
    xhat, inv, axes, train = cache
    grads["scale"] += (dy * xhat).sum(axes)
    grads["offset"] += dy.sum(axes)
    dxhat = dy * P("scale")
    return _normalise_b(xhat, inv, dxhat, axes) if train else dxhat * inv


def _layernorm_f(layer, P, x, train):
    inv = 1 / np.sqrt(x.var(-1, keepdims=True) + layer.eps)
    xhat = (x - x.mean(-1, keepdims=True)) * inv
    return xhat * P("scale") + P("offset"), (xhat, inv)


def _layernorm_b(layer, P, cache, dy, grads):
    xhat, inv = cache
    axes = tuple(range(dy.ndim - 1))
    grads["scale"] += (dy * xhat).sum(axes)
    grads["offset"] += dy.sum(axes)
    return _normalise_b(xhat, inv, dy * P("scale"), (-1,))


def _flatten_f(layer, P, x, train):
    return x.reshape(len(x), -1), x.shape  # NHWC order: the canonical flatten


def _embedding_f(layer, P, x, train):
    return P("table")[x], x


def _embedding_b(layer, P, ids, dy, grads):
    np.add.at(grads["table"], ids, dy)
    return None  # token ids have no gradient


def _positional_f(layer, P, x, train):
    return x + P("table")[: x.shape[1]], x.shape[1]


def _positional_b(layer, P, t, dy, grads):
    grads["table"][:t] += dy.sum(0)
    return dy


def _attention_f(layer, P, x, train):
    def lora(name, x):  # the spec's formula (tasks/layers.py) in numpy; its gradient below is derived by hand
        if not layer.lora_adapts(name):
            return 0
        return layer.lora(name, x, P(f"{name}_lora_a"), P(f"{name}_lora_b"), einsum=np.einsum)

    q, k, v = (np.einsum("btd,dhk->bthk", x, P(f"{n}_kernel")) + P(f"{n}_bias") + lora(n, x)
               for n in ("query", "key", "value"))
    scale = 1 / math.sqrt(q.shape[-1])
    s = np.einsum("bqhk,bshk->bhqs", q, k) * scale
    if layer.causal:
        t = x.shape[1]
        s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    o = np.einsum("bhqs,bshk->bqhk", a, v)
    y = np.einsum("bqhk,hkd->bqd", o, P("out_kernel")) + P("out_bias") + lora("out", o)
    return y, (x, q, k, v, a, o, scale)


def _attention_b(layer, P, cache, dy, grads):
    x, q, k, v, a, o, scale = cache
    grads["out_kernel"] += np.einsum("bqhk,bqd->hkd", o, dy)
    grads["out_bias"] += dy.sum((0, 1))
    do = np.einsum("bqd,hkd->bqhk", dy, P("out_kernel"))
    if layer.lora_adapts("out"):  # y += s (o A) B
        s_ = layer.lora_scale()
        oa = np.einsum("bqhk,hkr->bqr", o, P("out_lora_a"))
        grads["out_lora_b"] += s_ * np.einsum("bqr,bqd->rd", oa, dy)
        d_oa = s_ * np.einsum("bqd,rd->bqr", dy, P("out_lora_b"))
        grads["out_lora_a"] += np.einsum("bqhk,bqr->hkr", o, d_oa)
        do = do + np.einsum("bqr,hkr->bqhk", d_oa, P("out_lora_a"))
    da = np.einsum("bqhk,bshk->bhqs", do, v)
    dv = np.einsum("bhqs,bqhk->bshk", a, do)
    ds = a * (da - (da * a).sum(-1, keepdims=True)) * scale  # masked entries have a = 0
    dq = np.einsum("bhqs,bshk->bqhk", ds, k)
    dk = np.einsum("bhqs,bqhk->bshk", ds, q)
    dx = np.zeros_like(x)
    for name, d in (("query", dq), ("key", dk), ("value", dv)):
        grads[f"{name}_kernel"] += np.einsum("btd,bthk->dhk", x, d)
        grads[f"{name}_bias"] += d.sum((0, 1))
        dx += np.einsum("bthk,dhk->btd", d, P(f"{name}_kernel"))
        if layer.lora_adapts(name):  # y += s (x A) B
            s_ = layer.lora_scale()
            xa = np.einsum("btd,dr->btr", x, P(f"{name}_lora_a"))
            grads[f"{name}_lora_b"] += s_ * np.einsum("btr,bthk->rhk", xa, d)
            d_xa = s_ * np.einsum("bthk,rhk->btr", d, P(f"{name}_lora_b"))
            grads[f"{name}_lora_a"] += np.einsum("btd,btr->dr", x, d_xa)
            dx += np.einsum("btr,dr->btd", d_xa, P(f"{name}_lora_a"))
    return dx


def _residual_f(layer, P, x, train):
    y, tape = _forward(layer.body, P.net, x, train)
    return x + y, tape


def _residual_b(layer, P, tape, dy, grads):
    return dy + _backward(tape, P.net, dy)


def _identity_f(layer, P, x, train):
    return x, None


LAYERS = {
    "dense": (_dense_f, _dense_b),
    "activation": (_activation_f, lambda layer, P, d, dy, grads: dy * d),
    "conv2d": (_conv_f, _conv_b),
    "maxpool2d": (_maxpool_f, _pool_b),
    "avgpool2d": (_avgpool_f, _pool_b),
    "globalavgpool2d": (_gap_f, _gap_b),
    "flatten": (_flatten_f, lambda layer, P, shape, dy, grads: dy.reshape(shape)),
    "reshape": (lambda layer, P, x, train: (x.reshape(len(x), *layer.target_shape), x.shape),
                lambda layer, P, shape, dy, grads: dy.reshape(shape)),
    "batchnorm": (_batchnorm_f, _batchnorm_b),
    "layernorm": (_layernorm_f, _layernorm_b),
    "dropout": (_identity_f, lambda layer, P, cache, dy, grads: dy),
    "embedding": (_embedding_f, _embedding_b),
    "positionalembedding": (_positional_f, _positional_b),
    "multiheadselfattention": (_attention_f, _attention_b),
    "residual": (_residual_f, _residual_b),
}


# -- the network -------------------------------------------------------------------------------------


class _Params:
    """One layer's view of the network's float64 parameters, gradients and new state."""

    def __init__(self, net, layer):
        self.net, self.layer = net, layer
        self.new_state = net.new_state.setdefault(layer.name, {})

    def __call__(self, name):
        return self.net.params[f"{self.layer.name}.{name}"]


class _Net:
    def __init__(self, spec, weights, frozen=frozenset()):
        self.spec, self.frozen = spec, frozen
        self.params = {e.name: np.asarray(w, np.float64) for e, w in zip(spec.params(), weights)}
        self.grads = {n: np.zeros_like(a) for n, a in self.params.items()}
        self.new_state: dict = {}


def _forward(layers, net, x, train):
    tape = []
    for layer in layers:
        if layer.kind == "dropout" and train:
            assert layer.rate == 0, "the reference has no dropout masks: parity needs rate 0"
        x, cache = LAYERS[layer.kind][0](layer, _Params(net, layer), x, train)
        tape.append((layer, cache))
    return x, tape


def _backward(tape, net, dy):
    for layer, cache in reversed(tape):
        grads = _GradView(net, layer)
        dy = LAYERS[layer.kind][1](layer, _Params(net, layer), cache, dy, grads)
    return dy


class _GradView:
    def __init__(self, net, layer):
        self.net, self.layer = net, layer

    def __getitem__(self, name):
        return self.net.grads[f"{self.layer.name}.{name}"]

    def __setitem__(self, name, value):
        self.net.grads[f"{self.layer.name}.{name}"] = value


def _x(x):
    return x if np.issubdtype(np.asarray(x).dtype, np.integer) else np.asarray(x, np.float64)


def forward(spec, weights, x, *, train=False):
    """Logits in float64 (evaluation mode unless train: BatchNorm then uses batch statistics)."""
    return _forward(spec.layers, _Net(spec, weights), _x(x), train)[0]


def cross_entropy(logits, y):
    """Per-sample (or per-position) softmax cross-entropy on logits with integer labels."""
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return np.log(np.exp(shifted).sum(axis=-1)) - np.take_along_axis(shifted, y[..., None], -1)[..., 0]


def loss_and_grads(spec, weights, x, y, *, frozen=frozenset()):
    """(mean training loss, gradients aligned with weights (zero for state), input gradient, new weights' state).

    The last item is `weights` with BatchNorm running statistics updated as one training step would.
    """
    net = _Net(spec, weights, frozen)
    logits, tape = _forward(spec.layers, net, _x(x), True)
    y = np.asarray(y)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    dlogits = p.copy()
    np.put_along_axis(dlogits, y[..., None], np.take_along_axis(p, y[..., None], -1) - 1, -1)
    dlogits /= y.size
    dx = _backward(tape, net, dlogits)
    stated = []
    for e, w in zip(spec.params(), weights):
        new = net.new_state.get(e.layer, {}).get(e.param.name)
        stated.append(np.asarray(w, np.float64) if new is None else new)
    grads = [net.grads[e.name] if e.param.trainable else np.zeros_like(net.grads[e.name]) for e in spec.params()]
    return cross_entropy(logits, y).mean(), grads, dx, stated


# -- optimizers (tasks/optim.py's formulas) ------------------------------------------------------------


def train(spec, weights, batches, *, trainable=None):
    """Weights (float64) after one optimizer step per (x, y) batch, and the per-step losses."""
    o = spec.optimizer
    w = [np.asarray(a, np.float64) for a in weights]
    learns = [spec.trains(e, trainable) for e in spec.params()]
    slots = [[np.zeros_like(a), np.zeros_like(a)] for a in w]
    frozen = frozenset(spec.param_layer_names()) - set(trainable) if trainable is not None else frozenset()
    losses = []
    for step, (x, y) in enumerate(batches):
        loss, grads, _, stated = loss_and_grads(spec, w, x, y, frozen=frozen)
        losses.append(loss)
        grads = [g for g, on in zip(grads, learns) if on]
        if o.clip_norm is not None:
            norm = math.sqrt(sum(float((g * g).sum()) for g in grads))
            grads = [g * min(1.0, o.clip_norm / norm) for g in grads]
        lr = o.lr_at(step)
        it = iter(grads)
        new = []
        for a, s, on, st, e in zip(w, slots, learns, stated, spec.params()):
            if not on:
                new.append(st)  # running statistics move in training; frozen arrays keep st == a
                continue
            g = next(it)
            if o.kind == "sgd":
                s[0] = o.momentum * s[0] + g
                new.append(a - lr * ((g + o.momentum * s[0]) if o.nesterov else s[0]))
                continue
            if spec.decays(e):
                a = a - lr * o.weight_decay * a
            s[0] = o.beta1 * s[0] + (1 - o.beta1) * g
            s[1] = o.beta2 * s[1] + (1 - o.beta2) * g * g
            m_hat, v_hat = s[0] / (1 - o.beta1 ** (step + 1)), s[1] / (1 - o.beta2 ** (step + 1))
            new.append(a - lr * m_hat / (np.sqrt(v_hat) + o.eps))
        w = new
    return w, losses
