"""The one training loop every learning rule shares.

:func:`train` takes a :class:`RunConfig` (or a dict of its fields) and an optional run folder
(:mod:`bpdl.runs` describes its files) and goes through named steps:

1. :func:`resolve_config` fills every field the caller left unset, first with the rule's own
   run defaults (:meth:`bpdl.rules.Learner.run_defaults`: plain SGD with the paper's per-layer
   rates for segregated dendrites), then with bpdl's (:data:`DEFAULTS`). Every entry point (this
   function, ``bpdl train``, studies, reproductions) goes through it, so the same config means
   the same run however it is given.
2. :func:`open_run_dir` refuses a folder holding a run with another configuration and returns a
   finished run as it is.
3. :func:`start_session` validates, loads the data, builds the learner and its optimisers
   (:meth:`~bpdl.rules.Learner.configure_optimizers`, any number, by name) and, if the folder
   holds a checkpoint, restores learner, optimisers, loop position and RNG state from it.
4. :func:`fit` runs the epochs: per minibatch every optimiser is zeroed, the learner fills
   ``.grad`` (``training_step``), every optimiser steps, the learner's ``after_step`` runs; every
   ``eval_every`` training examples (and at the start and the end) an :class:`Evaluator` writes a
   metrics record (train and validation loss and accuracy, test when asked, per-layer weight
   norms, relative change and last update norm, the rule's alignment metrics, the rule's extra
   training statistics averaged since the last evaluation, examples per second) and the
   checkpoint is rewritten. A resumed run continues bit for bit.
5. The summary (status completed / diverged / failed / interrupted, final and best metrics,
   test accuracy) is written last.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import bpdl
from bpdl import data as bdata
from bpdl import nn as bnn
from bpdl import rules
from bpdl.config import diff, from_dict, require_positive, to_dict
from bpdl.errors import ConfigError, RunDirError
from bpdl.metrics import evaluate, weight_statistics
from bpdl.optim import OPTIMIZERS, build_schedulers, lr_schedule_factor, validate_optimizer
from bpdl.runs import RunDir

TEST_MODES = ("never", "final", "every")
# Fields that may change between a run and its resumption: where it runs, not what it computes.
_RESUMABLE_FIELDS = {"device", "threads", "progress"}
#: bpdl's value of every field a rule may default, used where neither the caller nor the
#: rule's run defaults set it: T19's reference MLP, Adam lr 1e-3, batch 100.
DEFAULTS: dict[str, Any] = {"model": "mlp", "optimizer": "adam", "lr": 1e-3, "batch_size": 100}


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines a training run. Pickles, and round-trips through JSON.

    ``model``, ``optimizer``, ``lr`` and ``batch_size`` left as None are resolved by
    :func:`resolve_config`: the rule's run defaults first (segregated dendrites: its own
    network, plain SGD with the paper's per-layer rates, 32 lanes), else :data:`DEFAULTS`
    (T19's reference MLP: 784-500-10 ReLU, Adam lr 1e-3, batch 100).
    """

    dataset: str = "mnist"
    model: str | None = None
    model_options: dict[str, Any] = field(default_factory=dict)
    rule: str = "bp"
    rule_options: dict[str, Any] = field(default_factory=dict)
    optimizer: str | None = None
    lr: float | None = None
    #: one learning rate per learner parameter group (weight layer), in forward order
    layer_lrs: tuple[float, ...] | None = None
    optimizer_options: dict[str, Any] = field(default_factory=dict)
    #: every optimiser's rates multiplied by an epoch-wise factor: None (constant), "cosine",
    #: "step:E1,E2,...:GAMMA" or "exp:GAMMA" (:func:`bpdl.optim.lr_schedule_factor`)
    lr_schedule: str | None = None
    batch_size: int | None = None
    epochs: int = 1
    #: stop after this many training examples (None: train all epochs)
    max_examples: int | None = None
    #: training examples between evaluations (None: once per epoch)
    eval_every: int | None = None
    #: validation examples held out of the official training set (int) or fraction (float)
    val_size: float = 5000
    #: size of the fixed training subset evaluated for train loss/accuracy (0: skip)
    train_eval_size: int = 10000
    #: evaluate the official test set: never, at the end (final) or at every evaluation
    test: str = "final"
    #: size of the fixed training batch used for alignment metrics (0: skip)
    probe_size: int = 512
    eval_batch_size: int = 1000
    seed: int = 0
    device: str = "auto"
    threads: int | None = None
    #: a minibatch loss above this (or non-finite) stops the run as diverged
    max_loss: float = 1e4

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        return from_dict(cls, d, what="run config")


