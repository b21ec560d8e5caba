"""Loading the compiled extension ``bpdl._C`` with errors that say how to fix the build."""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

_REBUILD = (
    "Rebuild bpdl against the torch in this environment: from the bpdl source folder run\n"
    "    python -m pip install --no-build-isolation --force-reinstall --no-deps .\n"
    "(or `make install`), after installing torch first (pip install torch==2.14.1 "
    "torchvision==0.29.1)."
)


def _base_version(version: str) -> str:
    # "2.14.1+cu130" and "2.14.1" are the same ABI for our purposes only if the local tag agrees
    # too: a CPU and a CUDA build of one release export different libraries.
    return version.strip()


def load_extension() -> ModuleType:
    """Import ``bpdl._C`` (which registers ``torch.ops.bpdl``) or raise an actionable ImportError."""
    try:
        ext = importlib.import_module("bpdl._C")
    except ImportError as err:
        raise ImportError(
            f"bpdl's compiled extension bpdl._C could not be loaded ({err}). Either bpdl was "
            f"installed without building it, or it was built against a different torch than the "
            f"installed torch {torch.__version__}.\n{_REBUILD}"
        ) from err
    built = ext.torch_version()
    if _base_version(built) != _base_version(torch.__version__):
        raise ImportError(
            f"bpdl._C was built against torch {built}, but torch {torch.__version__} is "
            f"installed; the two are not binary compatible.\n{_REBUILD}"
        )
    return ext
