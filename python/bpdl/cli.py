"""The ``bpdl`` command: train, compare, plot, info, study.

Errors the user can fix (unknown names, impossible values, missing data, unusable output
folders) print one line and exit with status 2; a diverged run exits with 3.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

EXIT_USER_ERROR = 2
EXIT_DIVERGED = 3


def _parse_value(text: str) -> Any:
    """KEY=VALUE values: JSON when it parses (numbers, lists, true/false/null), else a string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _key_values(items: Sequence[str] | None, flag: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items or ():
        if "=" not in item:
            raise _usage(f"{flag} expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip().replace("-", "_")] = _parse_value(value)
    return out


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _float_list(text: str) -> list[float]:
    try:
        return [float(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _int_or_list(text: str) -> int | list[int]:
    values = _int_list(text)
    return values[0] if len(values) == 1 else values


def _usage(message: str):
    from bpdl.errors import ConfigError

    return ConfigError(message)


# ---- train ------------------------------------------------------------------------------------

def _add_run_arguments(p: argparse.ArgumentParser, *, with_model: bool = True) -> None:
    g = p.add_argument_group("what to train")
    if with_model:
        g.add_argument("--model", default=None, help="model family (mlp, cnn, ...; default mlp)")
        g.add_argument("--rule", default=None, help="learning rule (bp, ...; default bp)")
    g.add_argument("--dataset", default=None,
                   help="mnist, fashion_mnist or cifar10 (default mnist)")
    g.add_argument("--config", type=Path, default=None,
                   help="JSON file with run-config fields; flags given here override it")
    m = p.add_argument_group("model options (or --model-opt KEY=VALUE)")
    m.add_argument("--hidden", type=_int_list, default=None, help="MLP hidden sizes, e.g. 500,100")
    m.add_argument("--activation", default=None, help="relu, tanh, sigmoid, ...")
    m.add_argument("--channels", type=_int_list, default=None, help="CNN channels, e.g. 16,32")
    m.add_argument("--kernel-size", type=_int_or_list, default=None,
                   help="CNN kernel size: one value or one per block")
    m.add_argument("--stride", type=_int_or_list, default=None, help="CNN stride")
    m.add_argument("--padding", type=_int_or_list, default=None, help="CNN padding")
    m.add_argument("--init", default=None,
                   help="xavier_uniform, xavier_normal, kaiming_uniform, kaiming_normal, "
                        "torch_default")
    m.add_argument("--model-opt", action="append", metavar="KEY=VALUE",
                   help="any model option (repeatable)")
    r = p.add_argument_group("rule and optimiser")
    r.add_argument("--rule-opt", action="append", metavar="KEY=VALUE",
                   help="any rule option (repeatable)")
    r.add_argument("--optimizer", default=None, help="sgd, adam, adamw, rmsprop, adagrad")
    r.add_argument("--lr", type=float, default=None, help="learning rate (default 1e-3)")
    r.add_argument("--layer-lrs", type=_float_list, default=None,
                   help="one learning rate per weight layer, comma-separated")
    r.add_argument("--opt", action="append", metavar="KEY=VALUE",
                   help="optimiser option, e.g. momentum=0.9 (repeatable)")
    r.add_argument("--lr-schedule", default=None, metavar="SCHEDULE",
                   help="multiply every learning rate per epoch: cosine, step:E1,E2,...:GAMMA "
                        "(e.g. step:20,40:0.1) or exp:GAMMA (default: constant)")
    t = p.add_argument_group("training")
    t.add_argument("--epochs", type=int, default=None, help="epochs (default 1)")
    t.add_argument("--batch-size", type=int, default=None, help="minibatch size (default 100)")
    t.add_argument("--max-examples", type=int, default=None,
                   help="stop after this many training examples")
    t.add_argument("--eval-every", type=int, default=None,
                   help="training examples between evaluations (default: once per epoch)")
    t.add_argument("--val-size", type=float, default=None,
                   help="validation examples (>= 1) or fraction (< 1) (default 5000)")
    t.add_argument("--test", choices=("never", "final", "every"), default=None,
                   help="when to evaluate the test set (default final)")
    t.add_argument("--seed", type=int, default=None)
    t.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:N")
    t.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    t.add_argument("--data-dir", default=None,
                   help="dataset folder (default: $BPDL_DATA_DIR, else the user cache)")
    t.add_argument("--offline", action="store_true",
                   help="never download datasets (also: BPDL_OFFLINE=1)")
    t.add_argument("--no-progress", action="store_true", help="plain log lines, no progress bar")


def _config_from_args(args: argparse.Namespace, base: dict[str, Any] | None = None):
    """The run config the flags (and ``--config`` file) ask for, unresolved: fields no flag set
    stay unset, for :func:`bpdl.train.resolve_config` to fill as it does for every entry point."""
    from bpdl.errors import ConfigError
    from bpdl.train import RunConfig

    d: dict[str, Any] = dict(base or {})
    if args.config is not None:
        try:
            d.update(json.loads(Path(args.config).read_text()))
        except (OSError, json.JSONDecodeError) as err:
            raise ConfigError(f"cannot read --config {args.config}: {err}") from err
    for key in ("model", "rule", "dataset", "optimizer", "lr", "epochs", "batch_size",
                "max_examples", "eval_every", "test", "seed", "device", "threads", "layer_lrs",
                "lr_schedule"):
        value = getattr(args, key, None)
        if value is not None:
            d[key] = value
    if args.val_size is not None:
        d["val_size"] = int(args.val_size) if args.val_size >= 1 else args.val_size
    model_opts = dict(d.get("model_options", {}))
    for key in ("hidden", "activation", "channels", "kernel_size", "stride", "padding", "init"):
        value = getattr(args, key)
        if value is not None:
            model_opts[key] = value
    model_opts.update(_key_values(args.model_opt, "--model-opt"))
    d["model_options"] = model_opts
    for key, flag in (("rule_options", args.rule_opt), ("optimizer_options", args.opt)):
        d[key] = {**d.get(key, {}), **_key_values(flag, "--rule-opt" if key == "rule_options"
                                                  else "--opt")}
    return RunConfig.from_dict(d)


def _download(args: argparse.Namespace) -> bool:
    return not (args.offline or os.environ.get("BPDL_OFFLINE", "") not in ("", "0"))


def cmd_train(args: argparse.Namespace) -> int:
    from bpdl.train import resolve_config, train

    cfg = resolve_config(_config_from_args(args))
    out = args.out or Path("runs") / f"{cfg.rule}-{cfg.model}-{cfg.dataset}-seed{cfg.seed}"
    progress = False if args.no_progress else None
    result = train(cfg, out, data_dir=args.data_dir, download=_download(args),
                   progress=progress)
    s = result.summary
    parts = [f"status {s['status']}", f"examples {s['examples']}"]
    for key in ("val_acc", "test_acc"):
        if s.get(key) is not None:
            parts.append(f"{key} {s[key]:.4f}")
    parts.append(f"wall {s.get('wall_time_s', 0):.1f}s")
    print(f"{result.run_dir}: " + ", ".join(parts))
    if result.status == "diverged":
        print(f"error: {s['message']}", file=sys.stderr)
        return EXIT_DIVERGED
    return 0


# ---- compare ----------------------------------------------------------------------------------

#: The embedded default of ``bpdl compare``: (label, run-config overrides). Rules that land
#: later add their entries here.
DEFAULT_COMPARISON: list[tuple[str, dict[str, Any]]] = [
    ("bp-mlp", {"model": "mlp", "rule": "bp"}),
    ("bp-cnn", {"model": "cnn", "rule": "bp"}),
    ("fa-mlp", {"model": "mlp", "rule": "fa"}),
    ("dfa-mlp", {"model": "mlp", "rule": "dfa"}),
    ("frsf-mlp", {"model": "mlp", "rule": "frsf"}),
    ("kp-mlp", {"model": "mlp", "rule": "kp"}),
    # simplified difference target propagation (B18), parallel schedule: the rule's defaults
    ("sdtp-mlp", {"model": "mlp", "rule": "sdtp"}),
    # G17's spiking network, 784-500-10, with the rule's run defaults (plain SGD with the
    # paper's rates rescaled for its 32 lanes)
    ("segregated", {"model": "segregated", "rule": "segregated",
                    "model_options": {"hidden": [500]}}),
    # S18's dendritic microcircuit, 784-500-500-10, in the steady-state variant (its defaults)
    ("microcircuit", {"model": "microcircuit", "rule": "microcircuit"}),
]
#: Entries ``bpdl compare --entries`` offers beyond the default set (too slow for the default
#: run): the microcircuit's full continuous dynamics, 784-500-10, 1,000 steps per example.
EXTRA_COMPARISON: list[tuple[str, dict[str, Any]]] = [
    ("microcircuit-full", {"model": "microcircuit", "rule": "microcircuit",
                           "model_options": {"hidden": [500]},
                           "rule_options": {"dynamics": "full"}}),
]


def cmd_compare(args: argparse.Namespace) -> int:
    from bpdl.errors import ConfigError
    from bpdl.plots import plot_alignment, plot_comparison, plot_learning_curves
    from bpdl.train import resolve_config, train

    entries = DEFAULT_COMPARISON
    if args.entries:
        known = dict(DEFAULT_COMPARISON + EXTRA_COMPARISON)
        bad = [e for e in args.entries if e not in known]
        if bad:
            raise ConfigError(f"unknown comparison entries {bad}; available: "
                              f"{', '.join(known)}")
        entries = [(e, known[e]) for e in args.entries]
    base = _config_from_args(args).to_dict()
    if args.eval_every is None:
        base["eval_every"] = 5000  # learning curves, not just end points
    out = Path(args.out)
    run_dirs, labels, rows = [], [], []
    progress = False if args.no_progress else None
    for label, overrides in entries:
        cfg = resolve_config({**base, **overrides})
        print(f"== {label}: {cfg.rule} on {cfg.model}, {cfg.dataset}, {cfg.epochs} epoch(s)",
              flush=True)
        result = train(cfg, out / label, data_dir=args.data_dir, download=_download(args),
                       progress=progress)
        s = result.summary
        run_dirs.append(out / label)
        labels.append(label)
        rows.append((label, s["status"], s.get("val_acc"), s.get("test_acc"),
                     s.get("train_time_s"), s.get("examples_per_sec")))
    plot_comparison(run_dirs, out / "comparison", labels=labels,
                    title=f"bpdl compare: {base['dataset']}")
    plot_learning_curves(run_dirs, out / "learning_curves", labels=labels)
    aligned = [(d, lab) for d, lab in zip(run_dirs, labels, strict=True) if _has_angles(d)]
    if aligned:
        plot_alignment([d for d, _ in aligned], out / "alignment",
                       labels=[lab for _, lab in aligned])
    lines = ["| run | status | val acc | test acc | train time (s) | examples/s |",
             "|---|---|---|---|---|---|"]
    for label, status, val, test, t, eps in rows:
        def f(v, spec):
            return (format(v, spec) if v is not None else "-")
        lines.append(f"| {label} | {status} | {f(val, '.4f')} | {f(test, '.4f')} | "
                     f"{f(t, '.1f')} | {f(eps, '.0f')} |")
    table = "\n".join(lines) + "\n"
    (out / "comparison.md").write_text(table)
    print(table)
    extra = f", {out / 'alignment.png'}" if aligned else ""
    print(f"figures: {out / 'comparison.png'}, {out / 'learning_curves.png'}{extra} (and .pdf)")
    return 0


def _has_angles(run_dir: Path) -> bool:
    """Whether a run directory's metrics hold any alignment angle."""
    from bpdl.runs import load_run

    try:
        history = load_run(run_dir)["history"]
    except Exception:
        return False
    return any(key.startswith("angle") for rec in history
               for values in rec.get("layers", {}).values() for key in values)


# ---- reproduce --------------------------------------------------------------------------------

def cmd_reproduce(args: argparse.Namespace) -> int:
    from bpdl.errors import ConfigError
    from bpdl.experiments import EXPERIMENTS, RunSettings, run_experiment

    if args.list or args.name is None:
        for name in EXPERIMENTS.names():
            exp = EXPERIMENTS.get(name)
            runs = ", ".join(r.label for r in exp.selected_runs(exp.resolve_options({})))
            flags = " ".join(o.flag for o in exp.options)
            print(f"{name}: {exp.title} [runs: {runs}]" + (f" [options: {flags}]" if flags else ""))
        if args.name is None and not args.list:
            raise ConfigError("give an experiment name (see the list above)")
        return 0
    experiment = EXPERIMENTS.get(args.name)
    given = {name: getattr(args, name) for name in _experiment_options()
             if getattr(args, name) is not None}
    settings = RunSettings(epochs=args.epochs, entries=args.entries, threads=args.threads,
                           max_examples=args.max_examples, seed=args.seed, device=args.device,
                           data_dir=args.data_dir, download=_download(args),
                           progress=False if args.no_progress else None,
                           log=lambda s: print(s, file=sys.stderr, flush=True))
    report = run_experiment(experiment.name, args.out, settings, **given)
    print(report.markdown.read_text())
    shown = [str(f) for f in report.figures]
    if shown:
        print(f"figures: {', '.join(shown)} (and .pdf)")
    return EXIT_DIVERGED if report.diverged else 0


def _experiment_options() -> dict[str, Any]:
    """Every option any registered experiment declares, by keyword: (option, experiments)."""
    from bpdl.experiments import EXPERIMENTS

    found: dict[str, Any] = {}
    for name in EXPERIMENTS.names():
        for opt in EXPERIMENTS.get(name).options:
            found.setdefault(opt.name, (opt, []))[1].append(name)
    return found


def _add_reproduce_parser(sub) -> None:
    p = sub.add_parser("reproduce", help="rerun a published experiment and compare with its "
                                         "numbers",
                       description="Train the runs of a named published experiment (see --list) "
                                   "into OUT/<run> and write a report with the published and "
                                   "measured test errors. Rerunning resumes.")
    p.add_argument("name", nargs="?", default=None, help="experiment name (see --list)")
    p.add_argument("--list", action="store_true", help="list the experiments")
    p.add_argument("--epochs", type=int, default=None,
                   help="train this many epochs instead of the published number")
    p.add_argument("--entries", nargs="+", default=None, help="only these runs (labels)")
    p.add_argument("--max-examples", type=int, default=None,
                   help="stop each run after this many training examples (smoke tests)")
    p.add_argument("--out", default=None, help="output folder (default runs/reproduce/NAME)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    p.add_argument("--seed", type=int, default=None, help="run seed (default: the experiment's)")
    p.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--offline", action="store_true", help="never download datasets")
    p.add_argument("--no-progress", action="store_true")
    g = p.add_argument_group("options of single experiments")
    for name, (opt, owners) in _experiment_options().items():
        g.add_argument(opt.flag, dest=name, type=opt.type, default=None, choices=opt.choices,
                       help=f"{opt.help} ({', '.join(owners)}; default {opt.default})")
    p.set_defaults(func=cmd_reproduce)


# ---- plot -------------------------------------------------------------------------------------

PLOT_KINDS = ("curves", "weights", "alignment", "comparison", "dynamics")


def cmd_plot(args: argparse.Namespace) -> int:
    from bpdl import plots
    from bpdl.errors import ConfigError

    runs = list(args.runs)
    kind = args.kind
    if runs and runs[0] in PLOT_KINDS and not Path(runs[0]).exists():
        kind = runs.pop(0)
    kind = kind or "curves"
    if not runs:
        raise ConfigError("give at least one run directory to plot")
    labels = args.labels.split(",") if args.labels else None
    if labels is not None and len(labels) != len(runs):
        raise ConfigError(f"--labels has {len(labels)} entries for {len(runs)} run directories")
    out = Path(args.out) if args.out else Path(runs[0]) / "figures" / kind
    if kind == "curves":
        plots.plot_learning_curves(runs, out, labels=labels, title=args.title)
    elif kind == "weights":
        if len(runs) != 1:
            raise ConfigError("`bpdl plot weights` takes one run directory")
        plots.plot_weight_dynamics(runs[0], out)
    elif kind == "alignment":
        plots.plot_alignment(runs, out, labels=labels)
    elif kind == "comparison":
        plots.plot_comparison(runs, out, labels=labels, title=args.title)
    elif kind == "dynamics":
        from bpdl.plots.dynamics import plot_run_dynamics

        if len(runs) != 1:
            raise ConfigError("`bpdl plot dynamics` takes one run directory")
        _, trace = plot_run_dynamics(runs[0], out, example=args.example, neurons=args.neurons,
                                     data_dir=args.data_dir, download=_download(args))
        print(f"recorded {trace}")
    print(f"wrote {out.with_suffix('.png')} and {out.with_suffix('.pdf')}")
    return 0


# ---- info -------------------------------------------------------------------------------------

def operator_backends() -> list[str]:
    """``name [CPU, CUDA]`` for every registered bpdl operator."""
    from bpdl import ops

    return [f"{op} [{', '.join(ops.kernel_backends(op)) or 'no kernels'}]"
            for op in ops.operator_names()]


def info_lines(data_dir: str | None = None) -> list[str]:
    import torch

    import bpdl
    from bpdl import nn as bnn
    from bpdl import rules
    from bpdl.data import DATASETS, data_root
    from bpdl.optim import OPTIMIZERS

    ext = bpdl._C
    kernels = ext.cuda_kernels() or "none"
    lines = [
        f"bpdl {bpdl.__version__} ({Path(bpdl.__file__).parent})",
        f"torch {torch.__version__} (built against {ext.torch_version()}), "
        f"torch CUDA {torch.version.cuda or 'none'}",
        f"CUDA kernels compiled: {'yes' if ext.with_cuda() else 'no'}"
        + (f" ({kernels}; architectures {ext.cuda_architectures()})" if ext.with_cuda() else ""),
        "CUDA device available: "
        + (torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no"),
        f"OpenMP: {'yes' if ext.with_openmp() else 'no'}; torch threads: "
        f"{torch.get_num_threads()}; compiler: {ext.compiler()}; CPU kernels: {ext.cpu_isa()}",
        f"operators: {', '.join(operator_backends())}",
        f"data root: {data_root(data_dir)}",
        f"datasets: {', '.join(DATASETS)}",
        f"models: {', '.join(bnn.MODELS.names())}",
        f"rules: {', '.join(rules.names())}",
        f"optimizers: {', '.join(OPTIMIZERS.names())}",
    ]
    return lines


def cmd_info(args: argparse.Namespace) -> int:
    print("\n".join(info_lines(args.data_dir)))
    return 0


# ---- entry point ------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bpdl",
        description="Biologically plausible deep learning: train and compare learning rules.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("train", help="train one rule on one model and dataset",
                       description="Train a learning rule; writes a run directory (config, "
                                   "metrics.jsonl, checkpoints, summary.json). Rerunning the "
                                   "same command resumes an interrupted run.")
    _add_run_arguments(p)
    p.add_argument("--out", type=Path, default=None,
                   help="run directory (default runs/RULE-MODEL-DATASET-seedN)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("compare", help="train several rules and compare them in one figure",
                       description="Train the embedded default set of rules (or --entries) "
                                   "with shared settings and write a comparison figure and "
                                   "table.")
    _add_run_arguments(p, with_model=False)
    p.add_argument("--entries", nargs="+", default=None,
                   help=f"subset of: {', '.join(k for k, _ in DEFAULT_COMPARISON)}; also "
                        f"{', '.join(k for k, _ in EXTRA_COMPARISON)}")
    p.add_argument("--out", type=Path, default=Path("runs/compare"), help="output folder")
    p.set_defaults(func=cmd_compare)

    _add_reproduce_parser(sub)

    p = sub.add_parser("plot", help="figures from run directories",
                       description="Plot run directories. KIND is curves (default: learning "
                                   "curves of all runs in one figure), weights, alignment, "
                                   "comparison or dynamics (segregated and microcircuit runs).")
    p.add_argument("runs", nargs="+", metavar="[KIND] RUN_DIR",
                   help="optional kind, then one or more run directories")
    p.add_argument("--kind", choices=PLOT_KINDS, default=None)
    p.add_argument("--out", default=None,
                   help="output path without suffix (PNG and PDF are written)")
    p.add_argument("--labels", default=None, help="comma-separated legend labels")
    p.add_argument("--title", default=None)
    p.add_argument("--example", type=int, default=0,
                   help="dynamics: index of the training example to record")
    p.add_argument("--neurons", type=int, default=4, help="dynamics: neurons per layer")
    p.add_argument("--data-dir", default=None, help="dynamics: dataset folder")
    p.add_argument("--offline", action="store_true", help="dynamics: never download datasets")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("info", help="versions, compiled kernels, threads, data root")
    p.add_argument("--data-dir", default=None)
    p.set_defaults(func=cmd_info)

    from bpdl.studies.cli import add_study_parser

    add_study_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        import bpdl  # noqa: F401  (fails with a fix-it message if the extension is broken)
        from bpdl.data import DataError
        from bpdl.errors import BPDLError
    except ImportError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    try:
        return int(args.func(args) or 0)
    except (BPDLError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away (`bpdl study compare | head`): stop quietly, as Unix tools do;
        # point stdout at /dev/null so that the interpreter's final flush does not fail again
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
