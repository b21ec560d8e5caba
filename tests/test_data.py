"""Tests for bpdl.data: loading (offline, checksums, CIFAR layout), splits, batching."""

from __future__ import annotations

import io
import pathlib
import pickle
import socket
import tarfile
import urllib.error

import numpy as np
import pytest
import torch
from bpdl import data
from bpdl.data import (
    DATASETS,
    DataError,
    ImageSet,
    data_root,
    iterate_batches,
    kfold_indices,
    load_dataset,
    stratified_split,
    synthetic_dataset,
    to_float,
    train_val_test,
)

MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


# --------------------------------------------------------------------------------------
# Real MNIST / Fashion-MNIST, offline
# --------------------------------------------------------------------------------------


def test_checksum_tables_match_torchvision():
    from torchvision import datasets

    assert [(f.name, f.md5) for f in data.MNIST_FILES] == [
        tuple(r) for r in datasets.MNIST.resources
    ]
    assert [(f.name, f.md5) for f in data.FASHION_MNIST_FILES] == [
        tuple(r) for r in datasets.FashionMNIST.resources
    ]
    cifar = datasets.CIFAR10
    assert data.CIFAR10_ARCHIVE.md5 == cifar.tgz_md5 == "c58f30108f718f92721af3b95e74349a"
    assert data.CIFAR10_ARCHIVE.name == cifar.filename
    ours = {f.name: f.md5 for f in data.CIFAR10_FILES}
    theirs = {name: md5 for name, md5 in cifar.train_list + cifar.test_list}
    theirs[cifar.meta["filename"]] = cifar.meta["md5"]
    assert ours == theirs


def test_mnist_offline(real_data_root):
    train = load_dataset("mnist", "train", data_dir=real_data_root, download=False)
    test = load_dataset("mnist", "test", data_dir=real_data_root, download=False)
    assert train.images.shape == (60000, 1, 28, 28)
    assert test.images.shape == (10000, 1, 28, 28)
    for s in (train, test):
        assert s.images.dtype == torch.uint8 and s.labels.dtype == torch.int64
        assert s.images.is_contiguous()
        assert s.name == "mnist" and s.classes == 10
        assert s.shape == (1, 28, 28) and s.num_features == 784
    assert torch.bincount(train.labels, minlength=10).tolist() == MNIST_TRAIN_COUNTS
    assert torch.bincount(test.labels, minlength=10).tolist() == MNIST_TEST_COUNTS
    assert train.labels[:5].tolist() == [5, 0, 4, 1, 9]
    assert test.labels[:3].tolist() == [7, 2, 1]
    assert int(train.images.min()) == 0 and int(train.images.max()) == 255
    # The well-known MNIST pixel mean 0.1307 (over the training set, pixels/255).
    assert abs(to_float(train.images).mean().item() - 0.1307) < 5e-4
    # The digits sit in the centre of the 28x28 frame: the border is (nearly) blank.
    assert train.images[:, :, 0, :].float().mean() < 0.1
    assert train.images[:, :, :, 0].float().mean() < 0.1
    assert train.images[:, :, 14, 14].float().mean() > 100


def test_fashion_mnist_offline(real_data_root):
    train = load_dataset("fashion_mnist", "train", data_dir=real_data_root, download=False)
    test = load_dataset("fashion_mnist", "test", data_dir=real_data_root, download=False)
    assert train.images.shape == (60000, 1, 28, 28)
    assert test.images.shape == (10000, 1, 28, 28)
    assert train.images.dtype == torch.uint8 and test.labels.dtype == torch.int64
    assert train.name == "fashion_mnist"
    assert torch.bincount(train.labels, minlength=10).tolist() == [6000] * 10
    assert torch.bincount(test.labels, minlength=10).tolist() == [1000] * 10
    assert train.labels[0].item() == 9 and test.labels[0].item() == 9  # ankle boots
    assert abs(to_float(train.images).mean().item() - 0.2860) < 5e-4


