"""Locally connected (unshared) convolution, plain PyTorch: the reference for the
``bpdl::locally_connected2d*`` kernels (docs/algorithms/baselines.md §2.3).

A locally connected layer is a convolution whose filter differs at every output location::

    y[n, o, i, j] = sum_{c, u, v} W[i, j, o, c, u, v] * x[n, c, s_h*i + u - p_t, s_w*j + v - p_l]

with zero outside the input. The weight has shape (H_out, W_out, O, C, k_h, k_w); its memory
is the (P, O, K) matrix of B18's reference (P = H_out*W_out locations, K = C*k_h*k_w). Padding
is given as (top, left) only: the output size is read from the weight, and any patch row or
column that falls below or right of the input reads zeros. This expresses TensorFlow's
asymmetric "SAME" padding, which B18's networks used.

The reference materialises the unfolded input (N, K, P), as B18 did; the fused kernels do not:

    y      = einsum('bkp,pok->bop', unfold(x), W)
    dL/dW  = einsum('bop,bkp->pok', dL/dy, unfold(x))
    dL/dx  = fold(einsum('bop,pok->bkp', dL/dy, W))

The last line is also the "transposed LC map" that feedback alignment sends its error through
(with the feedback tensor B in place of W).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "locally_connected2d", "locally_connected2d_grad_input", "locally_connected2d_grad_weight",
    "locally_connected_output_size", "same_padding",
]


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return value, value
    pair = tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair):
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    return pair[0], pair[1]


def locally_connected_output_size(size: int, kernel: int, stride: int, pad_before: int,
                                  pad_after: int) -> int:
    """Output length along one axis: floor((size + pad_before + pad_after - kernel) / stride) + 1."""
    return (size + pad_before + pad_after - kernel) // stride + 1


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int, int]:
    """TensorFlow "SAME" padding along one axis: (out, pad_before, pad_after) with
    out = ceil(size / stride), pad_total = max((out - 1) * stride + kernel - size, 0),
    pad_before = pad_total // 2 (the extra row, if any, goes after)."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return out, total // 2, total - total // 2


def _canvas(x: Tensor, kernel: tuple[int, int], stride: tuple[int, int],
            padding: tuple[int, int], out_size: tuple[int, int]) -> Tensor:
    """The zero-padded input cropped to exactly the rows and columns the patches cover."""
    (kh, kw), (sh, sw), (pt, pl), (oh, ow) = kernel, stride, padding, out_size
    need_h, need_w = (oh - 1) * sh + kh, (ow - 1) * sw + kw
    h, w = x.shape[-2:]
    pb, pr = need_h - pt - h, need_w - pl - w
    x = F.pad(x, (pl, max(pr, 0), pt, max(pb, 0)))
    return x[..., :need_h, :need_w]


def locally_connected2d(x: Tensor, weight: Tensor, bias: Tensor | None = None,
                        stride: int | Sequence[int] = 1,
                        padding: int | Sequence[int] = 0) -> Tensor:
    """Forward pass of a locally connected layer (see the module docstring).

    Args:
        x: input (N, C, H, W).
        weight: (H_out, W_out, O, C, k_h, k_w).
        bias: None, per channel (O,) or per location (O, H_out, W_out).
        stride, padding: (s_h, s_w) and (p_top, p_left), or one int for both.

    Returns:
        (N, O, H_out, W_out).
    """
    oh, ow, o, c, kh, kw = weight.shape
    stride, padding = _pair(stride, "stride"), _pair(padding, "padding")
    canvas = _canvas(x, (kh, kw), stride, padding, (oh, ow))
    cols = F.unfold(canvas, (kh, kw), stride=stride)  # (N, C*kh*kw, P)
    y = torch.einsum("bkp,pok->bop", cols, weight.reshape(oh * ow, o, c * kh * kw))
    y = y.reshape(x.shape[0], o, oh, ow)
    if bias is not None:
        y = y + (bias.reshape(o, 1, 1) if bias.dim() == 1 else bias)
    return y


def locally_connected2d_grad_input(grad_output: Tensor, weight: Tensor,
                                   input_size: Sequence[int],
                                   stride: int | Sequence[int] = 1,
                                   padding: int | Sequence[int] = 0) -> Tensor:
    """dL/dx = fold(einsum('bop,pok->bkp', dL/dy, W)) cropped to the input: the transposed
    locally connected map. With a feedback tensor B in place of W this is feedback alignment's
    signal to the layer below. ``input_size`` is (H, W)."""
    oh, ow, o, c, kh, kw = weight.shape
    h, w = _pair(tuple(input_size), "input_size")
    (sh, sw), (pt, pl) = _pair(stride, "stride"), _pair(padding, "padding")
    n = grad_output.shape[0]
    cols = torch.einsum("bop,pok->bkp", grad_output.reshape(n, o, oh * ow),
                        weight.reshape(oh * ow, o, c * kh * kw))
    need_h, need_w = (oh - 1) * sh + kh, (ow - 1) * sw + kw
    canvas = F.fold(cols, (need_h, need_w), (kh, kw), stride=(sh, sw))
    # canvas row r is input row r - p_top; rows of the input no patch reaches get zero
    canvas = F.pad(canvas, (0, max(pl + w - need_w, 0), 0, max(pt + h - need_h, 0)))
    return canvas[..., pt:pt + h, pl:pl + w]


def locally_connected2d_grad_weight(grad_output: Tensor, x: Tensor,
                                    kernel_size: int | Sequence[int],
                                    stride: int | Sequence[int] = 1,
                                    padding: int | Sequence[int] = 0) -> Tensor:
    """dL/dW = einsum('bop,bkp->pok', dL/dy, unfold(x)), shaped (H_out, W_out, O, C, k_h, k_w)."""
    n, o, oh, ow = grad_output.shape
    kh, kw = _pair(kernel_size, "kernel_size")
    stride, padding = _pair(stride, "stride"), _pair(padding, "padding")
    canvas = _canvas(x, (kh, kw), stride, padding, (oh, ow))
    cols = F.unfold(canvas, (kh, kw), stride=stride)
    grad = torch.einsum("bop,bkp->pok", grad_output.reshape(n, o, oh * ow), cols)
    return grad.reshape(oh, ow, o, x.shape[1], kh, kw)
