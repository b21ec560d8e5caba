"""What runs on a worker: one trial (k-fold cross-validation) or one held-out test run.

Jobs are plain picklable data (:class:`Job`, :class:`DataSpec`), so the same function serves
the in-process executor, a local process pool and Ray. A worker loads its data once per
process (the training set, the seeded train subset and the folds are cached by
:class:`DataSpec`), and :func:`run_job` never raises for a failing trial: it returns an
outcome with status ``completed``, ``diverged`` or ``failed`` and the error.

Objective (docs/algorithms/published_results.md §7.9 protocol, without the 8.11 confound): the mean over the k
stratified folds of the *official training set* of the final validation accuracy after the
configured epochs,

    objective = (1/k) * sum_f acc(model trained on folds != f, fold f).

The official test set is used only by test jobs, which train on the whole (subset of the)
training set with a fresh seed and report test accuracy.
"""

from __future__ import annotations

import os
import socket
import time
import traceback
from dataclasses import dataclass
from typing import Any

#: Keys of each evaluation record kept as a trial's learning curve.
CURVE_KEYS = ("examples", "epoch", "val_acc", "val_loss", "running_loss", "running_acc",
              "train_acc", "train_loss", "elapsed")


@dataclass(frozen=True)
class DataSpec:
    """Which data a study's jobs use; equal specs share one cached copy per process."""

    dataset: str
    folds: int
    seed: int
    train_subset: int | None = None
    data_dir: str | None = None
    download: bool = True


@dataclass(frozen=True)
class Job:
    """One unit of work. ``kind`` is ``trial`` (k-fold objective) or ``test`` (held-out test).

    ``key`` is the trial number, or ``(trial number, seed)`` for a test job.
    """

    kind: str
    study: str
    key: Any
    config: dict[str, Any]
    data: DataSpec
    threads: int | None = None
    attempt: int = 1


_DATA_CACHE: dict[DataSpec, tuple[Any, list, Any]] = {}


def load_study_data(spec: DataSpec) -> tuple[Any, list, Any]:
    """``(train_pool, folds, test)`` for ``spec``: the official training set (or its seeded,
    stratified subset of ``train_subset`` examples), its k stratified folds as index pairs,
    and the official test set. Cached per process."""
    from bpdl import data as bdata
    from bpdl.errors import ConfigError

    cached = _DATA_CACHE.get(spec)
    if cached is not None:
        return cached
    train = bdata.load_dataset(spec.dataset, "train", spec.data_dir, spec.download)
    test = bdata.load_dataset(spec.dataset, "test", spec.data_dir, spec.download)
    if spec.train_subset is not None:
        if not 0 < spec.train_subset < len(train):
            raise ConfigError(f"train_subset must be between 1 and {len(train) - 1} (the "
                              f"{spec.dataset} training set has {len(train)} examples), got "
                              f"{spec.train_subset}")
        _, keep = bdata.stratified_split(train.labels, val_size=int(spec.train_subset),
                                         seed=spec.seed)
        train = train.subset(keep)
    try:
        folds = bdata.kfold_indices(train.labels, spec.folds, spec.seed)
    except ValueError as err:
        raise ConfigError(f"cannot cut {spec.folds} folds: {err}") from err
    _DATA_CACHE.clear()  # one study's data per process is enough; do not pile them up
    _DATA_CACHE[spec] = (train, folds, test)
    return _DATA_CACHE[spec]


def _worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _error_text(err: BaseException) -> str:
    tb = traceback.extract_tb(err.__traceback__)
    where = f" (at {tb[-1].filename.rsplit('/', 1)[-1]}:{tb[-1].lineno})" if tb else ""
    return f"{type(err).__name__}: {err}{where}"


def _curve(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: rec[k] for k in CURVE_KEYS if rec.get(k) is not None} for rec in history]


def _quiet(_: str) -> None:
    pass


def evaluate_trial(job: Job) -> dict[str, Any]:
    """Cross-validate ``job.config``; see the module docstring. Stops at the first fold that
    diverges (the trial is ``diverged``) and lets exceptions propagate to :func:`run_job`."""
    from bpdl.train import RunConfig, train

    pool, folds, _ = load_study_data(job.data)
    cfg = RunConfig.from_dict(job.config)
    fold_results: list[dict[str, Any]] = []
    curves: list[list[dict[str, Any]]] = []
    status, error = "completed", None
    for f, (train_idx, val_idx) in enumerate(folds):
        result = train(cfg, data=(pool.subset(train_idx), pool.subset(val_idx), None),
                       progress=False, log=_quiet)
        s = result.summary
        fold_results.append({
            "fold": f, "status": result.status, "val_acc": s.get("val_acc"),
            "val_loss": s.get("val_loss"), "best_val_acc": s.get("best_val_acc"),
            "examples": s.get("examples"), "train_time_s": s.get("train_time_s"),
            "wall_time_s": s.get("wall_time_s"), "n_train": int(train_idx.numel()),
            "n_val": int(val_idx.numel())})
        curves.append(_curve(result.history))
        if result.status != "completed":
            status, error = result.status, f"fold {f}: {s.get('message', result.status)}"
            break
    objective = None
    if status == "completed":
        accs = [fr["val_acc"] for fr in fold_results]
        objective = sum(accs) / len(accs)
    return {"status": status, "objective": objective, "folds": fold_results, "curves": curves,
            "error": error}


def evaluate_test(job: Job) -> dict[str, Any]:
    """Train ``job.config`` on the whole training pool and score the official test set."""
    from bpdl.train import RunConfig, train

    pool, _, test = load_study_data(job.data)
    cfg = RunConfig.from_dict({**job.config, "test": "final"})
    result = train(cfg, data=(pool, None, test), progress=False, log=_quiet)
    s = result.summary
    return {"status": result.status, "test_acc": s.get("test_acc"),
            "test_loss": s.get("test_loss"),
            "error": None if result.ok else s.get("message", result.status)}


def run_job(job: Job) -> dict[str, Any]:
    """Run ``job`` and return its outcome; any exception becomes status ``failed``.

    The outcome always carries ``status``, ``error``, ``started``, ``finished``, ``duration``
    (seconds of this job, the measure of trial time) and ``worker`` (host:pid).
    """
    import torch

    if job.threads is not None and torch.get_num_threads() != job.threads:
        torch.set_num_threads(job.threads)
    started = time.time()
    t0 = time.perf_counter()
    try:
        outcome = evaluate_trial(job) if job.kind == "trial" else evaluate_test(job)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as err:  # recorded with the trial; the study goes on
        outcome = {"status": "failed", "error": _error_text(err)}
    outcome.update(started=started, finished=time.time(), duration=time.perf_counter() - t0,
                   worker=_worker_name())
    return outcome
