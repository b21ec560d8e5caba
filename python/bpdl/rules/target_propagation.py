"""The target-propagation family as learning rules: tp, dtp, sdtp, aosdtp (Lee15, B18) and ddtp
(M20's DDTP-linear); docs/algorithms/target_propagation.md §4.

Every rule fills ``.grad`` from layer-local losses on detached inputs:

- the output layer from the task loss (softmax cross-entropy, the delta rule);
- each hidden layer l from ||f_l(sg(h_{l-1})) - sg(h^_l)||^2, its target h^_l computed without
  gradients by the variant's recursion (§4.2, :mod:`bpdl.functional.target_propagation`);
- each learned inverse g_l from its own inverse loss on noise-injected activities (§4.1, §4.5).

Forward weights use the run config's optimiser (``"main"``); the inverses have their own
(``"inverse"``: Adam by default, the rule options ``inverse_optimizer``, ``inverse_lr`` and
``inverse_optimizer_options``), so both states are checkpointed by the loop (§4.3). The
``parallel`` schedule computes both sets of gradients from the same parameters on every
minibatch; ``alternating`` makes two passes per epoch, one training only the inverses, then
one training only the forward weights (``passes_per_epoch = 2``, logged as ``phase``).

Noise is drawn from generators keyed by the rule's seed, the step and the layer, so a resumed
run draws the same numbers and the alignment probes draw none from the training stream.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from bpdl.errors import ConfigError, UnknownNameError
from bpdl.functional import target_propagation as tpf
from bpdl.nn.models import ACTIVATIONS
from bpdl.nn.target_propagation import (
    AuxiliaryOutput,
    LinearInverse,
    LocallyConnectedInverse,
    Stage,
    keyed_generator,
    network_stages,
)
from bpdl.rules.base import Learner, angle_degrees
from bpdl.rules.registry import RULES

SCHEDULES = ("parallel", "alternating")
INVERSE_LOSSES = ("auto", "noise_preserving", "denoising")
ALPHA_CONVENTIONS = ("per_example", "batch_mean")

__all__ = ["AOSDTPConfig", "AuxiliaryOutputSDTP", "DDTPConfig", "DTPConfig", "DifferenceTP",
           "DirectDifferenceTP", "SDTPConfig", "SimplifiedDTP", "TPConfig", "TargetPropConfig",
           "TargetPropagation", "TargetPropagationLearner"]


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UnknownNameError(name, value, list(choices))


def _positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{name} must be a positive number, got {value!r}")


# ---- options --------------------------------------------------------------------------------

@dataclass(frozen=True)
class TargetPropConfig:
    """Options every target-propagation rule shares (docs/algorithms/target_propagation.md §4).

    Attributes:
        schedule: ``parallel`` (every minibatch steps inverses and forward weights from the same
            parameters) or ``alternating`` (a pass training only the inverses, then a pass
            training only the forward weights; one epoch = both passes), §4.3.
        sigma: standard deviation of the noise injected to train the inverses (> 0).
        inverse_loss: ``noise_preserving`` ||g(f(h~)) - h~||^2, ``denoising`` ||h - g(f(h~))||^2,
            or ``auto``: the variant's own (noise-preserving for DTP, de-noising otherwise).
        inverse_activation: the nonlinearity of the inverses, g(h) = act(V h + c) (``tanh``).
        inverse_optimizer, inverse_lr, inverse_optimizer_options: the inverses' own optimiser
            (any name of :data:`bpdl.optim.OPTIMIZERS`; B18: Adam).
        noise_seed: seed of the noise and of the inverses' initial weights; None takes the
            run's seed (``torch.initial_seed()``) without consuming the global generator.
    """

    schedule: str = "parallel"
    sigma: float = 0.1
    inverse_loss: str = "auto"
    inverse_activation: str = "tanh"
    inverse_optimizer: str = "adam"
    inverse_lr: float = 1e-3
    inverse_optimizer_options: dict[str, Any] = field(default_factory=dict)
    noise_seed: int | None = None

    def __post_init__(self) -> None:
        from bpdl.optim import OPTIMIZERS, validate_optimizer

        _choice("schedule", self.schedule, SCHEDULES)
        _positive("sigma (the inverse-training noise)", self.sigma)
        _choice("inverse_loss", self.inverse_loss, self.inverse_losses())
        _choice("inverse_activation", self.inverse_activation, tuple(ACTIVATIONS))
        OPTIMIZERS.get(self.inverse_optimizer)
        if not isinstance(self.inverse_optimizer_options, dict):
            raise ConfigError(f"inverse_optimizer_options must be an object of optimiser "
                              f"options, got {self.inverse_optimizer_options!r}")
        try:
            validate_optimizer(self.inverse_optimizer, self.inverse_lr, None,
                               self.inverse_optimizer_options)
        except ConfigError as err:
            raise ConfigError(f"inverse optimiser: {err}") from err
        if self.noise_seed is not None and (
                isinstance(self.noise_seed, bool) or not isinstance(self.noise_seed, int)
                or not 0 <= self.noise_seed < 2**63):
            raise ConfigError(f"noise_seed must be an integer in [0, 2^63) or null, got "
                              f"{self.noise_seed!r}")

    @classmethod
    def inverse_losses(cls) -> tuple[str, ...]:
        return INVERSE_LOSSES


@dataclass(frozen=True)
class _StepConfig(TargetPropConfig):
    """A rule whose first target is a step along the loss gradient: ``alpha`` in (0, 1], per
    example, or (``alpha_convention="batch_mean"``) along the gradient of the batch-mean loss,
    as Lee15's code, where each example moves by alpha / N_b (§4.2)."""

    alpha: float = 0.1
    alpha_convention: str = "per_example"

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) \
                or not 0 < self.alpha <= 1:
            raise ConfigError(f"alpha (the first target's step size) must be in (0, 1], got "
                              f"{self.alpha!r}")
        _choice("alpha_convention", self.alpha_convention, ALPHA_CONVENTIONS)


