"""Segregated-dendrite ops: constants and random draws of the reference checked by hand, every
fused kernel against its pure-PyTorch reference with the same Philox numbers (spike counts equal,
floating-point state equal to rounding), opcheck, fake shapes and argument errors. CUDA cases are
marked parameters."""

from __future__ import annotations

import math

import pytest
import torch
from bpdl import ops
from bpdl.functional import random as R
from bpdl.functional import segregated as seg
from bpdl.ops.segregated import _seg_lists
from conftest import DEVICES

TOL = {torch.float64: dict(rtol=1e-11, atol=1e-12), torch.float32: dict(rtol=2e-5, atol=2e-5)}


# many small simulation steps: one torch thread (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---- constants and draws of the reference ------------------------------------------------------

def test_psp_kernel_values():
    k = seg.psp_kernel()
    expected = [0.0269, 0.0436, 0.0533, 0.0581, 0.0597, 0.0591, 0.0571, 0.0543, 0.0510, 0.0475]
    assert torch.allclose(k, torch.tensor(expected, dtype=torch.float64), atol=5e-5)
    assert float(k.sum()) == pytest.approx(0.5104, abs=1e-4)
    full = seg.psp_kernel(200)
    assert float(full.sum()) == pytest.approx(0.9972, abs=1e-3)


@pytest.mark.parametrize("fan_in,w_avg,w_sd", [(784, 0.01871, 0.5049), (500, 0.02933, 0.6321),
                                               (100, 0.14667, 1.4104), (1000, 0.01467, 0.4471),
                                               (3072, 0.00477, 0.2551)])
def test_init_moments_table(fan_in, w_avg, w_sd):
    a, s = seg.init_moments(fan_in)
    assert a == pytest.approx(w_avg, abs=1e-5) and s == pytest.approx(w_sd, abs=1e-4)


def test_euler_coefficients_and_target_fixed_point():
    p = seg.SimParams(sizes=(4, 3, 2))
    C, B = torch.tensor([1.0]), torch.tensor([1.0])
    # hidden and forward output: C <- 0.3 C + 0.6 B
    assert float(seg.soma_hidden(C, B, None, p)) == pytest.approx(0.9)
    assert float(seg.soma_output(C, B, None, p)) == pytest.approx(0.9)
    # target phase: C <- -0.7 C + 0.6 B +- 8
    assert float(seg.soma_output(C, B, torch.tensor([1.0]), p)) == pytest.approx(-0.7 + 0.6 + 8)
    assert float(seg.soma_output(C, B, torch.tensor([0.0]), p)) == pytest.approx(-0.7 + 0.6 - 8)
    # fixed points (0.6 B +- 8) / 1.7 = +-4.706 + 0.353 B
    for teach, sign in ((1.0, 1), (0.0, -1)):
        C = torch.tensor([0.0], dtype=torch.float64)
        B = torch.tensor([2.0], dtype=torch.float64)
        for _ in range(200):
            C = seg.soma_output(C, B, torch.tensor([teach], dtype=torch.float64), p)
        assert float(C) == pytest.approx(sign * 4.70588 + 0.352941 * 2.0, abs=1e-4)
    # steady-state somata
    q = seg.SimParams(sizes=(4, 3, 2), conductances=False)
    assert float(seg.soma_hidden(torch.tensor([0.0]), torch.tensor([1.0]), None, q)) == \
        pytest.approx(0.6 / 0.7)
    target = seg.soma_output(torch.tensor([0.0]), torch.tensor([1.0]), torch.tensor([1.0]), q)
    assert float(target) == pytest.approx((0.6 + 8) / 1.7)


