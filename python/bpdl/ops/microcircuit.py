"""Dendritic cortical microcircuits, fused (Sacramento, Costa, Bengio & Senn 2018, "S18";
docs/algorithms/microcircuits.md §6.1-6.2). Kernels: csrc/cpu/microcircuit_cpu.cpp and
csrc/cuda/microcircuit_cuda.cu; reference: :func:`bpdl.functional.microcircuit.full_run`."""

from __future__ import annotations

import math
from typing import NoReturn

import torch
from torch import Tensor

from bpdl.errors import ConfigError
from bpdl.functional.microcircuit import TRANSFERS, MicroParams, MicroState, MicroWeights

__all__ = ["microcircuit_run"]

#: The weight families in the kernel's flat order (MicroWeights.named()), and the plastic ones.
FAMILIES = ("W", "b", "W_td", "W_pi", "W_ip", "b_ip")
PLASTIC_FAMILIES = ("W", "b", "W_pi", "W_ip", "b_ip")
_OP = "microcircuit_run"


def _fail(message: str) -> NoReturn:
    raise ConfigError(f"{_OP}: {message}")


def _expected_shapes(sizes: tuple[int, ...]) -> dict[str, list[tuple[int, ...]]]:
    N = len(sizes) - 1
    return {"W": [(sizes[k], sizes[k - 1]) for k in range(1, N + 1)],
            "b": [(sizes[k],) for k in range(1, N + 1)],
            "W_td": [(sizes[k], sizes[k + 1]) for k in range(1, N)],
            "W_pi": [(sizes[k], sizes[k + 1]) for k in range(1, N)],
            "W_ip": [(sizes[k + 1], sizes[k]) for k in range(1, N)],
            "b_ip": [(sizes[k + 1],) for k in range(1, N)]}


