"""The Learner: the one interface every learning rule implements (docs/architecture.md, "The
Learner contract").

Every rule is a way of filling ``param.grad``: backprop with the gradient, feedback alignment
through custom autograd backward passes, target propagation from layer-local losses, segregated
dendrites and microcircuits by writing the negative of their local weight change (divided by
the learning rate) as a pseudo-gradient. ``torch.optim`` optimisers then take the step, so one
training loop, one checkpoint format and one set of metrics serve every rule.

The loop (:func:`bpdl.train.fit`) builds the optimisers once with
``learner.setup_optimizers(cfg)`` (which calls :meth:`Learner.configure_optimizers`: by default
one optimiser, ``"main"``, over :meth:`Learner.parameter_groups`) and calls, per minibatch::

    for opt in optimizers.values(): opt.zero_grad(set_to_none=True)
    stats = learner.training_step(x, y)   # fills .grad; {"loss", "correct", extra scalars...}
    for opt in optimizers.values(): opt.step()
    learner.after_step()                  # e.g. re-derive feedback weights from W

``learner.on_epoch_start(epoch)`` before each epoch, ``learner.predict(x)`` and
``learner.loss(scores, y)`` to evaluate, ``learner.weight_layers()`` and
``learner.alignment(x, y)`` for the per-layer metrics, ``learner.extra_state_for_config()`` for
the summary, and ``state_dict`` / ``load_state_dict`` for checkpoints (which also hold every
optimiser's state by name). Extra scalars a ``training_step`` returns besides ``loss`` and
``correct`` are averaged over the examples between evaluations and logged as ``running_<name>``.
A rule that trains parameters with a loss and optimiser of its own (target propagation's
inverses, weight mirrors' feedback) returns them as further named optimisers; an optimiser whose
parameters have no ``.grad`` when the loop steps skips them, so such a rule may also step one of
its own optimisers at another point of the step.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from bpdl.nn.init import WEIGHT_LAYERS


@runtime_checkable
class LearnerProtocol(Protocol):
    """Everything the training loop, the evaluation and the checkpoints call on a rule."""

    def training_step(self, x: Tensor, y: Tensor) -> dict[str, Any]: ...  # fills .grad

    def predict(self, x: Tensor) -> Tensor: ...  # class scores (N, classes)

    def loss(self, scores: Tensor, y: Tensor) -> Tensor: ...  # mean evaluation loss

    def setup_optimizers(self, cfg: Any) -> dict[str, torch.optim.Optimizer]: ...

    def on_epoch_start(self, epoch: int) -> None: ...

    def after_step(self) -> None: ...

    def weight_layers(self) -> OrderedDict[str, Tensor]: ...

    def alignment(self, x: Tensor, y: Tensor) -> dict[str, dict[str, float]]: ...

    def extra_state_for_config(self) -> dict[str, Any]: ...

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True) -> Any: ...

    def to(self, *args: Any, **kwargs: Any) -> Any: ...

    def train(self, mode: bool = True) -> Any: ...

    def eval(self) -> Any: ...


def angle_degrees(a: Tensor, b: Tensor) -> float:
    """Angle between two tensors as flat vectors, in degrees (0-180; 90 = unaligned).

    Computed as 2 atan2(||u - v||, ||u + v||) with u, v the unit vectors (Kahan), which stays
    accurate for nearly parallel vectors, where arccos of the cosine loses half the digits
    (equal vectors give exactly 0, not ~1e-6 degrees of rounding)."""
    a, b = a.detach().flatten().double(), b.detach().flatten().double()
    na, nb = a.norm(), b.norm()
    if na == 0 or nb == 0:
        return float("nan")
    u, v = a / na, b / nb
    return math.degrees(2.0 * math.atan2(float((u - v).norm()), float((u + v).norm())))


class Learner(nn.Module):
    """Base class of learning rules. Subclasses set ``name`` and ``config_cls`` and implement
    :meth:`training_step`; everything else has a default that suits backprop-like rules.

    The learner is an ``nn.Module`` holding ``self.model``, so its ``state_dict`` carries the
    model and every rule-owned buffer or parameter (feedback weights, simulator state, RNG
    counters) into checkpoints.
    """

    name: ClassVar[str] = "base"
    config_cls: ClassVar[type | None] = None
    #: Passes over the training set per epoch. An alternating schedule (target propagation's:
    #: one pass training the inverses, one the forward weights) makes 2; the loop then calls
    #: :meth:`on_epoch_start` with the pass index, counts an epoch as that many passes and
    #: logs the rule's :attr:`phase` (when not None) with every evaluation.
    passes_per_epoch: int = 1
    #: What the rule is training now (e.g. "inverse" / "forward"), logged as ``phase``.
    phase: str | None = None
    #: Model families this rule can train (None: any classifier nn.Module).
    supported_models: ClassVar[tuple[str, ...] | None] = None

    def __init__(self, model: nn.Module, config: Any = None):
        super().__init__()
        self.model = model
        self.config = config

    # ---- the protocol ---------------------------------------------------------------------
    def training_step(self, x: Tensor, y: Tensor) -> dict[str, Any]:
        """Fill ``.grad`` of the parameters for one minibatch; return at least ``loss`` (the
        minibatch mean, float or 0-dim tensor) and ``correct`` (number of correct predictions)."""
        raise NotImplementedError

    def predict(self, x: Tensor) -> Tensor:
        """Class scores (N, classes) for evaluation; argmax is the prediction."""
        return self.model(x)

    def loss(self, scores: Tensor, y: Tensor) -> Tensor:
        """Mean evaluation loss of the scores :meth:`predict` returns."""
        return nn.functional.cross_entropy(scores, y)

    # ---- hooks with defaults ------------------------------------------------------------------
    def on_epoch_start(self, epoch: int) -> None:
        """Called before every pass over the training set, with its index (the epoch, for a
        rule with one pass per epoch; alternating schedules switch phase here)."""

    def after_step(self) -> None:
        """Called after every optimiser step (feedback weights derived from W update here)."""

    def configure_optimizers(self, cfg: Any) -> dict[str, torch.optim.Optimizer]:
        """The optimisers of this rule by name, for the resolved run config ``cfg``. Default:
        ``{"main": cfg.optimizer over parameter_groups()}`` with ``cfg.lr``, ``cfg.layer_lrs``
        and ``cfg.optimizer_options``. Rules with parameters trained by a loss of their own add
        further entries (their own optimiser class and learning rate, usually from the rule's
        options); each parameter may belong to one optimiser only."""
        from bpdl.optim import build_optimizer

        return {"main": build_optimizer(cfg.optimizer, self.parameter_groups(), cfg.lr,
                                        cfg.layer_lrs, cfg.optimizer_options)}

    def setup_optimizers(self, cfg: Any) -> dict[str, torch.optim.Optimizer]:
        """:meth:`configure_optimizers`, checked: a non-empty dict of ``torch.optim``
        optimisers by name that share no parameter (one would be stepped twice)."""
        from bpdl.errors import ConfigError

        optimizers = self.configure_optimizers(cfg)
        if not isinstance(optimizers, dict) or not optimizers or not all(
                isinstance(k, str) and isinstance(v, torch.optim.Optimizer)
                for k, v in optimizers.items()):
            raise TypeError(f"{type(self).__name__}.configure_optimizers must return a non-empty "
                            f"dict of torch.optim optimisers by name, got {optimizers!r}")
        owner: dict[int, str] = {}
        for name, opt in optimizers.items():
            for group in opt.param_groups:
                for p in group["params"]:
                    if id(p) in owner and owner[id(p)] != name:
                        raise ConfigError(f"a parameter of shape {tuple(p.shape)} belongs to both "
                                          f"optimisers {owner[id(p)]!r} and {name!r}")
                    owner[id(p)] = name
        return optimizers

    def parameter_groups(self) -> list[dict[str, Any]]:
        """Optimiser parameter groups, one per weight layer in forward order, each a dict with
        ``name`` and ``params`` (and optional per-group settings such as ``lr``).

        ``layer_lrs`` in the optimiser config applies to these groups in order. Parameters that
        belong to no weight layer (BatchNorm, ...) join the group of the closest weight layer
        before them, or the first group.
        """
        groups: list[dict[str, Any]] = []
        seen: set[int] = set()
        pending: list[nn.Parameter] = []
        for mod_name, module in self.model.named_modules():
            own = [p for p in module.parameters(recurse=False) if p.requires_grad]
            if not own:
                continue
            if self._is_weight_layer(module):
                groups.append({"name": mod_name or "model", "params": own + pending})
                pending = []
            elif groups:
                groups[-1]["params"].extend(own)
            else:
                pending.extend(own)
            seen.update(id(p) for p in own)
        if pending:
            groups.append({"name": "other", "params": pending})
        extra = [p for p in self.parameters() if p.requires_grad and id(p) not in seen]
        if extra:
            groups.append({"name": "rule", "params": extra})
        return groups

    @staticmethod
    def _is_weight_layer(module: nn.Module) -> bool:
        return isinstance(module, WEIGHT_LAYERS) or callable(
            getattr(module, "reset_bpdl_parameters", None))

    def weight_layers(self) -> OrderedDict[str, Tensor]:
        """Named forward weight tensors tracked by the metrics (norms, change, alignment)."""
        out: OrderedDict[str, Tensor] = OrderedDict()
        for mod_name, module in self.model.named_modules():
            if self._is_weight_layer(module) and getattr(module, "weight", None) is not None:
                out[mod_name or "model"] = module.weight
        return out

    def alignment(self, x: Tensor, y: Tensor) -> dict[str, dict[str, float]]:
        """Per-layer alignment metrics on a probe batch, e.g. ``{"layers.0": {"angle_bp": 42.}}``.

        Rules with feedback pathways override this (angle between the rule's update and the
        backprop gradient on the same batch, angle between W and B). Backprop returns nothing:
        its update *is* the gradient.
        """
        return {}

    @classmethod
    def run_defaults(cls, config: Any) -> dict[str, Any]:
        """Run-config fields this rule needs by default, given the run config as the caller
        gave it (a :class:`bpdl.train.RunConfig` whose unset fields are None):
        :func:`bpdl.train.resolve_config` applies them to the fields still unset. Rules whose
        original algorithm assumes a particular optimiser (plain SGD with per-layer rates for
        segregated dendrites) return it here; the base class returns nothing."""
        return {}

    def extra_state_for_config(self) -> dict[str, Any]:
        """Anything the run config should record about this learner (e.g. the optimiser the
        rule assumes)."""
        return {}