@pytest.mark.parametrize(
    "alias", ["Fashion-MNIST", "fashionmnist", "FashionMNIST", "FASHION_MNIST"]
)
def test_fashion_aliases(real_data_root, alias):
    ref = load_dataset("fashion_mnist", "test", data_dir=real_data_root, download=False)
    got = load_dataset(alias, "test", data_dir=real_data_root, download=False)
    assert got.name == "fashion_mnist"
    assert torch.equal(got.labels, ref.labels) and torch.equal(got.images, ref.images)


def test_repeated_load_is_cached_and_returns_private_copies(real_data_root, monkeypatch):
    from torchvision import datasets

    first = load_dataset("mnist", "test", data_dir=real_data_root, download=False)
    reference = first.images.clone()

    def boom(*args, **kwargs):
        raise AssertionError("files re-read")

    monkeypatch.setattr(datasets, "MNIST", boom)
    monkeypatch.setattr(data.hashlib, "md5", boom)  # checksums are not recomputed either
    first.images.zero_()
    first.labels.fill_(3)
    second = load_dataset("mnist", "test", data_dir=str(real_data_root), download=False)
    assert torch.equal(second.images, reference)
    assert second.labels[:3].tolist() == [7, 2, 1]
    assert second.images.data_ptr() != first.images.data_ptr()


def test_train_val_test_mnist(real_data_root):
    train, val, test = train_val_test(
        "mnist", val_size=5000, seed=0, data_dir=real_data_root, download=False
    )
    assert (len(train), len(val), len(test)) == (55000, 5000, 10000)
    assert val.images.shape == (5000, 1, 28, 28) and val.name == "mnist"
    counts = torch.bincount(val.labels, minlength=10)
    expected = torch.tensor(MNIST_TRAIN_COUNTS, dtype=torch.float64) * 5000 / 60000
    assert (counts - expected).abs().max() < 1
    assert torch.equal(
        torch.bincount(train.labels, minlength=10) + counts, torch.tensor(MNIST_TRAIN_COUNTS)
    )
    again = train_val_test("mnist", val_size=5000, seed=0, data_dir=real_data_root, download=False)[
        1
    ]
    assert torch.equal(again.images, val.images)
    other = train_val_test("mnist", val_size=1 / 6, seed=1, data_dir=real_data_root, download=False)
    assert (len(other[0]), len(other[1])) == (50000, 10000)


# --------------------------------------------------------------------------------------
# Corrupt, truncated and missing files
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("download", [False, True])
def test_corrupt_file_named_with_md5(mnist_copy_root, download):
    path = mnist_copy_root / "MNIST" / "raw" / "train-images-idx3-ubyte.gz"
    raw = bytearray(path.read_bytes())
    for i in range(5000, 5010):
        raw[i] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError) as info:
        load_dataset("mnist", "train", data_dir=mnist_copy_root, download=download)
    msg = str(info.value)
    assert str(path) in msg
    assert "f68b3c2dcbeaaa9fbdd348bbdeb94873" in msg
    assert "Delete" in msg
    # The test split needs the same four files, so it fails too.
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz"):
        load_dataset("mnist", "test", data_dir=mnist_copy_root, download=False)


def test_truncated_file(mnist_copy_root):
    path = mnist_copy_root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(DataError) as info:
        load_dataset("mnist", "test", data_dir=mnist_copy_root, download=False)
    msg = str(info.value)
    assert str(path) in msg
    assert "ec29112dd5afa0611ce80d1b7f02629c" in msg
    assert "1000 bytes" in msg and "4542" in msg


def test_corrupt_file_without_verify_still_gives_data_error(mnist_copy_root):
    path = mnist_copy_root / "MNIST" / "raw" / "t10k-images-idx3-ubyte.gz"
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2 : len(raw) // 2 + 64] = bytes(64)
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz") as info:
        load_dataset("mnist", "test", data_dir=mnist_copy_root, download=False, verify=False)
    assert info.value.__cause__ is not None


