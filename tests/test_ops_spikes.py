"""Spike-generation ops: kernels vs the pure-PyTorch reference, Philox known answers, opcheck,
torch.compile, CPU/CUDA agreement (CUDA cases are marked parameters)."""

from __future__ import annotations

import math

import bpdl
import pytest
import torch
from bpdl import functional as F
from bpdl import ops
from conftest import DEVICES


def _words(*values: int) -> list[torch.Tensor]:
    return [torch.tensor([v], dtype=torch.int64) for v in values]


@pytest.mark.parametrize("counter,key,expected", [
    # Known-answer vectors of Random123's philox4x32_10 (kat_vectors).
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
])
def test_philox_reference_known_answers(counter, key, expected):
    out = F.philox4x32_10(*_words(*counter), *key)
    assert tuple(int(w) for w in out) == expected


def test_philox_uniform_range_and_moments():
    u = F.philox_uniform(200_000, seed=3, step=0)
    assert u.dtype == torch.float64
    assert float(u.min()) > 0 and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 0.005
    assert abs(float(u.var()) - 1 / 12) < 0.002
    # the element offset selects the same draws as a longer request
    assert torch.equal(F.philox_uniform(10, 3, 0, element_offset=5), u[5:15])


def test_poisson_inversion_by_hand():
    # lam = 0.5: P(0)=e^-0.5=0.60653, P(<=1)=0.90980, P(<=2)=0.98561
    lam = torch.full((5,), 0.5, dtype=torch.float64)
    u = torch.tensor([0.1, 0.6065, 0.6066, 0.95, 0.99], dtype=torch.float64)
    assert F.poisson_from_uniform(u, lam).tolist() == [0.0, 0.0, 1.0, 2.0, 3.0]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_kernel_matches_reference(device, dtype):
    g = torch.Generator().manual_seed(0)
    rate = (torch.rand(257, 33, generator=g) * 0.8).to(dtype).to(device)
    for seed, step, stream in [(0, 0, 0), (12345, 7, 1), (2**40 + 3, 2**32 - 1, 2**32 - 1)]:
        got = ops.poisson_spikes(rate, seed, step, stream)
        ref = F.poisson_spikes(rate.cpu(), seed, step, stream)
        assert got.dtype == dtype and got.shape == rate.shape
        assert torch.equal(got.cpu(), ref)


@pytest.mark.parametrize("device", DEVICES)
def test_kernel_dt_and_large_means_match_reference(device):
    rate = torch.linspace(0, 40, 1000, dtype=torch.float64, device=device)
    got = ops.poisson_spikes(rate, 5, 1, dt=1.5)
    assert torch.equal(got.cpu(), F.poisson_spikes(rate.cpu(), 5, 1, dt=1.5))
    assert got.max() > 40  # the upper tail is reached


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_and_empty(device):
    rate = torch.rand(40, 30, device=device).t()  # non-contiguous
    got = ops.poisson_spikes(rate, 1, 2)
    # element index is the row-major index of the (logical) tensor
    assert torch.equal(got.cpu(), F.poisson_spikes(rate.contiguous().cpu(), 1, 2))
    empty = ops.poisson_spikes(torch.empty(0, 5, device=device), 1, 2)
    assert empty.shape == (0, 5)


def test_counts_are_poisson_distributed():
    lam = 0.2  # lambda_max * dt of the segregated-dendrite model
    rate = torch.full((400_000,), lam)
    counts = ops.poisson_spikes(rate, seed=9, step=0)
    for k in range(4):
        expected = math.exp(-lam) * lam**k / math.factorial(k)
        observed = float((counts == k).double().mean())
        assert abs(observed - expected) < 4 * math.sqrt(expected * (1 - expected) / rate.numel())
    assert abs(float(counts.mean()) - lam) < 0.003


def test_keys_give_independent_streams():
    rate = torch.full((50_000,), 0.5)
    a = ops.poisson_spikes(rate, 1, 0, 0)
    assert torch.equal(a, ops.poisson_spikes(rate, 1, 0, 0))  # reproducible
    for other in (ops.poisson_spikes(rate, 2, 0, 0), ops.poisson_spikes(rate, 1, 1, 0),
                  ops.poisson_spikes(rate, 1, 0, 1)):
        assert not torch.equal(a, other)
        corr = torch.corrcoef(torch.stack([a, other]))[0, 1]
        assert abs(float(corr)) < 0.03


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    rate = torch.rand(16, 8, device=device)
    torch.library.opcheck(torch.ops.bpdl.poisson_spikes.default, (rate, 3, 4, 0, 1.0))


def test_torch_compile_traces_through_the_op():
    def f(rate):
        return ops.poisson_spikes(rate * 0.5, 11, 3, validate=False) + 1

    rate = torch.rand(64, 10)
    compiled = torch.compile(f, backend="eager", fullgraph=True)
    assert torch.equal(compiled(rate), f(rate))


def test_fake_tensor_shape():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        out = torch.ops.bpdl.poisson_spikes(torch.empty(3, 7), 0, 0, 0, 1.0)
    assert out.shape == (3, 7) and out.dtype == torch.float32


@pytest.mark.parametrize("bad,match", [
    (dict(rate=torch.tensor([-0.1, 0.2])), "rates must be >= 0"),
    (dict(rate=torch.tensor([float("nan")])), "NaN"),
    (dict(rate=torch.tensor([100.0])), "exceeds"),
    (dict(dt=0.0), "dt must be a positive"),
    (dict(seed=-1), "seed must be >= 0"),
    (dict(step=2**32), "step must be in"),
    (dict(rate=torch.tensor([1, 2])), "floating point"),
])
def test_bad_arguments_have_clear_errors(bad, match):
    args = dict(rate=torch.tensor([0.1, 0.2]), seed=0, step=0, dt=1.0)
    args.update(bad)
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        ops.poisson_spikes(args["rate"], args["seed"], args["step"], dt=args["dt"])


def test_build_info_is_consistent():
    assert bpdl._C.torch_version() == torch.__version__
    assert isinstance(bpdl._C.with_cuda(), bool)
    if bpdl._C.with_cuda():
        assert "spikes_cuda" in bpdl._C.cuda_kernels()
