"""The feedback-alignment family as learning rules: fa, dfa, usf, brsf, frsf, kp, wm.

Each rule converts its model with :func:`bpdl.nn.convert` (the layers' autograd Functions carry
the rule, docs/algorithms/feedback_alignment.md) and then trains like backprop: forward, loss, ``backward``
fills ``.grad``, the optimiser steps. Kolen-Pollack and weight mirrors add a per-step update of
the feedback weights in :meth:`after_step`. :meth:`alignment` reports, per layer, the angle
between forward and feedback weights and between the rule's update and backprop's on the same
batch (section 3.7).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import Tensor, nn

from bpdl.functional.losses import classification_loss
from bpdl.nn.feedback import FeedbackLayer, convert, feedback_layers, use_backprop
from bpdl.nn.feedback_pathways import WMConfig, _mix_seed, rule_options_class
from bpdl.rules.base import Learner, angle_degrees
from bpdl.rules.registry import RULES


class FeedbackLearner(Learner):
    """Shared machinery of the feedback-alignment rules. A subclass sets ``name``, the name of
    its pathway (:data:`bpdl.nn.feedback_pathways.PATHWAYS`), whose options dataclass becomes
    the rule's. The model is converted in place when the learner is built."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            cls.config_cls = rule_options_class(cls.name)

    def __init__(self, model: nn.Module, config: Any = None):
        super().__init__(model, config if config is not None else self.config_cls())
        convert(model, self.name, config=self.config)
        self._last_batch = 0

    # ---- the protocol -------------------------------------------------------------------------
    def training_step(self, x: Tensor, y: Tensor) -> dict[str, Any]:
        scores = self.model(x)
        loss = classification_loss(self.config.loss, scores, y)
        loss.backward()
        self._after_backward()
        self._last_batch = x.shape[0]
        return {"loss": loss.detach(), "correct": (scores.detach().argmax(1) == y).sum()}

    def loss(self, scores: Tensor, y: Tensor) -> Tensor:
        return classification_loss(self.config.loss, scores, y)

    def _after_backward(self) -> None:
        """Hook after each training backward (DFA frees the carried output error)."""

    def layers(self) -> list[tuple[str, FeedbackLayer]]:
        return feedback_layers(self.model)

    def extra_state_for_config(self) -> dict[str, Any]:
        """The rule's resolved options (``last_layer_rule`` among them: published sign-symmetry
        numbers are not comparable without it) and the resolved feedback initialiser and seed."""
        layers = self.layers()
        first = layers[0][1] if layers else None
        return {"feedback_rule": self.name, **dataclasses.asdict(self.config),
                "resolved_feedback_init": None if first is None else first.feedback_init,
                "resolved_feedback_seed": None if first is None else first.feedback_seed}

    # ---- alignment metrics (docs/algorithms/feedback_alignment.md §3.7) -----------------------
    def _probe_pass(self, x: Tensor, y: Tensor, layers: list[FeedbackLayer]
                    ) -> tuple[list[Tensor | None], list[Tensor | None], list[Tensor | None]]:
        """One forward and backward on (x, y): the weight gradients, each layer's input and its
        error delta = dL/da as the current backward computes it. ``.grad`` is untouched."""
        inputs: list[Tensor | None] = [None] * len(layers)
        deltas: list[Tensor | None] = [None] * len(layers)
        hooks = []

        def make_hook(i: int):
            def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
                inputs[i] = args[0].detach()
                if output.requires_grad:
                    output.register_hook(lambda g: deltas.__setitem__(i, g.detach()))
            return hook

        for i, layer in enumerate(layers):
            hooks.append(layer.register_forward_hook(make_hook(i)))
        try:
            with torch.enable_grad():
                scores = self.model(x)
                loss = classification_loss(self.config.loss, scores, y)
                weights = [layer.weight for layer in layers]
                grads = torch.autograd.grad(loss, weights, allow_unused=True)
        finally:
            for h in hooks:
                h.remove()
        return list(grads), inputs, deltas

    def alignment(self, x: Tensor, y: Tensor) -> dict[str, dict[str, float]]:
        """Per layer (docs/algorithms/feedback_alignment.md §3.7), in degrees:

        - ``angle_weight_feedback``: angle between W and the feedback tensor B in W's layout,
          with ``norm_ratio_feedback`` = ||B|| / ||W|| and ``feedback_used`` (0 for the first
          layer, whose B never carries a signal: its angle is reported but unused);
        - ``angle_update_bp``: angle between the rule's weight update and backprop's gradient on
          the same batch with the same parameters (every rule, DFA included);
        - ``angle_delta_bp``: angle between the rule's and backprop's hidden error deltas
          (N, n_l), L16's "delta h" angle;
        - ``angle_signal_local``: angle between what the layer sends below, B^T delta (D^T e for
          DFA), and W^T delta for the rule's own delta: one layer's feedback, isolated from the
          errors accumulated above it (A19's "delta angle").

        The probe passes leave the model as they found it (BatchNorm running statistics and
        brSF's draw counter are restored).
        """
        named = self.layers()
        names = [n for n, _ in named]
        layers = [m for _, m in named]
        saved = {k: v.detach().clone() for k, v in self.model.state_dict(keep_vars=True).items()
                 if k.endswith(("running_mean", "running_var", "num_batches_tracked",
                                "feedback_step"))}
        try:
            rule_grads, inputs, rule_deltas = self._probe_pass(x, y, layers)
            last = rule_deltas[-1]
            output_error = None if last is None else last.reshape(last.shape[0], -1)
            with use_backprop(self.model):
                bp_grads, _, bp_deltas = self._probe_pass(x, y, layers)
            out: dict[str, dict[str, float]] = {}
            for i, (name, layer) in enumerate(zip(names, layers, strict=True)):
                rec: dict[str, float] = {}
                if rule_grads[i] is not None and bp_grads[i] is not None:
                    rec["angle_update_bp"] = angle_degrees(rule_grads[i], bp_grads[i])
                if rule_deltas[i] is not None and bp_deltas[i] is not None:
                    rec["angle_delta_bp"] = angle_degrees(rule_deltas[i], bp_deltas[i])
                feedback = layer.feedback_weight()
                if feedback is not None:
                    w = layer.weight.detach()
                    rec["angle_weight_feedback"] = angle_degrees(w, feedback)
                    norm_w = float(w.norm())
                    rec["norm_ratio_feedback"] = (float(feedback.detach().norm()) / norm_w
                                                  if norm_w > 0 else math.nan)
                    rec["feedback_used"] = 0.0 if i == 0 else 1.0
                if i > 0 and rule_deltas[i] is not None and inputs[i] is not None:
                    sent = layer.pathway.signal_sent(rule_deltas[i], inputs[i], output_error)
                    if sent is not None:
                        exact = layer.backward_math(rule_deltas[i], inputs[i],
                                                    layer.weight.detach(), True, False, False)[0]
                        rec["angle_signal_local"] = angle_degrees(sent, exact)
                out[name] = rec
            return out
        finally:
            with torch.no_grad():
                state = self.model.state_dict(keep_vars=True)
                for k, v in saved.items():
                    state[k].copy_(v)
            self._after_backward()

