"""Feedback pathways of the feedback-alignment family, fused: direct feedback alignment with
regenerated feedback (``bpdl::dfa_project``; csrc/cpu/dfa_cpu.cpp, csrc/cuda/dfa_cuda.cu) and
sign-symmetric feedback (``bpdl::sign_feedback``, ``bpdl::sign_random_feedback``;
csrc/cpu/sign_feedback_cpu.cpp, csrc/cuda/sign_feedback_cuda.cu). References:
:mod:`bpdl.functional.feedback`; the rules: docs/algorithms/feedback_alignment.md."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["MAGNITUDE_DISTRIBUTIONS", "dfa_project", "sign_feedback", "sign_random_feedback"]


def dfa_project(error: Tensor, num_features: int, seed: int, stream: int, scale: float) -> Tensor:
    """Direct feedback alignment signal ``error @ D`` without storing D (N16;
    docs/algorithms/feedback_alignment.md §3.3, ``dfa_storage="regenerate"``).

    D has shape (num_outputs, num_features) and entries D[k, j] = scale * (2 u - 1), u the
    Philox4x32-10 uniform keyed by ``seed`` and counted by (k * num_features + j, 0, ``stream``):
    uniform on (-scale, scale), drawn tile by tile inside the kernel. It equals, bit for bit, the
    matrix :func:`bpdl.functional.dfa_feedback_matrix` stores for the same arguments.

    Args:
        error: (N, num_outputs) output error e, float32 or float64.
        num_features: columns of D (the flattened size of the layer input that receives the
            signal).
        seed: generator seed in [0, 2^63); stream: layer key in [0, 2^32).
        scale: half-width of the uniform distribution.

    Returns:
        (N, num_features).
    """
    if not isinstance(error, Tensor) or error.dim() != 2:
        raise ValueError(f"dfa_project: error must be an (N, num_outputs) tensor, got "
                         f"{getattr(error, 'shape', type(error).__name__)}")
    if error.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"dfa_project: error must be float32 or float64, got {error.dtype}")
    if not 0 <= int(seed) < 2**63 or not 0 <= int(stream) < 2**32:
        raise ValueError(f"dfa_project: seed must be in [0, 2^63) and stream in [0, 2^32), got "
                         f"{seed}, {stream}")
    if not math.isfinite(scale):
        raise ValueError(f"dfa_project: scale must be finite, got {scale}")
    return torch.ops.bpdl.dfa_project(error, int(num_features), int(seed), int(stream),
                                      float(scale))


@torch.library.register_fake("bpdl::dfa_project")
def _dfa_project_fake(error, num_features, seed, stream, scale):
    return error.new_empty((error.shape[0], num_features))


#: distributions of brSF's random magnitude |R|: index 0 uniform, 1 half-normal
MAGNITUDE_DISTRIBUTIONS = ("uniform", "half_normal")


def sign_feedback(weight: Tensor, magnitude: Tensor) -> Tensor:
    """Sign-symmetric feedback B = sign(W) * M in one pass (LLP16, X18), sign(0) = 0.

    Args:
        weight: W, any shape, floating point.
        magnitude: M, a 0-dim tensor (uSF's constant) or shaped like W (frSF's fixed |R|), with
            W's dtype and device.
    """
    if not isinstance(weight, Tensor) or not weight.is_floating_point():
        raise TypeError("sign_feedback: weight must be a floating-point tensor")
    if not isinstance(magnitude, Tensor) or (magnitude.dim() != 0
                                             and magnitude.shape != weight.shape):
        raise ValueError(f"sign_feedback: magnitude must be a 0-dim tensor or shaped like the "
                         f"weight {tuple(weight.shape)}, got "
                         f"{getattr(magnitude, 'shape', type(magnitude).__name__)}")
    return torch.ops.bpdl.sign_feedback(weight, magnitude)


def sign_random_feedback(weight: Tensor, seed: int, stream: int, step: int,
                         distribution: str = "uniform", scale: float = 1.0) -> Tensor:
    """brSF's feedback B = sign(W) * |R_t| with |R_t| drawn inside the kernel (LLP16, X18, SA21).

    Element i of group g = i // 4 takes the uniform u = (w >> 8) 2^-24 + 2^-25 from 32-bit word
    i % 4 of Philox4x32-10 keyed by ``seed`` and counted by (g, ``step``, ``stream``); the
    magnitude is ``scale * u`` (|U(-scale, scale)|) or, for ``half_normal``, Box-Muller on the
    word pairs, ``scale * sqrt(-2 ln u_2k) |cos(2 pi u_2k+1)|`` (``|sin|`` for the odd element):
    |N(0, scale^2)|. :func:`bpdl.functional.sign_random_feedback` is the reference (uniform
    magnitudes agree bit for bit; half-normal ones to the last bits of the math library).

    Args:
        weight: W, floating point. seed in [0, 2^63); stream (the layer) and step (the update
            counter) in [0, 2^32).
        distribution: ``uniform`` or ``half_normal``. scale: positive.
    """
    if distribution not in MAGNITUDE_DISTRIBUTIONS:
        raise ValueError(f"sign_random_feedback: distribution must be one of "
                         f"{MAGNITUDE_DISTRIBUTIONS}, got {distribution!r}")
    if not isinstance(weight, Tensor) or not weight.is_floating_point():
        raise TypeError("sign_random_feedback: weight must be a floating-point tensor")
    if not (0 <= int(seed) < 2**63 and 0 <= int(stream) < 2**32 and 0 <= int(step) < 2**32):
        raise ValueError(f"sign_random_feedback: seed must be in [0, 2^63), stream and step in "
                         f"[0, 2^32); got {seed}, {stream}, {step}")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"sign_random_feedback: scale must be positive, got {scale}")
    return torch.ops.bpdl.sign_random_feedback(weight, int(seed), int(stream), int(step),
                                               MAGNITUDE_DISTRIBUTIONS.index(distribution),
                                               float(scale))


@torch.library.register_fake("bpdl::sign_feedback")
def _sign_feedback_fake(weight, magnitude):
    return torch.empty_like(weight, memory_format=torch.contiguous_format)


@torch.library.register_fake("bpdl::sign_random_feedback")
def _sign_random_feedback_fake(weight, seed, stream, step, distribution, scale):
    return torch.empty_like(weight, memory_format=torch.contiguous_format)