def test_missing_file_offline(mnist_copy_root):
    raw = mnist_copy_root / "MNIST" / "raw"
    (raw / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError) as info:
        load_dataset("mnist", "train", data_dir=mnist_copy_root, download=False)
    msg = str(info.value)
    assert "train-labels-idx1-ubyte.gz" in msg
    assert "d53e105ee54ea40749a09fcbcd1e9432" in msg
    assert str(raw) in msg
    assert "train-images-idx3-ubyte.gz" not in msg  # only the missing file is listed
    # The fix is told for both the Python API and the command line.
    assert "download=True" in msg and "--offline" in msg and "--data-dir" in msg


def test_missing_file_failed_download_is_wrapped(mnist_copy_root, monkeypatch):
    import torchvision.datasets.mnist as tv_mnist

    def fail(url, *args, **kwargs):
        raise urllib.error.URLError("no network in tests")

    monkeypatch.setattr(tv_mnist, "download_and_extract_archive", fail)
    raw = mnist_copy_root / "MNIST" / "raw"
    (raw / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(DataError) as info:
        load_dataset("mnist", "test", data_dir=mnist_copy_root, download=True)
    msg = str(info.value)
    assert "t10k-images-idx3-ubyte.gz" in msg and "9fb629c4189551a2d022fa330f9573f3" in msg
    assert str(raw) in msg and "failed" in msg
    assert info.value.__cause__ is not None


def test_extracted_files_are_repaired_or_reused(mnist_copy_root):
    raw = mnist_copy_root / "MNIST" / "raw"
    ref = load_dataset("mnist", "test", data_dir=mnist_copy_root, download=False)
    # A truncated extracted file next to a good archive is extracted again.
    extracted = raw / "t10k-labels-idx1-ubyte"
    extracted.write_bytes(extracted.read_bytes()[:100])
    data._clear_cache()
    again = load_dataset("mnist", "test", data_dir=mnist_copy_root, download=False)
    assert torch.equal(again.labels, ref.labels)
    assert extracted.stat().st_size == 10008
    # Complete extracted files are enough without their archives.
    for gz in raw.glob("*.gz"):
        gz.unlink()
    data._clear_cache()
    third = load_dataset("mnist", "test", data_dir=mnist_copy_root, download=False)
    assert torch.equal(third.images, ref.images)


# --------------------------------------------------------------------------------------
# CIFAR-10 in its real pickle format, written by the tests
# --------------------------------------------------------------------------------------


class _Py2Str(bytes):
    """A Python 2 ``str`` in a pickle (as the keys of the real CIFAR-10 batch files)."""


class _Py2Pickler(pickle._Pickler):
    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2str(self, obj):
        assert len(obj) < 256
        self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + bytes(obj))
        self.memoize(obj)

    dispatch[_Py2Str] = save_py2str


def _dump_py2(obj: dict, path: pathlib.Path) -> None:
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    path.write_bytes(buf.getvalue())


def _cifar_rows(values: np.ndarray) -> np.ndarray:
    """(n, 3, 32, 32) pixel values -> (n, 3072) rows: 1024 R, then 1024 G, then 1024 B."""
    n = values.shape[0]
    rows = np.zeros((n, 3072), dtype=np.uint8)
    for c in range(3):
        for h in range(32):
            for w in range(32):
                rows[:, c * 1024 + h * 32 + w] = values[:, c, h, w]
    return rows


