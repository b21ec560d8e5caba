"""The full dynamics of the microcircuit rule (docs/algorithms/microcircuits.md §6.1, §6.2):
lanes, traces and the presentation of a minibatch.

Every example of a minibatch is a lane. The lanes share the weights and, since the low-pass
filter of the plasticity and the update are linear, one aggregate trace per weight matrix
(§6.2, "Batching with shared weights"). A lane's somata and input filter carry over from one
example to the next and the traces persist, as in S18's continuous presentation; a presentation
is ``steps`` Euler-Maruyama steps, on the fused ``bpdl::microcircuit_run`` kernels
(:mod:`bpdl.ops.microcircuit`) or the PyTorch reference (:func:`bpdl.functional.microcircuit.
full_run`). The weights move at every step but the last inside the simulation; the last step's
change dt T is handed to the optimiser as the pseudo-gradient ``-dt T`` (plain SGD then takes
exactly the step eta dt T).

:func:`record_presentation` records one lane's potentials over a free and a nudged presentation
for ``bpdl plot dynamics``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from bpdl.errors import ConfigError
from bpdl.functional import microcircuit as mc

if TYPE_CHECKING:
    from bpdl.rules.microcircuit import Microcircuit

__all__ = ["backend", "kernels_available", "learning_rates", "plastic_mask",
           "record_presentation", "run_presentation"]

_OP = "microcircuit_run"


def kernels_available(device: torch.device | str) -> bool:
    """Whether the fused kernels are compiled for ``device``."""
    from bpdl import ops

    return ops.has_kernel(_OP, device)


def backend(choice: str, device: torch.device) -> str:
    """``kernels`` or ``reference`` for the rule option ``backend`` on ``device``."""
    if choice == "auto":
        return "kernels" if kernels_available(device) else "reference"
    if choice == "kernels" and not kernels_available(device):
        raise ConfigError(f"backend='kernels' but the fused microcircuit kernels are not compiled "
                          f"for {torch.device(device).type}; use backend='reference' or 'auto'")
    return choice


def plastic_mask(learner: Microcircuit, plastic: set[str]) -> dict[str, list[bool]]:
    """Which matrices of each family learn (the rule's ``plastic`` minus ``fixed_layers``)."""
    w = learner.net.weights().named()
    fixed = set(learner.config.fixed_layers)
    return {family: [family in plastic and not (family in ("W", "b") and i + 1 in fixed)
                     for i in range(len(tensors))] for family, tensors in w.items()}


def learning_rates(learner: Microcircuit) -> dict[str, list[float]]:
    """Each matrix's rate from the optimiser's groups (``pp.k``, ``ip.k``, ``pi.k``), so that
    schedules apply inside the simulation too; the top-down weights never learn."""
    opt = learner._optimizer
    if opt is None:
        raise ConfigError("the microcircuit's full dynamics need the optimiser's learning rates: "
                          "call setup_optimizers (the training loop does) before training")
    lr = {g.get("name"): float(g["lr"]) for g in opt.param_groups}
    N = learner.params.N
    return {"W": [lr[f"pp.{k}"] for k in range(1, N + 1)],
            "b": [lr[f"pp.{k}"] for k in range(1, N + 1)],
            "W_td": [0.0] * (N - 1),
            "W_pi": [lr[f"pi.{k}"] for k in range(1, N)],
            "W_ip": [lr[f"ip.{k}"] for k in range(1, N)],
            "b_ip": [lr[f"ip.{k}"] for k in range(1, N)]}


def _lanes(learner: Microcircuit, B: int, like: Tensor) -> mc.MicroState:
    """The first B lanes (new lanes start at rest; a smaller last minibatch uses the first B)."""
    lanes = learner.lanes
    if lanes is None or lanes.r0.shape[0] < B or lanes.r0.dtype != like.dtype or \
            lanes.r0.device != like.device:
        fresh = mc.MicroState.zeros(B, learner.params, like.dtype, like.device)
        if lanes is not None and lanes.r0.dtype == like.dtype and lanes.r0.device == like.device:
            for new, old in zip(fresh.tensors(), lanes.tensors(), strict=True):
                new[:old.shape[0]] = old
        learner.lanes = lanes = fresh
    if lanes.r0.shape[0] == B:
        return lanes
    return mc.MicroState([t[:B] for t in lanes.u], [t[:B] for t in lanes.u_I], lanes.r0[:B])


def _traces(learner: Microcircuit, mask: dict[str, list[bool]]) -> dict[str, list[Tensor | None]]:
    """The persistent traces of the plastic matrices (created at zero when a matrix starts
    learning, e.g. the forward weights after the self-predicting pre-training)."""
    w = learner.net.weights().named()
    old = learner.traces or {}
    out: dict[str, list[Tensor | None]] = {}
    for family, tensors in w.items():
        prev = old.get(family, [None] * len(tensors))
        out[family] = [(prev[i] if prev[i] is not None else torch.zeros_like(t.detach()))
                       if mask[family][i] else None for i, t in enumerate(tensors)]
    learner.traces = out
    return out


@torch.no_grad()
def run_presentation(learner: Microcircuit, x: Tensor, u_trgt: Tensor | None,
                     plastic: set[str]) -> Tensor:
    """Present the minibatch ``x`` (one example per lane) for the network's ``steps`` steps with
    the teacher ``u_trgt`` (None: none); write the last step's change as ``.grad``. Returns the
    output potentials at the end of the presentation."""
    p = learner.params
    B = x.shape[0]
    state = _lanes(learner, B, x)
    mask = plastic_mask(learner, plastic)
    traces = _traces(learner, mask)
    etas = learning_rates(learner)
    w = learner.net.weights()
    example = int(learner.examples_seen) + torch.arange(B, dtype=torch.int64, device=x.device)
    steps = learner.net.config.steps
    args = (w, traces, state, x, u_trgt, p, etas, example, 0, steps, learner.seed)
    if backend(learner.config.backend, x.device) == "kernels":
        from bpdl.ops.microcircuit import microcircuit_run

        microcircuit_run(*args, apply_last=False)
    else:
        # subnormals flushed, as the kernels do (dark pixels' input filters decay into them)
        torch.set_flush_denormal(True)
        try:
            mc.full_run(*args, apply_last=False)
        finally:
            torch.set_flush_denormal(False)
    named = w.named()
    for family, tensors in named.items():
        for i, param in enumerate(tensors):
            T = traces[family][i]
            param.grad = None if T is None else T * (-p.dt)
    return state.u[-1].clone()


@torch.no_grad()
def record_presentation(learner: Microcircuit, x: Tensor, y: Tensor, neurons: int = 4,
                        steps: int | None = None) -> dict[str, Any]:
    """Simulate ``x[0]`` from rest without plasticity: ``steps`` steps without a teacher, then
    ``steps`` with the teacher of ``y[0]`` (noise as in training, keyed by example 0). Records
    per layer the somatic ``u``, basal ``v_B`` and apical ``v_A`` potentials of the first
    ``neurons`` neurons, and per hidden layer the interneurons ``u_I`` next to the pyramidal
    neurons of the layer above they track (``u_above``). JSON-ready."""
    p = learner.params
    steps = steps or learner.net.config.steps
    x = learner._inputs(x[:1])
    w = learner.net.weights()
    state = mc.MicroState.zeros(1, p, x.dtype, x.device)
    N = p.N
    picks = {k: list(range(min(neurons, p.sizes[k]))) for k in range(1, N + 1)}
    trace: dict[str, Any] = {"kind": "microcircuit", "phase": [], "label": int(y[0]),
                             "neurons": {str(k): v for k, v in picks.items()}, "dt": p.dt,
                             "layers": {str(k): {"u": [], "v_B": [], "v_A": [], "u_I": [],
                                                 "u_above": []} for k in range(1, N + 1)}}
    phase = ["free"]

    def record(t: int, s: mc.MicroState, weights: mc.MicroWeights) -> None:
        trace["phase"].append(phase[0])
        r = [s.r0] + [mc.phi(u, p) for u in s.u]
        for k in range(1, N + 1):
            idx = picks[k]
            rec = trace["layers"][str(k)]
            v_B = r[k - 1] @ weights.W[k - 1].t() + weights.b[k - 1]
            rec["u"].append(s.u[k - 1][0, idx].tolist())
            rec["v_B"].append((p.basal_factor(k) * v_B)[0, idx].tolist())
            if k < N:
                r_I = mc.phi(s.u_I[k - 1], p)
                v_A = r[k + 1] @ weights.W_td[k - 1].t() + r_I @ weights.W_pi[k - 1].t()
                above = picks[k + 1]
                rec["v_A"].append(v_A[0, idx].tolist())
                rec["u_I"].append(s.u_I[k - 1][0, above].tolist())
                rec["u_above"].append(s.u[k][0, above].tolist())

    example = torch.zeros(1, dtype=torch.int64, device=x.device)
    none = {f: [None] * len(t) for f, t in w.named().items()}
    zero = {f: [0.0] * len(t) for f, t in w.named().items()}
    mc.full_run(w, none, state, x, None, p, zero, example, 0, steps, learner.seed, record=record)
    phase[0] = "nudged"
    u_trgt = learner.target_potentials(y[:1].to(x.device))
    mc.full_run(w, none, state, x, u_trgt, p, zero, example, steps, steps, learner.seed,
                record=record)
    trace["target_rates"] = torch.sigmoid(u_trgt)[0].tolist()
    trace["output_rates"] = mc.phi(state.u[-1], p)[0].tolist()
    return trace