@dataclass(frozen=True)
class DTPConfig(_StepConfig):
    """Difference target propagation (Lee15): h^_{L-1} = h_{L-1} - alpha dL/dh_{L-1}."""


@dataclass(frozen=True)
class TPConfig(_StepConfig):
    """Plain target propagation, h^_{l-1} = g_l(h^_l). ``first_target``: ``gradient`` (as DTP,
    bpdl's default) or ``label`` (h^_{L-1} = g_L(y), g_L then trained too); §4.2."""

    first_target: str = "gradient"

    def __post_init__(self) -> None:
        super().__post_init__()
        _choice("first_target", self.first_target, ("gradient", "label"))


@dataclass(frozen=True)
class SDTPConfig(TargetPropConfig):
    """Simplified DTP (B18): the output target is the label, carried to the last hidden layer
    by g_L with the difference correction; no gradient at all below the output layer."""


@dataclass(frozen=True)
class AOSDTPConfig(SDTPConfig):
    """SDTP with B18's auxiliary output: ``aux_size`` fixed random tanh units z read by the
    output inverse g_L(o, z) (B18: 512 on CIFAR; MNIST not stated, bpdl: 512)."""

    aux_size: int = 512

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.aux_size, bool) or not isinstance(self.aux_size, int) \
                or self.aux_size <= 0:
            raise ConfigError(f"aux_size (AO-SDTP's auxiliary output units) must be a positive "
                              f"integer, got {self.aux_size!r}; with no auxiliary output use "
                              f"the sdtp rule")


@dataclass(frozen=True)
class DDTPConfig(_StepConfig):
    """Direct DTP with linear feedback (M20's DDTP-linear): every hidden layer l gets
    h^_l = h_l + g_l(a^_L) - g_l(a_L), g_l a direct map from the output logits a_L with target
    a^_L = a_L - alpha dL/da_L; g_l trained by the difference reconstruction loss (§4.5).
    ``inverse_activation`` defaults to ``identity`` (linear feedback)."""

    inverse_loss: str = "auto"
    inverse_activation: str = "identity"

    @classmethod
    def inverse_losses(cls) -> tuple[str, ...]:
        return ("auto", "difference_reconstruction")