def test_spike_uniforms_are_the_documented_philox_words():
    seed, lane, step, pop = 12345, 3, 77, 2
    u = seg.spike_uniforms(torch.tensor([lane]), torch.tensor([step]), pop, 10, seed)
    for j in (0, 5, 9):
        g = (lane << seg.LANE_SHIFT) + j // 4
        words = R.philox4x32_10(*[torch.tensor([v]) for v in (
            g & 0xFFFFFFFF, g >> 32, step, seg.SPIKE_STREAM + pop)], seed & 0xFFFFFFFF, seed >> 32)
        assert float(u[0, j]) == (int(words[j % 4]) + 0.5) * 2.0**-32


def test_spike_count_statistics():
    lam = 0.2
    B, n = 50, 2000
    rate = torch.full((B, n), lam, dtype=torch.float64)
    counts = seg.spike_counts(rate, torch.arange(B), torch.zeros(B, dtype=torch.int64), 1, 9)
    frac2 = float((counts >= 2).double().mean())
    assert frac2 == pytest.approx(1 - math.exp(-lam) * (1 + lam), abs=0.0015)  # 0.0175
    assert float(counts.double().mean()) == pytest.approx(lam, abs=0.004)


def test_wald_extensions_match_numpy_statistics():
    ext = seg.wald_extensions(torch.arange(200_000), 0, seed=5)
    assert float(ext.double().mean()) == pytest.approx(1.52, abs=0.03)
    assert float((ext == 0).double().mean()) == pytest.approx(0.49, abs=0.01)
    assert int(ext.max()) > 20  # heavy tail
    # reproducible and phase-dependent
    assert torch.equal(ext[:100], seg.wald_extensions(torch.arange(100), 0, seed=5))
    assert not torch.equal(ext[:1000], seg.wald_extensions(torch.arange(1000), 1, seed=5))


def test_plateau_offsets_distribution():
    off = seg.plateau_offsets(torch.arange(400), 0, 500, 0, seed=1)
    assert off.shape == (400, 500) and int(off.min()) == 0 and int(off.max()) == 5
    # |trunc(N(0, 9))| <= 5: P(0) = P(|z| < 1/3) = 0.261
    assert float((off == 0).double().mean()) == pytest.approx(0.261, abs=0.01)


# ---- fixtures for the kernel comparisons ----------------------------------------------------------