# ---- 1. resolution and validation ---------------------------------------------------------------

def rule_defaults(cfg: RunConfig) -> dict[str, Any]:
    """The fields the rule fills in ``cfg`` (only fields left unset): its own model if it trains
    only some families and no model was asked for, and its :meth:`~bpdl.rules.Learner.run_defaults`.
    An unknown rule is left for validation to report."""
    if cfg.rule not in rules.RULES:
        return {}
    cls = rules.get(cfg.rule)
    fill: dict[str, Any] = {}
    if cfg.model is None and cls.supported_models:
        fill["model"] = cls.supported_models[0]
    for key, value in cls.run_defaults(dataclasses.replace(cfg, **fill)).items():
        if getattr(cfg, key) is None and key not in fill:
            fill[key] = value
    return fill


def resolve_config(config: RunConfig | dict[str, Any]) -> RunConfig:
    """``config`` with every unset field filled: the rule's defaults (:func:`rule_defaults`),
    then :data:`DEFAULTS`. Idempotent; the one place where run defaults are applied."""
    cfg = config if isinstance(config, RunConfig) else RunConfig.from_dict(config)
    fill = rule_defaults(cfg)
    for key, value in DEFAULTS.items():
        if getattr(cfg, key) is None and key not in fill:
            fill[key] = value
    # through the dict form, so filled values get the fields' types (lists become tuples)
    return RunConfig.from_dict({**cfg.to_dict(), **fill}) if fill else cfg


def validate(cfg: RunConfig | dict[str, Any]) -> RunConfig:
    """Resolve ``cfg`` and raise ConfigError for anything in it that cannot work, before any
    work starts; returns the resolved config."""
    cfg = resolve_config(cfg)
    require_positive("epochs", cfg.epochs, integer=True)
    require_positive("batch_size", cfg.batch_size, integer=True)
    require_positive("eval_batch_size", cfg.eval_batch_size, integer=True)
    for name in ("max_examples", "eval_every", "threads"):
        if getattr(cfg, name) is not None:
            require_positive(name, getattr(cfg, name), integer=True)
    require_positive("max_loss", cfg.max_loss)
    if isinstance(cfg.val_size, bool) or not isinstance(cfg.val_size, (int, float)) \
            or not cfg.val_size >= 0 or (cfg.val_size >= 1 and not float(cfg.val_size).is_integer()):
        raise ConfigError(f"val_size must be 0 (no validation set), a fraction in (0, 1) or a "
                          f"whole number of examples, got {cfg.val_size!r}")
    for name in ("train_eval_size", "probe_size"):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"{name} must be an integer >= 0, got {value!r}")
    if cfg.test not in TEST_MODES:
        raise ConfigError(f"test must be one of {', '.join(TEST_MODES)}, got {cfg.test!r}")
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int) or cfg.seed < 0:
        raise ConfigError(f"seed must be an integer >= 0, got {cfg.seed!r}")
    OPTIMIZERS.get(cfg.optimizer)
    validate_optimizer(cfg.optimizer, cfg.lr, cfg.layer_lrs, cfg.optimizer_options)
    lr_schedule_factor(cfg.lr_schedule, cfg.epochs)
    bnn.model_config(cfg.model, cfg.model_options)
    rules.rule_config(cfg.rule, cfg.rule_options)
    resolve_device(cfg.device)
    return cfg


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when available, else CPU; an unavailable device is a ConfigError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ConfigError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available here; use "
                          f"--device cpu (or auto)")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"unsupported device {name!r}; use auto, cpu, cuda or cuda:N")
    return device