# ---- the learners ---------------------------------------------------------------------------

class TargetPropagationLearner(Learner):
    """Shared machinery of the target-propagation rules. Subclasses set ``name``,
    ``config_cls``, ``difference`` (DTP's correction or TP's plain inverse) and
    ``default_inverse_loss``, and say where the hidden targets start (:meth:`top_target`)."""

    difference: ClassVar[bool] = True
    default_inverse_loss: ClassVar[str] = "denoising"

    def __init__(self, model: nn.Module, config: Any = None):
        super().__init__(model, config if config is not None else self.config_cls())
        cfg = self.config
        self.stages: list[Stage] = network_stages(model)
        if len(self.stages) < 2:
            raise ConfigError(f"{self.name}: target propagation needs at least one hidden "
                              f"layer (the model has only its output layer)")
        self.seed = int(torch.initial_seed() if cfg.noise_seed is None else cfg.noise_seed)
        self.inverse_loss_kind = (self.default_inverse_loss if cfg.inverse_loss == "auto"
                                  else cfg.inverse_loss)
        self.inverses = nn.ModuleDict()
        self._build_inverses()
        first = next(model.parameters())
        self.inverses.to(device=first.device, dtype=first.dtype)
        self.register_buffer("tp_steps", torch.zeros((), dtype=torch.int64))
        self.passes_per_epoch = 2 if cfg.schedule == "alternating" else 1
        self.phase = None

    # ---- construction -------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.stages)

    def _generator(self, *key: int | str) -> torch.Generator:
        return keyed_generator("cpu", self.seed, self.name, *key)

    def _layer_inverse(self, l: int) -> nn.Module:
        """g_l for 1-based layer l in 2..L-1: from the output of stage l to its input."""
        stage = self.stages[l - 1]
        act = self.config.inverse_activation
        gen = self._generator("inverse", l)
        if isinstance(stage.layer, nn.Linear):
            return LinearInverse(stage.layer.out_features, stage.in_shape, act, gen)
        return LocallyConnectedInverse(stage.layer, act, gen)

    def _build_inverses(self) -> None:
        for l in range(2, self.num_layers):
            self.inverses[f"g{l}"] = self._layer_inverse(l)

    def parameter_groups(self) -> list[dict[str, Any]]:
        """The forward weights' groups, one per layer; the inverses belong to their own
        optimiser (:meth:`configure_optimizers`)."""
        inverse = {id(p) for p in self.inverses.parameters()}
        groups = []
        for g in super().parameter_groups():
            params = [p for p in g["params"] if id(p) not in inverse]
            if params:
                groups.append({**g, "params": params})
        return groups

    def configure_optimizers(self, cfg: Any) -> dict[str, torch.optim.Optimizer]:
        """``"main"``: the run config's optimiser over the forward weights; ``"inverse"``: the
        rule's ``inverse_optimizer`` at ``inverse_lr`` over the inverses (one group each)."""
        from bpdl.optim import build_optimizer

        out = super().configure_optimizers(cfg)
        groups = [{"name": k, "params": list(m.parameters())} for k, m in self.inverses.items()]
        groups = [g for g in groups if g["params"]]
        if groups:
            c = self.config
            out["inverse"] = build_optimizer(c.inverse_optimizer, groups, c.inverse_lr, None,
                                             c.inverse_optimizer_options)
        return out

    # ---- schedule -------------------------------------------------------------------------
    def on_epoch_start(self, epoch: int) -> None:
        """Alternating schedule: even passes train the inverses, odd ones the forward weights
        (Lee15's order, §4.3)."""
        if self.config.schedule == "alternating":
            self.phase = "inverse" if epoch % 2 == 0 else "forward"
        else:
            self.phase = None

    # ---- the forward pass -----------------------------------------------------------------
    def _forward(self, x: Tensor, with_graph: bool, grad_at_top: bool
                 ) -> tuple[list[Tensor], list[Tensor], Tensor, Tensor]:
        """One forward pass with every layer's input detached: (h, outs, top_input, logits).
        ``h`` = [x, h_1, ..., h_{L-1}] detached; ``outs`` the hidden outputs with their own
        layer's graph (when ``with_graph``); ``top_input`` h_{L-1} as the output layer's
        input (a leaf requiring grad when ``grad_at_top``: DTP's one backprop step)."""
        h: list[Tensor] = [x]
        outs: list[Tensor] = []
        with torch.set_grad_enabled(with_graph):  # also under an outer no_grad
            for stage in self.stages[:-1]:
                out = stage(h[-1].detach())
                outs.append(out)
                h.append(out.detach())
            top_input = h[-1].detach()
            if grad_at_top:
                top_input.requires_grad_(True)
            logits = self.stages[-1](top_input)
        return h, outs, top_input, logits

    def _needs_output_gradient(self) -> bool:
        return False

    # ---- what the subclasses differ in ----------------------------------------------------
    def top_target(self, h: list[Tensor], logits: Tensor, y: Tensor, grad_top: Tensor | None
                   ) -> Tensor:
        """The target of the last hidden layer h^_{L-1}."""
        raise NotImplementedError

    def hidden_targets(self, h: list[Tensor], logits: Tensor, y: Tensor,
                       grad_top: Tensor | None) -> list[Tensor]:
        """Targets [h^_1, ..., h^_{L-1}] of the hidden layers (no gradients)."""
        with torch.no_grad():
            top = self.top_target(h, logits, y, grad_top)
            inverses = [self.inverses[f"g{l}"] for l in range(2, self.num_layers)]
            return tpf.propagate_targets(h[1:], top, inverses, difference=self.difference)

    def inverse_terms(self, h: list[Tensor], logits: Tensor, step: int | str
                      ) -> dict[str, Tensor]:
        """The loss of each inverse by its key (with graph to the inverse's parameters only)."""
        out: dict[str, Tensor] = {}
        for l in range(2, self.num_layers):
            below = h[l - 1]
            noisy = below + self._noise(below, step, l)
            with torch.no_grad():
                f = self.stages[l - 1](noisy)
            out[f"g{l}"] = self._inverse_loss(self.inverses[f"g{l}"](f), below, noisy)
        return out

    def _inverse_loss(self, reconstruction: Tensor, clean: Tensor, noisy: Tensor) -> Tensor:
        if self.inverse_loss_kind == "noise_preserving":
            return tpf.noise_preserving_loss(reconstruction, noisy)
        return tpf.denoising_loss(reconstruction, clean)

    def _noise(self, like: Tensor, step: int | str, layer: int) -> Tensor:
        """sigma eps, eps ~ N(0, I), drawn from the generator keyed by (seed, step, layer)."""
        g = keyed_generator(like.device, self.seed, self.name, "noise", step, layer)
        eps = torch.randn(like.shape, generator=g, device=like.device, dtype=like.dtype)
        return eps.mul_(self.config.sigma)

    def _output_gradient(self, logits: Tensor, y: Tensor) -> Tensor:
        """dL/da_L of the per-example cross-entropy, softmax(a) - onehot(y) (divided by N_b
        under ``alpha_convention="batch_mean"``)."""
        g = logits.detach().softmax(1) - F.one_hot(y, logits.shape[1]).to(logits.dtype)
        if getattr(self.config, "alpha_convention", "per_example") == "batch_mean":
            g = g / logits.shape[0]
        return g

    # ---- the rule's gradients -------------------------------------------------------------
    def forward_weights(self) -> list[nn.Parameter]:
        """The forward parameters in group order (cached: device moves keep the objects)."""
        if getattr(self, "_forward_weights", None) is None:
            self._forward_weights = [p for g in self.parameter_groups() for p in g["params"]]
        return self._forward_weights

    def rule_gradients(self, x: Tensor, y: Tensor, forward: bool = True, inverse: bool = True,
                       step: int | str = 0) -> dict[str, Any]:
        """Everything one training step computes, without touching ``.grad``: ``loss`` (task
        loss), ``correct``, ``grads`` (parameter -> gradient) of the forward weights (when
        ``forward``) and of the inverses (when ``inverse``), the activities ``h``, the hidden
        ``targets`` and the inverse losses ``inverse_losses`` by key."""
        need_top = forward and self._needs_output_gradient()
        h, outs, top_input, logits = self._forward(x, with_graph=forward, grad_at_top=need_top)
        with torch.set_grad_enabled(forward):
            task = F.cross_entropy(logits, y)
        result: dict[str, Any] = {"loss": task.detach(), "h": h, "logits": logits.detach(),
                                  "correct": (logits.detach().argmax(1) == y).sum(),
                                  "grads": {}, "targets": None, "inverse_losses": {}}
        if forward:
            grad_top = None
            if need_top:
                # DTP's one backprop step: dL/dh_{L-1} through the output layer only
                grad_top = torch.autograd.grad(task, top_input, retain_graph=True)[0]
                if getattr(self.config, "alpha_convention", "per_example") == "per_example":
                    grad_top = grad_top * x.shape[0]
            targets = self.hidden_targets(h, logits.detach(), y, grad_top)
            result["targets"] = targets
            with torch.enable_grad():  # also when called under no_grad (probes)
                local = [tpf.local_loss(out, t) for out, t in zip(outs, targets, strict=True)]
                params = self.forward_weights()
                total = task + torch.stack(local).sum()
                grads = torch.autograd.grad(total, params, allow_unused=True)
            result["grads"].update({p: g for p, g in zip(params, grads, strict=True)
                                    if g is not None})
            result["local_loss"] = torch.stack([v.detach() for v in local]).mean()
        if inverse and len(self.inverses):
            with torch.enable_grad():
                terms = self.inverse_terms([t.detach() for t in h], logits.detach(), step)
                params = list(self.inverses.parameters())
                grads = torch.autograd.grad(torch.stack(list(terms.values())).sum(), params,
                                            allow_unused=True)
            result["grads"].update({p: g for p, g in zip(params, grads, strict=True)
                                    if g is not None})
            result["inverse_losses"] = {k: v.detach() for k, v in terms.items()}
        return result

    def training_step(self, x: Tensor, y: Tensor) -> dict[str, Any]:
        forward = self.phase != "inverse"
        inverse = self.phase != "forward"
        r = self.rule_gradients(x, y, forward=forward, inverse=inverse, step=int(self.tp_steps))
        for p, g in r["grads"].items():
            p.grad = g if p.grad is None else p.grad + g
        self.tp_steps.add_(1)
        stats: dict[str, Any] = {"loss": r["loss"], "correct": r["correct"]}
        if "local_loss" in r:
            stats["local_loss"] = r["local_loss"]
        if r["inverse_losses"]:
            stats["inverse_loss"] = torch.stack(list(r["inverse_losses"].values())).mean()
        return stats

    # ---- metrics --------------------------------------------------------------------------
    def reconstruction_errors(self, h: list[Tensor], logits: Tensor) -> dict[str, float]:
        """Per inverse (by the name of the forward layer it inverts), the noise-free
        reconstruction error ||g_l(f_l(h_{l-1})) - h_{l-1}||^2, summed over units and averaged
        over the batch."""
        out: dict[str, float] = {}
        with torch.no_grad():
            for l in range(2, self.num_layers):
                below = h[l - 1]
                rec = self.inverses[f"g{l}"](self.stages[l - 1](below))
                out[self.stages[l - 1].name] = float(tpf.squared_error(rec, below))
        return out

    def alignment(self, x: Tensor, y: Tensor) -> dict[str, dict[str, float]]:
        """Per forward layer (docs/algorithms/target_propagation.md §4.4):

        - ``angle_update_bp``: angle between the rule's forward-weight update (what a forward
          step computes on this batch, whatever the phase) and backprop's gradient;
        - ``angle_target_bp`` (hidden layers): angle between the target difference h^_l - h_l
          and -dL/dh_l, the direction backprop would move the layer;
        - ``reconstruction_error``: of the inverse of this layer (DDTP: of the direct feedback
          to this layer, the difference reconstruction error with a fixed probe noise).

        Nothing is trained and no training noise is drawn."""
        r = self.rule_gradients(x, y, forward=True, inverse=False)
        bp_w, bp_h = self._backprop(x, y)
        out: dict[str, dict[str, float]] = {s.name: {} for s in self.stages}
        for stage in self.stages:
            w = stage.layer.weight
            if w in r["grads"] and stage.name in bp_w:
                out[stage.name]["angle_update_bp"] = angle_degrees(r["grads"][w], bp_w[stage.name])
        for stage, h, t, g in zip(self.stages[:-1], r["h"][1:], r["targets"], bp_h, strict=True):
            out[stage.name]["angle_target_bp"] = angle_degrees(t - h, -g)
        for name, value in self.reconstruction_errors(r["h"], r["logits"]).items():
            out[name]["reconstruction_error"] = value
        return {k: v for k, v in out.items() if v}

    def _backprop(self, x: Tensor, y: Tensor) -> tuple[dict[str, Tensor], list[Tensor]]:
        """Backprop on (x, y): the weight gradients by layer name and dL/dh_l of the hidden
        layers (L the batch-mean cross-entropy)."""
        with torch.enable_grad():
            hidden = []
            h = x
            for stage in self.stages[:-1]:
                h = stage(h)
                hidden.append(h)
            loss = F.cross_entropy(self.stages[-1](h), y)
            weights = [s.layer.weight for s in self.stages]
            grads = torch.autograd.grad(loss, weights + hidden)
        n = len(weights)
        return ({s.name: g for s, g in zip(self.stages, grads[:n], strict=True)},
                list(grads[n:]))

    def extra_state_for_config(self) -> dict[str, Any]:
        return {"target_propagation": self.name, **dataclasses.asdict(self.config),
                "resolved_inverse_loss": self.inverse_loss_kind,
                "resolved_noise_seed": self.seed,
                "inverses": {k: repr(m) for k, m in self.inverses.items()}}


