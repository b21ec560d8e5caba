"""Neuron traces of a trained network: recording one presentation and drawing it.

:func:`record_run_dynamics` rebuilds the learner of a run directory from its last checkpoint
(:func:`bpdl.train.load_learner`) and records one training example with the rule's
``record_dynamics(x, y, neurons)`` (any rule that simulates neurons provides it; segregated
dendrites: :meth:`bpdl.nn.segregated_simulator.SegregatedSimulator.record`): the basal, apical
and somatic potentials, rates and spikes of chosen neurons at every step, and the plateau
potentials of the hidden layers. :func:`plot_dynamics` draws them next to the per-layer
alignment angles the run logged at each evaluation. ``bpdl plot dynamics RUN_DIR`` is the
command-line front end.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from bpdl.errors import ConfigError
from bpdl.runs import read_metrics

__all__ = ["plot_dynamics", "plot_microcircuit_dynamics", "record_run_dynamics"]


def record_run_dynamics(run_dir: str | os.PathLike, example: int = 0, neurons: int = 4,
                        data_dir: str | None = None, download: bool = False) -> dict[str, Any]:
    """Record the dynamics of training example ``example`` (an index into the run's training
    set) with the run's last checkpoint; ``neurons`` per layer. Returns the trace (JSON-ready)."""
    from bpdl import data as bdata
    from bpdl.train import load_learner

    learner, cfg, ckpt = load_learner(run_dir)
    if not callable(getattr(learner, "record_dynamics", None)):
        raise ConfigError(f"`bpdl plot dynamics` needs a run of a rule that simulates neurons "
                          f"(segregated, microcircuit); {run_dir} trained rule {cfg.rule!r}")
    train = bdata.load_dataset(cfg.dataset, "train", data_dir, download)
    if not 0 <= example < len(train):
        raise ConfigError(f"example must be in [0, {len(train) - 1}], got {example}")
    x = bdata.to_float(train.images[example:example + 1])
    y = train.labels[example:example + 1]
    trace = learner.record_dynamics(x, y, neurons=neurons)
    trace["example"] = example
    trace["examples_trained"] = int(ckpt["loop"]["examples"])
    return trace


