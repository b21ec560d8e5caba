"""Microcircuit ops (docs/algorithms/microcircuits.md §6.1-6.2): the fused full dynamics
``bpdl::microcircuit_run`` against the pure-PyTorch reference ``full_run`` with the same Philox
numbers (states, weights and traces equal to rounding) on every CPU instruction set and, as marked
parameters, CUDA; the reference's noise and one step checked by hand; threads, split calls and
``apply_last``; opcheck, the fake registration and argument errors."""

from __future__ import annotations

import math

import pytest
import torch
from bpdl import ops
from bpdl.errors import ConfigError
from bpdl.functional import microcircuit as mc
from bpdl.functional import random as R
from conftest import DEVICES

TOL = {torch.float64: dict(rtol=1e-11, atol=1e-12), torch.float32: dict(rtol=2e-5, atol=2e-5)}
ALL_PLASTIC = ("W", "b", "W_pi", "W_ip", "b_ip")

# many small simulation steps: one torch thread (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---- fixtures ----------------------------------------------------------------------------------

def _uniform(g, *shape, scale=1.0):
    return (torch.rand(*shape, generator=g, dtype=torch.float64) * 2 - 1) * scale


def _net(sizes, dtype, device, seed=0, scale=2.0):
    """Random weights large enough that the rates spread over the transfer function."""
    g = torch.Generator().manual_seed(seed)
    N = len(sizes) - 1

    def conv(ts):
        return [t.to(dtype=dtype, device=device) for t in ts]

    return mc.MicroWeights(
        conv([_uniform(g, sizes[k], sizes[k - 1], scale=scale / math.sqrt(sizes[k - 1]))
              for k in range(1, N + 1)]),
        conv([_uniform(g, sizes[k], scale=0.5) for k in range(1, N + 1)]),
        conv([_uniform(g, sizes[k], sizes[k + 1]) for k in range(1, N)]),
        conv([_uniform(g, sizes[k], sizes[k + 1]) for k in range(1, N)]),
        conv([_uniform(g, sizes[k + 1], sizes[k], scale=scale / math.sqrt(sizes[k]))
              for k in range(1, N)]),
        conv([_uniform(g, sizes[k + 1], scale=0.5) for k in range(1, N)]))