# ---- 2. the run folder --------------------------------------------------------------------------

@dataclass
class RunResult:
    """What :func:`train` returns. ``status`` is completed, diverged, failed or interrupted."""

    status: str
    summary: dict[str, Any]
    history: list[dict[str, Any]]
    learner: rules.Learner | None = None
    run_dir: Path | None = None

    @property
    def ok(self) -> bool:
        return self.status == "completed"


def open_run_dir(out_dir, cfg_dict: dict[str, Any]) -> tuple[RunDir | None, RunResult | None]:
    """The run folder for ``cfg_dict`` (None without ``out_dir``) and, if it holds a completed
    run of the same configuration, that run's result. A different configuration is refused
    with the differences named."""
    if out_dir is None:
        return None, None
    run = RunDir(out_dir)
    run.check_writable()
    old = run.existing_config()
    if old is not None:
        # a field added to RunConfig after the run was written holds its default there
        old = {**RunConfig().to_dict(), **old}
        differences = [d for d in diff(old, cfg_dict) if d.split(":")[0] not in _RESUMABLE_FIELDS]
        if differences:
            raise ConfigError(
                f"{run.path} holds a run with a different configuration; refusing to resume "
                f"it. Differences (existing -> requested): {'; '.join(differences)}. Use "
                f"another --out folder, or the same settings to resume.")
        summary = run.read_summary()
        if summary is not None and summary.get("status") == "completed":
            return run, RunResult("completed", summary, run.read_metrics(), None, run.path)
    return run, None


# ---- 3. the session: learner, optimisers, data, loop state --------------------------------------

@dataclass
class LoopState:
    """Where the loop is: saved in checkpoints so a resumed run continues bit for bit."""

    epoch: int = 0           # current pass over the training set (0-based; = the epoch, unless
    #                          the rule makes several passes per epoch, passes_per_epoch)
    batch: int = 0           # next minibatch index within the pass
    examples: int = 0        # training examples seen
    steps: int = 0           # optimiser steps taken
    next_eval: int = 0       # example count at which the next evaluation is due
    train_time: float = 0.0  # seconds spent in training steps (excluding evaluation)
    wall_time: float = 0.0   # seconds since the run started, over all resumptions


@dataclass
class Session:
    """Everything one training run works with; what :func:`fit` advances."""

    cfg: RunConfig
    learner: rules.Learner
    optimizers: dict[str, torch.optim.Optimizer]
    device: torch.device
    train_set: bdata.ImageSet
    val_set: bdata.ImageSet | None
    test_set: bdata.ImageSet | None
    run: RunDir | None = None
    state: LoopState = field(default_factory=LoopState)
    history: list[dict[str, Any]] = field(default_factory=list)
    t_start: float = 0.0
    #: the learning-rate schedulers of ``cfg.lr_schedule`` by optimiser name (stepped per pass)
    schedulers: dict[str, torch.optim.lr_scheduler.LambdaLR] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.schedulers:
            self.schedulers = build_schedulers(self.optimizers, self.cfg.lr_schedule,
                                               self.cfg.epochs, self.passes)

    def zero_grad(self) -> None:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)

    def step(self) -> None:
        for opt in self.optimizers.values():
            opt.step()

    @property
    def passes(self) -> int:
        """Passes over the training set per epoch (a rule with an alternating schedule makes
        several, e.g. one for its inverses and one for its forward weights)."""
        return int(getattr(self.learner, "passes_per_epoch", 1))

    @property
    def total_examples(self) -> int:
        total = self.cfg.epochs * self.passes * len(self.train_set)
        return total if self.cfg.max_examples is None else min(total, self.cfg.max_examples)

    def epochs_done(self) -> float:
        """Epochs trained so far (training examples / (examples per epoch))."""
        return self.state.examples / (self.passes * len(self.train_set))

    @property
    def eval_every(self) -> int:
        return self.cfg.eval_every or len(self.train_set)


