"""Text corpora for language models: a UTF-8 reader, the fixed split, windows of bytes or tokens, synthetic text."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from harness.arrays import Dataset
from harness.errors import DataError
from tasks.datasets import BYTES, DATASETS, TEXT, findable

log = logging.getLogger(__name__)

TRAIN_FRACTION = 0.9  # the fixed rule: each file's first 90% of bytes train, its last 10% are held out
# Synthetic sizes in bytes (train, held-out): about tiny-shakespeare's.
SYNTHETIC_BYTES = (1_000_000, 100_000)


def corpus_files(path: Path) -> list[Path]:
    """The UTF-8 text files at `path` (a file, or a folder searched recursively), in sorted path order.

    Symlinks (fortunes' .u8 links, GPL -> GPL-3), hidden files and files that are not UTF-8
    text (fortunes' .dat indexes, archives) are skipped, so no byte is read twice.
    """
    path = Path(path)
    if path.is_file():
        return [path]
    files = []
    for p in sorted(path.rglob("*")):
        if p.is_symlink() or not p.is_file() or any(part.startswith(".") for part in p.relative_to(path).parts):
            continue
        if is_text(p.read_bytes()):
            files.append(p)
        else:
            log.info("%s: not UTF-8 text, skipped", p)
    return files


def is_text(blob: bytes) -> bool:
    if b"\0" in blob:
        return False
    try:
        blob.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def read_corpus(path: Path) -> tuple[bytes, bytes]:
    """(train bytes, held-out bytes): each file split at TRAIN_FRACTION, the parts concatenated in file order."""
    files = corpus_files(path)
    if not files:
        raise DataError(f"{path}: no UTF-8 text files")
    train, held_out = [], []
    for f in files:
        blob = f.read_bytes()
        if not is_text(blob):
            raise DataError(f"{f}: not UTF-8 text")
        cut = int(len(blob) * TRAIN_FRACTION)
        train.append(blob[:cut])
        held_out.append(blob[cut:])
    return b"".join(train), b"".join(held_out)


def windows(blob: bytes | np.ndarray, context: int) -> tuple[np.ndarray, np.ndarray]:
    """Non-overlapping windows: x[i] = tokens [i c, (i+1) c), y[i] shifted by one; every token is a target once.

    The tokens are the bytes of `blob`, or the ids a tokenizer made of them."""
    n = (len(blob) - 1) // context
    data = np.frombuffer(blob, np.uint8) if isinstance(blob, bytes) else blob
    x = data[: n * context].reshape(n, context).astype(np.int32)
    y = data[1: n * context + 1].reshape(n, context).astype(np.int32)
    return x, y


PRINTABLE = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz .,;!\n", np.uint8)


def markov_bytes(n: int, *, seed: int, stream: int, classes: int = BYTES) -> bytes:
    """n bytes of a seeded order-1 Markov chain over 32 printable bytes, 4 successors each.

    Learnable (its entropy is about 1.5 bits per byte against 8 for uniform bytes) and
    deterministic from the seed; the chain is the same for both splits, the walk is not.
    A vocabulary of fewer `classes` than those bytes need walks over byte values 0..31 (or fewer) instead.
    """
    alphabet = PRINTABLE if int(PRINTABLE.max()) < classes else np.arange(min(len(PRINTABLE), classes), dtype=np.uint8)
    rng = np.random.default_rng([seed, 0x7E47])
    successors = rng.integers(0, len(alphabet), (len(alphabet), 4))
    cdf = np.cumsum(rng.dirichlet(np.ones(4), len(alphabet)), axis=1)
    walk = np.random.default_rng([seed, 0x7E47, stream])
    u = walk.random(n)
    out = np.empty(n, np.int64)
    state = 0
    for i in range(n):  # a chain is sequential; 1 MB takes about a second
        state = successors[state, min(int(np.searchsorted(cdf[state], u[i])), 3)]
        out[i] = state
    return alphabet[out].tobytes()


def dataset(name: str, source: str, train: bytes, held_out: bytes, *, context: int, synthetic: bool = False,
            tokenizer: Path | None = None) -> Dataset:
    """Windows of bytes, or of a tokenizer.json's token ids (the split is made on the text first)."""
    if tokenizer is not None:
        from harness.tokens import load_tokenizer

        encode, _ = load_tokenizer(tokenizer)
        train, held_out = encode(train), encode(held_out)
    x_tr, y_tr = windows(train, context)
    x_te, y_te = windows(held_out, context)
    if not len(x_tr) or not len(x_te):
        raise DataError(f"{source}: {len(train)} train / {len(held_out)} held-out bytes make no window of {context}")
    return Dataset(name, source, synthetic, x_tr, y_tr, x_te, y_te,
                   tokenizer=str(tokenizer) if tokenizer is not None else None)


def synthetic(*, context: int, seed: int, n_windows: tuple[int, int] | None = None, tokenizer: Path | None = None,
              classes: int = BYTES) -> Dataset:
    """SYNTHETIC text: the Markov chain, SYNTHETIC_BYTES long or just enough for n_windows (train, held-out)
    of bytes (a tokenizer then makes fewer windows), its bytes below `classes`."""
    sizes = [n * context + 1 for n in n_windows] if n_windows else SYNTHETIC_BYTES
    return dataset("synthetic-text", "synthetic", markov_bytes(sizes[0], seed=seed, stream=1, classes=classes),
                   markov_bytes(sizes[1], seed=seed, stream=2, classes=classes), context=context, synthetic=True,
                   tokenizer=tokenizer)


def system_corpus(name: str) -> Path | None:
    """The folder where a package installed corpus `name` (the table's system_dir), if it holds text."""
    folder = Path(DATASETS[name].system_dir)
    return folder if folder.is_dir() and corpus_files(folder) else None


def resolve(choice: str, accepted: tuple[str, ...], *, data_dir, allow_download: bool, locate) -> tuple[str, str]:
    """(corpus name, file or folder) for --data on a text task accepting the corpora `accepted` (its own first).

    auto: --data-dir itself (any UTF-8 file or folder), else the task's own corpus (fortunes for
    any text), else the first downloadable corpus (tiny-shakespeare) found or downloaded (SHA-256
    checked), else synthetic (said loudly).
    """
    if choice == "synthetic":
        return "synthetic", "synthetic"
    if choice == "auto" and data_dir:
        return "text", str(data_dir)
    name = choice if choice != "auto" else accepted[0]
    if DATASETS[name].system_dir:
        folder = system_corpus(name)
        if folder:
            return name, str(folder)
        if choice != "auto":
            raise DataError(f"{name} not found in {DATASETS[name].system_dir}; to get it: {DATASETS[name].how_to_get}")
        name = next(n for n, d in DATASETS.items() if d.kind == TEXT and d.files)
    try:
        return name, str(locate(name, data_dir, allow_download=allow_download))
    except DataError as exc:
        if choice != "auto":
            raise
        log.warning("no real text found, using SYNTHETIC text: %s", exc.args[0].splitlines()[0])
        return "synthetic", "synthetic"


def load(name: str, where: str, *, context: int, seed: int, subset: tuple[int, int] | None,
         tokenizer: Path | None = None, classes: int = BYTES) -> Dataset:
    """The windows of a resolved corpus; with a subset, its first (n_train, n_test) windows.
    `tokenizer`: a tokenizer.json whose token ids the windows hold instead of bytes; `classes`:
    the vocabulary synthetic text keeps to."""
    if name == "synthetic":
        ds = synthetic(context=context, seed=seed, n_windows=subset, tokenizer=tokenizer, classes=classes)
        if subset:
            ds.subset = f"{subset[0]} train / {subset[1]} held-out windows generated"
        return ds
    path = Path(where)
    files = DATASETS[name].files if name in DATASETS else {}
    if files and path.is_dir():  # a corpus with published files (tiny-shakespeare's input.txt) is that file
        (path,) = [path / f for f in files]
    train, held_out = read_corpus(path)
    ds = dataset(name, str(path), train, held_out, context=context, tokenizer=tokenizer)
    return ds.head(*subset) if subset else ds


def stage_corpus(choice: str, *, run_source: str, context: int, seed: int, subset: tuple[int, int] | None, locate,
                 tokenizer: Path | None = None, classes: int = BYTES) -> Dataset:
    """The corpus a stage names (Stage.data). With synthetic run data, synthetic text of another seed:
    another chain, so another domain, and labelled synthetic like the run's."""
    if run_source == "synthetic":
        return load("synthetic", "synthetic", context=context, seed=seed + 1, subset=subset, tokenizer=tokenizer,
                    classes=classes)
    own = (choice,) if choice in DATASETS else tuple(n for n in findable() if DATASETS[n].kind == TEXT)
    name, where = resolve(choice, own, data_dir=None, allow_download=False, locate=locate)
    return load(name, where, context=context, seed=seed, subset=subset, tokenizer=tokenizer)
