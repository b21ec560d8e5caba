"""Classification losses shared by the rules that train on a task loss (backprop, the
feedback-alignment family, the output layer of target propagation)."""

from __future__ import annotations

from torch import Tensor, nn

from bpdl.errors import UnknownNameError

#: Task losses by name: cross-entropy on logits, or squared error against one-hot targets.
LOSSES = ("cross_entropy", "mse")


def check_loss(name: str) -> None:
    """UnknownNameError (listing :data:`LOSSES`) unless ``name`` is a task loss."""
    if name not in LOSSES:
        raise UnknownNameError("loss", name, LOSSES)


def classification_loss(name: str, scores: Tensor, y: Tensor) -> Tensor:
    """Mean loss over the batch: cross-entropy on logits, or squared error against one-hot
    targets (summed over classes, as in L16)."""
    if name == "cross_entropy":
        return nn.functional.cross_entropy(scores, y)
    if name == "mse":
        target = nn.functional.one_hot(y, scores.shape[1]).to(scores.dtype)
        return ((scores - target) ** 2).sum(1).mean()
    raise UnknownNameError("loss", name, LOSSES)