def _load_run_data(cfg: RunConfig, data_dir: str | None, download: bool = True
                   ) -> tuple[bdata.ImageSet, bdata.ImageSet | None, bdata.ImageSet | None]:
    if cfg.val_size == 0:
        return (bdata.load_dataset(cfg.dataset, "train", data_dir, download), None,
                bdata.load_dataset(cfg.dataset, "test", data_dir, download))
    val_size = int(cfg.val_size) if cfg.val_size >= 1 else float(cfg.val_size)
    try:
        return bdata.train_val_test(cfg.dataset, val_size=val_size, seed=cfg.seed,
                                    data_dir=data_dir, download=download)
    except ValueError as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"cannot split {cfg.dataset}: {err}") from err


def build_learner(cfg: RunConfig, shape: tuple[int, ...], classes: int) -> rules.Learner:
    """The learner of the resolved ``cfg`` for inputs of ``shape`` (model seeded by the run seed)."""
    torch.manual_seed(cfg.seed)
    model = bnn.build_model(cfg.model, shape, classes, cfg.model_options)
    return rules.build(cfg.rule, model, cfg.rule_options, model_name=cfg.model)


def prepare(cfg: RunConfig | dict[str, Any], data: tuple | None = None,
            data_dir: str | None = None, download: bool = True):
    """Validate ``cfg``, load the data and build learner and optimisers; raise before any file
    is written. Returns (learner, optimizers by name, device, (train, val, test))."""
    cfg = validate(cfg)
    device = resolve_device(cfg.device)
    if data is not None:
        train_set = data[0]
        if train_set is None or len(train_set) == 0:
            raise ConfigError("the training set is empty")
        shape, classes = train_set.shape, train_set.classes
    else:
        shape, classes = bdata.dataset_info(cfg.dataset)
    # the model first: an impossible geometry fails before any data is read
    learner = build_learner(cfg, shape, classes)
    if data is None:
        data = _load_run_data(cfg, data_dir, download)
    train_set, val_set, test_set = (tuple(data) + (None, None))[:3]
    learner.to(device)
    optimizers = learner.setup_optimizers(cfg)
    return learner, optimizers, device, (train_set, val_set, test_set)


def start_session(cfg: RunConfig, run: RunDir | None, data: tuple | None = None,
                  data_dir: str | None = None, download: bool = True,
                  log: Callable[[str], None] = print) -> Session:
    """Build the session of ``cfg`` and, when ``run`` holds a checkpoint, restore it."""
    learner, optimizers, device, (train_set, val_set, test_set) = prepare(
        cfg, data, data_dir, download)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    session = Session(cfg, learner, optimizers, device, train_set, val_set, test_set, run)
    if run is not None and run.checkpoint.exists():
        restore_checkpoint(session, run.load_checkpoint(device))
        log(f"resuming {run.path} at example {session.state.examples} "
            f"(epoch {session.state.epoch})")
    if run is not None:
        run.create(cfg.to_dict())
        if run.summary.exists():
            run.summary.unlink()  # a previous attempt's failure record; this attempt decides anew
    session.t_start = time.perf_counter() - session.state.wall_time
    return session


# ---- checkpoints -------------------------------------------------------------------------------

def save_checkpoint(session: Session) -> None:
    """Write the learner, every optimiser by name, the loop state and the RNG state."""
    if session.run is None:
        return
    s = session
    s.state.wall_time = time.perf_counter() - s.t_start
    s.run.save_checkpoint({
        "learner": s.learner.state_dict(),
        "optimizers": {name: opt.state_dict() for name, opt in s.optimizers.items()},
        "schedulers": {name: sch.state_dict() for name, sch in s.schedulers.items()},
        "loop": dataclasses.asdict(s.state),
        "history_len": len(s.history),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state(s.device) if s.device.type == "cuda" else None,
        "config": s.cfg.to_dict(),
        "bpdl_version": bpdl.__version__,
    })


def _optimizer_states(ckpt: dict[str, Any]) -> dict[str, Any]:
    # checkpoints of bpdl <= 0.1.0 held one optimiser, under "optimizer"
    return ckpt["optimizers"] if "optimizers" in ckpt else {"main": ckpt["optimizer"]}