class _GradientFirstTarget:
    """Mixin: h^_{L-1} = h_{L-1} - alpha dL/dh_{L-1}, one backprop step (Lee15)."""

    def _needs_output_gradient(self) -> bool:
        return True

    def top_target(self, h, logits, y, grad_top):
        return tpf.gradient_target(h[-1], grad_top, self.config.alpha)


@RULES.register("dtp")
class DifferenceTP(_GradientFirstTarget, TargetPropagationLearner):
    """Difference target propagation (Lee, Zhang, Fischer & Bengio 2015; B18's DTP): first
    target h_{L-1} - alpha dL/dh_{L-1}, then h^_{l-1} = h_{l-1} - g_l(h_l) + g_l(h^_l);
    inverses g_2 ... g_{L-1} trained with the noise-preserving loss (§4.2)."""

    name = "dtp"
    config_cls = DTPConfig
    default_inverse_loss = "noise_preserving"


@RULES.register("tp")
class TargetPropagation(TargetPropagationLearner):
    """Plain target propagation: h^_{l-1} = g_l(h^_l), no difference correction; the first
    target from the gradient (as DTP, bpdl's default) or from the label through g_L (§4.2).
    De-noising inverse loss (bpdl's choice)."""

    name = "tp"
    config_cls = TPConfig
    difference = False
    default_inverse_loss = "denoising"

    def _needs_output_gradient(self) -> bool:
        return self.config.first_target == "gradient"

    def _build_inverses(self) -> None:
        super()._build_inverses()
        if self.config.first_target == "label":
            n_classes = self.stages[-1].out_shape[0]
            self.inverses[f"g{self.num_layers}"] = LinearInverse(
                n_classes, self.stages[-1].in_shape, self.config.inverse_activation,
                self._generator("inverse", self.num_layers))

    def top_target(self, h, logits, y, grad_top):
        if self.config.first_target == "gradient":
            return tpf.gradient_target(h[-1], grad_top, self.config.alpha)
        onehot = F.one_hot(y, logits.shape[1]).to(logits.dtype)
        return self.inverses[f"g{self.num_layers}"](onehot)

    def inverse_terms(self, h, logits, step):
        out = super().inverse_terms(h, logits, step)
        if self.config.first_target == "label":
            out.update(_output_inverse_term(self, h, step, lambda noisy: self.stages[-1](
                noisy).softmax(1)))
        return out

    def reconstruction_errors(self, h, logits):
        out = super().reconstruction_errors(h, logits)
        if self.config.first_target == "label":
            out.update(_output_reconstruction(self, h, logits.softmax(1)))
        return out