def _net(sizes, dtype, device, broadcast=True, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    M = len(sizes) - 1
    W = [(torch.rand(sizes[m + 1], sizes[m], generator=g, dtype=torch.float64) - 0.3)
         * 3.0 / math.sqrt(sizes[m]) for m in range(M)]
    b = [torch.rand(sizes[m + 1], generator=g, dtype=torch.float64) for m in range(M)]
    Y, c = [], []
    for m in range(M - 1):
        src = M - 1 if broadcast else m + 1
        Y.append(torch.randn(sizes[m + 1], sizes[src + 1], generator=g, dtype=torch.float64))
        c.append(torch.randn(sizes[m + 1], generator=g, dtype=torch.float64) if bias else None)

    def conv(t):
        return None if t is None else t.to(dtype=dtype, device=device)

    return [conv(w) for w in W], [conv(v) for v in b], [conv(y) for y in Y], [conv(v) for v in c]


def _inputs(B, n_in, dtype, device, seed=1):
    g = torch.Generator().manual_seed(seed)
    pix = torch.rand(B, n_in, generator=g, dtype=torch.float64)
    pix[pix < 0.5] = 0.0  # sparse, like MNIST
    return (0.2 * pix).to(dtype=dtype, device=device)


def _assert_state_equal(a: seg.LaneState, b: seg.LaneState, dtype):
    assert torch.equal(a.in_ring.cpu(), b.in_ring.cpu())
    for x, y in zip(a.rings, b.rings, strict=True):
        assert torch.equal(x.cpu(), y.cpu())
    assert torch.equal(a.step.cpu(), b.step.cpu())
    for group in ("C", "lam", "A"):
        for x, y in zip(getattr(a, group), getattr(b, group), strict=True):
            torch.testing.assert_close(x.cpu(), y.cpu(), **TOL[dtype])


def _assert_avg_close(a: seg.PhaseAverages, b: seg.PhaseAverages, dtype):
    for x, y in zip(a.tensors(), b.tensors(), strict=True):
        torch.testing.assert_close(x.cpu(), y.cpu(), **TOL[dtype])


CONFIGS = {
    "default": dict(),
    "rate_mode": dict(conductances=False, spiking_feedforward=False, spiking_feedback=False,
                      taps=1, window=1),
    "layerwise_two_hidden": dict(broadcast=False),
    "rate_feedback": dict(spiking_feedback=False),
    "rate_feedforward": dict(spiking_feedforward=False),
    "apical_soma_bias": dict(g_A=0.05, apical_soma=True, feedback_bias=True),
    "steady_state_apical": dict(conductances=False, g_A=0.05, apical_soma=True),
    "random_plateaus": dict(random_plateaus=True),
    "paper_window": dict(window=-30),
}


def _params(name, sizes):
    opts = dict(forward_steps=36, target_steps=36, window=12)  # shorter phases: faster tests
    opts.update(CONFIGS[name])
    if name == "layerwise_two_hidden":
        sizes = (sizes[0], sizes[1], 7, sizes[-1])
    return seg.SimParams(sizes=sizes, **opts)


# ---- fused training example and test procedure -----------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("config", list(CONFIGS))
def test_train_example_matches_reference(device, config):
    dtype = torch.float64
    p = _params(config, (30, 12, 5))
    B = 3
    W, b, Y, c = _net(p.sizes, dtype, device, broadcast=p.broadcast, bias=p.feedback_bias)
    x = _inputs(B, p.sizes[0], dtype, device)
    target = torch.nn.functional.one_hot(torch.tensor([0, 3, 4]), p.sizes[-1]).to(dtype).to(device)
    keys = torch.tensor([0, 1, 7], device=device)
    lengths = torch.tensor([[p.forward_steps + 2, p.target_steps], [p.forward_steps, 47],
                            [p.forward_steps + 9, p.target_steps + 1]], device=device)
    if config == "rate_mode":
        lengths = torch.full((B, 2), 2, device=device)
    windows = p.windows(lengths)
    offsets = None
    if p.random_plateaus:
        offsets = [torch.stack([seg.plateau_offsets(torch.arange(B), m, p.sizes[m + 1], ph, 3)
                                for ph in (0, 1)], 1).to(device) for m in range(p.n_hidden)]
    ref = seg.LaneState.zeros(B, p, dtype, device)
    ker = seg.LaneState.zeros(B, p, dtype, device)
    for _example in range(2):  # the second example starts from the state the first left
        a_ref = seg.simulate_training_example(W, b, Y, c, ref, x, target, lengths, windows,
                                              offsets, 11, keys, p)
        a_ker = ops.segregated_train_example(W, b, Y, c, ker, x, target, lengths, windows,
                                             offsets, 11, keys, p)
        _assert_state_equal(ref, ker, dtype)
        _assert_avg_close(a_ref, a_ker, dtype)
    assert int(ker.rings[0].abs().sum()) > 0 or not p.spiking_feedforward  # spikes happened


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_train_example_float_dtypes(device, dtype):
    p = seg.SimParams(sizes=(40, 16, 4), forward_steps=30, target_steps=30)
    W, b, Y, c = _net(p.sizes, dtype, device)
    x = _inputs(4, 40, dtype, device)
    target = torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 3]), 4).to(dtype).to(device)
    lengths = torch.full((4, 2), 30, device=device)
    keys = torch.arange(4, device=device)
    ref = seg.LaneState.zeros(4, p, dtype, device)
    ker = seg.LaneState.zeros(4, p, dtype, device)
    a = seg.simulate_training_example(W, b, Y, c, ref, x, target, lengths, p.windows(lengths),
                                      None, 5, keys, p)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # lanes handed to two workers: the result must not change
    try:
        k = ops.segregated_train_example(W, b, Y, c, ker, x, target, lengths, p.windows(lengths),
                                         None, 5, keys, p)
    finally:
        torch.set_num_threads(threads)
    _assert_state_equal(ref, ker, dtype)
    _assert_avg_close(a, k, dtype)


