"""Data: IDX and CIFAR readers on files written here in the real formats, checksums, search, synthetic."""

import dataclasses
import gzip
import io
import pickle
import struct
import tarfile

import numpy as np
import pytest

from harness import data
from harness.data import ChecksumError, DataError
from tasks import get_task
from tasks.datasets import DATASETS


def write_idx(path, array: np.ndarray, *, gz=True):
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    (gzip.open if gz else open)(path, "wb").write(payload)


def write_mnist(folder, n_train=20, n_test=10, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte.gz": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte.gz": rng.integers(0, 10, n_train),
        "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte.gz": rng.integers(0, 10, n_test),
    }
    for name, array in arrays.items():
        write_idx(folder / name, array)
    return arrays


def fake_source(folder, name="mnist"):
    """The table's entry for `name` with the digests of the files just written (real ones are not here)."""
    files = {f: data.sha256_of(folder / f) for f in sorted(p.name for p in folder.iterdir())}
    return source(name, files, "http://127.0.0.1:9/", "test")


def source(name, files, url, how_to_get=""):
    """The table's entry for `name` (an IDX dataset's where it has none) with other files, URL and advice."""
    return dataclasses.replace(DATASETS.get(name, DATASETS["mnist"]), name=name, files=files, url=url,
                               how_to_get=how_to_get)


def test_idx_reader_round_trips(tmp_path):
    arrays = write_mnist(tmp_path)
    x_tr, y_tr, x_te, y_te = data.load_mnist_dir(tmp_path)
    assert x_tr.shape == (20, 28, 28, 1) and x_tr.dtype == np.float32
    np.testing.assert_array_equal(x_tr[..., 0] * 255, arrays["train-images-idx3-ubyte.gz"])
    np.testing.assert_array_equal(y_te, arrays["t10k-labels-idx1-ubyte.gz"])
    assert 0.0 <= x_tr.min() and x_tr.max() <= 1.0


def test_a_subset_reads_the_first_samples_of_the_whole_files(tmp_path):
    write_mnist(tmp_path)
    whole = data.load_mnist_dir(tmp_path)
    for got, full, n in zip(data.load_mnist_dir(tmp_path, (7, 3)), whole, (7, 7, 3, 3)):
        np.testing.assert_array_equal(got, full[:n])
    assert [len(a) for a in data.load_mnist_dir(tmp_path, (500, 500))] == [len(a) for a in whole]  # capped
    path = tmp_path / "train-images-idx3-ubyte.gz"
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[: 16 + 5 * 28 * 28 + 100]))  # 5 whole images, then a cut
    assert data.read_idx(path, 5).shape == (5, 28, 28)
    with pytest.raises(DataError, match="truncated or corrupt"):
        data.read_idx(path, 6)
    promise = tmp_path / "huge.idx"  # a header promising 4 GiB a record: read as far as the file goes
    promise.write_bytes(bytes([0, 0, 0x08, 3]) + struct.pack(">3I", 2, 1 << 16, 1 << 16) + b"\0" * 64)
    with pytest.raises(DataError, match="truncated or corrupt"):
        data.read_idx(promise, 1)


def test_idx_reader_refuses_a_truncated_file(tmp_path):
    write_mnist(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[:-100]))
    with pytest.raises(DataError, match="truncated or corrupt"):
        data.read_idx(path)
    path.write_bytes(path.read_bytes()[:50])  # a cut gzip stream
    with pytest.raises(DataError, match="truncated"):
        data.read_idx(path)


def test_idx_reader_refuses_a_wrong_magic(tmp_path):
    path = tmp_path / "x.idx"
    path.write_bytes(b"\x01\x02\x03\x04" + b"\x00" * 20)
    with pytest.raises(DataError, match="bad magic"):
        data.read_idx(path)


def test_checksum_mismatch_names_path_and_both_digests(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"hello")
    with pytest.raises(ChecksumError) as info:
        data.verify(path, "0" * 64)
    assert str(path) in str(info.value) and "0" * 64 in str(info.value) and data.sha256_of(path) in str(info.value)


