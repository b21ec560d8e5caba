"""Named reproduction experiments: the published setups bpdl must be able to rerun, each a set
of training runs with the published numbers beside them (``bpdl reproduce NAME``).

An :class:`Experiment` is plain data: run-config dicts (the fields of
:class:`bpdl.train.RunConfig`) with a label and the published test error of each. Families of
rules register theirs in a module of this package (``feedback_alignment.py``, ...), imported
below; :func:`run_experiment` trains them with the one training loop and tabulates published
against measured numbers.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bpdl.errors import ConfigError
from bpdl.registry import Registry

__all__ = ["EXPERIMENTS", "Experiment", "ExperimentRun", "results_table", "run_experiment"]


@dataclass(frozen=True)
class ExperimentRun:
    """One training run of an experiment: a label, its run-config fields and the published
    test error in percent (None where the source gives none)."""

    label: str
    config: dict[str, Any]
    published_test_error: float | None = None


@dataclass(frozen=True)
class Experiment:
    """A published experiment: where it comes from, how it was run, and its runs."""

    name: str
    title: str
    source: str
    protocol: str
    runs: tuple[ExperimentRun, ...]
    notes: str = ""
    #: fields every run shares (a run's own config overrides them)
    common: dict[str, Any] = field(default_factory=dict)

    def run_configs(self, epochs: int | None = None, threads: int | None = None,
                    entries: Sequence[str] | None = None, max_examples: int | None = None
                    ) -> list[tuple[ExperimentRun, dict]]:
        """(run, full config dict) per selected run, with ``epochs``/``threads``/
        ``max_examples`` overrides."""
        labels = [r.label for r in self.runs]
        if entries:
            unknown = [e for e in entries if e not in labels]
            if unknown:
                raise ConfigError(f"experiment {self.name!r} has no run(s) {unknown}; its runs "
                                  f"are: {', '.join(labels)}")
        out = []
        for run in self.runs:
            if entries and run.label not in entries:
                continue
            cfg = {**self.common, **run.config}
            if epochs is not None:
                cfg["epochs"] = epochs
            if threads is not None:
                cfg["threads"] = threads
            if max_examples is not None:
                cfg["max_examples"] = max_examples
            out.append((run, cfg))
        return out


EXPERIMENTS: Registry[Experiment] = Registry("experiment")


def register(experiment: Experiment) -> Experiment:
    """Add ``experiment`` to :data:`EXPERIMENTS` (a duplicate name is an error)."""
    EXPERIMENTS.add(experiment.name, experiment)
    return experiment


def run_experiment(name: str, out_dir: str | os.PathLike, *, epochs: int | None = None,
                   entries: Sequence[str] | None = None, threads: int | None = None,
                   max_examples: int | None = None,
                   data_dir: str | None = None, download: bool = True,
                   progress: bool | None = None,
                   log: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Train the runs of experiment ``name`` into ``out_dir/<label>`` (resumable: rerunning
    continues unfinished runs and keeps finished ones) and write ``out_dir/results.md`` and
    ``results.json``. Returns one row per run."""
    from bpdl.train import RunConfig, train

    experiment = EXPERIMENTS.get(name)
    selected = experiment.run_configs(epochs, threads, entries, max_examples)
    configs = [(run, RunConfig.from_dict(cfg)) for run, cfg in selected]  # validate all first
    out = Path(out_dir)
    rows = []
    for run, cfg in configs:
        if log is not None:
            log(f"== {experiment.name} / {run.label}: {cfg.rule} on {cfg.model}, "
                f"{cfg.dataset}, {cfg.epochs} epoch(s)")
        t0 = time.perf_counter()
        result = train(cfg, out / run.label, data_dir=data_dir, download=download,
                       progress=progress, log=log)
        s = result.summary
        history = result.history
        test_curve = [r["test_acc"] for r in history if r.get("test_acc") is not None]
        rows.append({
            "label": run.label,
            "rule": cfg.rule,
            "model": cfg.model,
            "status": s["status"],
            "epochs": s.get("epochs"),
            "published_test_error": run.published_test_error,
            "test_error": None if s.get("test_acc") is None else 100 * (1 - s["test_acc"]),
            "best_val_acc": s.get("best_val_acc"),
            "test_error_at_best_val": _test_error_at_best_val(history),
            "best_test_error": None if not test_curve else 100 * (1 - max(test_curve)),
            "train_time_s": s.get("train_time_s"),
            "wall_time_s": s.get("wall_time_s"),
            "this_session_s": time.perf_counter() - t0,
            "run_dir": str(out / run.label),
            "rule_state": s.get("rule_state", {}),
        })
    out.mkdir(parents=True, exist_ok=True)
    # keep the rows of runs trained earlier into the same folder (e.g. with --entries)
    previous = {}
    if (out / "results.json").exists():
        try:
            previous = {r["label"]: r for r in json.loads((out / "results.json").read_text())}
        except (OSError, json.JSONDecodeError, KeyError, TypeError):
            previous = {}
    previous.update({r["label"]: r for r in rows})
    order = [r.label for r in experiment.runs]
    merged = sorted(previous.values(), key=lambda r: order.index(r["label"])
                    if r["label"] in order else len(order))
    (out / "results.json").write_text(json.dumps(merged, indent=2) + "\n")
    (out / "results.md").write_text(results_table(experiment, merged))
    _figures(out, merged)
    return rows


def _test_error_at_best_val(history: list[dict[str, Any]]) -> float | None:
    best = None
    for rec in history:
        if rec.get("val_acc") is not None and rec.get("test_acc") is not None:
            if best is None or rec["val_acc"] > best[0]:
                best = (rec["val_acc"], rec["test_acc"])
    return None if best is None else 100 * (1 - best[1])


def results_table(experiment: Experiment, rows: list[dict[str, Any]]) -> str:
    """Markdown table: published against measured test error (%), epochs and times."""

    def f(value: Any, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    lines = [f"### {experiment.title}", "", f"Source: {experiment.source}", "",
             f"Protocol: {experiment.protocol}", "",
             "| run | rule | last layer | status | epochs | published test error % | "
             "final test error % | test error % at best val | best test error % "
             "(test-selected) | train time (s) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        last = r.get("rule_state", {}).get("last_layer_rule", "-" if r["rule"] == "bp" else "same")
        lines.append(
            f"| {r['label']} | {r['rule']} | {last} | {r['status']} | {f(r['epochs'], '.2f')} | "
            f"{f(r['published_test_error'], '.2f')} | {f(r['test_error'], '.2f')} | "
            f"{f(r['test_error_at_best_val'], '.2f')} | {f(r['best_test_error'], '.2f')} | "
            f"{f(r['train_time_s'], '.0f')} |")
    if experiment.notes:
        lines += ["", experiment.notes]
    return "\n".join(lines) + "\n"


def _figures(out: Path, rows: list[dict[str, Any]]) -> None:
    from bpdl.errors import RunDirError
    from bpdl.plots import plot_alignment, plot_learning_curves

    # each run lives in OUT/<label>; the stored run_dir may be relative to another working
    # directory (the folder was written from elsewhere, or moved)
    dirs = [out / r["label"] for r in rows]
    labels = [r["label"] for r in rows]
    if not dirs:
        return
    plot_learning_curves(dirs, out / "learning_curves", labels=labels)
    try:
        plot_alignment(dirs, out / "alignment", labels=labels)
    except RunDirError:
        pass  # backprop-only experiments record no angles


# experiment families register themselves on import
from bpdl.experiments import feedback_alignment  # noqa: E402,F401