def write_cifar(root: pathlib.Path, pixel, label, per_batch: int = 4, n_test: int = 3) -> None:
    """Write cifar-10-batches-py/ under ``root``; pixel(i) -> (3, 32, 32) for global index i."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = [f"data_batch_{b}" for b in range(1, 6)] + ["test_batch"]
    start = 0
    for name in names:
        n = n_test if name == "test_batch" else per_batch
        idx = range(start, start + n)
        values = np.stack([pixel(i) for i in idx]).astype(np.uint8)
        batch = {
            _Py2Str(b"batch_label"): _Py2Str(name.encode()),
            _Py2Str(b"labels"): [int(label(i)) for i in idx],
            _Py2Str(b"data"): _cifar_rows(values),
            _Py2Str(b"filenames"): [_Py2Str(f"img_{i}.png".encode()) for i in idx],
        }
        _dump_py2(batch, folder / name)
        start += n
    meta = {
        _Py2Str(b"num_cases_per_batch"): per_batch,
        _Py2Str(b"label_names"): [_Py2Str(c.encode()) for c in data._CIFAR10_CLASSES],
        _Py2Str(b"num_vis"): 3072,
    }
    _dump_py2(meta, folder / "batches.meta")


def _constant_rgb(i):
    return np.stack([np.full((32, 32), v) for v in (1, 2, 3)])


def _gradient_value(i, c, h, w):
    return (i * 7 + c * 80 + h * 3 + w) % 256


def _gradient(i):
    c, h, w = np.meshgrid(np.arange(3), np.arange(32), np.arange(32), indexing="ij")
    return _gradient_value(i, c, h, w)


def test_written_cifar_pickles_look_like_python2_files(tmp_path):
    write_cifar(tmp_path, _constant_rgb, lambda i: i % 10)
    batch = pickle.loads(
        (tmp_path / "cifar-10-batches-py" / "data_batch_1").read_bytes(), encoding="bytes"
    )
    assert set(batch) == {b"batch_label", b"labels", b"data", b"filenames"}
    assert batch[b"data"].shape == (4, 3072) and batch[b"data"].dtype == np.uint8
    assert batch[b"data"][0, :1024].tolist() == [1] * 1024
    assert batch[b"data"][0, 1024:2048].tolist() == [2] * 1024


def test_cifar_channels_constant(tmp_path):
    write_cifar(tmp_path, _constant_rgb, lambda i: i % 10)
    train = load_dataset("cifar10", "train", data_dir=tmp_path, download=False, verify=False)
    test = load_dataset("CIFAR10", "test", data_dir=tmp_path, download=False, verify=False)
    assert train.images.shape == (20, 3, 32, 32) and test.images.shape == (3, 3, 32, 32)
    assert train.images.dtype == torch.uint8 and train.images.is_contiguous()
    assert train.name == test.name == "cifar10"
    assert train.shape == (3, 32, 32) and train.num_features == 3072
    for s in (train, test):
        for c in range(3):
            assert bool((s.images[:, c] == c + 1).all()), f"channel {c} scrambled"
    assert train.labels.tolist() == [i % 10 for i in range(20)]
    assert test.labels.tolist() == [0, 1, 2]


def test_cifar_pixel_positions(tmp_path):
    write_cifar(tmp_path, _gradient, lambda i: (3 * i) % 10, per_batch=2, n_test=2)
    train = load_dataset("cifar-10", "train", data_dir=tmp_path, download=False, verify=False)
    test = load_dataset("cifar10", "test", data_dir=tmp_path, download=False, verify=False)
    i = torch.arange(10).view(-1, 1, 1, 1)
    c = torch.arange(3).view(1, -1, 1, 1)
    h = torch.arange(32).view(1, 1, -1, 1)
    w = torch.arange(32).view(1, 1, 1, -1)
    assert torch.equal(train.images.long(), _gradient_value(i, c, h, w))
    assert torch.equal(test.images.long(), _gradient_value(i[:2] + 10, c, h, w))
    # A few spot checks by hand: image 1, green channel, row 2, column 5.
    assert train.images[1, 1, 2, 5].item() == 7 + 80 + 6 + 5
    assert train.images[0, 2, 31, 0].item() == (160 + 93) % 256
    assert train.labels.tolist() == [(3 * k) % 10 for k in range(10)]


def test_cifar_verify_rejects_wrong_files(tmp_path):
    write_cifar(tmp_path, _constant_rgb, lambda i: i % 10)
    with pytest.raises(DataError) as info:
        load_dataset("cifar10", "train", data_dir=tmp_path, download=False, verify=True)
    msg = str(info.value)
    assert "data_batch_1" in msg and "c99cafc152244af753f735de768cd75f" in msg
    assert str(tmp_path / "cifar-10-batches-py") in msg


def test_cifar_from_archive(tmp_path):
    src = tmp_path / "src"
    write_cifar(src, _gradient, lambda i: i % 10, per_batch=2, n_test=2)
    root = tmp_path / "root"
    root.mkdir()
    with tarfile.open(root / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(src / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    with pytest.raises(DataError) as info:
        load_dataset("cifar10", "test", data_dir=root, download=False, verify=True)
    msg = str(info.value)
    assert "cifar-10-python.tar.gz" in msg and "c58f30108f718f92721af3b95e74349a" in msg
    assert not (root / "cifar-10-batches-py").exists()
    test = load_dataset("cifar10", "test", data_dir=root, download=False, verify=False)
    expected = load_dataset("cifar10", "test", data_dir=src, download=False, verify=False)
    assert torch.equal(test.images, expected.images)
    assert (root / "cifar-10-batches-py" / "data_batch_5").is_file()


def test_cifar_missing_offline(tmp_path):
    with pytest.raises(DataError) as info:
        load_dataset("cifar10", "train", data_dir=tmp_path, download=False)
    msg = str(info.value)
    assert "cifar-10-python.tar.gz" in msg and "c58f30108f718f92721af3b95e74349a" in msg
    assert str(tmp_path) in msg


def test_cifar_failed_download_is_wrapped(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as tv_cifar

    def fail(*args, **kwargs):
        raise urllib.error.URLError("no network in tests")

    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", fail)
    with pytest.raises(DataError, match="c58f30108f718f92721af3b95e74349a") as info:
        load_dataset("cifar10", "test", data_dir=tmp_path, download=True)
    assert isinstance(info.value.__cause__, urllib.error.URLError)


# --------------------------------------------------------------------------------------
# Names, splits, data root
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["imagenet", "mnist2", "cifar100", ""])
def test_unknown_dataset(tmp_path, bad):
    with pytest.raises(ValueError, match="mnist, fashion_mnist, cifar10"):
        load_dataset(bad, data_dir=tmp_path / "nowhere", download=False)


@pytest.mark.parametrize("bad", ["val", "validation", "Train", "all"])
def test_bad_split(tmp_path, bad):
    with pytest.raises(ValueError, match="'train', 'test'"):
        load_dataset("mnist", bad, data_dir=tmp_path / "nowhere", download=False)
    assert not (tmp_path / "nowhere").exists()


def test_datasets_constant():
    assert DATASETS == ("mnist", "fashion_mnist", "cifar10")


def test_data_root_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv("BPDL_DATA_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert data_root() == tmp_path / "home" / ".cache" / "bpdl" / "data"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data_root() == tmp_path / "xdg" / "bpdl" / "data"
    monkeypatch.setenv("BPDL_DATA_DIR", str(tmp_path / "env"))
    assert data_root() == tmp_path / "env"
    assert data_root(tmp_path / "explicit") == tmp_path / "explicit"
    assert data_root(str(tmp_path / "explicit")) == tmp_path / "explicit"
    assert data_root("~/d") == tmp_path / "home" / "d"
    assert not (tmp_path / "env").exists() and not (tmp_path / "xdg").exists()


def _imbalanced_labels(seed=0):
    counts = [50, 30, 15, 5]
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    return labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))]


def test_stratified_split_properties():
    labels = _imbalanced_labels()
    tr, va = stratified_split(labels, val_size=17, seed=0)
    assert tr.dtype == va.dtype == torch.int64
    assert (len(tr), len(va)) == (83, 17)
    assert torch.equal(torch.sort(torch.cat([tr, va])).values, torch.arange(100))
    assert torch.equal(tr, torch.sort(tr).values) and torch.equal(va, torch.sort(va).values)
    # Quotas 8.5, 5.1, 2.55, 0.85 -> largest remainders give 8, 5, 3, 1.
    assert torch.bincount(labels[va], minlength=4).tolist() == [8, 5, 3, 1]
    tr2, va2 = stratified_split(labels, val_size=17, seed=0)
    assert torch.equal(va, va2) and torch.equal(tr, tr2)
    _, va3 = stratified_split(labels, val_size=17, seed=1)
    assert not torch.equal(va, va3)
    # Quotas 12.5, 7.5, 3.75, 1.25: 0.75 first, then the tie at 0.5 goes to the smaller label.
    _, va4 = stratified_split(labels, val_size=0.25, seed=0)
    assert torch.bincount(labels[va4], minlength=4).tolist() == [13, 7, 4, 1]


@pytest.mark.parametrize("val_size", [1, 7, 33, 64, 99])
def test_stratified_split_proportions(val_size):
    labels = _imbalanced_labels(seed=val_size)
    tr, va = stratified_split(labels, val_size=val_size, seed=3)
    assert len(va) == val_size and len(tr) == 100 - val_size
    counts = torch.bincount(labels[va], minlength=4).double()
    expected = torch.tensor([50, 30, 15, 5], dtype=torch.float64) * val_size / 100
    assert (counts - expected).abs().max() < 1


@pytest.mark.parametrize("bad", [0, -1, 100, 250, 0.0, 1.0, -0.2, 1.5, 0.001, True, "10"])
def test_stratified_split_bad_size(bad):
    with pytest.raises(ValueError, match="val_size"):
        stratified_split(_imbalanced_labels(), val_size=bad, seed=0)


def test_kfold_indices():
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate([12, 9, 7])])
    labels = labels[torch.randperm(28, generator=torch.Generator().manual_seed(5))]
    folds = kfold_indices(labels, 3, seed=0)
    assert len(folds) == 3
    vals = torch.cat([va for _, va in folds])
    assert torch.equal(torch.sort(vals).values, torch.arange(28))  # each example once
    sizes = [len(va) for _, va in folds]
    assert max(sizes) - min(sizes) <= 1
    per_class = torch.stack([torch.bincount(labels[va], minlength=3) for _, va in folds])
    assert (per_class.max(0).values - per_class.min(0).values).max() <= 1
    assert per_class.sum(0).tolist() == [12, 9, 7]
    for tr, va in folds:
        assert tr.dtype == va.dtype == torch.int64
        assert len(np.intersect1d(tr.numpy(), va.numpy())) == 0
        assert len(tr) + len(va) == 28
    again = kfold_indices(labels, 3, seed=0)
    assert all(torch.equal(a[1], b[1]) for a, b in zip(folds, again, strict=True))
    other = kfold_indices(labels, 3, seed=1)
    assert not all(torch.equal(a[1], b[1]) for a, b in zip(folds, other, strict=True))
    assert len(kfold_indices(labels, 7, seed=0)) == 7


@pytest.mark.parametrize("k", [-1, 0, 1, 8, 100])
def test_kfold_bad_k(k):
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate([12, 9, 7])])
    with pytest.raises(ValueError, match="k"):
        kfold_indices(labels, k, seed=0)


# --------------------------------------------------------------------------------------
# ImageSet, to_float, batches, synthetic data
# --------------------------------------------------------------------------------------


def _indexed_set(n=103):
    """Image i has every pixel equal to i, label i % 10."""
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 3).contiguous()
    return ImageSet(images, torch.arange(n) % 10, "indexed")


def test_to_float():
    x = torch.tensor([0, 51, 128, 255], dtype=torch.uint8)
    y = to_float(x)
    assert y.dtype == torch.float32
    assert torch.allclose(y, torch.tensor([0.0, 0.2, 128 / 255, 1.0]))
    assert to_float(x, torch.float64).dtype == torch.float64
    with pytest.raises(TypeError):
        to_float(y)


def test_imageset_basics():
    s = _indexed_set(12)
    assert len(s) == 12 and s.shape == (1, 2, 3) and s.num_features == 6
    sub = s.subset(torch.tensor([5, 2]))
    assert sub.images[:, 0, 0, 0].tolist() == [5, 2] and sub.labels.tolist() == [5, 2]
    assert sub.name == "indexed" and sub.classes == 10
    assert s.subset(range(3, 6)).labels.tolist() == [3, 4, 5]
    assert s.subset([11, 0]).images[:, 0, 0, 0].tolist() == [11, 0]
    assert len(s.subset([])) == 0 and s.subset([]).shape == (1, 2, 3)
    masked = s.subset(s.labels >= 8)
    assert masked.labels.tolist() == [8, 9]
    sub.images.zero_()
    assert s.images[5, 0, 0, 0].item() == 5  # subsets are copies
    moved = s.to("cpu")
    assert moved.images.device.type == "cpu" and torch.equal(moved.images, s.images)
    with pytest.raises(TypeError):
        ImageSet(s.images.float(), s.labels, "x")
    with pytest.raises(ValueError):
        ImageSet(s.images, s.labels[:5], "x")


def test_iterate_batches_shuffled_epoch():
    s = _indexed_set(103)
    gen = torch.Generator().manual_seed(0)
    batches = list(iterate_batches(s, 10, shuffle=True, generator=gen))
    assert [len(y) for _, y in batches] == [10] * 10 + [3]
    xs = torch.cat([x for x, _ in batches])
    ys = torch.cat([y for _, y in batches])
    assert xs.dtype == torch.float32 and xs.shape == (103, 1, 2, 3)
    assert float(xs.min()) >= 0.0 and float(xs.max()) <= 1.0
    order = (xs[:, 0, 0, 0] * 255).round().long()
    assert torch.equal(torch.sort(order).values, torch.arange(103))  # each example once
    assert not torch.equal(order, torch.arange(103))  # actually shuffled
    assert torch.equal(ys, order % 10)  # labels travel with their images
    assert torch.equal(xs, s.images[order].float() / 255)
    again = torch.cat(
        [
            x
            for x, _ in iterate_batches(
                s, 10, shuffle=True, generator=torch.Generator().manual_seed(0)
            )
        ]
    )
    assert torch.equal(again, xs)
    other = torch.cat(
        [
            x
            for x, _ in iterate_batches(
                s, 10, shuffle=True, generator=torch.Generator().manual_seed(1)
            )
        ]
    )
    assert not torch.equal(other, xs)


def test_iterate_batches_options():
    s = _indexed_set(103)
    dropped = list(
        iterate_batches(
            s, 10, shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(0)
        )
    )
    assert [len(y) for _, y in dropped] == [10] * 10
    plain = list(iterate_batches(s, 50, shuffle=False, dtype=torch.float64))
    assert [len(y) for _, y in plain] == [50, 50, 3]
    assert plain[0][0].dtype == torch.float64
    assert torch.equal(torch.cat([y for _, y in plain]), torch.arange(103) % 10)
    assert list(iterate_batches(s, 200, shuffle=False, drop_last=True)) == []
    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError, match="batch_size"):
            iterate_batches(s, bad, shuffle=False)  # raised at call time, not on iteration


def test_synthetic_dataset(synthetic_data):
    s = synthetic_data
    assert s.images.shape == (200, 1, 8, 8) and s.images.dtype == torch.uint8
    assert s.labels.dtype == torch.int64 and s.name == "synthetic" and s.classes == 10
    assert torch.bincount(s.labels, minlength=10).tolist() == [20] * 10
    same = synthetic_dataset(200, shape=(1, 8, 8), classes=10, seed=0)
    assert torch.equal(same.images, s.images) and torch.equal(same.labels, s.labels)
    assert not torch.equal(synthetic_dataset(200, seed=1).images, s.images)
    rgb = synthetic_dataset(30, shape=(3, 4, 5), classes=3, name="tiny")
    assert rgb.images.shape == (30, 3, 4, 5) and rgb.classes == 3 and rgb.name == "tiny"
    assert rgb.labels.max().item() == 2


def test_synthetic_dataset_is_learnable():
    s = synthetic_dataset(1000, shape=(1, 8, 8), classes=10, seed=4)
    x = to_float(s.images).flatten(1)
    fit, held = slice(0, 500), slice(500, 1000)
    means = torch.stack([x[fit][s.labels[fit] == c].mean(0) for c in range(10)])
    pred = torch.cdist(x[held], means).argmin(1)
    accuracy = (pred == s.labels[held]).float().mean().item()
    assert accuracy > 0.9