def _two_examples_and_a_test(p, x, target, lengths, seed, test_seed, dtype, check_state=True):
    """Two training examples (the second from the state the first left) and a test through the
    kernels and the reference on the CPU, compared; returns the kernels' lane state."""
    B = x.shape[0]
    W, b, Y, c = _net(p.sizes, dtype, "cpu")
    keys = torch.arange(B)
    ref = seg.LaneState.zeros(B, p, dtype, "cpu")
    ker = seg.LaneState.zeros(B, p, dtype, "cpu")
    for _example in range(2):
        a = seg.simulate_training_example(W, b, Y, c, ref, x, target, lengths,
                                          p.windows(lengths), None, seed, keys, p)
        k = ops.segregated_train_example(W, b, Y, c, ker, x, target, lengths, p.windows(lengths),
                                         None, seed, keys, p)
        if check_state:
            _assert_state_equal(ref, ker, dtype)
        _assert_avg_close(a, k, dtype)
    torch.testing.assert_close(ops.segregated_test(W, b, Y, c, x, test_seed, keys, p),
                               seg.simulate_test(W, b, Y, c, x, test_seed, keys, p, dtype),
                               **TOL[dtype])
    return ker


@pytest.mark.parametrize("isa", ["base", "avx2", "avx512"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_cpu_instruction_set_matches_reference(monkeypatch, isa, dtype):
    """The CPU kernels are compiled for x86-64, AVX2 and AVX-512 and pick the widest the CPU has;
    BPDL_CPU_ISA caps the choice, so each path is compared with the reference here (a cap above
    what the CPU has runs the widest available path). Layers of 70 and 37 units cover the
    vector groups of 16 and 8 and the scalar remainders; rates up to 1.5 spikes per step make
    draws of two and more spikes and the exact inversion common."""
    monkeypatch.setenv("BPDL_CPU_ISA", isa)
    p = seg.SimParams(sizes=(100, 70, 37, 10), forward_steps=30, target_steps=30, window=10,
                      lambda_max=1.5, test_steps=40, test_window=20)
    x = _inputs(4, p.sizes[0], dtype, "cpu") * 7.5
    target = torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 9]), 10).to(dtype)
    lengths = torch.tensor([[30, 30], [31, 33], [35, 30], [30, 41]])
    ker = _two_examples_and_a_test(p, x, target, lengths, 9, 4, dtype)
    assert int((ker.rings[0] >= 3).sum()) > 0  # many-spike draws happened