def plot_dynamics(trace: dict[str, Any], history: list[dict[str, Any]] | None = None,
                  out: str | os.PathLike | None = None, title: str | None = None) -> Figure:
    """One row per layer: somatic (solid), basal (dashed) and apical (dotted) potentials of the
    recorded neurons over the forward and target phase (averaging windows shaded, the phase
    boundary dashed, plateau potentials alpha_f and alpha_t annotated), and the spikes; a last
    row with the per-layer angles between the rule's and backprop's updates over training."""
    from bpdl.plots.curves import save_figure

    if trace.get("kind") == "microcircuit":
        return plot_microcircuit_dynamics(trace, history, out, title)
    layers = sorted(trace["layers"], key=int)
    phases = trace["phase"]
    n_f = sum(1 for p in phases if p == "forward")
    steps = list(range(len(phases)))
    angle_rows = 1 if history and any(
        any(k.startswith("angle") for v in rec.get("layers", {}).values() for k in v)
        for rec in history) else 0
    rows = len(layers) + angle_rows
    fig = Figure(figsize=(12, 3.0 * rows), layout="constrained")
    axes = fig.subplots(rows, 2, squeeze=False, gridspec_kw={"width_ratios": [3, 1]})
    L_f, L_t = trace["lengths"]
    W_f, W_t = trace["windows"]
    for row, layer in enumerate(layers):
        ax, ax_sp = axes[row]
        data = trace["layers"][layer]
        neurons = trace["neurons"][layer]
        hidden = layer in trace.get("plateaus", {})
        for i, n in enumerate(neurons):
            color = f"C{i % 10}"
            C = [v[i] for v in data["C"]]
            B = [v[i] for v in data["B"]]
            ax.plot(steps, C, "-", color=color, lw=1.2, label=f"neuron {n} C")
            ax.plot(steps, B, "--", color=color, lw=0.8, alpha=0.8)
            if hidden and data["A"][0] is not None:
                A = [v[i] for v in data["A"]]
                ax.plot(steps, A, ":", color=color, lw=0.8)
            spikes = data["spikes"]
            if spikes and spikes[0] is not None:
                times = [t for t, v in enumerate(spikes) if v[i] > 0]
                ax_sp.vlines(times, i + 0.1, i + 0.9, color=color, lw=0.8)
        ax.axvline(n_f - 0.5, color="k", ls="--", lw=0.8)
        ax.axvspan(L_f - W_f - 0.5, L_f - 0.5, color="grey", alpha=0.12)
        ax.axvspan(n_f + L_t - W_t - 0.5, n_f + L_t - 0.5, color="grey", alpha=0.12)
        name = "output" if not hidden else f"hidden {layer}"
        if not hidden:
            ax.set_title(f"output neurons {neurons} (label {trace['label']}: its neurons are "
                         f"driven up in the target phase)", fontsize=8)
        ax.set_ylabel(f"{name}: potential")
        ax.grid(alpha=0.3)
        if hidden:
            pl = trace["plateaus"][layer]
            text = ", ".join(f"{n}: {a:.2f}->{b:.2f}" for n, a, b in
                             zip(neurons, pl["alpha_f"], pl["alpha_t"], strict=True))
            ax.set_title(f"plateaus alpha_f->alpha_t  {text}", fontsize=8)
        ax_sp.set_xlim(0, len(steps))
        ax_sp.set_ylim(0, len(neurons))
        ax_sp.set_yticks([i + 0.5 for i in range(len(neurons))], [str(n) for n in neurons])
        ax_sp.axvline(n_f - 0.5, color="k", ls="--", lw=0.8)
        ax_sp.set_title("spikes", fontsize=8)
        if row == 0:
            ax.legend(fontsize=7, loc="upper right", ncol=2)
    axes[len(layers) - 1][0].set_xlabel("time step (forward phase, then target phase)")
    if angle_rows:
        ax, ax2 = axes[-1]
        _angle_panel(ax, history, ("angle_delta_example", "angle_bp"))
        ax2.axis("off")
    fig.suptitle(title or f"segregated dendrites: example {trace.get('example', 0)} "
                          f"(label {trace['label']}) after {trace.get('examples_trained', '?')} "
                          f"training examples")
    if out is not None:
        save_figure(fig, out)
    return fig


