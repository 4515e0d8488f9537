"""A float64 numpy reference for the canonical layout: forward pass, MLP gradients, paper Adam."""

import numpy as np


def forward(spec, weights, x):
    """Logits of spec.layers on NHWC x with canonical (HWIO / (in, out)) weights, in float64."""
    h = x.astype(np.float64)
    params = iter(weights)
    for layer in spec.layers:
        if layer.kind == "conv2d":
            k, b = next(params).astype(np.float64), next(params).astype(np.float64)
            assert layer.padding == "valid"
            win = np.lib.stride_tricks.sliding_window_view(h, (layer.kernel_size, layer.kernel_size), axis=(1, 2))
            h = np.einsum("nhwcij,ijco->nhwo", win, k) + b
        elif layer.kind == "dense":
            k, b = next(params).astype(np.float64), next(params).astype(np.float64)
            h = h @ k + b
        elif layer.kind == "maxpool2d":
            p = layer.pool_size
            n, hh, ww, c = h.shape
            h = h[:, : hh // p * p, : ww // p * p].reshape(n, hh // p, p, ww // p, p, c).max(axis=(2, 4))
        elif layer.kind == "flatten":
            h = h.reshape(len(h), -1)  # NHWC order: the canonical flatten
        if getattr(layer, "activation", "linear") == "relu":
            h = np.maximum(h, 0)
    return h


def cross_entropy(logits, y):
    """Per-sample softmax cross-entropy on logits with integer labels."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    return np.log(np.exp(shifted).sum(axis=1)) - shifted[np.arange(len(y)), y]


def mlp_loss_and_grads(weights, x, y):
    """Mean loss and gradients of Flatten -> Dense relu -> Dense."""
    k1, b1, k2, b2 = (w.astype(np.float64) for w in weights)
    a = x.reshape(len(x), -1).astype(np.float64)
    z1 = a @ k1 + b1
    h1 = np.maximum(z1, 0)
    logits = h1 @ k2 + b2
    shifted = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)
    dlogits = p.copy()
    dlogits[np.arange(len(y)), y] -= 1
    dlogits /= len(y)
    dz1 = (dlogits @ k2.T) * (z1 > 0)
    return cross_entropy(logits, y).mean(), [a.T @ dz1, dz1.sum(0), h1.T @ dlogits, dlogits.sum(0)]


def paper_adam_first_step(weights, grads, opt):
    """One Adam step from zero moments, epsilon added to sqrt(v_hat) (Kingma & Ba, Alg. 1)."""
    out = []
    for w, g in zip(weights, grads):
        m_hat = (1 - opt.beta1) * g / (1 - opt.beta1)
        v_hat = (1 - opt.beta2) * g * g / (1 - opt.beta2)
        out.append(w - opt.lr * m_hat / (np.sqrt(v_hat) + opt.eps))
    return out
