"""Datasets, splits and batching for bpdl.

MNIST, Fashion-MNIST and CIFAR-10 are read through torchvision's dataset classes and held in
memory as one ``uint8`` tensor of shape ``(N, C, H, W)`` plus one ``int64`` label tensor
(:class:`ImageSet`). Batches are cut from these tensors with a permutation and converted to
floats in ``[0, 1]`` (pixels/255, no mean/std normalisation) one batch at a time
(:func:`iterate_batches`); there is no per-sample ``DataLoader``.

Offline use: the data root (:func:`data_root`) holds the original distribution files in
torchvision's layout::

    <root>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz
    <root>/FashionMNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz
    <root>/cifar-10-python.tar.gz          (or the extracted <root>/cifar-10-batches-py/)

Every file that is present is checked against the md5 (and size, where known) in this
module's tables before torchvision sees it (once per process per file version); a wrong file
raises :class:`DataError` naming the file, the expected checksum and where the right file
goes. Missing files are downloaded by torchvision when ``download=True``.

Loaded datasets are cached in-process; every call returns an :class:`ImageSet` with its own
copy of the tensors, so callers may modify them in place without affecting later calls.
"""

from __future__ import annotations

import gzip
import hashlib
import numbers
import os
import pathlib
import shutil
import tarfile
import tempfile
import threading
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from bpdl.errors import BPDLError, ConfigError

__all__ = [
    "DATASETS",
    "DATASET_INFO",
    "dataset_info",
    "DataError",
    "ImageSet",
    "data_root",
    "iterate_batches",
    "kfold_indices",
    "load_dataset",
    "stratified_split",
    "synthetic_dataset",
    "to_float",
    "train_val_test",
]

DATASETS: tuple[str, ...] = ("mnist", "fashion_mnist", "cifar10")

#: (C, H, W) and number of classes of each dataset, known without loading it.
DATASET_INFO: dict[str, tuple[tuple[int, int, int], int]] = {
    "mnist": ((1, 28, 28), 10),
    "fashion_mnist": ((1, 28, 28), 10),
    "cifar10": ((3, 32, 32), 10),
}


def dataset_info(name: str) -> tuple[tuple[int, int, int], int]:
    """``((C, H, W), classes)`` of dataset ``name`` (ConfigError for unknown names)."""
    return DATASET_INFO[_canonical_name(name)]

SPLITS: tuple[str, ...] = ("train", "test")


class DataError(BPDLError, RuntimeError):
    """A data problem the user can fix (missing, corrupt or unreadable files).

    The message says which file is affected, what was expected and what to do about it.
    """


# --------------------------------------------------------------------------------------
# Checksum tables (md5 as checked by torchvision; sizes of the original distribution files)
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _FileSpec:
    name: str
    md5: str
    size: int | None = None

    def describe(self) -> str:
        size = f", {self.size} bytes" if self.size is not None else ""
        return f"{self.name} (md5 {self.md5}{size})"


MNIST_FILES: tuple[_FileSpec, ...] = (
    _FileSpec("train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873", 9912422),
    _FileSpec("train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432", 28881),
    _FileSpec("t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3", 1648877),
    _FileSpec("t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c", 4542),
)

FASHION_MNIST_FILES: tuple[_FileSpec, ...] = (
    _FileSpec("train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d", 26421880),
    _FileSpec("train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe", 29515),
    _FileSpec("t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79", 4422102),
    _FileSpec("t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310", 5148),
)

# Sizes of the decompressed idx files (identical for MNIST and Fashion-MNIST).
_IDX_SIZES: dict[str, int] = {
    "train-images-idx3-ubyte": 16 + 60000 * 28 * 28,
    "train-labels-idx1-ubyte": 8 + 60000,
    "t10k-images-idx3-ubyte": 16 + 10000 * 28 * 28,
    "t10k-labels-idx1-ubyte": 8 + 10000,
}

CIFAR10_ARCHIVE = _FileSpec("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a", 170498071)
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_FILES: tuple[_FileSpec, ...] = (
    _FileSpec("data_batch_1", "c99cafc152244af753f735de768cd75f"),
    _FileSpec("data_batch_2", "d4bba439e000b95fd0a9bffe97cbabec"),
    _FileSpec("data_batch_3", "54ebc095f3ab1f0389bbae665268c751"),
    _FileSpec("data_batch_4", "634d18415352ddfa80567beed471001a"),
    _FileSpec("data_batch_5", "482c414d41f54cd18b22e5b47cb7c3cb"),
    _FileSpec("test_batch", "40351d587109b95175f43aff81a1287e"),
    _FileSpec("batches.meta", "5ff9c542aee3614f3951f8cda6e48888"),
)
_CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)