def _traces(w, plastic, seed=1):
    """Non-zero traces for the matrices in ``plastic`` (a family name, or (family, index))."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for family, tensors in w.named().items():
        entries = []
        for i, t in enumerate(tensors):
            on = family in plastic or (family, i) in plastic
            entries.append(_uniform(g, *t.shape, scale=0.05).to(t) if on else None)
        if any(e is not None for e in entries):
            out[family] = entries
    return out


def _etas(w):
    return {family: [0.3 + 0.1 * i for i in range(len(ts))] for family, ts in w.named().items()}


def _state(lanes, sizes, dtype, device, seed=2):
    g = torch.Generator().manual_seed(seed)
    N = len(sizes) - 1
    return mc.MicroState(
        [_uniform(g, lanes, sizes[k], scale=2.0).to(dtype=dtype, device=device)
         for k in range(1, N + 1)],
        [_uniform(g, lanes, sizes[k + 1], scale=2.0).to(dtype=dtype, device=device)
         for k in range(1, N)],
        _uniform(g, lanes, sizes[0]).abs().to(dtype=dtype, device=device))


def _inputs(lanes, sizes, dtype, device, seed=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(lanes, sizes[0], generator=g, dtype=torch.float64)
    u_trgt = _uniform(g, lanes, sizes[-1], scale=2.5)
    return x.to(dtype=dtype, device=device), u_trgt.to(dtype=dtype, device=device)


def _clone_weights(w):
    return mc.MicroWeights(*[[t.clone() for t in ts] for ts in w.named().values()])


def _clone_traces(traces):
    return {k: [None if t is None else t.clone() for t in v] for k, v in traces.items()}


def _assert_close(a, b, dtype, exact=False):
    for x, y in zip(a, b, strict=True):
        if x is None:
            assert y is None
            continue
        if exact:
            assert torch.equal(x.cpu(), y.cpu())
        else:
            torch.testing.assert_close(x.cpu(), y.cpu(), **TOL[dtype])


def _everything(w, traces, state):
    return ([t for ts in w.named().values() for t in ts]
            + [t for ts in traces.values() for t in ts] + state.tensors())


#: Each case names its sizes, lanes, teacher, noise, plastic matrices, last-step rule, first step,
#: transfer and constants; together they cover one and several lanes, two to four weight layers,
#: vector and lane-tile remainders, fixed matrices, empty lanes and both transfers.
CASES = {
    "base": dict(sizes=(12, 8, 6, 4), lanes=3),
    "one_lane_no_teacher_no_noise": dict(sizes=(10, 7, 3), lanes=1, teacher=False, sigma=0.0),
    "some_fixed_apply_last_false_step0": dict(
        sizes=(12, 8, 6, 4), lanes=4, plastic=("b", ("W", 0), ("W_ip", 1), "W_pi"),
        apply_last=False, step0=700),
    "soft_relu": dict(sizes=(10, 7, 3), lanes=2, transfer="soft_relu", sigma=0.3,
                      params=dict(gamma=0.5, beta=8.0, theta=0.2)),  # beta (u - theta) > 20 too
    "deep": dict(sizes=(9, 7, 6, 5, 3), lanes=5, sigma=0.2),
    "wide_tails": dict(sizes=(40, 37, 19, 5), lanes=6, steps=15),
    "no_lanes": dict(sizes=(12, 8, 6, 4), lanes=0),
}


def _run_case(case, dtype, device):
    c = {"teacher": True, "sigma": 0.1, "plastic": ALL_PLASTIC, "apply_last": True, "step0": 0,
         "transfer": "logistic", "params": {}, "steps": 20, **CASES[case]}
    sizes, B = c["sizes"], c["lanes"]
    p = mc.MicroParams(sizes, transfer=c["transfer"], sigma=c["sigma"], **c["params"])
    w = _net(sizes, dtype, device)
    traces = _traces(w, c["plastic"])
    state = _state(B, sizes, dtype, device)
    x, u_trgt = _inputs(B, sizes, dtype, device)
    u_trgt = u_trgt if c["teacher"] else None
    example = torch.arange(B, device=device) * 3 + 5
    w_k, t_k, s_k = _clone_weights(w), _clone_traces(traces), state.clone()
    args = (x, u_trgt, p, _etas(w), example, c["step0"], c["steps"], 17)
    mc.full_run(w, traces, state, *args, apply_last=c["apply_last"])
    ops.microcircuit_run(w_k, t_k, s_k, *args, apply_last=c["apply_last"])
    return (w, traces, state), (w_k, t_k, s_k)


# ---- the reference checked by hand --------------------------------------------------------------

def test_noise_is_box_muller_on_the_documented_philox_words():
    seed, step, pop = (5 << 32) + 123, 77, 3
    example = torch.tensor([4, 2**32 + 9])  # the example counts modulo 2^32
    z = mc.noise(example, 5, step, pop, seed)
    assert z.shape == (2, 5) and z.dtype == torch.float64
    for b, ex in enumerate((4, 9)):
        for j in (0, 3, 4):
            words = R.philox4x32_10(*[torch.tensor([v]) for v in (
                j // 2, ex, step, mc.MICRO_STREAM + pop)], seed & 0xFFFFFFFF, seed >> 32)
            u = [(int(w) + 0.5) * 2.0**-32 for w in words]
            w0, w1 = (u[0], u[1]) if j % 2 == 0 else (u[2], u[3])
            expected = math.sqrt(-2 * math.log(w0)) * math.cos(2 * math.pi * w1)
            assert float(z[b, j]) == pytest.approx(expected, rel=1e-13, abs=1e-15)
    # standard normals
    big = mc.noise(torch.arange(400), 250, 3, 1, 9)
    assert abs(float(big.mean())) < 0.01 and float(big.std()) == pytest.approx(1.0, abs=0.01)


def test_one_reference_step_by_hand():
    """2-1-1 network, one lane, sigma = 0, W and b plastic: every quantity of the step."""
    p = mc.MicroParams((2, 1, 1), sigma=0.0)
    w = mc.MicroWeights([torch.tensor([[0.5, -1.0]], dtype=torch.float64),
                         torch.tensor([[2.0]], dtype=torch.float64)],
                        [torch.tensor([0.1], dtype=torch.float64),
                         torch.tensor([-0.2], dtype=torch.float64)],
                        [torch.tensor([[0.7]], dtype=torch.float64)],
                        [torch.tensor([[-0.4]], dtype=torch.float64)],
                        [torch.tensor([[1.5]], dtype=torch.float64)],
                        [torch.tensor([0.3], dtype=torch.float64)])
    T_W = torch.tensor([[0.01, 0.02]], dtype=torch.float64)
    state = mc.MicroState([torch.tensor([[0.4]], dtype=torch.float64),
                           torch.tensor([[-0.6]], dtype=torch.float64)],
                          [torch.tensor([[0.2]], dtype=torch.float64)],
                          torch.tensor([[0.3, 0.9]], dtype=torch.float64))
    x = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    u_trgt = torch.tensor([[1.2]], dtype=torch.float64)
    mc.full_step(w, {"W": [T_W, None]}, state, x, u_trgt, p, {"W": [0.5, 0.0]},
                 torch.tensor([0]), 0, 1)

    def s(v):
        return 1 / (1 + math.exp(-v))

    r0, r1, r2, rI = (0.3, 0.9), s(0.4), s(-0.6), s(0.2)
    vB1 = 0.5 * 0.3 - 1.0 * 0.9 + 0.1
    vB2 = 2.0 * r1 - 0.2
    vA1 = 0.7 * r2 - 0.4 * rI
    vI = 1.5 * r1 + 0.3
    e1 = r1 - s(1.0 / 1.9 * vB1)
    a = 0.1 / 30
    T_new = [(1 - a) * t + a * e1 * r for t, r in zip((0.01, 0.02), r0, strict=True)]
    W_new = [wv + 0.1 * 0.5 * t for wv, t in zip((0.5, -1.0), T_new, strict=True)]
    assert T_W.flatten().tolist() == pytest.approx(T_new, rel=1e-14)
    assert w.W[0].flatten().tolist() == pytest.approx(W_new, rel=1e-14)
    u1 = 0.4 + 0.1 * (-0.1 * 0.4 + 1.0 * (vB1 - 0.4) + 0.8 * (vA1 - 0.4))
    u2 = -0.6 + 0.1 * (-0.1 * -0.6 + 1.0 * (vB2 + 0.6) + 0.8 * (1.2 + 0.6))
    uI = 0.2 + 0.1 * (-0.1 * 0.2 + 1.0 * (vI - 0.2) + 0.8 * (-0.6 - 0.2))
    assert float(state.u[0]) == pytest.approx(u1, rel=1e-14)
    assert float(state.u[1]) == pytest.approx(u2, rel=1e-14)
    assert float(state.u_I[0]) == pytest.approx(uI, rel=1e-14)
    assert state.r0.flatten().tolist() == pytest.approx([0.3 + 0.1 / 3 * 0.7, 0.9 - 0.1 / 3 * 0.9],
                                                        rel=1e-14)


# ---- kernel against reference -------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", list(CASES))
def test_kernel_matches_reference(device, dtype, case):
    (w, traces, state), (w_k, t_k, s_k) = _run_case(case, dtype, device)
    _assert_close(_everything(w, traces, state), _everything(w_k, t_k, s_k), dtype)
    if case != "no_lanes":  # the state moved
        assert not torch.equal(state.u[0], _state(CASES[case]["lanes"], CASES[case]["sizes"],
                                                  dtype, device).u[0])
    # the fixed matrices stayed
    fresh = _net(CASES[case]["sizes"], dtype, device)
    for family, tensors in w_k.named().items():
        for i, t in enumerate(tensors):
            if traces.get(family, [None] * len(tensors))[i] is None:
                assert torch.equal(t, fresh.named()[family][i]), (family, i)


@pytest.mark.parametrize("isa", ["base", "avx2", "avx512"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("transfer", ["logistic", "soft_relu"])
def test_every_cpu_instruction_set_matches_reference(monkeypatch, isa, dtype, transfer):
    """The CPU loops are compiled for x86-64, AVX2 and AVX-512 and the widest the CPU has runs;
    BPDL_CPU_ISA caps the choice, so each path is compared with the reference (a cap above what
    the CPU has runs the widest available path). 5 lanes cover the lane tiles of 4 and 2 and
    their remainders; 37 and 19 neurons the blocks of 16 and the vector remainders."""
    monkeypatch.setenv("BPDL_CPU_ISA", isa)
    sizes, B = (37, 19, 10, 3), 5
    p = mc.MicroParams(sizes, transfer=transfer, sigma=0.2, beta=6.0, theta=0.3)
    w = _net(sizes, dtype, "cpu")
    traces = _traces(w, ALL_PLASTIC)
    state = _state(B, sizes, dtype, "cpu")
    x, u_trgt = _inputs(B, sizes, dtype, "cpu")
    w_k, t_k, s_k = _clone_weights(w), _clone_traces(traces), state.clone()
    args = (x, u_trgt, p, _etas(w), torch.arange(B), 3, 12, 99)
    mc.full_run(w, traces, state, *args)
    ops.microcircuit_run(w_k, t_k, s_k, *args)
    _assert_close(_everything(w, traces, state), _everything(w_k, t_k, s_k), dtype)


def test_result_does_not_depend_on_threads():
    """Every block computes the same arithmetic whichever worker runs it."""
    sizes, B = (50, 40, 20, 6), 4
    p = mc.MicroParams(sizes)
    w = _net(sizes, torch.float32, "cpu")
    traces = _traces(w, ALL_PLASTIC)
    state = _state(B, sizes, torch.float32, "cpu")
    x, u_trgt = _inputs(B, sizes, torch.float32, "cpu")
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            w_k, t_k, s_k = _clone_weights(w), _clone_traces(traces), state.clone()
            ops.microcircuit_run(w_k, t_k, s_k, x, u_trgt, p, _etas(w), torch.arange(B), 0, 30, 4)
            results.append(_everything(w_k, t_k, s_k))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        _assert_close(results[0], other, torch.float32, exact=True)


def test_steps_split_over_calls_give_the_same_run():
    sizes, B = (12, 8, 6, 4), 3
    p = mc.MicroParams(sizes)
    w = _net(sizes, torch.float64, "cpu")
    traces = _traces(w, ALL_PLASTIC)
    state = _state(B, sizes, torch.float64, "cpu")
    x, u_trgt = _inputs(B, sizes, torch.float64, "cpu")
    example = torch.tensor([3, 1, 4])
    one = (_clone_weights(w), _clone_traces(traces), state.clone())
    ops.microcircuit_run(*one, x, u_trgt, p, _etas(w), example, 10, 20, 8)
    two = (_clone_weights(w), _clone_traces(traces), state.clone())
    ops.microcircuit_run(*two, x, u_trgt, p, _etas(w), example, 10, 13, 8)
    ops.microcircuit_run(*two, x, u_trgt, p, _etas(w), example, 23, 7, 8)
    _assert_close(_everything(*one), _everything(*two), torch.float64, exact=True)


def test_apply_last_false_leaves_the_last_change_to_the_caller():
    sizes, B = (12, 8, 6, 4), 2
    p = mc.MicroParams(sizes)
    w = _net(sizes, torch.float64, "cpu")
    traces = _traces(w, ALL_PLASTIC)
    state = _state(B, sizes, torch.float64, "cpu")
    x, u_trgt = _inputs(B, sizes, torch.float64, "cpu")
    etas = _etas(w)
    runs = {}
    for apply_last in (True, False):
        run = (_clone_weights(w), _clone_traces(traces), state.clone())
        ops.microcircuit_run(*run, x, u_trgt, p, etas, torch.arange(B), 0, 9, 2,
                             apply_last=apply_last)
        runs[apply_last] = run
    (w_t, tr_t, s_t), (w_f, tr_f, s_f) = runs[True], runs[False]
    # the last step's somata came from the weights before its change either way
    _assert_close(s_t.tensors(), s_f.tensors(), torch.float64, exact=True)
    for family, tensors in w_f.named().items():
        for i, t in enumerate(tensors):
            T = traces.get(family, [None] * len(tensors))[i]
            if T is None:
                continue
            assert torch.equal(tr_t[family][i], tr_f[family][i])
            assert not torch.equal(t, w_t.named()[family][i])
            torch.testing.assert_close(t + p.dt * etas[family][i] * tr_f[family][i],
                                       w_t.named()[family][i], **TOL[torch.float64])


def test_sigma_overrides_the_params_and_zero_lanes_still_decay_the_traces():
    sizes = (12, 8, 6, 4)
    p = mc.MicroParams(sizes, sigma=0.5)
    w = _net(sizes, torch.float64, "cpu")
    traces = _traces(w, ALL_PLASTIC)
    state = _state(2, sizes, torch.float64, "cpu")
    x, u_trgt = _inputs(2, sizes, torch.float64, "cpu")
    quiet = (_clone_weights(w), _clone_traces(traces), state.clone())
    ops.microcircuit_run(*quiet, x, u_trgt, p, _etas(w), torch.arange(2), 0, 5, 1, sigma=0.0)
    ref = (_clone_weights(w), _clone_traces(traces), state.clone())
    mc.full_run(*ref, x, u_trgt, mc.MicroParams(sizes, sigma=0.0), _etas(w), torch.arange(2), 0,
                5, 1)
    _assert_close(_everything(*quiet), _everything(*ref), torch.float64)
    # no lanes: T <- (1 - dt / tau_w) T at every step, W follows
    empty = (_clone_weights(w), _clone_traces(traces), _state(0, sizes, torch.float64, "cpu"))
    ops.microcircuit_run(*empty, x[:0], u_trgt[:0], p, _etas(w), torch.arange(0), 0, 3, 1)
    keep = 1 - p.dt / p.tau_w
    torch.testing.assert_close(empty[1]["W"][0], traces["W"][0] * keep**3, **TOL[torch.float64])


# ---- opcheck and fake --------------------------------------------------------------------------

def _flat_args(device, dtype=torch.float32, B=2, sizes=(6, 5, 4, 3)):
    w = _net(sizes, dtype, device)
    traces = _traces(w, ("W", "b_ip", "W_pi"))
    state = _state(B, sizes, dtype, device)
    x, u_trgt = _inputs(B, sizes, dtype, device)
    flat_w, flat_t, flat_eta = [], [], []
    for family, tensors in w.named().items():
        for i, t in enumerate(tensors):
            T = traces.get(family, [None] * len(tensors))[i]
            flat_w.append(t)
            flat_t.append(t.new_empty(0) if T is None else T)
            flat_eta.append(0.0 if T is None else 0.4)
    p = mc.MicroParams(sizes)
    constants = [p.g_lk, p.g_B, p.g_A, p.g_D, p.g_som, p.g_som_I, p.dt, p.tau_w, p.tau_in,
                 p.sigma, p.gamma, p.beta, p.theta]
    return [flat_w, flat_t, state.tensors(), x, u_trgt, torch.arange(B, device=device),
            flat_eta, 0, 5, 3, constants, 0, True]


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    # AOT functionalization does not support custom ops that mutate lists of tensors, so that
    # one utility is left out (as for the segregated training op)
    torch.library.opcheck(torch.ops.bpdl.microcircuit_run.default, _flat_args(device),
                          test_utils=("test_schema", "test_autograd_registration",
                                      "test_faketensor"))


def test_fake_registration_returns_nothing():
    from torch._subclasses.fake_tensor import FakeTensorMode

    args = _flat_args("cpu")
    with FakeTensorMode() as mode:
        fake = [([mode.from_tensor(t) for t in a] if isinstance(a, list) and a and
                 isinstance(a[0], torch.Tensor) else
                 (mode.from_tensor(a) if isinstance(a, torch.Tensor) else a)) for a in args]
        assert torch.ops.bpdl.microcircuit_run(*fake) is None


def test_op_is_exported():
    assert "microcircuit_run" in ops.__all__
    assert "microcircuit_run" in ops.operator_names()
    assert ops.has_kernel("microcircuit_run", "cpu")


# ---- argument errors -------------------------------------------------------------------------------

def _good(sizes=(6, 5, 4, 3), B=2, dtype=torch.float32):
    w = _net(sizes, dtype, "cpu")
    return dict(w=w, traces=_traces(w, ALL_PLASTIC), state=_state(B, sizes, dtype, "cpu"),
                x=_inputs(B, sizes, dtype, "cpu")[0], u_trgt=_inputs(B, sizes, dtype, "cpu")[1],
                p=mc.MicroParams(sizes), etas=_etas(w), example=torch.arange(B), step0=0,
                steps=2, seed=1)


def _bad_cases():
    def with_(**kw):
        return lambda a: a.update(kw)

    def set_weight(family, i, value):
        return lambda a: a["w"].named()[family].__setitem__(i, value(a["w"].named()[family][i]))

    def set_trace(family, i, value):
        return lambda a: a["traces"].setdefault(family, [None] * len(a["w"].named()[family])
                                                ).__setitem__(i, value(a))

    return {
        "wrong weight shape": (set_weight("W", 1, lambda t: torch.zeros(4, 4)),
                               r"w\.W\[1\] must have shape \(4, 5\)"),
        "mixed dtypes": (set_weight("b", 0, lambda t: t.double()), "dtype torch.float64"),
        "non-contiguous weight": (set_weight("W_pi", 0, lambda t: t.t().contiguous().t()),
                                  "must be contiguous"),
        "float16 state": (lambda a: a.update(state=_state(2, (6, 5, 4, 3), torch.float16, "cpu")),
                          "float32 or float64"),
        "x shape": (with_(x=torch.zeros(3, 6)), r"x must have shape \(2, 6\)"),
        "u_trgt shape": (with_(u_trgt=torch.zeros(2, 4)), r"u_trgt must have shape \(2, 3\)"),
        "float example": (with_(example=torch.zeros(2)), "example must be an integer tensor"),
        "example length": (with_(example=torch.arange(3)), "one index per lane"),
        "top-down trace": (set_trace("W_td", 0, lambda a: torch.zeros(5, 4)),
                           "W_td are not plastic"),
        "trace shape": (set_trace("W", 0, lambda a: torch.zeros(5, 5)),
                        r"traces\['W'\]\[0\] must have shape \(5, 6\)"),
        "trace is the weight": (set_trace("b", 0, lambda a: a["w"].b[0]), "is the weight itself"),
        "unknown family": (lambda a: a["traces"].update(W_xx=[None]), "unknown"),
        "missing eta": (lambda a: a["etas"].pop("W_ip"), r"etas\['W_ip'\] must hold"),
        "nan eta": (lambda a: a["etas"]["b"].__setitem__(1, float("nan")), "finite number"),
        "nan constant": (with_(sigma=float("nan")), "sigma must be a finite number"),
        "negative sigma": (with_(sigma=-0.1), "sigma must be >= 0"),
        "zero dt": (lambda a: a.update(p=mc.MicroParams((6, 5, 4, 3), dt=0.0)), "dt must be > 0"),
        "no hidden layer": (lambda a: a.update(p=mc.MicroParams((6, 3))), "at least three"),
        "unknown transfer": (lambda a: a.update(p=mc.MicroParams((6, 5, 4, 3), transfer="relu")),
                             "transfer must be one of"),
        "steps past 2^32": (with_(step0=2**32 - 3, steps=4), r"exceeds 2\^32"),
        "negative seed": (with_(seed=-1), "seed must be an integer"),
        "float steps": (with_(steps=2.0), "steps must be an integer"),
        "state depth": (lambda a: a["state"].u_I.pop(), "2 interneuron tensors"),
        "weights type": (with_(w={"W": []}), "w must be a MicroWeights"),
    }


@pytest.mark.parametrize("name", list(_bad_cases()))
def test_wrapper_rejects_bad_arguments(name):
    mutate, match = _bad_cases()[name]
    args = _good()
    mutate(args)
    apply_last = args.pop("apply_last", True)
    with pytest.raises(ConfigError, match=match):
        ops.microcircuit_run(**args, apply_last=apply_last)


def test_op_rejects_inconsistent_arguments_when_called_directly():
    op = torch.ops.bpdl.microcircuit_run
    args = _flat_args("cpu")
    bad = list(args)
    bad[0] = list(args[0])
    bad[0][1] = torch.zeros(3, 4)
    with pytest.raises(RuntimeError, match="inconsistent layer sizes"):
        op(*bad)
    bad = list(args)
    bad[1] = list(args[1])
    bad[1][6] = torch.zeros(5, 4)  # W_td_1's trace
    with pytest.raises(RuntimeError, match="W_td are not plastic"):
        op(*bad)
    bad = list(args)
    bad[2] = args[2][:-1]
    with pytest.raises(RuntimeError, match="state must hold"):
        op(*bad)
    bad = list(args)
    bad[10] = args[10][:-1]
    with pytest.raises(RuntimeError, match="constants must hold 13"):
        op(*bad)
    bad = list(args)
    bad[7], bad[8] = 2**32 - 1, 2
    with pytest.raises(RuntimeError, match=r"must lie in \[0, 2\^32\)"):
        op(*bad)
    bad = list(args)
    bad[5] = torch.arange(2, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="example must be an int64"):
        op(*bad)


# ---- the NumPy port the benchmark times ---------------------------------------------------------

@pytest.mark.parametrize("transfer", ["logistic", "soft_relu"])
def test_numpy_port_follows_the_reference(transfer):
    """benchmarks/microcircuits.py times a single-example NumPy port: without noise it must
    simulate the same trajectory, weights and traces as the reference (one lane, every matrix
    plastic, from rest), so the speed comparison is between two implementations of one thing."""
    import numpy as np
    from bpdl.functional.microcircuit_numpy import NumpyMicrocircuit

    sizes = (12, 8, 6, 4)
    p = mc.MicroParams(sizes, transfer=transfer, sigma=0.0,
                       **({"gamma": 0.5, "beta": 2.0, "theta": 0.2} if transfer == "soft_relu"
                          else {}))
    w = _net(sizes, torch.float64, "cpu")
    etas = _etas(w)
    etas["W_td"] = [0.0] * len(w.W_td)
    port = NumpyMicrocircuit(w, p, etas)
    traces = {f: [torch.zeros_like(t) for t in ts] for f, ts in w.named().items() if f != "W_td"}
    state = mc.MicroState.zeros(1, p, torch.float64)
    x, u_trgt = _inputs(1, sizes, torch.float64, "cpu")
    mc.full_run(w, traces, state, x, u_trgt, p, etas, torch.zeros(1, dtype=torch.int64), 0, 60, 0)
    port.present(x[0].numpy(), u_trgt[0].numpy(), 60)
    assert float(state.u[0].abs().max()) > 0.1  # it moved
    for mine, theirs in zip(state.u + state.u_I + [state.r0], port.u + port.u_I + [port.r0],
                            strict=True):
        np.testing.assert_allclose(theirs, mine[0].numpy(), rtol=1e-10, atol=1e-12)
    for family, tensors in w.named().items():
        for i, t in enumerate(tensors):
            np.testing.assert_allclose(port.w[family][i], t.numpy(), rtol=1e-10, atol=1e-12)
            if family in traces:
                np.testing.assert_allclose(port.traces[family][i], traces[family][i].numpy(),
                                           rtol=1e-10, atol=1e-12)


def test_cpu_kernel_flushes_subnormals():
    """A dark pixel's input filter decays geometrically into the subnormal range, where every
    operation costs x86 a microcode assist; the CPU kernel flushes subnormals to zero (the
    reference keeps them: the two differ only below the smallest normal number)."""
    sizes = (4, 3, 2)
    p = mc.MicroParams(sizes, sigma=0.0)
    w = _net(sizes, torch.float32, "cpu")
    tiny = torch.finfo(torch.float32).tiny
    state = mc.MicroState.zeros(1, p, torch.float32)
    state.r0.fill_(tiny / 4)  # subnormal
    twin = state.clone()
    x = torch.zeros(1, 4)
    args = (x, None, p, _etas(w), torch.zeros(1, dtype=torch.int64), 0, 1, 0)
    mc.full_run(_clone_weights(w), {}, state, *args)
    ops.microcircuit_run(_clone_weights(w), {}, twin, *args)
    assert 0 < float(state.r0.max()) < tiny  # the reference: still subnormal
    assert float(twin.r0.abs().max()) == 0.0
