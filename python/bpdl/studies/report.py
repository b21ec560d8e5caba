"""Study reports: tables (Markdown and CSV) and figures, as in the 2019 study (T19).

Statistics of the search objective are taken over the *completed* trials: best, worst, mean,
median and the population standard deviation (ddof = 0, as T19 reported), and the number of
chance-level trials (objective <= 0.15, T19's threshold). Diverged, failed and rejected
counts are reported beside them, never folded into the statistics. Held-out test results of
the re-evaluated configurations are a separate table: they played no part in the search.

``report`` writes, for the studies of one database::

    report.md  summary.csv  trials.csv  tests.csv  <study>.png/.pdf

``compare`` reads any number of databases and draws the T19 grid (one column per dataset;
rows: objective per iteration, histogram, box plot; one colour per rule and model) and a bar
chart of best, mean (with the standard deviation as error bar) and worst per rule.
"""

from __future__ import annotations

import csv
import io
import math
import os
import statistics
import textwrap
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from bpdl.runs import make_output_dir
from bpdl.studies.runner import CHANCE_ACCURACY, describe_params, summarize_tests
from bpdl.studies.spaces import flatten_paths
from bpdl.studies.store import StudyStore

SUMMARY_FIELDS = ("study", "rule", "model", "dataset", "space", "optimizer", "budget", "epochs",
                  "folds", "train_subset", "status", "n", "completed", "diverged", "failed",
                  "running", "rejected", "best", "worst", "mean", "median", "std", "chance",
                  "best_trial", "test_trial", "test_mean", "test_std", "test_n",
                  "trial_time_s")
_DATASET_ORDER = ("mnist", "fashion_mnist", "cifar10")
_DATASET_TITLES = {"mnist": "MNIST", "fashion_mnist": "Fashion-MNIST", "cifar10": "CIFAR-10"}


def load_study(store: StudyStore, name: str) -> dict[str, Any]:
    """Everything the reports need about study ``name``: definition, trials, tests, stats."""
    study = store.study(name)
    trials = store.trials(name)
    rejections = store.rejections(name)
    tests = summarize_tests(store.test_runs(name), {t["number"]: t for t in trials})
    return {"name": name, "db": str(store.path), "study": study, "trials": trials,
            "rejections": rejections, "test_runs": store.test_runs(name), "tests": tests,
            "stats": study_statistics(study, trials, rejections, tests)}


def study_statistics(study: dict[str, Any], trials: list[dict[str, Any]],
                     rejections: list[dict[str, Any]], tests: list[dict[str, Any]]
                     ) -> dict[str, Any]:
    """One summary row (see SUMMARY_FIELDS)."""
    d = study["definition"]
    objs = [t["objective"] for t in trials if t["status"] == "completed"
            and t["objective"] is not None]
    row: dict[str, Any] = {
        "study": study["name"], "rule": d["rule"], "model": d["model"], "dataset": d["dataset"],
        "space": f"{d['space']['name']} v{d['space']['version']}", "optimizer": d["optimizer"],
        "budget": d["budget"], "epochs": d["epochs"], "folds": d["folds"],
        "train_subset": d.get("train_subset"), "status": study["status"],
        "n": sum(t["status"] != "running" for t in trials),
        "completed": len(objs),
        "diverged": sum(t["status"] == "diverged" for t in trials),
        "failed": sum(t["status"] == "failed" for t in trials),
        "running": sum(t["status"] == "running" for t in trials),
        "rejected": len(rejections),
        "best": max(objs) if objs else None, "worst": min(objs) if objs else None,
        "mean": statistics.fmean(objs) if objs else None,
        "median": statistics.median(objs) if objs else None,
        "std": statistics.pstdev(objs) if objs else None,
        "chance": sum(o <= CHANCE_ACCURACY for o in objs),
        "best_trial": None, "test_trial": None, "test_mean": None, "test_std": None,
        "test_n": 0,
        "trial_time_s": statistics.fmean([t["duration"] for t in trials if t["duration"]])
        if any(t["duration"] for t in trials) else None,
    }
    done = [t for t in trials if t["status"] == "completed" and t["objective"] is not None]
    if done:
        row["best_trial"] = max(done, key=lambda t: (t["objective"], -t["number"]))["number"]
    top = [t for t in tests if t["rank"] == 1]
    if top and top[0]["n"]:
        row.update(test_trial=top[0]["trial"], test_mean=top[0]["mean"], test_std=top[0]["std"],
                   test_n=top[0]["n"])
    return row


