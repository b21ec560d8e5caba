"""Sign-symmetric feedback ops: kernels vs the pure-PyTorch reference (the random magnitudes
bit for bit), sign(0) = 0, the magnitude distributions, opcheck, bad arguments. CUDA cases are
marked parameters."""

from __future__ import annotations

import math

import pytest
import torch
from bpdl import functional as F
from bpdl import ops
from conftest import DEVICES


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_sign_feedback_by_hand(device, dtype):
    w = torch.tensor([[0.5, -2.0, 0.0], [-0.0, 3.0, -1e-30]], dtype=dtype, device=device)
    m = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=dtype, device=device)
    expected = torch.tensor([[1.0, -2.0, 0.0], [0.0, 5.0, -6.0]], dtype=dtype)  # sign(+-0) = 0
    assert torch.equal(ops.sign_feedback(w, m).cpu(), expected)
    c = torch.tensor(0.25, dtype=dtype, device=device)
    assert torch.equal(ops.sign_feedback(w, c).cpu(), torch.sign(w).cpu() * 0.25)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("numel", [1, 7, 65, 4096 + 3])
def test_sign_random_feedback_matches_reference(device, dtype, numel):
    g = torch.Generator().manual_seed(numel)
    w = torch.randn(numel, generator=g, dtype=dtype)
    w[0] = 0.0
    w = w.to(device)
    for seed, stream, step in [(0, 0, 0), (2**40 + 5, 3, 2**32 - 1)]:
        got = ops.sign_random_feedback(w, seed, stream, step, "uniform", 0.3)
        ref = F.sign_random_feedback(w.cpu(), seed, stream, step, "uniform", 0.3)
        assert torch.equal(got.cpu(), ref)  # the same Philox words, the same float arithmetic
        assert got[0] == 0  # sign(0) = 0
        half = ops.sign_random_feedback(w, seed, stream, step, "half_normal", 0.3)
        torch.testing.assert_close(half.cpu(), F.sign_random_feedback(
            w.cpu(), seed, stream, step, "half_normal", 0.3), rtol=1e-5, atol=1e-6)


def test_sign_random_feedback_same_numbers_across_threads():
    """The CPU kernel splits the groups of four among threads at boundaries that are not
    multiples of its 16-block vector batches: the numbers must not depend on the split."""
    numel = 4 * (2 * 8192 + 5) + 2
    w = torch.randn(numel, generator=torch.Generator().manual_seed(1))
    w[::9] = 0.0
    w[1::9] = -0.0
    ref = F.sign_random_feedback(w, 11, 2, 5, "uniform", 0.7)
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            assert torch.equal(ops.sign_random_feedback(w, 11, 2, 5, "uniform", 0.7), ref)
    finally:
        torch.set_num_threads(before)


def test_sign_random_magnitudes_follow_the_initialiser():
    n = 400_000
    uniform = F.sign_random_magnitude(n, seed=1, stream=2, step=3, scale=0.5)
    assert float(uniform.min()) > 0 and float(uniform.max()) <= 0.5
    assert abs(float(uniform.mean()) - 0.25) < 0.002  # |U(-b, b)| = U(0, b)
    half = F.sign_random_magnitude(n, seed=1, stream=2, step=3, distribution="half_normal",
                                   scale=0.5)
    assert abs(float(half.mean()) - 0.5 * math.sqrt(2 / math.pi)) < 0.002  # E|N(0, s)|
    assert abs(float((half**2).mean()) - 0.25) < 0.003
    # every update draws anew, every layer has its own stream
    other_step = F.sign_random_magnitude(n, seed=1, stream=2, step=4, scale=0.5)
    other_layer = F.sign_random_magnitude(n, seed=1, stream=3, step=3, scale=0.5)
    for other in (other_step, other_layer):
        assert abs(float(torch.corrcoef(torch.stack([uniform, other]))[0, 1])) < 0.01


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_and_errors(device):
    w = torch.randn(5, 6, device=device)
    torch.library.opcheck(torch.ops.bpdl.sign_feedback.default, (w, torch.rand(5, 6,
                                                                             device=device)))
    torch.library.opcheck(torch.ops.bpdl.sign_random_feedback.default, (w, 1, 2, 3, 0, 0.5))
    with pytest.raises(ValueError, match="magnitude must be a 0-dim tensor or shaped like"):
        ops.sign_feedback(w, torch.rand(3, device=device))
    with pytest.raises(ValueError, match="distribution must be one of"):
        ops.sign_random_feedback(w, 0, 0, 0, "gaussian")
    with pytest.raises(ValueError, match="scale must be positive"):
        ops.sign_random_feedback(w, 0, 0, 0, "uniform", 0.0)
    with pytest.raises(ValueError, match="stream and step"):
        ops.sign_random_feedback(w, 0, 2**32, 0)
