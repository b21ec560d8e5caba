"""``bpdl study run|report|compare|spaces|optimizers``: the command-line front end of studies.

Only argparse is imported at module level; each command imports what it needs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any


def _set_items(items: list[str] | None) -> dict[str, Any]:
    """``KEY=VALUE`` pairs (VALUE parsed as JSON when it parses), dotted keys nested:
    ``model_options.init=xavier_uniform`` -> ``{"model_options": {"init": "xavier_uniform"}}``."""
    from bpdl.errors import ConfigError
    from bpdl.studies.spaces import _set_path

    out: dict[str, Any] = {}
    for item in items or ():
        if "=" not in item:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        key, text = item.split("=", 1)
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        _set_path(out, key.strip().replace("-", "_"), value)
    return out


def add_study_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``study`` and its subcommands to the ``bpdl`` parser."""
    p = sub.add_parser(
        "study", help="hyperparameter robustness studies (Nevergrad; resumable; parallel)",
        description="Search a rule's hyperparameters with Nevergrad, scoring each trial by "
                    "k-fold cross-validation on the training set; store every trial in one "
                    "SQLite file; re-test the best configurations on the held-out test set; "
                    "report tables and figures. Rerunning the same `study run` command "
                    "resumes an interrupted study.")
    ssub = p.add_subparsers(dest="study_command", metavar="SUBCOMMAND")
    ssub.required = True

    r = ssub.add_parser("run", help="run or resume a study",
                        description="Run (or resume) a study. Defaults follow the 2019 study: "
                                    "50 trials of 3-fold cross-validation after 10 epochs.")
    g = r.add_argument_group("what to study")
    g.add_argument("--rule", default="bp", help="learning rule (default bp)")
    g.add_argument("--model", default=None,
                   help="model family (default: the rule's own model, else mlp)")
    g.add_argument("--dataset", default="mnist", help="mnist, fashion_mnist or cifar10")
    g.add_argument("--space", default=None,
                   help="registered search space (default: the one for rule and model, else "
                        "generic); list them with `bpdl study spaces`")
    g.add_argument("--space-file", type=Path, default=None,
                   help="JSON search space instead of a registered one")
    g.add_argument("--set", action="append", metavar="KEY=VALUE", dest="fixed",
                   help="run-config setting fixed for every trial, e.g. optimizer=sgd, "
                        "model_options.init=xavier_uniform (repeatable)")
    g.add_argument("--name", default=None, help="study name in the database "
                                                "(default RULE-MODEL-DATASET)")
    g.add_argument("--db", type=Path, default=None,
                   help="study database (default studies/NAME.db); several studies may share "
                        "one")
    s = r.add_argument_group("search")
    s.add_argument("--optimizer", default="NGOpt",
                   help="Nevergrad optimizer (default NGOpt; T19-GP-UCB is T19's Gaussian-"
                        "process UCB, Matern 2.5, kappa 2.5; `bpdl study optimizers` lists "
                        "them)")
    s.add_argument("--budget", type=int, default=50, help="evaluated trials (default 50)")
    s.add_argument("--epochs", type=int, default=10, help="epochs per fold (default 10)")
    s.add_argument("--folds", type=int, default=3, help="cross-validation folds (default 3)")
    s.add_argument("--seed", type=int, default=0, help="seed of optimizer, folds and trials")
    s.add_argument("--top-k", type=int, default=3,
                   help="best configurations re-evaluated on the test set (default 3)")
    s.add_argument("--test-seeds", type=int, default=3,
                   help="seeds per re-evaluated configuration (default 3)")
    s.add_argument("--train-subset", type=int, default=None,
                   help="use a stratified subset of this many training examples")
    s.add_argument("--max-examples", type=int, default=None,
                   help="cap on training examples per fold run (same as --set max_examples=N)")
    e = r.add_argument_group("where trials run")
    e.add_argument("--executor", choices=("inprocess", "process", "ray"), default=None,
                   help="default: inprocess for 1 worker, process for more")
    e.add_argument("--workers", type=int, default=None, help="parallel trials")
    e.add_argument("--threads", type=int, default=None,
                   help="torch threads per trial (default: CPUs / workers)")
    e.add_argument("--address", default=None,
                   help="Ray cluster address (default: start a local Ray instance)")
    e.add_argument("--gpus-per-trial", type=float, default=0.0,
                   help="GPUs each Ray trial reserves (fractions share a GPU)")
    e.add_argument("--device", default=None,
                   help="cpu, cuda, cuda:N or auto (default: cuda with --gpus-per-trial, else "
                        "cpu)")
    e.add_argument("--data-dir", default=None,
                   help="dataset folder (default: $BPDL_DATA_DIR, else the user cache)")
    e.add_argument("--offline", action="store_true", help="never download datasets")
    e.add_argument("--no-progress", action="store_true",
                   help="plain log lines, no progress bar (the default when stderr is not a "
                        "terminal)")
    r.set_defaults(func=cmd_study_run)

    rep = ssub.add_parser("report", help="tables and figures of the studies in a database",
                          description="Print and write (Markdown, CSV) each study's best, worst, "
                                      "mean, median and std of the objective, chance-level, "
                                      "diverged, failed and rejected counts and held-out test "
                                      "results; figures: objective per iteration, histogram, "
                                      "box plot.")
    rep.add_argument("db", type=Path, help="study database")
    rep.add_argument("--name", nargs="+", default=None, help="only these studies")
    rep.add_argument("--out", type=Path, default=None, help="output folder (default DB_report)")
    rep.set_defaults(func=cmd_study_report)

    cmp_ = ssub.add_parser("compare", help="compare studies across rules and datasets",
                           description="Draw the rules-by-datasets grid (objective per "
                                       "iteration, histogram, box plot) and, per dataset, bars "
                                       "of best/mean/worst with every trial, the count at "
                                       "chance and the best configurations' test accuracy.")
    cmp_.add_argument("dbs", type=Path, nargs="+", help="study databases")
    cmp_.add_argument("--name", nargs="+", default=None, help="only these studies")
    cmp_.add_argument("--out", type=Path, default=Path("studies/compare"),
                      help="output folder (default studies/compare)")
    cmp_.add_argument("--title", default=None)
    cmp_.set_defaults(func=cmd_study_compare)

    sp = ssub.add_parser("spaces", help="registered search spaces and rule defaults")
    sp.set_defaults(func=cmd_study_spaces)
    op = ssub.add_parser("optimizers", help="Nevergrad optimizer names")
    op.set_defaults(func=cmd_study_optimizers)


