"""Counter-based random numbers in plain PyTorch: the reference for ``csrc/include/bpdl/philox.h``.

Philox4x32-10 (Salmon et al. 2011, "Parallel random numbers: as easy as 1, 2, 3") keyed by
``seed`` and counted by ``(element, step, stream)``::

    key     = (seed mod 2^32, seed div 2^32)
    counter = (element mod 2^32, element div 2^32, step, stream)

Every draw is a pure function of its key and counter, so the CPU kernels, the CUDA kernels and
this reference produce bit-identical numbers for the same ``(seed, step, stream, element)``.
The arithmetic runs on int64 tensors holding 32-bit words; a 32x32-bit product wraps modulo
2^64 in two's complement, which leaves its low 64 bits, and hence both halves, exact.
"""

from __future__ import annotations

import torch
from torch import Tensor

_MASK32 = 0xFFFFFFFF
_M0, _M1 = 0xD2511F53, 0xCD9E8D57
_W0, _W1 = 0x9E3779B9, 0xBB67AE85
_TWO_POW_M53 = 2.0**-53


def _mulhilo(a: int, b: Tensor) -> tuple[Tensor, Tensor]:
    prod = b * a  # wraps modulo 2^64; low 64 bits exact
    return (prod >> 32) & _MASK32, prod & _MASK32


def philox4x32_10(
    c0: Tensor, c1: Tensor, c2: Tensor, c3: Tensor, k0: int, k1: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Ten Philox rounds on int64 tensors of 32-bit counter words with a 64-bit key."""
    for _ in range(10):
        hi0, lo0 = _mulhilo(_M0, c0)
        hi1, lo1 = _mulhilo(_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + _W0) & _MASK32
        k1 = (k1 + _W1) & _MASK32
    return c0, c1, c2, c3


def _check_key(seed: int, step: int, stream: int) -> None:
    if not 0 <= seed < 2**63:
        raise ValueError(f"seed must be in [0, 2^63), got {seed}")
    if not 0 <= step < 2**32:
        raise ValueError(f"step must be in [0, 2^32), got {step}")
    if not 0 <= stream < 2**32:
        raise ValueError(f"stream must be in [0, 2^32), got {stream}")


def philox_uniform(
    numel: int,
    seed: int,
    step: int,
    stream: int = 0,
    device: torch.device | str | None = None,
    element_offset: int = 0,
) -> Tensor:
    """Uniform doubles in (0, 1), one per element index ``element_offset .. element_offset+numel-1``.

    u = (floor(r0 / 2^5) * 2^26 + floor(r1 / 2^6) + 0.5) * 2^-53, with (r0, r1) the first two
    Philox output words: 53 random bits, never exactly 0 or 1.
    """
    _check_key(seed, step, stream)
    idx = torch.arange(element_offset, element_offset + numel, dtype=torch.int64, device=device)
    c0 = idx & _MASK32
    c1 = idx >> 32
    c2 = torch.full_like(idx, step)
    c3 = torch.full_like(idx, stream)
    r0, r1, _, _ = philox4x32_10(c0, c1, c2, c3, seed & _MASK32, (seed >> 32) & _MASK32)
    bits = ((r0 >> 5) << 26) | (r1 >> 6)
    return (bits.to(torch.float64) + 0.5) * _TWO_POW_M53