_ALIASES: dict[str, str] = {
    "mnist": "mnist",
    "fashionmnist": "fashion_mnist",
    "fmnist": "fashion_mnist",
    "cifar10": "cifar10",
}

_MNIST_FOLDERS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}
_PRETTY = {"mnist": "MNIST", "fashion_mnist": "Fashion-MNIST", "cifar10": "CIFAR-10"}


# --------------------------------------------------------------------------------------
# Data root
# --------------------------------------------------------------------------------------


def data_root(data_dir: str | os.PathLike[str] | None = None) -> pathlib.Path:
    """Return the folder that holds the datasets (it is not created).

    Precedence: an explicit ``data_dir``; else the environment variable ``BPDL_DATA_DIR``;
    else the per-user cache folder ``$XDG_CACHE_HOME/bpdl/data`` (``~/.cache/bpdl/data`` when
    ``XDG_CACHE_HOME`` is unset or empty). ``~`` is expanded; the path is not resolved.
    """
    if data_dir is not None:
        return pathlib.Path(data_dir).expanduser()
    env = os.environ.get("BPDL_DATA_DIR")
    if env:
        return pathlib.Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    cache = pathlib.Path(xdg).expanduser() if xdg else pathlib.Path.home() / ".cache"
    return cache / "bpdl" / "data"


# --------------------------------------------------------------------------------------
# ImageSet
# --------------------------------------------------------------------------------------


@dataclass
class ImageSet:
    """An in-memory image classification set.

    Attributes:
        images: ``uint8`` tensor ``(N, C, H, W)``, channel-first and contiguous.
        labels: ``int64`` tensor ``(N,)`` with values in ``[0, classes)``.
        name: dataset name, e.g. ``"mnist"``.
        classes: number of classes.
    """

    images: torch.Tensor
    labels: torch.Tensor
    name: str
    classes: int = 10

    def __post_init__(self) -> None:
        if not isinstance(self.images, torch.Tensor) or not isinstance(self.labels, torch.Tensor):
            raise TypeError("ImageSet.images and ImageSet.labels must be torch tensors")
        if self.images.dtype != torch.uint8:
            raise TypeError(f"ImageSet.images must be uint8, got {self.images.dtype}")
        if self.images.dim() != 4:
            raise ValueError(
                f"ImageSet.images must have shape (N, C, H, W), got {tuple(self.images.shape)}"
            )
        if self.labels.dtype != torch.int64 or self.labels.dim() != 1:
            raise TypeError(
                f"ImageSet.labels must be a 1-D int64 tensor, got {self.labels.dtype} "
                f"with shape {tuple(self.labels.shape)}"
            )
        if self.labels.shape[0] != self.images.shape[0]:
            raise ValueError(
                f"ImageSet has {self.images.shape[0]} images but {self.labels.shape[0]} labels"
            )
        if self.labels.device != self.images.device:
            raise ValueError("ImageSet.images and ImageSet.labels must be on the same device")
        if int(self.classes) < 1:
            raise ValueError(f"ImageSet.classes must be positive, got {self.classes}")
        self.classes = int(self.classes)
        self.images = self.images.contiguous()

    def __len__(self) -> int:
        """Number of examples."""
        return int(self.images.shape[0])

    def subset(self, index: torch.Tensor | Sequence[int]) -> ImageSet:
        """Return the examples selected by ``index``.

        ``index`` is a 1-D integer index tensor, a boolean mask, or a sequence of ints (e.g. a
        ``range``). The result holds copies of the selected rows, in the order of ``index``.
        """
        index = torch.as_tensor(index, device=self.images.device)
        if index.numel() == 0 and index.dtype != torch.bool:
            index = index.to(torch.int64)
        if index.dim() != 1 or (index.dtype != torch.bool and index.dtype.is_floating_point):
            raise TypeError(
                f"subset index must be a 1-D integer or bool tensor, got {index.dtype} "
                f"with shape {tuple(index.shape)}"
            )
        return ImageSet(self.images[index], self.labels[index], self.name, self.classes)

    def to(self, device: torch.device | str | int) -> ImageSet:
        """Return the set with both tensors on ``device`` (no copy if already there)."""
        return ImageSet(self.images.to(device), self.labels.to(device), self.name, self.classes)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Shape of one image, ``(C, H, W)``."""
        c, h, w = self.images.shape[1:]
        return int(c), int(h), int(w)

    @property
    def num_features(self) -> int:
        """Number of values in one flattened image, ``C * H * W``."""
        c, h, w = self.shape
        return c * h * w


def to_float(images_uint8: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Convert ``uint8`` pixels to floats in ``[0, 1]`` (pixels/255, no normalisation)."""
    if images_uint8.dtype != torch.uint8:
        raise TypeError(f"to_float expects a uint8 tensor, got {images_uint8.dtype}")
    if not dtype.is_floating_point:
        raise TypeError(f"to_float needs a floating dtype, got {dtype}")
    return images_uint8.to(dtype).div_(255)


