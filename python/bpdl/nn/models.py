"""Backprop baselines: the MLP and CNN of docs/algorithms/baselines.md, and the model registry."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bpdl.config import from_dict
from bpdl.errors import ConfigError, UnknownNameError
from bpdl.nn.init import INITS, initialise
from bpdl.registry import Registry

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "leaky_relu": nn.LeakyReLU,
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "identity": nn.Identity,
}


def activation(name: str) -> nn.Module:
    """A fresh activation module by name (relu, tanh, sigmoid, ...)."""
    if name not in ACTIVATIONS:
        raise UnknownNameError("activation", name, list(ACTIVATIONS))
    return ACTIVATIONS[name]()


def _check_init(init: str) -> None:
    if init not in INITS:
        raise UnknownNameError("initialiser", init, INITS)


@dataclass(frozen=True)
class MLPConfig:
    """Multilayer perceptron: for each hidden size Linear -> activation, then Linear to logits.

    Default 784-500-10 with ReLU (T19 "DNN", docs/algorithms/baselines.md §2.1).
    ``init="xavier_uniform"`` with bias 0.01 is what T19 meant to apply; ``"torch_default"`` is
    what its runs actually used.
    """

    hidden: tuple[int, ...] = (500,)
    activation: str = "relu"
    init: str = "xavier_uniform"
    bias_init: float = 0.01
    #: applied to the last layer's output (``sigmoid`` for L16's logistic output units trained
    #: with squared error); the default ``identity`` returns logits
    output_activation: str = "identity"

    def __post_init__(self) -> None:
        if any(isinstance(h, bool) or not isinstance(h, int) or h <= 0 for h in self.hidden):
            raise ConfigError(f"MLP hidden sizes must be positive integers, got {self.hidden}")
        activation(self.activation)
        activation(self.output_activation)
        _check_init(self.init)


class MLP(nn.Module):
    """Fully connected classifier: x (N, C, H, W) or (N, D) -> logits (N, num_classes)."""

    def __init__(self, in_features: int, num_classes: int, config: MLPConfig | None = None):
        super().__init__()
        self.config = config or MLPConfig()
        #: shape of one input example (after flattening); rules that need layer shapes read it
        self.input_shape: tuple[int, ...] = (in_features,)
        sizes = (in_features, *self.config.hidden, num_classes)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:], strict=False))
        self.activations = nn.ModuleList(activation(self.config.activation)
                                         for _ in self.config.hidden)
        self.output_activation = activation(self.config.output_activation)
        self.initialised = initialise(self, self.config.init, self.config.bias_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.flatten(1)
        for layer, act in zip(self.layers[:-1], self.activations, strict=False):
            h = act(layer(h))
        return self.output_activation(self.layers[-1](h))


@dataclass(frozen=True)
class CNNConfig:
    """Blocks of Conv2d -> BatchNorm2d -> ReLU -> MaxPool2d(2, 2), then one Linear readout.

    Default channels [16, 32], kernel 5, stride 1, padding 2 (T19 "CNN", docs/algorithms/baselines.md §2.2).
    ``kernel_size``, ``stride`` and ``padding`` are one value for every block or one per block.
    """

    channels: tuple[int, ...] = (16, 32)
    kernel_size: int | tuple[int, ...] = 5
    stride: int | tuple[int, ...] = 1
    padding: int | tuple[int, ...] = 2
    batch_norm: bool = True
    pool: bool = True
    activation: str = "relu"
    init: str = "xavier_uniform"
    bias_init: float = 0.01

    def __post_init__(self) -> None:
        if not self.channels:
            raise ConfigError("CNN needs at least one block (channels is empty)")
        if any(isinstance(c, bool) or not isinstance(c, int) or c <= 0 for c in self.channels):
            raise ConfigError(f"CNN channels must be positive integers, got {self.channels}")
        for name in ("kernel_size", "stride", "padding"):
            values = self.per_block(name)
            low = 0 if name == "padding" else 1
            if any(isinstance(v, bool) or not isinstance(v, int) or v < low for v in values):
                raise ConfigError(f"CNN {name} must be integers >= {low}, got {getattr(self, name)}")
        activation(self.activation)
        _check_init(self.init)

    def per_block(self, name: str) -> tuple[int, ...]:
        value = getattr(self, name)
        if isinstance(value, int):
            return (value,) * len(self.channels)
        value = tuple(value)
        if len(value) != len(self.channels):
            raise ConfigError(
                f"CNN {name} has {len(value)} entries but there are {len(self.channels)} blocks "
                f"(channels={list(self.channels)}); give one value or one per block"
            )
        return value


def cnn_geometry(in_shape: tuple[int, int, int], config: CNNConfig) -> list[tuple[int, int]]:
    """Spatial size (H, W) after each block; ValueError naming the block where it collapses.

    After a conv: W' = floor((W - k + 2p) / s) + 1; after a 2x2/2 pool: W'' = floor((W' - 2)/2) + 1.
    """
    _, h, w = in_shape
    sizes: list[tuple[int, int]] = []
    blocks = zip(config.per_block("kernel_size"), config.per_block("stride"),
                 config.per_block("padding"), strict=False)
    for i, (k, s, p) in enumerate(blocks, start=1):
        ch, cw = (h - k + 2 * p) // s + 1, (w - k + 2 * p) // s + 1
        if ch <= 0 or cw <= 0:
            raise ConfigError(
                f"CNN block {i}: a {k}x{k} convolution with stride {s} and padding {p} on a "
                f"{h}x{w} input leaves no output (size {ch}x{cw}); use fewer blocks, smaller "
                f"kernels or strides, or more padding"
            )
        h, w = ch, cw
        if config.pool:
            ph, pw = (h - 2) // 2 + 1, (w - 2) // 2 + 1
            if ph <= 0 or pw <= 0:
                raise ConfigError(
                    f"CNN block {i}: 2x2 max-pooling of the {h}x{w} convolution output leaves "
                    f"no output; use fewer blocks, smaller kernels or strides, or more padding"
                )
            h, w = ph, pw
        sizes.append((h, w))
    return sizes


class CNN(nn.Module):
    """Convolutional classifier: x (N, C, H, W) -> logits (N, num_classes)."""

    def __init__(self, in_shape: tuple[int, int, int], num_classes: int,
                 config: CNNConfig | None = None):
        super().__init__()
        self.config = config or CNNConfig()
        #: shape of one input example (C, H, W); rules that need layer shapes read it
        self.input_shape: tuple[int, ...] = tuple(in_shape)
        sizes = cnn_geometry(in_shape, self.config)
        blocks: list[nn.Module] = []
        c_in = in_shape[0]
        per = zip(self.config.channels, self.config.per_block("kernel_size"),
                  self.config.per_block("stride"), self.config.per_block("padding"), strict=False)
        for c_out, k, s, p in per:
            block: list[nn.Module] = [nn.Conv2d(c_in, c_out, k, stride=s, padding=p)]
            if self.config.batch_norm:
                block.append(nn.BatchNorm2d(c_out))
            block.append(activation(self.config.activation))
            if self.config.pool:
                block.append(nn.MaxPool2d(2, 2))
            blocks.append(nn.Sequential(*block))
            c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        h, w = sizes[-1]
        self.readout = nn.Linear(c_in * h * w, num_classes)
        self.initialised = initialise(self, self.config.init, self.config.bias_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.readout(self.blocks(x).flatten(1))


# ---- locally connected networks (B18) -----------------------------------------------------------

#: B18's locally connected architectures (docs/algorithms/baselines.md §2.3): (kernel, channels, stride) per
#: LC layer, then the fully connected hidden sizes.
B18_LC_ARCHITECTURES: dict[str, tuple[tuple[tuple[int, int, int], ...], tuple[int, ...]]] = {
    "mnist": (((3, 32, 2), (3, 64, 2)), (1024,)),
    "cifar10": (((5, 64, 2), (5, 128, 2), (3, 256, 1)), (1024,)),
}


@dataclass(frozen=True)
class LCNetConfig:
    """Locally connected network of B18: LC layers (tanh), fully connected hidden layers (tanh),
    then a linear readout (softmax in the loss). No pooling: strided LC layers replace it.

    ``kernel_size``, ``channels`` and ``stride`` give one entry per LC layer; left empty they
    default to B18's architecture for the input (28x28 grey: MNIST, 32x32 colour: CIFAR-10).
    ``padding`` is ``same`` (TensorFlow's SAME, B18 (not stated in the source)) or ``valid``; ``bias`` is
    ``location`` or ``channel``. ``shared=True`` builds B18's "BP ConvNet" baseline: the same
    architecture with Conv2d (shared weights, SAME padding).
    """

    kernel_size: tuple[int, ...] = ()
    channels: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    hidden: tuple[int, ...] | None = None
    padding: str = "same"
    bias: str = "location"
    activation: str = "tanh"
    init: str = "xavier_uniform"
    bias_init: float = 0.0
    shared: bool = False

    def __post_init__(self) -> None:
        lengths = {len(self.kernel_size), len(self.channels), len(self.stride)}
        if len(lengths) != 1:
            raise ConfigError(f"LC network kernel_size, channels and stride need one entry per "
                              f"LC layer each, got {len(self.kernel_size)}, {len(self.channels)} "
                              f"and {len(self.stride)}")
        for name in ("kernel_size", "channels", "stride"):
            values = getattr(self, name)
            if any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in values):
                raise ConfigError(f"LC network {name} must be positive integers, got {values}")
        if self.hidden is not None and any(isinstance(h, bool) or not isinstance(h, int)
                                           or h <= 0 for h in self.hidden):
            raise ConfigError(f"LC network hidden sizes must be positive integers, got "
                              f"{self.hidden}")
        if self.padding not in ("same", "valid"):
            raise ConfigError(f"LC network padding must be 'same' or 'valid', got "
                              f"{self.padding!r}")
        if self.bias not in ("location", "channel"):
            raise ConfigError(f"LC network bias must be 'location' or 'channel', got "
                              f"{self.bias!r}")
        activation(self.activation)
        _check_init(self.init)

    def layers(self, in_shape: tuple[int, int, int]) -> tuple[list[tuple[int, int, int]],
                                                              tuple[int, ...]]:
        """(kernel, channels, stride) per LC layer and the hidden sizes, defaults resolved."""
        default = B18_LC_ARCHITECTURES["cifar10" if in_shape[0] == 3 else "mnist"]
        if self.kernel_size:
            lc = list(zip(self.kernel_size, self.channels, self.stride, strict=True))
        else:
            lc = list(default[0])
        hidden = self.hidden if self.hidden is not None else default[1]
        return lc, tuple(hidden)


class LCNet(nn.Module):
    """B18's locally connected classifier: x (N, C, H, W) -> logits (N, num_classes)."""

    def __init__(self, in_shape: tuple[int, int, int], num_classes: int,
                 config: LCNetConfig | None = None):
        super().__init__()
        from bpdl.functional.locally_connected import same_padding
        from bpdl.nn.locally_connected import LocallyConnected2d

        self.config = config or LCNetConfig()
        self.input_shape: tuple[int, ...] = tuple(in_shape)
        lc, hidden = self.config.layers(in_shape)
        c, h, w = in_shape
        blocks: list[nn.Module] = []
        for i, (k, out, s) in enumerate(lc, start=1):
            if self.config.shared:
                if self.config.padding == "same":
                    (oh, pt, pb), (ow, pl, pr) = same_padding(h, k, s), same_padding(w, k, s)
                    pad = nn.ZeroPad2d((pl, pr, pt, pb))
                else:
                    oh, ow, pad = (h - k) // s + 1, (w - k) // s + 1, nn.Identity()
                layer = nn.Conv2d(c, out, k, stride=s)
                blocks.append(nn.Sequential(pad, layer, activation(self.config.activation)))
            else:
                layer = LocallyConnected2d(c, out, (h, w), k, s, self.config.padding,
                                           self.config.bias)
                oh, ow = layer.output_size
                blocks.append(nn.Sequential(layer, activation(self.config.activation)))
            if oh <= 0 or ow <= 0:
                raise ConfigError(f"LC network layer {i}: a {k}x{k} kernel with stride {s} "
                                  f"leaves no output on a {h}x{w} input")
            c, h, w = out, oh, ow
        self.features = nn.Sequential(*blocks)
        sizes = (c * h * w, *hidden, num_classes)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:],
                                                                     strict=True))
        self.activations = nn.ModuleList(activation(self.config.activation) for _ in hidden)
        self.initialised = initialise(self, self.config.init, self.config.bias_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x).flatten(1)
        for layer, act in zip(self.layers[:-1], self.activations, strict=True):
            h = act(layer(h))
        return self.layers[-1](h)