def _angle_panel(ax, history: list[dict[str, Any]], keys: tuple[str, ...]) -> None:
    """Per-layer angles to backprop over training: one colour per layer, the first of ``keys``
    solid and the others dashed (labelled by key when there are several)."""
    for j, key in enumerate(keys):
        names = sorted({n for rec in history for n, v in rec.get("layers", {}).items()
                        if key in v})
        for i, name in enumerate(names):
            recs = [r for r in history if key in r.get("layers", {}).get(name, {})]
            ax.plot([r["epoch"] for r in recs], [r["layers"][name][key] for r in recs],
                    "-" if j == 0 else "--", color=f"C{i}", marker=".",
                    label=f"{name} {key}" if len(keys) > 1 else name)
    ax.axhline(90, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("epoch")
    ax.set_ylabel("angle to backprop (degrees)")
    ax.set_ylim(0, 120)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def plot_microcircuit_dynamics(trace: dict[str, Any], history: list[dict[str, Any]] | None = None,
                               out: str | os.PathLike | None = None,
                               title: str | None = None) -> Figure:
    """A microcircuit's presentation (:meth:`bpdl.rules.microcircuit.Microcircuit.
    record_dynamics`): per layer the somatic (solid), basal prediction a_k v_B (dashed) and
    apical (dotted, hidden layers) potentials of the recorded neurons over the free and the
    nudged phase; per hidden layer the interneurons (solid) beside the pyramidal neurons of the
    layer above they track (dashed); a last row with the per-layer angles to backprop over
    training, when the run logged them."""
    from bpdl.plots.curves import save_figure

    layers = sorted(trace["layers"], key=int)
    n_free = sum(1 for p in trace["phase"] if p == "free")
    dt = trace.get("dt", 1.0)
    times = [dt * t for t in range(len(trace["phase"]))]
    hidden = [k for k in layers if trace["layers"][k]["u_I"]]
    angle_row = 1 if history and any("angle_update_bp" in v for rec in history
                                     for v in rec.get("layers", {}).values()) else 0
    rows = len(layers) + len(hidden) + angle_row
    fig = Figure(figsize=(11, 2.6 * rows), layout="constrained")
    axes = fig.subplots(rows, 1, squeeze=False)[:, 0]
    row = 0
    for k in layers:
        ax, data = axes[row], trace["layers"][k]
        for i, n in enumerate(trace["neurons"][k]):
            c = f"C{i % 10}"
            ax.plot(times, [v[i] for v in data["u"]], "-", color=c, lw=1.1, label=f"neuron {n} u")
            ax.plot(times, [v[i] for v in data["v_B"]], "--", color=c, lw=0.8)
            if data["v_A"]:
                ax.plot(times, [v[i] for v in data["v_A"]], ":", color=c, lw=0.8)
        ax.axvline(dt * n_free, color="k", ls="--", lw=0.8)
        last = k == layers[-1]
        ax.set_title(("output" if last else f"hidden layer {k}") + ": soma (solid), basal "
                     "prediction (dashed)" + ("" if last else ", apical (dotted)")
                     + (f"; label {trace['label']}, the teacher from the dashed line"
                        if last else ""), fontsize=8)
        ax.set_ylabel("potential")
        ax.grid(alpha=0.3)
        if row == 0:
            ax.legend(fontsize=7, loc="upper right", ncol=2)
        row += 1
    for k in hidden:
        ax, data = axes[row], trace["layers"][k]
        above = trace["neurons"][str(int(k) + 1)]
        for i, n in enumerate(above):
            c = f"C{i % 10}"
            ax.plot(times, [v[i] for v in data["u_I"]], "-", color=c, lw=1.1,
                    label=f"interneuron {n}")
            ax.plot(times, [v[i] for v in data["u_above"]], "--", color=c, lw=0.8)
        ax.axvline(dt * n_free, color="k", ls="--", lw=0.8)
        ax.set_title(f"layer {k} interneurons (solid) tracking layer {int(k) + 1}'s pyramidal "
                     "neurons (dashed)", fontsize=8)
        ax.set_ylabel("potential")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper right", ncol=2)
        row += 1
    axes[row - 1].set_xlabel("time (ms): free, then nudged")
    if angle_row:
        _angle_panel(axes[row], history, ("angle_update_bp",))
    fig.suptitle(title or f"dendritic microcircuit: example {trace.get('example', 0)} (label "
                          f"{trace['label']}) after {trace.get('examples_trained', '?')} "
                          f"training examples")
    if out is not None:
        save_figure(fig, out)
    return fig


def plot_run_dynamics(run_dir: str | os.PathLike, out: str | os.PathLike | None = None,
                      example: int = 0, neurons: int = 4, data_dir: str | None = None,
                      download: bool = False) -> tuple[Figure, Path]:
    """Record (and save as ``figures/dynamics.json``) and plot the dynamics of a run."""
    path = Path(run_dir)
    trace = record_run_dynamics(path, example, neurons, data_dir, download)
    (path / "figures").mkdir(parents=True, exist_ok=True)
    trace_path = path / "figures" / "dynamics.json"
    trace_path.write_text(json.dumps(trace) + "\n")
    history = read_metrics(path / "metrics.jsonl")
    fig = plot_dynamics(trace, history, out if out is not None else path / "figures" / "dynamics")
    return fig, trace_path
