"""The gpt2 task: GPT-2's exact architecture (tied head, tanh GELU, its initialisation and decay groups) at any size."""

from __future__ import annotations

import dataclasses

from tasks.spec import Stage, TaskSpec
from tasks.tiny_gpt import VOCAB, tiny_gpt

# GPT-2 small (124M with its 50,257-token vocabulary). A Hugging Face folder given to
# --init-from replaces these with its config.json's (harness/hf_gpt2.py).
GPT2_SIZES = {"d_model": 768, "layers": 12, "heads": 12, "context": 1024, "batch_size": 8}
# Held-out nats per token a finetuned GPT-2 small reaches on English prose: its own loss on
# OpenWebText is 3.11 (nanoGPT's evaluation); a narrower corpus goes below it.
TARGET_LOSS = 3.0


def gpt2(*, name: str = "gpt2", d_model: int = GPT2_SIZES["d_model"], layers: int = GPT2_SIZES["layers"],
         heads: int = GPT2_SIZES["heads"], context: int = GPT2_SIZES["context"],
         batch_size: int = GPT2_SIZES["batch_size"], vocab: int = VOCAB, epochs: int = 1, lr: float = 1e-4,
         lora_rank: int = 0, lora_alpha: float = 1.0, **spec_fields) -> TaskSpec:
    """GPT-2 at these sizes, for finetuning: AdamW decaying the weight matrices only, a warm-up
    cosine over the run. Bytes (256 tokens) unless a tokenizer or a checkpoint sets the vocabulary."""
    return tiny_gpt(name=name, d_model=d_model, layers=layers, heads=heads, context=context, batch_size=batch_size,
                    vocab=vocab, epochs=epochs, lr=lr, gpt2=True, lora_rank=lora_rank, lora_alpha=lora_alpha,
                    **{"target_loss": TARGET_LOSS, **spec_fields})


GPT2 = gpt2()


def gpt2_finetune(*, name: str = "gpt2-finetune", lora_rank: int = 8, lora_alpha: float = 16.0,
                  **sizes) -> TaskSpec:
    """GPT-2 finetuned three ways on the run's data, each from the pretrained weights (a Hugging Face
    folder given to --init-from stands in for `pretrain`, which then does not run): `finetune`
    trains every pretrained array, `lora` the rank-`lora_rank` adapters on every attention
    projection alone, and `scratch` is the control from fresh weights with the same budget."""
    base = gpt2(name=name, lora_rank=lora_rank, lora_alpha=lora_alpha, **sizes)
    lora = tuple(e.name for e in base.params() if "_lora_" in e.param.name)
    pretrained = tuple(e.name for e in base.params() if e.name not in lora)
    return dataclasses.replace(base, stages=(
        Stage(name="pretrain", trainable=pretrained),
        Stage(name="finetune", init="pretrain", trainable=pretrained),
        Stage(name="lora", init="pretrain", trainable=lora),
        Stage(name="scratch", trainable=pretrained),
    ), primary_stage="finetune")


GPT2_FINETUNE = gpt2_finetune()