@pytest.mark.parametrize("isa", ["base", "avx2", "avx512"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_cpu_instruction_set_matches_reference_in_rate_mode(monkeypatch, isa, dtype):
    """Rate mode's first-layer drive (from W_0^T over the nonzero inputs, four rows per pass)
    and the upper layers' matrix-vector products (vector partial sums) on each instruction set:
    101 inputs, half of them zero, and layers of 70 and 37 units leave remainders everywhere."""
    monkeypatch.setenv("BPDL_CPU_ISA", isa)
    p = seg.SimParams(sizes=(101, 70, 37, 10), **CONFIGS["rate_mode"])
    x = _inputs(3, p.sizes[0], dtype, "cpu")
    target = torch.nn.functional.one_hot(torch.tensor([0, 4, 9]), 10).to(dtype)
    _two_examples_and_a_test(p, x, target, torch.full((3, 2), 2), 3, 2, dtype,
                             check_state=False)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("config", ["default", "rate_mode", "apical_soma_bias", "layerwise_two_hidden"])
def test_test_procedure_matches_reference(device, config):
    dtype = torch.float64
    p = _params(config, (30, 12, 5))
    p = seg.SimParams(**{**p.as_dict(), "test_steps": 60 if config != "rate_mode" else 2,
                         "test_window": 30 if config != "rate_mode" else 1})
    W, b, Y, c = _net(p.sizes, dtype, device, broadcast=p.broadcast, bias=p.feedback_bias)
    x = _inputs(5, p.sizes[0], dtype, device)
    keys = torch.arange(5, device=device)
    ref = seg.simulate_test(W, b, Y, c, x, 3, keys, p, dtype)
    ker = ops.segregated_test(W, b, Y, c, x, 3, keys, p)
    torch.testing.assert_close(ker.cpu(), ref.cpu(), **TOL[dtype])
    assert ker.shape == (5, p.sizes[-1])


def test_empty_batch():
    p = seg.SimParams(sizes=(8, 4, 2))
    W, b, Y, c = _net(p.sizes, torch.float32, "cpu")
    state = seg.LaneState.zeros(0, p)
    avg = ops.segregated_train_example(W, b, Y, c, state, torch.zeros(0, 8), torch.zeros(0, 2),
                                       torch.zeros(0, 2, dtype=torch.int64),
                                       torch.zeros(0, 2, dtype=torch.int64), None, 0,
                                       torch.zeros(0, dtype=torch.int64), p)
    assert avg.C_f[0].shape == (0, 4)
    assert ops.segregated_test(W, b, Y, c, torch.zeros(0, 8), 0, torch.zeros(0, dtype=torch.int64),
                               p).shape == (0, 2)


# ---- one layer step, sparse basal input, plasticity -------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layer", ["hidden_spiking", "hidden_rates", "output_forward",
                                   "output_target", "hidden_steady_state"])
def test_layer_step_matches_reference(device, dtype, layer):
    g = torch.Generator().manual_seed(3)
    B, n_in, n, n_fb, T = 4, 20, 9, 5, 10
    hidden = layer.startswith("hidden")
    p = seg.SimParams(sizes=(n_in, n, n_fb), conductances=layer != "hidden_steady_state",
                      g_A=0.05, apical_soma=True)
    W = torch.randn(n, n_in, generator=g, dtype=torch.float64).to(dtype).to(device)
    b = torch.randn(n, generator=g, dtype=torch.float64).to(dtype).to(device)
    Y = torch.randn(n, n_fb, generator=g, dtype=torch.float64).to(dtype).to(device)
    c = torch.randn(n, generator=g, dtype=torch.float64).to(dtype).to(device)
    if layer == "hidden_rates":
        ff = torch.rand(B, n_in, generator=g, dtype=torch.float64).to(dtype).to(device)
        fb = (0.2 * torch.rand(B, n_fb, generator=g, dtype=torch.float64)).to(dtype).to(device)
    else:
        ff = torch.randint(0, 3, (B, T, n_in), generator=g, dtype=torch.int8).to(device)
        fb = torch.randint(0, 2, (B, T, n_fb), generator=g, dtype=torch.int8).to(device)
    teach = None
    if layer == "output_target":
        teach = torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 8]), n).to(dtype).to(device)
    step = torch.tensor([0, 5, 13, 29], device=device)
    keys = torch.tensor([0, 1, 2, 40], device=device)
    acc = torch.tensor([True, False, True, True], device=device)

    def state():
        s = torch.Generator().manual_seed(9)
        return dict(C=torch.randn(B, n, generator=s, dtype=torch.float64).to(dtype).to(device),
                    lam=torch.zeros(B, n, dtype=dtype, device=device),
                    A=torch.zeros(B, n, dtype=dtype, device=device) if hidden else None,
                    ring=torch.zeros(B, T, n, dtype=torch.int8, device=device),
                    sums=torch.zeros(B, 3 if hidden else 2, n, dtype=dtype, device=device),
                    psp_sum=torch.zeros(B, n_in, dtype=dtype, device=device),
                    fb_sum=torch.zeros(B, n_fb, dtype=dtype, device=device) if hidden else None)

    kappa = seg.psp_kernel(T).to(dtype).to(device)
    r, k = state(), state()
    args = dict(Y=Y if hidden else None, c=c if hidden else None, fb=fb if hidden else None,
                kappa=kappa, teach=teach, step=step, lane_key=keys, accumulate=acc, seed=21, pop=2)
    basal_ref = seg.layer_step(W, b, args["Y"], args["c"], ff, args["fb"], kappa, teach,
                               r["C"], r["lam"], r["A"], r["ring"], r["sums"], r["psp_sum"],
                               r["fb_sum"], step, keys, acc, 21, 2, p, hidden)
    basal_ker = ops.segregated_layer_step(W, b, args["Y"], args["c"], ff, args["fb"], kappa, teach,
                                          k["C"], k["lam"], k["A"], k["ring"], k["sums"],
                                          k["psp_sum"], k["fb_sum"], step, keys, acc, 21, 2, p)
    torch.testing.assert_close(basal_ker, basal_ref, **TOL[dtype])
    assert torch.equal(k["ring"].cpu(), r["ring"].cpu())
    assert int(k["ring"].abs().sum()) > 0
    for name in ("C", "lam", "A", "sums", "psp_sum", "fb_sum"):
        if r[name] is not None:
            torch.testing.assert_close(k[name], r[name], **TOL[dtype])
    assert float(k["sums"][1].abs().sum()) == 0.0  # lane 1 did not accumulate


