"""The modules of target propagation (docs/algorithms/target_propagation.md §4.1-4.5): the view
of a network as a stack of forward layers, the learned inverses g_l, and AO-SDTP's fixed random
auxiliary output.

- :func:`network_stages` reads an MLP or a locally connected network (B18) as its forward
  layers f_l(h) = act(W_l h + b_l), in order, the last one the linear output (softmax in the
  loss). CNNs are refused: B18 found max-pooling incompatible with target propagation
  (docs/algorithms/baselines.md §2.3); the LC networks replace it with strided layers.
- :class:`LinearInverse`: g(h) = act(V h + c), V of shape (n_{l-1}, n_l), for inverses of
  fully connected layers (and of the first fully connected layer above LC layers, whose output
  is reshaped to the LC feature map) and for DDTP's direct feedback from the output.
- :class:`LocallyConnectedInverse`: g(h) = act(V^T h + c), V shaped like the LC layer's W and
  V^T the transposed locally connected map, computed by the fused
  :func:`bpdl.ops.locally_connected2d_grad_input` kernel (docs/algorithms/baselines.md §2.3).
  B18 obtained this map as the gradient of a dummy forward LC layer; here it is the op itself,
  whose registered backward gives V's gradient on the fused kernels.
- :class:`AuxiliaryOutput`: AO-SDTP's z = tanh(W_z h + b_z), a fixed random projection (§4.2).

Inverse weights are drawn from keyed generators, so they depend only on the rule's seed and the
layer, not on what else drew random numbers before them.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from bpdl.errors import ConfigError
from bpdl.nn.locally_connected import LocallyConnected2d
from bpdl.nn.models import CNN, MLP, LCNet, activation

__all__ = ["AuxiliaryOutput", "LinearInverse", "LocallyConnectedInverse", "Stage",
           "keyed_generator", "mix_seed", "network_stages"]

_MASK63 = (1 << 63) - 1


def mix_seed(*values: int | str) -> int:
    """A 63-bit seed from integers and strings (stable across runs and platforms)."""
    digest = hashlib.blake2b(repr(values).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & _MASK63


def keyed_generator(device: torch.device | str, *key: int | str) -> torch.Generator:
    """A fresh torch.Generator on ``device`` seeded by :func:`mix_seed` of ``key``."""
    return torch.Generator(device=device).manual_seed(mix_seed(*key))


@dataclass
class Stage:
    """One forward layer as target propagation sees it: f(h) = act(layer(h)).

    Plain data (not a Module) so that the model's layers are not registered twice in the
    learner's state dict. ``in_shape`` and ``out_shape`` are per-example shapes; a Linear
    stage flattens its input.
    """

    name: str
    layer: nn.Module
    act: nn.Module
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]

    @property
    def is_linear(self) -> bool:
        return isinstance(self.layer, nn.Linear)

    def pre_activation(self, h: Tensor) -> Tensor:
        return self.layer(h.flatten(1) if self.is_linear else h)

    def __call__(self, h: Tensor) -> Tensor:
        return self.act(self.pre_activation(h))


def network_stages(model: nn.Module) -> list[Stage]:
    """The forward layers of ``model`` in order, the last one its linear output layer.

    Supports :class:`~bpdl.nn.MLP` (with the identity output activation: the softmax is in the
    loss) and :class:`~bpdl.nn.LCNet` with unshared layers. Anything else is a ConfigError that
    says what to use instead.
    """
    names = {id(m): n for n, m in model.named_modules()}
    if isinstance(model, CNN):
        raise ConfigError(
            "target propagation cannot train the CNN: its max-pooling layers have no inverse "
            "(B18 found pooling incompatible with target propagation, docs/algorithms/"
            "baselines.md §2.3); use --model lc (B18's locally connected network, strided "
            "layers instead of pooling) or --model mlp")
    if isinstance(model, MLP):
        if not isinstance(model.output_activation, nn.Identity):
            raise ConfigError(
                f"target propagation trains the output layer on softmax cross-entropy; the "
                f"MLP's output_activation must be 'identity', got "
                f"{model.config.output_activation!r}")
        sizes = [model.input_shape[0]] + [layer.out_features for layer in model.layers]
        stages = [Stage(names[id(layer)], layer, act, (sizes[i],), (sizes[i + 1],))
                  for i, (layer, act) in enumerate(zip(model.layers[:-1], model.activations,
                                                       strict=True))]
        out = model.layers[-1]
        stages.append(Stage(names[id(out)], out, nn.Identity(), (sizes[-2],), (sizes[-1],)))
        return stages
    if isinstance(model, LCNet):
        if model.config.shared:
            raise ConfigError(
                "target propagation on the LC network needs unshared (locally connected) "
                "layers; shared=True (B18's 'BP ConvNet') is a backprop baseline only")
        stages = []
        shape = tuple(model.input_shape)
        for block in model.features:
            layer, act = block[0], block[1]
            out_shape = (layer.out_channels, *layer.output_size)
            stages.append(Stage(names[id(layer)], layer, act, shape, out_shape))
            shape = out_shape
        acts = list(model.activations) + [nn.Identity()]
        for layer, act in zip(model.layers, acts, strict=True):
            stages.append(Stage(names[id(layer)], layer, act, shape, (layer.out_features,)))
            shape = (layer.out_features,)
        return stages
    raise ConfigError(
        f"target propagation supports bpdl's mlp and lc models (Linear and locally connected "
        f"layers with elementwise activations), got {type(model).__name__}")


class LinearInverse(nn.Module):
    """g(h) = act(V h + c) from ``in_features`` units to a layer of per-example shape
    ``out_shape`` (flattened for the product, reshaped after it). V: (prod(out_shape),
    in_features), Glorot uniform; c: zeros (docs/algorithms/target_propagation.md §4.1)."""

    def __init__(self, in_features: int, out_shape: Sequence[int], act: str = "tanh",
                 generator: torch.Generator | None = None):
        super().__init__()
        self.in_features = int(in_features)
        self.out_shape = tuple(int(s) for s in out_shape)
        n_out = math.prod(self.out_shape)
        self.act_name = act
        self.act = activation(act)
        self.weight = nn.Parameter(torch.empty(n_out, self.in_features))
        self.bias = nn.Parameter(torch.zeros(n_out))
        bound = math.sqrt(6.0 / (n_out + self.in_features))
        with torch.no_grad():
            self.weight.uniform_(-bound, bound, generator=generator)

    def pre_activation(self, h: Tensor) -> Tensor:
        return F.linear(h.flatten(1), self.weight, self.bias).reshape(h.shape[0],
                                                                      *self.out_shape)

    def forward(self, h: Tensor) -> Tensor:
        return self.act(self.pre_activation(h))

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_shape}, act={self.act_name}"


class LocallyConnectedInverse(nn.Module):
    """The inverse of a :class:`~bpdl.nn.LocallyConnected2d` layer: g(h) = act(V^T h + c), with
    V shaped like the layer's weight (H_out, W_out, O, C, k_h, k_w) and V^T the transposed
    locally connected map (docs/algorithms/baselines.md §2.3),

        (V^T h)[n, c, y, x] = sum over (i, j, o, u, v) with s_h i + u - p_t = y, s_w j + v - p_l = x
                              of h[n, o, i, j] V[i, j, o, c, u, v],

    the fused :func:`bpdl.ops.locally_connected2d_grad_input`. c has one entry per input unit
    (C, H, W). With V = W and the identity activation this is the adjoint of the layer's map:
    <W x, y> = <x, W^T y>."""

    def __init__(self, layer: LocallyConnected2d, act: str = "tanh",
                 generator: torch.Generator | None = None):
        super().__init__()
        self.input_size = tuple(layer.input_size)
        self.stride = tuple(layer.stride)
        self.padding = tuple(layer.padding)
        self.act_name = act
        self.act = activation(act)
        self.weight = nn.Parameter(torch.empty(layer.weight.shape))
        self.bias = nn.Parameter(torch.zeros(layer.in_channels, *self.input_size))
        bound = math.sqrt(3.0) * layer.init_std("xavier_uniform")
        with torch.no_grad():
            self.weight.uniform_(-bound, bound, generator=generator)

    def pre_activation(self, h: Tensor) -> Tensor:
        from bpdl import ops

        return ops.locally_connected2d_grad_input(h, self.weight, self.input_size, self.stride,
                                                  self.padding) + self.bias

    def forward(self, h: Tensor) -> Tensor:
        return self.act(self.pre_activation(h))

    def extra_repr(self) -> str:
        return (f"transposed LC to {tuple(self.bias.shape)}, stride={self.stride}, "
                f"padding={self.padding}, act={self.act_name}")


class AuxiliaryOutput(nn.Module):
    """AO-SDTP's auxiliary output z = tanh(W_z h + b_z) (B18; docs/algorithms/
    target_propagation.md §4.2): a fixed random projection of the last hidden layer, never
    trained (buffers, not parameters), which the output inverse g_L(o, z) reads beside the
    class probabilities o. W_z Glorot uniform, b_z zero (B18 states neither; bpdl's choice)."""

    def __init__(self, in_features: int, size: int, generator: torch.Generator | None = None):
        super().__init__()
        self.in_features, self.size = int(in_features), int(size)
        bound = math.sqrt(6.0 / (self.in_features + self.size))
        weight = torch.empty(self.size, self.in_features).uniform_(-bound, bound,
                                                                   generator=generator)
        self.register_buffer("weight", weight)
        self.register_buffer("bias", torch.zeros(self.size))

    def forward(self, h: Tensor) -> Tensor:
        return torch.tanh(F.linear(h.flatten(1), self.weight, self.bias))

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.size}, fixed random, tanh"
