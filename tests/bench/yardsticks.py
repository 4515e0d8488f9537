"""Tutorial-style training loops per framework: the yardsticks the harness's own overhead is measured against."""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import numpy as np

from harness.weights import initial_weights
from tasks.cifar_cnn import CIFAR_CNN
from tasks.mnist_mlp import MNIST_MLP
from tasks.spec import TaskSpec
from tasks.tiny_gpt import TINY_GPT

FORTUNES_STEPS = 566  # tiny-gpt's steps per epoch on fortunes: what its schedule spans in a real run

# The yardsticks are hand-written models, not built from the spec (that is the harness's
# job); they exist only for the benchmark tasks. Loading the canonical weights into them
# fails loudly if a spec change makes the hand-written model differ from the task's.
TASKS: dict[str, TaskSpec] = {MNIST_MLP.name: MNIST_MLP, CIFAR_CNN.name: CIFAR_CNN,
                               TINY_GPT.name: TINY_GPT.sized_for(FORTUNES_STEPS)}
FRAMEWORKS = ("torch", "tensorflow", "jax")
TORCH_LOG_EVERY = 100  # the PyTorch tutorial reads loss.item() every 100 batches to print it
GPT_LOG_EVERY = 10  # nanoGPT's config/train_shakespeare_char.py: log_interval = 10
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
        self.x = np.asarray(x, np.int32 if self.spec.takes_tokens else np.float32)
        self.y = np.asarray(y, np.int32)
        self._setup()

    def _setup(self) -> None:
        raise NotImplementedError

    def _train(self, order: np.ndarray, *, record: bool) -> tuple[EpochTiming, np.ndarray | None]:
        """One pass over `order`; with `record`, also each step's training loss (read every step: untimed use only)."""
        raise NotImplementedError

    def epoch(self, order: np.ndarray) -> EpochTiming:
        return self._train(order, record=False)[0]

    def step_losses(self, order: np.ndarray) -> np.ndarray:
        """Each step's training loss over `order`: the parity check that the yardstick is the task's model."""
        return self._train(order, record=True)[1]

    def warmup(self, order: np.ndarray, *, steps: int | None = WARMUP_STEPS) -> None:
        """Untimed steps (None: a whole epoch) that pay for tracing, compiling and first allocations."""
        self.epoch(order if steps is None else order[: steps * self.batch_size])

    def predict_input(self, x: np.ndarray):
        """A canonical host batch as the tutorial's predict call takes it (on its device where it keeps one)."""
        return x

    def predict(self, x):
        """The framework's own idiomatic prediction of the current weights, returning once the logits are ready."""
        raise NotImplementedError


# -- PyTorch: nn.Sequential and the quickstart tutorial's loop ----------------------------