@pytest.mark.parametrize("device", DEVICES)
def test_layer_step_opcheck(device):
    g = torch.Generator().manual_seed(0)
    B, n_in, n, n_fb, T = 2, 6, 4, 3, 10
    p = seg.SimParams(sizes=(n_in, n, n_fb))
    values, flags = _seg_lists(p)
    args = (torch.randn(n, n_in, generator=g).to(device), torch.randn(n, generator=g).to(device),
            torch.randn(n, n_fb, generator=g).to(device), None,
            torch.randint(0, 2, (B, T, n_in), generator=g, dtype=torch.int8).to(device),
            torch.randint(0, 2, (B, T, n_fb), generator=g, dtype=torch.int8).to(device),
            seg.psp_kernel().float().to(device), None,
            torch.randn(B, n, generator=g).to(device), torch.zeros(B, n, device=device),
            torch.zeros(B, n, device=device), torch.zeros(B, T, n, dtype=torch.int8, device=device),
            torch.zeros(B, 3, n, device=device), torch.zeros(B, n_in, device=device),
            torch.zeros(B, n_fb, device=device), torch.tensor([3, 4], device=device),
            torch.tensor([0, 1], device=device), torch.tensor([True, True], device=device), 5, 1,
            values, flags + [1])
    torch.library.opcheck(torch.ops.bpdl.segregated_layer_step.default, args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sparse_basal_is_exact_on_dyadic_values(device, dtype):
    g = torch.Generator().manual_seed(2)
    B, T, n_in, n = 3, 10, 50, 17
    # multiples of 2^-6 with small counts: every partial sum is exact, so any summation order
    # gives the same bits
    W_t = (torch.randint(-64, 64, (n_in, n), generator=g) / 64.0).to(dtype).to(device)
    b = (torch.randint(-64, 64, (n,), generator=g) / 64.0).to(dtype).to(device)
    kappa = (torch.randint(1, 16, (T,), generator=g) / 16.0).to(dtype).to(device)
    ring = torch.randint(0, 3, (B, T, n_in), generator=g, dtype=torch.int8)
    ring[ring > 0] = torch.randint(1, 3, (int((ring > 0).sum()),), generator=g, dtype=torch.int8)
    ring = ring * (torch.rand(B, T, n_in, generator=g) < 0.1)
    ring = ring.to(device)
    step = torch.tensor([0, 4, 123], device=device)
    got = ops.segregated_sparse_basal(W_t, b, ring, step, kappa)
    ref = seg.sparse_basal(W_t, b, ring, step, kappa)
    dense = seg.psp(ring, step, kappa) @ W_t + b
    assert torch.equal(got, ref)
    assert torch.equal(got, dense)


@pytest.mark.parametrize("device", DEVICES)
def test_sparse_basal_general_values_and_opcheck(device):
    g = torch.Generator().manual_seed(4)
    B, T, n_in, n = 4, 10, 200, 33
    W_t = torch.randn(n_in, n, generator=g).to(device)
    b = torch.randn(n, generator=g).to(device)
    ring = (torch.randint(0, 2, (B, T, n_in), generator=g, dtype=torch.int8)
            * (torch.rand(B, T, n_in, generator=g) < 0.05)).to(device)
    step = torch.tensor([1, 2, 3, 4], device=device)
    kappa = seg.psp_kernel().float().to(device)
    got = ops.segregated_sparse_basal(W_t, b, ring, step, kappa)
    dense = seg.psp(ring, step, kappa) @ W_t + b
    torch.testing.assert_close(got, dense, rtol=1e-5, atol=1e-5)
    torch.library.opcheck(torch.ops.bpdl.segregated_sparse_basal.default,
                          (W_t, b, ring, step, kappa))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", [seg.KIND_OUTPUT, seg.KIND_HIDDEN, seg.KIND_BACKPROP])
@pytest.mark.parametrize("learned_feedback", [False, True])
def test_plasticity_matches_reference(device, kind, learned_feedback):
    g = torch.Generator().manual_seed(kind)
    B, n, n_in, n_fb = 5, 7, 11, 3
    dtype = torch.float64

    def r(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g, dtype=dtype)).to(device)

    C_f, P_f, a, b = r(B, n), r(B, n_in, scale=0.1).abs(), r(B, n), r(B, n)
    if kind == seg.KIND_OUTPUT:
        a = a.abs() * 0.1
    b = b if kind == seg.KIND_HIDDEN else None
    A_f, Q_f = (r(B, n), r(B, n_fb).abs()) if learned_feedback else (None, None)
    args = (kind, C_f, P_f, a, b, 0.2, 0.857, -100.0)
    kw = dict(A_f=A_f, Q_f=Q_f, fb_gain=0.2, fb_scale=-1.0)
    ref = seg.plasticity(*args, **kw)
    got = ops.segregated_plasticity(*args, **kw)
    for x, y in zip(got, ref, strict=True):
        if y is None:
            assert x is None
        else:
            torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)
    # hand check of one element of the output rule
    if kind == seg.KIND_OUTPUT:
        s = 1 / (1 + math.exp(-float(C_f[0, 0])))
        e = (float(a[0, 0]) - 0.2 * s) * s * (1 - s) * 0.857 * 0.2
        assert float(got[0][0, 0]) == pytest.approx(e, rel=1e-12)
        gw = -100.0 * sum(float(got[0][i, 0]) * float(P_f[i, 2]) for i in range(B))
        assert float(got[1][0, 2]) == pytest.approx(gw, rel=1e-10)
    optional = (None, None) if not learned_feedback else (A_f, Q_f)
    torch.library.opcheck(torch.ops.bpdl.segregated_plasticity.default,
                          (kind, C_f, P_f, a, b, *optional, 0.2, 0.857, -100.0, 0.2, -1.0))