def test_search_order_data_dir_then_env_then_cache_then_system(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv(data.ENV_VAR, str(tmp_path / "env"))
    dirs = data.search_dirs(tmp_path / "given")
    assert dirs[:3] == [tmp_path / "given", tmp_path / "env", tmp_path / "cache" / "tribench"]
    assert dirs[3:] == list(data.SYSTEM_DIRS)


def test_find_source_skips_a_corrupt_copy_and_uses_a_good_one(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(data.ENV_VAR, raising=False)
    good = tmp_path / "good" / "mnist"
    write_mnist(good)
    source = fake_source(good)
    bad = tmp_path / "cache" / "tribench" / "mnist"
    write_mnist(bad, seed=1)  # same names, other bytes: fails the checksum
    monkeypatch.setattr(data, "SYSTEM_DIRS", (tmp_path / "good",))
    folder, looked = data.find_source(source, None)
    assert folder == good
    assert bad in looked
    assert "SHA-256 mismatch" in caplog.text and str(bad) in caplog.text


def test_offline_and_nothing_found_names_every_place(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(data, "SYSTEM_DIRS", (tmp_path / "system",))
    monkeypatch.setitem(DATASETS, "mnist", source("mnist", {"a.gz": "0" * 64}, "http://127.0.0.1:9/",
                                                  "put the files there"))
    with pytest.raises(DataError) as info:
        data.locate("mnist", tmp_path / "given", allow_download=True)  # port 9 refuses: offline
    message = str(info.value)
    for place in (tmp_path / "given", tmp_path / "cache" / "tribench", tmp_path / "system"):
        assert str(place) in message
    assert "put the files there" in message and "--data synthetic" in message


def test_download_that_fails_its_checksum_never_lands(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    payload = b"not the real file"

    class Response(io.BytesIO):
        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

    monkeypatch.setattr(data.urllib.request, "urlopen", lambda url, timeout: Response(payload))
    with pytest.raises(ChecksumError):
        data.download(source("mnist", {"a.gz": "0" * 64}, "http://example.invalid/"))
    folder = tmp_path / "cache" / "tribench" / "mnist"
    assert list(folder.iterdir()) == []  # neither the file nor a .part left behind

    import hashlib

    ok = source("mnist", {"a.gz": hashlib.sha256(payload).hexdigest()}, "http://example.invalid/")
    assert (data.download(ok) / "a.gz").read_bytes() == payload


def write_cifar(folder, per_batch=4):
    rng = np.random.default_rng(0)
    members = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 b"labels": list(rng.integers(0, 10, per_batch))}
        members[f"cifar-10-batches-py/{name}"] = pickle.dumps(batch)
    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(folder / "cifar-10-python.tar.gz", "w:gz") as tar:
        for name, blob in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return members


def test_cifar_reader_gives_nhwc_from_the_python_pickles(tmp_path):
    members = write_cifar(tmp_path)
    x_tr, y_tr, x_te, y_te = data.load_cifar(tmp_path / "cifar-10-python.tar.gz")
    assert x_tr.shape == (20, 32, 32, 3) and x_te.shape == (4, 32, 32, 3)
    first = pickle.loads(members["cifar-10-batches-py/data_batch_1"])[b"data"][0]
    # CIFAR rows are 1024 red, then green, then blue values: channel-major.
    np.testing.assert_array_equal(x_tr[0, :, :, 1] * 255, first[1024:2048].reshape(32, 32))


def test_cifar_reader_refuses_a_missing_batch(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": [0]}))
    with pytest.raises(DataError, match="0 of 5 training batches"):
        data.load_cifar(folder)


@pytest.mark.parametrize("kind, shape", [("mnist", (28, 28, 1)), ("cifar10", (32, 32, 3))])
def test_synthetic_data_is_deterministic_labelled_and_learnable(kind, shape):
    a = data.synthetic(kind, n_train=3000, n_test=1000, seed=3)
    b = data.synthetic(kind, n_train=3000, n_test=1000, seed=3)
    c = data.synthetic(kind, n_train=3000, n_test=1000, seed=4)
    assert a.x_train.shape == (3000, *shape) and a.x_train.dtype == np.float32
    np.testing.assert_array_equal(a.x_train, b.x_train)
    assert not np.array_equal(a.x_train, c.x_train)
    assert a.synthetic and a.describe()["source"] == "synthetic"
    # Learnable: a nearest-class-mean classifier is far above chance (10%).
    flat, flat_test = a.x_train.reshape(3000, -1), a.x_test.reshape(1000, -1)
    means = np.stack([flat[a.y_train == k].mean(0) for k in range(10)])
    pred = np.argmin(((flat_test[:, None, :] - means[None]) ** 2).sum(-1), axis=1)
    assert (pred == a.y_test).mean() > 0.6


def test_class_subset_relabels_in_order():
    d = data.synthetic("cifar10", n_train=500, n_test=200, seed=0)
    sub = d.classes((5, 6, 7, 8, 9))
    assert set(np.unique(sub.y_train)) == {0, 1, 2, 3, 4}
    np.testing.assert_array_equal(sub.x_train, d.x_train[d.y_train >= 5])
    np.testing.assert_array_equal(sub.y_train, d.y_train[d.y_train >= 5] - 5)


def test_resolve_auto_falls_back_to_synthetic_loudly_naming_every_folder(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(data, "SYSTEM_DIRS", (tmp_path / "system",))
    name, where, why = data.resolve(("cifar10", "mnist"), "auto", allow_download=False)
    assert (name, where) == ("synthetic", "synthetic")
    assert "SYNTHETIC" in caplog.text
    for folder in (tmp_path / "tribench" / "cifar10", tmp_path / "tribench" / "mnist", tmp_path / "system" / "mnist"):
        assert str(folder) in caplog.text and str(folder) in why
    with pytest.raises(DataError, match="cifar10 not found; looked in .*system/cifar10"):
        data.resolve(("cifar10",), "cifar10", allow_download=False)
    with pytest.raises(DataError, match="does not fit"):
        data.resolve(("cifar10",), "fashion-mnist", allow_download=False)


def test_auto_takes_the_first_real_dataset_found_in_the_tasks_order(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(data, "SYSTEM_DIRS", ())
    fmnist = tmp_path / "fashion-mnist"
    write_mnist(fmnist)
    monkeypatch.setitem(DATASETS, "fashion-mnist", fake_source(fmnist, "fashion-mnist"))
    name, where, why = data.resolve(("mnist", "fashion-mnist"), "auto", data_dir=tmp_path, allow_download=False)
    assert (name, where) == ("fashion-mnist", str(fmnist))
    assert "mnist not found" in why and "first real dataset that fits" in why


def test_each_task_takes_the_first_data_choice_that_fits():
    assert data.choice_for(("mnist", "fashion-mnist"), "cifar10,fashion-mnist,synthetic") == "fashion-mnist"
    assert data.choice_for(("cifar10",), "fashion-mnist,synthetic") == "synthetic"
    with pytest.raises(DataError, match="nothing for this task"):
        data.choice_for(("cifar10",), "mnist,fashion-mnist")


# -- the dataset table, the task's classes and shape -------------------------------------------

def small_task(classes, shape=(28, 28, 1), dataset="mnist"):
    """A task of `classes` classes on `shape` inputs (an MLP: its head has one unit per class)."""
    from tasks.spec import Adam, Dense, Flatten, TaskSpec

    return TaskSpec(name=f"c{classes}", dataset=dataset, input_shape=shape, layers=(
        Flatten(name="flatten"), Dense(units=classes, name="head")), optimizer=Adam(), batch_size=8, epochs=1,
        target_accuracy=0.5, num_classes=classes)


def test_a_label_outside_the_tasks_classes_is_refused_when_data_loads(tmp_path, monkeypatch):
    write_mnist(tmp_path / "mnist", n_train=200, n_test=50)  # labels 0-9
    monkeypatch.setitem(DATASETS, "mnist", fake_source(tmp_path / "mnist"))
    loaded = data.load(small_task(10), "mnist", folder=str(tmp_path / "mnist"))
    assert loaded.y_train.max() == 9
    with pytest.raises(DataError, match=r"label 9, outside the task's 5 classes \(num_classes\)"):
        data.load(small_task(5), "mnist", folder=str(tmp_path / "mnist"))


def test_a_real_dataset_with_more_classes_than_the_task_stops_the_run_before_any_worker():
    with pytest.raises(DataError, match="fashion-mnist has 10 classes but task 'c5' has num_classes 5"):
        data.check_loadable(small_task(5), "fashion-mnist", "/nowhere")
    data.check_loadable(small_task(5), "synthetic", "synthetic")  # synthetic data follows the task
    data.check_loadable(small_task(12), "mnist", "/nowhere")  # fewer classes in the data than logits is fine


@pytest.mark.parametrize("classes, shape", [(3, (12, 12, 1)), (10, (28, 28, 1)), (37, (8, 8, 3))])
def test_synthetic_data_follows_the_tasks_class_count_and_input_shape(classes, shape):
    d = data.load(small_task(classes, shape), "synthetic", subset=(2000, 400), seed=1)
    assert d.synthetic and d.x_train.shape == (2000, *shape) and d.x_test.shape == (400, *shape)
    assert set(np.unique(d.y_train)) == set(range(classes))
    assert d.y_test.max() < classes
    if classes == 10 and shape == (28, 28, 1):  # the dataset's own: the same data as before the task said so
        np.testing.assert_array_equal(d.x_train, data.synthetic("mnist", n_train=2000, n_test=400, seed=1).x_train)


def test_synthetic_text_keeps_to_the_tasks_vocabulary_and_real_text_is_checked_against_it(tmp_path):
    from harness import text

    assert text.synthetic(context=8, seed=0, n_windows=(50, 10)).x_train.max() > 96  # printable bytes
    small = text.synthetic(context=8, seed=0, n_windows=(50, 10), classes=20)
    assert small.x_train.max() < 20 and small.y_train.max() < 20 and len(np.unique(small.y_train)) > 4
    corpus = tmp_path / "café.txt"
    corpus.write_text("un café crème, s'il vous plaît. " * 20)  # é is two bytes, 0xc3 0xa9
    from tasks.tiny_gpt import tiny_gpt

    lm = tiny_gpt(context=8)
    assert data.load(lm, "text", folder=str(corpus)).y_train.max() == 0xC3
    ascii_lm = tiny_gpt(context=8, vocab=128)
    with pytest.raises(DataError, match="label 195, outside the task's 128 classes"):
        data.load(ascii_lm, "text", folder=str(corpus))
    assert data.load(ascii_lm, "synthetic", subset=(8, 2)).y_train.max() < 128


def test_the_table_is_the_one_home_of_each_datasets_facts():
    from tasks.datasets import IMAGE, TEXT, findable, mismatch

    for info in DATASETS.values():
        assert info.kind in (IMAGE, TEXT) and info.quick[0] > 0 and info.quick[1] > 0
        assert (info.shape is not None) == (info.kind == IMAGE) == (info.sizes is not None)
        assert info.reader in (*data.IMAGE_READERS, "text")
    assert DATASETS["mnist"].quick == (12000, 2000) and DATASETS["cifar10"].quick == (2000, 1000)
    assert DATASETS["text"].quick == (128, 64)
    assert "text" not in findable() and {"mnist", "fashion-mnist", "cifar10", "fortunes"} <= set(findable())
    assert mismatch("fashion-mnist", (28, 28, 1)) is None and mismatch("fortunes", (64,)) is None


def test_a_language_model_takes_the_text_corpora_its_own_first():
    assert data.accepted_for(get_task("tiny-gpt")) == ("fortunes", "licenses", "tiny-shakespeare")
    own = dataclasses.replace(get_task("tiny-gpt"), dataset="tiny-shakespeare")
    assert data.accepted_for(own) == ("tiny-shakespeare", "fortunes", "licenses")