class TorchYardstick(Yardstick):
    framework = "torch"

    def _setup(self) -> None:
        import torch
        from torch import nn

        if self.task_name == TINY_GPT.name:
            self._setup_gpt(torch)
            return
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
        self.scheduler, self.clip, self.log_every = None, None, TORCH_LOG_EVERY
        self._torch = torch

    def predict_input(self, x: np.ndarray):
        torch = self._torch
        t = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)) if x.ndim == 4 else x.astype(np.int64))
        return t.to(self.device)

    def predict(self, x):
        torch = self._torch
        with torch.inference_mode():  # the tutorials' `model.eval()` + no-grad prediction
            out = self.model.eval()(x)
        if self.device == "cuda":
            torch.cuda.synchronize()
        return out

    def _setup_gpt(self, torch) -> None:
        """nanoGPT's model.py and train.py, cut down to the task: the same blocks, AdamW, warm-up + cosine, clipping."""
        model = _torch_gpt(torch, self.spec)
        _load_torch_gpt(model, self.spec, self.weights, torch)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = model.to(self.device)
        o = self.spec.optimizer
        s = o.schedule
        # nanoGPT's optimizer: fused AdamW on CUDA only. Every parameter decays (the task's
        # rule; nanoGPT would exempt biases and norms).
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                                           weight_decay=o.weight_decay, fused=self.device == "cuda")

        def get_lr(it):  # nanoGPT's get_lr (linear warm-up, cosine to 0) in the task's exact form, as a LambdaLR factor
            if it < s.warmup_steps:
                return (it + 1) / s.warmup_steps
            decay = s.total_steps - s.warmup_steps
            return 0.5 * (1.0 + math.cos(math.pi * min(it - s.warmup_steps, decay) / decay))

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, get_lr)
        self.loss_fn = torch.nn.CrossEntropyLoss()
        self.clip, self.log_every = o.clip_norm, GPT_LOG_EVERY
        # nanoGPT's get_batch turns numpy windows into int64 tensors; done once here, the gather per batch.
        self.xt = torch.from_numpy(self.x.astype(np.int64))
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

    def _train(self, order: np.ndarray, *, record: bool) -> tuple[EpochTiming, np.ndarray | None]:
        torch = self._torch
        model, loss_fn, optimizer = self.model, self.loss_fn, self.optimizer
        batches = torch.from_numpy(np.asarray(order, np.int64)).split(self.batch_size)
        losses = []
        t0 = time.perf_counter()
        model.train()
        steps = 0
        for batch, idx in enumerate(batches):
            X, y = self.xt[idx].to(self.device), self.yt[idx].to(self.device)
            pred = model(X)
            loss = loss_fn(pred.view(-1, pred.size(-1)), y.view(-1))  # per position for the GPT, as nanoGPT
            loss.backward()
            if self.clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), self.clip)
            optimizer.step()
            optimizer.zero_grad()
            if self.scheduler is not None:
                self.scheduler.step()
            if record:
                losses.append(loss.item())
            elif batch % self.log_every == 0:
                loss = loss.item()
            steps += 1
        # On CPU the loop is already synchronous; on CUDA the clock waits for the device.
        if self.device == "cuda":
            torch.cuda.synchronize()
        timing = EpochTiming(time.perf_counter() - t0, steps * self.batch_size)
        return timing, np.asarray(losses, np.float64) if record else None


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
        if self.task_name == TINY_GPT.name:
            self.model = _keras_gpt(keras, self.spec, self.weights)
            return
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

    def predict(self, x):
        return self.model.predict_on_batch(x)  # numpy out: the logits are ready

    def _train(self, order: np.ndarray, *, record: bool) -> tuple[EpochTiming, np.ndarray | None]:
        import keras

        # The harness's batch order applied up front, so fit(shuffle=False) sees the same
        # batches; the gather is data preparation, outside the clock.
        x, y = self.x[order], self.y[order]
        means = []
        # fit's per-batch logs hold the epoch's running mean of the loss: step i's own loss
        # is i m_i - (i - 1) m_(i-1).
        callbacks = [keras.callbacks.LambdaCallback(on_train_batch_end=lambda b, logs: means.append(logs["loss"]))]
        before = int(self.model.optimizer.iterations.numpy())
        t0 = time.perf_counter()
        self.model.fit(x, y, batch_size=self.batch_size, epochs=1, shuffle=False, verbose=0,
                       callbacks=callbacks if record else None)
        seconds = time.perf_counter() - t0  # fit returns after its last step's logs are read
        steps = int(self.model.optimizer.iterations.numpy()) - before
        losses = None
        if record:
            sums = np.arange(1, len(means) + 1) * np.asarray(means, np.float64)
            losses = np.diff(sums, prepend=0.0)
        return EpochTiming(seconds, steps * self.batch_size), losses


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

        o = self.spec.optimizer
        if self.task_name == TINY_GPT.name:
            module, params = _flax_gpt(self.spec, self.weights)
            s = o.schedule
            # optax's own warm-up + cosine, started at the task's first-step rate so that warm-up
            # matches the spec step for step; its cosine then runs one step ahead of the spec's
            # (relative rate difference below 0.3% over the default schedule; timing is unaffected).
            schedule = optax.warmup_cosine_decay_schedule(
                init_value=o.lr / s.warmup_steps, peak_value=o.lr, warmup_steps=s.warmup_steps - 1,
                decay_steps=s.total_steps - 1)
            tx = optax.chain(optax.clip_by_global_norm(o.clip_norm),
                             optax.adamw(schedule, b1=o.beta1, b2=o.beta2, eps=o.eps, weight_decay=o.weight_decay))
        else:
            module = MLP() if self.task_name == MNIST_MLP.name else CNN()
            # Canonical layout is flax's own (Dense (in, out), Conv HWIO, NHWC flattening).
            params = {name: {"kernel": jax.numpy.asarray(self.weights[2 * i]),
                             "bias": jax.numpy.asarray(self.weights[2 * i + 1])}
                      for i, name in enumerate(self.spec.param_layer_names())}
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
        self._apply = jax.jit(module.apply)  # flax examples' jitted eval apply

    def predict_input(self, x: np.ndarray):
        return self._jax.device_put(x)

    def predict(self, x):
        return self._jax.block_until_ready(self._apply({"params": self.state.params}, x))

    def _train(self, order: np.ndarray, *, record: bool) -> tuple[EpochTiming, np.ndarray | None]:
        jax = self._jax
        perms = np.asarray(order).reshape(-1, self.batch_size)
        before = int(self.state.step)
        t0 = time.perf_counter()
        state, epoch_loss = self.state, []
        for perm in perms:  # host numpy batches, as flax's examples/mnist feeds them
            state, loss = self.train_step(state, self.x[perm, ...], self.y[perm, ...])
            epoch_loss.append(loss)
        jax.block_until_ready(state)
        losses = np.asarray(jax.device_get(epoch_loss), np.float64)
        float(np.mean(losses))  # the example's end-of-epoch loss read
        seconds = time.perf_counter() - t0
        self.state = state
        return EpochTiming(seconds, (int(state.step) - before) * self.batch_size), losses if record else None


