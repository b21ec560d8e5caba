"""Typed wrappers over ``torch.ops.bpdl``: the fused C++/CUDA kernels, one module per kernel family
(mirroring csrc/cpu/ and csrc/cuda/): :mod:`~bpdl.ops.spikes`, :mod:`~bpdl.ops.segregated`,
:mod:`~bpdl.ops.locally_connected`, :mod:`~bpdl.ops.feedback` and :mod:`~bpdl.ops.microcircuit`.

Each wrapper states the math it computes and checks its arguments before the kernel runs; each
op has a fake (meta) implementation so ``torch.compile`` can trace through it, and a pure-PyTorch
reference in :mod:`bpdl.functional` that the tests compare against exactly.
"""

from __future__ import annotations

import torch

from bpdl.ops.feedback import (
    MAGNITUDE_DISTRIBUTIONS,
    dfa_project,
    sign_feedback,
    sign_random_feedback,
)
from bpdl.ops.locally_connected import (
    locally_connected2d,
    locally_connected2d_grad_input,
    locally_connected2d_grad_weight,
)
from bpdl.ops.microcircuit import microcircuit_run
from bpdl.ops.segregated import (
    segregated_layer_step,
    segregated_plasticity,
    segregated_sparse_basal,
    segregated_test,
    segregated_train_example,
    segregated_train_online,
)
from bpdl.ops.spikes import MAX_POISSON_MEAN, poisson_spikes

__all__ = [
    "MAGNITUDE_DISTRIBUTIONS", "MAX_POISSON_MEAN", "dfa_project", "has_kernel",
    "kernel_backends", "locally_connected2d", "locally_connected2d_grad_input",
    "locally_connected2d_grad_weight", "microcircuit_run", "operator_names", "poisson_spikes",
    "segregated_layer_step", "segregated_plasticity", "segregated_sparse_basal", "segregated_test",
    "segregated_train_example", "segregated_train_online", "sign_feedback",
    "sign_random_feedback",
]

_BACKENDS: dict[str, tuple[str, ...]] = {}


def operator_names() -> list[str]:
    """Every registered ``bpdl::`` operator, without the namespace, sorted."""
    return sorted(n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names()
                  if n.startswith("bpdl::"))


def kernel_backends(op: str) -> tuple[str, ...]:
    """The backends (``CPU``, ``CUDA``) with a kernel registered for ``bpdl::op`` (cached)."""
    if op not in _BACKENDS:
        try:
            dump = torch._C._dispatch_dump(f"bpdl::{op}")
        except RuntimeError:
            dump = ""
        _BACKENDS[op] = tuple(k for k in ("CPU", "CUDA") if f"\n{k}: registered" in dump)
    return _BACKENDS[op]


def has_kernel(op: str, device: torch.device | str) -> bool:
    """Whether ``bpdl::op`` has a kernel compiled for ``device``'s type."""
    kind = torch.device(device).type
    return ("CUDA" if kind == "cuda" else "CPU") in kernel_backends(op)
