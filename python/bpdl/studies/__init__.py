"""Hyperparameter robustness studies: "how robust is this rule?" as one resumable command.

A study searches a rule's hyperparameters with a Nevergrad optimiser, scoring each trial by
k-fold cross-validation on the training set, stores everything in one SQLite file, re-tests
the best configurations on the held-out test set, and reports tables and T19-style figures::

    from bpdl.studies import StudyConfig, run_study, write_report

    result = run_study(StudyConfig(rule="bp", model="mlp", dataset="mnist", budget=20,
                                   epochs=1, train_subset=6000), "studies/bp.db",
                       executor="process", workers=2)
    write_report("studies/bp.db")

Modules: :mod:`~bpdl.studies.spaces` (search spaces and their registry),
:mod:`~bpdl.studies.runner` (the ask/evaluate/tell loop and resume),
:mod:`~bpdl.studies.store` (the database), :mod:`~bpdl.studies.executors` (in-process,
process pool, Ray), :mod:`~bpdl.studies.worker` (what a trial computes),
:mod:`~bpdl.studies.report` (tables and figures). Nevergrad, Ray and matplotlib are imported
only when used, so ``import bpdl.studies`` is cheap.
"""

from __future__ import annotations

from bpdl.studies.report import write_compare, write_report
from bpdl.studies.runner import (
    CHANCE_ACCURACY,
    StudyConfig,
    StudyResult,
    resolve_optimizer,
    run_study,
    summarize,
)
from bpdl.studies.spaces import (
    SPACES,
    Choice,
    IntList,
    IntRange,
    LogUniform,
    SearchSpace,
    Uniform,
    default_space,
    get_space,
    register_space,
    set_default_space,
    space_from_dict,
    space_from_file,
)
from bpdl.studies.store import StudyDatabaseError, StudyStore

__all__ = [
    "CHANCE_ACCURACY", "SPACES", "Choice", "IntList", "IntRange", "LogUniform", "SearchSpace",
    "StudyConfig", "StudyDatabaseError", "StudyResult", "StudyStore", "Uniform",
    "default_space", "get_space", "register_space", "resolve_optimizer", "run_study",
    "set_default_space", "space_from_dict", "space_from_file", "summarize", "write_compare",
    "write_report",
]