def restore_checkpoint(session: Session, ckpt: dict[str, Any]) -> None:
    """Load ``ckpt`` into the session: learner, optimisers, loop state, RNG state, history."""
    s = session
    try:
        s.learner.load_state_dict(ckpt["learner"])
        states = _optimizer_states(ckpt)
        if set(states) != set(s.optimizers):
            raise ConfigError(f"the checkpoint holds optimisers {sorted(states)}, the learner "
                              f"has {sorted(s.optimizers)}")
        for name, opt in s.optimizers.items():
            opt.load_state_dict(states[name])
        for name, sch in s.schedulers.items():
            sch.load_state_dict(ckpt["schedulers"][name])
    except Exception as err:  # a checkpoint that does not fit is the user's to resolve
        raise RunDirError(f"cannot resume from {s.run.checkpoint}: {err}. Delete the folder or "
                          f"choose another --out.") from err
    s.state = LoopState(**ckpt["loop"])
    torch.set_rng_state(ckpt["torch_rng"])
    if s.device.type == "cuda" and ckpt.get("cuda_rng") is not None:
        torch.cuda.set_rng_state(ckpt["cuda_rng"], s.device)
    s.history = s.run.read_metrics()[: ckpt["history_len"]]
    s.run.rewrite_metrics(s.history)


def load_learner(run_dir, device: torch.device | str = "cpu") -> tuple[rules.Learner, RunConfig,
                                                                        dict[str, Any]]:
    """The learner of a run folder with the weights and state of its last checkpoint, its
    config and the checkpoint (``loop`` tells how far it trained). Figures, repeated tests and
    analyses of a finished run start here."""
    run = RunDir(run_dir)
    stored = run.existing_config()
    if stored is None:
        raise RunDirError(f"{run.path} has no config.json; pass a run folder written by "
                          f"`bpdl train`")
    cfg = resolve_config(RunConfig.from_dict(stored))
    ckpt = run.load_checkpoint("cpu")
    shape, classes = bdata.dataset_info(cfg.dataset)
    learner = build_learner(cfg, shape, classes)
    try:
        learner.load_state_dict(ckpt["learner"])
    except Exception as err:
        raise RunDirError(f"the checkpoint {run.checkpoint} does not fit its config: {err}") \
            from err
    return learner.to(device), cfg, ckpt


# ---- 4. evaluation ----------------------------------------------------------------------------

def _fixed_subset(data: bdata.ImageSet, size: int, seed: int) -> bdata.ImageSet | None:
    if size <= 0 or len(data) == 0:
        return None
    if size >= len(data):
        return data
    g = torch.Generator()
    g.manual_seed(seed + 12_345)
    return data.subset(torch.randperm(len(data), generator=g)[:size].sort().values)


