"""Metrics logged at every evaluation: loss and accuracy, weight statistics, alignment angles."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
from torch import Tensor

from bpdl.data import ImageSet, to_float

__all__ = ["evaluate", "weight_statistics", "angle_degrees", "eval_batches"]

from bpdl.rules.base import angle_degrees  # noqa: E402  (re-exported)


def eval_batches(data: ImageSet, batch_size: int, device: torch.device) -> Iterator[
        tuple[Tensor, Tensor]]:
    """In-order minibatches of ``data`` as (float images in [0, 1], labels) on ``device``."""
    for start in range(0, len(data), batch_size):
        images = data.images[start:start + batch_size].to(device, non_blocking=True)
        labels = data.labels[start:start + batch_size].to(device, non_blocking=True)
        yield to_float(images), labels


@torch.no_grad()
def evaluate(learner, data: ImageSet, batch_size: int = 1000,
             device: torch.device | str = "cpu") -> dict[str, float]:
    """Mean loss and accuracy of ``learner.predict`` on ``data`` (evaluation mode)."""
    device = torch.device(device)
    was_training = learner.training
    learner.eval()
    total_loss = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    try:
        for x, y in eval_batches(data, batch_size, device):
            scores = learner.predict(x)
            total_loss += learner.loss(scores, y).double() * y.numel()
            correct += (scores.argmax(1) == y).sum()
    finally:
        learner.train(was_training)
    n = max(len(data), 1)
    return {"loss": float(total_loss) / n, "acc": float(correct) / n}


def weight_statistics(
    weights: Mapping[str, Tensor],
    previous: Mapping[str, Tensor] | None,
    before_last_step: Mapping[str, Tensor] | None,
) -> dict[str, dict[str, float]]:
    """Per layer: Frobenius norm ``weight_norm``; ``rel_change`` = ||W - W_prev|| / ||W_prev||
    since the previous evaluation; ``update_norm`` = ||W - W_before|| of the last optimiser step."""
    out: dict[str, dict[str, float]] = {}
    for name, w in weights.items():
        w = w.detach()
        stats = {"weight_norm": float(w.norm())}
        if previous is not None and name in previous:
            prev = previous[name]
            denom = float(prev.norm())
            stats["rel_change"] = float((w - prev).norm()) / denom if denom > 0 else float("nan")
        if before_last_step is not None and name in before_last_step:
            stats["update_norm"] = float((w - before_last_step[name]).norm())
        out[name] = stats
    return out
