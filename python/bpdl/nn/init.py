"""Weight initialisers applied to every weight-bearing layer of a model.

The 2019 reimplementation study (docs/algorithms/pitfalls.md §8.5) called its Xavier initialiser on the
ModuleList container, whose type never matched ``nn.Linear``, so no layer was ever re-initialised.
:func:`initialise` walks ``model.modules()`` and returns the names of the layers it touched, and
the tests check every layer's post-init statistics against the declared initialiser.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from bpdl.errors import UnknownNameError

INITS = ("xavier_uniform", "xavier_normal", "kaiming_uniform", "kaiming_normal", "torch_default")


def fans(weight: torch.Tensor) -> tuple[int, int]:
    """(fan_in, fan_out) of a Linear (out, in) or Conv (out, in, k, k) weight."""
    receptive = math.prod(weight.shape[2:]) if weight.dim() > 2 else 1
    return weight.shape[1] * receptive, weight.shape[0] * receptive


def init_std(init: str, weight: torch.Tensor, gain: float = 1.0) -> float:
    """Standard deviation of the weights that initialiser ``init`` draws for ``weight``.

    xavier: gain * sqrt(2 / (fan_in + fan_out)) (Glorot & Bengio 2010); kaiming: gain /
    sqrt(fan_in); torch_default: PyTorch's kaiming_uniform(a=sqrt(5)), i.e. 1/sqrt(3 fan_in).
    """
    return std_from_fans(init, *fans(weight), gain=gain)


def std_from_fans(init: str, fan_in: int, fan_out: int, gain: float = 1.0) -> float:
    """:func:`init_std` from the fans directly, for layers whose weight tensor does not show
    them (a locally connected layer's weight has one filter per output position)."""
    if init.startswith("xavier"):
        return gain * math.sqrt(2.0 / (fan_in + fan_out))
    if init.startswith("kaiming"):
        return gain / math.sqrt(fan_in)
    if init == "torch_default":
        return 1.0 / math.sqrt(3.0 * fan_in)
    raise UnknownNameError("initialiser", init, INITS)


def init_weight_(weight: torch.Tensor, init: str, gain: float = 1.0) -> None:
    """Fill ``weight`` in place from initialiser ``init`` (see :func:`init_std`)."""
    std = init_std(init, weight, gain)
    with torch.no_grad():
        if init.endswith("normal"):
            weight.normal_(0.0, std)
        else:  # uniform on [-a, a] has std a / sqrt(3)
            bound = math.sqrt(3.0) * std
            weight.uniform_(-bound, bound)


WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def initialise(model: nn.Module, init: str, bias: float = 0.0, gain: float = 1.0) -> list[str]:
    """Re-initialise the weight of every Linear/Conv layer of ``model``; return their names.

    ``init="torch_default"`` keeps PyTorch's own initialisation (weights and biases) untouched.
    Otherwise weights come from ``init`` and biases are set to the constant ``bias``.
    Layers that define ``reset_bpdl_parameters(init, bias, gain)`` (custom weight layers such as
    locally connected ones) are initialised through it.
    """
    if init not in INITS:
        raise UnknownNameError("initialiser", init, INITS)
    touched: list[str] = []
    for name, module in model.named_modules():
        custom = getattr(module, "reset_bpdl_parameters", None)
        if callable(custom):
            if init != "torch_default":
                custom(init, bias, gain)
            touched.append(name)
        elif isinstance(module, WEIGHT_LAYERS):
            if init != "torch_default":
                init_weight_(module.weight, init, gain)
                if module.bias is not None:
                    with torch.no_grad():
                        module.bias.fill_(bias)
            touched.append(name)
    return touched