# --------------------------------------------------------------------------------------
# File checks
# --------------------------------------------------------------------------------------

_MD5_CACHE: dict[tuple[str, int, int], str] = {}
_DATASET_CACHE: dict[tuple, ImageSet] = {}
_LOCK = threading.RLock()


def _file_md5(path: pathlib.Path) -> str:
    """md5 of a file, computed once per (path, size, mtime)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    with _LOCK:
        cached = _MD5_CACHE.get(key)
    if cached is not None:
        return cached
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    result = digest.hexdigest()
    with _LOCK:
        _MD5_CACHE[key] = result
    return result


def _check_file(path: pathlib.Path, spec: _FileSpec, verify: bool, fix: str) -> bool:
    """True if ``path`` exists (and, with ``verify``, matches ``spec``); False if missing.

    Raises DataError for a present file that is not a regular file or fails the check; the
    message ends with ``fix``.
    """
    try:
        st = path.stat()
    except FileNotFoundError:
        return False
    if not path.is_file():
        raise DataError(
            f"{path} should be the data file {spec.describe()} but is not a file. {fix}"
        )
    if not verify:
        return True
    if spec.size is not None and st.st_size != spec.size:
        problem = f"it has {st.st_size} bytes, expected {spec.size} (truncated or wrong file)"
    else:
        got = _file_md5(path)
        if got == spec.md5:
            return True
        problem = f"its md5 is {got}"
    raise DataError(f"Corrupt data file {path}: {problem}; expected md5 {spec.md5}. {fix}")


def _writable_hint(root: pathlib.Path) -> str:
    return (
        f"The data root {root} must be writable; copy the data files into a writable folder "
        "with the same layout and pass data_dir=... (or set BPDL_DATA_DIR)."
    )


def _publish(tmp: str, dst: pathlib.Path) -> None:
    """Give a finished temporary file the usual permissions (0666 less umask), rename it."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o666 & ~mask)
    os.replace(tmp, dst)


def _extract_gzip(src: pathlib.Path, dst: pathlib.Path, root: pathlib.Path) -> None:
    """Decompress ``src`` to ``dst`` atomically (temporary file, then rename)."""
    tmp_name = None
    try:
        with tempfile.NamedTemporaryFile(
            dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp", delete=False
        ) as out:
            tmp_name = out.name
            with gzip.open(src, "rb") as f:
                shutil.copyfileobj(f, out, 1 << 20)
        _publish(tmp_name, dst)
        tmp_name = None
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:
        raise DataError(
            f"Cannot decompress {src}: {err}. The file is corrupt; delete it so it can be "
            "downloaded again (download=True), or replace it with the original file."
        ) from err
    except OSError as err:
        raise DataError(f"Cannot extract {src} to {dst}: {err}. {_writable_hint(root)}") from err
    finally:
        if tmp_name is not None:
            try:
                os.unlink(tmp_name)
            except OSError:
                pass


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------


def _canonical_name(name: str) -> str:
    if not isinstance(name, str):
        raise ConfigError(f"dataset name must be a string, one of {DATASETS}; got {name!r}")
    key = name.strip().lower().replace("-", "").replace("_", "").replace(" ", "")
    if key not in _ALIASES:
        raise ConfigError(f"unknown dataset {name!r}; valid datasets are: {', '.join(DATASETS)}")
    return _ALIASES[key]


def _check_split(split: str) -> str:
    if split not in SPLITS:
        hint = ""
        if isinstance(split, str) and split.lower() in ("val", "valid", "validation"):
            hint = " (a validation set is cut from 'train': use train_val_test or stratified_split)"
        raise ValueError(f"unknown split {split!r}; valid splits are 'train', 'test'{hint}")
    return split


