"""Text corpora for language models: a UTF-8 reader, the fixed split, windows of bytes or tokens, synthetic text."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

KIND = "text"
# Corpora a package manager installs, found offline: (folder, the Debian package). Files
# there are whatever version the distribution ships, so they carry no checksum; the record
# names the folder. `licenses` is a second domain (legal English) for finetuning.
SYSTEM_CORPORA = {
    "fortunes": (Path("/usr/share/games/fortunes"), "apt-get install fortunes"),
    "licenses": (Path("/usr/share/common-licenses"), "base-files (every Debian/Ubuntu)"),
}
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
    from harness.data import DataError

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


def markov_bytes(n: int, *, seed: int, stream: int) -> bytes:
    """n bytes of a seeded order-1 Markov chain over 32 printable bytes, 4 successors each.

    Learnable (its entropy is about 1.5 bits per byte against 8 for uniform bytes) and
    deterministic from the seed; the chain is the same for both splits, the walk is not.
    """
    alphabet = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz .,;!\n", np.uint8)
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
            tokenizer: Path | None = None):
    """Windows of bytes, or of a tokenizer.json's token ids (the split is made on the text first)."""
    from harness.data import Dataset

    if tokenizer is not None:
        from harness.tokens import load_tokenizer

        encode, _ = load_tokenizer(tokenizer)
        train, held_out = encode(train), encode(held_out)
    x_tr, y_tr = windows(train, context)
    x_te, y_te = windows(held_out, context)
    if not len(x_tr) or not len(x_te):
        from harness.data import DataError

        raise DataError(f"{source}: {len(train)} train / {len(held_out)} held-out bytes make no window of {context}")
    return Dataset(name, source, synthetic, x_tr, y_tr, x_te, y_te,
                   tokenizer=str(tokenizer) if tokenizer is not None else None)


def synthetic(*, context: int, seed: int, n_windows: tuple[int, int] | None = None, tokenizer: Path | None = None):
    """SYNTHETIC text: the Markov chain, SYNTHETIC_BYTES long or just enough for n_windows (train, held-out)
    of bytes (a tokenizer then makes fewer windows)."""
    sizes = [n * context + 1 for n in n_windows] if n_windows else SYNTHETIC_BYTES
    return dataset("synthetic-text", "synthetic", markov_bytes(sizes[0], seed=seed, stream=1),
                   markov_bytes(sizes[1], seed=seed, stream=2), context=context, synthetic=True, tokenizer=tokenizer)


def system_corpus(name: str) -> Path | None:
    folder = SYSTEM_CORPORA[name][0]
    return folder if folder.is_dir() and corpus_files(folder) else None


def resolve(choice: str, *, data_dir, allow_download: bool, locate) -> tuple[str, str]:
    """(corpus name, file or folder) for --data on a text task.

    auto: --data-dir itself (any UTF-8 file or folder), else fortunes, else a
    tiny-shakespeare found or downloaded (SHA-256 checked), else synthetic (said loudly).
    """
    from harness.data import DataError

    if choice == "synthetic":
        return "synthetic", "synthetic"
    if choice == "auto" and data_dir:
        return "text", str(data_dir)
    if choice in SYSTEM_CORPORA or choice == "auto":
        for name in ([choice] if choice != "auto" else list(SYSTEM_CORPORA)[:1]):
            folder = system_corpus(name)
            if folder:
                return name, str(folder)
            if choice != "auto":
                raise DataError(f"{name} not found in {SYSTEM_CORPORA[name][0]}; to get it: {SYSTEM_CORPORA[name][1]}")
    try:
        return "tiny-shakespeare", str(locate("tiny-shakespeare", data_dir, allow_download=allow_download))
    except DataError as exc:
        if choice != "auto":
            raise
        log.warning("no real text found, using SYNTHETIC text: %s", exc.args[0].splitlines()[0])
        return "synthetic", "synthetic"


def load(name: str, where: str, *, context: int, seed: int, subset: tuple[int, int] | None,
         tokenizer: Path | None = None):
    """The windows of a resolved corpus; with a subset, its first (n_train, n_test) windows.
    `tokenizer`: a tokenizer.json whose token ids the windows hold instead of bytes."""
    if name == "synthetic":
        ds = synthetic(context=context, seed=seed, n_windows=subset, tokenizer=tokenizer)
        if subset:
            ds.subset = f"{subset[0]} train / {subset[1]} held-out windows generated"
        return ds
    path = Path(where)
    if name == "tiny-shakespeare" and path.is_dir():
        path = path / "input.txt"
    train, held_out = read_corpus(path)
    ds = dataset(name, str(path), train, held_out, context=context, tokenizer=tokenizer)
    return ds.head(*subset) if subset else ds


def stage_corpus(choice: str, *, run_source: str, context: int, seed: int, subset: tuple[int, int] | None, locate,
                 tokenizer: Path | None = None):
    """The corpus a stage names (Stage.data). With synthetic run data, synthetic text of another seed:
    another chain, so another domain, and labelled synthetic like the run's."""
    if run_source == "synthetic":
        return load("synthetic", "synthetic", context=context, seed=seed + 1, subset=subset, tokenizer=tokenizer)
    name, where = resolve(choice, data_dir=None, allow_download=False, locate=locate)
    return load(name, where, context=context, seed=seed, subset=subset, tokenizer=tokenizer)
