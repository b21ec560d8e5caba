"""Figures from run directories: learning curves, weight dynamics, alignment, comparisons.

Every function returns a ``matplotlib.figure.Figure`` (no pyplot state) and, given ``out``,
writes it as both PNG and PDF. Run folders are read through :func:`bpdl.runs.load_run` (a
damaged metrics file is an error, not an empty figure).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from bpdl.errors import RunDirError
from bpdl.runs import load_run, make_output_dir

__all__ = [
    "load_run", "save_figure", "plot_learning_curves", "plot_weight_dynamics",
    "plot_alignment", "plot_comparison", "run_label",
]


def run_label(run: dict[str, Any]) -> str:
    """Default legend label: rule/model/dataset, or the folder name."""
    cfg = run.get("config") or {}
    if cfg:
        return f"{cfg.get('rule', '?')}/{cfg.get('model', '?')} ({run['path'].name})"
    return run["path"].name


def save_figure(fig: Figure, out: str | os.PathLike) -> list[Path]:
    """Write ``fig`` as PNG and PDF next to each other; ``out`` may carry either suffix or none."""
    out = Path(out)
    stem = out.with_suffix("") if out.suffix.lower() in (".png", ".pdf") else out
    make_output_dir(stem.parent)
    paths = [stem.with_suffix(".png"), stem.with_suffix(".pdf")]
    for p in paths:
        fig.savefig(p, dpi=150, bbox_inches="tight")
    return paths


def _series(history: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for rec in history:
        value = rec.get(key)
        if value is not None:
            xs.append(rec["epoch"])
            ys.append(value)
    return xs, ys


def _runs(run_dirs: Sequence[str | os.PathLike | dict[str, Any]]) -> list[dict[str, Any]]:
    if not run_dirs:
        raise RunDirError("no run directories given")
    return [r if isinstance(r, dict) else load_run(r) for r in run_dirs]


def plot_learning_curves(run_dirs: Sequence[str | os.PathLike | dict[str, Any]],
                         out: str | os.PathLike | None = None,
                         labels: Sequence[str] | None = None, title: str | None = None) -> Figure:
    """Accuracy and loss against epochs, train (dashed) and validation (solid), one colour per
    run; the final test accuracy, where recorded, is marked at the end of the curve."""
    runs = _runs(run_dirs)
    if labels is not None and len(labels) != len(runs):
        raise ValueError(f"{len(labels)} labels for {len(runs)} runs")
    fig = Figure(figsize=(11, 4.2))
    ax_acc, ax_loss = fig.subplots(1, 2)
    for i, run in enumerate(runs):
        color = f"C{i % 10}"
        label = labels[i] if labels else run_label(run)
        h = run["history"]
        for key, style, ax in (("val_acc", "-", ax_acc), ("train_acc", "--", ax_acc),
                               ("val_loss", "-", ax_loss), ("train_loss", "--", ax_loss)):
            xs, ys = _series(h, key)
            if xs:
                split = "validation" if key.startswith("val") else "train"
                ax.plot(xs, ys, style, color=color, label=f"{label} {split}", marker="." if
                        len(xs) < 30 else None)
        xs, ys = _series(h, "test_acc")
        if xs:
            ax_acc.plot(xs, ys, ":", color=color, label=f"{label} test")
        summary = run.get("summary") or {}
        if summary.get("test_acc") is not None and h:
            ax_acc.plot([h[-1]["epoch"]], [summary["test_acc"]], "*", color=color,
                        markersize=11, label=f"{label} test {summary['test_acc']:.4f}")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("accuracy")
    ax_acc.grid(alpha=0.3)
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss")
    ax_loss.grid(alpha=0.3)
    ax_acc.legend(fontsize=7, loc="lower right")
    ax_loss.legend(fontsize=7, loc="upper right")
    fig.suptitle(title or "learning curves")
    if out is not None:
        save_figure(fig, out)
    return fig


def _layer_names(history: list[dict[str, Any]]) -> list[str]:
    names: list[str] = []
    for rec in history:
        for name in rec.get("layers", {}):
            if name not in names:
                names.append(name)
    return names


def _layer_series(history, layer, key):
    xs, ys = [], []
    for rec in history:
        value = rec.get("layers", {}).get(layer, {}).get(key)
        if value is not None:
            xs.append(rec["epoch"])
            ys.append(value)
    return xs, ys


def plot_weight_dynamics(run_dir: str | os.PathLike | dict[str, Any],
                         out: str | os.PathLike | None = None) -> Figure:
    """Per layer: weight norm, relative change between evaluations, and last update norm; and,
    for rules with learned inverses (target propagation), each inverse's reconstruction error
    (logged under the layer it inverts)."""
    run = _runs([run_dir])[0]
    h = run["history"]
    keys = [("weight_norm", "‖W‖ (Frobenius)", False),
            ("rel_change", "‖W − W_prev‖ / ‖W_prev‖", True),
            ("update_norm", "‖ΔW‖ of last step", True)]
    if any("reconstruction_error" in v for rec in h for v in rec.get("layers", {}).values()):
        keys.append(("reconstruction_error", "inverse's reconstruction error", True))
    fig = Figure(figsize=(14 * len(keys) / 3, 4))
    axes = fig.subplots(1, len(keys))
    for ax, (key, ylabel, logy) in zip(axes, keys, strict=False):
        for j, layer in enumerate(_layer_names(h)):
            xs, ys = _layer_series(h, layer, key)
            if xs:
                ax.plot(xs, ys, color=f"C{j % 10}", label=layer, marker="." if len(xs) < 30
                        else None)
        if logy and any(line.get_ydata().size for line in ax.get_lines()):
            ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"weight dynamics: {run_label(run)}")
    if out is not None:
        save_figure(fig, out)
    return fig


def plot_alignment(run_dirs: Sequence[str | os.PathLike | dict[str, Any]],
                   out: str | os.PathLike | None = None,
                   labels: Sequence[str] | None = None) -> Figure:
    """Every per-layer angle metric (keys starting with ``angle``) against epochs, one panel
    per metric, one colour per layer, one line style per run."""
    runs = _runs(run_dirs)
    metrics: list[str] = []
    for run in runs:
        for rec in run["history"]:
            for values in rec.get("layers", {}).values():
                for key in values:
                    if key.startswith("angle") and key not in metrics:
                        metrics.append(key)
    if not metrics:
        raise RunDirError("none of these runs recorded alignment angles (backprop runs have "
                          "none: their update is the gradient)")
    fig = Figure(figsize=(5.5 * len(metrics), 4))
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    styles = ["-", "--", ":", "-."]
    for ax, key in zip(axes, metrics, strict=False):
        for i, run in enumerate(runs):
            label = labels[i] if labels else run_label(run)
            for j, layer in enumerate(_layer_names(run["history"])):
                xs, ys = _layer_series(run["history"], layer, key)
                if xs:
                    # a feedback tensor that never carries a signal (FA's first layer) is
                    # shown, faded and labelled (docs/algorithms/feedback_alignment.md §3.7)
                    _, used = _layer_series(run["history"], layer, "feedback_used")
                    unused = key == "angle_weight_feedback" and used and not any(used)
                    ax.plot(xs, ys, styles[i % 4], color=f"C{j % 10}",
                            alpha=0.35 if unused else 1.0,
                            label=f"{label} {layer}" + (" (unused)" if unused else ""))
        ax.axhline(90, color="grey", lw=0.8, ls=":")
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"{key} (degrees)")
        ax.set_ylim(0, 180 if "abs" not in key else 90)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.suptitle("alignment")
    if out is not None:
        save_figure(fig, out)
    return fig


def plot_comparison(run_dirs: Sequence[str | os.PathLike | dict[str, Any]],
                    out: str | os.PathLike | None = None,
                    labels: Sequence[str] | None = None, title: str | None = None) -> Figure:
    """Validation accuracy curves of several runs next to a bar chart of their final test (or
    validation) accuracy: the figure of ``bpdl compare``."""
    runs = _runs(run_dirs)
    names = list(labels) if labels else [run_label(r) for r in runs]
    fig = Figure(figsize=(12, 4.5))
    ax_curve, ax_bar = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    finals, kinds = [], []
    for i, (run, name) in enumerate(zip(runs, names, strict=False)):
        xs, ys = _series(run["history"], "val_acc")
        if xs:
            ax_curve.plot(xs, ys, color=f"C{i % 10}", label=name,
                          marker="." if len(xs) < 30 else None)
        summary = run.get("summary") or {}
        if summary.get("test_acc") is not None:
            finals.append(summary["test_acc"])
            kinds.append("test")
        else:
            finals.append(ys[-1] if ys else 0.0)
            kinds.append("val")
    ax_curve.set_xlabel("epoch")
    ax_curve.set_ylabel("validation accuracy")
    ax_curve.grid(alpha=0.3)
    ax_curve.legend(fontsize=8, loc="lower right")
    bars = ax_bar.bar(range(len(finals)), finals, color=[f"C{i % 10}" for i in range(len(runs))])
    for bar, value, kind in zip(bars, finals, kinds, strict=False):
        ax_bar.annotate(f"{value:.4f}\n({kind})", (bar.get_x() + bar.get_width() / 2, value),
                        ha="center", va="bottom", fontsize=8)
    ax_bar.set_xticks(range(len(finals)), names, rotation=30, ha="right", fontsize=8)
    ax_bar.set_ylabel("final accuracy")
    low = min(finals) if finals else 0.0
    ax_bar.set_ylim(max(0.0, low - 0.1), 1.0)
    ax_bar.grid(alpha=0.3, axis="y")
    fig.suptitle(title or "comparison")
    if out is not None:
        save_figure(fig, out)
    return fig
