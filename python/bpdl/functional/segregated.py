"""Segregated-dendrite networks (Guerguiev, Lillicrap & Richards 2017, eLife 6:e22901): the
reference math in plain PyTorch (docs/algorithms/segregated_dendrites.md).

This module is the readable specification that the fused kernels of ``bpdl.ops`` are tested
against. Everything is batched over *lanes*: a lane is one example being simulated, with its own
state; all lanes share the weights (section 5.16). With one lane it is the original algorithm step
for step.

Network. Input layer of ``n_in`` Poisson neurons; hidden layers of three-compartment neurons
(basal potential B driven by the layer below, apical potential A driven by feedback, somatic
potential C); an output layer with a dendrite B and a soma C. Per time step (dt = 1 ms), bottom-up:

    x_spk ~ Poisson(lambda_max * pixel)
    p_m   = sum_k kappa(k) S_{m-1}(t-k+1)          feedforward PSP (the layer below has spiked at t)
    B_m   = W_m p_m + b_m
    q_m   = sum_k kappa(k) S_fb(t-k)                feedback PSP, one step stale
    A_m   = Y_m q_m (+ c_m)
    C_m  <- C_m + (-g_L C_m + g_B (B_m - C_m) [+ g_A (A_m - C_m)])        hidden soma
    C    <- C + (-g_L C + g_D (B - C) [+ g_E (E_E - C) + g_I (E_I - C)])  output soma (target)
    lambda_m = lambda_max sigma(C_m),  S_m(t) ~ Poisson(lambda_m)

with kappa(t) = (exp(-t/tau_L) - exp(-t/tau_s)) / (tau_L - tau_s) for t = 1..10 (the original's
truncated kernel). Each training example is a forward phase (no teaching) and a target phase
(teaching conductances g_E = target, g_I = 1 - target on the output); at the end of each phase the
averages of the last ``window`` steps give the plasticity signals of section 5.7.

Random numbers are counter based (Philox4x32-10, :mod:`bpdl.functional.random`): the spike count
of neuron j of population ``pop`` in a lane at lane step t uses word ``j % 4`` of the Philox block
with counter ``(G mod 2^32, G div 2^32, t, SPIKE_STREAM + pop)``, ``G = lane_key * 2^22 + j // 4``
and key ``seed``; the uniform is ``(word + 0.5) * 2^-32`` and the count is the smallest k with
``u <= P(N <= k)`` (sequential inversion in float64). The kernels draw exactly the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace

import torch
from torch import Tensor

from bpdl.functional.random import philox4x32_10
from bpdl.functional.spikes import poisson_from_uniform

__all__ = [
    "SPIKE_STREAM", "PHASE_STREAM", "PLATEAU_STREAM", "NOISE_STREAM", "LANE_SHIFT",
    "SimParams", "LaneState", "PhaseAverages", "Recorder",
    "psp_kernel", "init_moments", "spike_uniforms", "spike_counts", "wald_extensions",
    "plateau_offsets", "philox_normals", "psp", "soma_hidden", "soma_output", "rate",
    "layer_step", "sparse_basal", "plasticity", "output_loss", "class_scores",
    "simulate_training_example", "simulate_test", "KIND_OUTPUT", "KIND_HIDDEN", "KIND_BACKPROP",
    "symmetric_feedback", "online_update", "train_online",
]

#: Philox stream (fourth counter word) of the spike draws; population ``pop`` adds to it
#: (0 = input, m + 1 = layer m).
SPIKE_STREAM = 0x5E600000
#: Stream of the random phase-length extensions, keyed by the example's index.
PHASE_STREAM = 0x5E610000
#: Stream of the random plateau offsets (section 5.4), keyed by example, layer and neuron.
PLATEAU_STREAM = 0x5E620000
#: Stream of the noise added to symmetric feedback weights.
NOISE_STREAM = 0x5E630000
#: Neurons of one lane occupy 2^22 Philox blocks (4 neurons each): lane keys go above that.
LANE_SHIFT = 22
_MASK32 = 0xFFFFFFFF
_TWO_POW_M32 = 2.0**-32

#: Plasticity kinds (the ``kind`` argument of :func:`plasticity` and ``bpdl.ops``).
KIND_OUTPUT, KIND_HIDDEN, KIND_BACKPROP = 0, 1, 2


# ---- constants ------------------------------------------------------------------------------------

def psp_kernel(taps: int = 10, tau_s: float = 3.0, tau_L: float = 10.0) -> Tensor:
    """kappa(1..taps) in float64: kappa(t) = (e^{-t/tau_L} - e^{-t/tau_s}) / (tau_L - tau_s).

    kappa(1) weighs a spike of the current step. With the defaults the ten taps are 0.0269,
    0.0436, ..., 0.0475 and sum to 0.5104 (the untruncated kernel sums to 0.9972).
    """
    t = torch.arange(1, taps + 1, dtype=torch.float64)
    return (torch.exp(-t / tau_L) - torch.exp(-t / tau_s)) / (tau_L - tau_s)


def init_moments(fan_in: int, lambda_max: float = 0.2, v_avg: float = 3.0, v_sd: float = 3.0,
                 b_avg: float = 0.8) -> tuple[float, float]:
    """(W_avg, W_sd) of G17's weight optimisation (docs/algorithms/segregated_dendrites.md §5.8)
    for a layer of fan-in N.

    W_avg = (V_avg - b_avg) / (nu N V_avg),  nu = lambda_max / 4,
    W_sm  = [V_sm + nu^2 (N - N^2) W_avg^2 V_avg^2 - 2 N nu b_avg V_avg W_avg - b_avg^2]
            / (N nu^2 V_sm),  V_sm = V_sd^2 + V_avg^2,
    W_sd  = sqrt(W_sm - W_avg^2).
    """
    nu = 0.25 * lambda_max
    v_sm = v_sd**2 + v_avg**2
    n = float(fan_in)
    w_avg = (v_avg - b_avg) / (nu * n * v_avg)
    w_sm = (v_sm + nu**2 * (n - n**2) * w_avg**2 * v_avg**2 - 2 * n * nu * b_avg * v_avg * w_avg
            - b_avg**2) / (n * nu**2 * v_sm)
    return w_avg, math.sqrt(w_sm - w_avg**2)


@dataclass(frozen=True)
class SimParams:
    """Every number and switch the simulation needs, resolved from the model's options.

    ``sizes`` is (n_in, n_0, ..., n_out). ``window`` is the averaging window in steps, or -30
    for the paper's window (from 30 steps after the phase start to its end, see
    :meth:`windows`). ``apical_soma``: the apical potential enters the somatic update
    (g_A > 0, and not the original's steady-state omission).
    """

    sizes: tuple[int, ...]
    neurons_per_class: int = 1
    taps: int = 10
    tau_s: float = 3.0
    tau_L: float = 10.0
    lambda_max: float = 0.2
    g_L: float = 0.1
    g_B: float = 0.6
    g_A: float = 0.0
    g_D: float = 0.6
    E_E: float = 8.0
    E_I: float = -8.0
    conductances: bool = True
    spiking_feedforward: bool = True
    spiking_feedback: bool = True
    broadcast: bool = True
    apical_soma: bool = False
    forward_steps: int = 50
    target_steps: int = 50
    random_phase_lengths: bool = True
    window: int = 20
    test_steps: int = 250
    test_window: int = 220
    random_plateaus: bool = False
    plateau_sd: float = 3.0
    plateau_max: int = 5
    feedback_bias: bool = False

    # ---- derived -----------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        """M: hidden layers plus the output layer."""
        return len(self.sizes) - 1

    @property
    def n_hidden(self) -> int:
        return len(self.sizes) - 2

    @property
    def k_B(self) -> float:
        """Steady-state basal attenuation g_B / (g_L + g_B + g_A)."""
        return self.g_B / (self.g_L + self.g_B + self.g_A)

    @property
    def k_A(self) -> float:
        return self.g_A / (self.g_L + self.g_B + self.g_A)

    @property
    def k_D(self) -> float:
        """Output dendritic attenuation g_D / (g_L + g_D)."""
        return self.g_D / (self.g_L + self.g_D)

    @property
    def P_hidden(self) -> float:
        """Hidden error scale P_0 = 20 / lambda_max."""
        return 20.0 / self.lambda_max

    @property
    def P_output(self) -> float:
        """Output error scale P_1 = 20 / lambda_max^2."""
        return 20.0 / self.lambda_max**2

    def kappa(self, dtype: torch.dtype = torch.float64, device=None) -> Tensor:
        return psp_kernel(self.taps, self.tau_s, self.tau_L).to(dtype=dtype, device=device)

    def feedback_source(self, m: int) -> int:
        """Layer whose activity drives hidden layer m's apical dendrite."""
        return self.n_layers - 1 if self.broadcast else m + 1

    def spiking_populations(self, training: bool = True) -> list[bool]:
        """Which populations (input, layer 0, ..., output) need spike draws: those whose spikes
        some other layer reads. Skipped draws do not shift any other draw (counter-based RNG)."""
        M = self.n_layers
        need = [self.spiking_feedforward] + [False] * M
        for m in range(M - 1):
            need[m + 1] = self.spiking_feedforward
        if self.spiking_feedback and (training or self.apical_soma):
            for m in range(M - 1):
                need[self.feedback_source(m) + 1] = True
        return need

    def windows(self, lengths: Tensor) -> Tensor:
        """Averaging window per lane for phases of the given lengths (any integer shape)."""
        if self.window > 0:
            return torch.full_like(lengths, self.window)
        return lengths + self.window

    def with_sizes(self, sizes: Sequence[int]) -> SimParams:
        return replace(self, sizes=tuple(int(s) for s in sizes))

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


# ---- random numbers -------------------------------------------------------------------------------

def _philox_words(c0: Tensor, c1: Tensor, c2: Tensor, c3: Tensor, seed: int) -> Tensor:
    """The four 32-bit Philox output words (int64 tensors), stacked on a new last dimension."""
    r = philox4x32_10(c0, c1, c2, c3, seed & _MASK32, (seed >> 32) & _MASK32)
    return torch.stack(r, dim=-1)


def _unit(words: Tensor) -> Tensor:
    """Uniform doubles in (0, 1) from 32-bit words: (w + 0.5) 2^-32."""
    return (words.to(torch.float64) + 0.5) * _TWO_POW_M32


def spike_uniforms(lane_key: Tensor, step: Tensor, pop: int, n: int, seed: int) -> Tensor:
    """The uniforms (B, n) behind population ``pop``'s spike counts at each lane's ``step``.

    Neuron j of lane b uses word j % 4 of the Philox block with counter
    (G mod 2^32, G div 2^32, step_b, SPIKE_STREAM + pop), G = lane_key_b 2^22 + j // 4.
    """
    device = lane_key.device
    groups = (n + 3) // 4
    g = (lane_key.to(torch.int64)[:, None] << LANE_SHIFT) + torch.arange(groups, device=device)
    c2 = step.to(torch.int64)[:, None].expand_as(g)
    c3 = torch.full_like(g, SPIKE_STREAM + pop)
    words = _philox_words(g & _MASK32, g >> 32, c2, c3, seed)
    return _unit(words.reshape(g.shape[0], groups * 4)[:, :n])


def spike_counts(rate: Tensor, lane_key: Tensor, step: Tensor, pop: int, seed: int) -> Tensor:
    """Poisson counts (B, n) int8 with means ``rate`` (spikes per step), keyed as
    :func:`spike_uniforms`. Counts saturate at 127 (section 5.16 item 8)."""
    u = spike_uniforms(lane_key, step, pop, rate.shape[1], seed)
    k = poisson_from_uniform(u, rate.detach().to(torch.float64))
    return k.clamp_(max=127).to(torch.int8)


def _uniform_blocks(index: Tensor, word2: int, stream: int, seed: int) -> Tensor:
    """Four uniforms per index (N, 4) from the Philox block (index lo, index hi, word2, stream)."""
    index = index.to(torch.int64)
    c2 = torch.full_like(index, word2)
    c3 = torch.full_like(index, stream)
    return _unit(_philox_words(index & _MASK32, index >> 32, c2, c3, seed))


def wald_extensions(example: Tensor, phase: int, seed: int, mean: float = 2.0,
                    scale: float = 1.0) -> Tensor:
    """floor(Wald(mean, scale)) per example index (int64), the random phase extension of G17
    (numpy's ``wald(2, 1)``; E = 1.52 extra steps, heavy-tailed). ``phase`` 0 = forward, 1 = target.

    Michael, Schucany & Haas (1976): nu ~ N(0, 1) by Box-Muller from the block's first two
    uniforms, y = nu^2, x = mu + mu^2 y / (2 s) - mu / (2 s) sqrt(4 mu s y + mu^2 y^2); return x if
    the third uniform is <= mu / (mu + x), else mu^2 / x.
    """
    u = _uniform_blocks(example, phase, PHASE_STREAM, seed)
    nu = torch.sqrt(-2.0 * torch.log(u[:, 0])) * torch.cos(2.0 * math.pi * u[:, 1])
    y = nu * nu
    mu, s = mean, scale
    x = mu + mu * mu * y / (2 * s) - mu / (2 * s) * torch.sqrt(4 * mu * s * y + mu * mu * y * y)
    wald = torch.where(u[:, 2] <= mu / (mu + x), x, mu * mu / x)
    return torch.floor(wald).to(torch.int64)


def philox_normals(index: Tensor, word2: int, stream: int, seed: int) -> Tensor:
    """Two standard normals per index (N, 2) by Box-Muller from one Philox block."""
    u = _uniform_blocks(index, word2, stream, seed)
    r0 = torch.sqrt(-2.0 * torch.log(u[:, 0]))
    r1 = torch.sqrt(-2.0 * torch.log(u[:, 2]))
    return torch.stack([r0 * torch.cos(2 * math.pi * u[:, 1]),
                        r1 * torch.cos(2 * math.pi * u[:, 3])], dim=1)


def plateau_offsets(example: Tensor, layer: int, n: int, phase: int, seed: int, sd: float = 3.0,
                    max_offset: int = 5) -> Tensor:
    """Random plateau offsets (N, n) int64: min(|trunc(N(0, sd^2))|, max_offset) per neuron
    (G17 Figure 6-figure supplement 1; the code's sd is 3). The plateau of neuron i comes at
    step L - 1 - offset_i of the phase."""
    pairs = (n + 1) // 2
    idx = (example.to(torch.int64)[:, None] << 21) + torch.arange(pairs, device=example.device)
    z = philox_normals(idx.reshape(-1), phase + 2 * layer, PLATEAU_STREAM, seed)
    z = z.reshape(example.shape[0], pairs * 2)[:, :n]
    return torch.clamp(torch.trunc(sd * z).abs(), max=max_offset).to(torch.int64)


# ---- state -------------------------------------------------------------------------------------

@dataclass
class LaneState:
    """The state one lane carries from step to step (and, in training, from example to example).

    Spike rings hold counts of the last ``taps`` steps; the spikes of lane step t are in slot
    t mod taps. ``step`` counts the steps each lane has simulated (it keys the random numbers).
    """

    in_ring: Tensor            # (B, T, n_in) int8
    rings: list[Tensor]        # per layer (B, T, n_m) int8
    C: list[Tensor]            # somatic potentials (B, n_m)
    lam: list[Tensor]          # rates at the lane's latest step (B, n_m)
    A: list[Tensor]            # apical potentials of the hidden layers (B, n_m)
    step: Tensor               # (B,) int64

    @classmethod
    def zeros(cls, lanes: int, params: SimParams, dtype: torch.dtype = torch.float32,
              device: torch.device | str | None = None) -> LaneState:
        sizes, T = params.sizes, params.taps
        i8 = dict(dtype=torch.int8, device=device)
        fl = dict(dtype=dtype, device=device)
        return cls(
            in_ring=torch.zeros(lanes, T, sizes[0], **i8),
            rings=[torch.zeros(lanes, T, n, **i8) for n in sizes[1:]],
            C=[torch.zeros(lanes, n, **fl) for n in sizes[1:]],
            lam=[torch.zeros(lanes, n, **fl) for n in sizes[1:]],
            A=[torch.zeros(lanes, n, **fl) for n in sizes[1:-1]],
            step=torch.zeros(lanes, dtype=torch.int64, device=device),
        )

    @property
    def lanes(self) -> int:
        return self.step.shape[0]

    def tensors(self) -> list[Tensor]:
        return [self.in_ring, *self.rings, *self.C, *self.lam, *self.A, self.step]

    def narrow(self, lanes: int) -> LaneState:
        """A view of the first ``lanes`` lanes (writes go through to this state)."""
        return LaneState(self.in_ring[:lanes], [r[:lanes] for r in self.rings],
                         [c[:lanes] for c in self.C], [v[:lanes] for v in self.lam],
                         [a[:lanes] for a in self.A], self.step[:lanes])

    def clone(self) -> LaneState:
        return LaneState(self.in_ring.clone(), [r.clone() for r in self.rings],
                         [c.clone() for c in self.C], [v.clone() for v in self.lam],
                         [a.clone() for a in self.A], self.step.clone())

    def zero_(self) -> None:
        for t in self.tensors():
            t.zero_()

    def to_dict(self) -> dict[str, Tensor | list[Tensor]]:
        return {"in_ring": self.in_ring, "rings": self.rings, "C": self.C, "lam": self.lam,
                "A": self.A, "step": self.step}

    @classmethod
    def from_dict(cls, d: dict) -> LaneState:
        return cls(d["in_ring"], list(d["rings"]), list(d["C"]), list(d["lam"]), list(d["A"]),
                   d["step"])


@dataclass
class PhaseAverages:
    """Window averages of one training example, per lane (section 5.4).

    Per layer m: ``C_f``, ``C_t``, ``lam_f``, ``lam_t`` (B, n_m) and ``P_f`` (B, n_{m-1}), the mean
    feedforward PSP (or rate) of layer m's input in the forward phase. Per hidden layer: ``A_f``,
    ``A_t`` (B, n_m), the plateau potentials' apical averages, and ``Q_f`` (B, n_fb), the mean
    feedback input in the forward phase.
    """

    C_f: list[Tensor]
    C_t: list[Tensor]
    lam_f: list[Tensor]
    lam_t: list[Tensor]
    P_f: list[Tensor]
    A_f: list[Tensor]
    A_t: list[Tensor]
    Q_f: list[Tensor]

    def tensors(self) -> list[Tensor]:
        return [*self.C_f, *self.C_t, *self.lam_f, *self.lam_t, *self.P_f, *self.A_f, *self.A_t,
                *self.Q_f]

    @classmethod
    def from_flat(cls, flat: Sequence[Tensor], n_layers: int) -> PhaseAverages:
        M, H = n_layers, n_layers - 1
        it = iter(flat)

        def take(k: int) -> list[Tensor]:
            return [next(it) for _ in range(k)]

        return cls(take(M), take(M), take(M), take(M), take(M), take(H), take(H), take(H))


#: Recorder: called after every simulated step with (phase, step_in_phase, per-layer dict of
#: tensors "B", "A", "C", "lam", "spikes"); see :func:`simulate_training_example`.
Recorder = Callable[[str, int, list[dict[str, Tensor]]], None]


# ---- one step of a layer ----------------------------------------------------------------------------

def psp(ring: Tensor, step: Tensor, kappa: Tensor, stale: bool = False) -> Tensor:
    """The postsynaptic potential of a spike ring (B, T, n) at each lane's step (B,):

        p = sum_{k=1}^{T} kappa(k) S(t - k + 1)       (stale: S(t - k), feedback is one step late)

    kappa (T,) in the result's dtype. Returns (B, n).
    """
    T = ring.shape[1]
    k = torch.arange(1, T + 1, device=ring.device)
    delay = k if stale else k - 1
    slots = (step.to(torch.int64)[:, None] - delay[None, :]) % T          # (B, T)
    taps = torch.gather(ring, 1, slots[:, :, None].expand(-1, -1, ring.shape[2]))
    return torch.einsum("btn,t->bn", taps.to(kappa.dtype), kappa)


def rate(C: Tensor, lambda_max: float) -> Tensor:
    """lambda = lambda_max sigma(C): spikes per step."""
    return lambda_max * torch.sigmoid(C)


def soma_hidden(C: Tensor, basal: Tensor, apical: Tensor | None, p: SimParams,
                original_quirks: bool = False) -> Tensor:
    """Hidden somatic update. With conductances (Euler, dt = 1):

        C <- C + (-g_L C + g_B (B - C) [+ g_A (A - C)])

    Without (steady state): C = k_B B [+ k_A A]; ``original_quirks`` drops the apical term as
    the original code does (section 5.3, D11).
    """
    if p.conductances:
        dC = -p.g_L * C + p.g_B * (basal - C)
        if p.apical_soma:
            dC = dC + p.g_A * (apical - C)
        return C + dC
    if p.apical_soma and not original_quirks:
        return p.k_B * basal + p.k_A * apical
    return p.k_B * basal


def soma_output(C: Tensor, basal: Tensor, teach: Tensor | None, p: SimParams) -> Tensor:
    """Output somatic update; ``teach`` (B, n_out) is g_E in the target phase, None in the forward
    phase. With conductances (the teaching current uses the potential before the update):

        C <- C + (-g_L C + g_D (B - C) + g_E (E_E - C) + g_I (E_I - C)),  g_I = 1 - g_E

    Without: C = k_D B (forward), (g_D B + g_E E_E + g_I E_I) / (g_L + g_D + g_E + g_I) (target).
    """
    if p.conductances:
        dC = -p.g_L * C + p.g_D * (basal - C)
        if teach is not None:
            dC = dC + (teach * (p.E_E - C) + (1.0 - teach) * (p.E_I - C))
        return C + dC
    if teach is None:
        return p.k_D * basal
    g_I = 1.0 - teach
    return (p.g_D * basal + teach * p.E_E + g_I * p.E_I) / (p.g_L + p.g_D + teach + g_I)


def layer_step(W: Tensor, b: Tensor, Y: Tensor | None, c: Tensor | None, ff: Tensor,
               fb: Tensor | None, kappa: Tensor, teach: Tensor | None, C: Tensor, lam: Tensor,
               A: Tensor | None, ring: Tensor, sums: Tensor, psp_sum: Tensor,
               fb_sum: Tensor | None, step: Tensor, lane_key: Tensor, accumulate: Tensor,
               seed: int, pop: int, params: SimParams, hidden: bool, draw_spikes: bool = True,
               original_quirks: bool = False) -> Tensor:
    """One time step of one layer's compartments, in place (the reference of
    ``bpdl.ops.segregated_layer_step``).

    ``ff`` is the layer below's spike ring (B, T, n_in) int8, already holding step t (zero delay),
    or its rates (B, n_in) float; ``fb`` the feedback ring (B, T, n_fb) holding steps up to t - 1,
    or the feedback rates at t - 1, or None (output layer). Computes p = PSP(ff) (or the rates),
    B = W p + b, q and A = Y q (+ c), the somatic update, lambda = lambda_max sigma(C) and Poisson
    counts written to slot t mod T of ``ring`` (only where ``draw_spikes``). Where
    ``accumulate`` (B,) is true it adds C, lambda (and A) to ``sums`` (B, 2 or 3, n), p to
    ``psp_sum`` and q to ``fb_sum``. Returns the basal potential B. ``step`` is not advanced.
    """
    p = psp(ff, step, kappa) if ff.dtype == torch.int8 else ff.to(C.dtype)
    basal = p @ W.t() + b
    q = None
    if hidden:
        q = psp(fb, step, kappa, stale=True) if fb.dtype == torch.int8 else fb.to(C.dtype)
        apical = q @ Y.t()
        if c is not None:
            apical = apical + c
        A.copy_(apical)
        C.copy_(soma_hidden(C, basal, apical, params, original_quirks))
    else:
        C.copy_(soma_output(C, basal, teach, params))
    lam.copy_(rate(C, params.lambda_max))
    if draw_spikes:
        slot = step % ring.shape[1]
        lanes = torch.arange(ring.shape[0], device=ring.device)
        ring[lanes, slot] = spike_counts(lam, lane_key, step, pop, seed)
    acc = accumulate.to(C.dtype)[:, None]
    sums[:, 0] += acc * C
    sums[:, 1] += acc * lam
    if hidden:
        sums[:, 2] += acc * A
        if fb_sum is not None and fb_sum.numel():
            fb_sum += acc * q
    psp_sum += acc * p
    return basal


def sparse_basal(W_t: Tensor, b: Tensor, ring: Tensor, step: Tensor, kappa: Tensor) -> Tensor:
    """Basal potential from a spiking input without the dense product (section 5.17 b):

        B = W p + b = sum_k kappa(k) (W s(t-k+1)) + b,  W s(tau) = sum_{i: s_i(tau) > 0} s_i W[:, i]

    ``W_t`` is W transposed (n_in, n) so that W's columns are rows; ``ring`` (B, T, n_in) int8.
    This reference sums per tap in float64 before rounding, which is what the kernel must match.
    """
    T = ring.shape[1]
    out = torch.zeros(ring.shape[0], W_t.shape[1], dtype=torch.float64, device=W_t.device)
    for k in range(1, T + 1):
        slots = (step.to(torch.int64) - (k - 1)) % T
        s = ring[torch.arange(ring.shape[0], device=ring.device), slots].to(torch.float64)
        out += float(kappa[k - 1]) * (s @ W_t.to(torch.float64))
    return (out + b.to(torch.float64)).to(W_t.dtype)


# ---- plasticity -----------------------------------------------------------------------------------

def plasticity(kind: int, C_f: Tensor, P_f: Tensor, a: Tensor, b: Tensor | None,
               lambda_max: float, gain: float, scale: float, A_f: Tensor | None = None,
               Q_f: Tensor | None = None, fb_gain: float = 1.0, fb_scale: float = 0.0
               ) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
    """End-of-example plasticity for one layer, summed over lanes (G17 Eqs. 28-29, 33-35).

    With s = sigma(C_f) and s' = s (1 - s):

    - output   (kind 0, a = lam_t):         e = (lam_t - lambda_max s) * s' * gain * lambda_max
    - hidden   (kind 1, a = A_t, b = A_f):  e = (sigma(A_t) - sigma(A_f)) * s' * gain * lambda_max
    - backprop (kind 2, a = e_above W_above): e = a * s' * gain * lambda_max

    grad_W = scale * e^T P_f and grad_b = scale * sum_b e (``scale`` = -P, or -P / B for a
    mean, so that SGD at rate eta adds eta P sum_b e p^T). With ``Q_f`` (learned feedback):
    e_fb = (lambda_max s - sigma(A_f)) * sigma'(A_f) * fb_gain, grad_Y = fb_scale * e_fb^T Q_f,
    grad_c = fb_scale * sum_b e_fb. Returns (e, grad_W, grad_b, grad_Y, grad_c).
    """
    s = torch.sigmoid(C_f)
    ds = s * (1.0 - s)
    if kind == KIND_OUTPUT:
        drive = a - lambda_max * s
    elif kind == KIND_HIDDEN:
        drive = torch.sigmoid(a) - torch.sigmoid(b)
    elif kind == KIND_BACKPROP:
        drive = a
    else:
        raise ValueError(f"unknown plasticity kind {kind}")
    e = drive * ds * (gain * lambda_max)
    grad_W = (e.t() @ P_f) * scale
    grad_b = e.sum(0) * scale
    grad_Y = grad_c = None
    if Q_f is not None:
        sa = torch.sigmoid(A_f)
        e_fb = (lambda_max * s - sa) * (sa * (1.0 - sa)) * fb_gain
        grad_Y = (e_fb.t() @ Q_f) * fb_scale
        grad_c = e_fb.sum(0) * fb_scale
    return e, grad_W, grad_b, grad_Y, grad_c


def output_loss(avg: PhaseAverages, lambda_max: float) -> Tensor:
    """Per-lane loss mean_i (lam_t - lambda_max sigma(C_f))^2 of the output layer (section 5.4)."""
    return torch.sub(avg.lam_t[-1], torch.sigmoid(avg.C_f[-1]), alpha=lambda_max).square_().mean(1)


def class_scores(C_out: Tensor, neurons_per_class: int) -> Tensor:
    """Per-class mean of the output potentials (B, classes): argmax is the prediction."""
    if neurons_per_class == 1:
        return C_out
    return C_out.reshape(C_out.shape[0], -1, neurons_per_class).mean(2)


# ---- the simulation -------------------------------------------------------------------------------

@dataclass
class _Accumulators:
    C: list[Tensor]
    lam: list[Tensor]
    P: list[Tensor]
    A: list[Tensor]
    Q: list[Tensor]
    extra: dict = field(default_factory=dict)


def _zeros_like_layers(state: LaneState, sizes: Sequence[int]) -> list[Tensor]:
    dtype, device, B = state.C[0].dtype, state.C[0].device, state.lanes
    return [torch.zeros(B, n, dtype=dtype, device=device) for n in sizes]


def _run_phase(W, b, Y, c, state: LaneState, x_rate: Tensor, teach: Tensor | None,
               lengths: Tensor, window: Tensor, offsets: list[Tensor] | None, seed: int,
               lane_key: Tensor, params: SimParams, kappa: Tensor, phase: str,
               recorder: Recorder | None, original_quirks: bool,
               draw: list[bool]) -> _Accumulators:
    """Simulate one phase; lane b runs lengths[b] steps and then holds (its state is frozen)."""
    M, sizes = params.n_layers, params.sizes
    B = state.lanes
    dtype = state.C[0].dtype
    lanes = torch.arange(B, device=x_rate.device)
    acc = _Accumulators(
        C=_zeros_like_layers(state, sizes[1:]), lam=_zeros_like_layers(state, sizes[1:]),
        P=_zeros_like_layers(state, sizes[:-1]), A=_zeros_like_layers(state, sizes[1:-1]),
        Q=_zeros_like_layers(state, [sizes[params.feedback_source(m) + 1] for m in range(M - 1)]))
    steps = int(lengths.max()) if B else 0
    for t_rel in range(steps):
        active = lengths > t_rel                                  # (B,)
        in_win = active & (t_rel >= lengths - window)
        w_in = in_win.to(dtype)[:, None]
        t = state.step
        slot = t % params.taps
        # input layer
        if params.spiking_feedforward:
            s = spike_counts(x_rate, lane_key, t, 0, seed)
            state.in_ring[lanes[active], slot[active]] = s[active]
            p = psp(state.in_ring, t, kappa)
        else:
            p = x_rate.to(dtype)
        snapshot = []
        for m in range(M):
            hidden = m < M - 1
            basal = p @ W[m].t() + b[m]
            acc.P[m] += w_in * p
            apical = None
            if hidden:
                src = params.feedback_source(m)
                if params.spiking_feedback:
                    q = psp(state.rings[src], t, kappa, stale=True)
                else:
                    q = state.lam[src]                               # rates of step t - 1
                apical = q @ Y[m].t()
                if c is not None and c[m] is not None:
                    apical = apical + c[m]
                C_new = soma_hidden(state.C[m], basal, apical, params, original_quirks)
                acc.Q[m] += w_in * q
                if offsets is None:
                    acc.A[m] += w_in * apical
                else:                                                # per-neuron plateau windows
                    end = (lengths[:, None] - 1 - offsets[m])
                    mask = active[:, None] & (t_rel <= end) & (t_rel > end - window[:, None])
                    acc.A[m] += mask.to(dtype) * apical
            else:
                C_new = soma_output(state.C[m], basal, teach, params)
            lam_new = rate(C_new, params.lambda_max)
            keep = active[:, None]
            state.C[m].copy_(torch.where(keep, C_new, state.C[m]))
            state.lam[m].copy_(torch.where(keep, lam_new, state.lam[m]))
            if hidden:
                state.A[m].copy_(torch.where(keep, apical, state.A[m]))
            acc.C[m] += w_in * C_new
            acc.lam[m] += w_in * lam_new
            spikes = None
            if draw[m + 1]:
                spikes = spike_counts(lam_new, lane_key, t, m + 1, seed)
                state.rings[m][lanes[active], slot[active]] = spikes[active]
            if recorder is not None:
                snapshot.append({"B": basal, "A": apical, "C": C_new, "lam": lam_new,
                                 "spikes": spikes})
            if m < M - 1:
                p = psp(state.rings[m], t, kappa) if params.spiking_feedforward else lam_new
        state.step += active.to(torch.int64)
        if recorder is not None:
            recorder(phase, t_rel, snapshot)
    return acc


def simulate_training_example(W: Sequence[Tensor], b: Sequence[Tensor], Y: Sequence[Tensor],
                              c: Sequence[Tensor] | None, state: LaneState, x_rate: Tensor,
                              target: Tensor, lengths: Tensor, windows: Tensor,
                              offsets: Sequence[Tensor] | None, seed: int, lane_key: Tensor,
                              params: SimParams, recorder: Recorder | None = None,
                              original_quirks: bool = False) -> PhaseAverages:
    """Forward then target phase of one training example in every lane; returns the averages.

    Args:
        W, b: per layer (n_m, n_{m-1}) and (n_m,). Y, c: per hidden layer (n_m, n_fb) and (n_m,)
            (c None or a list of None: no feedback bias).
        state: the lanes' state, advanced in place.
        x_rate: input rates lambda_max * pixel (B, n_in).
        target: teaching conductances g_E (B, n_out) in {0, 1}.
        lengths, windows: (B, 2) int64 phase lengths and averaging windows (forward, target).
        offsets: per hidden layer (B, 2, n_m) int64 random plateau offsets, or None.
        seed, lane_key: the random-number key and each lane's identity (B,) int64.
    """
    kappa = params.kappa(state.C[0].dtype, x_rate.device)
    draw = params.spiking_populations(training=True)
    cs = list(c) if c is not None else [None] * (params.n_layers - 1)
    if all(v is None for v in cs):
        cs = None
    offs_f = [o[:, 0] for o in offsets] if offsets is not None else None
    offs_t = [o[:, 1] for o in offsets] if offsets is not None else None
    fw = _run_phase(W, b, Y, cs, state, x_rate, None, lengths[:, 0], windows[:, 0], offs_f, seed,
                    lane_key, params, kappa, "forward", recorder, original_quirks, draw)
    tg = _run_phase(W, b, Y, cs, state, x_rate, target.to(state.C[0].dtype), lengths[:, 1],
                    windows[:, 1], offs_t, seed, lane_key, params, kappa, "target", recorder,
                    original_quirks, draw)
    wf = windows[:, 0].to(state.C[0].dtype)[:, None]
    wt = windows[:, 1].to(state.C[0].dtype)[:, None]
    return PhaseAverages(
        C_f=[v / wf for v in fw.C], C_t=[v / wt for v in tg.C],
        lam_f=[v / wf for v in fw.lam], lam_t=[v / wt for v in tg.lam],
        P_f=[v / wf for v in fw.P], A_f=[v / wf for v in fw.A], A_t=[v / wt for v in tg.A],
        Q_f=[v / wf for v in fw.Q])


def simulate_test(W: Sequence[Tensor], b: Sequence[Tensor], Y: Sequence[Tensor],
                  c: Sequence[Tensor] | None, x_rate: Tensor, seed: int, lane_key: Tensor,
                  params: SimParams, dtype: torch.dtype = torch.float32,
                  recorder: Recorder | None = None, original_quirks: bool = False) -> Tensor:
    """The test procedure (section 5.5): every lane starts from zero state and runs
    ``test_steps`` forward steps; returns the output potentials averaged over the last
    ``test_window`` steps (B, n_out)."""
    B = x_rate.shape[0]
    state = LaneState.zeros(B, params, dtype, x_rate.device)
    kappa = params.kappa(dtype, x_rate.device)
    draw = params.spiking_populations(training=False)
    cs = list(c) if c is not None else None
    if cs is not None and all(v is None for v in cs):
        cs = None
    lengths = torch.full((B,), params.test_steps, dtype=torch.int64, device=x_rate.device)
    window = torch.full_like(lengths, params.test_window)
    acc = _run_phase(W, b, Y, cs, state, x_rate, None, lengths, window, None, seed, lane_key,
                     params, kappa, "test", recorder, original_quirks, draw)
    return acc.C[-1] / params.test_window


# ---- online (batch-1) training --------------------------------------------------------------------

def symmetric_feedback(W: Sequence[Tensor], Y: Sequence[Tensor], broadcast: bool,
                       masks: Sequence[Tensor] | None = None, sparse_gain: float = 1.0) -> None:
    """G17's symmetric feedback from the forward weights, in place (docs/algorithms/
    segregated_dendrites.md §5.7): broadcast Y_{M-2} = W_{M-1}^T and Y_m = W_{m+1}^T Y_{m+1};
    layer-wise Y_m = W_{m+1}^T; the sparse masks (and gain) re-applied when given."""
    above: Tensor | None = None
    for m in range(len(W) - 2, -1, -1):
        factor = W[m + 1].t().to(torch.float64).clone()
        y = factor if (not broadcast or above is None) else factor @ above
        above = y
        if masks:
            y = y * masks[m] * sparse_gain
        Y[m].copy_(y)


def online_update(W: Sequence[Tensor], b: Sequence[Tensor], Y: Sequence[Tensor],
                  c: Sequence[Tensor | None] | None, avg: PhaseAverages, lambda_max: float,
                  kinds: Sequence[int], lrs: Sequence[float], scales: Sequence[float],
                  gains: Sequence[float], fb_lrs: Sequence[float] = (), fb_gain: float = 1.0,
                  fb_scale: float = 0.0, plasticity_fn=None) -> list[Tensor]:
    """One example's plasticity (one lane) and plain SGD step, in place: per layer, from the
    output down, the error e and gradients of :func:`plasticity` (or ``plasticity_fn``, the
    fused op), then W <- W - lr grad_W, b <- b - lr grad_b (``p.add_(grad, alpha=-lr)``, as
    ``torch.optim.SGD`` without momentum), and with learned feedback (``fb_lrs``) Y and c at
    their own rates. The backprop kind reads the error above through the pre-update W. Returns
    the errors."""
    plasticity_fn = plasticity_fn or plasticity
    M = len(W)
    errors: list[Tensor] = [avg.C_f[m] for m in range(M)]
    grads = [None] * M
    for m in range(M - 1, -1, -1):
        if kinds[m] == KIND_OUTPUT:
            a, b_ = avg.lam_t[m], None
        elif kinds[m] == KIND_HIDDEN:
            a, b_ = avg.A_t[m], avg.A_f[m]
        else:
            a, b_ = errors[m + 1] @ W[m + 1], None
        fb = bool(fb_lrs) and m < M - 1
        e, gW, gb, gY, gc = plasticity_fn(kinds[m], avg.C_f[m], avg.P_f[m], a, b_, lambda_max,
                                          gains[m], scales[m], A_f=avg.A_f[m] if fb else None,
                                          Q_f=avg.Q_f[m] if fb else None, fb_gain=fb_gain,
                                          fb_scale=fb_scale)
        errors[m], grads[m] = e, (gW, gb, gY, gc)
    for m, (gW, gb, gY, gc) in enumerate(grads):
        W[m].add_(gW, alpha=-lrs[m])
        b[m].add_(gb, alpha=-lrs[m])
        if gY is not None:
            Y[m].add_(gY, alpha=-fb_lrs[m])
            if c is not None and c[m] is not None:
                c[m].add_(gc, alpha=-fb_lrs[m])
    return errors


def train_online(W: Sequence[Tensor], b: Sequence[Tensor], Y: Sequence[Tensor],
                 c: Sequence[Tensor | None] | None, masks: Sequence[Tensor] | None,
                 state: LaneState, x_rate: Tensor, target: Tensor, lengths: Tensor,
                 windows: Tensor, offsets: Sequence[Tensor] | None, seed: int, lane_key: Tensor,
                 params: SimParams, kinds: Sequence[int], lrs: Sequence[float],
                 scales: Sequence[float], gains: Sequence[float], fb_lrs: Sequence[float] = (),
                 fb_gain: float = 1.0, fb_scale: float = 0.0, symmetric: bool = False,
                 sparse_gain: float = 1.0, original_quirks: bool = False, simulate=None,
                 plasticity_fn=None, after_update=None
                 ) -> tuple[PhaseAverages, Tensor, Tensor]:
    """Online training of K consecutive examples in one lane (the reference of
    ``bpdl::segregated_train_online``): example k runs its forward and target phase from the
    state example k - 1 left (:func:`simulate_training_example` on row k of ``x_rate``,
    ``target`` and the phase plan); for every example but the last, :func:`online_update` then
    takes its SGD step and the feedback is maintained (learned feedback re-masked, symmetric
    feedback recomputed: :func:`symmetric_feedback`; or ``after_update()``). This is batch-1
    training exactly: the last example's update is left to the caller's optimiser.

    Returns the last example's phase averages and the output layer's lam_t and C_f (K, n_out)
    of every example. ``simulate`` and ``plasticity_fn`` replace the reference functions (the
    rule passes the fused ops when a configuration has no fused online path).
    """
    simulate = simulate or simulate_training_example
    K = x_rate.shape[0]
    lam_out, C_out = [], []
    avg = None
    for k in range(K):
        row = slice(k, k + 1)
        avg = simulate(W, b, Y, c, state, x_rate[row], target[row], lengths[row], windows[row],
                       None if offsets is None else [o[row] for o in offsets], seed, lane_key,
                       params, original_quirks=original_quirks)
        lam_out.append(avg.lam_t[-1])
        C_out.append(avg.C_f[-1])
        if k == K - 1:
            break
        online_update(W, b, Y, c, avg, params.lambda_max, kinds, lrs, scales, gains, fb_lrs,
                      fb_gain, fb_scale, plasticity_fn)
        if after_update is not None:
            after_update()
        elif symmetric:
            symmetric_feedback(W, Y, params.broadcast, masks, sparse_gain)
        elif masks and fb_lrs:
            for m, mask in enumerate(masks):
                Y[m].mul_(mask)
    return avg, torch.cat(lam_out), torch.cat(C_out)
