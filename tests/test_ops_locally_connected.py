"""Locally connected layer ops and the regenerated-DFA projection: kernels vs the pure-PyTorch
references, the references vs hand computations, opcheck, float64 gradcheck, bad arguments.
CUDA cases are marked parameters."""

from __future__ import annotations

import pytest
import torch
from bpdl import functional as F
from bpdl import ops
from bpdl.nn import LocallyConnected2d
from conftest import DEVICES

# (N, C, H, W, O, kernel, stride, padding (top, left), output (OH, OW))
GEOMETRIES = [
    (3, 2, 7, 6, 4, (3, 3), (2, 2), (0, 0), (3, 2)),      # valid, odd sizes
    (2, 3, 8, 8, 5, (3, 3), (1, 1), (1, 1), (8, 8)),      # same, stride 1
    (4, 1, 28, 28, 6, (3, 3), (2, 2), (0, 0), (14, 14)),  # TF SAME at stride 2: pad below only
    (2, 4, 9, 7, 3, (5, 3), (2, 1), (2, 1), (5, 7)),      # rectangular kernel and stride
    (1, 2, 5, 5, 2, (5, 5), (1, 1), (2, 2), (5, 5)),      # kernel as large as the input
]


def _tensors(geometry, dtype, device, seed=0):
    n, c, h, w, o, (kh, kw), _, _, (oh, ow) = geometry
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g, dtype=dtype).to(device)
    weight = torch.randn(oh, ow, o, c, kh, kw, generator=g, dtype=dtype).to(device)
    grad = torch.randn(n, o, oh, ow, generator=g, dtype=dtype).to(device)
    return x, weight, grad


def test_reference_by_hand():
    # one location, one channel: y = sum of the patch times the filter, zeros outside
    x = torch.arange(16, dtype=torch.float64).reshape(1, 1, 4, 4)
    weight = torch.zeros(2, 2, 1, 1, 3, 3, dtype=torch.float64)
    weight[0, 0, 0, 0] = torch.tensor([[0, 0, 0], [0, 1, 1], [0, 1, 1]], dtype=torch.float64)
    weight[1, 1, 0, 0, 0, 0] = 1.0  # location (1, 1) reads x[1, 1] only (patch origin 2-1=1)
    y = F.locally_connected2d(x, weight, None, stride=2, padding=1)
    # location (0, 0): patch rows -1..1, cols -1..1; ones on x[0:2, 0:2] = 0 + 1 + 4 + 5
    assert y[0, 0, 0, 0] == 10.0
    assert y[0, 0, 1, 1] == x[0, 0, 1, 1]
    assert y[0, 0, 0, 1] == 0.0 and y[0, 0, 1, 0] == 0.0


def test_reference_with_shared_weights_is_a_convolution():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 9, 9, generator=g, dtype=torch.float64)
    conv = torch.randn(4, 3, 3, 3, generator=g, dtype=torch.float64)
    shared = conv.expand(9, 9, 4, 3, 3, 3).contiguous()
    y = F.locally_connected2d(x, shared, None, 1, 1)
    torch.testing.assert_close(y, torch.nn.functional.conv2d(x, conv, None, 1, 1))
    gy = torch.randn_like(y)
    gx = F.locally_connected2d_grad_input(gy, shared, (9, 9), 1, 1)
    torch.testing.assert_close(gx, torch.nn.grad.conv2d_input(x.shape, conv, gy, 1, 1))
    gw = F.locally_connected2d_grad_weight(gy, x, 3, 1, 1)
    torch.testing.assert_close(gw.sum((0, 1)), torch.nn.grad.conv2d_weight(x, conv.shape, gy, 1, 1))


