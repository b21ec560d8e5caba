"""Segregated-dendrite dynamics and plasticity, fused (Guerguiev, Lillicrap & Richards 2017, "G17";
docs/algorithms/segregated_dendrites.md). Kernels: csrc/cpu/segregated_cpu.cpp and
csrc/cuda/segregated_cuda.cu; reference: :mod:`bpdl.functional.segregated`."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from bpdl.ops.spikes import MAX_POISSON_MEAN

__all__ = ["segregated_layer_step", "segregated_plasticity", "segregated_sparse_basal",
           "segregated_test", "segregated_train_example", "segregated_train_online"]


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


def segregated_train_online(W, b, Y, c, masks, state, x_rate: Tensor, target: Tensor,
                            lengths: Tensor, windows: Tensor, offsets, seed: int,
                            lane_key: Tensor, params, kinds, lrs, scales, gains, fb_lrs=(),
                            fb_gain: float = 1.0, fb_scale: float = 0.0, symmetric: bool = False,
                            sparse_gain: float = 1.0, original_quirks: bool = False, *,
                            validate: bool = True):
    """Online (batch-1) training of the K examples of ``x_rate`` in the one lane of ``state``,
    fused: each example's forward and target phase from the state the previous one left, then,
    for every example but the last, its plasticity and a plain SGD step on W and b at ``lrs``
    (learned feedback Y, c at ``fb_lrs``; masks re-applied; symmetric feedback recomputed), the
    weights updated in place between examples. Reference:
    :func:`bpdl.functional.segregated.train_online` (same arguments); equal, bit for bit, to
    K steps of batch 1 through the fused example and plasticity ops and ``torch.optim.SGD``
    (the SGD step is fma(grad, -lr, w), as ATen's ``add_``; the columns of W whose input PSP
    was zero are not touched, and the event-driven transposes are updated with them).

    ``kinds``, ``scales``, ``gains``: per layer the plasticity kind, the scale (-P) and gain of
    :func:`segregated_plasticity`; ``fb_gain``, ``fb_scale`` those of learned feedback. The last
    example's update is left to the caller (its optimiser step). Returns the last example's
    phase averages (one lane) and the output layer's lam_t and C_f (K, n_out) of every example.
    Noisy symmetric feedback is not fused (use the reference with the network's after-update).
    """
    from bpdl.functional.segregated import PhaseAverages

    if validate:
        _seg_check_rates(x_rate)
    values, flags, need_train, need_test, kappa = _seg_static(params, x_rate.dtype,
                                                              x_rate.device, original_quirks)
    cs = [] if (c is None or all(v is None for v in c)) else list(c)
    offs = [] if offsets is None else [o.to(torch.int64) for o in offsets]
    flat = torch.ops.bpdl.segregated_train_online(
        list(W), list(b), list(Y), cs, list(masks or []), x_rate, target, kappa, state.in_ring,
        state.rings, state.C, state.lam, state.A, state.step, lane_key, lengths, windows, offs,
        int(seed), values, flags, need_train, need_test, [int(k) for k in kinds],
        [float(v) for v in lrs], [float(v) for v in scales], [float(v) for v in gains],
        [float(v) for v in fb_lrs], float(fb_gain), float(fb_scale), bool(symmetric),
        float(sparse_gain))
    return PhaseAverages.from_flat(flat[:-2], params.n_layers), flat[-2], flat[-1]


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


@torch.library.register_fake("bpdl::segregated_train_online")
def _segregated_train_online_fake(W, b, Y, c, masks, x_rate, target, kappa, in_ring, rings, C,
                                  lam, A, step, lane_key, lengths, windows, offsets, seed, params,
                                  flags, need_train, need_test, kinds, lrs, scales, gains, fb_lrs,
                                  fb_gain, fb_scale, symmetric, sparse_gain):
    one = x_rate.new_empty((1, x_rate.shape[1]))
    out = _segregated_train_example_fake(W, b, Y, c, one, target[:1], kappa, in_ring, rings, C,
                                         lam, A, step, lane_key, lengths[:1], windows[:1],
                                         offsets, seed, params, flags, need_train, need_test)
    K, n_out = x_rate.shape[0], W[-1].shape[0]
    return out + [x_rate.new_empty((K, n_out)), x_rate.new_empty((K, n_out))]


@torch.library.register_fake("bpdl::segregated_test")
def _segregated_test_fake(W, b, Y, c, x_rate, kappa, lane_key, seed, steps, window, params, flags,
                          need_test):
    return x_rate.new_empty((x_rate.shape[0], W[-1].shape[0]))
