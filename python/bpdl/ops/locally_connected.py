"""Locally connected layers (unshared convolution, Bartunov et al. 2018, "B18";
docs/algorithms/baselines.md §2.3), fused. Kernels: csrc/cpu/locally_connected_cpu.cpp and
csrc/cuda/locally_connected_cuda.cu; reference: :mod:`bpdl.functional.locally_connected`.
The three ops are registered with autograd as each other's adjoints."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["locally_connected2d", "locally_connected2d_grad_input",
           "locally_connected2d_grad_weight"]


def _pair(value: int | Sequence[int], name: str, low: int) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    try:
        pair = [int(v) for v in value]
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}") from None
    if len(pair) != 2 or any(v < low for v in pair):
        raise ValueError(f"{name} must be an int or a pair of ints >= {low}, got {value!r}")
    return pair


def _check_lc_tensor(t: Tensor, name: str, dims: int, what: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"locally_connected2d: {name} must be a torch.Tensor, got "
                        f"{type(t).__name__}")
    if t.dim() != dims:
        raise ValueError(f"locally_connected2d: {name} must be {what}, got shape "
                         f"{tuple(t.shape)}")
    if t.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"locally_connected2d: {name} must be float32 or float64, got {t.dtype}")


def locally_connected2d(input: Tensor, weight: Tensor, bias: Tensor | None = None,
                        stride: int | Sequence[int] = 1,
                        padding: int | Sequence[int] = 0) -> Tensor:
    """Locally connected layer (unshared convolution, B18): a convolution whose filter differs at
    every output location,

        y[n, o, i, j] = sum_{c,u,v} W[i, j, o, c, u, v] x[n, c, s_h i + u - p_t, s_w j + v - p_l]
                        + b,

    with zeros outside the input. Fused kernel: one small GEMM per output location on a patch
    buffer gathered on the fly, so the unfolded input (N, C k_h k_w, H_out W_out) of the
    reference :func:`bpdl.functional.locally_connected2d` is never materialised. Differentiable
    in ``input`` and ``weight`` (to any order; the gradients are the other two ops of this family)
    and in ``bias`` through ordinary autograd.

    Args:
        input: (N, C, H, W), float32 or float64.
        weight: (H_out, W_out, O, C, k_h, k_w); the output size is read from it.
        bias: None, per channel (O,) or per location (O, H_out, W_out).
        stride: (s_h, s_w) or one int.
        padding: (top, left) or one int. Patch entries below or right of the input read zero,
            which covers TensorFlow's asymmetric "SAME" padding.

    Returns:
        (N, O, H_out, W_out).
    """
    _check_lc_tensor(input, "input", 4, "(N, C, H, W)")
    _check_lc_tensor(weight, "weight", 6, "(H_out, W_out, O, C, k_h, k_w)")
    out = torch.ops.bpdl.locally_connected2d(input, weight, _pair(stride, "stride", 1),
                                             _pair(padding, "padding", 0))
    if bias is not None:
        o, oh, ow = weight.shape[2], weight.shape[0], weight.shape[1]
        if tuple(bias.shape) == (o,):
            bias = bias.reshape(o, 1, 1)
        elif tuple(bias.shape) != (o, oh, ow):
            raise ValueError(f"locally_connected2d: bias must be ({o},) or ({o}, {oh}, {ow}), "
                             f"got shape {tuple(bias.shape)}")
        out = out + bias
    return out


def locally_connected2d_grad_input(grad_output: Tensor, weight: Tensor,
                                   input_size: Sequence[int], stride: int | Sequence[int] = 1,
                                   padding: int | Sequence[int] = 0) -> Tensor:
    """Input gradient of :func:`locally_connected2d`, the transposed locally connected map:

        dx[n, c, h, w] = sum over (i, j, o, u, v) with s_h i + u - p_t = h, s_w j + v - p_l = w
                         of g[n, o, i, j] W[i, j, o, c, u, v].

    With a feedback tensor B in place of W this is the feedback-alignment signal sent to the
    layer below (docs/algorithms/feedback_alignment.md §3.1). ``input_size`` is (H, W)."""
    _check_lc_tensor(grad_output, "grad_output", 4, "(N, O, H_out, W_out)")
    _check_lc_tensor(weight, "weight", 6, "(H_out, W_out, O, C, k_h, k_w)")
    return torch.ops.bpdl.locally_connected2d_grad_input(
        grad_output, weight, _pair(tuple(input_size), "input_size", 1),
        _pair(stride, "stride", 1), _pair(padding, "padding", 0))


def locally_connected2d_grad_weight(grad_output: Tensor, input: Tensor,
                                    kernel_size: int | Sequence[int],
                                    stride: int | Sequence[int] = 1,
                                    padding: int | Sequence[int] = 0) -> Tensor:
    """Weight gradient of :func:`locally_connected2d`:
    dW[i, j, o, c, u, v] = sum_n g[n, o, i, j] x[n, c, s_h i + u - p_t, s_w j + v - p_l]."""
    _check_lc_tensor(grad_output, "grad_output", 4, "(N, O, H_out, W_out)")
    _check_lc_tensor(input, "input", 4, "(N, C, H, W)")
    return torch.ops.bpdl.locally_connected2d_grad_weight(
        grad_output, input, _pair(kernel_size, "kernel_size", 1), _pair(stride, "stride", 1),
        _pair(padding, "padding", 0))


@torch.library.register_fake("bpdl::locally_connected2d")
def _lc_fake(input, weight, stride, padding):
    torch._check(input.dim() == 4 and weight.dim() == 6)
    return input.new_empty((input.shape[0], weight.shape[2], weight.shape[0], weight.shape[1]))


@torch.library.register_fake("bpdl::locally_connected2d_grad_input")
def _lc_grad_input_fake(grad_output, weight, input_size, stride, padding):
    return grad_output.new_empty((grad_output.shape[0], weight.shape[3], input_size[0],
                                  input_size[1]))


@torch.library.register_fake("bpdl::locally_connected2d_grad_weight")
def _lc_grad_weight_fake(grad_output, input, kernel_size, stride, padding):
    return input.new_empty((grad_output.shape[2], grad_output.shape[3], grad_output.shape[1],
                            input.shape[1], kernel_size[0], kernel_size[1]))


# The three ops are each other's adjoints (F(x, W) = y, Gi = dF/dx^T, Gw = dF/dW^T), so each
# one's gradient is the other two: gradients of every order stay on the fused kernels.
def _lc_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], inputs[1])
    ctx.args = tuple(inputs[2:])


def _lc_backward(ctx, grad):
    x, w = ctx.saved_tensors
    stride, padding = ctx.args
    gx = gw = None
    if ctx.needs_input_grad[0]:
        gx = torch.ops.bpdl.locally_connected2d_grad_input(grad, w, list(x.shape[2:]), stride,
                                                           padding)
    if ctx.needs_input_grad[1]:
        gw = torch.ops.bpdl.locally_connected2d_grad_weight(grad, x, list(w.shape[4:]), stride,
                                                            padding)
    return gx, gw, None, None


def _lc_gi_backward(ctx, grad):
    # Gi(g, W) = a: d<a_bar, Gi>/dg = F(a_bar, W); d/dW = Gw(g, a_bar)
    g, w = ctx.saved_tensors
    input_size, stride, padding = ctx.args
    dg = dw = None
    if ctx.needs_input_grad[0]:
        dg = torch.ops.bpdl.locally_connected2d(grad, w, stride, padding)
    if ctx.needs_input_grad[1]:
        dw = torch.ops.bpdl.locally_connected2d_grad_weight(g, grad, list(w.shape[4:]), stride,
                                                            padding)
    return dg, dw, None, None, None


def _lc_gw_backward(ctx, grad):
    # Gw(g, x) = A: d<A_bar, Gw>/dg = F(x, A_bar); d/dx = Gi(g, A_bar)
    g, x = ctx.saved_tensors
    kernel_size, stride, padding = ctx.args
    dg = dx = None
    if ctx.needs_input_grad[0]:
        dg = torch.ops.bpdl.locally_connected2d(x, grad, stride, padding)
    if ctx.needs_input_grad[1]:
        dx = torch.ops.bpdl.locally_connected2d_grad_input(g, grad, list(x.shape[2:]), stride,
                                                           padding)
    return dg, dx, None, None, None


torch.library.register_autograd("bpdl::locally_connected2d", _lc_backward, setup_context=_lc_setup)
torch.library.register_autograd("bpdl::locally_connected2d_grad_input", _lc_gi_backward,
                                setup_context=_lc_setup)
torch.library.register_autograd("bpdl::locally_connected2d_grad_weight", _lc_gw_backward,
                                setup_context=_lc_setup)