@pytest.mark.parametrize("device", DEVICES)
def test_train_and_test_opcheck(device):
    p = seg.SimParams(sizes=(12, 6, 3), forward_steps=25, target_steps=25, window=5,
                      test_steps=20, test_window=8)
    W, b, Y, c = _net(p.sizes, torch.float32, device)
    B = 2
    x = _inputs(B, 12, torch.float32, device)
    state = seg.LaneState.zeros(B, p, torch.float32, device)
    values, flags = _seg_lists(p)
    need = [int(v) for v in p.spiking_populations(True)]
    lengths = torch.full((B, 2), 25, device=device)
    args = (W, b, Y, [], x, torch.zeros(B, 3, device=device), p.kappa(torch.float32, device),
            state.in_ring, state.rings, state.C, state.lam, state.A, state.step,
            torch.arange(B, device=device), lengths, p.windows(lengths), [], 3, values, flags,
            need, need)
    # AOT functionalization does not support custom ops that mutate lists of tensors (the lanes'
    # per-layer state), so that one utility is left out for the training op
    torch.library.opcheck(torch.ops.bpdl.segregated_train_example.default, args,
                          test_utils=("test_schema", "test_autograd_registration",
                                      "test_faketensor"))
    torch.library.opcheck(torch.ops.bpdl.segregated_test.default,
                          (W, b, Y, [], x, p.kappa(torch.float32, device),
                           torch.arange(B, device=device), 3, 20, 8, values, flags, need))


