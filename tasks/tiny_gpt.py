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
               lora_alpha: float = 1.0) -> tuple:
    """Token + learned position embeddings, pre-LayerNorm blocks (attention, then a 4x GELU MLP), LayerNorm, head."""
    blocks = []
    for i in range(layers):
        blocks += [
            Residual(name=f"block{i}_attn", body=(
                LayerNorm(name=f"block{i}_ln1"),
                MultiHeadSelfAttention(heads=heads, causal=True, lora_rank=lora_rank, lora_alpha=lora_alpha,
                                       name=f"block{i}_attn_mhsa"))),
            Residual(name=f"block{i}_mlp", body=(
                LayerNorm(name=f"block{i}_ln2"),
                Dense(units=4 * d_model, activation="gelu", name=f"block{i}_fc"),
                Dense(units=d_model, name=f"block{i}_proj"))),
        ]
    return (Embedding(vocab_size=VOCAB, dim=d_model, name="tok_emb"),
            PositionalEmbedding(max_len=context, name="pos_emb"),
            *blocks,
            LayerNorm(name="ln_f"),
            Dense(units=VOCAB, name="head"))


def tiny_gpt(*, name: str = "tiny-gpt", d_model: int = SIZES["d_model"], layers: int = SIZES["layers"],
             heads: int = SIZES["heads"], context: int = SIZES["context"], batch_size: int = SIZES["batch_size"],
             epochs: int = 2, lr: float = 1e-3, steps_per_epoch: int = 566, lora_rank: int = 0,
             lora_alpha: float = 1.0, **spec_fields) -> TaskSpec:
    """The spec at these sizes. The schedule's length is epochs x steps_per_epoch, fixed in the spec
    (every backend steps the same table); the default 566 is fortunes' 2,318,984 training bytes in
    windows of 128, batches of 32. Another corpus or size: pass steps_per_epoch in --override, or
    the rate reaches 0 early (and stays there) or never finishes its decay."""
    for key, value in (("d_model", d_model), ("layers", layers), ("heads", heads), ("context", context)):
        if not isinstance(value, int) or value <= 0:
            raise SpecError(f"tiny-gpt: {key} must be a positive int, got {value!r}")
    total = epochs * steps_per_epoch
    return TaskSpec(
        name=name, dataset="text", input_shape=(context,),
        layers=gpt_layers(d_model=d_model, layers=layers, heads=heads, context=context, lora_rank=lora_rank,
                          lora_alpha=lora_alpha),
        optimizer=AdamW(lr=lr, weight_decay=0.1, clip_norm=1.0,
                        schedule=WarmupCosine(warmup_steps=max(1, total // 20), total_steps=total)),
        batch_size=batch_size, epochs=epochs,
        # target_accuracy is next-byte accuracy; the loss is the target that counts here.
        **{"target_accuracy": 0.5, "target_loss": TARGET_LOSS, "eval_batch_size": max(batch_size, 64),
           "num_classes": VOCAB, **spec_fields})


def untrained_loss() -> float:
    """ln 256: the loss of uniform next-byte guesses, about what the fresh model scores."""
    return math.log(VOCAB)


TINY_GPT = tiny_gpt()

FINETUNE_SIZES = {"d_model": 64, "layers": 2, "heads": 2, "context": 64, "batch_size": 32}
CORPUS_B = "licenses"  # legal English (/usr/share/common-licenses) after fortunes' jokes and quotations


def tiny_gpt_finetune(*, name: str = "tiny-gpt-finetune", corpus_b: str = CORPUS_B,
                      d_model: int = FINETUNE_SIZES["d_model"], layers: int = FINETUNE_SIZES["layers"],
                      heads: int = FINETUNE_SIZES["heads"], context: int = FINETUNE_SIZES["context"],
                      batch_size: int = FINETUNE_SIZES["batch_size"], steps_per_epoch: int = 1132,
                      lora_rank: int = 4, lora_alpha: float = 8.0, **spec_fields) -> TaskSpec:
    """Pretrain on the run's corpus (A); then on corpus B: finetune with the embeddings and the lower
    half of the blocks frozen, lora (from the pretrained weights) training only rank-`lora_rank`
    adapters on every attention projection, and a scratch control from fresh weights, same budget.

    The adapters sit in the model from the start (B = 0: they add nothing) and train only in
    the lora stage; the other stages name the arrays they train, adapters excluded.

    Every stage steps the same schedule, sized for pretraining on fortunes (1,132 steps of
    64-byte windows per epoch); licenses' 104 steps per epoch then run warm-up and the early,
    near-peak part of the cosine.
    """
    base = tiny_gpt(name=name, d_model=d_model, layers=layers, heads=heads, context=context, batch_size=batch_size,
                    steps_per_epoch=steps_per_epoch, lora_rank=lora_rank, lora_alpha=lora_alpha, **spec_fields)
    lora = tuple(e.name for e in base.params() if "_lora_" in e.param.name)
    pretrained = tuple(e.name for e in base.params() if e.name not in lora)
    upper = tuple(n for n in pretrained if n.startswith("block") and int(n[5:].split("_")[0]) >= layers // 2
                  or n.startswith(("ln_f.", "head.")))
    return dataclasses.replace(base, stages=(
        Stage(name="pretrain", trainable=pretrained),
        Stage(name="finetune", init="pretrain", trainable=upper, data=corpus_b),
        Stage(name="lora", init="pretrain", trainable=lora, data=corpus_b),
        # The control: the same budget on corpus B from fresh weights, every pretrained-kind array trained.
        Stage(name="scratch", trainable=pretrained, data=corpus_b),
    ), primary_stage="finetune")


TINY_GPT_FINETUNE = tiny_gpt_finetune()
