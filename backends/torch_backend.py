"""PyTorch adapter: builds a TaskSpec as an nn.Module and runs the harness's primitive steps."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from backends.base import Backend, BackendUnavailable, check_build, check_options
from tasks.spec import TaskSpec

# Memory format of the 4-D activations: channels_last (NHWC in memory, logical NCHW).
# Measured on the cifar-cnn training step (batch 128, fused Adam, 2 threads, torch 2.13,
# on the shared 2-core CPU while other benchmarks ran: 25 interleaved chunks of 4 steps,
# samples/s): NCHW best 486 / p90 401 / median 269, channels_last best 647 / p90 566 /
# median 350, i.e. ~1.3x for channels_last; it also makes the NHWC input a free view.
# (compiled mode with channels_last was slower still: see _make_steps.)
CHANNELS_LAST = True


def _flatten_permutation(hwc: tuple[int, int, int]) -> np.ndarray:
    """perm[j] = the NHWC-flat index of the feature at NCHW-flat index j.

    A canonical Dense kernel's rows follow NHWC flattening; torch flattens NCHW, so the
    first Dense after a Flatten takes kernel[perm] to produce exactly the same logits.
    """
    h, w, c = hwc
    return np.arange(h * w * c).reshape(h, w, c).transpose(2, 0, 1).ravel()


@dataclass
class _Data:
    x: Any  # torch tensor on the device, storage layout (see _to_storage)
    y: Any  # int64 labels on the device
    n: int


@dataclass
class _Model:
    spec: TaskSpec
    module: Any  # torch.nn.Sequential in spec order
    param_layers: list  # (layer name, torch layer, kind, row permutation or None), spec order
    params: list  # every parameter, spec order
    trainable: list  # parameters that train (requires_grad True)
    optimizer: Any
    mode: str
    train_step: Any = None
    eval_step: Any = None


class TorchBackend(Backend):
    name = "torch"

    def __init__(self):
        self._device = None
        self._threads = None
        self._precision = "fp32"

    # -- set-up --------------------------------------------------------------------------

    def configure(self, *, device: str, threads: int, precision: str) -> None:
        try:
            import torch
        except ImportError as exc:  # pragma: no cover - the registry checks first
            raise BackendUnavailable(f"torch is not installed ({exc})") from None
        check_options(device=device, precision=precision)
        if device == "gpu":
            if not torch.cuda.is_available():
                raise BackendUnavailable("torch: device 'gpu' asked for but there is no CUDA device")
            self._device = torch.device("cuda")
        elif device == "auto":
            self._device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        else:
            self._device = torch.device("cpu")
        if threads:
            torch.set_num_threads(int(threads))
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:
            pass  # it can be set only once per process, before any inter-op work
        tf32 = precision == "tf32"
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
        torch.set_float32_matmul_precision("high" if tf32 else "highest")
        self._threads = torch.get_num_threads()
        self._precision = precision

    def _torch(self):
        if self._device is None:
            raise RuntimeError("TorchBackend.configure() must be called first")
        import torch

        return torch

    def environment(self) -> dict:
        torch = self._torch()
        on_cuda = self._device.type == "cuda"
        return {
            "framework": "torch",
            "framework_version": torch.__version__,
            "device": "gpu" if on_cuda else "cpu",
            "device_name": torch.cuda.get_device_name(self._device) if on_cuda else "cpu",
            "threads": self._threads,
            "interop_threads": torch.get_num_interop_threads(),
            "precision": self._precision,
            "memory_format": "channels_last" if CHANNELS_LAST else "nchw",
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if on_cuda else None,
        }

    def synchronize(self) -> None:
        torch = self._torch()
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)

    def memory(self) -> dict:
        torch = self._torch()
        if self._device.type == "cuda":
            return {"device_peak_mb": torch.cuda.max_memory_allocated(self._device) / 2**20}
        return {"device_peak_mb": None}

    # -- data ----------------------------------------------------------------------------

    def _to_storage(self, x):
        """NHWC host array -> device tensor in storage layout (NCHW, or NHWC for channels_last)."""
        torch = self._torch()
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(self._device)
        if t.dim() == 4 and not CHANNELS_LAST:
            t = t.permute(0, 3, 1, 2).contiguous()  # converted once, here, not per batch
        return t

    @staticmethod
    def _compute_view(t):
        """Storage tensor -> the logical NCHW tensor torch layers take (a view, no copy).

        With channels_last the storage is NHWC and permuting it is exactly a
        channels_last-strided NCHW tensor, so gathering batches stays a contiguous copy.
        """
        return t.permute(0, 3, 1, 2) if (CHANNELS_LAST and t.dim() == 4) else t

    def put_data(self, x: np.ndarray, y: np.ndarray) -> _Data:
        torch = self._torch()
        if len(x) != len(y):
            raise ValueError(f"x has {len(x)} samples but y has {len(y)}")
        yt = torch.from_numpy(np.asarray(y, dtype=np.int64)).to(self._device)
        return _Data(self._to_storage(x), yt, len(y))

    # -- model ---------------------------------------------------------------------------

    def build(self, spec: TaskSpec, weights: list[np.ndarray], *,
              trainable: tuple[str, ...] | None, mode: str) -> _Model:
        torch = self._torch()
        from torch import nn

        check_build(spec, trainable=trainable, mode=mode)

        def conv(layer, in_shape):
            return nn.Conv2d(in_shape[2], layer.filters, layer.kernel_size, padding=layer.padding)

        def dense(layer, in_shape):
            return nn.Linear(in_shape[0], layer.units)

        factories = {
            "conv2d": conv,
            "dense": dense,
            "maxpool2d": lambda layer, in_shape: nn.MaxPool2d(layer.pool_size),
            "flatten": lambda layer, in_shape: nn.Flatten(),
        }
        modules, param_layers = [], []
        in_shape, pending_perm = tuple(spec.input_shape), None
        for layer, out_shape in zip(spec.layers, spec.layer_shapes()):
            mod = factories[layer.kind](layer, in_shape)
            modules.append(mod)
            if layer.kind == "flatten" and len(in_shape) == 3:
                pending_perm = _flatten_permutation(in_shape)
            if layer.kind in ("dense", "conv2d"):
                perm = pending_perm if layer.kind == "dense" else None
                pending_perm = None if layer.kind == "dense" else pending_perm
                param_layers.append((layer.name, mod, layer.kind, perm))
            if getattr(layer, "activation", "linear") == "relu":
                modules.append(nn.ReLU())
            in_shape = out_shape
        module = nn.Sequential(*modules).to(self._device)
        if CHANNELS_LAST:
            module = module.to(memory_format=torch.channels_last)
        params = [p for _, mod, _, _ in param_layers for p in (mod.weight, mod.bias)]
        train_params = []
        for name, mod, _, _ in param_layers:
            train = trainable is None or name in trainable
            for p in (mod.weight, mod.bias):
                p.requires_grad_(train)
                if train:
                    train_params.append(p)
        model = _Model(spec=spec, module=module, param_layers=param_layers, params=params,
                       trainable=train_params, optimizer=None, mode=mode)
        self.set_weights(model, weights)
        self._make_steps(model)
        return model

    def _new_optimizer(self, model: _Model):
        torch = self._torch()
        opt = model.spec.optimizer
        if not model.trainable:
            return None
        # fused=True: one kernel over all parameters (CPU and CUDA). MNIST-MLP step,
        # 40 interleaved chunks of 20 steps on the loaded 2-core CPU, samples/s best /
        # median: fused 51.8k / 15.6k, foreach 41.5k / 13.4k, default 37.6k / 14.2k.
        return torch.optim.Adam(model.trainable, lr=opt.lr, betas=(opt.beta1, opt.beta2), eps=opt.eps,
                                fused=True)

    def _autocast(self):
        torch = self._torch()
        if self._precision == "bf16":
            return torch.autocast(device_type=self._device.type, dtype=torch.bfloat16)
        import contextlib

        return contextlib.nullcontext()

    def _make_steps(self, model: _Model) -> None:
        torch = self._torch()
        import torch.nn.functional as F

        module = model.module
        autocast = self._autocast

        def loss_fn(xb, yb):
            with autocast():
                logits = module(xb)
            return F.cross_entropy(logits.float(), yb)

        def eval_fn(xb, yb):
            with autocast():
                logits = module(xb).float()
            losses = F.cross_entropy(logits, yb, reduction="sum")
            correct = (logits.argmax(dim=1) == yb).sum()
            return losses, correct

        if model.mode == "compiled":
            # torch.compile (inductor, C++ codegen) of forward + loss; autograd runs the
            # compiled backward graph; the fused Adam step stays eager. On this 2-core CPU
            # it does NOT pay off (interleaved chunks, shared loaded machine, samples/s
            # best / median): MLP plain 26.0k / 10.6k, eager 35.3k / 17.2k, compiled
            # 27.2k / 14.9k; CNN plain 492 / 386, eager 518 / 414, compiled 373 / 299
            # (also 0.78x plain with NCHW). Compile adds ~3 s (MLP) and ~3-18 s (CNN, warm
            # vs cold inductor cache) to warm-up. Eager is the adapter's best on CPU; on
            # CUDA compiled mode is expected to win (fused kernels, fewer launches).
            # dynamic=False: every batch shape gets its own specialised graph (the last
            # partial eval batch is one more); automatic dynamic shapes would otherwise
            # recompile the whole graph symbolically, which is slower on CPU.
            loss_fn = torch.compile(loss_fn, dynamic=False)
            eval_fn = torch.compile(eval_fn, dynamic=False)

        def train_step(xb, yb):
            loss = loss_fn(xb, yb)
            loss.backward()
            model.optimizer.step()
            model.optimizer.zero_grad(set_to_none=True)
            return loss.detach()

        model.train_step = train_step
        model.eval_step = eval_fn

    def get_weights(self, model: _Model) -> list[np.ndarray]:
        out = []
        with self._torch().no_grad():
            for _, mod, kind, perm in model.param_layers:
                w = mod.weight.detach().to("cpu").numpy()
                if kind == "conv2d":
                    kernel = w.transpose(2, 3, 1, 0)  # OIHW -> HWIO
                else:
                    kernel = w.T  # (out, in) -> (in, out)
                    if perm is not None:
                        kernel = kernel[np.argsort(perm)]
                out.append(np.array(kernel, dtype=np.float32, order="C"))
                out.append(np.array(mod.bias.detach().to("cpu").numpy(), dtype=np.float32))
        return out

    def set_weights(self, model: _Model, weights: list[np.ndarray]) -> None:
        torch = self._torch()
        if len(weights) != 2 * len(model.param_layers):
            raise ValueError(f"{len(weights)} arrays given, the model has {2 * len(model.param_layers)}")
        with torch.no_grad():
            for i, (name, mod, kind, perm) in enumerate(model.param_layers):
                kernel = np.asarray(weights[2 * i], dtype=np.float32)
                bias = np.asarray(weights[2 * i + 1], dtype=np.float32)
                if kind == "conv2d":
                    kernel = kernel.transpose(3, 2, 0, 1)  # HWIO -> OIHW
                else:
                    if perm is not None:
                        kernel = kernel[perm]
                    kernel = kernel.T
                if tuple(kernel.shape) != tuple(mod.weight.shape) or tuple(bias.shape) != tuple(mod.bias.shape):
                    raise ValueError(f"layer {name!r}: weights of shape {weights[2 * i].shape}/{bias.shape} "
                                     f"do not fit")
                # copy_ keeps the parameter objects (and their memory format), so the
                # optimizer and any compiled graph keep pointing at the same tensors.
                mod.weight.copy_(torch.from_numpy(np.ascontiguousarray(kernel)))
                mod.bias.copy_(torch.from_numpy(np.ascontiguousarray(bias)))
                mod.weight.grad = None
                mod.bias.grad = None
        # A fresh optimizer: zero moments, step count 0.
        model.optimizer = self._new_optimizer(model)

    # -- primitive steps -----------------------------------------------------------------

    def _batch(self, data: _Data, idx):
        return self._compute_view(data.x.index_select(0, idx)), data.y.index_select(0, idx)

    def train_epoch(self, model: _Model, data: _Data, order: np.ndarray, batch_size: int) -> np.ndarray:
        torch = self._torch()
        steps = len(order) // batch_size
        if steps == 0:
            return np.zeros(0, np.float32)
        if model.optimizer is None:
            raise RuntimeError("no trainable parameter layers: nothing to train")
        order_t = torch.from_numpy(np.asarray(order[: steps * batch_size], dtype=np.int64)).to(self._device)
        model.module.train()
        losses = []
        for i in range(steps):
            xb, yb = self._batch(data, order_t[i * batch_size:(i + 1) * batch_size])
            losses.append(model.train_step(xb, yb))
        return torch.stack(losses).to("cpu").numpy().astype(np.float32)

    def evaluate(self, model: _Model, data: _Data, batch_size: int) -> tuple[float, float]:
        torch = self._torch()
        model.module.eval()
        total = torch.zeros((), dtype=torch.float64, device=self._device)
        correct = torch.zeros((), dtype=torch.int64, device=self._device)
        with torch.no_grad():
            for start in range(0, data.n, batch_size):
                xb = self._compute_view(data.x[start:start + batch_size])
                loss_sum, hits = model.eval_step(xb, data.y[start:start + batch_size])
                total += loss_sum
                correct += hits
        result = torch.stack([total, correct.double()]).to("cpu").numpy()
        return float(result[0] / data.n), float(result[1] / data.n)

    def logits(self, model: _Model, x: np.ndarray) -> np.ndarray:
        torch = self._torch()
        model.module.eval()
        with torch.no_grad(), self._autocast():
            out = model.module(self._compute_view(self._to_storage(x)))
        return out.float().to("cpu").numpy()

