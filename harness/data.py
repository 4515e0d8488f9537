"""Datasets: the IDX and CIFAR readers, checksums, search order, download, synthetic data, and loading by the table."""

from __future__ import annotations

import gzip
import hashlib
import logging
import math
import os
import pickle
import struct
import tarfile
import tempfile
import urllib.request
from pathlib import Path

import numpy as np

from harness import safepickle, text
from harness.arrays import Dataset, check_labels
from harness.errors import DataError
from tasks.datasets import DATASETS, IMAGE, TEXT, DatasetInfo, findable, is_text
from tasks.targets import accepted

log = logging.getLogger(__name__)

ENV_VAR = "TRIBENCH_DATA"
SYSTEM_DIRS = (Path("/usr/share/datasets"),)


class ChecksumError(DataError):
    pass


# -- file formats ------------------------------------------------------------------------

IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path, count: int | None = None) -> np.ndarray:
    """Read an IDX file (optionally gzipped), checking the header against the payload size; with `count`,
    only its first `count` records are decompressed (a --quick subset reads a fifth of Fashion-MNIST)."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            head = f.read(4)
            if len(head) < 4 or head[0] != 0 or head[1] != 0 or head[2] not in IDX_DTYPES or not head[3]:
                raise DataError(f"{path}: not an IDX file (bad magic number)")
            packed = f.read(4 * head[3])
            if len(packed) < 4 * head[3]:
                raise DataError(f"{path}: truncated IDX header")
            dims = struct.unpack(f">{head[3]}I", packed)
            dtype = np.dtype(IDX_DTYPES[head[2]])
            expected = math.prod(dims) * dtype.itemsize  # Python ints: no overflow from a crafted header
            rows = dims[0] if count is None else min(count, dims[0])
            wanted = expected // dims[0] * rows if dims[0] else 0
            # A whole read also catches bytes past the payload.
            raw = f.read() if count is None else _read_up_to(f, wanted)
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot read ({exc}); the file is probably truncated or not gzip") from None
    if len(raw) != wanted:
        raise DataError(f"{path}: IDX header says {dims} ({expected} bytes) but the file holds "
                        f"{len(raw) if count is None else f'under {wanted}'} bytes: truncated or corrupt")
    return np.frombuffer(raw, dtype).reshape((rows, *dims[1:]))


def _read_up_to(f, size: int, block: int = 1 << 24) -> bytes:
    """At most `size` bytes of `f`, read in blocks: a header may promise more than the file holds,
    and one read(size) of a plain file allocates all of `size` first."""
    parts, left = [], size
    while left > 0 and (part := f.read(min(left, block))):
        parts.append(part)
        left -= len(part)
    return b"".join(parts)


def load_mnist_dir(folder: Path, subset: tuple[int, int] | None = None) -> tuple[np.ndarray, ...]:
    """The four IDX files of an MNIST-format folder; with `subset` = (n_train, n_test) only the first samples."""
    n_train, n_test = subset or (None, None)

    def images(name, count):
        return (read_idx(folder / name, count).astype(np.float32) / 255.0)[..., None]

    def labels(name, count):
        return read_idx(folder / name, count).astype(np.int32)

    x_tr, y_tr = images("train-images-idx3-ubyte.gz", n_train), labels("train-labels-idx1-ubyte.gz", n_train)
    x_te, y_te = images("t10k-images-idx3-ubyte.gz", n_test), labels("t10k-labels-idx1-ubyte.gz", n_test)
    if len(x_tr) != len(y_tr) or len(x_te) != len(y_te):
        raise DataError(f"{folder}: image and label counts differ")
    return x_tr, y_tr, x_te, y_te


def _cifar_batch(blob: bytes) -> tuple[np.ndarray, np.ndarray]:
    """(images NHWC uint8, labels) of one batch, read with the restricted unpickler: a file can hold data, not code."""
    batch = safepickle.loads(blob)
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise ValueError("not a CIFAR-10 batch (a dict with b'data' and b'labels')")
    data = np.asarray(batch[b"data"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise ValueError(f"b'data' is {data.dtype} {data.shape}, a CIFAR-10 batch holds uint8 (n, 3072)")
    y = np.asarray(batch[b"labels"], np.int32)
    if y.shape != (len(data),):
        raise ValueError(f"{len(data)} images but labels of shape {y.shape}")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), y


# The files of cifar-10-batches-py that hold batches; nothing else in that folder is read.
CIFAR_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)


def _cifar_batches(members) -> tuple[np.ndarray, ...]:
    """members: iterable of (name, bytes) of the cifar-10-batches-py files."""
    train, test = {}, None
    for name, blob in members:
        base = os.path.basename(name)
        if base in CIFAR_BATCHES:  # exactly the published names: data_batch_1.orig is never unpickled
            x, y = _cifar_batch(blob)
            if base == "test_batch":
                test = (x, y)
            else:
                train[base] = (x, y)
    if len(train) != 5 or test is None:
        raise DataError(f"CIFAR-10: found {len(train)} of 5 training batches and "
                        f"{'a' if test else 'no'} test batch")
    x_tr = np.concatenate([train[k][0] for k in sorted(train)]).astype(np.float32) / 255.0
    y_tr = np.concatenate([train[k][1] for k in sorted(train)])
    return x_tr, y_tr, test[0].astype(np.float32) / 255.0, test[1]


def load_cifar(path: Path) -> tuple[np.ndarray, ...]:
    """From cifar-10-python.tar.gz or an extracted cifar-10-batches-py folder."""
    path = Path(path)
    try:
        if path.is_dir():
            return _cifar_batches((name, (path / name).read_bytes()) for name in CIFAR_BATCHES
                                  if (path / name).is_file())
        with tarfile.open(path, "r:gz") as tar:
            return _cifar_batches((m.name, tar.extractfile(m).read()) for m in tar.getmembers()
                                  if m.isfile() and os.path.basename(m.name) in CIFAR_BATCHES)
    except (OSError, EOFError, tarfile.TarError, pickle.UnpicklingError, KeyError, ValueError, TypeError) as exc:
        raise DataError(f"{path}: cannot read CIFAR-10 ({type(exc).__name__}: {exc})") from None


# -- checksums, search, download ----------------------------------------------------------

def sha256_of(path: Path) -> str:
    return digest_of(path, "sha256")


def digest_of(path: Path, algorithm: str) -> str:
    digest = hashlib.new(algorithm, usedforsecurity=algorithm != "md5")
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify(path: Path, expected: str) -> None:
    """Check a file against its SHA-256 (64 hex digits) or, where only that is published, MD5 (32)."""
    algorithm, label = ("md5", "MD5") if len(expected) == 32 else ("sha256", "SHA-256")
    actual = digest_of(path, algorithm)
    if actual != expected:
        raise ChecksumError(f"{path}: {label} mismatch: expected {expected}, got {actual}; "
                            "the file is corrupt or not the published one; delete it and fetch it again")


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tribench"


def search_dirs(data_dir: str | Path | None) -> list[Path]:
    """Where to look, in order: --data-dir, $TRIBENCH_DATA, the user cache, system dirs."""
    dirs = [Path(data_dir)] if data_dir else []
    if os.environ.get(ENV_VAR):
        dirs.append(Path(os.environ[ENV_VAR]))
    return dirs + [cache_dir(), *SYSTEM_DIRS]


def candidates(source: DatasetInfo, root: Path) -> list[Path]:
    """A dataset may sit in root/<name>/ or directly in root."""
    return [root / source.name, root]


def find_source(source: DatasetInfo, data_dir=None) -> tuple[Path | None, list[Path]]:
    """(folder holding verified files or None, every folder looked in).

    A folder whose files exist but fail their checksum is reported and skipped: a
    corrupt file is never used. An extracted CIFAR-10 folder is checked file by file
    before anything in it is unpickled.
    """
    looked = []
    for root in search_dirs(data_dir):
        for folder in candidates(source, root):
            looked.append(folder)
            for where, files in ((folder / "cifar-10-batches-py", source.extracted), (folder, source.files)):
                if files and where.is_dir() and _verified(where, files):
                    return folder, looked
    return None, looked


def _verified(folder: Path, files: dict[str, str]) -> bool:
    """Every file present and matching its digest; a mismatch is reported, and the folder is never read."""
    if not all((folder / f).is_file() for f in files):
        return False
    try:
        for name, digest in files.items():
            verify(folder / name, digest)
    except ChecksumError as exc:
        log.warning("%s", exc)
        return False
    return True


def download(source: DatasetInfo, *, timeout: float = 30.0) -> Path:
    """Fetch into the cache: temp file, verify, then rename; a bad download never lands."""
    folder = cache_dir() / source.name
    folder.mkdir(parents=True, exist_ok=True)
    for name, digest in source.files.items():
        target = folder / name
        if target.is_file():
            continue
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(source.url + name, timeout=timeout) as resp:
                for block in iter(lambda: resp.read(1 << 20), b""):
                    out.write(block)
            verify(Path(tmp), digest)
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return folder


def locate(name: str, data_dir=None, *, allow_download: bool = True) -> Path:
    """The folder holding verified files of real dataset `name`, downloading where possible."""
    source = DATASETS[name]
    folder, looked = find_source(source, data_dir)
    if folder is None and allow_download:
        try:
            folder = download(source)
        except (OSError, ChecksumError) as exc:
            log.info("download of %s failed: %s", name, exc)
    if folder is None:
        tried = " and the download failed (offline?)" if allow_download else ""
        raise DataError(f"{not_found_line([name], looked)}{tried}. To get it: {source.how_to_get}. "
                        "Or use --data synthetic.")
    return folder


def _read_cifar(info: DatasetInfo, folder: Path) -> tuple[np.ndarray, ...]:
    # The extracted folder only when every batch matches its published digest (the
    # runner checked too, but this process may have been handed any folder).
    extracted = folder / "cifar-10-batches-py"
    use = extracted.is_dir() and _verified(extracted, info.extracted)
    return load_cifar(extracted if use else folder / "cifar-10-python.tar.gz")


# The image readers by the table's `reader` (text: harness.text), given the subset a run trains on: IDX
# decompresses only that much; CIFAR-10's batches are pickles, read whole.
IMAGE_READERS = {"idx": lambda info, folder, subset: load_mnist_dir(folder, subset),
                 "cifar": lambda info, folder, subset: _read_cifar(info, folder)}


def load_real(name: str, folder: Path, subset: tuple[int, int] | None = None) -> Dataset:
    """Real dataset `name` from a verified folder: all of it, or its first `subset` = (n_train, n_test) samples."""
    info = DATASETS[name]
    dataset = Dataset(name, str(folder), False, *IMAGE_READERS[info.reader](info, folder, subset))
    return dataset.head(*subset) if subset else dataset


# -- synthetic data -----------------------------------------------------------------------

SYNTHETIC_LABEL_NOISE = 0.05  # flipped labels: caps accuracy near 95% so parity gaps can show


def synthetic(dataset: str, *, n_train: int, n_test: int, seed: int, shape: tuple[int, ...] | None = None,
              classes: int | None = None) -> Dataset:
    """Deterministic, learnable images of `shape` in `classes` classes (default: image dataset `dataset`'s).

    Each class has a smooth random prototype image; a sample is its class prototype
    at a random contrast blended with uniform noise, and 5% of the labels are flipped.
    A model must learn the templates to beat chance (1 / classes) and cannot reach 100%, so
    accuracy differences between backends stay visible.
    """
    h, w, c = shape or DATASETS[dataset].shape
    classes = classes or DATASETS[dataset].classes
    rng = np.random.default_rng([seed, 0x5EED])
    coarse = rng.random((classes, (h + 3) // 4, (w + 3) // 4, c), dtype=np.float32)
    prototypes = coarse.repeat(4, axis=1).repeat(4, axis=2)[:, :h, :w, :]

    def split(n: int, stream: int):
        r = np.random.default_rng([seed, stream])
        y = r.integers(0, classes, n).astype(np.int32)
        x = np.empty((n, h, w, c), np.float32)
        for start in range(0, n, 4096):  # chunks keep peak memory near the output size
            stop = min(n, start + 4096)
            m = stop - start
            contrast = r.uniform(0.2, 0.6, (m, 1, 1, 1)).astype(np.float32)
            noise = r.random((m, h, w, c), dtype=np.float32)
            x[start:stop] = contrast * prototypes[y[start:stop]] + (1 - contrast) * noise
        flip = r.random(n) < SYNTHETIC_LABEL_NOISE
        y[flip] = r.integers(0, classes, int(flip.sum()))
        return x, y

    x_tr, y_tr = split(n_train, 1)
    x_te, y_te = split(n_test, 2)
    return Dataset(f"synthetic-{dataset}", "synthetic", True, x_tr, y_tr, x_te, y_te)


def accepted_for(spec) -> tuple[str, ...]:
    """The real datasets a task can train on, its own first: a language model's are the text corpora."""
    if is_text(spec.dataset):
        corpora = [n for n in findable() if DATASETS[n].kind == TEXT]
        return tuple(sorted(corpora, key=lambda n: n != spec.dataset))  # stable: the table's order after its own
    return accepted(spec)


def choices_for(accepted: tuple[str, ...]) -> list[str]:
    """Valid --data values for a task that accepts the real datasets `accepted` (accepted_for)."""
    return ["auto", *accepted, "synthetic"]


def choice_for(accepted: tuple[str, ...], choices: str) -> str:
    """The first of comma-separated --data values that fits a task accepting `accepted`.

    `--data cifar10,synthetic` gives the CIFAR tasks CIFAR-10 and the MLP synthetic data
    in one run.
    """
    values = [c.strip() for c in choices.split(",") if c.strip()]
    for value in values:
        if value in choices_for(accepted):
            return value
    raise DataError(f"--data {choices!r} has nothing for this task; valid: {', '.join(choices_for(accepted))}")


def not_found_line(names: list[str], looked: list[Path]) -> str:
    """One line naming the datasets missed and every folder looked in."""
    return f"{' or '.join(names)} not found; looked in {', '.join(str(p) for p in dict.fromkeys(looked))}"


def resolve(accepted: tuple[str, ...], choice: str, *, data_dir=None,
            allow_download: bool = True) -> tuple[str, str, str]:
    """(source name, where, why) for --data: a real source, "synthetic", or auto.

    auto takes the first dataset of `accepted` found (the task's own first), downloading
    only the task's own; then synthetic data, with a warning naming every folder looked in.
    Resolved once by the runner, so every cell of a run uses the same data.
    """
    valid = choices_for(accepted)
    if choice not in valid:
        raise DataError(f"--data {choice!r} does not fit this task; valid: {', '.join(valid)}")
    if any(is_text(a) for a in accepted):  # a language model's corpora
        name, where = text.resolve(choice, accepted, data_dir=data_dir, allow_download=allow_download, locate=locate)
        why = "--data synthetic" if choice == "synthetic" else \
            f"--data {choice}" if choice != "auto" else f"auto: {'SYNTHETIC text' if name == 'synthetic' else name}"
        return name, where, why
    if choice == "synthetic":
        return "synthetic", "synthetic", "--data synthetic"
    if choice != "auto":
        return choice, str(locate(choice, data_dir, allow_download=allow_download)), f"--data {choice}"
    missed, looked = [], []
    for i, name in enumerate(accepted):
        folder, places = find_source(DATASETS[name], data_dir)
        looked += places
        if folder is None and i == 0 and allow_download:
            try:
                folder = download(DATASETS[name])
            except (OSError, ChecksumError) as exc:
                log.info("download of %s failed: %s", name, exc)
        if folder is not None:
            why = "auto: the task's own dataset" if not missed else \
                f"auto: {' and '.join(missed)} not found, {name} is the first real dataset that fits"
            return name, str(folder), why
        missed.append(name)
    line = not_found_line(missed, looked)
    log.warning("real data not found, using SYNTHETIC data: %s", line)
    return "synthetic", "synthetic", f"auto: {line}"


def load(spec, name: str, *, folder: str | None = None, seed: int = 0, subset: tuple[int, int] | None = None,
         tokenizer: Path | None = None) -> Dataset:
    """The data a resolved source names for task `spec`, or its first `subset` = (n_train, n_test) samples,
    its labels checked against the task's classes.

    Text is cut into windows of the task's context: bytes, or a tokenizer.json's tokens (harness.text).

    Synthetic data takes the task's input shape and classes, and the real dataset's sizes; with a
    subset only that much is generated (a smaller synthetic set, not a slice of the full one), which
    saves a CIFAR-sized worker ~4 s of generation per cell.
    """
    info = DATASETS[spec.dataset]
    if info.kind != IMAGE:
        dataset = text.load(name, folder or "", context=spec.input_shape[0], seed=seed, subset=subset,
                            tokenizer=tokenizer, classes=spec.num_classes)
    elif name == "synthetic":
        n_train, n_test = subset or info.sizes
        dataset = synthetic(spec.dataset, n_train=n_train, n_test=n_test, seed=seed, shape=tuple(spec.input_shape),
                            classes=spec.num_classes)
        if subset:
            dataset.subset = f"{n_train} train / {n_test} test samples generated"
    else:
        dataset = load_real(name, Path(folder) if folder else locate(name, allow_download=False), subset)
    check_labels(dataset, spec.num_classes)
    return dataset


def check_loadable(spec, name: str, folder: str) -> None:
    """Stop a run before any worker starts on data no worker could use: a text task's corpora (its own
    and its stages') are read once here; a real image dataset's classes (its verified files pin its
    labels) must fit the task's."""
    if name == "synthetic":
        return
    if DATASETS[spec.dataset].kind == IMAGE:
        classes = DATASETS[name].classes
        if classes > spec.num_classes:
            raise DataError(f"{name} has {classes} classes but task {spec.name!r} has num_classes "
                            f"{spec.num_classes}; its labels would fall outside the head")
        return
    load(spec, name, folder=folder)
    for stage in spec.stages:
        if stage.data:
            load_stage(spec, stage.data, run_source=name)


def load_stage(spec, choice: str, *, run_source: str, seed: int = 0, subset: tuple[int, int] | None = None,
               tokenizer: Path | None = None) -> Dataset:
    """The data of a stage that names its own corpus (Stage.data); text tasks only, for now."""
    if not is_text(spec.dataset):
        raise DataError(f"a stage's own data ({choice!r}) is supported for text tasks only")
    dataset = text.stage_corpus(choice, run_source=run_source, context=spec.input_shape[0], seed=seed, subset=subset,
                                locate=locate, tokenizer=tokenizer, classes=spec.num_classes)
    check_labels(dataset, spec.num_classes)
    return dataset