def test_reference_gradients_are_autograd_gradients():
    x, weight, grad = _tensors(GEOMETRIES[3], torch.float64, "cpu")
    x.requires_grad_(True)
    weight.requires_grad_(True)
    n, c, h, w, o, k, s, p, _ = GEOMETRIES[3]
    y = F.locally_connected2d(x, weight, None, s, p)
    gx, gw = torch.autograd.grad(y, (x, weight), grad)
    torch.testing.assert_close(F.locally_connected2d_grad_input(grad, weight.detach(), (h, w), s, p), gx)
    torch.testing.assert_close(F.locally_connected2d_grad_weight(grad, x.detach(), k, s, p), gw)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_kernels_match_reference(device, dtype, geometry):
    x, weight, grad = _tensors(geometry, dtype, device)
    n, c, h, w, o, k, s, p, _ = geometry
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    y = ops.locally_connected2d(x, weight, None, s, p)
    assert y.shape == (n, o, *geometry[-1]) and y.dtype == dtype and y.device.type == device
    torch.testing.assert_close(y.cpu(), F.locally_connected2d(x.cpu(), weight.cpu(), None, s, p),
                               **tol)
    gx = ops.locally_connected2d_grad_input(grad, weight, (h, w), s, p)
    torch.testing.assert_close(gx.cpu(), F.locally_connected2d_grad_input(
        grad.cpu(), weight.cpu(), (h, w), s, p), **tol)
    gw = ops.locally_connected2d_grad_weight(grad, x, k, s, p)
    torch.testing.assert_close(gw.cpu(), F.locally_connected2d_grad_weight(
        grad.cpu(), x.cpu(), k, s, p), **tol)


@pytest.mark.parametrize("device", DEVICES)
def test_kernels_non_contiguous_and_empty_batch(device):
    geometry = GEOMETRIES[1]
    x, weight, grad = _tensors(geometry, torch.float64, device)
    xt = x.transpose(2, 3).contiguous().transpose(2, 3)  # same values, other strides
    assert not xt.is_contiguous()
    torch.testing.assert_close(ops.locally_connected2d(xt, weight, None, 1, 1),
                               ops.locally_connected2d(x, weight, None, 1, 1))
    empty = ops.locally_connected2d(x[:0], weight, None, 1, 1)
    assert empty.shape == (0, 5, 8, 8)
    assert torch.count_nonzero(ops.locally_connected2d_grad_weight(grad[:0], x[:0], 3, 1, 1)) == 0


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    geometry = (2, 2, 5, 4, 2, (3, 2), (2, 1), (1, 0), (3, 3))
    x, weight, grad = _tensors(geometry, torch.float64, device)
    x.requires_grad_(True)
    weight.requires_grad_(True)
    torch.library.opcheck(torch.ops.bpdl.locally_connected2d.default, (x, weight, [2, 1], [1, 0]))
    torch.library.opcheck(torch.ops.bpdl.locally_connected2d_grad_input.default,
                          (grad, weight, [5, 4], [2, 1], [1, 0]))
    torch.library.opcheck(torch.ops.bpdl.locally_connected2d_grad_weight.default,
                          (grad, x, [3, 2], [2, 1], [1, 0]))


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_float64(device):
    # small on purpose: gradcheck perturbs every input element
    geometry = (2, 2, 5, 4, 2, (3, 2), (2, 1), (1, 0), (3, 3))
    x, weight, _ = _tensors(geometry, torch.float64, device)
    bias = torch.randn(2, 3, 3, dtype=torch.float64, device=device)
    args = [t.requires_grad_(True) for t in (x, weight, bias)]
    assert torch.autograd.gradcheck(
        lambda a, b, c: ops.locally_connected2d(a, b, c, (2, 1), (1, 0)), args)
    # second order: the gradient ops are differentiable through each other
    assert torch.autograd.gradgradcheck(
        lambda a, b: ops.locally_connected2d(a, b, None, (2, 1), (1, 0)), args[:2])


def test_torch_compile_traces_through_the_op():
    layer = LocallyConnected2d(2, 3, (6, 6), 3, 2)
    x = torch.randn(4, 2, 6, 6)
    compiled = torch.compile(layer, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), layer(x))


