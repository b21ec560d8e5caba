"""Optimisers: ``torch.optim`` classes by name, with per-layer learning rates via parameter groups.

The original local rules (segregated dendrites, Kolen-Pollack) were plain SGD with per-layer
rates; with bpdl's pseudo-gradient convention (``.grad = -dW / lr``) SGD without momentum or
weight decay reproduces them exactly, and any other optimiser changes the algorithm, which is
why the optimiser is recorded in every run config.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from bpdl.errors import ConfigError
from bpdl.registry import Registry


class BatchManhattanSGD(torch.optim.SGD):
    """Batch-Manhattan SGD (Liao, Leibo & Poggio 2016): SGD on the elementwise sign of the
    minibatch gradient, W <- W - lr * sign(dL/dW), the sign taken before momentum and weight
    decay. Same options as ``torch.optim.SGD``."""

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.sign_()
        super().step()
        return loss


OPTIMIZERS: Registry[Callable[..., torch.optim.Optimizer]] = Registry("optimizer")
OPTIMIZERS.add("sgd", torch.optim.SGD)
OPTIMIZERS.add("adam", torch.optim.Adam)
OPTIMIZERS.add("adamw", torch.optim.AdamW)
OPTIMIZERS.add("rmsprop", torch.optim.RMSprop)
OPTIMIZERS.add("adagrad", torch.optim.Adagrad)
OPTIMIZERS.add("bm_sgd", BatchManhattanSGD)

_NOT_OPTIONS = {"self", "params", "lr"}


def optimizer_options(name: str) -> list[str]:
    """The keyword options optimiser ``name`` accepts besides ``lr``."""
    factory = OPTIMIZERS.get(name)
    target = factory.__init__ if inspect.isclass(factory) else factory
    sig = inspect.signature(target)
    return sorted(p for p in sig.parameters if p not in _NOT_OPTIONS
                  and sig.parameters[p].kind is not inspect.Parameter.VAR_KEYWORD)


def validate_optimizer(name: str, lr: float, layer_lrs: Sequence[float] | None,
                       options: dict[str, Any]) -> None:
    """Raise ConfigError for an unknown optimiser, bad learning rates or unknown options."""
    valid = optimizer_options(name)  # raises for unknown names
    for label, value in [("learning rate", lr)] + [
            (f"layer learning rate {i}", v) for i, v in enumerate(layer_lrs or ())]:
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value) or value <= 0:
            raise ConfigError(f"{label} must be a positive number, got {value!r}")
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ConfigError(f"optimizer {name!r} has no option(s) {unknown}; valid: {valid}")


def build_optimizer(name: str, groups: list[dict[str, Any]], lr: float,
                    layer_lrs: Sequence[float] | None = None,
                    options: dict[str, Any] | None = None) -> torch.optim.Optimizer:
    """Optimiser ``name`` over a learner's parameter groups.

    Each group's learning rate is, in order of precedence: ``layer_lrs[i]`` (one per group, in
    the learner's group order), the group's own ``lr`` (rules may set it, e.g. the learned
    feedback weights of segregated dendrites), else ``lr``. ``layer_lrs`` has one entry per
    group, or one per group without a rate of its own (the others keep theirs). Group ``name``
    keys are kept for logging.
    """
    options = dict(options or {})
    validate_optimizer(name, lr, layer_lrs, options)
    groups = [dict(g) for g in groups if g["params"]]
    if not groups:
        raise ConfigError("the model has no trainable parameters")
    if layer_lrs is not None:
        free = [g for g in groups if "lr" not in g]
        targets = groups if len(layer_lrs) == len(groups) else free
        if len(layer_lrs) != len(targets):
            names = [g.get("name", str(i)) for i, g in enumerate(groups)]
            raise ConfigError(
                f"layer_lrs has {len(layer_lrs)} entries but the learner has {len(groups)} "
                f"parameter groups ({', '.join(names)}); give one learning rate per group"
                + (f" or per group without a rate of its own ({len(free)})"
                   if len(free) != len(groups) else ""))
        for g, glr in zip(targets, layer_lrs, strict=True):
            g["lr"] = float(glr)
    for g in groups:
        g.setdefault("lr", float(lr))
    try:
        return OPTIMIZERS.get(name)(groups, lr=float(lr), **options)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"invalid options for optimizer {name!r} {options}: {err}") from err


# ---- learning-rate schedules over epochs ----------------------------------------------------------

#: the forms ``lr_schedule`` accepts (docs/architecture.md, "Learning-rate schedules")
LR_SCHEDULE_FORMS = ("cosine", "step:E1,E2,...:GAMMA", "exp:GAMMA")


def lr_schedule_factor(spec: str | None, epochs: int) -> Callable[[int], float]:
    """The factor by which every learning rate is multiplied during epoch ``e`` (0-based) of a
    run of ``epochs`` epochs, for the schedule ``spec``:

    - None: 1 throughout;
    - ``cosine``: 0.5 (1 + cos(pi e / epochs)), from 1 down towards 0;
    - ``step:E1,E2,...:GAMMA``: multiplied by GAMMA at the start of each listed epoch
      (1-based, as the log counts them: ``step:20,40:0.1`` trains epochs 1-19 at the full
      rate, 20-39 at a tenth, 40 on at a hundredth);
    - ``exp:GAMMA``: GAMMA ** e.

    Raises ConfigError naming the accepted forms for anything else."""
    forms = ", ".join(LR_SCHEDULE_FORMS)
    if spec is None:
        return lambda e: 1.0
    if not isinstance(spec, str):
        raise ConfigError(f"lr_schedule must be one of {forms} (a string), got {spec!r}")

    def bad(why: str) -> ConfigError:
        return ConfigError(f"lr_schedule {spec!r}: {why}; the accepted forms are {forms}, "
                           f"e.g. 'step:20,40:0.1'")

    kind, _, rest = spec.partition(":")
    if kind == "cosine" and not rest:
        return lambda e: 0.5 * (1.0 + math.cos(math.pi * min(e, epochs) / epochs))
    if kind == "exp":
        try:
            gamma = float(rest)
        except ValueError:
            raise bad("GAMMA is not a number") from None
        if not 0 < gamma <= 1:
            raise bad(f"GAMMA must lie in (0, 1], got {gamma}")
        return lambda e: gamma ** e
    if kind == "step":
        milestones, _, gamma_text = rest.rpartition(":")
        try:
            gamma = float(gamma_text)
            starts = sorted(int(m) for m in milestones.split(","))
        except ValueError:
            raise bad("the milestones must be whole epochs and GAMMA a number") from None
        if not 0 < gamma <= 1:
            raise bad(f"GAMMA must lie in (0, 1], got {gamma}")
        if not starts or starts[0] < 2:
            raise bad("the milestones must be epochs >= 2 (epoch 1 trains at the full rate)")
        return lambda e: gamma ** sum(e + 1 >= m for m in starts)
    raise bad("unknown form")


def build_schedulers(optimizers: dict[str, torch.optim.Optimizer], spec: str | None,
                     epochs: int, passes: int = 1) -> dict[str, torch.optim.lr_scheduler.LambdaLR]:
    """One ``LambdaLR`` per optimiser for the schedule ``spec`` (none for no schedule), stepped
    once per pass over the training set; a rule making ``passes`` passes per epoch keeps each
    epoch's rate for all of them. Every optimiser of the rule follows the same factor, each
    parameter group from its own initial rate (per-layer rates keep their ratios)."""
    if spec is None:
        return {}
    factor = lr_schedule_factor(spec, epochs)
    return {name: torch.optim.lr_scheduler.LambdaLR(opt, lambda p: factor(p // passes))
            for name, opt in optimizers.items()}