def _output_inverse_term(learner: TargetPropagationLearner, h: list[Tensor], step: int | str,
                         output: Any) -> dict[str, Tensor]:
    """The inverse loss of g_L, from the output (``output(h~)``: probabilities, or
    probabilities and AO-SDTP's auxiliary units) back to the last hidden layer."""
    L = learner.num_layers
    below = h[L - 1]
    noisy = below + learner._noise(below, step, L)
    with torch.no_grad():
        f = output(noisy)
    return {f"g{L}": learner._inverse_loss(learner.inverses[f"g{L}"](f), below, noisy)}


def _output_reconstruction(learner: TargetPropagationLearner, h: list[Tensor], out: Tensor
                           ) -> dict[str, float]:
    L = learner.num_layers
    with torch.no_grad():
        rec = learner.inverses[f"g{L}"](out)
    return {learner.stages[-1].name: float(tpf.squared_error(rec, h[L - 1]))}


@RULES.register("sdtp")
class SimplifiedDTP(TargetPropagationLearner):
    """Simplified DTP (B18): the output target is the label y, carried to the last hidden layer
    with the difference correction, h^_{L-1} = h_{L-1} - g_L(h_L) + g_L(y) (h_L the class
    probabilities), then as DTP; inverses g_2 ... g_L trained with the de-noising loss. No
    gradient of the task loss reaches any hidden layer (§4.2)."""

    name = "sdtp"
    config_cls = SDTPConfig
    default_inverse_loss = "denoising"

    def _build_inverses(self) -> None:
        super()._build_inverses()
        L = self.num_layers
        self.inverses[f"g{L}"] = LinearInverse(self._output_width(), self.stages[-1].in_shape,
                                               self.config.inverse_activation,
                                               self._generator("inverse", L))

    def _output_width(self) -> int:
        return self.stages[-1].out_shape[0]

    def output_code(self, probabilities: Tensor, h_top: Tensor) -> Tensor:
        """What g_L reads: the class probabilities (AO-SDTP: and the auxiliary units)."""
        return probabilities

    def top_target(self, h, logits, y, grad_top):
        onehot = F.one_hot(y, logits.shape[1]).to(logits.dtype)
        g_out, g_label = self._output_inverse_pair(logits.softmax(1), onehot, h[-1])
        return tpf.difference_correction(h[-1], g_out, g_label)

    def _output_inverse_pair(self, probabilities: Tensor, onehot: Tensor, h_top: Tensor
                             ) -> tuple[Tensor, Tensor]:
        """g_L at the output and at the label (subclasses may share work between the two)."""
        g = self.inverses[f"g{self.num_layers}"]
        n = probabilities.shape[0]
        both = g(torch.cat([self.output_code(probabilities, h_top),
                            self.output_code(onehot, h_top)]))
        return both[:n], both[n:]

    def inverse_terms(self, h, logits, step):
        out = super().inverse_terms(h, logits, step)
        out.update(_output_inverse_term(
            self, h, step,
            lambda noisy: self.output_code(self.stages[-1](noisy).softmax(1), noisy)))
        return out

    def reconstruction_errors(self, h, logits):
        out = super().reconstruction_errors(h, logits)
        out.update(_output_reconstruction(self, h, self.output_code(logits.softmax(1), h[-1])))
        return out


