"""Locally connected layers (unshared convolutions), as in Bartunov et al. (2018).

A locally connected layer has a convolution's receptive fields but no weight sharing: each output
location has its own filter bank (docs/algorithms/baselines.md §2.3). The forward and backward passes
run on the fused kernels of :func:`bpdl.ops.locally_connected2d`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from bpdl import ops
from bpdl.errors import ConfigError, UnknownNameError
from bpdl.functional.locally_connected import same_padding
from bpdl.nn.init import std_from_fans

BIAS_KINDS = ("location", "channel", "none")


def _pair(value: int | Sequence[int], name: str, low: int) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    pair = tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= low
                                 for v in pair):
        raise ConfigError(f"LocallyConnected2d {name} must be an int or a pair of ints >= {low}, "
                          f"got {value!r}")
    return pair  # type: ignore[return-value]


class LocallyConnected2d(nn.Module):
    """Unshared 2-D convolution:
    y[n, o, i, j] = sum_{c,u,v} W[i, j, o, c, u, v] x[n, c, s_h i + u - p_t, s_w j + v - p_l] + b.

    Args:
        in_channels, out_channels: C and O.
        input_size: (H, W) of the input; a locally connected layer has one filter bank per output
            location, so its parameters depend on the input size.
        kernel_size, stride: one int or a pair.
        padding: ``"same"`` (TensorFlow's SAME, as B18: output ceil(size / stride), the odd padding
            row below/right), ``"valid"`` (none), an int, or (top, left) with the output size then
            floor((size + 2 p - k) / s) + 1.
        bias: ``"location"`` (one bias per output unit; B18 does not say, bpdl's default),
            ``"channel"`` (one per output channel) or ``"none"``.

    Attributes:
        weight: (H_out, W_out, O, C, k_h, k_w), the (P, O, C k_h k_w) matrix of B18's reference.
        bias: (O, H_out, W_out), (O,) or None.
    """

    def __init__(self, in_channels: int, out_channels: int, input_size: int | Sequence[int],
                 kernel_size: int | Sequence[int], stride: int | Sequence[int] = 1,
                 padding: str | int | Sequence[int] = "same", bias: str | bool = "location",
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"LocallyConnected2d {name} must be a positive int, got {value!r}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.input_size = _pair(input_size, "input_size", 1)
        self.kernel_size = _pair(kernel_size, "kernel_size", 1)
        self.stride = _pair(stride, "stride", 1)
        if bias is True:
            bias = "location"
        elif bias is False or bias is None:
            bias = "none"
        if bias not in BIAS_KINDS:
            raise UnknownNameError("LocallyConnected2d bias kind", bias, BIAS_KINDS)
        self.bias_kind = bias
        sizes = []
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise ConfigError(f"LocallyConnected2d padding must be 'same', 'valid', an int or "
                                  f"(top, left), got {padding!r}")
            pads = []
            for size, k, s in zip(self.input_size, self.kernel_size, self.stride, strict=True):
                if padding == "same":
                    out, before, _after = same_padding(size, k, s)
                else:
                    out, before = (size - k) // s + 1, 0
                sizes.append(out)
                pads.append(before)
            self.padding = (pads[0], pads[1])
        else:
            self.padding = _pair(padding, "padding", 0)
            for size, k, s, p in zip(self.input_size, self.kernel_size, self.stride, self.padding,
                                     strict=True):
                sizes.append((size + 2 * p - k) // s + 1)
        self.padding_mode = padding if isinstance(padding, str) else "explicit"
        self.padding_spec = padding if isinstance(padding, str) else self.padding
        if min(sizes) <= 0:
            raise ConfigError(
                f"LocallyConnected2d: a {self.kernel_size} kernel with stride {self.stride} and "
                f"padding {padding!r} leaves no output on a {self.input_size} input")
        self.output_size = (sizes[0], sizes[1])
        factory = {"device": device, "dtype": dtype}
        oh, ow = self.output_size
        kh, kw = self.kernel_size
        self.weight = nn.Parameter(torch.empty(oh, ow, out_channels, in_channels, kh, kw,
                                               **factory))
        if bias == "location":
            self.bias = nn.Parameter(torch.empty(out_channels, oh, ow, **factory))
        elif bias == "channel":
            self.bias = nn.Parameter(torch.empty(out_channels, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    # ---- initialisation -----------------------------------------------------------------------
    def fans(self) -> tuple[int, int]:
        """(fan_in, fan_out) of one output location's filter bank: (C k_h k_w, O k_h k_w), the
        convolution convention (each location's units see C k_h k_w inputs)."""
        kh, kw = self.kernel_size
        return self.in_channels * kh * kw, self.out_channels * kh * kw

    def init_std(self, init: str, gain: float = 1.0) -> float:
        """Standard deviation of initialiser ``init`` for this layer (see bpdl.nn.init.init_std)."""
        return std_from_fans(init, *self.fans(), gain=gain)

    def reset_parameters(self) -> None:
        """PyTorch's convolution default: weights and biases uniform on +-1/sqrt(fan_in)."""
        self.reset_bpdl_parameters("torch_default", None)

    def reset_bpdl_parameters(self, init: str, bias: float | None = 0.0, gain: float = 1.0) -> None:
        """Hook of :func:`bpdl.nn.init.initialise`: weights from ``init`` with this layer's fans,
        biases set to the constant ``bias`` (None: uniform on +-1/sqrt(fan_in), PyTorch's
        default)."""
        std = self.init_std(init, gain)
        with torch.no_grad():
            if init.endswith("normal"):
                self.weight.normal_(0.0, std)
            else:
                bound = math.sqrt(3.0) * std
                self.weight.uniform_(-bound, bound)
            if self.bias is not None:
                if bias is None:
                    bound = 1.0 / math.sqrt(self.fans()[0])
                    self.bias.uniform_(-bound, bound)
                else:
                    self.bias.fill_(bias)

    # ---- forward ------------------------------------------------------------------------------
    def _check_input(self, x: Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.in_channels or tuple(x.shape[2:]) != self.input_size:
            raise ValueError(
                f"LocallyConnected2d expects input (N, {self.in_channels}, "
                f"{self.input_size[0]}, {self.input_size[1]}), got {tuple(x.shape)}: its filters "
                f"are tied to one input size")

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        return ops.locally_connected2d(x, self.weight, self.bias, self.stride, self.padding)

    def input_gradient(self, grad_output: Tensor, weight: Tensor) -> Tensor:
        """The transposed map: dL/dx for dL/dy = ``grad_output`` through ``weight`` (W or B)."""
        return ops.locally_connected2d_grad_input(grad_output, weight, self.input_size,
                                                  self.stride, self.padding)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, input_size={self.input_size}, "
                f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding} "
                f"({self.padding_mode}), output_size={self.output_size}, bias={self.bias_kind}")