class Evaluator:
    """The evaluations of one session and what they remember in between: the fixed training
    subset and probe batch, the weights at the previous evaluation, and the running sums of
    the training statistics (loss, correct, the rule's extras) since then."""

    def __init__(self, session: Session):
        s = self.session = session
        cfg, device = s.cfg, s.device
        self.train_eval = _fixed_subset(s.train_set, cfg.train_eval_size, cfg.seed)
        probe = _fixed_subset(s.train_set, cfg.probe_size, cfg.seed + 1)
        self.probe_xy = None if probe is None else (
            bdata.to_float(probe.images.to(device)), probe.labels.to(device))
        self.weights = s.learner.weight_layers()
        self.prev_weights = self._snapshot()
        self.run_loss = torch.zeros((), dtype=torch.float64, device=device)
        self.run_correct = torch.zeros((), dtype=torch.int64, device=device)
        self.run_count = 0
        self.run_extras: dict[str, float] = {}
        self.train_time_mark = s.state.train_time
        self.examples_mark = s.state.examples

    def _snapshot(self) -> dict[str, torch.Tensor]:
        return {k: w.detach().clone() for k, w in self.weights.items()}

    def add_step(self, stats: dict[str, Any], n: int) -> None:
        """Accumulate one training step's statistics over its ``n`` examples."""
        loss = stats["loss"]
        self.run_loss += loss.detach().double() * n if torch.is_tensor(loss) else loss * n
        self.run_correct += stats.get("correct", 0)
        self.run_count += n
        for key, value in stats.items():
            if key not in ("loss", "correct"):
                self.run_extras[key] = self.run_extras.get(key, 0.0) + float(value) * n

    def _metrics(self, rec: dict[str, Any], prefix: str, data: bdata.ImageSet) -> None:
        m = evaluate(self.session.learner, data, self.session.cfg.eval_batch_size,
                     self.session.device)
        rec[f"{prefix}_loss"], rec[f"{prefix}_acc"] = m["loss"], m["acc"]

    def evaluate(self, before_step: dict[str, torch.Tensor] | None) -> dict[str, Any]:
        """One metrics record at the current loop state; appended to the history and the run
        folder's metrics file."""
        s, t0 = self.session, time.perf_counter()
        state = s.state
        rec: dict[str, Any] = {"eval": len(s.history), "examples": state.examples,
                               "epoch": s.epochs_done(), "steps": state.steps}
        phase = getattr(s.learner, "phase", None)
        if phase is not None:
            rec["phase"] = phase  # what the rule trained in the pass just finished
        sch = next(iter(s.schedulers.values()), None)
        if sch is not None:  # the schedule's factor for the next step (one for every optimiser)
            rec["lr_factor"] = sch.lr_lambdas[0](sch.last_epoch)
        trained = state.examples - self.examples_mark
        dt_train = state.train_time - self.train_time_mark
        rec["examples_per_sec"] = trained / dt_train if trained > 0 and dt_train > 0 else None
        if self.run_count:
            rec["running_loss"] = float(self.run_loss) / self.run_count
            rec["running_acc"] = float(self.run_correct) / self.run_count
            for key, total in self.run_extras.items():
                rec[f"running_{key}"] = total / self.run_count
        if self.train_eval is not None:
            self._metrics(rec, "train", self.train_eval)
        if s.val_set is not None and len(s.val_set):
            self._metrics(rec, "val", s.val_set)
        if s.cfg.test == "every" and s.test_set is not None:
            self._metrics(rec, "test", s.test_set)
        rec["layers"] = self._layer_metrics(before_step)
        rec["eval_time"] = time.perf_counter() - t0
        rec["elapsed"] = time.perf_counter() - s.t_start
        self._reset_marks()
        s.history.append(rec)
        if s.run is not None:
            s.run.append_metrics(rec)
        return rec

    def _layer_metrics(self, before_step) -> dict[str, dict[str, float]]:
        s = self.session
        layers = weight_statistics(self.weights, self.prev_weights if s.history else None,
                                   before_step)
        if self.probe_xy is not None:
            for name, values in s.learner.alignment(*self.probe_xy).items():
                layers.setdefault(name, {}).update(values)
            s.zero_grad()
        return layers

    def _reset_marks(self) -> None:
        self.prev_weights = self._snapshot()
        self.run_loss.zero_()
        self.run_correct.zero_()
        self.run_count = 0
        self.run_extras = {}
        self.train_time_mark = self.session.state.train_time
        self.examples_mark = self.session.state.examples


# ---- 5. the loop ------------------------------------------------------------------------------

def _shuffle_generator(seed: int, epoch: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + epoch * 7_919 + 1) % (2**63))
    return g


def _fmt(record: dict[str, Any]) -> str:
    parts = [f"examples {record['examples']}", f"epoch {record['epoch']:.2f}"]
    for key in ("train_loss", "train_acc", "val_loss", "val_acc", "test_acc"):
        if key in record and record[key] is not None:
            parts.append(f"{key} {record[key]:.4f}")
    if record.get("examples_per_sec"):
        parts.append(f"{record['examples_per_sec']:.0f} ex/s")
    return " | ".join(parts)


class Diverged(Exception):
    """Raised inside the loop when the training loss is not finite or exceeds ``max_loss``."""