@RULES.register("aosdtp")
class AuxiliaryOutputSDTP(SimplifiedDTP):
    """SDTP with B18's auxiliary output: h_L = [o, z], o the class probabilities and z =
    tanh(W_z h_{L-1} + b_z) a fixed random projection; the output inverse reads both,
    g_L(o, z) = tanh(V_o o + V_z z + c), and the target keeps z:
    h^_{L-1} = h_{L-1} - g_L(o, z) + g_L(y, z) (§4.2)."""

    name = "aosdtp"
    config_cls = AOSDTPConfig

    def _build_inverses(self) -> None:
        self.auxiliary = AuxiliaryOutput(math.prod(self.stages[-1].in_shape),
                                         self.config.aux_size, self._generator("auxiliary"))
        first = next(self.model.parameters())
        self.auxiliary.to(device=first.device, dtype=first.dtype)
        super()._build_inverses()

    def _output_width(self) -> int:
        return self.stages[-1].out_shape[0] + self.config.aux_size

    def output_code(self, probabilities: Tensor, h_top: Tensor) -> Tensor:
        return torch.cat([probabilities, self.auxiliary(h_top)], 1)

    def _output_inverse_pair(self, probabilities, onehot, h_top):
        # g_L(o, z) = act(V_o o + V_z z + c): the z part is the same for the output and the
        # label, so it is computed once
        g = self.inverses[f"g{self.num_layers}"]
        k = probabilities.shape[1]
        shared = F.linear(self.auxiliary(h_top), g.weight[:, k:], g.bias)
        v_o = g.weight[:, :k]
        shape = (probabilities.shape[0], *g.out_shape)
        return (g.act((shared + probabilities @ v_o.T).reshape(shape)),
                g.act((shared + onehot @ v_o.T).reshape(shape)))