@pytest.mark.parametrize("call,match", [
    (lambda: ops.locally_connected2d(torch.randn(2, 3, 8), torch.randn(4, 4, 2, 3, 3, 3)),
     r"input must be \(N, C, H, W\)"),
    (lambda: ops.locally_connected2d(torch.randn(2, 3, 8, 8), torch.randn(4, 4, 2, 3, 3)),
     "weight must be"),
    (lambda: ops.locally_connected2d(torch.randn(2, 2, 8, 8), torch.randn(4, 4, 2, 3, 3, 3)),
     "2 channels but the weight expects 3"),
    (lambda: ops.locally_connected2d(torch.ones(2, 3, 8, 8, dtype=torch.int64),
                                     torch.randn(4, 4, 2, 3, 3, 3)), "float32 or float64"),
    (lambda: ops.locally_connected2d(torch.randn(2, 3, 8, 8), torch.randn(9, 9, 2, 3, 3, 3), None,
                                     1, 0), "does not fit an input of 8x8"),
    (lambda: ops.locally_connected2d(torch.randn(2, 3, 8, 8), torch.randn(4, 4, 2, 3, 3, 3), None,
                                     0), "stride must be"),
    (lambda: ops.locally_connected2d(torch.randn(2, 3, 8, 8), torch.randn(4, 4, 2, 3, 3, 3),
                                     torch.randn(5), 2), "bias must be"),
    (lambda: ops.locally_connected2d_grad_input(torch.randn(2, 2, 3, 3),
                                                torch.randn(4, 4, 2, 3, 3, 3), (8, 8)),
     "grad_output must be"),
])
def test_bad_arguments_have_clear_errors(call, match):
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        call()


def test_layer_wrong_input_size_is_refused():
    layer = LocallyConnected2d(1, 2, (8, 8), 3, 2)
    with pytest.raises(ValueError, match="filters are tied to one input size"):
        layer(torch.randn(1, 1, 9, 9))


def test_layer_same_padding_matches_tensorflow_and_bias_kinds():
    # TF SAME: out = ceil(in / stride); the odd padding row goes below/right
    layer = LocallyConnected2d(1, 32, (28, 28), 3, 2, "same")
    assert layer.output_size == (14, 14) and layer.padding == (0, 0)
    layer = LocallyConnected2d(64, 128, (16, 16), 5, 2, "same")
    assert layer.output_size == (8, 8) and layer.padding == (1, 1)
    assert tuple(layer.weight.shape) == (8, 8, 128, 64, 5, 5)
    assert layer.weight.numel() == 13_107_200  # docs/algorithms/baselines.md §2.3 parameter count
    assert tuple(layer.bias.shape) == (128, 8, 8)
    per_channel = LocallyConnected2d(3, 4, (6, 6), 3, 1, "valid", bias="channel")
    assert per_channel.output_size == (4, 4) and tuple(per_channel.bias.shape) == (4,)
    y = per_channel(torch.randn(2, 3, 6, 6))
    ref = F.locally_connected2d(torch.randn(0, 3, 6, 6), per_channel.weight.detach())
    assert y.shape == (2, 4, 4, 4) and ref.shape == (0, 4, 4, 4)


def test_layer_initialiser_statistics():
    layer = LocallyConnected2d(16, 32, (12, 12), 3, 1, "same")
    layer.reset_bpdl_parameters("xavier_uniform", 0.01)
    fan_in, fan_out = 16 * 9, 32 * 9
    expected = (2.0 / (fan_in + fan_out)) ** 0.5
    assert abs(float(layer.weight.detach().std()) / expected - 1) < 0.02
    assert torch.all(layer.bias == 0.01)
    bound = 1 / fan_in**0.5
    layer.reset_parameters()
    # the bound in the weights' precision: float32 rounding of a draw may land exactly on it
    assert float(layer.weight.detach().abs().max()) <= float(torch.tensor(bound, dtype=torch.float32))


