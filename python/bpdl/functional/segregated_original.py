"""A single-example NumPy implementation of the segregated-dendrite algorithm, organised the way
the original program is (Guerguiev, Lillicrap & Richards 2017; G-23f,
docs/algorithms/segregated_dendrites.md).

It simulates one example at a time in float64 with column vectors, spike histories that are
shifted by concatenation every step, a dense ``history @ kappas`` PSP, ring buffers of the last
``window`` values for the averages, and the weight update applied after every example. It is
the baseline of ``benchmarks/segregated.py`` (the cost per example of the original algorithm
without bpdl's batching and kernels) and the yardstick of the reproduction test: driven with the
same random draws, bpdl's batched simulator with one lane must follow it step for step.

Random draws are injected: ``spikes(pop, rates, step)`` returns Poisson counts for population
``pop`` (0 = input, m + 1 = layer m) at this lane's step counter; the phase lengths (and random
plateau offsets) are passed per example. :func:`numpy_draws` uses NumPy's generator (the
original's behaviour), :func:`philox_draws` bpdl's counter-based draws for lane 0.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from bpdl.functional.segregated import SimParams, psp_kernel, spike_counts

SpikeDraw = Callable[[int, np.ndarray, int], np.ndarray]


def numpy_draws(seed: int | None = None) -> SpikeDraw:
    """Poisson counts from a NumPy generator, as the original draws them."""
    rng = np.random.default_rng(seed)

    def draw(pop: int, rates: np.ndarray, step: int) -> np.ndarray:
        return rng.poisson(rates)

    return draw


def philox_draws(seed: int, lane_key: int = 0) -> SpikeDraw:
    """bpdl's keyed draws for one lane (the numbers lane ``lane_key`` of the batched simulator
    sees), so a test can drive this port and bpdl with identical spikes."""
    key = torch.tensor([lane_key], dtype=torch.int64)

    def draw(pop: int, rates: np.ndarray, step: int) -> np.ndarray:
        r = torch.from_numpy(np.ascontiguousarray(rates[:, 0]))[None, :]
        counts = spike_counts(r, key, torch.tensor([step]), pop, seed)
        return counts[0].numpy().astype(np.float64)[:, None]

    return draw


def _sigma(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


class OriginalNetwork:
    """One lane of the segregated-dendrite network, simulated one example at a time.

    Args:
        W, b, Y, c: initial parameters (copied to float64 column-vector form); ``c`` None or a
            list of None for no feedback bias.
        params: the resolved constants and switches (:class:`SimParams`).
        spikes: the source of Poisson counts.
        etas: per-layer learning rates (f_etas), output last.
    """

    def __init__(self, W: Sequence, b: Sequence, Y: Sequence, c: Sequence | None,
                 params: SimParams, spikes: SpikeDraw, etas: Sequence[float]):
        def arr(t):
            if torch.is_tensor(t):
                return t.detach().cpu().double().numpy().copy()
            return np.array(t, dtype=np.float64)

        self.p = params
        self.M = params.n_layers
        self.W = [arr(w) for w in W]
        self.b = [arr(v).reshape(-1, 1) for v in b]
        self.Y = [arr(y) for y in Y]
        self.c = [None if (c is None or v is None) else arr(v).reshape(-1, 1)
                  for v in (c if c is not None else [None] * (self.M - 1))]
        self.spikes = spikes
        self.etas = list(etas)
        self.kappas = psp_kernel(params.taps, params.tau_s, params.tau_L).numpy()[::-1][:, None]
        sizes = params.sizes
        T = params.taps
        self.x_hist = np.zeros((sizes[0], T))
        self.S_hist = [np.zeros((n, T)) for n in sizes[1:]]
        self.C = [np.zeros((n, 1)) for n in sizes[1:]]
        self.lam = [np.zeros((n, 1)) for n in sizes[1:]]
        self.A = [np.zeros((n, 1)) for n in sizes[1:-1]]
        self.B = [np.zeros((n, 1)) for n in sizes[1:]]
        self.step = 0
        self.loss = 0.0

    # ---- one step --------------------------------------------------------------------------
    def _psp(self, hist: np.ndarray) -> np.ndarray:
        return hist @ self.kappas

    def _step(self, x_rate: np.ndarray, teach: np.ndarray | None, hists: dict | None) -> None:
        p = self.p
        M = self.M
        if p.spiking_feedforward:
            self.x_hist = np.concatenate([self.x_hist[:, 1:], self.spikes(0, x_rate, self.step)],
                                         axis=1)
            ff = self._psp(self.x_hist)
        else:
            ff = x_rate
        for m in range(M):
            self.B[m] = self.W[m] @ ff + self.b[m]
            if m < M - 1:
                src = M - 1 if p.broadcast else m + 1
                fb = self._psp(self.S_hist[src]) if p.spiking_feedback else self.lam[src]
                self.A[m] = self.Y[m] @ fb
                if self.c[m] is not None:
                    self.A[m] = self.A[m] + self.c[m]
                if p.conductances:
                    dC = -p.g_L * self.C[m] + p.g_B * (self.B[m] - self.C[m])
                    if p.apical_soma:
                        dC = dC + p.g_A * (self.A[m] - self.C[m])
                    self.C[m] = self.C[m] + dC
                elif p.apical_soma:
                    self.C[m] = p.k_B * self.B[m] + p.k_A * self.A[m]
                else:
                    self.C[m] = p.k_B * self.B[m]
                if hists is not None:
                    hists["A"][m].append(self.A[m])
                    hists["Q"][m].append(fb)
            else:
                if p.conductances:
                    dC = -p.g_L * self.C[m] + p.g_D * (self.B[m] - self.C[m])
                    if teach is not None:
                        dC = dC + teach * (p.E_E - self.C[m]) + (1.0 - teach) * (p.E_I - self.C[m])
                    self.C[m] = self.C[m] + dC
                elif teach is None:
                    self.C[m] = p.k_D * self.B[m]
                else:
                    g_I = 1.0 - teach
                    self.C[m] = ((p.g_D * self.B[m] + teach * p.E_E + g_I * p.E_I)
                                 / (p.g_L + p.g_D + teach + g_I))
            self.lam[m] = p.lambda_max * _sigma(self.C[m])
            self.S_hist[m] = np.concatenate(
                [self.S_hist[m][:, 1:], self.spikes(m + 1, self.lam[m], self.step)], axis=1)
            if hists is not None:
                hists["C"][m].append(self.C[m])
                hists["lam"][m].append(self.lam[m])
                hists["P"][m].append(ff)
            if m < M - 1:
                ff = self._psp(self.S_hist[m]) if p.spiking_feedforward else self.lam[m]
        self.step += 1

    def _phase(self, x_rate, teach, length: int, window: int, offsets=None) -> dict:
        M = self.M
        hists = {k: [[] for _ in range(M)] for k in ("C", "lam", "P", "A", "Q")}
        plateau = [None] * (M - 1)
        for t in range(length):
            self._step(x_rate, teach, hists)
            if offsets is not None:
                for m in range(M - 1):
                    recent = np.concatenate(hists["A"][m][-window:], axis=1).mean(axis=1)
                    if plateau[m] is None:
                        plateau[m] = np.zeros(self.C[m].shape[0])
                    due = (length - 1 - offsets[m]) == t
                    plateau[m][due] = recent[due]
        avg = {k: [np.concatenate(h[-window:], axis=1).mean(axis=1, keepdims=True) if h else None
                   for h in hists[k]] for k in hists}
        if offsets is not None:
            avg["A"] = [v[:, None] for v in plateau] + [None]
        return avg

    # ---- a training example and a test example ---------------------------------------------------
    def train_example(self, x: np.ndarray, target: np.ndarray, lengths: tuple[int, int],
                      windows: tuple[int, int], offsets=None) -> tuple[float, int]:
        """Forward phase, target phase, weight update. ``x`` pixels in [0, 1] (n_in,),
        ``target`` the teaching vector (n_out,). Returns (loss, predicted class)."""
        p = self.p
        M = self.M
        x_rate = p.lambda_max * np.asarray(x, dtype=np.float64).reshape(-1, 1)
        t_vec = np.asarray(target, dtype=np.float64).reshape(-1, 1)
        f = self._phase(x_rate, None, lengths[0], windows[0],
                        None if offsets is None else [o[0] for o in offsets])
        pred = int(np.argmax(f["C"][-1].reshape(-1, p.neurons_per_class).mean(axis=1)))
        t = self._phase(x_rate, t_vec, lengths[1], windows[1],
                        None if offsets is None else [o[1] for o in offsets])
        self.loss = float(((t["lam"][-1] - p.lambda_max * _sigma(f["C"][-1])) ** 2).mean())
        for m in range(M - 1, -1, -1):
            s = _sigma(f["C"][m])
            ds = s * (1 - s)
            if m == M - 1:
                e = (t["lam"][m] - p.lambda_max * s) * ds * (p.k_D * p.lambda_max)
                P = p.P_output
            else:
                e = (_sigma(t["A"][m]) - _sigma(f["A"][m])) * ds * (p.k_B * p.lambda_max)
                P = p.P_hidden
            self.W[m] += self.etas[m] * P * (e @ f["P"][m].T)
            self.b[m] += self.etas[m] * P * e
        return self.loss, pred

    def test_example(self, x: np.ndarray) -> np.ndarray:
        """The test procedure from zero state; returns the averaged output potentials (n_out,).
        The training state is kept aside and restored afterwards."""
        p = self.p
        saved = (self.x_hist, self.S_hist, self.C, self.lam, self.A, self.B, self.step)
        T = p.taps
        self.x_hist = np.zeros_like(saved[0])
        self.S_hist = [np.zeros((n, T)) for n in p.sizes[1:]]
        self.C = [np.zeros_like(v) for v in saved[2]]
        self.lam = [np.zeros_like(v) for v in saved[3]]
        self.A = [np.zeros_like(v) for v in saved[4]]
        self.step = 0
        x_rate = p.lambda_max * np.asarray(x, dtype=np.float64).reshape(-1, 1)
        C_hist = []
        for _ in range(p.test_steps):
            self._step(x_rate, None, None)
            C_hist.append(self.C[-1])
        out = np.concatenate(C_hist[-p.test_window:], axis=1).mean(axis=1)
        (self.x_hist, self.S_hist, self.C, self.lam, self.A, self.B, self.step) = saved
        return out