@RULES.register("ddtp")
class DirectDifferenceTP(TargetPropagationLearner):
    """Direct difference target propagation with linear feedback (M20's DDTP-linear): output
    target a^_L = a_L - alpha dL/da_L on the logits; every hidden layer l gets it directly,
    h^_l = h_l + g_l(a^_L) - g_l(a_L), g_l(a) = Q_l a + c_l; g_l trained with the difference
    reconstruction loss (§4.5)."""

    name = "ddtp"
    config_cls = DDTPConfig
    default_inverse_loss = "difference_reconstruction"

    def _build_inverses(self) -> None:
        n_classes = self.stages[-1].out_shape[0]
        for l in range(1, self.num_layers):
            self.inverses[f"q{l}"] = LinearInverse(n_classes, self.stages[l - 1].out_shape,
                                                   self.config.inverse_activation,
                                                   self._generator("inverse", l))

    def hidden_targets(self, h, logits, y, grad_top):
        with torch.no_grad():
            a = logits
            a_hat = a - self.config.alpha * self._output_gradient(logits, y)
            n = a.shape[0]
            targets = []
            for l in range(1, self.num_layers):
                both = self.inverses[f"q{l}"](torch.cat([a, a_hat]))
                targets.append(tpf.difference_correction(h[l], both[:n], both[n:]))
            return targets

    def _logits_from(self, h_l: Tensor, l: int) -> Tensor:
        """The output logits the forward layers above layer l compute from ``h_l``."""
        for stage in self.stages[l:]:
            h_l = stage(h_l)
        return h_l

    def inverse_terms(self, h, logits, step):
        out: dict[str, Tensor] = {}
        for l in range(1, self.num_layers):
            noisy = h[l] + self._noise(h[l], step, l)
            with torch.no_grad():
                a_noisy = self._logits_from(noisy, l)
            q = self.inverses[f"q{l}"]
            n = logits.shape[0]
            both = q(torch.cat([a_noisy, logits]))
            out[f"q{l}"] = tpf.difference_reconstruction_loss(h[l], noisy, both[:n], both[n:],
                                                              self.config.sigma)
        return out

    def reconstruction_errors(self, h, logits):
        with torch.no_grad():
            terms = self.inverse_terms(h, logits, "probe")
        return {self.stages[int(k[1:]) - 1].name: float(v) for k, v in terms.items()}