def _stat_signature(paths: Sequence[pathlib.Path]) -> tuple:
    sig = []
    for p in paths:
        st = p.stat()
        sig.append((p.name, st.st_size, st.st_mtime_ns))
    return tuple(sig)


def _missing_error(
    name: str,
    split: str,
    root: pathlib.Path,
    folder: pathlib.Path,
    missing: Sequence[_FileSpec],
    extra: str = "",
) -> str:
    files = "\n".join(f"  - {spec.describe()}" for spec in missing)
    them = "it" if len(missing) == 1 else "them"
    return (
        f"{_PRETTY[name]} ({split}) is not available in the data root {root}. Missing files:\n"
        f"{files}\nPut {them} in {folder}{extra}, or let bpdl download {them} "
        "(download=True; on the command line, leave out --offline). The data root is chosen by "
        "data_dir=... (on the command line, --data-dir), else the BPDL_DATA_DIR environment "
        "variable, else ~/.cache/bpdl/data."
    )


def _prepare_mnist(name: str, root: pathlib.Path, verify: bool) -> list[_FileSpec]:
    """Check the .gz files of an MNIST-like set, extract what is needed; return missing ones."""
    raw = root / _MNIST_FOLDERS[name] / "raw"
    specs = MNIST_FILES if name == "mnist" else FASHION_MNIST_FILES
    missing = []
    for spec in specs:
        gz = raw / spec.name
        out = raw / spec.name[: -len(".gz")]
        fix = (
            f"Delete {gz} so it can be downloaded again (download=True), or replace it with the "
            f"original file {spec.name} (md5 {spec.md5}) in {raw}."
        )
        expected_out = _IDX_SIZES[out.name]
        if _check_file(gz, spec, verify, fix):
            gz_mtime = gz.stat().st_mtime_ns
            try:
                st = out.stat()
                stale = st.st_mtime_ns < gz_mtime or (verify and st.st_size != expected_out)
            except FileNotFoundError:
                stale = True
            if stale:
                _extract_gzip(gz, out, root)
        elif not (out.is_file() and out.stat().st_size == expected_out):
            # Accept an already-extracted idx file of the right size without its archive.
            missing.append(spec)
    return missing


def _load_mnist_like(name: str, split: str, root: pathlib.Path, download: bool, verify: bool):
    from torchvision import datasets

    cls = datasets.MNIST if name == "mnist" else datasets.FashionMNIST
    raw = root / _MNIST_FOLDERS[name] / "raw"
    train = split == "train"
    missing = _prepare_mnist(name, root, verify)
    if missing:
        if not download:
            raise DataError(_missing_error(name, split, root, raw, missing))
        try:
            cls(os.fspath(root), train=train, download=True)
        except Exception as err:
            raise DataError(
                f"Downloading {_PRETTY[name]} into {raw} failed ({type(err).__name__}: {err}).\n"
                + _missing_error(name, split, root, raw, missing)
            ) from err
        missing = _prepare_mnist(name, root, verify)
        if missing:
            raise DataError(_missing_error(name, split, root, raw, missing))
    prefix = "train" if train else "t10k"
    files = [raw / f"{prefix}-images-idx3-ubyte", raw / f"{prefix}-labels-idx1-ubyte"]
    signature = _stat_signature(files)

    def read() -> ImageSet:
        try:
            ds = cls(os.fspath(root), train=train, download=False)
            images = torch.as_tensor(ds.data).to(torch.uint8).unsqueeze(1).contiguous()
            labels = torch.as_tensor(ds.targets).to(torch.int64)
        except Exception as err:
            raise DataError(
                f"Reading {_PRETTY[name]} ({split}) from {raw} failed ({type(err).__name__}: "
                f"{err}). Delete the files in {raw} so they can be downloaded again, or replace "
                "them with the original .gz files."
            ) from err
        return ImageSet(images, labels, name, 10)

    return signature, read


