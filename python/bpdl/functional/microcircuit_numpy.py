"""A faithful single-example NumPy port of S18's full dynamics (docs/algorithms/microcircuits.md
§6.1-6.2): the way public microcircuit scripts simulate, one example at a time, one
Euler-Maruyama step after another, with NumPy matrix-vector products and outer products for the
continuous plasticity. It is the baseline ``benchmarks/microcircuits.py`` times the fused kernels
against; tests check that it follows the same equations as
:func:`bpdl.functional.microcircuit.full_run` (equal trajectories without noise). Its noise
comes from NumPy's generator, not bpdl's Philox numbers.
"""

from __future__ import annotations

import math

import numpy as np

from bpdl.functional.microcircuit import MicroParams, MicroWeights

__all__ = ["NumpyMicrocircuit"]


class NumpyMicrocircuit:
    """One microcircuit, one example at a time. ``weights``: a :class:`MicroWeights` (copied to
    NumPy arrays); ``etas``: the learning rate of each matrix, in the families of
    :meth:`MicroWeights.named` (0 or a missing family: not plastic)."""

    def __init__(self, weights: MicroWeights, p: MicroParams, etas: dict[str, list[float]],
                 dtype=np.float64, seed: int = 0):
        self.p, self.dtype = p, dtype
        self.w = {name: [t.detach().cpu().numpy().astype(dtype, copy=True) for t in ts]
                  for name, ts in weights.named().items()}
        self.etas = {name: list(etas.get(name, [0.0] * len(ts))) for name, ts in self.w.items()}
        self.traces = {name: [np.zeros_like(t) for t in ts] for name, ts in self.w.items()}
        s = p.sizes
        self.u = [np.zeros(s[k], dtype) for k in range(1, p.N + 1)]
        self.u_I = [np.zeros(s[k + 1], dtype) for k in range(1, p.N)]
        self.r0 = np.zeros(s[0], dtype)
        self.rng = np.random.default_rng(seed)

    def phi(self, u: np.ndarray) -> np.ndarray:
        p = self.p
        if p.transfer == "logistic":
            return 1.0 / (1.0 + np.exp(-u))
        z = p.beta * (u - p.theta)
        return p.gamma * np.where(z > 20.0, z, np.log1p(np.exp(np.minimum(z, 20.0)))) / p.beta

    def step(self, x: np.ndarray, u_trgt: np.ndarray | None, sigma: float | None = None) -> None:
        """One step of §6.1-6.2 from the state at this step (explicit Euler)."""
        p, w, N, dt = self.p, self.w, self.p.N, self.p.dt
        sigma = p.sigma if sigma is None else sigma
        r = [self.r0] + [self.phi(u) for u in self.u]
        r_I = [self.phi(u) for u in self.u_I]
        v_B = [w["W"][k - 1] @ r[k - 1] + w["b"][k - 1] for k in range(1, N + 1)]
        v_A = [w["W_td"][k - 1] @ r[k + 1] + w["W_pi"][k - 1] @ r_I[k - 1] for k in range(1, N)]
        v_I = [w["W_ip"][k - 1] @ r[k] + w["b_ip"][k - 1] for k in range(1, N)]
        a = dt / p.tau_w
        for k in range(1, N + 1):
            e = r[k] - self.phi(p.basal_factor(k) * v_B[k - 1])
            self._learn("W", k - 1, np.outer(e, r[k - 1]), a)
            self._learn("b", k - 1, e, a)
        for k in range(1, N):
            e = r_I[k - 1] - self.phi(p.interneuron_factor * v_I[k - 1])
            self._learn("W_ip", k - 1, np.outer(e, r[k]), a)
            self._learn("b_ip", k - 1, e, a)
            self._learn("W_pi", k - 1, np.outer(-v_A[k - 1], r_I[k - 1]), a)
        du = []
        for k in range(1, N + 1):
            u = self.u[k - 1]
            d = -p.g_lk * u + p.g_B * (v_B[k - 1] - u)
            if k < N:
                d += p.g_A * (v_A[k - 1] - u)
            elif u_trgt is not None:
                d += p.g_som * (u_trgt - u)
            du.append(d)
        du += [-p.g_lk * u_I + p.g_D * (v_I[k - 1] - u_I) + p.g_som_I * (self.u[k] - u_I)
               for k, u_I in enumerate(self.u_I, start=1)]
        sq = sigma * math.sqrt(dt)
        for u, d in zip(self.u + self.u_I, du, strict=True):
            u += dt * d
            if sq:
                u += sq * self.rng.standard_normal(u.shape[0]).astype(self.dtype)
        self.r0 += (dt / p.tau_in) * (x - self.r0)

    def _learn(self, name: str, i: int, induction: np.ndarray, a: float) -> None:
        eta = self.etas[name][i]
        if not eta:
            return
        T = self.traces[name][i]
        T *= 1.0 - a
        T += a * induction
        self.w[name][i] += (self.p.dt * eta) * T

    def present(self, x: np.ndarray, u_trgt: np.ndarray | None, steps: int,
                sigma: float | None = None) -> None:
        """Present one example ``x`` (n_0,) with the target potentials ``u_trgt`` for ``steps``
        steps."""
        x = np.asarray(x, self.dtype)
        u_trgt = None if u_trgt is None else np.asarray(u_trgt, self.dtype)
        for _ in range(steps):
            self.step(x, u_trgt, sigma)