def _natural_model(rule: str) -> str:
    """The model a rule trains when none is named: its own family (segregated, microcircuit),
    else the MLP. An unknown rule is left to the study's own error."""
    from bpdl import rules
    from bpdl.errors import ConfigError

    try:
        models = rules.get(rule).supported_models
    except (ConfigError, KeyError):
        return "mlp"
    return models[0] if models else "mlp"


def study_config_from_args(args: argparse.Namespace):
    from bpdl.studies.runner import StudyConfig

    fixed = _set_items(args.fixed)
    if args.max_examples is not None:
        fixed["max_examples"] = args.max_examples
    return StudyConfig(rule=args.rule, model=args.model or _natural_model(args.rule), dataset=args.dataset,
                       space=args.space, optimizer=args.optimizer, budget=args.budget,
                       epochs=args.epochs, folds=args.folds, seed=args.seed, top_k=args.top_k,
                       test_seeds=args.test_seeds, train_subset=args.train_subset, fixed=fixed,
                       name=args.name)


def cmd_study_run(args: argparse.Namespace) -> int:
    from bpdl.errors import ConfigError
    from bpdl.studies.runner import run_study
    from bpdl.studies.spaces import space_from_file

    cfg = study_config_from_args(args)
    space = None
    if args.space_file is not None:
        if args.space:
            raise ConfigError("give --space or --space-file, not both")
        space = space_from_file(str(args.space_file))
    executor = args.executor or ("process" if (args.workers or 1) > 1 else "inprocess")
    db = args.db or Path("studies") / f"{cfg.study_name}.db"
    download = not (args.offline or os.environ.get("BPDL_OFFLINE", "") not in ("", "0"))
    result = run_study(cfg, db, space=space, executor=executor, workers=args.workers,
                       threads=args.threads, address=args.address,
                       gpus_per_trial=args.gpus_per_trial, device=args.device,
                       data_dir=args.data_dir, download=download,
                       progress=not args.no_progress and sys.stderr.isatty())
    return 0 if result.status == "complete" else 1


def cmd_study_report(args: argparse.Namespace) -> int:
    from bpdl.studies.report import write_report

    text, files = write_report(args.db, args.out, args.name)
    print(text.split("\n## ", 1)[0].rstrip())
    print(f"\nwrote {', '.join(str(f) for f in files)}")
    return 0


def cmd_study_compare(args: argparse.Namespace) -> int:
    from bpdl.studies.report import write_compare

    text, files = write_compare(args.dbs, args.out, args.name, args.title)
    print(text.split("\n![", 1)[0].rstrip())
    print(f"\nwrote {', '.join(str(f) for f in files)}")
    return 0


def cmd_study_spaces(args: argparse.Namespace) -> int:
    from bpdl import rules
    from bpdl.nn import MODELS
    from bpdl.studies import spaces

    for name in spaces.SPACES.names():
        space = spaces.get_space(name)
        print(f"{name} v{space.version}: {space.description}")
        for line in space.describe():
            print(f"    {line}")
    print("\ndefault space per rule and model:")
    for rule in rules.names():
        for model in MODELS.names():
            print(f"    {rule} {model}: {spaces.default_space(rule, model).name}")
    return 0


def cmd_study_optimizers(args: argparse.Namespace) -> int:
    from bpdl.studies.runner import optimizer_names

    print("\n".join(optimizer_names()))
    return 0
