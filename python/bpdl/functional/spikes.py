"""Spike generation, plain PyTorch: the reference for the ``bpdl::poisson_spikes`` kernels."""

from __future__ import annotations

import torch
from torch import Tensor

from bpdl.functional.random import philox_uniform

#: Largest count the samplers return (``kPoissonMaxCount`` in csrc/include/bpdl/philox.h).
POISSON_MAX_COUNT = 256


def poisson_from_uniform(u: Tensor, lam: Tensor) -> Tensor:
    """Poisson counts by sequential inversion: the smallest k with u <= sum_{i<=k} e^-lam lam^i/i!.

    Both arguments are float64; the arithmetic is the kernels' operation for operation
    (p <- p * (lam / k), cdf <- cdf + p), so the counts agree exactly.
    """
    p = torch.exp(-lam)
    cdf = p.clone()
    k = torch.zeros_like(lam)
    active = u > cdf
    i = 0
    while i < POISSON_MAX_COUNT and bool(active.any()):
        i += 1
        k = k + active.to(k.dtype)
        p = p * (lam / i)
        cdf = cdf + p
        active = active & (u > cdf)
    return k


def poisson_spikes(rate: Tensor, seed: int, step: int, stream: int = 0, dt: float = 1.0) -> Tensor:
    """Spike counts n_i ~ Poisson(rate_i * dt), one Philox draw per element (row-major index i).

    Reference implementation of ``bpdl.ops.poisson_spikes``; returns counts in ``rate``'s dtype.
    """
    lam = rate.detach().contiguous().reshape(-1).to(torch.float64) * dt
    u = philox_uniform(lam.numel(), seed, step, stream, device=rate.device)
    return poisson_from_uniform(u, lam).to(rate.dtype).reshape(rate.shape)