# -- tiny-gpt, as each framework's own tutorials write a small GPT -------------------------

@dataclass(frozen=True)
class GptSizes:
    vocab: int
    d_model: int
    heads: int
    layers: int
    context: int
    eps: float  # LayerNorm epsilon: pinned by the spec (torch's 1e-5), passed to Keras and flax explicitly


def gpt_sizes(spec: TaskSpec) -> GptSizes:
    attention = [layer for layer, _, _ in spec.walk() if layer.kind == "multiheadselfattention"]
    norms = {layer.eps for layer, _, _ in spec.walk() if layer.kind == "layernorm"}
    if len(norms) != 1 or any(a.lora_rank or not a.causal or a.head_dim for a in attention):
        raise ValueError(f"{spec.name}: the GPT yardsticks write plain causal attention and one LayerNorm epsilon")
    emb = spec.layers[0]
    return GptSizes(emb.vocab_size, emb.dim, attention[0].heads, len(attention), spec.input_shape[0], norms.pop())


def _gpt_weights(spec: TaskSpec, weights: list[np.ndarray]) -> dict[str, np.ndarray]:
    """The canonical arrays by canonical name; each loader pops what it uses and must leave nothing."""
    return {e.name: w for e, w in zip(spec.params(), weights)}


def _all_used(left: dict) -> None:
    if left:
        raise ValueError(f"canonical arrays the hand-written model has no place for: {', '.join(left)}")