# ---- registry -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelSpec:
    """A registered model family: its options dataclass and a builder."""

    config_cls: type
    build: Callable[[tuple[int, int, int], int, Any], nn.Module]


MODELS: Registry[ModelSpec] = Registry("model")
MODELS.add("mlp", ModelSpec(MLPConfig, lambda shape, k, cfg: MLP(shape[0] * shape[1] * shape[2],
                                                                    k, cfg)))
MODELS.add("cnn", ModelSpec(CNNConfig, lambda shape, k, cfg: CNN(shape, k, cfg)))
MODELS.add("lc", ModelSpec(LCNetConfig, lambda shape, k, cfg: LCNet(shape, k, cfg)))


def model_config(name: str, options: dict[str, Any] | None = None) -> Any:
    """Validated options dataclass of model family ``name``."""
    spec = MODELS.get(name)
    return from_dict(spec.config_cls, options, what=f"{name} model")


def build_model(name: str, input_shape: tuple[int, int, int], num_classes: int,
                options: dict[str, Any] | Any | None = None) -> nn.Module:
    """Build model family ``name`` for inputs of ``input_shape`` (C, H, W)."""
    spec = MODELS.get(name)
    cfg = options if dataclasses.is_dataclass(options) else model_config(name, options)
    return spec.build(tuple(input_shape), num_classes, cfg)
