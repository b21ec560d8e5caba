"""Feedback-alignment family, plain PyTorch: the feedback tensors each rule sends its error
through (docs/algorithms/feedback_alignment.md) and the reference of the ``bpdl::dfa_project`` kernels.

Every feedback tensor B is stored in the layout of the forward weight W it stands in for, so
the signal sent to the layer below is ``grad_input(delta, B)`` for Linear, Conv2d and
LocallyConnected2d alike, and angles between W and B need no reshaping.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from bpdl.functional.random import philox4x32_10, philox_uniform

__all__ = ["dfa_feedback_matrix", "dfa_project", "dfa_scale", "sign_random_feedback",
           "sign_random_magnitude", "sign_symmetric_feedback"]

_MASK32 = 0xFFFFFFFF


def sign_symmetric_feedback(weight: Tensor, magnitude: Tensor | float) -> Tensor:
    """Sign-symmetric feedback B = sign(W) * M (Liao, Leibo & Poggio 2016; Xiao et al. 2018).

    M is a constant (uSF), |R| with R fixed (frSF) or |R| redrawn at every update (brSF).
    sign(0) = 0: a weight that is exactly zero sends no feedback.
    """
    return torch.sign(weight) * magnitude


def dfa_scale(num_outputs: int, num_features: int) -> float:
    """Half-width of DFA's feedback entries: Xavier-uniform on the (num_outputs, num_features)
    matrix, sqrt(6 / (num_outputs + num_features)) (as SA21; N16's scale is unverified)."""
    return math.sqrt(6.0 / (num_outputs + num_features))


def dfa_feedback_matrix(num_outputs: int, num_features: int, seed: int, stream: int,
                        scale: float, dtype: torch.dtype = torch.float32,
                        device: torch.device | str | None = None) -> Tensor:
    """DFA's fixed random matrix D (num_outputs, num_features), entries scale * (2u - 1) with u
    the Philox uniform of element k * num_features + j at step 0 and ``stream``.

    The stored variant (``dfa_storage="dense"``) keeps this matrix; the regenerated variant
    (:func:`bpdl.ops.dfa_project`) draws the same entries inside its kernel.
    """
    u = philox_uniform(num_outputs * num_features, seed, 0, stream, device=device)
    return ((u * 2.0 - 1.0) * scale).to(dtype).reshape(num_outputs, num_features)


def dfa_project(error: Tensor, num_features: int, seed: int, stream: int, scale: float) -> Tensor:
    """Reference of :func:`bpdl.ops.dfa_project`: ``error @ D`` with D materialised."""
    d = dfa_feedback_matrix(error.shape[1], num_features, seed, stream, scale, error.dtype,
                            error.device)
    return error @ d


def sign_random_magnitude(numel: int, seed: int, stream: int, step: int,
                          distribution: str = "uniform", scale: float = 1.0,
                          device: torch.device | str | None = None) -> Tensor:
    """brSF's random magnitudes |R_t| (float32): the reference of the draws inside
    ``bpdl::sign_random_feedback``. Group g = i // 4 of elements takes the four 32-bit words of
    Philox4x32-10 keyed by ``seed`` and counted by (g, ``step``, ``stream``), each word w giving
    u = (w >> 8) 2^-24 + 2^-25 in (0, 1]; the magnitude is ``scale * u`` (uniform) or, by
    Box-Muller on the word pairs of the group, ``scale * sqrt(-2 ln u_2k) |cos(2 pi u_2k+1)|``
    for the even and ``|sin(...)|`` for the odd element (half-normal)."""
    groups = (numel + 3) // 4
    g = torch.arange(groups, dtype=torch.int64, device=device)
    words = philox4x32_10(g & _MASK32, g >> 32, torch.full_like(g, step),
                          torch.full_like(g, stream), seed & _MASK32, (seed >> 32) & _MASK32)
    u = torch.stack([(w >> 8).to(torch.float32) for w in words], 1)  # (groups, 4)
    u = u * 2.0**-24 + 2.0**-25
    scale32 = torch.tensor(scale, dtype=torch.float32)
    if distribution == "uniform":
        mag = u * scale32
    elif distribution == "half_normal":
        radius = torch.sqrt(-2.0 * torch.log(u[:, 0::2]))                  # (groups, 2)
        angle = 6.283185307179586 * u[:, 1::2]
        mag = scale32 * torch.stack([radius[:, 0] * torch.cos(angle[:, 0]).abs(),
                                     radius[:, 0] * torch.sin(angle[:, 0]).abs(),
                                     radius[:, 1] * torch.cos(angle[:, 1]).abs(),
                                     radius[:, 1] * torch.sin(angle[:, 1]).abs()], 1)
    else:
        raise ValueError(f"unknown distribution {distribution!r}; use uniform or half_normal")
    return mag.reshape(-1)[:numel]


def sign_random_feedback(weight: Tensor, seed: int, stream: int, step: int,
                         distribution: str = "uniform", scale: float = 1.0) -> Tensor:
    """Reference of :func:`bpdl.ops.sign_random_feedback`: sign(W) * |R_t|."""
    mag = sign_random_magnitude(weight.numel(), seed, stream, step, distribution, scale,
                                weight.device)
    return torch.sign(weight) * mag.to(weight.dtype).reshape(weight.shape)
