"""The study runner: ask Nevergrad, check the proposal, run trials, tell, store, resume.

A study (:class:`StudyConfig`) is a rule, a model family, a dataset, a search space, a
Nevergrad optimiser, a budget of evaluated trials, epochs, folds and seeds. :func:`run_study`
runs it against a study database (:mod:`bpdl.studies.store`) with an executor
(:mod:`bpdl.studies.executors`):

1. *Ask.* The optimiser proposes a point; the space decodes it into a run config, which is
   validated and whose model and learner are built on the CPU (cheap, no data). A proposal
   that cannot work (a CNN whose geometry collapses, ``cnn_geometry`` raising ConfigError) is
   a *rejection*: recorded in the ``rejections`` table with its error, told to the optimiser
   as the worst loss (so it learns to avoid the region), and the optimiser is asked again.
   Rejections take no evaluation slot and never replace the point with another one (T19 fell
   back to uniform random points, docs/algorithms/pitfalls.md §8.12).
2. *Evaluate.* The trial (k-fold cross-validation on the official training set, see
   :mod:`bpdl.studies.worker`) runs on the executor. ``completed`` trials have an objective;
   ``diverged`` and ``failed`` ones are recorded with their error and told the worst loss.
3. *Tell and store.* Each step's finished trials, new trials, rejections and a pickled
   snapshot of the optimiser (with the candidates still in flight) are written in one
   transaction, so the database never holds trials and an optimiser that disagree.
4. *Test.* When the budget is spent, the ``top_k`` best distinct configurations by objective
   are trained on the whole training set with ``test_seeds`` fresh seeds and scored on the
   official test set, stored apart from the search objective (no selection on test data,
   docs/algorithms/pitfalls.md §8.11).

Resuming: rerunning the same study restores the optimiser from its snapshot (the exact state,
random generator included) and retries every trial that was running when the previous
process died, with the same parameters and seed; a finished trial is never run again and the
budget counts each trial once. When the snapshot cannot be used (another Nevergrad version,
a damaged blob) the optimiser is rebuilt by re-telling every finished trial and rejection in
the order they happened.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pickle
import statistics
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bpdl.config import from_dict, require_positive, to_dict
from bpdl.errors import ConfigError
from bpdl.studies import spaces as sp
from bpdl.studies.executors import Executor, check_executor_options, make_executor
from bpdl.studies.store import StudyDatabaseError, StudyStore
from bpdl.studies.worker import DataSpec, Job

#: Loss told to the optimiser for failed, diverged and rejected points (objective = 1 - loss,
#: so this is accuracy 0: worse than any trained network).
WORST_LOSS = 1.0
#: T19's chance threshold (docs/algorithms/published_results.md §7.9): a trial at or below it learned nothing.
CHANCE_ACCURACY = 0.15
#: Objective definition; bump when what a trial measures changes.
OBJECTIVE = "mean final validation accuracy over k stratified folds of the training set (v1)"
#: Seeds: trial n trains with seed * SEED_STRIDE + n; test run i with ... + TEST_SEED_OFFSET + i.
SEED_STRIDE = 100_000
TEST_SEED_OFFSET = 90_000
MAX_BUDGET = TEST_SEED_OFFSET - 1
_WAIT_S = 5.0


@dataclass(frozen=True)
class StudyConfig:
    """What a study is. Pickles and round-trips JSON; its :func:`study_definition` is stored
    and compared on resume.

    Defaults are T19's protocol (docs/algorithms/published_results.md §7.9): 50 evaluations of 3-fold
    cross-validation after 10 epochs; the search space is the one registered for (rule,
    model), else the generic learning-rate and batch-size space.
    """

    rule: str = "bp"
    model: str = "mlp"
    dataset: str = "mnist"
    #: registered search-space name (None: the default for rule and model)
    space: str | None = None
    #: any name in nevergrad.optimizers.registry
    optimizer: str = "NGOpt"
    budget: int = 50
    epochs: int = 10
    folds: int = 3
    seed: int = 0
    #: configurations (best by objective) re-evaluated on the held-out test set
    top_k: int = 3
    #: seeds per re-evaluated configuration
    test_seeds: int = 3
    #: use a seeded, stratified subset of this many training examples (None: all)
    train_subset: int | None = None
    #: run-config settings fixed for every trial (e.g. {"max_examples": 5000})
    fixed: dict[str, Any] = field(default_factory=dict)
    #: study name inside the database (None: RULE-MODEL-DATASET)
    name: str | None = None

    @property
    def study_name(self) -> str:
        return self.name or f"{self.rule}-{self.model}-{self.dataset}"

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StudyConfig:
        return from_dict(cls, d, what="study config")


#: T19's Bayesian optimiser: a Gaussian process with a Matern 2.5 kernel (bayes_opt's default,
#: which Nevergrad's BO uses) and the upper-confidence-bound acquisition at kappa = 2.5
#: (docs/algorithms/published_results.md §7.9), registered in Nevergrad under this name.
T19_BAYES = "T19-GP-UCB"


def _register_t19_bayes() -> None:
    import nevergrad as ng

    if T19_BAYES in ng.optimizers.registry:
        return
    try:
        import bayes_opt  # noqa: F401  (Nevergrad's BO needs it)
    except ImportError:
        return  # not offered: `bpdl study optimizers` does not list it
    ng.families.ParametrizedBO(utility_kind="ucb", utility_kappa=2.5).set_name(
        T19_BAYES, register=True)


def optimizer_names() -> list[str]:
    import nevergrad as ng

    _register_t19_bayes()
    return sorted(ng.optimizers.registry)


_OPTIMIZER_EXAMPLES = ("NGOpt", "TwoPointsDE", "CMA", "OnePlusOne", "RandomSearch", "PSO",
                       "DE", "ScrHammersleySearch", "BO")


def resolve_optimizer(name: str) -> str:
    """The Nevergrad registry name for ``name`` (case-insensitive); ConfigError otherwise."""
    registry = optimizer_names()
    if name in registry:
        return name
    folded = [n for n in registry if n.lower() == str(name).lower()]
    if len(folded) == 1:
        return folded[0]
    examples = [n for n in _OPTIMIZER_EXAMPLES if n in registry]
    raise ConfigError(f"unknown Nevergrad optimizer {name!r}; for example {', '.join(examples)} "
                      f"({len(registry)} registered: see nevergrad.optimizers.registry or "
                      f"`bpdl study optimizers`)")


def resolve_space(cfg: StudyConfig, space: sp.SearchSpace | None = None) -> sp.SearchSpace:
    """The study's search space: ``space`` if given, else ``cfg.space`` by name, else the
    default registered for (rule, model)."""
    if space is None:
        space = sp.get_space(cfg.space) if cfg.space else sp.default_space(cfg.rule, cfg.model)
    elif cfg.space not in (None, space.name):
        raise ConfigError(f"the study names space {cfg.space!r} but space {space.name!r} was "
                          f"given")
    return space


def validate_study(cfg: StudyConfig, space: sp.SearchSpace) -> None:
    """ConfigError for anything in the study that cannot work, before any work starts."""
    from bpdl import data as bdata
    from bpdl import nn as bnn
    from bpdl import rules

    rules.get(cfg.rule)
    bnn.MODELS.get(cfg.model)
    if cfg.dataset not in bdata.DATASETS:
        raise ConfigError(f"unknown dataset {cfg.dataset!r}; valid datasets are: "
                          f"{', '.join(bdata.DATASETS)}")
    for name in ("budget", "epochs", "folds", "top_k", "test_seeds"):
        require_positive(name, getattr(cfg, name), integer=True)
    if cfg.budget > MAX_BUDGET:
        raise ConfigError(f"budget must be at most {MAX_BUDGET}, got {cfg.budget}")
    if cfg.folds < 2:
        raise ConfigError(f"folds must be >= 2 (k-fold cross-validation), got {cfg.folds}")
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int) or cfg.seed < 0:
        raise ConfigError(f"seed must be an integer >= 0, got {cfg.seed!r}")
    if cfg.train_subset is not None:
        require_positive("train_subset", cfg.train_subset, integer=True)
    if not cfg.study_name or any(ch in cfg.study_name for ch in "/\\\n"):
        raise ConfigError(f"invalid study name {cfg.study_name!r}")
    resolve_optimizer(cfg.optimizer)
    space.validate()
    space.check_targets(cfg.rule, cfg.model)
    fixed = sp.flatten_paths(cfg.fixed)
    owned = sorted(set(k.split(".")[0] for k in fixed) & sp._STUDY_OWNED)
    if owned:
        raise ConfigError(f"cannot fix {', '.join(owned)} with --set: the study sets them (use "
                          f"the study's own options)")
    sp.check_target_keys(list(fixed), cfg.rule, cfg.model, "--set")
    both = sorted(set(fixed) & set(space.dims))
    if both:
        raise ConfigError(f"contradictory study: {', '.join(both)} is both searched by space "
                          f"{space.name!r} and fixed by --set; drop one of them")


def study_definition(cfg: StudyConfig, space: sp.SearchSpace) -> dict[str, Any]:
    """What must match for a stored study to be resumed (everything but where it runs)."""
    d = cfg.to_dict()
    d.pop("name")
    d["space"] = {k: v for k, v in space.to_dict().items() if k != "description"}
    d["optimizer"] = resolve_optimizer(cfg.optimizer)
    d["objective"] = OBJECTIVE
    return d


def trial_seed(cfg: StudyConfig, number: int) -> int:
    return cfg.seed * SEED_STRIDE + number


def heldout_seed(cfg: StudyConfig, index: int) -> int:
    return cfg.seed * SEED_STRIDE + TEST_SEED_OFFSET + index


def trial_config(cfg: StudyConfig, space: sp.SearchSpace, flat: dict[str, Any],
                 seed: int) -> dict[str, Any]:
    """The run config (as a dict) of one trial: study settings, the space's fixed settings,
    the study's ``fixed`` settings, then the searched values; the rule's run defaults
    (:func:`bpdl.train.rule_defaults`) fill the fields none of these set."""
    base: dict[str, Any] = {
        "dataset": cfg.dataset, "model": cfg.model, "rule": cfg.rule, "epochs": cfg.epochs,
        "seed": seed, "test": "never", "val_size": 0,
        # studies score folds; train-subset and alignment probes would only cost time
        "train_eval_size": 0, "probe_size": 0}
    decoded = space.decode(flat)
    d = sp.deep_merge(base, space.fixed)
    d = sp.deep_merge(d, cfg.fixed)
    d = sp.deep_merge(d, decoded)
    # the rule's run defaults for every field neither the space nor the study set, as every
    # entry point applies them (bpdl.train.resolve_config); bpdl's own defaults stay implicit
    from bpdl.train import RunConfig, rule_defaults

    return {**d, **rule_defaults(RunConfig.from_dict(d))}


def check_proposal(config: dict[str, Any], shape: tuple[int, int, int], classes: int) -> None:
    """Raise ConfigError (or ValueError) if ``config`` cannot train: invalid values, or a
    model or learner that cannot be built for inputs of ``shape`` (built on the CPU)."""
    import torch

    from bpdl.train import RunConfig, build_learner, validate

    run_cfg = validate(RunConfig.from_dict({**config, "device": "cpu"}))
    with torch.random.fork_rng(devices=[]):
        build_learner(run_cfg, shape, classes)


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


@dataclass
class StudyResult:
    """What :func:`run_study` returns (also printed as the end-of-study summary)."""

    name: str
    db: Path
    status: str
    counts: dict[str, int]
    best: dict[str, Any] | None
    tests: list[dict[str, Any]]
    wall_time_s: float
    lines: list[str]


class _Session:
    """One run of one study against an open store and a started executor."""

    def __init__(self, cfg: StudyConfig, space: sp.SearchSpace, store: StudyStore,
                 executor: Executor, data: DataSpec, shape: tuple[int, int, int], classes: int,
                 run_options: dict[str, Any], log: Callable[[str], None],
                 max_rejections: int, on_trial: Callable[[int, int], None] | None = None):
        self.cfg, self.space, self.store, self.executor = cfg, space, store, executor
        self.name = cfg.study_name
        self.data, self.shape, self.classes = data, shape, classes
        self.run_options = run_options
        self.log = log
        self.on_trial = on_trial
        self.max_rejections = max_rejections
        self.optimizer_name = resolve_optimizer(cfg.optimizer)
        self.t_start = time.perf_counter()
        self.finished_this_session = 0
        self.tests_this_session = 0
        self.inflight: dict[int, Any] = {}      # trial number -> Nevergrad candidate
        self.next_seq = 0
        self.pending_rejections: list[tuple[int, dict, str]] = []
        self.snapshot_warned = False

    # ---- the optimiser --------------------------------------------------------------------

    def _new_optimizer(self):
        import nevergrad as ng

        param = self.space.parametrization(seed=self.cfg.seed)
        optimizer = ng.optimizers.registry[self.optimizer_name](
            parametrization=param, budget=self.cfg.budget, num_workers=self.executor.slots)
        # optimisers that wrap scipy in a thread (Cobyla, SQP, ... which NGOpt picks for some
        # spaces) pickle only when asked to before the first ask
        optimizer.enable_pickling()
        return optimizer

    def _snapshot(self) -> tuple[bytes | None, dict[str, Any]]:
        import nevergrad as ng

        info = {"nevergrad": ng.__version__, "optimizer": self.optimizer_name,
                "num_ask": self.optimizer.num_ask, "num_tell": self.optimizer.num_tell,
                "inflight": sorted(self.inflight), "next_seq": self.next_seq}
        try:
            # level 1: a fifth of the size (Nevergrad's archive compresses well) for ~10 % of
            # the pickling time
            blob = zlib.compress(pickle.dumps({"optimizer": self.optimizer,
                                               "inflight": self.inflight},
                                              protocol=pickle.HIGHEST_PROTOCOL), 1)
            info["compression"] = "zlib"
        except Exception as err:  # resume then rebuilds the optimiser from the trial log
            if not self.snapshot_warned:
                self.log(f"  note: cannot snapshot optimizer {self.optimizer_name} "
                         f"({type(err).__name__}: {err}); a resume will replay the trial log")
                self.snapshot_warned = True
            blob, info["snapshot_error"] = None, f"{type(err).__name__}: {err}"
        return blob, info

    def _restore(self, trials: list[dict[str, Any]]) -> str:
        """Set ``self.optimizer`` and ``self.inflight``; returns how it was restored."""
        import nevergrad as ng

        running = {t["number"] for t in trials if t["status"] == "running"}
        study = self.store.study(self.name)
        self.next_seq = int(study["next_seq"]) if study else 0
        blob, info = self.store.snapshot(self.name)
        if blob is None and not trials and not self.store.rejections(self.name):
            self.optimizer = self._new_optimizer()
            return "new"
        reason = "no snapshot"
        if info is not None and info.get("snapshot_error"):
            reason = f"no snapshot: {info['snapshot_error']}"
        if blob is not None and info is not None:
            if info.get("nevergrad") != ng.__version__:
                reason = (f"snapshot written by nevergrad {info.get('nevergrad')}, this is "
                          f"{ng.__version__}")
            else:
                try:
                    if info.get("compression") == "zlib":
                        blob = zlib.decompress(blob)
                    state = pickle.loads(blob)
                    optimizer, inflight = state["optimizer"], dict(state["inflight"])
                except Exception as err:  # damaged or incompatible blob: fall back to replay
                    reason = f"snapshot unreadable ({type(err).__name__}: {err})"
                else:
                    if set(inflight) == running:
                        self.optimizer, self.inflight = optimizer, inflight
                        return "snapshot"
                    reason = (f"snapshot in-flight trials {sorted(inflight)} differ from the "
                              f"running ones {sorted(running)}")
        self._replay(trials)
        return f"replayed from the trial log ({reason})"

    def _replay(self, trials: list[dict[str, Any]]) -> None:
        """Rebuild the optimiser by re-asking (as suggestions) and re-telling every point in
        the order it happened."""
        from nevergrad.common import errors as ng_errors

        self.optimizer = self._new_optimizer()
        self.inflight = {}
        events: list[tuple[int, int, str, dict[str, Any]]] = []
        for t in trials:
            events.append((t["ask_seq"], 0, "ask", t))
            if t["tell_seq"] is not None:
                events.append((t["tell_seq"], 1, "tell", t))
        for r in self.store.rejections(self.name):
            events.append((r["seq"], 0, "reject", r))
        events.sort(key=lambda e: (e[0], e[1]))
        candidates: dict[int, Any] = {}
        try:
            for seq, _, kind, row in events:
                self.next_seq = max(self.next_seq, seq + 1)
                if kind == "tell":
                    self.optimizer.tell(candidates.pop(row["number"]), row["loss"])
                    continue
                self.optimizer.suggest(row["params"])
                candidate = self.optimizer.ask()
                if kind == "reject":
                    self.optimizer.tell(candidate, WORST_LOSS)
                else:
                    candidates[row["number"]] = candidate
        except ng_errors.TellNotAskedNotSupportedError as err:
            raise StudyDatabaseError(
                f"optimizer {self.optimizer_name} cannot be rebuilt from the trial log (it "
                f"does not accept points it did not propose) and the stored snapshot cannot "
                f"be used; resume with the Nevergrad version that wrote it") from err
        self.inflight = candidates  # the trials still running

    # ---- asking ------------------------------------------------------------------------------

    def _ask_valid(self) -> tuple[Any, dict[str, Any], int]:
        """Ask until a proposal passes :func:`check_proposal`; rejections are told and queued
        for the next transaction. Returns the candidate, its flat value and its sequence
        number."""
        streak = 0
        while True:
            candidate = self.optimizer.ask()
            flat = _plain(candidate.value)
            seq = self.next_seq
            self.next_seq += 1
            try:
                config = trial_config(self.cfg, self.space, flat, seed=0)
                check_proposal(config, self.shape, self.classes)
            except (ConfigError, ValueError) as err:
                self.optimizer.tell(candidate, WORST_LOSS)
                message = f"{type(err).__name__}: {err}"
                self.pending_rejections.append((seq, flat, message))
                self.log(f"  proposal rejected, not counted ({message})")
                streak += 1
                if streak >= self.max_rejections:
                    raise ConfigError(
                        f"the search space {self.space.name!r} produced {streak} invalid "
                        f"proposals in a row for {self.cfg.model} on {self.cfg.dataset} (last: "
                        f"{message}); it is contradictory for this dataset: narrow it") from err
                continue
            return candidate, flat, seq

    def _commit(self, new_trials: list[tuple] = (), finished: list[tuple] = ()) -> None:
        """One transaction: rejections, finished trials, new trials, and the snapshot."""
        blob, info = self._snapshot()
        with self.store.transaction() as c:
            for seq, flat, message in self.pending_rejections:
                self.store.insert_rejection(c, self.name, seq, flat, message)
            for number, outcome, loss, tell_seq in finished:
                self.store.finish_trial(c, self.name, number, outcome, loss, tell_seq)
            for new_trial in new_trials:
                self.store.insert_trial(c, self.name, *new_trial)
            self.store.save_snapshot(c, self.name, blob, info, self.next_seq)
        self.pending_rejections = []

    # ---- jobs ----------------------------------------------------------------------------

    def _job(self, kind: str, key: Any, config: dict[str, Any], attempt: int = 1) -> Job:
        runtime = {"device": self.run_options["device"],
                   "threads": getattr(self.executor, "threads", None)}
        return Job(kind, self.name, key, {**config, **runtime}, self.data,
                   threads=runtime["threads"], attempt=attempt)

    # ---- progress --------------------------------------------------------------------------

    def _best(self, trials: list[dict[str, Any]]) -> dict[str, Any] | None:
        done = [t for t in trials if t["status"] == "completed" and t["objective"] is not None]
        return max(done, key=lambda t: (t["objective"], -t["number"])) if done else None

    def _eta(self, remaining_trials: int, remaining_tests: int) -> str:
        elapsed = time.perf_counter() - self.t_start
        units = self.finished_this_session + self.tests_this_session / max(1, self.cfg.folds - 1)
        if units <= 0:
            return "?"
        todo = remaining_trials + remaining_tests / max(1, self.cfg.folds - 1)
        return format_duration(todo * elapsed / units)

    # ---- the run -------------------------------------------------------------------------------

    def run(self) -> StudyResult:
        cfg = self.cfg
        trials = self.store.trials(self.name)
        how = self._restore(trials)
        running = [t for t in trials if t["status"] == "running"]
        n_finished = len(trials) - len(running)
        study = self.store.study(self.name)
        if study["status"] == "complete" and not running and len(trials) >= cfg.budget:
            self.log(f"study {self.name} is already complete; nothing to run")
            return summarize(self.store, self.name)
        if how != "new":
            self.log(f"resuming {self.name}: {n_finished} finished trial(s) kept, "
                     f"{len(running)} interrupted trial(s) retried, "
                     f"{len(self.store.rejections(self.name))} rejected proposal(s) on record; "
                     f"optimizer {how}")
        self.store.set_status(self.name, "running")
        for t in running:
            with self.store.transaction() as c:
                self.store.restart_trial(c, self.name, t["number"])
            self.executor.submit(self._job("trial", t["number"], t["config"],
                                           attempt=t["attempts"] + 1))
        n_trials = len(trials)
        best = self._best(trials)
        # ---- search ----
        while True:
            # fill the free slots; the new trials, the rejections met on the way and the
            # optimiser snapshot go into the database in one transaction before any job starts
            new: list[tuple] = []
            try:
                while self.executor.pending() + len(new) < self.executor.slots \
                        and n_trials < cfg.budget:
                    candidate, flat, seq = self._ask_valid()
                    number = n_trials + 1
                    config = trial_config(cfg, self.space, flat, trial_seed(cfg, number))
                    self.inflight[number] = candidate
                    new.append((number, flat, config, trial_seed(cfg, number), seq))
                    n_trials += 1
            finally:  # also when the space proved contradictory: keep what was proposed
                if new or self.pending_rejections:
                    self._commit(new_trials=new)
            for number, _, config, _, _ in new:
                self.executor.submit(self._job("trial", number, config))
            if self.executor.pending() == 0:
                break
            finished = []
            for job, outcome in self.executor.wait(_WAIT_S):
                number = job.key
                objective = outcome.get("objective")
                ok = outcome["status"] == "completed" and objective is not None \
                    and math.isfinite(objective)
                if outcome["status"] == "completed" and not ok:
                    outcome = {**outcome, "status": "failed",
                               "error": f"non-finite objective {objective!r}"}
                loss = 1.0 - objective if ok else WORST_LOSS
                self.optimizer.tell(self.inflight.pop(number), loss)
                finished.append((number, outcome, loss, self.next_seq))
                self.next_seq += 1
            if not finished:
                continue
            self._commit(finished=finished)
            for number, outcome, _, _ in finished:
                self.finished_this_session += 1
                n_finished += 1
                objective = outcome.get("objective")
                if outcome["status"] == "completed" and (best is None or (
                        objective, -number) > (best["objective"], -best["number"])):
                    best = {"objective": objective, "number": number}
                self._log_trial(number, outcome, n_finished, best)
        # ---- held-out test re-evaluation ----
        self._test_phase()
        self.store.set_status(self.name, "complete")
        return self._summary()

    def _log_trial(self, number: int, outcome: dict[str, Any], done: int,
                   best: dict[str, Any] | None) -> None:
        if outcome["status"] == "completed":
            what = f"objective {outcome['objective']:.4f}"
        else:
            what = f"{outcome['status'].upper()} ({outcome.get('error')})"
        best_text = f"best {best['objective']:.4f} (#{best['number']})" if best else "best -"
        elapsed = format_duration(time.perf_counter() - self.t_start)
        tests_left = 0 if not best else self.cfg.top_k * self.cfg.test_seeds
        self.log(f"[{self.name}] trial {number} ({done}/{self.cfg.budget}) {what} | {best_text} "
                 f"| {outcome.get('duration') or 0:.1f}s | elapsed {elapsed} | remaining "
                 f"~{self._eta(self.cfg.budget - done, tests_left)}")
        if self.on_trial is not None:
            self.on_trial(done, self.cfg.budget)

    def _test_plan(self) -> list[tuple[int, dict[str, Any], int, int]]:
        """(rank, trial, seed index, seed) of every test run the study calls for: the
        ``top_k`` best *distinct* configurations (an optimiser may propose a point twice; its
        repeats differ only in the trial seed and would be retested with the same test seeds)."""
        trials = [t for t in self.store.trials(self.name)
                  if t["status"] == "completed" and t["objective"] is not None]
        trials.sort(key=lambda t: (-t["objective"], t["number"]))
        chosen, seen = [], set()
        for t in trials:
            key = json.dumps({k: v for k, v in t["config"].items() if k != "seed"},
                             sort_keys=True)
            if key not in seen:
                seen.add(key)
                chosen.append(t)
        plan = []
        for rank, t in enumerate(chosen[: self.cfg.top_k], start=1):
            for i in range(self.cfg.test_seeds):
                plan.append((rank, t, i, heldout_seed(self.cfg, i)))
        return plan

    def _test_phase(self) -> None:
        plan = self._test_plan()
        done = {(r["trial"], r["seed"]) for r in self.store.test_runs(self.name)
                if r["status"] != "running"}
        todo = [p for p in plan if (p[1]["number"], p[3]) not in done]
        if not todo:
            return
        self.log(f"[{self.name}] re-evaluating the {min(self.cfg.top_k, len(plan))} best "
                 f"configuration(s) on the held-out test set with {self.cfg.test_seeds} "
                 f"seed(s): {len(todo)} run(s)")
        queue = list(todo)
        finished = len(plan) - len(todo)
        while queue or self.executor.pending():
            while queue and self.executor.pending() < self.executor.slots:
                rank, trial, _, seed = queue.pop(0)
                with self.store.transaction() as c:
                    self.store.insert_test_run(c, self.name, trial["number"], seed, rank)
                config = {**trial["config"], "seed": seed}
                self.executor.submit(self._job("test", (trial["number"], seed, rank), config))
            for job, outcome in self.executor.wait(_WAIT_S):
                number, seed, rank = job.key
                with self.store.transaction() as c:
                    self.store.finish_test_run(c, self.name, number, seed, outcome)
                finished += 1
                self.tests_this_session += 1
                what = (f"test_acc {outcome['test_acc']:.4f}" if outcome.get("test_acc")
                        is not None else f"{outcome['status'].upper()} ({outcome.get('error')})")
                self.log(f"[{self.name}] test {finished}/{len(plan)}: trial #{number} (rank "
                         f"{rank}) seed {seed}: {what} | remaining "
                         f"~{self._eta(0, len(plan) - finished)}")

    def _summary(self) -> StudyResult:
        return summarize(self.store, self.name, wall_time_s=time.perf_counter() - self.t_start)


def _plain(value: Any) -> Any:
    """Nevergrad values as plain JSON types (numpy scalars become Python numbers)."""
    import numpy as np

    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def summarize(store: StudyStore, name: str, wall_time_s: float | None = None) -> StudyResult:
    """Counts, best trial and test results of study ``name``, with printable lines."""
    study = store.study(name)
    if study is None:
        raise ConfigError(f"{store.path} has no study named {name!r}; it has: "
                          f"{', '.join(store.study_names()) or 'none'}")
    trials = store.trials(name)
    counts = {s: sum(t["status"] == s for t in trials)
              for s in ("completed", "diverged", "failed", "running")}
    counts["rejected"] = len(store.rejections(name))
    done = [t for t in trials if t["status"] == "completed" and t["objective"] is not None]
    best = max(done, key=lambda t: (t["objective"], -t["number"])) if done else None
    tests = summarize_tests(store.test_runs(name), {t["number"]: t for t in trials})
    trial_time = sum(t["duration"] or 0 for t in trials)
    wall = wall_time_s or 0.0
    budget = study["definition"]["budget"]
    lines = [f"study {name} ({store.path}): {study['status']}; {len(trials)}/{budget} trials: "
             f"{counts['completed']} completed, {counts['diverged']} diverged, "
             f"{counts['failed']} failed, {counts['running']} running; {counts['rejected']} "
             f"rejected proposal(s) (not counted)"]
    if done:
        objs = [t["objective"] for t in done]
        lines.append(f"  objective (mean {study['definition']['folds']}-fold validation "
                     f"accuracy): best {max(objs):.4f}, worst {min(objs):.4f}, mean "
                     f"{statistics.fmean(objs):.4f}, median {statistics.median(objs):.4f}")
        lines.append(f"  best trial #{best['number']}: {describe_params(best['config'], study)}")
    for t in tests:
        lines.append(f"  held-out test, rank {t['rank']} (trial #{t['trial']}, objective "
                     f"{t['objective']:.4f}): test accuracy {t['mean']:.4f} +- {t['std']:.4f} "
                     f"over {t['n']} seed(s)" if t["n"] else
                     f"  held-out test, rank {t['rank']} (trial #{t['trial']}): no finished run")
    lines.append(f"  trial time {format_duration(trial_time)} in total"
                 + (f", this session's wall time {format_duration(wall)}" if wall else "")
                 + f"; report: bpdl study report {store.path}")
    status = study["status"]
    return StudyResult(name, store.path, status, counts, best, tests, wall, lines)


def describe_params(config: dict[str, Any], study: dict[str, Any]) -> str:
    """The searched settings of a trial config, ``lr=0.001, batch_size=100, ...``."""
    dims = study["definition"]["space"]["dims"]
    flat = sp.flatten_paths(config)
    parts = []
    for key in dims:
        value = flat.get(key)
        if isinstance(value, float):
            value = f"{value:.4g}"
        parts.append(f"{key.split('.')[-1]}={value}")
    return ", ".join(parts)


def summarize_tests(runs: list[dict[str, Any]], trials: dict[int, dict[str, Any]]
                 ) -> list[dict[str, Any]]:
    """Per re-evaluated trial: rank, mean and population std of test accuracy over seeds."""
    by_trial: dict[int, list[dict[str, Any]]] = {}
    for r in runs:
        by_trial.setdefault(r["trial"], []).append(r)
    out = []
    for number, rs in sorted(by_trial.items(), key=lambda kv: kv[1][0]["rank"]):
        accs = [r["test_acc"] for r in rs if r["status"] == "completed"
                and r["test_acc"] is not None]
        t = trials.get(number, {})
        out.append({"rank": rs[0]["rank"], "trial": number, "objective": t.get("objective"),
                    "n": len(accs), "runs": len(rs),
                    "mean": statistics.fmean(accs) if accs else None,
                    "std": statistics.pstdev(accs) if accs else None,
                    "accs": accs, "seeds": [r["seed"] for r in rs],
                    "failed": [r for r in rs if r["status"] not in ("completed", "running")]})
    return out


def run_study(
    config: StudyConfig | dict[str, Any],
    db: str | Path,
    *,
    space: sp.SearchSpace | None = None,
    executor: str = "inprocess",
    workers: int | None = None,
    threads: int | None = None,
    address: str | None = None,
    gpus_per_trial: float = 0.0,
    device: str | None = None,
    data_dir: str | None = None,
    download: bool = True,
    log: Callable[[str], None] | None = None,
    max_rejections: int = 1000,
    progress: bool = False,
) -> StudyResult:
    """Run (or resume) a study in database ``db``; see the module docstring.

    Args:
        config: the study (a dict is validated into a :class:`StudyConfig`).
        db: the SQLite file; created if absent, shared by any number of studies.
        space: a search space object (default: ``config.space`` or the registered default).
        executor: ``inprocess``, ``process`` (``workers`` processes) or ``ray``.
        workers: parallel trials (process pool size; Ray: jobs in flight, default by CPUs).
        threads: torch threads per trial (default: CPUs / workers for pools).
        address: Ray cluster address (``ray``; default: start a local instance).
        gpus_per_trial: GPUs each Ray trial reserves (fractions share a GPU).
        device: torch device of every trial (``cpu``, ``cuda``, ``auto``; default ``cuda``
            when ``gpus_per_trial`` is set, else ``cpu``).
        data_dir, download: where the datasets are, and whether they may be downloaded.
        log: where progress lines go (default: stdout).
        progress: a progress bar of the evaluated trials on stderr (the lines are printed
            above it).
        max_rejections: invalid proposals in a row before the space is declared contradictory.
    """
    from bpdl import data as bdata

    cfg = config if isinstance(config, StudyConfig) else StudyConfig.from_dict(config)
    # one spelling per dataset ("Fashion-MNIST" is fashion_mnist), so one study name and
    # definition; unknown names raise ConfigError listing the valid ones
    cfg = dataclasses.replace(cfg, dataset=bdata._canonical_name(cfg.dataset))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.budget, unit="trial", desc=cfg.study_name, dynamic_ncols=True)
    if log is None:
        def log(line: str) -> None:
            if bar is not None:
                bar.write(line)
            else:
                print(line, flush=True)
    on_trial = None if bar is None else (lambda done, total: bar.update(done - bar.n))
    try:
        return _run_study(cfg, db, space, executor, workers, threads, address, gpus_per_trial,
                          device, data_dir, download, log, max_rejections, on_trial)
    finally:
        if bar is not None:
            bar.close()


def _run_study(cfg, db, space, executor, workers, threads, address, gpus_per_trial, device,
               data_dir, download, log, max_rejections, on_trial) -> StudyResult:
    from bpdl import data as bdata
    from bpdl.train import resolve_device

    space = resolve_space(cfg, space)
    validate_study(cfg, space)
    check_executor_options(executor, workers=workers, threads=threads, address=address,
                           gpus_per_trial=gpus_per_trial)
    if device is None:
        device = "cuda" if gpus_per_trial else "cpu"
    if not (executor == "ray" and address):
        resolve_device(device)  # a remote cluster's devices are its own business
    definition = study_definition(cfg, space)
    spec = DataSpec(cfg.dataset, cfg.folds, cfg.seed, cfg.train_subset,
                    str(data_dir) if data_dir is not None else None, download)
    shape, classes = bdata.dataset_info(cfg.dataset)
    if not (executor == "ray" and address):
        # the data must be there (and the subset and folds possible) before anything starts;
        # on a remote Ray cluster the workers load their own copy
        from bpdl.studies.worker import load_study_data

        load_study_data(spec)
    ex = make_executor(executor, workers=workers, threads=threads, address=address,
                       gpus_per_trial=gpus_per_trial, preload=spec)
    store = StudyStore(db)
    try:
        created = store.create_or_check(cfg.study_name, definition)
        token = store.claim(cfg.study_name)
    except BaseException:
        store.close()
        raise
    stop_heartbeat = store.start_heartbeat(cfg.study_name, token)
    try:
        ex.start()
        session = _Session(cfg, space, store, ex, spec, shape, classes, {"device": device}, log,
                           max_rejections, on_trial)
        if created:
            log(f"study {cfg.study_name} in {store.path}: rule {cfg.rule}, model {cfg.model}, "
                f"dataset {cfg.dataset}"
                + (f" (subset of {cfg.train_subset})" if cfg.train_subset else "")
                + f"; space {space.name} v{space.version} ({len(space.dims)} dims); optimizer "
                f"{session.optimizer_name}; budget {cfg.budget} trials x {cfg.folds} folds x "
                f"{cfg.epochs} epoch(s); executor {ex.describe()}")
        result = session.run()
    except KeyboardInterrupt:
        log(f"interrupted: finished trials are stored in {store.path}; rerun the same command "
            f"to resume")
        raise
    finally:
        stop_heartbeat.set()
        ex.close()
        try:
            store.release(cfg.study_name, token)
        finally:
            store.close()
    for line in result.lines:
        log(line)
    return result

