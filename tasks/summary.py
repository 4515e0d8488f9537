"""The layer table `tribench show` prints: name, kind, output shape, parameters, forward FLOPs, totals."""

from __future__ import annotations

import math

from tasks.spec import TaskSpec, walk


def _rows(layers, shape, depth: int):
    for layer in layers:
        out = layer.out_shape(shape)
        params = sum(math.prod(p.shape) for p in layer.params(shape))
        yield ("  " * depth + layer.name, layer.kind, str(out), params, layer.flops(shape))
        yield from _rows(layer.children(), shape, depth + 1)
        shape = out


def layer_table(spec: TaskSpec) -> str:
    """A fixed-width table of every layer (residual bodies indented under their residual) and the totals."""
    header = ("layer", "kind", "output shape", "params", "forward FLOPs")
    rows = [(n, k, s, f"{p:,}", f"{f:,}") for n, k, s, p, f in _rows(spec.layers, tuple(spec.input_shape), 0)]
    state = sum(math.prod(e.param.shape) for e in spec.params() if not e.param.trainable)
    forward = sum(layer.flops(shape) for layer, shape, _ in walk(spec.layers, spec.input_shape)
                  if not layer.children())
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]

    def line(row):
        return "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()

    o = spec.optimizer
    lines = [f"task {spec.name}: dataset {spec.dataset}, input {tuple(spec.input_shape)}"
             f"{' token ids' if spec.takes_tokens else ''}, optimizer {o.kind} lr {o.lr} ({o.schedule.kind}"
             f"{f', clip {o.clip_norm}' if o.clip_norm else ''}), batch {spec.batch_size}, {spec.epochs} epochs",
             line(header), line(tuple("-" * w for w in widths)), *map(line, rows),
             f"total: {spec.param_count():,} trainable parameters, {state:,} state (running statistics); "
             f"{forward:,} forward FLOPs and {spec.train_flops_per_sample():,} training FLOPs per sample"]
    return "\n".join(lines)
