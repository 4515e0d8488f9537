"""The dataset table: per dataset its kind, shape, classes, sizes, quick subset, reader, files and digests."""

from __future__ import annotations

from dataclasses import dataclass, field

IMAGE, TEXT = "image", "text"
BYTES = 256  # text is read as bytes, one class per byte value (a tokenizer's vocabulary replaces them)


@dataclass(frozen=True)
class DatasetInfo:
    """What tribench knows of one dataset; harness.data reads, checks and finds it from this entry alone."""

    name: str
    kind: str  # IMAGE: HWC arrays, one label per sample; TEXT: a corpus cut into windows, one label per position
    shape: tuple[int, ...] | None  # an image's HWC; None for text, whose window is the task's context
    classes: int  # labels lie in [0, classes)
    sizes: tuple[int, int] | None  # real (n_train, n_test); None for text (the windows depend on the context)
    quick: tuple[int, int]  # what --quick trains and tests on: the first (n_train, n_test) samples (text: windows)
    reader: str  # how harness.data reads the files: "idx", "cifar" or "text"
    files: dict[str, str] = field(default_factory=dict)  # file name -> SHA-256; empty: nothing to verify
    url: str = ""  # the base URL the file names are appended to for a download
    how_to_get: str = ""
    # Files of the extracted archive (CIFAR-10's cifar-10-batches-py folder) -> digest, where
    # published: torchvision's MD5s. MD5 still resists second preimages, so a crafted file
    # cannot pass for an official one.
    extracted: dict[str, str] = field(default_factory=dict)
    # A corpus a package manager installs, found offline there. Those files are whatever version
    # the distribution ships, so they carry no digest; the record names the folder.
    system_dir: str | None = None


_IDX = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz")
_TEXT_QUICK = (128, 64)

# In order of preference after a task's own dataset.
DATASETS: dict[str, DatasetInfo] = {d.name: d for d in (
    DatasetInfo("mnist", IMAGE, (28, 28, 1), 10, (60000, 10000), (12000, 2000), "idx", dict(zip(_IDX, (
        "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
        "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
        "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
        "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"))),
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "put the four MNIST *-ubyte.gz files in one of those folders (a 'mnist' subfolder)"),
    DatasetInfo("fashion-mnist", IMAGE, (28, 28, 1), 10, (60000, 10000), (12000, 2000), "idx", dict(zip(_IDX, (
        "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
        "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
        "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
        "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05"))),
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        "on Debian/Ubuntu: apt-get install dataset-fashion-mnist; or put the four files in a "
        "'fashion-mnist' subfolder of one of those folders"),
    DatasetInfo("cifar10", IMAGE, (32, 32, 3), 10, (50000, 10000), (2000, 1000), "cifar", {
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
    # Any text: the UTF-8 file or folder given as --data-dir, else the first corpus below that is found.
    DatasetInfo("text", TEXT, None, BYTES, None, _TEXT_QUICK, "text",
                how_to_get="give any UTF-8 text file or folder as --data-dir"),
    # `licenses` is a second domain (legal English) for finetuning.
    DatasetInfo("fortunes", TEXT, None, BYTES, None, _TEXT_QUICK, "text", how_to_get="apt-get install fortunes",
                system_dir="/usr/share/games/fortunes"),
    DatasetInfo("licenses", TEXT, None, BYTES, None, _TEXT_QUICK, "text",
                how_to_get="base-files (every Debian/Ubuntu)", system_dir="/usr/share/common-licenses"),
    # char-rnn's tiny-shakespeare, 1,115,394 bytes (the digest several projects pin).
    DatasetInfo("tiny-shakespeare", TEXT, None, BYTES, None, _TEXT_QUICK, "text", {
        "input.txt": "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
    }, "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/",
        "put char-rnn's input.txt in a 'tiny-shakespeare' subfolder of one of those folders"),
)}


def of_kind(kind: str) -> tuple[str, ...]:
    """The datasets of one kind, in table order."""
    return tuple(n for n, d in DATASETS.items() if d.kind == kind)


def is_text(name: str) -> bool:
    """Whether `name` is a text dataset (a task of it is a language model: token windows in, a label per position)."""
    return name in DATASETS and DATASETS[name].kind == TEXT


def findable() -> tuple[str, ...]:
    """The datasets --data can name: those with files to find or a folder a package installs."""
    return tuple(n for n, d in DATASETS.items() if d.files or d.system_dir)


def mismatch(dataset: str, input_shape: tuple[int, ...]) -> str | None:
    """Why a task of `dataset` cannot take `input_shape` (None: it can): an image task takes its dataset's
    shape, a text task one axis of token ids (its context)."""
    info = DATASETS.get(dataset)
    if info is None:
        return f"{dataset!r} is no dataset here; valid: {', '.join(DATASETS)}"
    shape = tuple(input_shape)
    if info.kind == TEXT and len(shape) != 1:
        return f"{dataset!r} is text: input_shape is one axis, the context (e.g. [128]), not {shape}"
    if info.kind == IMAGE and shape != info.shape:
        return f"{dataset!r} holds {info.shape} images, not input_shape {shape}"
    return None