def _cifar_class():
    from torchvision import datasets

    class _CIFAR10(datasets.CIFAR10):
        """torchvision's CIFAR10 with switchable (and cached) checksum verification."""

        def __init__(self, root: str, train: bool, download: bool, verify: bool) -> None:
            self._bpdl_verify = verify
            super().__init__(root, train=train, download=download)

        def _check_integrity(self) -> bool:
            for filename, md5 in self.train_list + self.test_list:
                path = pathlib.Path(self.root, self.base_folder, filename)
                if not path.is_file():
                    return False
                if self._bpdl_verify and _file_md5(path) != md5:
                    return False
            return True

        def _load_meta(self) -> None:
            if self._bpdl_verify:
                super()._load_meta()
                return
            path = pathlib.Path(self.root, self.base_folder, self.meta["filename"])
            if path.is_file():
                import pickle

                with open(path, "rb") as f:
                    meta = pickle.load(f, encoding="latin1")
                self.classes = list(meta.get(self.meta["key"], _CIFAR10_CLASSES))
            else:
                self.classes = list(_CIFAR10_CLASSES)
            self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

    return _CIFAR10


def _extract_cifar(
    tar_path: pathlib.Path, folder: pathlib.Path, names: Sequence[str], root: pathlib.Path
) -> None:
    """Extract the members ``cifar-10-batches-py/<name>`` of the archive into ``folder``."""
    wanted = {f"{CIFAR10_FOLDER}/{n}": n for n in names}
    found: set[str] = set()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tarfile.open(tar_path, "r:gz") as tar:
            for member in tar:
                key = member.name.lstrip("./")
                if key not in wanted or not member.isfile():
                    continue
                src = tar.extractfile(member)
                if src is None:
                    continue
                dst = folder / wanted[key]
                fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{dst.name}.", suffix=".tmp")
                try:
                    with os.fdopen(fd, "wb") as out:
                        shutil.copyfileobj(src, out, 1 << 20)
                    _publish(tmp, dst)
                except BaseException:
                    try:
                        os.unlink(tmp)
                    except OSError:
                        pass
                    raise
                found.add(key)
    except (tarfile.TarError, EOFError, gzip.BadGzipFile) as err:
        raise DataError(
            f"Cannot read the archive {tar_path}: {err}. It is corrupt; delete it so it can be "
            f"downloaded again (download=True), or replace it with the original "
            f"{CIFAR10_ARCHIVE.describe()}."
        ) from err
    except OSError as err:
        raise DataError(
            f"Cannot extract {tar_path} into {folder}: {err}. {_writable_hint(root)}"
        ) from err
    lacking = sorted(set(wanted) - found)
    if lacking:
        raise DataError(
            f"The archive {tar_path} lacks {', '.join(lacking)}: it is not the CIFAR-10 python "
            f"archive. Replace it with the original {CIFAR10_ARCHIVE.describe()}."
        )


def _prepare_cifar(root: pathlib.Path, verify: bool) -> list[_FileSpec]:
    """Check the extracted batches, extract missing ones from the archive; return missing."""
    folder = root / CIFAR10_FOLDER
    tar_path = root / CIFAR10_ARCHIVE.name

    def check_batches() -> list[_FileSpec]:
        out = []
        for spec in CIFAR10_FILES:
            fix = (
                f"Delete the folder {folder} so it can be extracted again from "
                f"{CIFAR10_ARCHIVE.name} in {root} (or downloaded again with download=True)."
            )
            if not _check_file(folder / spec.name, spec, verify, fix):
                out.append(spec)
        return out

    missing = check_batches()
    if missing:
        fix = (
            f"Delete {tar_path} so it can be downloaded again (download=True), or replace it "
            f"with the original {CIFAR10_ARCHIVE.describe()}."
        )
        if _check_file(tar_path, CIFAR10_ARCHIVE, verify, fix):
            _extract_cifar(tar_path, folder, [s.name for s in missing], root)
            missing = check_batches()
    return missing


def _cifar_missing_error(split: str, root: pathlib.Path, missing: Sequence[_FileSpec]) -> str:
    return _missing_error(
        "cifar10",
        split,
        root,
        root,
        [CIFAR10_ARCHIVE],
        extra=(
            f" (or its extracted folder {root / CIFAR10_FOLDER} with all of "
            f"{', '.join(s.name for s in CIFAR10_FILES)}; missing there: "
            f"{', '.join(s.name for s in missing)})"
        ),
    )


