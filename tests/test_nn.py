"""Backprop baselines: shapes, geometry checks, and initialisers that actually run."""

from __future__ import annotations

import math

import pytest
import torch
from bpdl import nn as bnn
from bpdl.errors import ConfigError
from torch import nn


def test_mlp_shapes_and_default_architecture():
    model = bnn.build_model("mlp", (1, 28, 28), 10)
    assert [tuple(layer.weight.shape) for layer in model.layers] == [(500, 784), (10, 500)]
    assert model(torch.rand(3, 1, 28, 28)).shape == (3, 10)
    deep = bnn.build_model("mlp", (3, 32, 32), 10, {"hidden": [30, 20, 40], "activation": "tanh"})
    assert [layer.in_features for layer in deep.layers] == [3072, 30, 20, 40]
    assert all(isinstance(a, nn.Tanh) for a in deep.activations)


def test_cnn_reference_geometry():
    # T19 reference: MNIST 28->28->14->14->7 then Linear(1568->10); CIFAR Linear(2048->10)
    m = bnn.build_model("cnn", (1, 28, 28), 10)
    assert m.readout.in_features == 1568
    assert m(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    c = bnn.build_model("cnn", (3, 32, 32), 10)
    assert c.readout.in_features == 2048
    assert bnn.cnn_geometry((1, 28, 28), bnn.CNNConfig()) == [(14, 14), (7, 7)]
    per_block = bnn.CNNConfig(channels=(8, 8, 8), kernel_size=(3, 5, 2), stride=(1, 2, 1),
                              padding=(1, 2, 0))
    sizes = bnn.cnn_geometry((1, 28, 28), per_block)
    model = bnn.CNN((1, 28, 28), 10, per_block)
    h = model.blocks(torch.rand(1, 1, 28, 28))
    assert tuple(h.shape[2:]) == sizes[-1]


@pytest.mark.parametrize("options,block", [
    ({"channels": [8, 8, 8, 8, 8]}, "block 5"),                       # 28->14->7->3->1->0
    ({"channels": [4], "kernel_size": 30, "padding": 0, "stride": 3}, "block 1"),
    ({"channels": [4, 4], "kernel_size": [3, 16], "padding": [1, 0]}, "block 2"),
])
def test_cnn_collapse_names_the_block(options, block):
    with pytest.raises(ConfigError, match=block):
        bnn.build_model("cnn", (1, 28, 28), 10, options)


@pytest.mark.parametrize("options,match", [
    ({"channels": [8, 8], "kernel_size": [3, 3, 3]}, "one per block"),
    ({"channels": []}, "at least one block"),
    ({"channels": [8], "stride": 0}, "stride"),
    ({"hidden_sizes": [3]}, "unknown cnn model option"),
])
def test_cnn_bad_options(options, match):
    with pytest.raises(ConfigError, match=match):
        bnn.build_model("cnn", (1, 28, 28), 10, options)


def test_unknown_model_activation_init():
    with pytest.raises(ConfigError, match="valid models are: cnn, lc, microcircuit, mlp, segregated"):
        bnn.build_model("resnet", (1, 28, 28), 10)
    with pytest.raises(ConfigError, match="valid activations"):
        bnn.build_model("mlp", (1, 28, 28), 10, {"activation": "swishy"})
    with pytest.raises(ConfigError, match="valid initialisers"):
        bnn.build_model("mlp", (1, 28, 28), 10, {"init": "orthogonal-ish"})
    with pytest.raises(ConfigError, match="positive integers"):
        bnn.build_model("mlp", (1, 28, 28), 10, {"hidden": [0]})


def _uniform_std_ok(w: torch.Tensor, std: float) -> bool:
    bound = math.sqrt(3) * std
    return (float(w.abs().max()) <= bound + 1e-7 and
            abs(float(w.std()) - std) < 0.05 * std and float(w.abs().max()) > 0.9 * bound)


@pytest.mark.parametrize("model_name,shape,options", [
    ("mlp", (1, 28, 28), {"hidden": [300, 100, 50]}),
    ("cnn", (1, 28, 28), {"channels": [16, 32, 8]}),
    ("cnn", (3, 32, 32), {}),
])
def test_xavier_is_applied_to_every_layer(model_name, shape, options):
    torch.manual_seed(0)
    model = bnn.build_model(model_name, shape, 10, {**options, "init": "xavier_uniform",
                                                    "bias_init": 0.01})
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    assert len(layers) == len(model.initialised) >= 2
    for layer in layers:
        fan_in, fan_out = bnn.init.fans(layer.weight)
        std = math.sqrt(2.0 / (fan_in + fan_out))
        assert _uniform_std_ok(layer.weight.detach(), std), layer
        assert torch.all(layer.bias == 0.01)


def test_other_initialisers_statistics():
    torch.manual_seed(1)
    m = bnn.build_model("mlp", (1, 28, 28), 10, {"hidden": [400], "init": "kaiming_normal",
                                                 "bias_init": 0.0})
    w = m.layers[0].weight.detach()
    assert abs(float(w.std()) - 1 / math.sqrt(784)) < 0.03 / math.sqrt(784)
    assert abs(float(w.mean())) < 0.01 / math.sqrt(784)
    m2 = bnn.build_model("mlp", (1, 28, 28), 10, {"hidden": [400], "init": "xavier_normal"})
    w2 = m2.layers[0].weight.detach()
    assert float(w2.abs().max()) > math.sqrt(3) * math.sqrt(2 / (784 + 400))  # normal tails


def test_torch_default_keeps_pytorch_initialisation():
    torch.manual_seed(2)
    m = bnn.build_model("mlp", (1, 28, 28), 10, {"init": "torch_default"})
    torch.manual_seed(2)
    ref = nn.Linear(784, 500)
    assert torch.equal(m.layers[0].weight, ref.weight)
    assert torch.equal(m.layers[0].bias, ref.bias)
    assert not torch.all(m.layers[0].bias == 0.01)