def _fmt(value: Any, spec: str = ".4f") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return format(value, spec) if math.isfinite(value) else str(value)
    return str(value)


def _label(s: dict[str, Any]) -> str:
    return f"{s['stats']['rule']}/{s['stats']['model']}"


# ---- tables ----------------------------------------------------------------------------------

def summary_markdown(studies: Sequence[dict[str, Any]]) -> str:
    lines = ["| study | dataset | rule/model | space | n | best | worst | mean | std | median | "
             "# chance | diverged | failed | rejected | test acc (best config) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in studies:
        r = s["stats"]
        test = (f"{r['test_mean']:.4f} +- {r['test_std']:.4f} (n={r['test_n']})"
                if r["test_n"] else "-")
        lines.append(
            f"| {r['study']} | {r['dataset']} | {r['rule']}/{r['model']} | {r['space']} | "
            f"{r['n']}/{r['budget']} | {_fmt(r['best'])} | {_fmt(r['worst'])} | "
            f"{_fmt(r['mean'])} | {_fmt(r['std'])} | {_fmt(r['median'])} | {r['chance']} | "
            f"{r['diverged']} | {r['failed']} | {r['rejected']} | {test} |")
    return "\n".join(lines) + "\n"


def study_markdown(s: dict[str, Any], figure: str | None = None) -> str:
    """The Markdown section of one study."""
    r, d = s["stats"], s["study"]["definition"]
    out = [f"## {r['study']}", "",
           f"- {r['rule']} on {r['model']}, {r['dataset']}"
           + (f" (stratified subset of {d['train_subset']} training examples)"
              if d.get("train_subset") else " (official training set)")
           + f"; status {r['status']}",
           f"- search: {d['optimizer']} over space {r['space']}, budget {d['budget']}, "
           f"{d['folds']}-fold cross-validation on the training set, {d['epochs']} epoch(s) per "
           f"fold, seed {d['seed']}",
           f"- objective: {d['objective']}",
           f"- held-out test: the {d['top_k']} best configuration(s), {d['test_seeds']} seed(s) "
           f"each, trained on the whole training set and scored on the official test set "
           f"(not used for selection)"]
    if d.get("fixed"):
        out.append(f"- fixed settings: {d['fixed']}")
    out += ["", "| n | completed | best | worst | mean | median | std (ddof=0) | # chance "
                "(<= 0.15) | diverged | failed | rejected proposals |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
            f"| {r['n']}/{r['budget']} | {r['completed']} | {_fmt(r['best'])} | "
            f"{_fmt(r['worst'])} | {_fmt(r['mean'])} | {_fmt(r['median'])} | {_fmt(r['std'])} | "
            f"{r['chance']} | {r['diverged']} | {r['failed']} | {r['rejected']} |", ""]
    if s["tests"]:
        out += ["Held-out test accuracy of the best configurations:", "",
                "| rank | trial | objective (validation) | test accuracy mean | std (ddof=0) | "
                "seeds | settings |", "|---|---|---|---|---|---|---|"]
        trials = {t["number"]: t for t in s["trials"]}
        for t in s["tests"]:
            settings = describe_params(trials[t["trial"]]["config"], s["study"]) \
                if t["trial"] in trials else ""
            out.append(f"| {t['rank']} | {t['trial']} | {_fmt(t['objective'])} | "
                       f"{_fmt(t['mean'])} | {_fmt(t['std'])} | {t['n']}/{t['runs']} | "
                       f"{settings} |")
        out.append("")
    ranked = sorted((t for t in s["trials"] if t["status"] == "completed"),
                    key=lambda t: -t["objective"])
    if ranked:
        out += ["Top trials by objective:", "", "| trial | objective | fold accuracies | "
                "time (s) | settings |", "|---|---|---|---|---|"]
        for t in ranked[:5]:
            folds = ", ".join(_fmt(f.get("val_acc")) for f in t["folds"] or [])
            out.append(f"| {t['number']} | {_fmt(t['objective'])} | {folds} | "
                       f"{_fmt(t['duration'], '.1f')} | {describe_params(t['config'], s['study'])}"
                       f" |")
        out.append("")
    bad = [t for t in s["trials"] if t["status"] in ("diverged", "failed")]
    if bad:
        out += ["Diverged and failed trials:", ""]
        out += [f"- trial {t['number']} {t['status']}: {t['error']}" for t in bad[:10]]
        if len(bad) > 10:
            out.append(f"- ... and {len(bad) - 10} more (trials.csv)")
        out.append("")
    if s["rejections"]:
        reasons: dict[str, int] = {}
        for rej in s["rejections"]:
            reasons[rej["error"].split(";")[0][:120]] = reasons.get(
                rej["error"].split(";")[0][:120], 0) + 1
        out += [f"Rejected proposals (told to the optimizer as the worst loss, not counted in "
                f"the budget): {len(s['rejections'])}", ""]
        out += [f"- {n} x {reason}" for reason, n in sorted(reasons.items(),
                                                            key=lambda kv: -kv[1])[:5]]
        out.append("")
    if figure:
        out += [f"![{r['study']}]({figure})", ""]
    return "\n".join(out)


def _write_csv(path: Path, rows: Iterable[dict[str, Any]], fields: Sequence[str]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(fields), extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    path.write_text(buf.getvalue())


def trial_rows(studies: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """One CSV row per trial (searched settings as columns) and the column names."""
    rows, dims = [], []
    for s in studies:
        for key in s["study"]["definition"]["space"]["dims"]:
            if key not in dims:
                dims.append(key)
        max_folds = s["study"]["definition"]["folds"]
        for t in s["trials"]:
            flat = flatten_paths(t["config"])
            row = {"study": s["name"], "trial": t["number"], "status": t["status"],
                   "objective": t["objective"], "seed": t["seed"], "duration_s": t["duration"],
                   "attempts": t["attempts"], "worker": t["worker"], "error": t["error"]}
            for f in range(max_folds):
                folds = t["folds"] or []
                row[f"fold{f}_val_acc"] = folds[f].get("val_acc") if f < len(folds) else None
            for key in dims:
                value = flat.get(key)
                row[key] = " ".join(map(str, value)) if isinstance(value, list) else value
            rows.append(row)
    n_folds = max((s["study"]["definition"]["folds"] for s in studies), default=0)
    fields = ["study", "trial", "status", "objective"] + [f"fold{f}_val_acc"
                                                         for f in range(n_folds)]
    fields += dims + ["seed", "duration_s", "attempts", "worker", "error"]
    return rows, fields


# ---- figures ---------------------------------------------------------------------------------

def _colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def _iteration_panel(ax, trials: list[dict[str, Any]], color, label: str | None) -> None:
    done = [t for t in trials if t["status"] == "completed" and t["objective"] is not None]
    bad = [t for t in trials if t["status"] in ("diverged", "failed")]
    xs = [t["number"] for t in done]
    ys = [t["objective"] for t in done]
    ax.plot(xs, ys, "o-", color=color, ms=3, lw=0.8, alpha=0.8, label=label)
    best, run = -math.inf, []
    for t in sorted(done, key=lambda t: t["number"]):
        best = max(best, t["objective"])
        run.append(best)
    if done:
        ax.step(sorted(xs), run, where="post", color=color, lw=1.6, alpha=0.5)
    if bad:
        ax.plot([t["number"] for t in bad], [0.0] * len(bad), "x", color=color, ms=5)


def plot_study(s: dict[str, Any], out: str | os.PathLike):
    """Objective per iteration (running best as a step line; diverged/failed as x at 0),
    histogram and box plot of one study."""
    from matplotlib.figure import Figure

    from bpdl.plots import save_figure

    trials = s["trials"]
    objs = [t["objective"] for t in trials if t["status"] == "completed"
            and t["objective"] is not None]
    fig = Figure(figsize=(11, 3.4))
    axes = fig.subplots(1, 3)
    color = _colors(1)[0]
    _iteration_panel(axes[0], trials, color, None)
    axes[0].set_xlabel("trial")
    axes[0].set_ylabel("k-fold validation accuracy")
    axes[0].set_title("objective per iteration")
    axes[0].axhline(CHANCE_ACCURACY, color="grey", ls=":", lw=0.8)
    if objs:
        axes[1].hist(objs, bins=20, range=(0, 1), color=color, alpha=0.8)
        axes[2].boxplot([objs], patch_artist=True, boxprops={"facecolor": color, "alpha": 0.5})
    axes[1].set_xlabel("k-fold validation accuracy")
    axes[1].set_ylabel("trials")
    axes[1].set_title("histogram")
    axes[2].set_xticks([1], [_label(s)])
    axes[2].set_title("box plot")
    axes[2].set_ylabel("k-fold validation accuracy")
    fig.suptitle(f"{s['name']}: {s['stats']['completed']} completed of {s['stats']['n']} "
                 f"trials")
    fig.tight_layout()
    save_figure(fig, out)
    return fig


def plot_compare_grid(studies: Sequence[dict[str, Any]], out: str | os.PathLike,
                      title: str | None = None):
    """T19's figure: columns are datasets; rows are objective per iteration, histogram and box
    plot; each rule/model is one colour in every panel."""
    from matplotlib.figure import Figure

    from bpdl.plots import save_figure

    datasets = _ordered_datasets(studies)
    labels = _labels(studies)
    unique = list(dict.fromkeys(labels))
    colors = dict(zip(unique, _colors(len(unique)), strict=True))
    fig = Figure(figsize=(4.0 * len(datasets) + 1, 9))
    axes = fig.subplots(3, len(datasets), squeeze=False, sharey="row")
    for j, dataset in enumerate(datasets):
        members = [(s, lab) for s, lab in zip(studies, labels, strict=True)
                   if s["stats"]["dataset"] == dataset]
        box_data, box_labels, box_colors = [], [], []
        for s, lab in members:
            objs = [t["objective"] for t in s["trials"] if t["status"] == "completed"
                    and t["objective"] is not None]
            _iteration_panel(axes[0, j], s["trials"], colors[lab], lab)
            if objs:
                axes[1, j].hist(objs, bins=25, range=(0, 1), color=colors[lab], alpha=0.55,
                                label=lab)
            box_data.append(objs)
            box_labels.append(lab)
            box_colors.append(colors[lab])
        if box_data:
            parts = axes[2, j].boxplot(box_data, patch_artist=True)
            for patch, c in zip(parts["boxes"], box_colors, strict=True):
                patch.set_facecolor(c)
                patch.set_alpha(0.6)
            axes[2, j].set_xticks(range(1, len(box_labels) + 1), box_labels, rotation=30,
                                  fontsize=8)
        name = _DATASET_TITLES.get(dataset, dataset)
        axes[0, j].set_title(f"evaluations: {name}")
        axes[0, j].set_xlabel("trial")
        axes[1, j].set_title(f"histogram: {name}")
        axes[1, j].set_xlabel("k-fold validation accuracy")
        axes[2, j].set_title(f"box plot: {name}")
        axes[0, j].axhline(CHANCE_ACCURACY, color="grey", ls=":", lw=0.8)
    axes[0, 0].set_ylabel("k-fold validation accuracy")
    axes[1, 0].set_ylabel("trials")
    axes[2, 0].set_ylabel("k-fold validation accuracy")
    axes[0, 0].legend(fontsize=8, loc="lower right")
    fig.suptitle(textwrap.fill(title or "hyperparameter robustness: search objective of every "
                               "trial", width=int(45 * len(datasets) + 10)))
    fig.tight_layout()
    save_figure(fig, out)
    return fig


def plot_compare_bars(studies: Sequence[dict[str, Any]], out: str | os.PathLike,
                      title: str | None = None):
    """T19's planned summary figure, one panel per dataset: per rule/model the best, mean
    (error bar: population std) and worst objective as bars, every completed trial as a point,
    the number of trials at chance (<= 0.15) under the bars, and the held-out test accuracy of
    the best configurations (mean +- std over their seeds) as diamonds."""
    import numpy as np
    from matplotlib.figure import Figure

    from bpdl.plots import save_figure

    labels = _labels(studies)
    members = [(s, lab) for s, lab in zip(studies, labels, strict=True)
               if s["stats"]["completed"]]
    datasets = _ordered_datasets([s for s, _ in members])
    groups = {d: sorted([(s, lab) for s, lab in members if s["stats"]["dataset"] == d],
                        key=lambda m: m[1]) for d in datasets}
    widest = max((len(g) for g in groups.values()), default=1)
    fig = Figure(figsize=(max(5.0, 1.6 * len(members) + 2), 4.4))
    axes = fig.subplots(1, max(len(datasets), 1), squeeze=False, sharey=True,
                        gridspec_kw={"width_ratios": [len(groups[d]) for d in datasets] or [1]})[0]
    width = 0.26
    rng = np.random.default_rng(0)  # the points' horizontal jitter only
    for ax, dataset in zip(axes, datasets, strict=False):
        rows = groups[dataset]
        x = np.arange(len(rows))
        stats = [s["stats"] for s, _ in rows]
        ax.bar(x - width, [r["best"] for r in stats], width, label="best", color="#2a9d8f")
        ax.bar(x, [r["mean"] for r in stats], width, yerr=[r["std"] for r in stats], capsize=3,
               label="mean +- std", color="#e9c46a")
        ax.bar(x + width, [r["worst"] for r in stats], width, label="worst", color="#e76f51")
        for i, (s, _) in enumerate(rows):
            objs = [t["objective"] for t in s["trials"] if t["status"] == "completed"
                    and t["objective"] is not None]
            ax.scatter(i + rng.uniform(-1.4 * width, 1.4 * width, len(objs)), objs, s=7,
                       color="black", alpha=0.45, zorder=3, linewidths=0,
                       label="trial" if i == 0 else None)
            tested = [t for t in s["tests"] if t["n"]]
            if tested:
                ax.errorbar(i + 1.7 * width + 0.04 * np.arange(len(tested)),
                            [t["mean"] for t in tested], yerr=[t["std"] for t in tested],
                            fmt="D", ms=4, color="#264653", capsize=2, zorder=4,
                            label="test acc. (best configs)" if i == 0 else None)
            ax.text(i, 0.03, f"n={stats[i]['completed']}\n# chance {stats[i]['chance']}",
                    ha="center", va="bottom", fontsize=7)
        ax.set_xticks(x, [lab for _, lab in rows], fontsize=8)
        ax.set_xlim(-0.6, len(rows) - 0.1)  # room for the diamonds right of the last group
        ax.axhline(CHANCE_ACCURACY, color="grey", ls=":", lw=0.8)
        ax.set_title(_DATASET_TITLES.get(dataset, dataset), fontsize=10)
    axes[0].set_ylim(0, 1.18)
    axes[0].set_ylabel("k-fold validation accuracy")
    handles, names = [], []
    for ax in axes:
        for h, n in zip(*ax.get_legend_handles_labels(), strict=True):
            if n not in names:
                handles.append(h)
                names.append(n)
    axes[0].legend(handles, names, fontsize=7, ncol=5, loc="upper left")
    fig.suptitle(textwrap.fill(title or "objective across the search: best, mean and worst "
                               "per rule, every trial, and the best configurations on the "
                               "test set", width=int(25 * widest * len(datasets) + 60)),
                 fontsize=10)
    fig.tight_layout()
    save_figure(fig, out)
    return fig


def _dataset_rank(dataset: str) -> int:
    return _DATASET_ORDER.index(dataset) if dataset in _DATASET_ORDER else len(_DATASET_ORDER)


def _ordered_datasets(studies: Sequence[dict[str, Any]]) -> list[str]:
    return sorted({s["stats"]["dataset"] for s in studies}, key=lambda d: (_dataset_rank(d), d))


def _labels(studies: Sequence[dict[str, Any]]) -> list[str]:
    """rule/model, or the study name where two studies of one dataset would share it."""
    labels = []
    for s in studies:
        lab = _label(s)
        twins = [o for o in studies if o is not s and _label(o) == lab
                 and o["stats"]["dataset"] == s["stats"]["dataset"]]
        labels.append(s["name"] if twins else lab)
    return labels


# ---- entry points ------------------------------------------------------------------------------

def load_studies(dbs: Sequence[str | os.PathLike], names: Sequence[str] | None = None
                 ) -> list[dict[str, Any]]:
    """Every study of every database (or only ``names``)."""
    from bpdl.errors import ConfigError

    studies = []
    found: set[str] = set()
    for db in dbs:
        with StudyStore(db, create=False, read_only=True) as store:
            for name in store.study_names():
                if names and name not in names:
                    continue
                found.add(name)
                studies.append(load_study(store, name))
    missing = sorted(set(names or ()) - found)
    if missing:
        raise ConfigError(f"no study named {', '.join(missing)} in {', '.join(map(str, dbs))}")
    if not studies:
        raise ConfigError(f"no studies in {', '.join(map(str, dbs))}")
    return studies


def write_report(db: str | os.PathLike, out: str | os.PathLike | None = None,
                 names: Sequence[str] | None = None) -> tuple[str, list[Path]]:
    """Write the report of the studies in ``db`` into ``out`` (default ``<db>_report``).
    Returns the Markdown text and the written files."""
    studies = load_studies([db], names)
    out_dir = Path(out) if out is not None else Path(db).with_name(Path(db).stem + "_report")
    make_output_dir(out_dir)
    files: list[Path] = []
    sections = []
    for s in studies:
        stem = out_dir / _safe(s["name"])
        plot_study(s, stem)
        files += [stem.with_suffix(".png"), stem.with_suffix(".pdf")]
        sections.append(study_markdown(s, stem.with_suffix(".png").name))
    text = (f"# Study report: {db}\n\n" + summary_markdown(studies) + "\n"
            + "\n".join(sections))
    (out_dir / "report.md").write_text(text)
    _write_csv(out_dir / "summary.csv", [s["stats"] for s in studies], SUMMARY_FIELDS)
    rows, fields = trial_rows(studies)
    _write_csv(out_dir / "trials.csv", rows, fields)
    _write_csv(out_dir / "tests.csv",
               [{**r, "study": s["name"]} for s in studies for r in s["test_runs"]],
               ("study", "rank", "trial", "seed", "status", "test_acc", "test_loss",
                "duration", "worker", "error"))
    files += [out_dir / n for n in ("report.md", "summary.csv", "trials.csv", "tests.csv")]
    return text, files


def write_compare(dbs: Sequence[str | os.PathLike], out: str | os.PathLike,
                  names: Sequence[str] | None = None, title: str | None = None
                  ) -> tuple[str, list[Path]]:
    """Write the comparison grid, bar chart, Markdown and CSV of the studies in ``dbs``."""
    studies = load_studies(dbs, names)
    out_dir = Path(out)
    make_output_dir(out_dir)
    plot_compare_grid(studies, out_dir / "compare_grid", title)
    plot_compare_bars(studies, out_dir / "compare_bars", title)
    text = ("# Study comparison\n\n" + summary_markdown(studies)
            + "\n![grid](compare_grid.png)\n\n![bars](compare_bars.png)\n")
    (out_dir / "compare.md").write_text(text)
    _write_csv(out_dir / "compare.csv", [s["stats"] for s in studies], SUMMARY_FIELDS)
    files = [out_dir / n for n in ("compare_grid.png", "compare_grid.pdf", "compare_bars.png",
                                   "compare_bars.pdf", "compare.md", "compare.csv")]
    return text, files


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)