def _load_cifar(split: str, root: pathlib.Path, download: bool, verify: bool):
    cls = _cifar_class()
    train = split == "train"
    missing = _prepare_cifar(root, verify)
    if missing:
        if not download:
            raise DataError(_cifar_missing_error(split, root, missing))
        try:
            cls(os.fspath(root), train=train, download=True, verify=verify)
        except Exception as err:
            raise DataError(
                f"Downloading CIFAR-10 into {root} failed ({type(err).__name__}: {err}).\n"
                + _cifar_missing_error(split, root, missing)
            ) from err
        missing = _prepare_cifar(root, verify)
        if missing:
            raise DataError(_cifar_missing_error(split, root, missing))
    folder = root / CIFAR10_FOLDER
    names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    signature = _stat_signature([folder / n for n in names])

    def read() -> ImageSet:
        try:
            ds = cls(os.fspath(root), train=train, download=False, verify=verify)
            data = np.ascontiguousarray(ds.data)
            if data.ndim != 4 or data.shape[1:] != (32, 32, 3):
                raise ValueError(f"unexpected image array shape {data.shape}")
            # torchvision hands out HWC; keep each channel in its own plane: (N, 3, 32, 32).
            images = torch.from_numpy(data).to(torch.uint8).permute(0, 3, 1, 2).contiguous()
            labels = torch.as_tensor(np.asarray(ds.targets, dtype=np.int64))
            if labels.shape[0] != images.shape[0]:
                raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
        except Exception as err:
            raise DataError(
                f"Reading CIFAR-10 ({split}) from {folder} failed ({type(err).__name__}: {err}). "
                f"Delete {folder} so it can be extracted or downloaded again."
            ) from err
        return ImageSet(images, labels, "cifar10", 10)

    return signature, read


def load_dataset(
    name: str,
    split: str = "train",
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = True,
    verify: bool | None = None,
) -> ImageSet:
    """Load one split of a dataset into memory.

    Args:
        name: one of :data:`DATASETS`; spelling variants such as ``"fashion-mnist"``,
            ``"FashionMNIST"`` or ``"CIFAR10"`` are accepted (case-insensitive).
        split: ``"train"`` or ``"test"`` (the official splits).
        data_dir: data root; see :func:`data_root` for the default.
        download: download missing files with torchvision. With ``False`` a missing file
            raises :class:`DataError`.
        verify: check every present file's md5 (and size) against this module's tables.
            ``False`` only checks that the files exist. Default: True, unless the environment
            variable ``BPDL_VERIFY_DATA`` is ``0`` (for copies of the files that differ from
            the published archives, such as test files written in their format).

    Returns:
        An :class:`ImageSet` with ``uint8`` images ``(N, C, H, W)`` (``(N, 1, 28, 28)`` for
        MNIST and Fashion-MNIST, ``(N, 3, 32, 32)`` for CIFAR-10 with channels R, G, B) and
        ``int64`` labels. The tensors are the caller's own copies.

    Raises:
        ValueError: unknown dataset or split.
        DataError: missing, corrupt or unreadable files, or a failed download.
    """
    canonical = _canonical_name(name)
    _check_split(split)
    if verify is None:
        verify = os.environ.get("BPDL_VERIFY_DATA", "1").strip().lower() not in ("0", "false",
                                                                               "no")
    root = data_root(data_dir).resolve()
    if root.exists() and not root.is_dir():
        raise DataError(f"The data root {root} is not a folder; pass data_dir=... pointing to one.")
    with _LOCK:
        if canonical == "cifar10":
            signature, read = _load_cifar(split, root, download, verify)
        else:
            signature, read = _load_mnist_like(canonical, split, root, download, verify)
        key = (canonical, split, str(root), signature)
        cached = _DATASET_CACHE.get(key)
        if cached is None:
            cached = read()
            for old in [k for k in _DATASET_CACHE if k[:3] == key[:3]]:
                del _DATASET_CACHE[old]
            _DATASET_CACHE[key] = cached
    return ImageSet(cached.images.clone(), cached.labels.clone(), cached.name, cached.classes)


def _clear_cache() -> None:
    """Forget the in-process caches of loaded datasets and file checksums."""
    with _LOCK:
        _DATASET_CACHE.clear()
        _MD5_CACHE.clear()


# --------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------


def _check_labels(labels: torch.Tensor) -> torch.Tensor:
    if not isinstance(labels, torch.Tensor):
        labels = torch.as_tensor(labels)
    if labels.dim() != 1 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(
            f"labels must be a 1-D integer tensor, got {labels.dtype} {tuple(labels.shape)}"
        )
    if labels.numel() == 0:
        raise ValueError("labels is empty")
    return labels.detach().to("cpu", torch.int64)


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int, got {seed!r}")
    return int(seed)


