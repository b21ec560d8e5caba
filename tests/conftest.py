"""Shared pytest fixtures.

Data fixtures: the shared copy of the original MNIST / Fashion-MNIST files is located through
the environment variable ``BPDL_SHARED_DATA``, else ``<repo root>/../shared/data``. It is
read-only in CI, so tests get a writable copy (:func:`real_data_root`).
"""

from __future__ import annotations

import os
import pathlib
import shutil

import pytest
import torch

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent

#: The CUDA case of a device-parametrised test: marked ``cuda`` and skipped (reported, not
#: dropped) where no GPU is present. ``@pytest.mark.parametrize("device", DEVICES)``.
CUDA = pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device")])
DEVICES = ["cpu", CUDA]


@pytest.fixture(scope="module")
def synthetic_splits():
    """Train / validation / test subsets (1,000 / 300 / 300) of a synthetic 8x8 dataset, for
    loop tests that need data but not MNIST."""
    from bpdl.data import synthetic_dataset

    full = synthetic_dataset(1600, shape=(1, 8, 8), seed=0)
    idx = torch.arange(len(full))
    return full.subset(idx[:1000]), full.subset(idx[1000:1300]), full.subset(idx[1300:])


#: Original distribution files expected under the shared data folder (torchvision layout).
MNIST_LIKE_RAW_FILES: dict[str, tuple[str, ...]] = {
    folder: (
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    )
    for folder in ("MNIST", "FashionMNIST")
}


def shared_data_path() -> pathlib.Path:
    """Where the shared dataset files live (may not exist): ``BPDL_SHARED_DATA``, else the
    nearest ``shared/data`` beside the repository or beside one of its parent folders (a
    checkout at ``X/main`` or a worktree at ``X/wt/name`` both find ``X/shared/data``)."""
    env = os.environ.get("BPDL_SHARED_DATA")
    if env:
        return pathlib.Path(env).expanduser()
    for parent in REPO_ROOT.parents:
        candidate = parent / "shared" / "data"
        if candidate.is_dir():
            return candidate
    return REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data_dir() -> pathlib.Path:
    """The shared (read-only) data folder; skips when it or any MNIST-like file is absent."""
    path = shared_data_path()
    missing = [
        f"{folder}/raw/{name}"
        for folder, names in MNIST_LIKE_RAW_FILES.items()
        for name in names
        if not (path / folder / "raw" / name).is_file()
    ]
    if missing:
        pytest.skip(
            f"shared data not found in {path} (set BPDL_SHARED_DATA); missing: {', '.join(missing)}"
        )
    return path


@pytest.fixture(scope="session")
def real_data_root(shared_data_dir: pathlib.Path, tmp_path_factory) -> pathlib.Path:
    """A writable data root holding copies of the original MNIST and Fashion-MNIST .gz files.

    Layout: ``<root>/MNIST/raw/*.gz`` and ``<root>/FashionMNIST/raw/*.gz``. Session-scoped:
    tests must not modify its files (use :func:`mnist_copy_root` for a private copy).
    """
    root = tmp_path_factory.mktemp("bpdl-data")
    for folder in MNIST_LIKE_RAW_FILES:
        copy_raw_files(shared_data_dir, root, folder)
    return root


def copy_raw_files(src_root: pathlib.Path, dst_root: pathlib.Path, folder: str) -> pathlib.Path:
    """Copy ``<src_root>/<folder>/raw/*.gz`` to ``<dst_root>/<folder>/raw/`` (writable copies)."""
    dst = dst_root / folder / "raw"
    dst.mkdir(parents=True, exist_ok=True)
    for name in MNIST_LIKE_RAW_FILES[folder]:
        shutil.copyfile(src_root / folder / "raw" / name, dst / name)
    return dst


@pytest.fixture
def mnist_copy_root(shared_data_dir: pathlib.Path, tmp_path: pathlib.Path) -> pathlib.Path:
    """A fresh, private data root with copies of the four MNIST .gz files (free to corrupt)."""
    root = tmp_path / "data"
    copy_raw_files(shared_data_dir, root, "MNIST")
    return root


@pytest.fixture
def synthetic_data():
    """A small learnable synthetic set: 200 uint8 images (1, 8, 8), 10 balanced classes."""
    from bpdl.data import synthetic_dataset

    return synthetic_dataset(200, shape=(1, 8, 8), classes=10, seed=0)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module's tests (``pytestmark = pytest.mark.usefixtures(...)``):
    tests that simulate many small steps avoid OpenMP barrier stalls when the machine is shared
    (results do not depend on the thread count)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