# ---- regenerated DFA projection -------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dfa_project_regenerates_the_stored_matrix(device, dtype):
    num_outputs, features = 10, 1000
    stored = F.dfa_feedback_matrix(num_outputs, features, seed=7, stream=3, scale=0.1,
                                   dtype=dtype)
    # e = identity rows: e @ D is D itself, exactly, whatever the summation order
    eye = torch.eye(num_outputs, dtype=dtype, device=device)
    assert torch.equal(ops.dfa_project(eye, features, 7, 3, 0.1).cpu(), stored)
    error = torch.randn(33, num_outputs, dtype=dtype, device=device)
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {}
    torch.testing.assert_close(ops.dfa_project(error, features, 7, 3, 0.1).cpu(),
                               error.cpu() @ stored, **tol)
    assert float(stored.abs().max()) < 0.1 and abs(float(stored.mean())) < 0.005
    other = F.dfa_feedback_matrix(num_outputs, features, seed=7, stream=4, scale=0.1)
    assert not torch.equal(other, stored.float())


@pytest.mark.parametrize("device", DEVICES)
def test_dfa_project_opcheck_and_errors(device):
    error = torch.randn(4, 3, device=device)
    torch.library.opcheck(torch.ops.bpdl.dfa_project.default, (error, 50, 1, 2, 0.3))
    with pytest.raises(ValueError, match="error must be an"):
        ops.dfa_project(torch.randn(4), 5, 0, 0, 1.0)
    with pytest.raises(ValueError, match="stream"):
        ops.dfa_project(error, 5, 0, 2**32, 1.0)


# ---- Bartunov et al.'s locally connected networks ----------------------------------------------

def test_lc_network_architectures_of_b18():
    from bpdl import nn as bnn

    mnist = bnn.build_model("lc", (1, 28, 28), 10)
    lcs = [m for m in mnist.modules() if isinstance(m, LocallyConnected2d)]
    assert [layer.weight.numel() for layer in lcs] == [56_448, 903_168]  # docs/algorithms/baselines.md §2.3
    assert mnist.layers[0].in_features == 3136 and mnist.layers[0].out_features == 1024
    assert mnist(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    cifar = bnn.build_model("lc", (3, 32, 32), 10)
    lcs = [m for m in cifar.modules() if isinstance(m, LocallyConnected2d)]
    assert [layer.weight.numel() for layer in lcs] == [1_228_800, 13_107_200, 18_874_368]
    assert cifar.layers[0].in_features == 16_384
    # Glorot-uniform weights, zero biases (B18), through the initialiser hook
    assert torch.all(lcs[0].bias == 0)
    std = (2.0 / (3 * 25 + 64 * 25)) ** 0.5
    assert abs(float(lcs[0].weight.detach().std()) / std - 1) < 0.01
    # "BP ConvNet": the same architecture with shared weights
    conv = bnn.build_model("lc", (1, 28, 28), 10, {"shared": True})
    convs = [m for m in conv.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [tuple(c.weight.shape) for c in convs] == [(32, 1, 3, 3), (64, 32, 3, 3)]
    assert conv(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    custom = bnn.build_model("lc", (1, 12, 12), 4, {"kernel_size": [3], "channels": [5],
                                                    "stride": [1], "hidden": []})
    assert custom(torch.rand(3, 1, 12, 12)).shape == (3, 4)


@pytest.mark.parametrize("options,match", [
    ({"kernel_size": [3, 3], "channels": [4], "stride": [1]}, "one entry per LC layer"),
    ({"padding": "reflect"}, "padding must be"),
    ({"kernel_size": [40], "channels": [4], "stride": [1], "padding": "valid"}, "leaves no output"),
])
def test_lc_network_bad_options(options, match):
    from bpdl import nn as bnn
    from bpdl.errors import ConfigError

    with pytest.raises(ConfigError, match=match):
        bnn.build_model("lc", (1, 28, 28), 10, options)