def _class_members(labels: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Classes (sorted) and, for each, the indices of its examples (ascending)."""
    order = torch.argsort(labels, stable=True)
    classes, counts = torch.unique(labels, sorted=True, return_counts=True)
    return classes, list(torch.split(order, counts.tolist()))


def stratified_split(
    labels: torch.Tensor, *, val_size: int | float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split example indices into a training and a validation part, stratified by class.

    Args:
        labels: 1-D integer class labels of all ``N`` examples.
        val_size: an ``int`` is the number of validation examples (``1 <= val_size < N``); a
            ``float`` in ``(0, 1)`` is a fraction of ``N`` (rounded to the nearest integer,
            which must again lie in ``[1, N)``).
        seed: seed of the ``torch.Generator`` that picks the validation examples.

    Returns:
        ``(train_idx, val_idx)``: disjoint ``int64`` index tensors, each sorted ascending,
        whose union is ``0..N-1``. The validation set has exactly the requested size, and
        each class gets its proportional share of it, rounded by the largest-remainder rule
        (within 1 of ``val_size * n_class / N``). The same seed gives the same split.

    Raises:
        ValueError: bad ``val_size`` or ``labels``.
    """
    labels = _check_labels(labels)
    seed = _check_seed(seed)
    n = labels.numel()
    if isinstance(val_size, bool) or not isinstance(val_size, numbers.Real):
        raise ValueError(f"val_size must be an int count or a float fraction, got {val_size!r}")
    if isinstance(val_size, numbers.Integral):
        n_val = int(val_size)
        if not 1 <= n_val < n:
            raise ValueError(
                f"val_size={n_val} is out of range: it must be between 1 and {n - 1} "
                f"(there are {n} examples)"
            )
    else:
        frac = float(val_size)
        if not 0.0 < frac < 1.0:
            raise ValueError(
                f"val_size={val_size!r} as a fraction must lie strictly between 0 and 1 "
                "(pass an int for a number of examples)"
            )
        n_val = round(frac * n)
        if not 1 <= n_val < n:
            raise ValueError(
                f"val_size={frac} of {n} examples gives {n_val} validation examples; "
                f"it must give between 1 and {n - 1}"
            )
    classes, members = _class_members(labels)
    counts = torch.tensor([m.numel() for m in members], dtype=torch.int64)
    # Largest remainder: floor of each class's quota, the rest to the largest remainders
    # (ties to the smaller class label). Exact integer arithmetic.
    scaled = counts * n_val
    share = scaled // n
    remainder = scaled % n
    short = n_val - int(share.sum())
    if short > 0:
        order = torch.argsort(-remainder, stable=True)
        share[order[:short]] += 1
    gen = torch.Generator().manual_seed(seed)
    val_parts = []
    for idx, k in zip(members, share.tolist(), strict=True):
        perm = torch.randperm(idx.numel(), generator=gen)
        val_parts.append(idx[perm[:k]])
    val_idx = torch.sort(torch.cat(val_parts)).values
    mask = torch.ones(n, dtype=torch.bool)
    mask[val_idx] = False
    train_idx = torch.nonzero(mask).flatten()
    return train_idx, val_idx


def kfold_indices(
    labels: torch.Tensor, k: int, seed: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Stratified k-fold cross-validation indices.

    Every example lies in exactly one validation fold; within every class the fold counts
    differ by at most 1, and so do the total fold sizes.

    Args:
        labels: 1-D integer class labels.
        k: number of folds, ``2 <= k <= `` the smallest class count.
        seed: seed of the ``torch.Generator`` that assigns examples to folds.

    Returns:
        ``k`` pairs ``(train_idx, val_idx)`` of sorted ``int64`` index tensors.

    Raises:
        ValueError: ``k < 2`` or ``k`` larger than the smallest class.
    """
    labels = _check_labels(labels)
    seed = _check_seed(seed)
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise ValueError(f"k must be an int >= 2, got {k!r}")
    k = int(k)
    classes, members = _class_members(labels)
    smallest = min(m.numel() for m in members)
    if k < 2:
        raise ValueError(f"k={k}: k-fold cross-validation needs k >= 2")
    if k > smallest:
        small = classes[[m.numel() for m in members].index(smallest)].item()
        raise ValueError(
            f"k={k} is larger than the smallest class (label {small} has {smallest} examples); "
            f"use k <= {smallest}"
        )
    gen = torch.Generator().manual_seed(seed)
    # Each class's shuffled examples occupy a contiguous run of positions; assigning position
    # p to fold p % k balances every class and the fold sizes within 1.
    ordered = torch.cat([m[torch.randperm(m.numel(), generator=gen)] for m in members])
    fold_of = torch.empty(labels.numel(), dtype=torch.int64)
    fold_of[ordered] = torch.arange(labels.numel()) % k
    folds = []
    for f in range(k):
        in_fold = fold_of == f
        folds.append((torch.nonzero(~in_fold).flatten(), torch.nonzero(in_fold).flatten()))
    return folds


def train_val_test(
    name: str,
    *,
    val_size: int | float = 5000,
    seed: int = 0,
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = True,
) -> tuple[ImageSet, ImageSet, ImageSet]:
    """The standard split: official train set cut into train/validation, official test set.

    The validation set is drawn from the official training set with
    :func:`stratified_split` (``val_size`` examples or fraction, seeded by ``seed``); the
    official test set is returned untouched.

    Returns:
        ``(train, val, test)`` :class:`ImageSet` objects.
    """
    full = load_dataset(name, "train", data_dir=data_dir, download=download)
    test = load_dataset(name, "test", data_dir=data_dir, download=download)
    train_idx, val_idx = stratified_split(full.labels, val_size=val_size, seed=seed)
    return full.subset(train_idx), full.subset(val_idx), test


# --------------------------------------------------------------------------------------
# Batches and synthetic data
# --------------------------------------------------------------------------------------


def iterate_batches(
    data: ImageSet,
    batch_size: int,
    *,
    shuffle: bool,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
    dtype: torch.dtype = torch.float32,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Iterate once over ``data`` in mini-batches.

    Yields ``(x, y)`` with ``x`` of shape ``(B, C, H, W)`` and dtype ``dtype``, values in
    ``[0, 1]`` (converted per batch by :func:`to_float`), and ``y`` the ``int64`` labels, both
    on the device of ``data``. With ``shuffle`` the order is ``torch.randperm`` drawn from
    ``generator`` (the global generator if ``None``); without it the stored order is used and
    ``generator`` is ignored. The last batch is smaller unless ``drop_last``.

    Raises:
        ValueError: ``batch_size`` is not a positive int (raised at call time).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral):
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    batch_size = int(batch_size)
    if batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int, got {batch_size}")
    if not isinstance(data, ImageSet):
        raise TypeError(f"iterate_batches expects an ImageSet, got {type(data).__name__}")
    n = len(data)
    device = data.images.device
    if shuffle:
        gen_device = generator.device if generator is not None else torch.device("cpu")
        order = torch.randperm(n, generator=generator, device=gen_device).to(device)
    else:
        order = None
    stop = n - n % batch_size if drop_last else n

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, stop, batch_size):
            end = min(start + batch_size, n)
            if order is None:
                images, labels = data.images[start:end], data.labels[start:end]
            else:
                idx = order[start:end]
                images, labels = data.images[idx], data.labels[idx]
            yield to_float(images, dtype), labels

    return batches()


def synthetic_dataset(
    n: int,
    shape: tuple[int, int, int] = (1, 8, 8),
    classes: int = 10,
    seed: int = 0,
    name: str = "synthetic",
) -> ImageSet:
    """A small learnable classification set for fast tests.

    Each class has a random prototype image (pixel values 40..215); an example is its class's
    prototype plus Gaussian noise (std 25), rounded and clipped to ``uint8``. Labels are
    balanced (counts differ by at most 1) and shuffled. Deterministic for a given ``seed``.
    """
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if isinstance(classes, bool) or not isinstance(classes, numbers.Integral) or classes < 2:
        raise ValueError(f"classes must be an int >= 2, got {classes!r}")
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"shape must be (C, H, W) with positive sizes, got {shape}")
    gen = torch.Generator().manual_seed(_check_seed(seed))
    prototypes = 40.0 + 175.0 * torch.rand((classes, *shape), generator=gen)
    labels = (torch.arange(n) % classes)[torch.randperm(n, generator=gen)]
    noise = 25.0 * torch.randn((n, *shape), generator=gen)
    images = (prototypes[labels] + noise).round_().clamp_(0, 255).to(torch.uint8)
    return ImageSet(images.contiguous(), labels.to(torch.int64), name, int(classes))