@RULES.register("fa")
class FeedbackAlignment(FeedbackLearner):
    """Feedback alignment (Lillicrap, Cownden, Tweed & Akerman 2016): the error travels down
    through fixed random matrices B_l, g = B^T delta; weight updates delta h^T as backprop."""

    name = "fa"


@RULES.register("dfa")
class DirectFeedbackAlignment(FeedbackLearner):
    """Direct feedback alignment (Nokland 2016): every hidden layer gets the output error
    through its own fixed random matrix, delta_l = (D_l^T e) * f'(a_l)."""

    name = "dfa"

    def _after_backward(self) -> None:
        layers = self.layers()
        if layers:  # one hub per model: releasing it through any layer frees the error
            layers[0][1].pathway.release()


class SignSymmetry(FeedbackLearner):
    """Sign symmetry (Liao, Leibo & Poggio 2016; Xiao et al. 2018): B = sign(W) * M."""


@RULES.register("usf")
class UniformSignSymmetry(SignSymmetry):
    """Sign symmetry, uniform magnitude (uSF): B = c sign(W), c the init's standard deviation."""

    name = "usf"


@RULES.register("brsf")
class BatchwiseRandomSignSymmetry(SignSymmetry):
    """Sign symmetry, batchwise random magnitude (brSF): B = |R_t| sign(W), R_t redrawn from the
    initialiser at every update."""

    name = "brsf"


@RULES.register("frsf")
class FixedRandomSignSymmetry(SignSymmetry):
    """Sign symmetry, fixed random magnitude (frSF): B = |R| sign(W), R drawn once."""

    name = "frsf"


@RULES.register("kp")
class KolenPollack(FeedbackLearner):
    """Kolen-Pollack (Akrout et al. 2019): B receives W's update, W <- (1-lambda) W + u and
    B <- (1-lambda) B + u, so W - B decays and B aligns with W.

    B is a parameter in W's optimiser group with B.grad = W.grad (set by the autograd
    Function), so every optimiser gives both the same increment as long as its own weight
    decay is off or decoupled (SGD without momentum, AdamW); ``decay`` applies lambda here,
    after the optimiser step, identically to both.
    """

    name = "kp"

    def after_step(self) -> None:
        factor = 1.0 - self.config.decay
        if factor == 1.0:
            return
        with torch.no_grad():
            for _, layer in self.layers():
                if layer.mode == "kp" and not layer.last_layer_bp:
                    layer.weight.mul_(factor)
                    layer.feedback.mul_(factor)