@dataclass
class Hooks:
    """Where :func:`fit` reports: plain log lines, the progress bar, a per-evaluation callback."""

    log: Callable[[str], None]
    bar: Any = None
    callback: Callable[[dict[str, Any]], None] | None = None

    def evaluated(self, rec: dict[str, Any], first: bool = False) -> None:
        if self.bar is not None and not first:
            self.bar.set_postfix(val_acc=rec.get("val_acc"), refresh=False)
        self.log(_fmt(rec))
        if self.callback is not None and not first:
            self.callback(rec)


def train_step(session: Session, evaluator: Evaluator, x: torch.Tensor, y: torch.Tensor,
               eval_due: bool) -> dict[str, torch.Tensor] | None:
    """One minibatch: zero every optimiser, fill .grad, step every optimiser, the learner's
    after-step hook. Returns the weights before the step when an evaluation is due (the last
    update's norm), else None. Raises :class:`Diverged` on a bad loss."""
    s = session
    s.zero_grad()
    stats = s.learner.training_step(x, y)
    before = evaluator._snapshot() if eval_due else None
    s.step()
    s.learner.after_step()
    n = y.shape[0]
    evaluator.add_step(stats, n)
    s.state.examples += n
    s.state.steps += 1
    check_every = 1 if s.device.type == "cpu" else 20
    if s.state.steps % check_every == 0 or eval_due:
        value = float(stats["loss"])
        if not math.isfinite(value) or value > s.cfg.max_loss:
            raise Diverged(
                f"the training loss became {value} at example {s.state.examples} "
                f"(epoch {s.state.epoch + 1}); the run was stopped. Lower the learning rate "
                f"(now {s.cfg.lr}) or check the inputs.")
    return before


def train_epoch(session: Session, evaluator: Evaluator, hooks: Hooks) -> None:
    """The rest of the current pass over the training set (from ``state.batch``; a pass is an
    epoch unless the rule makes several per epoch), evaluating and checkpointing on schedule.
    ``on_epoch_start`` receives the pass index."""
    s, state, cfg = session, session.state, session.cfg
    n_train, total = len(s.train_set), s.total_examples
    batches = math.ceil(n_train / cfg.batch_size)
    s.learner.on_epoch_start(state.epoch)
    perm = torch.randperm(n_train, generator=_shuffle_generator(cfg.seed, state.epoch))
    perm = perm.to(s.device)
    images, labels = s.train_set.images.to(s.device), s.train_set.labels.to(s.device)
    while state.batch < batches and state.examples < total:
        idx = perm[state.batch * cfg.batch_size:(state.batch + 1) * cfg.batch_size]
        idx = idx[: total - state.examples]
        n = idx.numel()
        eval_due = state.examples + n >= state.next_eval or state.examples + n >= total
        t0 = time.perf_counter()
        before = train_step(s, evaluator, bdata.to_float(images[idx]), labels[idx], eval_due)
        state.batch += 1
        if s.device.type == "cuda":
            torch.cuda.synchronize(s.device)
        state.train_time += time.perf_counter() - t0
        if state.batch >= batches:  # epoch complete: a resume starts the next one
            state.epoch += 1
            state.batch = 0
            for sch in s.schedulers.values():
                sch.step()
        if hooks.bar is not None:
            hooks.bar.update(n)
        if eval_due:
            hooks.evaluated(evaluator.evaluate(before))
            while state.next_eval <= state.examples:
                state.next_eval += s.eval_every
            save_checkpoint(s)
        if state.batch == 0:
            return  # next epoch: new permutation


@contextmanager
def _progress_bar(session: Session, enabled: bool) -> Iterator[Any]:
    if not enabled:
        yield None
        return
    from tqdm.auto import tqdm

    cfg = session.cfg
    bar = tqdm(total=session.total_examples, initial=session.state.examples, unit="ex",
               desc=f"{cfg.rule}/{cfg.model}/{cfg.dataset}", dynamic_ncols=True)
    try:
        yield bar
    finally:
        bar.close()