def test_fake_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    p = seg.SimParams(sizes=(12, 6, 3))
    values, flags = _seg_lists(p)
    with FakeTensorMode():
        W = [torch.empty(6, 12), torch.empty(3, 6)]
        b = [torch.empty(6), torch.empty(3)]
        Y = [torch.empty(6, 3)]
        out = torch.ops.bpdl.segregated_test(W, b, Y, [], torch.empty(5, 12), torch.empty(10),
                                             torch.empty(5, dtype=torch.int64), 0, 20, 8, values,
                                             flags, [1, 1, 0])
        assert out.shape == (5, 3)
        e, gW, gb, gY, gc = torch.ops.bpdl.segregated_plasticity(
            1, torch.empty(4, 6), torch.empty(4, 12), torch.empty(4, 6), torch.empty(4, 6), None,
            None, 0.2, 0.8, -1.0, 1.0, -1.0)
        assert gW.shape == (6, 12) and gb.shape == (6,) and gY.shape == (0,)


# ---- argument errors -----------------------------------------------------------------------------------

def test_kernel_rejects_inconsistent_shapes():
    p = seg.SimParams(sizes=(12, 6, 3))
    W, b, Y, c = _net(p.sizes, torch.float32, "cpu")
    x = _inputs(2, 12, torch.float32, "cpu")
    state = seg.LaneState.zeros(2, p)
    lengths = torch.full((2, 2), 50)
    bad_W = [W[0], torch.zeros(3, 5)]
    with pytest.raises(RuntimeError, match="inconsistent layer sizes"):
        ops.segregated_train_example(bad_W, b, Y, c, state, x, torch.zeros(2, 3), lengths,
                                     p.windows(lengths), None, 0, torch.arange(2), p)
    with pytest.raises(RuntimeError, match="at least as long as its averaging window"):
        short = torch.full((2, 2), 10)
        ops.segregated_train_example(W, b, Y, c, state, x, torch.zeros(2, 3), short,
                                     torch.full((2, 2), 20), None, 0, torch.arange(2), p)
    with pytest.raises(RuntimeError, match="Y\\[0\\] must be"):
        ops.segregated_train_example(W, b, [torch.zeros(6, 4)], c, state, x, torch.zeros(2, 3),
                                     lengths, p.windows(lengths), None, 0, torch.arange(2), p)
    with pytest.raises(ValueError, match="NaN"):
        ops.segregated_test(W, b, Y, c, torch.full((2, 12), float("nan")), 0, torch.arange(2), p)
    with pytest.raises(ValueError, match="must lie in"):
        ops.segregated_test(W, b, Y, c, -x - 0.1, 0, torch.arange(2), p)
    with pytest.raises(RuntimeError, match="state tensor"):
        noncontig = seg.LaneState.zeros(2, p)
        noncontig.C[0] = torch.zeros(6, 2).t()
        ops.segregated_train_example(W, b, Y, c, noncontig, x, torch.zeros(2, 3), lengths,
                                     p.windows(lengths), None, 0, torch.arange(2), p)
    with pytest.raises(TypeError, match="int8"):
        ops.segregated_sparse_basal(W[0].t(), b[0], torch.zeros(2, 10, 12), torch.arange(2),
                                    seg.psp_kernel())
