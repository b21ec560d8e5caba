"""Poisson spike generation, fused (``bpdl::poisson_spikes``; kernels csrc/cpu/spikes_cpu.cpp and
csrc/cuda/spikes_cuda.cu, reference :func:`bpdl.functional.poisson_spikes`)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["MAX_POISSON_MEAN", "poisson_spikes"]

#: Largest expected count per draw the Poisson sampler accepts (rate * dt).
MAX_POISSON_MEAN = 64.0


def poisson_spikes(
    rate: Tensor,
    seed: int,
    step: int,
    stream: int = 0,
    dt: float = 1.0,
    *,
    validate: bool = True,
) -> Tensor:
    """Reproducible Poisson spike counts: ``n_i ~ Poisson(rate_i * dt)``.

    Each element draws one uniform from Philox4x32-10 keyed by ``seed`` and counted by
    ``(i, step, stream)`` (``i`` the row-major element index) and inverts the Poisson CDF, so
    the CPU and CUDA kernels and :func:`bpdl.functional.poisson_spikes` return identical counts.
    Use ``step`` for the time step and ``stream`` to separate layers or populations.

    Args:
        rate: expected spikes per unit time, any shape, floating point, >= 0.
        seed: non-negative generator seed (< 2^63).
        step: time-step counter in [0, 2^32).
        stream: population counter in [0, 2^32).
        dt: time step; the Poisson mean is ``rate * dt`` and must be <= ``MAX_POISSON_MEAN``.
        validate: check that every mean is finite and in range (one reduction); the hot loops
            of the simulators validate their inputs once and pass False.

    Returns:
        Spike counts with ``rate``'s shape and dtype.
    """
    if not isinstance(rate, Tensor):
        raise TypeError(f"poisson_spikes: rate must be a torch.Tensor, got {type(rate).__name__}")
    if not rate.is_floating_point():
        raise TypeError(
            f"poisson_spikes: rate must be floating point, got {rate.dtype}; use rate.float()"
        )
    if not (isinstance(dt, (int, float)) and math.isfinite(dt) and dt > 0):
        raise ValueError(f"poisson_spikes: dt must be a positive finite number, got {dt!r}")
    if validate and rate.numel() > 0:
        lo, hi = torch.aminmax(rate.detach())
        lo, hi = float(lo), float(hi)
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ValueError("poisson_spikes: rate contains NaN or infinite values")
        if lo < 0:
            raise ValueError(f"poisson_spikes: rates must be >= 0, found {lo}")
        if hi * dt > MAX_POISSON_MEAN:
            raise ValueError(
                f"poisson_spikes: the mean count rate*dt = {hi * dt} exceeds {MAX_POISSON_MEAN}; "
                "use a smaller dt (this sampler is for spike counts per time step)"
            )
    return torch.ops.bpdl.poisson_spikes(rate, int(seed), int(step), int(stream), float(dt))


@torch.library.register_fake("bpdl::poisson_spikes")
def _poisson_spikes_fake(rate: Tensor, seed: int, step: int, stream: int = 0,
                         dt: float = 1.0) -> Tensor:
    return torch.empty_like(rate, memory_format=torch.contiguous_format)