def _torch_gpt(torch, spec: TaskSpec):
    """nanoGPT's model.py (CausalSelfAttention, MLP, Block, GPT) without dropout, weight tying or its own init."""
    from torch import nn
    from torch.nn import functional as F

    z = gpt_sizes(spec)

    class CausalSelfAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_attn = nn.Linear(z.d_model, 3 * z.d_model)  # q, k, v in one matrix, as nanoGPT
            self.c_proj = nn.Linear(z.d_model, z.d_model)

        def forward(self, x):
            B, T, C = x.size()
            q, k, v = self.c_attn(x).split(C, dim=2)
            q, k, v = (t.view(B, T, z.heads, C // z.heads).transpose(1, 2) for t in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # nanoGPT's flash path
            return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_fc, self.gelu = nn.Linear(z.d_model, 4 * z.d_model), nn.GELU()
            self.c_proj = nn.Linear(4 * z.d_model, z.d_model)

        def forward(self, x):
            return self.c_proj(self.gelu(self.c_fc(x)))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1, self.attn = nn.LayerNorm(z.d_model, eps=z.eps), CausalSelfAttention()
            self.ln_2, self.mlp = nn.LayerNorm(z.d_model, eps=z.eps), MLP()

        def forward(self, x):
            x = x + self.attn(self.ln_1(x))
            return x + self.mlp(self.ln_2(x))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.transformer = nn.ModuleDict(dict(
                wte=nn.Embedding(z.vocab, z.d_model), wpe=nn.Embedding(z.context, z.d_model),
                h=nn.ModuleList([Block() for _ in range(z.layers)]), ln_f=nn.LayerNorm(z.d_model, eps=z.eps)))
            self.lm_head = nn.Linear(z.d_model, z.vocab)  # the task's head has a bias and is not tied

        def forward(self, idx):
            pos = torch.arange(0, idx.size(1), dtype=torch.long, device=idx.device)
            x = self.transformer.wte(idx) + self.transformer.wpe(pos)
            for block in self.transformer.h:
                x = block(x)
            return self.lm_head(self.transformer.ln_f(x))

    return GPT()


def _load_torch_gpt(model, spec: TaskSpec, weights: list[np.ndarray], torch) -> None:
    """Canonical arrays into nanoGPT's layout: Linear (out, in); q, k, v kernels (d, heads, head_dim) packed
    as rows of c_attn; the output kernel (heads, head_dim, d) flattened to (d, d) and transposed."""
    w = _gpt_weights(spec, weights)
    t = model.transformer

    def linear(layer, kernel, bias):
        layer.weight.copy_(torch.from_numpy(np.ascontiguousarray(kernel.reshape(-1, kernel.shape[-1]).T)))
        layer.bias.copy_(torch.from_numpy(np.ascontiguousarray(bias.reshape(-1))))

    def norm(layer, name):
        layer.weight.copy_(torch.from_numpy(w.pop(f"{name}.scale")))
        layer.bias.copy_(torch.from_numpy(w.pop(f"{name}.offset")))

    with torch.no_grad():
        t.wte.weight.copy_(torch.from_numpy(w.pop("tok_emb.table")))
        t.wpe.weight.copy_(torch.from_numpy(w.pop("pos_emb.table")))
        for i, block in enumerate(t.h):
            a = f"block{i}_attn_mhsa"
            norm(block.ln_1, f"block{i}_ln1")
            qkv = [w.pop(f"{a}.{n}_kernel") for n in ("query", "key", "value")]
            qkv_bias = [w.pop(f"{a}.{n}_bias") for n in ("query", "key", "value")]
            linear(block.attn.c_attn, np.concatenate([k.reshape(k.shape[0], -1) for k in qkv], axis=1),
                   np.concatenate([b.reshape(-1) for b in qkv_bias]))
            linear(block.attn.c_proj, w.pop(f"{a}.out_kernel"), w.pop(f"{a}.out_bias"))
            norm(block.ln_2, f"block{i}_ln2")
            linear(block.mlp.c_fc, w.pop(f"block{i}_fc.kernel"), w.pop(f"block{i}_fc.bias"))
            linear(block.mlp.c_proj, w.pop(f"block{i}_proj.kernel"), w.pop(f"block{i}_proj.bias"))
        norm(t.ln_f, "ln_f")
        linear(model.lm_head, w.pop("head.kernel"), w.pop("head.bias"))
    _all_used(w)


def _keras_gpt(keras, spec: TaskSpec, weights: list[np.ndarray]):
    """Keras's "Text generation with a miniature GPT" example: TokenAndPositionEmbedding, TransformerBlock around
    layers.MultiHeadAttention(use_causal_mask=True), compile + fit; pre-LayerNorm and GELU, as the task."""
    from keras import layers, ops

    z = gpt_sizes(spec)

    class TokenAndPositionEmbedding(layers.Layer):
        def __init__(self, maxlen, vocab_size, embed_dim):
            super().__init__()
            self.token_emb = layers.Embedding(input_dim=vocab_size, output_dim=embed_dim)
            self.pos_emb = layers.Embedding(input_dim=maxlen, output_dim=embed_dim)

        def call(self, x):
            positions = ops.arange(0, ops.shape(x)[-1], 1)
            return self.token_emb(x) + self.pos_emb(positions)

    class TransformerBlock(layers.Layer):
        def __init__(self, embed_dim, num_heads, ff_dim):
            super().__init__()
            self.att = layers.MultiHeadAttention(num_heads, embed_dim // num_heads)
            self.ffn = keras.Sequential([layers.Dense(ff_dim, activation="gelu"), layers.Dense(embed_dim)])
            self.layernorm1 = layers.LayerNormalization(epsilon=z.eps)
            self.layernorm2 = layers.LayerNormalization(epsilon=z.eps)

        def call(self, inputs):
            x = self.layernorm1(inputs)
            x = inputs + self.att(x, x, use_causal_mask=True)
            return x + self.ffn(self.layernorm2(x))

    inputs = layers.Input(shape=(z.context,), dtype="int32")
    embedding = TokenAndPositionEmbedding(z.context, z.vocab, z.d_model)
    blocks = [TransformerBlock(z.d_model, z.heads, 4 * z.d_model) for _ in range(z.layers)]
    x = embedding(inputs)
    for block in blocks:
        x = block(x)
    ln_f, head = layers.LayerNormalization(epsilon=z.eps), layers.Dense(z.vocab)
    model = keras.Model(inputs=inputs, outputs=head(ln_f(x)))

    w = _gpt_weights(spec, weights)  # Keras's layouts are the canonical ones: set layer by layer
    embedding.token_emb.set_weights([w.pop("tok_emb.table")])
    embedding.pos_emb.set_weights([w.pop("pos_emb.table")])
    for i, block in enumerate(blocks):
        a = f"block{i}_attn_mhsa"
        block.layernorm1.set_weights([w.pop(f"block{i}_ln1.scale"), w.pop(f"block{i}_ln1.offset")])
        block.att.set_weights([w.pop(f"{a}.{n}") for n in ("query_kernel", "query_bias", "key_kernel", "key_bias",
                                                          "value_kernel", "value_bias", "out_kernel", "out_bias")])
        block.layernorm2.set_weights([w.pop(f"block{i}_ln2.scale"), w.pop(f"block{i}_ln2.offset")])
        block.ffn.layers[0].set_weights([w.pop(f"block{i}_fc.kernel"), w.pop(f"block{i}_fc.bias")])
        block.ffn.layers[1].set_weights([w.pop(f"block{i}_proj.kernel"), w.pop(f"block{i}_proj.bias")])
    ln_f.set_weights([w.pop("ln_f.scale"), w.pop("ln_f.offset")])
    head.set_weights([w.pop("head.kernel"), w.pop("head.bias")])
    _all_used(w)

    o = spec.optimizer
    s = o.schedule
    # Keras's own warm-up + cosine (CosineDecay with warmup_target), started at the task's
    # first-step rate: warm-up matches the spec step for step, the cosine runs one step ahead.
    schedule = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=o.lr / s.warmup_steps, warmup_target=o.lr, warmup_steps=s.warmup_steps - 1,
        decay_steps=s.total_steps - s.warmup_steps)
    # Keras's AdamW: decay decoupled and scaled by the rate like the task's; its epsilon sits
    # before bias correction (the task's sits after), a difference of order eps per step.
    # global_clipnorm is the task's clipping (Keras's clipnorm would clip each array alone).
    model.compile(optimizer=keras.optimizers.AdamW(learning_rate=schedule, weight_decay=o.weight_decay,
                                                   beta_1=o.beta1, beta_2=o.beta2, epsilon=o.eps,
                                                   global_clipnorm=o.clip_norm),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def _flax_gpt(spec: TaskSpec, weights: list[np.ndarray]):
    """(module, params): a linen GPT with nn.MultiHeadDotProductAttention and nn.make_causal_mask, as flax's lm1b
    example writes its decoder; the canonical layouts are flax's own, so the arrays load by name."""
    import flax.linen as nn
    import jax.numpy as jnp

    z = gpt_sizes(spec)

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x, mask):
            h = nn.LayerNorm(epsilon=z.eps, name="ln1")(x)
            x = x + nn.MultiHeadDotProductAttention(num_heads=z.heads, deterministic=True, name="attn")(h, mask=mask)
            h = nn.LayerNorm(epsilon=z.eps, name="ln2")(x)
            h = nn.Dense(z.d_model, name="proj")(nn.gelu(nn.Dense(4 * z.d_model, name="fc")(h), approximate=False))
            return x + h

    class GPT(nn.Module):
        @nn.compact
        def __call__(self, tokens):
            x = nn.Embed(z.vocab, z.d_model, name="tok_emb")(tokens)
            x = x + nn.Embed(z.context, z.d_model, name="pos_emb")(jnp.arange(tokens.shape[1]))
            mask = nn.make_causal_mask(tokens)
            for i in range(z.layers):
                x = Block(name=f"block{i}")(x, mask)
            return nn.Dense(z.vocab, name="head")(nn.LayerNorm(epsilon=z.eps, name="ln_f")(x))

    w = {k: jnp.asarray(v) for k, v in _gpt_weights(spec, weights).items()}

    def norm(name):
        return {"scale": w.pop(f"{name}.scale"), "bias": w.pop(f"{name}.offset")}

    def dense(name, kernel="kernel", bias="bias"):
        return {"kernel": w.pop(f"{name}.{kernel}"), "bias": w.pop(f"{name}.{bias}")}

    params = {"tok_emb": {"embedding": w.pop("tok_emb.table")}, "pos_emb": {"embedding": w.pop("pos_emb.table")}}
    for i in range(z.layers):
        a = f"block{i}_attn_mhsa"
        params[f"block{i}"] = {
            "ln1": norm(f"block{i}_ln1"), "ln2": norm(f"block{i}_ln2"),
            "attn": {n: dense(a, f"{n}_kernel", f"{n}_bias") for n in ("query", "key", "value", "out")},
            "fc": dense(f"block{i}_fc"), "proj": dense(f"block{i}_proj")}
    params["ln_f"], params["head"] = norm("ln_f"), dense("head")
    _all_used(w)
    return GPT(), params


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
