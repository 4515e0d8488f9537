"""Tokenizers for text tasks: a Hugging Face tokenizer.json (the `tokenizers` library), or bytes when there is none."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

TOKENIZER_FILE = "tokenizer.json"
MAX_TOKENIZER_BYTES = 64 * 2**20  # GPT-2's tokenizer.json is 1.4 MB


def tokenizer_file(init_from: str | None) -> Path | None:
    """The tokenizer.json of a Hugging Face folder given to --init-from, if it has one."""
    if not init_from or not Path(init_from).is_dir():
        return None
    path = Path(init_from) / TOKENIZER_FILE
    return path if path.exists() else None


def load_tokenizer(path: Path) -> tuple[Callable[[bytes], np.ndarray], int]:
    """(encode: UTF-8 text -> int32 token ids, vocabulary size) of a tokenizer.json.

    Read as JSON by `tokenizers` (no code runs), after the file is checked to be a regular
    file of bounded size.
    """
    from harness.checkpoint import open_regular
    from harness.errors import DataError

    try:
        import tokenizers
    except ImportError:
        raise DataError(f"{path}: reading a tokenizer needs the tokenizers package: "
                        "pip install \"tribench[hf]\" (or pip install tokenizers)") from None
    with os.fdopen(open_regular(Path(path)), "rb") as f:
        blob = f.read(MAX_TOKENIZER_BYTES + 1)
    if len(blob) > MAX_TOKENIZER_BYTES:
        raise DataError(f"{path}: larger than {MAX_TOKENIZER_BYTES} bytes")
    try:
        tokenizer = tokenizers.Tokenizer.from_str(blob.decode("utf-8"))
    except Exception as exc:  # the library raises its own exception type for any malformed file
        raise DataError(f"{path}: not a tokenizer.json ({type(exc).__name__}: {exc})") from None

    def encode(text: bytes) -> np.ndarray:
        return np.asarray(tokenizer.encode(text.decode("utf-8"), add_special_tokens=False).ids, np.int32)

    return encode, tokenizer.get_vocab_size()
