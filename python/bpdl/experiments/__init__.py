"""Named reproduction experiments: the published setups bpdl must be able to rerun, each a set
of training runs with the published numbers beside them (``bpdl reproduce NAME``).

Every reproduction lives in this package and is registered in :data:`EXPERIMENTS`, one module
per family (``feedback_alignment.py``, ``segregated.py``, ...), imported below. An
:class:`Experiment` is plain data: run-config dicts (the fields of
:class:`bpdl.train.RunConfig`) with a label and the published test error of each, trained with
the one training loop (:meth:`Experiment.run`), with published against measured numbers in
``results.md``. An experiment with a protocol of its own beyond "train these runs" (G17's
repeated tests of the final weights) subclasses it and declares its command-line options
(:class:`ExperimentOption`); ``bpdl reproduce`` adds their flags and passes them on, with no
case of its own for any experiment.
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

__all__ = ["EXPERIMENTS", "Experiment", "ExperimentOption", "ExperimentReport", "ExperimentRun",
           "RunSettings", "register", "results_table", "run_experiment"]


@dataclass(frozen=True)
class ExperimentRun:
    """One training run of an experiment: a label, its run-config fields and the published
    test error in percent (None where the source gives none)."""

    label: str
    config: dict[str, Any]
    published_test_error: float | None = None


@dataclass(frozen=True)
class ExperimentOption:
    """A setting of one experiment (``bpdl reproduce NAME --flag VALUE``)."""

    name: str                      # keyword of the experiment (the flag is --name-with-dashes)
    type: type
    default: Any
    help: str
    choices: tuple[Any, ...] | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


@dataclass(frozen=True)
class RunSettings:
    """What every experiment takes from ``bpdl reproduce`` (None: the experiment's own)."""

    epochs: int | None = None
    entries: Sequence[str] | None = None
    threads: int | None = None
    max_examples: int | None = None
    seed: int | None = None
    device: str | None = None
    data_dir: str | None = None
    download: bool = True
    progress: bool | None = None
    log: Callable[[str], None] | None = None


@dataclass
class ExperimentReport:
    """What an experiment run wrote: one row per run, the Markdown report and the figures."""

    rows: list[dict[str, Any]]
    markdown: Path
    figures: list[Path]

    @property
    def diverged(self) -> bool:
        return any(r.get("status") == "diverged" for r in self.rows)


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
    #: settings of this experiment beyond :class:`RunSettings`
    options: tuple[ExperimentOption, ...] = ()

    def resolve_options(self, options: dict[str, Any] | None) -> dict[str, Any]:
        """``options`` with this experiment's defaults filled; ConfigError for unknown ones."""
        known = {o.name: o for o in self.options}
        unknown = sorted(set(options or {}) - set(known))
        if unknown:
            flags = ", ".join(known[n].flag for n in known) or "none"
            raise ConfigError(f"experiment {self.name!r} has no option(s) "
                              f"{', '.join('--' + u.replace('_', '-') for u in unknown)}; "
                              f"its options: {flags}")
        out = {name: opt.default for name, opt in known.items()}
        out.update({k: v for k, v in (options or {}).items() if v is not None})
        return out

    def default_out(self, options: dict[str, Any]) -> Path:
        """Where ``bpdl reproduce`` writes without ``--out``."""
        return Path("runs") / "reproduce" / self.name

    def selected_runs(self, options: dict[str, Any]) -> tuple[ExperimentRun, ...]:
        """The runs of this experiment for ``options`` (the declared ones, by default)."""
        return self.runs

    def run_configs(self, epochs: int | None = None, threads: int | None = None,
                    entries: Sequence[str] | None = None, max_examples: int | None = None,
                    seed: int | None = None, device: str | None = None,
                    options: dict[str, Any] | None = None) -> list[tuple[ExperimentRun, dict]]:
        """(run, full config dict) per selected run, with the settings' overrides."""
        runs = self.selected_runs(self.resolve_options(options))
        labels = [r.label for r in runs]
        if entries:
            unknown = [e for e in entries if e not in labels]
            if unknown:
                raise ConfigError(f"experiment {self.name!r} has no run(s) {unknown}; its runs "
                                  f"are: {', '.join(labels)}")
        overrides = {k: v for k, v in (("epochs", epochs), ("threads", threads),
                                       ("max_examples", max_examples), ("seed", seed),
                                       ("device", device)) if v is not None}
        return [(run, {**self.common, **run.config, **overrides}) for run in runs
                if not entries or run.label in entries]

    def run(self, out: Path, settings: RunSettings, options: dict[str, Any]) -> ExperimentReport:
        """Train the selected runs into ``out/<label>`` (resumable: rerunning continues
        unfinished runs and keeps finished ones) and write ``out/results.md``,
        ``results.json`` and the learning-curve and alignment figures."""
        from bpdl.train import resolve_config, train

        selected = self.run_configs(settings.epochs, settings.threads, settings.entries,
                                    settings.max_examples, settings.seed, settings.device,
                                    options)
        configs = [(run, resolve_config(cfg)) for run, cfg in selected]  # validate all first
        rows = []
        for run, cfg in configs:
            if settings.log is not None:
                settings.log(f"== {self.name} / {run.label}: {cfg.rule} on {cfg.model}, "
                             f"{cfg.dataset}, {cfg.epochs} epoch(s)")
            t0 = time.perf_counter()
            result = train(cfg, out / run.label, data_dir=settings.data_dir,
                           download=settings.download, progress=settings.progress,
                           log=settings.log)
            rows.append(_row(run, cfg, result, out, time.perf_counter() - t0))
        merged = self._merge_rows(out, rows)
        (out / "results.md").write_text(results_table(self, merged))
        return ExperimentReport(rows, out / "results.md", _figures(out, merged))

    def _merge_rows(self, out: Path, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """``rows`` together with the rows of runs trained earlier into the same folder (e.g.
        with --entries), in the experiment's order; written to ``results.json``."""
        out.mkdir(parents=True, exist_ok=True)
        previous = {}
        if (out / "results.json").exists():
            try:
                previous = {r["label"]: r for r in json.loads((out / "results.json").read_text())}
            except (OSError, json.JSONDecodeError, KeyError, TypeError):
                previous = {}
        previous.update({r["label"]: r for r in rows})
        order = [r.label for r in self.runs]
        merged = sorted(previous.values(), key=lambda r: order.index(r["label"])
                        if r["label"] in order else len(order))
        (out / "results.json").write_text(json.dumps(merged, indent=2) + "\n")
        return merged


EXPERIMENTS: Registry[Experiment] = Registry("experiment")


def register(experiment: Experiment) -> Experiment:
    """Add ``experiment`` to :data:`EXPERIMENTS` (a duplicate name is an error)."""
    EXPERIMENTS.add(experiment.name, experiment)
    return experiment


def run_experiment(name: str, out_dir: str | os.PathLike | None = None,
                   settings: RunSettings | None = None, **options: Any) -> ExperimentReport:
    """Run experiment ``name`` into ``out_dir`` (default: the experiment's own folder under
    runs/reproduce) with the common ``settings`` and the experiment's own ``options``."""
    experiment = EXPERIMENTS.get(name)
    resolved = experiment.resolve_options(options)
    out = Path(out_dir) if out_dir is not None else experiment.default_out(resolved)
    return experiment.run(out, settings or RunSettings(), resolved)


def _row(run: ExperimentRun, cfg, result, out: Path, session_s: float) -> dict[str, Any]:
    s, history = result.summary, result.history
    test_curve = [r["test_acc"] for r in history if r.get("test_acc") is not None]
    return {
        "label": run.label, "rule": cfg.rule, "model": cfg.model, "status": s["status"],
        "epochs": s.get("epochs"), "published_test_error": run.published_test_error,
        "test_error": None if s.get("test_acc") is None else 100 * (1 - s["test_acc"]),
        "best_val_acc": s.get("best_val_acc"),
        "test_error_at_best_val": _test_error_at_best_val(history),
        "best_test_error": None if not test_curve else 100 * (1 - max(test_curve)),
        "train_time_s": s.get("train_time_s"), "wall_time_s": s.get("wall_time_s"),
        "this_session_s": session_s, "run_dir": str(out / run.label),
        "rule_state": s.get("rule_state", {}),
    }


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


def _figures(out: Path, rows: list[dict[str, Any]]) -> list[Path]:
    from bpdl.errors import RunDirError
    from bpdl.plots import plot_alignment, plot_learning_curves

    # each run lives in OUT/<label>; the stored run_dir may be relative to another working
    # directory (the folder was written from elsewhere, or moved)
    dirs = [out / r["label"] for r in rows]
    labels = [r["label"] for r in rows]
    if not dirs:
        return []
    plot_learning_curves(dirs, out / "learning_curves", labels=labels)
    figures = [out / "learning_curves.png"]
    try:
        plot_alignment(dirs, out / "alignment", labels=labels)
        figures.append(out / "alignment.png")
    except RunDirError:
        pass  # backprop-only experiments record no angles
    return figures


# experiment families register themselves on import
from bpdl.experiments import (  # noqa: E402,F401
    feedback_alignment,
    microcircuits,
    segregated,
    target_propagation,
)
