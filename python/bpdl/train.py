"""The one training loop every learning rule shares.

:func:`train` takes a :class:`RunConfig` and an optional run directory::

    run_dir/
      config.json        the full configuration (written once; a resume must match it)
      metrics.jsonl      one JSON record per evaluation
      checkpoints/last.pt  learner, optimiser, loop position and RNG state (atomic writes)
      summary.json       written last: status (completed / diverged / failed / interrupted),
                         message and final metrics; a run without it never finished
      figures/           plots made by ``bpdl plot`` or the comparison command

Evaluations happen every ``eval_every`` training examples (default once per epoch) and at the
start; each records train and validation loss and accuracy (test only when asked), per-layer
weight norms, relative weight change since the previous evaluation, the norm of the last
update, examples per second and the rule's alignment metrics. Calling :func:`train` again on
the same run directory resumes from the last checkpoint; a different configuration is refused.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
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
from bpdl.optim import OPTIMIZERS, build_optimizer, validate_optimizer

TEST_MODES = ("never", "final", "every")
# Fields that may change between a run and its resumption: where it runs, not what it computes.
_RESUMABLE_FIELDS = {"device", "threads", "progress"}


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines a training run. Pickles, and round-trips through JSON.

    The defaults are T19's reference MLP: 784-500-10 ReLU, Adam lr 1e-3, batch 100.
    """

    dataset: str = "mnist"
    model: str = "mlp"
    model_options: dict[str, Any] = field(default_factory=dict)
    rule: str = "bp"
    rule_options: dict[str, Any] = field(default_factory=dict)
    optimizer: str = "adam"
    lr: float = 1e-3
    #: one learning rate per learner parameter group (weight layer), in forward order
    layer_lrs: tuple[float, ...] | None = None
    optimizer_options: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 100
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


def validate(cfg: RunConfig) -> None:
    """Raise ConfigError for anything in ``cfg`` that cannot work, before any work starts."""
    require_positive("epochs", cfg.epochs, integer=True)
    require_positive("batch_size", cfg.batch_size, integer=True)
    require_positive("eval_batch_size", cfg.eval_batch_size, integer=True)
    if cfg.max_examples is not None:
        require_positive("max_examples", cfg.max_examples, integer=True)
    if cfg.eval_every is not None:
        require_positive("eval_every", cfg.eval_every, integer=True)
    if cfg.threads is not None:
        require_positive("threads", cfg.threads, integer=True)
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
    bnn.model_config(cfg.model, cfg.model_options)
    rules.rule_config(cfg.rule, cfg.rule_options)
    resolve_device(cfg.device)


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


@dataclass
class LoopState:
    """Where the loop is: saved in checkpoints so a resumed run continues bit for bit."""

    epoch: int = 0           # current epoch (0-based)
    batch: int = 0           # next minibatch index within the epoch
    examples: int = 0        # training examples seen
    steps: int = 0           # optimiser steps taken
    next_eval: int = 0       # example count at which the next evaluation is due
    train_time: float = 0.0  # seconds spent in training steps (excluding evaluation)
    wall_time: float = 0.0   # seconds since the run started, over all resumptions


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


# ---- run directory ---------------------------------------------------------------------------