def _check_tensor(t, what: str, shape: tuple[int, ...], ref: Tensor, in_place: bool) -> None:
    if not isinstance(t, Tensor):
        _fail(f"{what} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        _fail(f"{what} must have shape {tuple(shape)} for these layer sizes, got {tuple(t.shape)}")
    if t.dtype != ref.dtype:
        _fail(f"{what} has dtype {t.dtype} but the state has {ref.dtype}; use one of float32 "
              f"and float64 for every tensor")
    if t.device != ref.device:
        _fail(f"{what} is on {t.device} but the state is on {ref.device}")
    if in_place and not t.is_contiguous():
        _fail(f"{what} must be contiguous (it is updated in place); pass t.contiguous() and "
              f"keep that tensor")


def _check_number(name: str, value, *, positive: bool = False, nonnegative: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        _fail(f"{name} must be a finite number, got {value!r}")
    if positive and value <= 0:
        _fail(f"{name} must be > 0, got {value!r}")
    if nonnegative and value < 0:
        _fail(f"{name} must be >= 0, got {value!r}")
    return float(value)


def _check_int(name: str, value, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value < high:
        _fail(f"{name} must be an integer in [{low}, {high}), got {value!r}")
    return int(value)


def microcircuit_run(w: MicroWeights, traces: dict[str, list[Tensor | None]], state: MicroState,
                     x: Tensor, u_trgt: Tensor | None, p: MicroParams,
                     etas: dict[str, list[float]], example: Tensor, step0: int, steps: int,
                     seed: int, apply_last: bool = True, sigma: float | None = None) -> None:
    """``steps`` Euler-Maruyama steps of S18's full dynamics in every lane, with the continuous
    plasticity of the shared weights, in place (docs/algorithms/microcircuits.md §6.1-6.2): the
    fused form of :func:`bpdl.functional.microcircuit.full_run`, which takes the same arguments
    and draws the same random numbers.

    Per step t (steps ``step0`` .. ``step0 + steps - 1`` of the presentation), from the state at
    step t, with r = phi(u), r_I = phi(u^I) and r_0 the filtered input:

        v_B,k = W_k r_{k-1} + b_k,  v_A,k = W_td,k r_{k+1} + W_pi,k r_I,k,
        v^I_k = W_ip,k r_k + b_ip,k;
        e_W,k = r_k - phi(a_k v_B,k),  a_k = g_B / (g_lk + g_B + g_A)  (g_A = 0 at the output),
        e_ip,k = r_I,k - phi(d v^I_k),  d = g_D / (g_lk + g_D),  e_pi,k = -v_A,k;
        T <- T + (dt / tau_w)(sum_b e_b pre_b^T - T),  W <- W + dt eta T   for each plastic
            matrix (pre: r_{k-1} for W_k, r_k for W_ip,k, r_I,k for W_pi,k, 1 for b, b_ip);
        u_k <- u_k + dt (-g_lk u + g_B (v_B - u) + g_A (v_A - u)  [output: + g_som (u_trgt - u)])
               + sigma sqrt(dt) xi,
        u^I_k <- u^I_k + dt (-g_lk u^I + g_D (v^I - u^I) + g_som^I (u_{k+1} - u^I))
                 + sigma sqrt(dt) xi,
        r_0 <- r_0 + (dt / tau_in)(x - r_0),

    with xi the Box-Muller normals of Philox4x32-10 keyed by ``seed`` and counted by (neuron
    pair, the lane's ``example`` mod 2^32, step, MICRO_STREAM + population), as
    :func:`bpdl.functional.microcircuit.noise`. The lanes share the weights and one trace per
    matrix; the CPU kernel reads and writes each plastic T and W once per step.

    Args:
        w: the weights (:class:`~bpdl.functional.microcircuit.MicroWeights`), updated in place.
        traces: per family of ``W``, ``b``, ``W_pi``, ``W_ip``, ``b_ip``, one trace per matrix
            (shaped like it) or None where the matrix is fixed; missing families are fixed. The
            top-down weights ``W_td`` are never plastic (§6.2's optional rule is not
            implemented): their traces must be None.
        state: the lanes (:class:`~bpdl.functional.microcircuit.MicroState`), advanced in place.
        x: input rates (lanes, n_0); u_trgt: the output target potentials (lanes, n_N), or
            None (no teacher).
        p: the constants (:class:`~bpdl.functional.microcircuit.MicroParams`); ``sigma``
            overrides ``p.sigma``.
        etas: learning rates, per family one per matrix (only those with a trace are read).
        example: each lane's example index (lanes,), the noise key.
        step0, steps: the first step's index within the presentation and the number of steps
            (step0 + steps <= 2^32).
        seed: the Philox key, in [0, 2^63).
        apply_last: False leaves the last step's weight change dt eta T to the caller (its
            traces are updated, the weights are not).
    """
    if not isinstance(p, MicroParams):
        _fail(f"p must be a MicroParams, got {type(p).__name__}")
    if not isinstance(w, MicroWeights):
        _fail(f"w must be a MicroWeights, got {type(w).__name__}")
    if not isinstance(state, MicroState):
        _fail(f"state must be a MicroState, got {type(state).__name__}")
    sizes = tuple(p.sizes)
    N = len(sizes) - 1
    if N < 2 or any(isinstance(n, bool) or not isinstance(n, int) or n <= 0 for n in sizes):
        _fail(f"p.sizes must be at least three positive layer sizes (input, hidden..., output), "
              f"got {sizes!r}")
    if p.transfer not in TRANSFERS:
        _fail(f"p.transfer must be one of {', '.join(TRANSFERS)}, got {p.transfer!r}")
    if not isinstance(state.r0, Tensor) or state.r0.dim() != 2:
        _fail("state.r0 must be a (lanes, n_0) tensor")
    ref = state.r0
    if ref.dtype not in (torch.float32, torch.float64):
        _fail(f"the state must be float32 or float64, got {ref.dtype}")
    B = ref.shape[0]
    if len(state.u) != N or len(state.u_I) != N - 1:
        _fail(f"state must hold {N} pyramidal and {N - 1} interneuron tensors for sizes "
              f"{sizes}, got {len(state.u)} and {len(state.u_I)}")
    _check_tensor(state.r0, "state.r0", (B, sizes[0]), ref, True)
    for k in range(1, N + 1):
        _check_tensor(state.u[k - 1], f"state.u[{k - 1}]", (B, sizes[k]), ref, True)
    for k in range(1, N):
        _check_tensor(state.u_I[k - 1], f"state.u_I[{k - 1}]", (B, sizes[k + 1]), ref, True)
    _check_tensor(x, "x", (B, sizes[0]), ref, False)
    if u_trgt is not None:
        _check_tensor(u_trgt, "u_trgt", (B, sizes[-1]), ref, False)
    if not isinstance(example, Tensor):
        _fail(f"example must be an integer tensor with one index per lane, got "
              f"{type(example).__name__}")
    if example.dtype.is_floating_point or example.dtype.is_complex or \
            example.dtype == torch.bool or tuple(example.shape) != (B,):
        _fail(f"example must be an integer tensor with one index per lane ({B},), got "
              f"{example.dtype} of shape {tuple(example.shape)}")
    if example.device != ref.device:
        _fail(f"example is on {example.device} but the state is on {ref.device}")

    named = w.named()
    shapes = _expected_shapes(sizes)
    traces = {} if traces is None else traces
    etas = {} if etas is None else etas
    unknown = sorted(set(traces) - set(FAMILIES))
    if unknown:
        _fail(f"traces may name {', '.join(PLASTIC_FAMILIES)}; unknown: {unknown}")
    flat_w: list[Tensor] = []
    flat_t: list[Tensor] = []
    flat_eta: list[float] = []
    for family in FAMILIES:
        tensors = named[family]
        want = shapes[family]
        if not isinstance(tensors, (list, tuple)) or len(tensors) != len(want):
            _fail(f"w.{family} must hold {len(want)} tensors for sizes {sizes}, got "
                  f"{len(tensors) if isinstance(tensors, (list, tuple)) else tensors!r}")
        fam_t = traces.get(family)
        if fam_t is None:
            fam_t = [None] * len(want)
        if not isinstance(fam_t, (list, tuple)) or len(fam_t) != len(want):
            _fail(f"traces[{family!r}] must hold {len(want)} entries (a tensor or None), got "
                  f"{fam_t!r}")
        fam_eta = etas.get(family)
        for i, (weight, trace, shape) in enumerate(zip(tensors, fam_t, want, strict=True)):
            _check_tensor(weight, f"w.{family}[{i}]", shape, ref, True)
            flat_w.append(weight)
            if trace is None:
                flat_t.append(weight.new_empty(0))
                flat_eta.append(0.0)
                continue
            if family == "W_td":
                _fail("the top-down weights W_td are not plastic in these dynamics "
                      "(docs/algorithms/microcircuits.md §6.2); pass None for their traces")
            _check_tensor(trace, f"traces[{family!r}][{i}]", shape, ref, True)
            if trace.data_ptr() == weight.data_ptr() and weight.numel():
                _fail(f"traces[{family!r}][{i}] is the weight itself; pass a separate tensor")
            if not isinstance(fam_eta, (list, tuple)) or len(fam_eta) != len(want):
                _fail(f"etas[{family!r}] must hold {len(want)} learning rates (the matrix has a "
                      f"trace), got {fam_eta!r}")
            flat_t.append(trace)
            flat_eta.append(_check_number(f"etas[{family!r}][{i}]", fam_eta[i]))

    sigma = p.sigma if sigma is None else sigma
    constants = [_check_number("g_lk", p.g_lk), _check_number("g_B", p.g_B),
                 _check_number("g_A", p.g_A), _check_number("g_D", p.g_D),
                 _check_number("g_som", p.g_som), _check_number("g_som_I", p.g_som_I),
                 _check_number("dt", p.dt, positive=True),
                 _check_number("tau_w", p.tau_w, positive=True),
                 _check_number("tau_in", p.tau_in, positive=True),
                 _check_number("sigma", sigma, nonnegative=True),
                 _check_number("gamma", p.gamma), _check_number("beta", p.beta, positive=True),
                 _check_number("theta", p.theta)]
    step0 = _check_int("step0", step0, 0, 2**32)
    steps = _check_int("steps", steps, 0, 2**32 + 1)
    if step0 + steps > 2**32:
        _fail(f"step0 + steps = {step0 + steps} exceeds 2^32 (the noise's step counter is "
              f"32-bit); start a new presentation or reduce steps")
    seed = _check_int("seed", seed, 0, 2**63)
    if not isinstance(apply_last, bool):
        _fail(f"apply_last must be a bool, got {apply_last!r}")
    from bpdl.ops import has_kernel

    if not has_kernel(_OP, ref.device):
        _fail(f"bpdl was built without {ref.device.type.upper()} kernels for {_OP}; rebuild "
              f"bpdl on a machine with CUDA, or use bpdl.functional.microcircuit.full_run")
    torch.ops.bpdl.microcircuit_run(flat_w, flat_t, state.tensors(), x, u_trgt,
                                    example.to(torch.int64), flat_eta, step0, steps, seed,
                                    constants, TRANSFERS.index(p.transfer), apply_last)


@torch.library.register_fake("bpdl::microcircuit_run")
def _microcircuit_run_fake(weights, traces, state, x, u_trgt, example, etas, step0, steps, seed,
                           constants, transfer, apply_last) -> None:
    return None
