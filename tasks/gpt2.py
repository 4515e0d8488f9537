"""The gpt2 task: GPT-2's exact architecture (tied head, tanh GELU, its initialisation and decay groups) at any size."""

from __future__ import annotations

from tasks.spec import TaskSpec
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
         **spec_fields) -> TaskSpec:
    """GPT-2 at these sizes, for finetuning: AdamW decaying the weight matrices only, a warm-up
    cosine over the run. Bytes (256 tokens) unless a tokenizer or a checkpoint sets the vocabulary."""
    return tiny_gpt(name=name, d_model=d_model, layers=layers, heads=heads, context=context, batch_size=batch_size,
                    vocab=vocab, epochs=epochs, lr=lr, gpt2=True,
                    **{"target_loss": TARGET_LOSS, **spec_fields})


GPT2 = gpt2()
