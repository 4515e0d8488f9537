"""Datasets: IDX and CIFAR readers, checksums, search order, download, synthetic data."""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import pickle
import struct
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from harness import safepickle, text

log = logging.getLogger(__name__)

ENV_VAR = "TRIBENCH_DATA"
SYSTEM_DIRS = (Path("/usr/share/datasets"),)


class DataError(RuntimeError):
    """Data that cannot be found, read or trusted; the message says what to do."""


class ChecksumError(DataError):
    pass


@dataclass(frozen=True)
class Source:
    """A real dataset: its files, their SHA-256 digests and where to download them."""

    name: str
    kind: str  # "mnist" (IDX gz files) or "cifar10" (python pickle batches)
    files: dict[str, str]  # file name -> sha256
    url: str  # base URL the file names are appended to
    how_to_get: str
    # Files of the extracted archive (CIFAR-10's cifar-10-batches-py folder) -> digest, where
    # published: torchvision's MD5s. MD5 still resists second preimages, so a crafted file
    # cannot pass for an official one.
    extracted: dict[str, str] = field(default_factory=dict)


SOURCES: dict[str, Source] = {s.name: s for s in (
    Source("mnist", "mnist", {
        "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
        "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
        "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
        "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
    }, "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "put the four MNIST *-ubyte.gz files in one of those folders (a 'mnist' subfolder)"),
    Source("fashion-mnist", "mnist", {
        "train-images-idx3-ubyte.gz": "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
        "train-labels-idx1-ubyte.gz": "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
        "t10k-images-idx3-ubyte.gz": "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
        "t10k-labels-idx1-ubyte.gz": "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
    }, "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        "on Debian/Ubuntu: apt-get install dataset-fashion-mnist; or put the four files in a "
        "'fashion-mnist' subfolder of one of those folders"),
    Source("cifar10", "cifar10", {
        "cifar-10-python.tar.gz": "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce",
    }, "https://www.cs.toronto.edu/~kriz/",
        "put cifar-10-python.tar.gz, or its extracted cifar-10-batches-py folder, in a 'cifar10' "
        "subfolder of one of those folders", {
            "data_batch_1": "c99cafc152244af753f735de768cd75f",
            "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
            "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
            "data_batch_4": "634d18415352ddfa80567beed471001a",
            "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
            "test_batch": "40351d587109b95175f43aff81a1287e",
        }),
    # char-rnn's tiny-shakespeare, 1,115,394 bytes (the digest several projects pin).
    Source("tiny-shakespeare", text.KIND, {
        "input.txt": "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
    }, "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/",
        "put char-rnn's input.txt in a 'tiny-shakespeare' subfolder of one of those folders"),
)}

# The shape synthetic data takes for a task whose own dataset is of this kind (real shapes: tasks/targets.py).
SHAPES = {"mnist": (28, 28, 1), "cifar10": (32, 32, 3)}


@dataclass
class Dataset:
    name: str
    source: str  # a path, or "synthetic"
    synthetic: bool
    x_train: np.ndarray  # float32 NHWC in [0, 1]
    y_train: np.ndarray  # int32
    x_test: np.ndarray
    y_test: np.ndarray
    subset: str | None = None  # a note when only part of the data is used
    tokenizer: str | None = None  # text: the tokenizer.json whose ids the windows hold; None: bytes

    def describe(self) -> dict:
        return {"name": self.name, "source": self.source, "synthetic": self.synthetic,
                "n_train": int(len(self.y_train)), "n_test": int(len(self.y_test)), "subset": self.subset,
                "tokenizer": self.tokenizer}

    def head(self, n_train: int, n_test: int) -> Dataset:
        """The first n samples of each split (a documented, reproducible subset)."""
        note = f"first {n_train} train / {n_test} test samples"
        return Dataset(self.name, self.source, self.synthetic, self.x_train[:n_train], self.y_train[:n_train],
                       self.x_test[:n_test], self.y_test[:n_test], subset=note, tokenizer=self.tokenizer)

    def classes(self, keep: tuple[int, ...] | None) -> Dataset:
        """Only the samples of `keep`, relabelled 0..len(keep)-1 in that order."""
        if keep is None:
            return self
        lookup = np.full(max(int(self.y_train.max()), int(self.y_test.max()), *keep) + 1, -1, np.int32)
        lookup[list(keep)] = np.arange(len(keep), dtype=np.int32)

        def pick(x, y):
            mask = lookup[y] >= 0
            return x[mask], lookup[y[mask]]

        x_tr, y_tr = pick(self.x_train, self.y_train)
        x_te, y_te = pick(self.x_test, self.y_test)
        return Dataset(self.name, self.source, self.synthetic, x_tr, y_tr, x_te, y_te, subset=self.subset)


# -- file formats ------------------------------------------------------------------------

IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped), checking the header against the payload size."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot read ({exc}); the file is probably truncated or not gzip") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_DTYPES:
        raise DataError(f"{path}: not an IDX file (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(IDX_DTYPES[raw[2]])
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(f"{path}: IDX header says {dims} ({expected} bytes) but the file holds "
                        f"{len(raw) - header} bytes: truncated or corrupt")
    return np.frombuffer(raw, dtype, offset=header).reshape(dims)


def load_mnist_dir(folder: Path) -> tuple[np.ndarray, ...]:
    def images(name):
        return (read_idx(folder / name).astype(np.float32) / 255.0)[..., None]

    def labels(name):
        return read_idx(folder / name).astype(np.int32)

    x_tr, y_tr = images("train-images-idx3-ubyte.gz"), labels("train-labels-idx1-ubyte.gz")
    x_te, y_te = images("t10k-images-idx3-ubyte.gz"), labels("t10k-labels-idx1-ubyte.gz")
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


def candidates(source: Source, root: Path) -> list[Path]:
    """A dataset may sit in root/<name>/ or directly in root."""
    return [root / source.name, root]


def find_source(source: Source, data_dir=None) -> tuple[Path | None, list[Path]]:
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


def download(source: Source, *, timeout: float = 30.0) -> Path:
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
    source = SOURCES[name]
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


def load_real(name: str, folder: Path) -> Dataset:
    if SOURCES[name].kind == "mnist":
        arrays = load_mnist_dir(folder)
    else:
        # The extracted folder only when every batch matches its published digest (the
        # runner checked too, but this process may have been handed any folder).
        extracted = folder / "cifar-10-batches-py"
        use = extracted.is_dir() and _verified(extracted, SOURCES[name].extracted)
        arrays = load_cifar(extracted if use else folder / "cifar-10-python.tar.gz")
    return Dataset(name, str(folder), False, *arrays)


# -- synthetic data -----------------------------------------------------------------------

SYNTHETIC_LABEL_NOISE = 0.05  # flipped labels: caps accuracy near 95% so parity gaps can show


def synthetic(kind: str, *, n_train: int, n_test: int, seed: int) -> Dataset:
    """Deterministic, learnable data with the real shapes.

    Each class has a smooth random prototype image; a sample is its class prototype
    at a random contrast blended with uniform noise, and 5% of the labels are flipped.
    A model must learn the templates to beat chance (10%) and cannot reach 100%, so
    accuracy differences between backends stay visible.
    """
    shape = SHAPES[kind]
    h, w, c = shape
    rng = np.random.default_rng([seed, 0x5EED])
    coarse = rng.random((10, (h + 3) // 4, (w + 3) // 4, c), dtype=np.float32)
    prototypes = coarse.repeat(4, axis=1).repeat(4, axis=2)[:, :h, :w, :]

    def split(n: int, stream: int):
        r = np.random.default_rng([seed, stream])
        y = r.integers(0, 10, n).astype(np.int32)
        x = np.empty((n, h, w, c), np.float32)
        for start in range(0, n, 4096):  # chunks keep peak memory near the output size
            stop = min(n, start + 4096)
            m = stop - start
            contrast = r.uniform(0.2, 0.6, (m, 1, 1, 1)).astype(np.float32)
            noise = r.random((m, h, w, c), dtype=np.float32)
            x[start:stop] = contrast * prototypes[y[start:stop]] + (1 - contrast) * noise
        flip = r.random(n) < SYNTHETIC_LABEL_NOISE
        y[flip] = r.integers(0, 10, int(flip.sum()))
        return x, y

    x_tr, y_tr = split(n_train, 1)
    x_te, y_te = split(n_test, 2)
    return Dataset(f"synthetic-{kind}", "synthetic", True, x_tr, y_tr, x_te, y_te)


def accepted_for(spec) -> tuple[str, ...]:
    """The real datasets (or corpora) a task can train on, its own first."""
    from tasks.targets import accepted

    if spec.dataset == text.KIND:
        return (*text.SYSTEM_CORPORA, *[s.name for s in SOURCES.values() if s.kind == text.KIND])
    return accepted(spec)


def choices_for(accepted: tuple[str, ...]) -> list[str]:
    """Valid --data values for a task that accepts the real datasets `accepted`."""
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


REAL_SIZES = {"mnist": (60000, 10000), "cifar10": (50000, 10000)}


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
    if any(a in text.SYSTEM_CORPORA for a in accepted):  # a text task (accepted_for)
        name, where = text.resolve(choice, data_dir=data_dir, allow_download=allow_download, locate=locate)
        why = "--data synthetic" if choice == "synthetic" else \
            f"--data {choice}" if choice != "auto" else f"auto: {'SYNTHETIC text' if name == 'synthetic' else name}"
        return name, where, why
    if choice == "synthetic":
        return "synthetic", "synthetic", "--data synthetic"
    if choice != "auto":
        return choice, str(locate(choice, data_dir, allow_download=allow_download)), f"--data {choice}"
    missed, looked = [], []
    for i, name in enumerate(accepted):
        folder, places = find_source(SOURCES[name], data_dir)
        looked += places
        if folder is None and i == 0 and allow_download:
            try:
                folder = download(SOURCES[name])
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


def load(task_dataset: str, name: str, *, folder: str | None = None, seed: int = 0,
         subset: tuple[int, int] | None = None, context: int | None = None, tokenizer: Path | None = None) -> Dataset:
    """The dataset a resolved source names, or its first `subset` = (n_train, n_test) samples.

    Text is cut into windows of `context` bytes, or of a tokenizer.json's tokens (harness.text).

    Synthetic data has the real dataset's sizes; with a subset only that much is
    generated (a smaller synthetic set, not a slice of the full one), which saves a
    CIFAR-sized worker ~4 s of generation per cell.
    """
    if task_dataset == text.KIND:
        return text.load(name, folder or "", context=context, seed=seed, subset=subset, tokenizer=tokenizer)
    if name == "synthetic":
        n_train, n_test = subset or REAL_SIZES[task_dataset]
        dataset = synthetic(task_dataset, n_train=n_train, n_test=n_test, seed=seed)
        if subset:
            dataset.subset = f"{n_train} train / {n_test} test samples generated"
        return dataset
    dataset = load_real(name, Path(folder) if folder else locate(name, allow_download=False))
    return dataset.head(*subset) if subset else dataset


def check_loadable(spec, name: str, folder: str) -> None:
    """Read a text task's corpora (its own and its stages') once in the driver, so a corpus that no
    worker could read stops the run before any starts; image folders were checked when found."""
    if spec.dataset != text.KIND or name == "synthetic":
        return
    context = spec.input_shape[0]
    load(spec.dataset, name, folder=folder, context=context)
    for stage in spec.stages:
        if stage.data:
            load_stage(spec.dataset, stage.data, run_source=name, context=context)


def load_stage(task_dataset: str, choice: str, *, run_source: str, seed: int = 0,
               subset: tuple[int, int] | None = None, context: int | None = None,
               tokenizer: Path | None = None) -> Dataset:
    """The data of a stage that names its own corpus (Stage.data); text tasks only, for now."""
    if task_dataset != text.KIND:
        raise DataError(f"a stage's own data ({choice!r}) is supported for text tasks only")
    return text.stage_corpus(choice, run_source=run_source, context=context, seed=seed, subset=subset, locate=locate,
                             tokenizer=tokenizer)
