"""The tiny-gpt task: a byte-level causal transformer language model, sizes given as plain data."""

from __future__ import annotations

import dataclasses
import math

from tasks.spec import (
    AdamW,
    Dense,
    Embedding,
    LayerNorm,
    MultiHeadSelfAttention,
    PositionalEmbedding,
    Residual,
    SpecError,
    Stage,
    TaskSpec,
    WarmupCosine,
)

VOCAB = 256  # bytes: no tokenizer to install, and bits per byte is the loss over ln 2
# The default sizes (issue 17); `--override d_model=768,layers=12,heads=12,context=1024`
# makes it GPT-2-small shaped (with a 256-byte vocabulary).
SIZES = {"d_model": 128, "layers": 4, "heads": 4, "context": 128, "batch_size": 32}
# Held-out loss a run should reach: about 2.3 bits per byte, where a byte model has learnt
# words, not just letter frequencies (unigram English is about 4.5 bits per byte).
TARGET_LOSS = 1.6


def gpt_layers(*, d_model: int, layers: int, heads: int, context: int, lora_rank: int = 0,
               lora_alpha: float = 1.0, vocab: int = VOCAB, gpt2: bool = False) -> tuple:
    """Token + learned position embeddings, pre-LayerNorm blocks (attention, then a 4x GELU MLP), LayerNorm, head.

    gpt2: GPT-2 exactly: the head tied to the token embedding without a bias, GELU's tanh
    approximation, kernels N(0, 0.02) with the residual projections (attention output, MLP
    projection) N(0, 0.02 / sqrt(2 layers)). Otherwise tiny-gpt's own: an untied head with a
    bias, exact GELU, Glorot kernels.
    """
    init = {"kernel_init": "normal"} if gpt2 else {}
    residual_std = 0.02 / math.sqrt(2 * layers)
    blocks = []
    for i in range(layers):
        blocks += [
            Residual(name=f"block{i}_attn", body=(
                LayerNorm(name=f"block{i}_ln1"),
                MultiHeadSelfAttention(heads=heads, causal=True, lora_rank=lora_rank, lora_alpha=lora_alpha,
                                       name=f"block{i}_attn_mhsa",
                                       **({**init, "out_init_std": residual_std} if gpt2 else {})))),
            Residual(name=f"block{i}_mlp", body=(
                LayerNorm(name=f"block{i}_ln2"),
                Dense(units=4 * d_model, activation="gelu_tanh" if gpt2 else "gelu", name=f"block{i}_fc", **init),
                Dense(units=d_model, name=f"block{i}_proj", **({**init, "init_std": residual_std} if gpt2 else {})))),
        ]
    head = (Dense(units=vocab, name="head", tied_to="tok_emb", use_bias=False) if gpt2
            else Dense(units=vocab, name="head"))
    return (Embedding(vocab_size=vocab, dim=d_model, name="tok_emb"),
            PositionalEmbedding(max_len=context, name="pos_emb"),
            *blocks,
            LayerNorm(name="ln_f"),
            head)


def tiny_gpt(*, name: str = "tiny-gpt", d_model: int = SIZES["d_model"], layers: int = SIZES["layers"],
             heads: int = SIZES["heads"], context: int = SIZES["context"], batch_size: int = SIZES["batch_size"],
             epochs: int = 2, lr: float = 1e-3, lora_rank: int = 0,
             lora_alpha: float = 1.0, vocab: int = VOCAB, gpt2: bool = False, **spec_fields) -> TaskSpec:
    """The spec at these sizes. The schedule's length is left to the run: epochs x the steps per
    epoch of the data each stage trains on (TaskSpec.sized_for), 5% of it warm-up. gpt2: GPT-2's
    exact architecture (gpt_layers) and its weight-decay groups (the weight matrices only)."""
    for key, value in (("d_model", d_model), ("layers", layers), ("heads", heads), ("context", context),
                       ("vocab", vocab)):
        if not isinstance(value, int) or value <= 0:
            raise SpecError(f"tiny-gpt: {key} must be a positive int, got {value!r}")
    return TaskSpec(
        name=name, dataset="text", input_shape=(context,),
        layers=gpt_layers(d_model=d_model, layers=layers, heads=heads, context=context, lora_rank=lora_rank,
                          lora_alpha=lora_alpha, vocab=vocab, gpt2=gpt2),
        optimizer=AdamW(lr=lr, weight_decay=0.1, clip_norm=1.0, decay="matrices" if gpt2 else "all",
                        schedule=WarmupCosine()),
        batch_size=batch_size, epochs=epochs,
        # target_accuracy is next-byte accuracy; the loss is the target that counts here.
        **{"target_accuracy": 0.5, "target_loss": TARGET_LOSS, "eval_batch_size": max(batch_size, 64),
           "num_classes": vocab, **spec_fields})


def untrained_loss() -> float:
    """ln 256: the loss of uniform next-byte guesses, about what the fresh model scores."""
    return math.log(VOCAB)


TINY_GPT = tiny_gpt()

FINETUNE_SIZES = {"d_model": 64, "layers": 2, "heads": 2, "context": 64, "batch_size": 32}
CORPUS_B = "licenses"  # legal English (/usr/share/common-licenses) after fortunes' jokes and quotations


def tiny_gpt_finetune(*, name: str = "tiny-gpt-finetune", corpus_b: str = CORPUS_B,
                      d_model: int = FINETUNE_SIZES["d_model"], layers: int = FINETUNE_SIZES["layers"],
                      heads: int = FINETUNE_SIZES["heads"], context: int = FINETUNE_SIZES["context"],
                      batch_size: int = FINETUNE_SIZES["batch_size"], lora_rank: int = 4, lora_alpha: float = 8.0,
                      **spec_fields) -> TaskSpec:
    """Pretrain on the run's corpus (A); then on corpus B: finetune with the embeddings and the lower
    half of the blocks frozen, lora (from the pretrained weights) training only rank-`lora_rank`
    adapters on every attention projection, and a scratch control from fresh weights, same budget.

    The adapters sit in the model from the start (B = 0: they add nothing) and train only in
    the lora stage; the other stages name the arrays they train, adapters excluded.

    Each stage's schedule spans its own steps: a full warm-up and cosine on corpus B too.
    """
    base = tiny_gpt(name=name, d_model=d_model, layers=layers, heads=heads, context=context, batch_size=batch_size,
                    lora_rank=lora_rank, lora_alpha=lora_alpha, **spec_fields)
    lora = tuple(e.name for e in base.params() if "_lora_" in e.param.name)
    pretrained = tuple(e.name for e in base.params() if e.name not in lora)
    upper = tuple(n for n in pretrained if n.startswith("block") and int(n[5:].split("_")[0]) >= layers // 2
                  or n.startswith(("ln_f.", "head.")))
    return dataclasses.replace(base, stages=(
        Stage(name="pretrain", trainable=pretrained),
        Stage(name="finetune", init="pretrain", trainable=upper, data=corpus_b),
        Stage(name="lora", init="pretrain", trainable=lora, data=corpus_b),
        # The control: the same budget on corpus B from fresh weights, every pretrained-kind array trained.
        Stage(name="scratch", trainable=pretrained, data=corpus_b, control_for="finetune"),
    ), primary_stage="finetune")


TINY_GPT_FINETUNE = tiny_gpt_finetune()
