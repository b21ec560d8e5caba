"""Dendritic cortical microcircuits (Sacramento, Costa, Bengio & Senn 2018, "S18";
docs/algorithms/microcircuits.md): the reference math in plain PyTorch.

Layers k = 0 .. N (0 the input, N the output). Hidden layer k has n_k pyramidal neurons with a
basal and an apical dendrite, and n_{k+1} interneurons, one per pyramidal neuron of layer k + 1.
With rates r = phi(u):

    v_B,k = W^PP_{k,k-1} r_{k-1} + b_k                    basal (feedforward) potential
    v_A,k = W^PP_{k,k+1} r_{k+1} + W^PI_k phi(u^I_k)      apical potential (hidden layers)
    v^I_k = W^IP_k r_k + b^I_k                           interneuron dendrite
    du_k/dt   = -g_lk u + g_B (v_B - u) + g_A (v_A - u) [+ g_som (u_trgt - u) at the output,
                where g_A = 0] + sigma xi
    du^I_k/dt = -g_lk u^I + g_D (v^I - u^I) + g_som^I (u_{k+1} - u^I) + sigma xi

and the plasticity (S18 Eqs. 7-9), each induction term low-pass filtered with tau_w:

    W^PP_{k,k-1}: (phi(u_k) - phi(a_k v_B,k)) r_{k-1}^T,  a_k = g_B / (g_lk + g_B + g_A)
    W^IP_k:       (phi(u^I_k) - phi(d v^I_k)) r_k^T,      d = g_D / (g_lk + g_D)
    W^PI_k:       (0 - v_A,k) phi(u^I_k)^T

(the learnable thresholds b are weights from a constant-1 input). Two ways to run it:

- :func:`full_step`: one Euler-Maruyama step of every lane with the continuous plasticity of
  §6.2 (shared weights, one aggregate trace per weight matrix); the reference of the fused
  ``bpdl::microcircuit_run`` kernels.
- :func:`steady_state`: the noiseless fixed point of a presentation (§6.4), computed by sweeps
  up and down the layers: ``"exact"`` solves the fixed-point equations of the dynamics above,
  ``"paper_literal"`` uses S18's convex mixing forms.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from bpdl.functional.random import philox4x32_10

__all__ = [
    "MICRO_STREAM", "MicroParams", "MicroState", "MicroWeights", "SteadyState", "TRANSFERS",
    "full_run", "full_step", "noise", "phi", "plasticity_terms", "steady_state",
    "steady_state_updates",
]

TRANSFERS = ("logistic", "soft_relu")
#: Philox stream of the somatic noise; population p adds to it (pyramidal layer k: 2k, its
#: interneurons: 2k + 1).
MICRO_STREAM = 0x3C100000
_MASK32 = 0xFFFFFFFF


@dataclass(frozen=True)
class MicroParams:
    """Constants of the microcircuit (docs/algorithms/microcircuits.md §6.5; time in ms).

    Conductances, time step and presentation follow the two independent reimplementations the
    docs cite (S18's supplementary values are not available to bpdl): g_lk 0.1, g_B 1, g_A 0.8,
    g_D 1, g_som = g_som^I 0.8, dt 0.1 ms, 1,000 steps (100 ms) per pattern, tau_w 30 ms,
    input low-pass 3 ms, sigma 0.1. ``transfer``: the logistic (MNIST) or the soft rectifier
    gamma log(1 + e^(beta (u - theta))) of the regression task.
    """

    sizes: tuple[int, ...]
    g_lk: float = 0.1
    g_B: float = 1.0
    g_A: float = 0.8
    g_D: float = 1.0
    g_som: float = 0.8
    g_som_I: float = 0.8
    dt: float = 0.1
    tau_w: float = 30.0
    tau_in: float = 3.0
    sigma: float = 0.1
    transfer: str = "logistic"
    gamma: float = 0.1
    beta: float = 1.0
    theta: float = 3.0

    @property
    def N(self) -> int:
        """Index of the output layer (the number of weight layers)."""
        return len(self.sizes) - 1

    def basal_factor(self, k: int) -> float:
        """a_k = g_B / (g_lk + g_B + g_A), g_A = 0 at the output: u = a_k v_B bottom-up."""
        g_A = 0.0 if k == self.N else self.g_A
        return self.g_B / (self.g_lk + self.g_B + g_A)

    @property
    def interneuron_factor(self) -> float:
        """d = g_D / (g_lk + g_D): the interneuron's own dendritic prediction."""
        return self.g_D / (self.g_lk + self.g_D)

    def self_predicting_scale(self, k: int) -> float:
        """W^IP_k = s W^PP_{k+1,k} makes u^I_k = u_{k+1} at the bottom-up fixed point:
        s = g_B (g_lk + g_D) / (g_D (g_lk + g_B + g_A,k+1))."""
        return self.basal_factor(k + 1) / self.interneuron_factor


@dataclass
class MicroWeights:
    """The weights, per weight layer k = 1 .. N (list index k - 1): forward ``W`` (n_k, n_{k-1})
    and thresholds ``b``; per hidden layer: top-down ``W_td`` (n_k, n_{k+1}), ``W_pi``
    (n_k, n_{k+1}), ``W_ip`` (n_{k+1}, n_k) and the interneurons' thresholds ``b_ip``."""

    W: list[Tensor]
    b: list[Tensor]
    W_td: list[Tensor]
    W_pi: list[Tensor]
    W_ip: list[Tensor]
    b_ip: list[Tensor]

    def named(self) -> dict[str, list[Tensor]]:
        return {"W": self.W, "b": self.b, "W_td": self.W_td, "W_pi": self.W_pi,
                "W_ip": self.W_ip, "b_ip": self.b_ip}


def phi(u: Tensor, p: MicroParams) -> Tensor:
    """The transfer function: logistic, or gamma log(1 + exp(beta (u - theta)))."""
    if p.transfer == "logistic":
        return torch.sigmoid(u)
    return p.gamma * torch.nn.functional.softplus(u - p.theta, beta=p.beta)


# ---- the steady state (§6.4) ----------------------------------------------------------------------

@dataclass
class SteadyState:
    """A presentation's fixed point, per layer (list index k - 1 for layer k): somatic ``u``,
    basal ``v_B`` and the presynaptic rates ``pre`` it was computed from; per hidden layer the
    apical ``v_A``, interneuron ``u_I`` and dendrite ``v_I``."""

    u: list[Tensor]
    v_B: list[Tensor]
    pre: list[Tensor]
    v_A: list[Tensor] = field(default_factory=list)
    u_I: list[Tensor] = field(default_factory=list)
    v_I: list[Tensor] = field(default_factory=list)

    def output_rates(self, p: MicroParams) -> Tensor:
        return phi(self.u[-1], p)


def _bottom_up(w: MicroWeights, x: Tensor, p: MicroParams, mode: str,
               rates: list[Tensor] | None) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """Basal potentials from the current presynaptic rates (``rates[k-1]`` for layer k; None:
    the bottom-up sweep itself), and the bottom-up somata."""
    N = p.N
    us, vBs, pres = [], [], []
    r = x
    for k in range(1, N + 1):
        pre = r if rates is None else (x if k == 1 else rates[k - 2])
        v_B = pre @ w.W[k - 1].t() + w.b[k - 1]
        u = v_B if mode == "paper_literal" else p.basal_factor(k) * v_B
        us.append(u)
        vBs.append(v_B)
        pres.append(pre)
        r = phi(u, p)
    return us, vBs, pres


def steady_state(w: MicroWeights, x: Tensor, u_trgt: Tensor | None, p: MicroParams,
                 mode: str = "exact", sweeps: int = 1, lam: tuple[float, float, float] | None
                 = None) -> SteadyState:
    """The fixed point of a presentation of ``x`` (B, n_0) with output target potentials
    ``u_trgt`` (B, n_N) (None: no teacher), by ``sweeps`` rounds of a sweep up the layers
    (basal potentials from the current rates) and a sweep down (output nudged; per hidden layer,
    from the top: the interneurons nudged toward the layer above, the apical potential, the
    soma).

    ``"exact"``: the noiseless fixed point of the dynamics of the module docstring, layer by
    layer: bottom-up u = a_k v_B; output u = (g_B v_B + g_som u_trgt) / (g_lk + g_B + g_som);
    interneuron u^I = (g_D v^I + g_som^I u_{k+1}) / (g_lk + g_D + g_som^I); hidden
    u = (g_B v_B + g_A v_A) / (g_lk + g_B + g_A). With enough sweeps this is the fixed point of
    the full dynamics at sigma = 0. ``"paper_literal"``: S18 §3.4's convex forms with the mixing
    ratios ``lam`` = (lambda_N, lambda_I, lambda_hidden) (default: the conductance ratios
    g_som / (g_lk + g_B + g_som), g_som^I / (g_lk + g_D + g_som^I), g_A / (g_lk + g_B + g_A)):
    bottom-up u = v_B, u_N = (1 - lambda_N) v_B + lambda_N u_trgt, u^I = (1 - lambda_I) v^I +
    lambda_I u_{k+1}, u = (1 - lambda) v_B + lambda v_A.
    """
    if mode not in ("exact", "paper_literal"):
        raise ValueError(f"steady_state mode must be exact or paper_literal, got {mode!r}")
    N = p.N
    if lam is None:
        lam = (p.g_som / (p.g_lk + p.g_B + p.g_som), p.g_som_I / (p.g_lk + p.g_D + p.g_som_I),
               p.g_A / (p.g_lk + p.g_B + p.g_A))
    lam_N, lam_I, lam_H = lam
    rates: list[Tensor] | None = None
    state = None
    for _ in range(max(1, sweeps)):
        us, vBs, pres = _bottom_up(w, x, p, mode, rates)
        if u_trgt is not None:
            if mode == "exact":
                us[-1] = (p.g_B * vBs[-1] + p.g_som * u_trgt) / (p.g_lk + p.g_B + p.g_som)
            else:
                us[-1] = (1 - lam_N) * vBs[-1] + lam_N * u_trgt
        v_As, u_Is, v_Is = [None] * (N - 1), [None] * (N - 1), [None] * (N - 1)
        for k in range(N - 1, 0, -1):
            # the interneurons predict the layer above from this layer's rates (us[k - 1] still
            # holds its value from the sweep up: the sweep down reaches it next)
            r_k = pres[k]
            v_I = r_k @ w.W_ip[k - 1].t() + w.b_ip[k - 1]
            above = us[k]
            if mode == "exact":
                u_I = (p.g_D * v_I + p.g_som_I * above) / (p.g_lk + p.g_D + p.g_som_I)
            else:
                u_I = (1 - lam_I) * v_I + lam_I * above
            v_A = phi(above, p) @ w.W_td[k - 1].t() + phi(u_I, p) @ w.W_pi[k - 1].t()
            if mode == "exact":
                us[k - 1] = (p.g_B * vBs[k - 1] + p.g_A * v_A) / (p.g_lk + p.g_B + p.g_A)
            else:
                us[k - 1] = (1 - lam_H) * vBs[k - 1] + lam_H * v_A
            v_As[k - 1], u_Is[k - 1], v_Is[k - 1] = v_A, u_I, v_I
        state = SteadyState(us, vBs, pres, v_As, u_Is, v_Is)
        rates = [phi(u, p) for u in us]
    return state


def plasticity_terms(s: SteadyState, p: MicroParams, mode: str = "exact"
                     ) -> dict[str, list[Tensor]]:
    """Per-lane errors of the plasticity rules at a state: ``"W"`` (B, n_k) for the forward
    weights (phi(u) - phi(v_hat_B)), ``"W_ip"`` (B, n_{k+1}) (phi(u^I) - phi(v_hat^I)) and
    ``"W_pi"`` (B, n_k) (-v_A). ``"exact"``: v_hat_B = a_k v_B, v_hat^I = d v^I;
    ``"paper_literal"``: v_hat_B = (1 - lambda) v_B (hidden) and v_B (output), v_hat^I = v^I."""
    N = p.N
    lam_H = p.g_A / (p.g_lk + p.g_B + p.g_A)
    err_W = []
    for k in range(1, N + 1):
        if mode == "exact":
            v_hat = p.basal_factor(k) * s.v_B[k - 1]
        else:
            v_hat = s.v_B[k - 1] if k == N else (1 - lam_H) * s.v_B[k - 1]
        err_W.append(phi(s.u[k - 1], p) - phi(v_hat, p))
    d = p.interneuron_factor if mode == "exact" else 1.0
    err_ip = [phi(u_I, p) - phi(d * v_I, p) for u_I, v_I in zip(s.u_I, s.v_I, strict=True)]
    err_pi = [-v_A for v_A in s.v_A]
    return {"W": err_W, "W_ip": err_ip, "W_pi": err_pi}


def steady_state_updates(s: SteadyState, p: MicroParams, mode: str = "exact"
                         ) -> dict[str, list[Tensor]]:
    """The weight changes of one presentation per unit learning rate, averaged over the lanes
    (S18's minibatch of 10 images: "averaged and then applied"): ``W`` and ``b`` per layer,
    ``W_ip``, ``b_ip``, ``W_pi`` per hidden layer. The presynaptic rates of the forward weights
    are those the basal potentials came from; the interneurons' are their layer's."""
    e = plasticity_terms(s, p, mode)
    B = s.u[0].shape[0]
    out: dict[str, list[Tensor]] = {"W": [], "b": [], "W_ip": [], "b_ip": [], "W_pi": []}
    for k in range(1, p.N + 1):
        out["W"].append(e["W"][k - 1].t() @ s.pre[k - 1] / B)
        out["b"].append(e["W"][k - 1].mean(0))
    for k in range(1, p.N):
        r_k = s.pre[k]  # layer k's rates, presynaptic to the layer above and its interneurons
        out["W_ip"].append(e["W_ip"][k - 1].t() @ r_k / B)
        out["b_ip"].append(e["W_ip"][k - 1].mean(0))
        out["W_pi"].append(e["W_pi"][k - 1].t() @ phi(s.u_I[k - 1], p) / B)
    return out


# ---- the full dynamics (§6.1, §6.2) --------------------------------------------------------------

@dataclass
class MicroState:
    """What lanes carry from step to step: the pyramidal somata ``u`` (per layer k = 1..N,
    (B, n_k)), the interneurons ``u_I`` (per hidden layer, (B, n_{k+1})) and the low-pass
    filtered input rates ``r0`` (B, n_0)."""

    u: list[Tensor]
    u_I: list[Tensor]
    r0: Tensor

    @classmethod
    def zeros(cls, lanes: int, p: MicroParams, dtype=torch.float32, device=None) -> MicroState:
        s = p.sizes
        return cls([torch.zeros(lanes, s[k], dtype=dtype, device=device) for k in range(1, p.N + 1)],
                   [torch.zeros(lanes, s[k + 1], dtype=dtype, device=device)
                    for k in range(1, p.N)],
                   torch.zeros(lanes, s[0], dtype=dtype, device=device))

    def tensors(self) -> list[Tensor]:
        return [*self.u, *self.u_I, self.r0]

    def clone(self) -> MicroState:
        return MicroState([t.clone() for t in self.u], [t.clone() for t in self.u_I],
                          self.r0.clone())


def noise(example: Tensor, n: int, step: int, population: int, seed: int) -> Tensor:
    """Standard normals (B, n), Box-Muller on Philox4x32-10 blocks keyed by ``seed`` and counted
    by (neuron pair, example, step in the presentation, MICRO_STREAM + population): two normals
    per block (words 0, 1 and 2, 3), so a lane's noise depends only on its example."""
    pairs = (n + 1) // 2
    g = torch.arange(pairs, dtype=torch.int64, device=example.device)
    c0 = g.expand(example.shape[0], pairs).reshape(-1)
    c1 = example.to(torch.int64)[:, None].expand(-1, pairs).reshape(-1) & _MASK32
    c2 = torch.full_like(c0, step)
    c3 = torch.full_like(c0, MICRO_STREAM + population)
    words = philox4x32_10(c0, c1, c2, c3, seed & _MASK32, (seed >> 32) & _MASK32)
    u = [(w.to(torch.float64) + 0.5) * 2.0**-32 for w in words]
    z0 = torch.sqrt(-2.0 * torch.log(u[0])) * torch.cos(2.0 * math.pi * u[1])
    z1 = torch.sqrt(-2.0 * torch.log(u[2])) * torch.cos(2.0 * math.pi * u[3])
    return torch.stack([z0, z1], dim=1).reshape(example.shape[0], 2 * pairs)[:, :n]


def full_step(w: MicroWeights, traces: dict[str, list[Tensor | None]], state: MicroState,
              x: Tensor, u_trgt: Tensor | None, p: MicroParams, etas: dict[str, list[float]],
              example: Tensor, step: int, seed: int, sigma: float | None = None) -> None:
    """One Euler-Maruyama step of every lane, in place, with the continuous plasticity of §6.2.

    Order (explicit Euler: everything from the state at step t): rates r = phi(u) and the
    filtered input r_0; the dendritic potentials; the induction terms e pre^T summed over the
    lanes; the traces T <- T + (dt / tau_w)(sum_b e_b pre_b^T - T) and the weights
    W <- W + dt eta T for every matrix with a trace (``traces[name][i]`` not None, ``etas``
    its rate); then the somata u <- u + dt du/dt + sigma sqrt(dt) xi (xi: :func:`noise`, keyed
    by the lane's ``example`` index and ``step``) and the input filter
    r_0 <- r_0 + (dt / tau_in)(x - r_0). The thresholds' traces use a constant-1 input."""
    N, dt = p.N, p.dt
    sigma = p.sigma if sigma is None else sigma
    r = [state.r0] + [phi(u, p) for u in state.u]
    r_I = [phi(u, p) for u in state.u_I]
    v_B = [r[k - 1] @ w.W[k - 1].t() + w.b[k - 1] for k in range(1, N + 1)]
    v_A = [r[k + 1] @ w.W_td[k - 1].t() + r_I[k - 1] @ w.W_pi[k - 1].t() for k in range(1, N)]
    v_I = [r[k] @ w.W_ip[k - 1].t() + w.b_ip[k - 1] for k in range(1, N)]
    e_W = [phi(state.u[k - 1], p) - phi(p.basal_factor(k) * v_B[k - 1], p)
           for k in range(1, N + 1)]
    e_ip = [r_I[k - 1] - phi(p.interneuron_factor * v_I[k - 1], p) for k in range(1, N)]
    induction = {
        "W": [(e_W[k - 1], r[k - 1]) for k in range(1, N + 1)],
        "b": [(e_W[k - 1], None) for k in range(1, N + 1)],
        "W_ip": [(e_ip[k - 1], r[k]) for k in range(1, N)],
        "b_ip": [(e_ip[k - 1], None) for k in range(1, N)],
        "W_pi": [(-v_A[k - 1], r_I[k - 1]) for k in range(1, N)],
    }
    weights = w.named()
    a = dt / p.tau_w
    for name, terms in induction.items():
        for i, (err, pre) in enumerate(terms):
            T = traces.get(name, [None] * len(terms))[i]
            if T is None:
                continue
            G = err.t() @ pre if pre is not None else err.sum(0)
            T.mul_(1.0 - a).add_(G, alpha=a)
            weights[name][i].add_(T, alpha=dt * etas[name][i])
    du, du_I = [], []
    for k in range(1, N + 1):
        u = state.u[k - 1]
        d = -p.g_lk * u + p.g_B * (v_B[k - 1] - u)
        if k < N:
            d = d + p.g_A * (v_A[k - 1] - u)
        elif u_trgt is not None:
            d = d + p.g_som * (u_trgt - u)
        du.append(d)
    for k in range(1, N):
        u_I = state.u_I[k - 1]
        du_I.append(-p.g_lk * u_I + p.g_D * (v_I[k - 1] - u_I)
                    + p.g_som_I * (state.u[k] - u_I))
    sq = sigma * math.sqrt(dt)
    for pop, (u, d) in enumerate([(state.u[k - 1], du[k - 1]) for k in range(1, N + 1)]
                                 + [(state.u_I[k - 1], du_I[k - 1]) for k in range(1, N)]):
        u.add_(d, alpha=dt)
        if sq:
            population = 2 * (pop + 1) if pop < N else 2 * (pop - N + 1) + 1
            u.add_(noise(example, u.shape[1], step, population, seed).to(u.dtype), alpha=sq)
    state.r0.add_(x - state.r0, alpha=dt / p.tau_in)


def with_sizes(p: MicroParams, sizes: tuple[int, ...]) -> MicroParams:
    return replace(p, sizes=tuple(sizes))


def full_run(w: MicroWeights, traces: dict[str, list[Tensor | None]], state: MicroState,
             x: Tensor, u_trgt: Tensor | None, p: MicroParams, etas: dict[str, list[float]],
             example: Tensor, step0: int, steps: int, seed: int, apply_last: bool = True,
             sigma: float | None = None, record=None) -> None:
    """``steps`` steps of :func:`full_step` (steps ``step0`` .. ``step0 + steps - 1`` of the
    presentation: the noise's step counter), the reference of ``bpdl::microcircuit_run``.
    ``apply_last=False``: the last step updates the traces but leaves the weights to the caller
    (the rule hands dt T to the optimiser as the step's pseudo-gradient). ``record``: called as
    ``record(t, state, w)`` before each step (the dynamics plots)."""
    for t in range(steps):
        if record is not None:
            record(step0 + t, state, w)
        last = t == steps - 1 and not apply_last
        full_step(w, traces, state, x, u_trgt, p, {k: [0.0 if last else e for e in v]
                                                   for k, v in etas.items()},
                  example, step0 + t, seed, sigma)