def fit(session: Session, hooks: Hooks, progress: bool = False) -> RunResult:
    """Train ``session`` to its end (or until it diverges) and write its summary; see the module
    docstring. An exception (KeyboardInterrupt included) is recorded in the summary as failed
    (interrupted) and re-raised; the last checkpoint stays usable for a resume."""
    s = session
    status, message = "completed", ""
    try:
        with _progress_bar(s, progress) as bar:
            hooks.bar = bar
            evaluator = Evaluator(s)
            if not s.history:
                hooks.evaluated(evaluator.evaluate(None), first=True)
                s.state.next_eval = s.eval_every
                save_checkpoint(s)
            while s.state.examples < s.total_examples:
                train_epoch(s, evaluator, hooks)
    except Diverged as err:
        status, message = "diverged", str(err)
    except KeyboardInterrupt:
        status, message = "interrupted", "interrupted by the user; rerun the same command to resume"
        raise
    except Exception as err:
        status, message = "failed", f"{type(err).__name__}: {err}"
        raise
    finally:
        summary = write_summary(s, status, message)
    if status == "diverged":
        hooks.log(f"run diverged: {message}")
    return RunResult(status, summary, s.history, s.learner, s.run.path if s.run else None)


def write_summary(session: Session, status: str, message: str) -> dict[str, Any]:
    """The run's summary (final test evaluation included when asked), written to the folder."""
    s, cfg, state = session, session.cfg, session.state
    summary: dict[str, Any] = {
        "status": status, "message": message, "examples": state.examples,
        "epochs": s.epochs_done(), "steps": state.steps,
        "wall_time_s": time.perf_counter() - s.t_start, "train_time_s": state.train_time,
        "device": str(s.device), "bpdl_version": bpdl.__version__,
        "torch_version": torch.__version__, "config": cfg.to_dict(),
        # what the rule resolved its options to (defaults included), e.g. last_layer_rule
        "rule_state": s.learner.extra_state_for_config(),
    }
    if s.history:
        last = s.history[-1]
        for key in ("train_loss", "train_acc", "val_loss", "val_acc", "running_loss",
                    "running_acc", "examples_per_sec"):
            if key in last:
                summary[key] = last[key]
        vals = [(r["val_acc"], r["examples"]) for r in s.history if r.get("val_acc") is not None]
        if vals:
            summary["best_val_acc"], summary["best_val_examples"] = max(vals, key=lambda t: t[0])
    if status == "completed" and cfg.test in ("final", "every") and s.test_set is not None:
        m = evaluate(s.learner, s.test_set, cfg.eval_batch_size, s.device)
        summary["test_loss"], summary["test_acc"] = m["loss"], m["acc"]
    if s.run is not None:
        s.run.write_summary(summary)
    return summary


def train(
    config: RunConfig | dict[str, Any],
    out_dir=None,
    *,
    data: tuple | None = None,
    data_dir: str | None = None,
    download: bool = True,
    progress: bool | None = None,
    log: Callable[[str], None] | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
) -> RunResult:
    """Train ``config.rule`` on ``config.model`` and ``config.dataset``; see the module docstring.

    Args:
        config: the run configuration (a dict is validated into a RunConfig); unset fields are
            resolved by :func:`resolve_config`.
        out_dir: run directory; an existing one with the same config is resumed, a finished
            one is returned as is, one with a different config is refused.
        data: (train, validation, test) ImageSets to use instead of loading ``config.dataset``
            (validation and test may be None); studies pass cross-validation folds here.
        data_dir: dataset root (else BPDL_DATA_DIR, else the user cache).
        download: let torchvision download missing dataset files.
        progress: progress bar (default: when stderr is a terminal).
        log: where plain progress lines go (default stderr when no bar; pass ``lambda s: None``
            to silence).
        callback: called with each evaluation record after it is logged.
    """
    cfg = resolve_config(config)
    run, finished = open_run_dir(out_dir, cfg.to_dict())
    if finished is not None:
        return finished
    bar_on = sys.stderr.isatty() if progress is None else progress
    if log is None:
        log = (lambda s: None) if bar_on else (lambda s: print(s, file=sys.stderr, flush=True))
    session = start_session(cfg, run, data, data_dir, download, log)
    return fit(session, Hooks(log, callback=callback), progress=bar_on)
