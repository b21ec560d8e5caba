"""Backpropagation: the baseline every local rule is compared against."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from bpdl.functional.losses import check_loss, classification_loss
from bpdl.rules.base import Learner
from bpdl.rules.registry import RULES


@dataclass(frozen=True)
class BackpropConfig:
    """Backprop options. ``loss``: cross_entropy (on logits) or mse (on the outputs)."""

    loss: str = "cross_entropy"

    def __post_init__(self) -> None:
        check_loss(self.loss)


@RULES.register("bp")
class Backprop(Learner):
    """Exact gradient of the minibatch-mean loss by reverse-mode autodiff (Rumelhart et al. 1986)."""

    name = "bp"
    config_cls = BackpropConfig

    def __init__(self, model: nn.Module, config: BackpropConfig | None = None):
        super().__init__(model, config or BackpropConfig())

    def training_step(self, x: Tensor, y: Tensor) -> dict[str, Any]:
        scores = self.model(x)
        loss = classification_loss(self.config.loss, scores, y)
        loss.backward()
        return {"loss": loss.detach(), "correct": (scores.detach().argmax(1) == y).sum()}

    def loss(self, scores: Tensor, y: Tensor) -> Tensor:
        return classification_loss(self.config.loss, scores, y)
