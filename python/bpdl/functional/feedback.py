"""Feedback-alignment family, plain PyTorch: the feedback tensors each rule sends its error
through (ALGORITHMS.md section 3) and the reference of the ``bpdl::dfa_project`` kernels.

Every feedback tensor B is stored in the layout of the forward weight W it stands in for, so
the signal sent to the layer below is ``grad_input(delta, B)`` for Linear, Conv2d and
LocallyConnected2d alike, and angles between W and B need no reshaping.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from bpdl.functional.random import philox_uniform

__all__ = ["dfa_feedback_matrix", "dfa_project", "dfa_scale", "sign_symmetric_feedback"]


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