@RULES.register("wm")
class WeightMirrors(FeedbackLearner):
    """Weight mirrors (Akrout et al. 2019): feedback alignment whose B is learned in "mirror"
    steps, each layer driven by zero-mean input noise xi: dB = eta_B y^T xi - lambda_B B with
    y = W xi (E[y xi^T] = sigma^2 W, so B's direction converges to W's). One mirror step per
    training step (after the update, so it sees the new W) and ``mirror_pretrain_steps`` before
    training.

    The feedback tensors have an optimiser of their own, ``"mirror"`` (plain SGD at
    ``mirror_lr`` on the pseudo-gradient -y^T xi), returned by :meth:`configure_optimizers`
    next to the forward weights' ``"main"``, so its state is checkpointed with the run. The
    learner steps it itself in :meth:`mirror_step`; when the loop steps every optimiser after
    ``training_step`` the feedback has no gradient and the mirror optimiser leaves it alone.
    """

    name = "wm"

    def __init__(self, model: nn.Module, config: WMConfig | None = None):
        super().__init__(model, config)
        self.register_buffer("mirror_steps", torch.zeros((), dtype=torch.int64))
        self.register_buffer("mirror_pretrained", torch.zeros((), dtype=torch.bool))
        self._mirror_opt: torch.optim.Optimizer | None = None

    def mirrored_layers(self) -> list[FeedbackLayer]:
        """The layers whose feedback B is learned by mirror steps."""
        return [layer for _, layer in self.layers()
                if layer.mode == "wm" and not layer.last_layer_bp]

    def mirror_optimizer(self) -> torch.optim.Optimizer:
        """The optimiser of the feedback tensors, over the current tensors (rebuilt if they were
        replaced since, by a device move or a new conversion; plain SGD keeps no state)."""
        feedback = [layer.feedback for layer in self.mirrored_layers()] or [torch.zeros(0)]
        current = None if self._mirror_opt is None else self._mirror_opt.param_groups[0]["params"]
        if current is None or len(current) != len(feedback) or any(
                a is not b for a, b in zip(current, feedback, strict=True)):
            self._mirror_opt = torch.optim.SGD(feedback, lr=self.config.mirror_lr)
        return self._mirror_opt

    def configure_optimizers(self, cfg: Any) -> dict[str, torch.optim.Optimizer]:
        return {**super().configure_optimizers(cfg), "mirror": self.mirror_optimizer()}

    def on_epoch_start(self, epoch: int) -> None:
        if not bool(self.mirror_pretrained):
            batch = self.config.mirror_batch or 100
            for _ in range(self.config.mirror_pretrain_steps):
                self.mirror_step(batch)
            self.mirror_pretrained.fill_(True)

    def after_step(self) -> None:
        self.mirror_step(self.config.mirror_batch or self._last_batch or 100)

    @torch.no_grad()
    def mirror_step(self, batch: int) -> None:
        """One mirror step on every layer with a learned B: B <- (1 - lambda_B) B + eta_B y^T xi,
        the decay applied here and the increment by the mirror optimiser (SGD on -y^T xi)."""
        cfg = self.config
        step = int(self.mirror_steps)
        layers = self.mirrored_layers()
        for layer in layers:
            shape = layer.input_shape
            if shape is None:
                raise RuntimeError(f"weight mirrors need the input shape of {layer.layer_type} "
                                   f"layers; pass input_shape to bpdl.convert")
            w = layer.weight
            g = torch.Generator(device=w.device).manual_seed(
                _mix_seed(layer.feedback_seed, layer.layer_index, 4, step))
            xi = torch.empty((batch, *shape), device=w.device, dtype=w.dtype)
            if cfg.mirror_noise == "uniform":
                xi.uniform_(-cfg.mirror_amplitude, cfg.mirror_amplitude, generator=g)
            else:
                xi.normal_(0.0, cfg.mirror_amplitude, generator=g)
            y = layer.forward_math(xi, w, None)
            delta = layer.backward_math(y, xi, w, False, True, False)[1]  # sum_n y_n xi_n^T
            if cfg.mirror_reduction == "mean":
                delta = delta / (batch * (math.prod(y.shape[2:]) if isinstance(
                    layer, nn.Conv2d) else 1))
            layer.feedback.mul_(1.0 - cfg.mirror_decay)
            layer.feedback.grad = delta.neg_()
        if layers:
            opt = self.mirror_optimizer()
            opt.step()
            opt.zero_grad(set_to_none=True)
        self.mirror_steps.add_(1)


__all__ = [
    "BatchwiseRandomSignSymmetry", "DirectFeedbackAlignment", "FeedbackAlignment",
    "FeedbackLearner", "FixedRandomSignSymmetry", "KolenPollack", "SignSymmetry",
    "UniformSignSymmetry", "WeightMirrors",
]
