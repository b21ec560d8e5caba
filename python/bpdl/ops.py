"""Typed wrappers over ``torch.ops.bpdl``: the fused C++/CUDA kernels.

Each wrapper states the math it computes and checks its arguments before the kernel runs; each
op has a fake (meta) implementation so ``torch.compile`` can trace through it, and a pure-PyTorch
reference in :mod:`bpdl.functional` that the tests compare against exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "MAGNITUDE_DISTRIBUTIONS", "MAX_POISSON_MEAN", "dfa_project", "locally_connected2d",
    "locally_connected2d_grad_input", "locally_connected2d_grad_weight", "poisson_spikes",
    "segregated_layer_step", "segregated_plasticity", "segregated_sparse_basal", "segregated_test",
    "segregated_train_example", "sign_feedback", "sign_random_feedback",
]

#: Largest expected count per draw the Poisson sampler accepts (rate * dt).
MAX_POISSON_MEAN = 64.0


def poisson_spikes(
    rate: Tensor,
    seed: int,
    step: int,
    stream: int = 0,
    dt: float = 1.0,
    *,
    validate: bool = True,
) -> Tensor:
    """Reproducible Poisson spike counts: ``n_i ~ Poisson(rate_i * dt)``.

    Each element draws one uniform from Philox4x32-10 keyed by ``seed`` and counted by
    ``(i, step, stream)`` (``i`` the row-major element index) and inverts the Poisson CDF, so
    the CPU and CUDA kernels and :func:`bpdl.functional.poisson_spikes` return identical counts.
    Use ``step`` for the time step and ``stream`` to separate layers or populations.

    Args:
        rate: expected spikes per unit time, any shape, floating point, >= 0.
        seed: non-negative generator seed (< 2^63).
        step: time-step counter in [0, 2^32).
        stream: population counter in [0, 2^32).
        dt: time step; the Poisson mean is ``rate * dt`` and must be <= ``MAX_POISSON_MEAN``.
        validate: check that every mean is finite and in range (one reduction); the hot loops
            of the simulators validate their inputs once and pass False.

    Returns:
        Spike counts with ``rate``'s shape and dtype.
    """
    if not isinstance(rate, Tensor):
        raise TypeError(f"poisson_spikes: rate must be a torch.Tensor, got {type(rate).__name__}")
    if not rate.is_floating_point():
        raise TypeError(
            f"poisson_spikes: rate must be floating point, got {rate.dtype}; use rate.float()"
        )
    if not (isinstance(dt, (int, float)) and math.isfinite(dt) and dt > 0):
        raise ValueError(f"poisson_spikes: dt must be a positive finite number, got {dt!r}")
    if validate and rate.numel() > 0:
        lo, hi = torch.aminmax(rate.detach())
        lo, hi = float(lo), float(hi)
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ValueError("poisson_spikes: rate contains NaN or infinite values")
        if lo < 0:
            raise ValueError(f"poisson_spikes: rates must be >= 0, found {lo}")
        if hi * dt > MAX_POISSON_MEAN:
            raise ValueError(
                f"poisson_spikes: the mean count rate*dt = {hi * dt} exceeds {MAX_POISSON_MEAN}; "
                "use a smaller dt (this sampler is for spike counts per time step)"
            )
    return torch.ops.bpdl.poisson_spikes(rate, int(seed), int(step), int(stream), float(dt))


@torch.library.register_fake("bpdl::poisson_spikes")
def _poisson_spikes_fake(rate: Tensor, seed: int, step: int, stream: int = 0,
                         dt: float = 1.0) -> Tensor:
    return torch.empty_like(rate, memory_format=torch.contiguous_format)


# ---- segregated dendrites (Guerguiev, Lillicrap & Richards 2017) ------------------------------------

def _seg_lists(params, original_quirks: bool = False) -> tuple[list[float], list[int]]:
    """The ``params`` and ``flags`` lists of the segregated kernels (layouts of
    csrc/include/bpdl/segregated.h) from a :class:`bpdl.functional.segregated.SimParams`."""
    p = params
    values = [p.lambda_max, p.g_L, p.g_B, p.g_A, p.g_D, p.E_E, p.E_I, p.k_B, p.k_A, p.k_D]
    flags = [int(p.conductances), int(p.spiking_feedforward), int(p.spiking_feedback),
             int(p.broadcast), int(p.apical_soma), int(original_quirks), int(p.random_plateaus),
             int(p.plateau_max)]
    return [float(v) for v in values], flags


def _seg_static(params, dtype: torch.dtype, device, original_quirks: bool):
    """(values, flags, need_train, need_test, kappa) of the segregated kernels for ``params``,
    computed once per dtype, device and quirks setting and kept on the (frozen, immutable)
    ``params`` object: the training loop calls the kernels once per minibatch."""
    cache = params.__dict__.setdefault("_bpdl_ops_cache", {})
    key = (dtype, torch.device(device), bool(original_quirks))
    hit = cache.get(key)
    if hit is None:
        values, flags = _seg_lists(params, original_quirks)
        hit = (values, flags, [int(v) for v in params.spiking_populations(True)],
               [int(v) for v in params.spiking_populations(False)],
               params.kappa(dtype, device))
        cache[key] = hit
    return hit


def _seg_check_rates(x_rate: Tensor, what: str = "x_rate") -> None:
    if not isinstance(x_rate, Tensor) or not x_rate.is_floating_point() or x_rate.dim() != 2:
        raise ValueError(f"{what} must be a floating-point (lanes, n_in) tensor of input rates")
    if x_rate.numel():
        lo, hi = torch.aminmax(x_rate.detach())
        if not (math.isfinite(float(lo)) and math.isfinite(float(hi))):
            raise ValueError(f"{what} contains NaN or infinite values")
        if float(lo) < 0 or float(hi) > MAX_POISSON_MEAN:
            raise ValueError(f"{what} must lie in [0, {MAX_POISSON_MEAN}] spikes per step, found "
                             f"[{float(lo)}, {float(hi)}]")


def segregated_layer_step(W: Tensor, b: Tensor, Y: Tensor | None, c: Tensor | None, ff: Tensor,
                          fb: Tensor | None, kappa: Tensor, teach: Tensor | None, C: Tensor,
                          lam: Tensor, A: Tensor | None, ring: Tensor, sums: Tensor,
                          psp_sum: Tensor, fb_sum: Tensor | None, step: Tensor, lane_key: Tensor,
                          accumulate: Tensor, seed: int, pop: int, params,
                          draw_spikes: bool = True, original_quirks: bool = False) -> Tensor:
    """One time step of one layer's compartments in every lane, in place (G17; reference
    :func:`bpdl.functional.segregated.layer_step`):

        p = sum_k kappa(k) S_ff(t-k+1)   (or the rates ff),   B = W p + b
        q = sum_k kappa(k) S_fb(t-k)     (or the rates fb),   A = Y q (+ c)       hidden layers
        C <- C + (-g_L C + g_B (B - C) [+ g_A (A - C)])   (output: g_D, teaching current)
        lambda = lambda_max sigma(C),  ring[t mod T] = Poisson(lambda) (Philox-keyed)

    and where ``accumulate`` adds C, lambda (and A) to ``sums`` (lanes, 2 or 3, n), p to
    ``psp_sum`` and q to ``fb_sum``. ``step`` (lanes,) is each lane's step t (not advanced);
    ``params`` a :class:`~bpdl.functional.segregated.SimParams`. Returns B.
    """
    values, flags = _seg_lists(params, original_quirks)
    flags = flags + [int(draw_spikes)]
    if A is None:
        A = C.new_empty(0)
    if fb_sum is None:
        fb_sum = C.new_empty(0)
    kappa = kappa.to(C.dtype)
    return torch.ops.bpdl.segregated_layer_step(W, b, Y, c, ff, fb, kappa, teach, C, lam, A, ring,
                                                sums, psp_sum, fb_sum, step, lane_key,
                                                accumulate, int(seed), int(pop), values, flags)


def segregated_sparse_basal(W_t: Tensor, b: Tensor, ring: Tensor, step: Tensor,
                            kappa: Tensor) -> Tensor:
    """Event-driven basal potential (section 5.17 b): with s(tau) the int8 spike counts in
    ``ring`` (lanes, T, n_in) and W_t = W^T (n_in, n),

        B = sum_k kappa(k) R(t-k+1) + b,   R(tau) = sum_{i: s_i(tau) > 0} s_i(tau) W_t[i, :]

    which equals W p + b with p the PSP of the ring, at the cost of the spikes instead of the
    inputs. Reference: :func:`bpdl.functional.segregated.sparse_basal`."""
    if ring.dtype != torch.int8:
        raise TypeError(f"segregated_sparse_basal: ring must be int8 spike counts, got {ring.dtype}")
    return torch.ops.bpdl.segregated_sparse_basal(W_t, b, ring, step, kappa.to(W_t.dtype))


def segregated_plasticity(kind: int, C_f: Tensor, P_f: Tensor, a: Tensor, b: Tensor | None,
                          lambda_max: float, gain: float, scale: float, A_f: Tensor | None = None,
                          Q_f: Tensor | None = None, fb_gain: float = 1.0, fb_scale: float = 0.0
                          ) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
    """End-of-example plasticity of one layer summed over lanes, in one pass (G17 Eqs. 28-35;
    reference :func:`bpdl.functional.segregated.plasticity`): with s = sigma(C_f),

        e = drive * s (1 - s) * gain * lambda_max,
        drive = lam_t - lambda_max s (kind 0), sigma(A_t) - sigma(A_f) (kind 1, a = A_t,
                b = A_f), or the backpropagated error a (kind 2);
        grad_W = scale e^T P_f,  grad_b = scale sum_lanes e,

    and with learned feedback (``Q_f``): e_fb = (lambda_max s - sigma(A_f)) sigma'(A_f) fb_gain,
    grad_Y = fb_scale e_fb^T Q_f, grad_c = fb_scale sum e_fb. Returns (e, grad_W, grad_b,
    grad_Y, grad_c), the last two None without ``Q_f``.
    """
    if kind not in (0, 1, 2):
        raise ValueError(f"segregated_plasticity: kind must be 0, 1 or 2, got {kind}")
    e, gW, gb, gY, gc = torch.ops.bpdl.segregated_plasticity(
        int(kind), C_f, P_f, a, b, A_f, Q_f, float(lambda_max), float(gain), float(scale),
        float(fb_gain), float(fb_scale))
    if Q_f is None:
        return e, gW, gb, None, None
    return e, gW, gb, gY, gc


def segregated_train_example(W, b, Y, c, state, x_rate: Tensor, target: Tensor, lengths: Tensor,
                             windows: Tensor, offsets, seed: int, lane_key: Tensor, params,
                             original_quirks: bool = False, *, validate: bool = True):
    """Forward and target phase of one training example in every lane, fused (G17 section 5.4;
    reference :func:`bpdl.functional.segregated.simulate_training_example`, same arguments).

    Each lane runs its own phase lengths in one thread (CPU) or block (CUDA); the state (a
    :class:`~bpdl.functional.segregated.LaneState`) is advanced in place. The basal inputs are
    integrated event-driven (sums of W's columns of the units that spiked), the apical and
    feedforward-PSP averages in closed form, and the spike draws are the reference's, so the
    result equals the reference up to floating-point rounding. Returns the phase averages
    (:class:`~bpdl.functional.segregated.PhaseAverages`). ``validate=False`` skips the check
    of ``x_rate``'s values (finite, in [0, MAX_POISSON_MEAN]) for callers that made it.
    """
    from bpdl.functional.segregated import PhaseAverages

    if validate:
        _seg_check_rates(x_rate)
    values, flags, need_train, need_test, kappa = _seg_static(params, x_rate.dtype,
                                                              x_rate.device, original_quirks)
    cs = [] if (c is None or all(v is None for v in c)) else list(c)
    offs = [] if offsets is None else [o.to(torch.int64) for o in offsets]
    flat = torch.ops.bpdl.segregated_train_example(
        list(W), list(b), list(Y), cs, x_rate, target, kappa, state.in_ring, state.rings,
        state.C, state.lam, state.A, state.step, lane_key, lengths, windows, offs, int(seed),
        values, flags, need_train, need_test)
    return PhaseAverages.from_flat(flat, params.n_layers)


def segregated_test(W, b, Y, c, x_rate: Tensor, seed: int, lane_key: Tensor, params,
                    original_quirks: bool = False, *, validate: bool = True) -> Tensor:
    """The test procedure, fused (G17 section 5.5; reference
    :func:`bpdl.functional.segregated.simulate_test`): every lane starts from zero state, runs
    ``params.test_steps`` steps and returns the output potentials averaged over the last
    ``params.test_window`` steps (lanes, n_out). ``validate`` as for
    :func:`segregated_train_example`."""
    if validate:
        _seg_check_rates(x_rate)
    values, flags, _, need_test, kappa = _seg_static(params, x_rate.dtype, x_rate.device,
                                                     original_quirks)
    cs = [] if (c is None or all(v is None for v in c)) else list(c)
    return torch.ops.bpdl.segregated_test(list(W), list(b), list(Y), cs, x_rate, kappa, lane_key,
                                          int(seed), int(params.test_steps),
                                          int(params.test_window), values, flags, need_test)


@torch.library.register_fake("bpdl::segregated_layer_step")
def _segregated_layer_step_fake(W, b, Y, c, ff, fb, kappa, teach, C, lam, A, ring, sums, psp_sum,
                                fb_sum, step, lane_key, accumulate, seed, pop, params, flags):
    return C.new_empty(C.shape)


@torch.library.register_fake("bpdl::segregated_sparse_basal")
def _segregated_sparse_basal_fake(W_t, b, ring, step, kappa):
    return W_t.new_empty((ring.shape[0], W_t.shape[1]))


@torch.library.register_fake("bpdl::segregated_plasticity")
def _segregated_plasticity_fake(kind, C_f, P_f, a, b, A_f, Q_f, lambda_max, gain, scale,
                                fb_gain, fb_scale):
    n, n_in = C_f.shape[1], P_f.shape[1]
    if Q_f is None:
        gY, gc = C_f.new_empty((0,)), C_f.new_empty((0,))
    else:
        gY, gc = C_f.new_empty((n, Q_f.shape[1])), C_f.new_empty((n,))
    return C_f.new_empty(C_f.shape), C_f.new_empty((n, n_in)), C_f.new_empty((n,)), gY, gc


@torch.library.register_fake("bpdl::segregated_train_example")
def _segregated_train_example_fake(W, b, Y, c, x_rate, target, kappa, in_ring, rings, C, lam, A,
                                   step, lane_key, lengths, windows, offsets, seed, params, flags,
                                   need_train, need_test):
    B = x_rate.shape[0]
    out = []
    for _ in range(4):
        out += [x_rate.new_empty((B, w.shape[0])) for w in W]
    out += [x_rate.new_empty((B, w.shape[1])) for w in W]
    for _ in range(2):
        out += [x_rate.new_empty((B, w.shape[0])) for w in W[:-1]]
    out += [x_rate.new_empty((B, y.shape[1])) for y in Y]
    return out


@torch.library.register_fake("bpdl::segregated_test")
def _segregated_test_fake(W, b, Y, c, x_rate, kappa, lane_key, seed, steps, window, params, flags,
                          need_test):
    return x_rate.new_empty((x_rate.shape[0], W[-1].shape[0]))

# ---- locally connected layers ---------------------------------------------------------------------

def _pair(value: int | Sequence[int], name: str, low: int) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    try:
        pair = [int(v) for v in value]
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}") from None
    if len(pair) != 2 or any(v < low for v in pair):
        raise ValueError(f"{name} must be an int or a pair of ints >= {low}, got {value!r}")
    return pair


def _check_lc_tensor(t: Tensor, name: str, dims: int, what: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"locally_connected2d: {name} must be a torch.Tensor, got "
                        f"{type(t).__name__}")
    if t.dim() != dims:
        raise ValueError(f"locally_connected2d: {name} must be {what}, got shape "
                         f"{tuple(t.shape)}")
    if t.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"locally_connected2d: {name} must be float32 or float64, got {t.dtype}")


def locally_connected2d(input: Tensor, weight: Tensor, bias: Tensor | None = None,
                        stride: int | Sequence[int] = 1,
                        padding: int | Sequence[int] = 0) -> Tensor:
    """Locally connected layer (unshared convolution, B18): a convolution whose filter differs at
    every output location,

        y[n, o, i, j] = sum_{c,u,v} W[i, j, o, c, u, v] x[n, c, s_h i + u - p_t, s_w j + v - p_l]
                        + b,

    with zeros outside the input. Fused kernel: one small GEMM per output location on a patch
    buffer gathered on the fly, so the unfolded input (N, C k_h k_w, H_out W_out) of the
    reference :func:`bpdl.functional.locally_connected2d` is never materialised. Differentiable
    in ``input`` and ``weight`` (to any order; the gradients are the other two ops of this family)
    and in ``bias`` through ordinary autograd.

    Args:
        input: (N, C, H, W), float32 or float64.
        weight: (H_out, W_out, O, C, k_h, k_w); the output size is read from it.
        bias: None, per channel (O,) or per location (O, H_out, W_out).
        stride: (s_h, s_w) or one int.
        padding: (top, left) or one int. Patch entries below or right of the input read zero,
            which covers TensorFlow's asymmetric "SAME" padding.

    Returns:
        (N, O, H_out, W_out).
    """
    _check_lc_tensor(input, "input", 4, "(N, C, H, W)")
    _check_lc_tensor(weight, "weight", 6, "(H_out, W_out, O, C, k_h, k_w)")
    out = torch.ops.bpdl.locally_connected2d(input, weight, _pair(stride, "stride", 1),
                                             _pair(padding, "padding", 0))
    if bias is not None:
        o, oh, ow = weight.shape[2], weight.shape[0], weight.shape[1]
        if tuple(bias.shape) == (o,):
            bias = bias.reshape(o, 1, 1)
        elif tuple(bias.shape) != (o, oh, ow):
            raise ValueError(f"locally_connected2d: bias must be ({o},) or ({o}, {oh}, {ow}), "
                             f"got shape {tuple(bias.shape)}")
        out = out + bias
    return out


def locally_connected2d_grad_input(grad_output: Tensor, weight: Tensor,
                                   input_size: Sequence[int], stride: int | Sequence[int] = 1,
                                   padding: int | Sequence[int] = 0) -> Tensor:
    """Input gradient of :func:`locally_connected2d`, the transposed locally connected map:

        dx[n, c, h, w] = sum over (i, j, o, u, v) with s_h i + u - p_t = h, s_w j + v - p_l = w
                         of g[n, o, i, j] W[i, j, o, c, u, v].

    With a feedback tensor B in place of W this is the feedback-alignment signal sent to the
    layer below (ALGORITHMS.md 3.1). ``input_size`` is (H, W)."""
    _check_lc_tensor(grad_output, "grad_output", 4, "(N, O, H_out, W_out)")
    _check_lc_tensor(weight, "weight", 6, "(H_out, W_out, O, C, k_h, k_w)")
    return torch.ops.bpdl.locally_connected2d_grad_input(
        grad_output, weight, _pair(tuple(input_size), "input_size", 1),
        _pair(stride, "stride", 1), _pair(padding, "padding", 0))


def locally_connected2d_grad_weight(grad_output: Tensor, input: Tensor,
                                    kernel_size: int | Sequence[int],
                                    stride: int | Sequence[int] = 1,
                                    padding: int | Sequence[int] = 0) -> Tensor:
    """Weight gradient of :func:`locally_connected2d`:
    dW[i, j, o, c, u, v] = sum_n g[n, o, i, j] x[n, c, s_h i + u - p_t, s_w j + v - p_l]."""
    _check_lc_tensor(grad_output, "grad_output", 4, "(N, O, H_out, W_out)")
    _check_lc_tensor(input, "input", 4, "(N, C, H, W)")
    return torch.ops.bpdl.locally_connected2d_grad_weight(
        grad_output, input, _pair(kernel_size, "kernel_size", 1), _pair(stride, "stride", 1),
        _pair(padding, "padding", 0))


@torch.library.register_fake("bpdl::locally_connected2d")
def _lc_fake(input, weight, stride, padding):
    torch._check(input.dim() == 4 and weight.dim() == 6)
    return input.new_empty((input.shape[0], weight.shape[2], weight.shape[0], weight.shape[1]))


@torch.library.register_fake("bpdl::locally_connected2d_grad_input")
def _lc_grad_input_fake(grad_output, weight, input_size, stride, padding):
    return grad_output.new_empty((grad_output.shape[0], weight.shape[3], input_size[0],
                                  input_size[1]))


@torch.library.register_fake("bpdl::locally_connected2d_grad_weight")
def _lc_grad_weight_fake(grad_output, input, kernel_size, stride, padding):
    return input.new_empty((grad_output.shape[2], grad_output.shape[3], grad_output.shape[1],
                            input.shape[1], kernel_size[0], kernel_size[1]))


# The three ops are each other's adjoints (F(x, W) = y, Gi = dF/dx^T, Gw = dF/dW^T), so each
# one's gradient is the other two: gradients of every order stay on the fused kernels.
def _lc_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], inputs[1])
    ctx.args = tuple(inputs[2:])


def _lc_backward(ctx, grad):
    x, w = ctx.saved_tensors
    stride, padding = ctx.args
    gx = gw = None
    if ctx.needs_input_grad[0]:
        gx = torch.ops.bpdl.locally_connected2d_grad_input(grad, w, list(x.shape[2:]), stride,
                                                           padding)
    if ctx.needs_input_grad[1]:
        gw = torch.ops.bpdl.locally_connected2d_grad_weight(grad, x, list(w.shape[4:]), stride,
                                                            padding)
    return gx, gw, None, None


def _lc_gi_backward(ctx, grad):
    # Gi(g, W) = a: d<a_bar, Gi>/dg = F(a_bar, W); d/dW = Gw(g, a_bar)
    g, w = ctx.saved_tensors
    input_size, stride, padding = ctx.args
    dg = dw = None
    if ctx.needs_input_grad[0]:
        dg = torch.ops.bpdl.locally_connected2d(grad, w, stride, padding)
    if ctx.needs_input_grad[1]:
        dw = torch.ops.bpdl.locally_connected2d_grad_weight(g, grad, list(w.shape[4:]), stride,
                                                            padding)
    return dg, dw, None, None, None


def _lc_gw_backward(ctx, grad):
    # Gw(g, x) = A: d<A_bar, Gw>/dg = F(x, A_bar); d/dx = Gi(g, A_bar)
    g, x = ctx.saved_tensors
    kernel_size, stride, padding = ctx.args
    dg = dx = None
    if ctx.needs_input_grad[0]:
        dg = torch.ops.bpdl.locally_connected2d(x, grad, stride, padding)
    if ctx.needs_input_grad[1]:
        dx = torch.ops.bpdl.locally_connected2d_grad_input(g, grad, list(x.shape[2:]), stride,
                                                           padding)
    return dg, dx, None, None, None


torch.library.register_autograd("bpdl::locally_connected2d", _lc_backward, setup_context=_lc_setup)
torch.library.register_autograd("bpdl::locally_connected2d_grad_input", _lc_gi_backward,
                                setup_context=_lc_setup)
torch.library.register_autograd("bpdl::locally_connected2d_grad_weight", _lc_gw_backward,
                                setup_context=_lc_setup)


# ---- direct feedback alignment, regenerated feedback ------------------------------------------------

def dfa_project(error: Tensor, num_features: int, seed: int, stream: int, scale: float) -> Tensor:
    """Direct feedback alignment signal ``error @ D`` without storing D (N16; ALGORITHMS.md 3.3,
    ``dfa_storage="regenerate"``).

    D has shape (num_outputs, num_features) and entries D[k, j] = scale * (2 u - 1), u the
    Philox4x32-10 uniform keyed by ``seed`` and counted by (k * num_features + j, 0, ``stream``):
    uniform on (-scale, scale), drawn tile by tile inside the kernel. It equals, bit for bit, the
    matrix :func:`bpdl.functional.dfa_feedback_matrix` stores for the same arguments.

    Args:
        error: (N, num_outputs) output error e, float32 or float64.
        num_features: columns of D (the flattened size of the layer input that receives the
            signal).
        seed: generator seed in [0, 2^63); stream: layer key in [0, 2^32).
        scale: half-width of the uniform distribution.

    Returns:
        (N, num_features).
    """
    if not isinstance(error, Tensor) or error.dim() != 2:
        raise ValueError(f"dfa_project: error must be an (N, num_outputs) tensor, got "
                         f"{getattr(error, 'shape', type(error).__name__)}")
    if error.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"dfa_project: error must be float32 or float64, got {error.dtype}")
    if not 0 <= int(seed) < 2**63 or not 0 <= int(stream) < 2**32:
        raise ValueError(f"dfa_project: seed must be in [0, 2^63) and stream in [0, 2^32), got "
                         f"{seed}, {stream}")
    if not math.isfinite(scale):
        raise ValueError(f"dfa_project: scale must be finite, got {scale}")
    return torch.ops.bpdl.dfa_project(error, int(num_features), int(seed), int(stream),
                                      float(scale))


@torch.library.register_fake("bpdl::dfa_project")
def _dfa_project_fake(error, num_features, seed, stream, scale):
    return error.new_empty((error.shape[0], num_features))


# ---- sign-symmetric feedback ----------------------------------------------------------------------

#: distributions of brSF's random magnitude |R|: index 0 uniform, 1 half-normal
MAGNITUDE_DISTRIBUTIONS = ("uniform", "half_normal")


def sign_feedback(weight: Tensor, magnitude: Tensor) -> Tensor:
    """Sign-symmetric feedback B = sign(W) * M in one pass (LLP16, X18), sign(0) = 0.

    Args:
        weight: W, any shape, floating point.
        magnitude: M, a 0-dim tensor (uSF's constant) or shaped like W (frSF's fixed |R|), with
            W's dtype and device.
    """
    if not isinstance(weight, Tensor) or not weight.is_floating_point():
        raise TypeError("sign_feedback: weight must be a floating-point tensor")
    if not isinstance(magnitude, Tensor) or (magnitude.dim() != 0
                                             and magnitude.shape != weight.shape):
        raise ValueError(f"sign_feedback: magnitude must be a 0-dim tensor or shaped like the "
                         f"weight {tuple(weight.shape)}, got "
                         f"{getattr(magnitude, 'shape', type(magnitude).__name__)}")
    return torch.ops.bpdl.sign_feedback(weight, magnitude)


def sign_random_feedback(weight: Tensor, seed: int, stream: int, step: int,
                         distribution: str = "uniform", scale: float = 1.0) -> Tensor:
    """brSF's feedback B = sign(W) * |R_t| with |R_t| drawn inside the kernel (LLP16, X18, SA21).

    Element i of group g = i // 4 takes the uniform u = (w >> 8) 2^-24 + 2^-25 from 32-bit word
    i % 4 of Philox4x32-10 keyed by ``seed`` and counted by (g, ``step``, ``stream``); the
    magnitude is ``scale * u`` (|U(-scale, scale)|) or, for ``half_normal``, Box-Muller on the
    word pairs, ``scale * sqrt(-2 ln u_2k) |cos(2 pi u_2k+1)|`` (``|sin|`` for the odd element):
    |N(0, scale^2)|. :func:`bpdl.functional.sign_random_feedback` is the reference (uniform
    magnitudes agree bit for bit; half-normal ones to the last bits of the math library).

    Args:
        weight: W, floating point. seed in [0, 2^63); stream (the layer) and step (the update
            counter) in [0, 2^32).
        distribution: ``uniform`` or ``half_normal``. scale: positive.
    """
    if distribution not in MAGNITUDE_DISTRIBUTIONS:
        raise ValueError(f"sign_random_feedback: distribution must be one of "
                         f"{MAGNITUDE_DISTRIBUTIONS}, got {distribution!r}")
    if not isinstance(weight, Tensor) or not weight.is_floating_point():
        raise TypeError("sign_random_feedback: weight must be a floating-point tensor")
    if not (0 <= int(seed) < 2**63 and 0 <= int(stream) < 2**32 and 0 <= int(step) < 2**32):
        raise ValueError(f"sign_random_feedback: seed must be in [0, 2^63), stream and step in "
                         f"[0, 2^32); got {seed}, {stream}, {step}")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"sign_random_feedback: scale must be positive, got {scale}")
    return torch.ops.bpdl.sign_random_feedback(weight, int(seed), int(stream), int(step),
                                               MAGNITUDE_DISTRIBUTIONS.index(distribution),
                                               float(scale))


@torch.library.register_fake("bpdl::sign_feedback")
def _sign_feedback_fake(weight, magnitude):
    return torch.empty_like(weight, memory_format=torch.contiguous_format)


@torch.library.register_fake("bpdl::sign_random_feedback")
def _sign_random_feedback_fake(weight, seed, stream, step, distribution, scale):
    return torch.empty_like(weight, memory_format=torch.contiguous_format)