def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class RunDir:
    """The files of one run. Nothing is created until :meth:`create`."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.config = self.path / "config.json"
        self.metrics = self.path / "metrics.jsonl"
        self.summary = self.path / "summary.json"
        self.checkpoint = self.path / "checkpoints" / "last.pt"
        self.figures = self.path / "figures"

    def existing_config(self) -> dict[str, Any] | None:
        if not self.config.exists():
            return None
        try:
            return json.loads(self.config.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise RunDirError(f"{self.config} exists but cannot be read ({err}); choose another "
                              f"output folder or delete this one") from err

    def read_summary(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.summary.read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def check_writable(self) -> None:
        """RunDirError unless the folder exists or can be created, and accepts files.

        Probes by creating (and removing) a temporary file in the nearest existing ancestor,
        so nothing of the run is created before the configuration and data are known good.
        """
        if self.path.exists() and not self.path.is_dir():
            raise RunDirError(f"output path {self.path} exists and is not a folder; choose a "
                              f"folder path with --out")
        probe_dir = self.path.absolute()
        while not probe_dir.exists():
            probe_dir = probe_dir.parent
        if not probe_dir.is_dir():
            raise RunDirError(f"cannot create the run folder {self.path}: {probe_dir} is a "
                              f"file; choose another folder with --out")
        try:
            with tempfile.TemporaryFile(dir=probe_dir):
                pass
        except OSError as err:
            raise RunDirError(f"cannot write the run folder {self.path}: {probe_dir} is not "
                              f"writable ({err.strerror}); choose another folder with --out"
                              ) from err

    def create(self, config: dict[str, Any]) -> None:
        try:
            (self.path / "checkpoints").mkdir(parents=True, exist_ok=True)
            if not self.config.exists():
                _atomic_write_text(self.config, json.dumps(config, indent=2) + "\n")
        except OSError as err:
            raise RunDirError(f"cannot write the run folder {self.path}: {err}; choose another "
                              f"folder with --out") from err

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics.exists():
            return []
        records = []
        for line in self.metrics.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut short by a crash: everything after it is lost anyway
        return records

    def rewrite_metrics(self, records: list[dict[str, Any]]) -> None:
        _atomic_write_text(self.metrics, "".join(json.dumps(r) + "\n" for r in records))

    def append_metrics(self, record: dict[str, Any]) -> None:
        with open(self.metrics, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()


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


def _shuffle_generator(seed: int, epoch: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + epoch * 7_919 + 1) % (2**63))
    return g


def _fixed_subset(data: bdata.ImageSet, size: int, seed: int) -> bdata.ImageSet | None:
    if size <= 0 or len(data) == 0:
        return None
    if size >= len(data):
        return data
    g = torch.Generator()
    g.manual_seed(seed + 12_345)
    return data.subset(torch.randperm(len(data), generator=g)[:size].sort().values)


def _progress_enabled(progress: bool | None) -> bool:
    return sys.stderr.isatty() if progress is None else progress


def _fmt(record: dict[str, Any]) -> str:
    parts = [f"examples {record['examples']}", f"epoch {record['epoch']:.2f}"]
    for key in ("train_loss", "train_acc", "val_loss", "val_acc", "test_acc"):
        if key in record and record[key] is not None:
            parts.append(f"{key} {record[key]:.4f}")
    if record.get("examples_per_sec"):
        parts.append(f"{record['examples_per_sec']:.0f} ex/s")
    return " | ".join(parts)


# ---- the loop -----------------------------------------------------------------------------------

def prepare(cfg: RunConfig, data: tuple | None = None, data_dir: str | None = None,
            download: bool = True):
    """Validate ``cfg``, load the data and build learner and optimiser; raise before any file
    is written. Returns (learner, optimizer, device, (train, val, test))."""
    validate(cfg)
    device = resolve_device(cfg.device)
    if data is not None:
        train_set = data[0]
        if train_set is None or len(train_set) == 0:
            raise ConfigError("the training set is empty")
        shape, classes = train_set.shape, train_set.classes
    else:
        shape, classes = bdata.dataset_info(cfg.dataset)
    # the model first: an impossible geometry fails before any data is read
    torch.manual_seed(cfg.seed)
    model = bnn.build_model(cfg.model, shape, classes, cfg.model_options)
    learner = rules.build(cfg.rule, model, cfg.rule_options, model_name=cfg.model)
    if data is None:
        data = _load_run_data(cfg, data_dir, download)
    train_set, val_set, test_set = (tuple(data) + (None, None))[:3]
    learner.to(device)
    optimizer = build_optimizer(cfg.optimizer, learner.parameter_groups(), cfg.lr,
                                cfg.layer_lrs, cfg.optimizer_options)
    return learner, optimizer, device, (train_set, val_set, test_set)


def train(
    config: RunConfig | dict[str, Any],
    out_dir: str | os.PathLike | None = None,
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
        config: the run configuration (a dict is validated into a RunConfig).
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
    cfg = config if isinstance(config, RunConfig) else RunConfig.from_dict(config)
    cfg_dict = cfg.to_dict()
    run = RunDir(out_dir) if out_dir is not None else None
    resume_ckpt = None
    if run is not None:
        run.check_writable()
        old = run.existing_config()
        if old is not None:
            differences = [d for d in diff(old, cfg_dict)
                           if d.split(":")[0] not in _RESUMABLE_FIELDS]
            if differences:
                raise ConfigError(
                    f"{run.path} holds a run with a different configuration; refusing to resume "
                    f"it. Differences (existing -> requested): {'; '.join(differences)}. Use "
                    f"another --out folder, or the same settings to resume.")
            summary = run.read_summary()
            if summary is not None and summary.get("status") == "completed":
                return RunResult("completed", summary, run.read_metrics(), None, run.path)
            if run.checkpoint.exists():
                resume_ckpt = run.checkpoint

    learner, optimizer, device, (train_set, val_set, test_set) = prepare(cfg, data, data_dir, download)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)

    bar_on = _progress_enabled(progress)
    if log is None:
        log = (lambda s: None) if bar_on else (lambda s: print(s, file=sys.stderr, flush=True))

    state = LoopState()
    history: list[dict[str, Any]] = []
    if resume_ckpt is not None:
        try:
            ckpt = torch.load(resume_ckpt, map_location=device, weights_only=False)
            learner.load_state_dict(ckpt["learner"])
            optimizer.load_state_dict(ckpt["optimizer"])
        except Exception as err:  # a checkpoint that does not fit is the user's to resolve
            raise RunDirError(f"cannot resume from {resume_ckpt}: {err}. Delete the folder or "
                              f"choose another --out.") from err
        state = LoopState(**ckpt["loop"])
        torch.set_rng_state(ckpt["torch_rng"])
        if device.type == "cuda" and ckpt.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(ckpt["cuda_rng"], device)
        history = run.read_metrics()[: ckpt["history_len"]]
        run.rewrite_metrics(history)
        log(f"resuming {run.path} at example {state.examples} (epoch {state.epoch})")
    if run is not None:
        run.create(cfg_dict)
        if run.summary.exists():
            run.summary.unlink()  # a previous attempt's failure record; this attempt decides anew

    n_train = len(train_set)
    batches_per_epoch = math.ceil(n_train / cfg.batch_size)
    eval_every = cfg.eval_every or n_train
    total_examples = cfg.epochs * n_train
    if cfg.max_examples is not None:
        total_examples = min(total_examples, cfg.max_examples)
    train_eval = _fixed_subset(train_set, cfg.train_eval_size, cfg.seed)
    probe = _fixed_subset(train_set, cfg.probe_size, cfg.seed + 1)
    probe_xy = None
    if probe is not None:
        probe_xy = (bdata.to_float(probe.images.to(device)), probe.labels.to(device))
    images = train_set.images.to(device)
    labels = train_set.labels.to(device)

    weights = learner.weight_layers()
    prev_weights = {k: w.detach().clone() for k, w in weights.items()}
    run_loss = torch.zeros((), dtype=torch.float64, device=device)
    run_correct = torch.zeros((), dtype=torch.int64, device=device)
    run_count = 0
    t_start = time.perf_counter() - state.wall_time
    t_train_mark = state.train_time
    examples_mark = state.examples
    check_every = 1 if device.type == "cpu" else 20

    def checkpoint() -> None:
        if run is None:
            return
        state.wall_time = time.perf_counter() - t_start
        _atomic_torch_save({
            "learner": learner.state_dict(),
            "optimizer": optimizer.state_dict(),
            "loop": dataclasses.asdict(state),
            "history_len": len(history),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "config": cfg_dict,
            "bpdl_version": bpdl.__version__,
        }, run.checkpoint)

    def run_evaluation(before_step: dict[str, torch.Tensor] | None) -> dict[str, Any]:
        nonlocal prev_weights, run_loss, run_correct, run_count, t_train_mark, examples_mark
        t0 = time.perf_counter()
        rec: dict[str, Any] = {
            "eval": len(history),
            "examples": state.examples,
            "epoch": state.examples / n_train,
            "steps": state.steps,
        }
        trained = state.examples - examples_mark
        dt_train = state.train_time - t_train_mark
        rec["examples_per_sec"] = trained / dt_train if trained > 0 and dt_train > 0 else None
        if run_count:
            rec["running_loss"] = float(run_loss) / run_count
            rec["running_acc"] = float(run_correct) / run_count
        if train_eval is not None:
            m = evaluate(learner, train_eval, cfg.eval_batch_size, device)
            rec["train_loss"], rec["train_acc"] = m["loss"], m["acc"]
        if val_set is not None and len(val_set):
            m = evaluate(learner, val_set, cfg.eval_batch_size, device)
            rec["val_loss"], rec["val_acc"] = m["loss"], m["acc"]
        if cfg.test == "every" and test_set is not None:
            m = evaluate(learner, test_set, cfg.eval_batch_size, device)
            rec["test_loss"], rec["test_acc"] = m["loss"], m["acc"]
        layers = weight_statistics(weights, prev_weights if history else None, before_step)
        if probe_xy is not None:
            for name, values in learner.alignment(*probe_xy).items():
                layers.setdefault(name, {}).update(values)
            optimizer.zero_grad(set_to_none=True)
        rec["layers"] = layers
        rec["eval_time"] = time.perf_counter() - t0
        rec["elapsed"] = time.perf_counter() - t_start
        prev_weights = {k: w.detach().clone() for k, w in weights.items()}
        run_loss.zero_()
        run_correct.zero_()
        run_count = 0
        t_train_mark, examples_mark = state.train_time, state.examples
        history.append(rec)
        if run is not None:
            run.append_metrics(rec)
        return rec

    status, message = "completed", ""
    bar = None
    try:
        if bar_on:
            from tqdm.auto import tqdm
            bar = tqdm(total=total_examples, initial=state.examples, unit="ex",
                       desc=f"{cfg.rule}/{cfg.model}/{cfg.dataset}", dynamic_ncols=True)
        if not history:
            log(_fmt(run_evaluation(None)))
            state.next_eval = eval_every
            checkpoint()
        while state.examples < total_examples and status == "completed":
            learner.on_epoch_start(state.epoch)
            perm = torch.randperm(n_train, generator=_shuffle_generator(cfg.seed, state.epoch))
            perm = perm.to(device)
            while state.batch < batches_per_epoch and state.examples < total_examples:
                idx = perm[state.batch * cfg.batch_size:(state.batch + 1) * cfg.batch_size]
                idx = idx[: total_examples - state.examples]
                n = idx.numel()
                eval_due = (state.examples + n >= state.next_eval
                            or state.examples + n >= total_examples)
                t0 = time.perf_counter()
                x = bdata.to_float(images[idx])
                y = labels[idx]
                optimizer.zero_grad(set_to_none=True)
                stats = learner.training_step(x, y)
                before = ({k: w.detach().clone() for k, w in weights.items()}
                          if eval_due else None)
                optimizer.step()
                learner.after_step()
                loss = stats["loss"]
                run_loss += loss.detach().double() * n if torch.is_tensor(loss) else loss * n
                run_correct += stats.get("correct", 0)
                run_count += n
                state.batch += 1
                state.examples += n
                state.steps += 1
                if state.steps % check_every == 0 or eval_due:
                    lv = float(loss)
                    if not math.isfinite(lv) or lv > cfg.max_loss:
                        status = "diverged"
                        message = (
                            f"the training loss became {lv} at example {state.examples} "
                            f"(epoch {state.epoch + 1}); the run was stopped. Lower the learning "
                            f"rate (now {cfg.lr}) or check the inputs.")
                        break
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                state.train_time += time.perf_counter() - t0
                if state.batch >= batches_per_epoch:  # epoch complete: resume starts the next
                    state.epoch += 1
                    state.batch = 0
                if bar is not None:
                    bar.update(n)
                if eval_due:
                    rec = run_evaluation(before)
                    if bar is not None:
                        bar.set_postfix(val_acc=rec.get("val_acc"), refresh=False)
                    log(_fmt(rec))
                    if callback is not None:
                        callback(rec)
                    while state.next_eval <= state.examples:
                        state.next_eval += eval_every
                    checkpoint()
                if state.batch == 0:
                    break  # next epoch: new permutation
    except KeyboardInterrupt:
        status, message = "interrupted", "interrupted by the user; rerun the same command to resume"
        raise
    except Exception as err:
        status, message = "failed", f"{type(err).__name__}: {err}"
        raise
    finally:
        if bar is not None:
            bar.close()
        summary = _finish(cfg, cfg_dict, status, message, state, n_train, history, learner,
                          test_set, device, t_start, run)
    if status == "diverged":
        log(f"run diverged: {message}")
    return RunResult(status, summary, history, learner, run.path if run else None)


def _finish(cfg, cfg_dict, status, message, state, n_train, history, learner, test_set, device,
            t_start, run) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "status": status,
        "message": message,
        "examples": state.examples,
        "epochs": state.examples / n_train,
        "steps": state.steps,
        "wall_time_s": time.perf_counter() - t_start,
        "train_time_s": state.train_time,
        "device": str(device),
        "bpdl_version": bpdl.__version__,
        "torch_version": torch.__version__,
        "config": cfg_dict,
        # what the rule resolved its options to (defaults included), e.g. last_layer_rule
        "rule_state": learner.extra_state_for_config() if learner is not None else {},
    }
    if history:
        last = history[-1]
        for key in ("train_loss", "train_acc", "val_loss", "val_acc", "running_loss",
                    "running_acc", "examples_per_sec"):
            if key in last:
                summary[key] = last[key]
        vals = [(r["val_acc"], r["examples"]) for r in history if r.get("val_acc") is not None]
        if vals:
            best = max(vals, key=lambda t: t[0])
            summary["best_val_acc"], summary["best_val_examples"] = best
    if status == "completed" and cfg.test in ("final", "every") and test_set is not None:
        m = evaluate(learner, test_set, cfg.eval_batch_size, device)
        summary["test_loss"], summary["test_acc"] = m["loss"], m["acc"]
    if run is not None:
        _atomic_write_text(run.summary, json.dumps(summary, indent=2) + "\n")
    return summary
