"""Target propagation, plain PyTorch: the math of the ``tp``, ``dtp``, ``sdtp``, ``aosdtp`` and
``ddtp`` rules (docs/algorithms/target_propagation.md §4.1-4.5), written to be read.

Notation (docs/algorithms/target_propagation.md §4.1): h_0 = x, h_l = f_l(h_{l-1}) for the
hidden layers l = 1 ... L-1, the output layer L; g_l maps layer l back into the space of layer
l-1. Every squared error here is summed over units and averaged over the examples of the batch
(Lee15's convention, §4.1); targets are computed without gradients.

- :func:`gradient_target`: DTP's first target, h - alpha dL/dh (§4.2).
- :func:`propagate_targets`: the recursion from the top target down, with DTP's difference
  correction h_{l-1} - g_l(h_l) + g_l(h^_l) or TP's plain g_l(h^_l) (§4.2).
- :func:`difference_correction`: one step of that recursion.
- :func:`local_loss`: the forward loss ||f_l(sg(h_{l-1})) - sg(h^_l)||^2 (§4.1).
- :func:`noise_preserving_loss`, :func:`denoising_loss`: the two inverse losses (§4.1).
- :func:`difference_reconstruction_loss`: M20's loss for DDTP-linear's direct feedback (§4.5).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = [
    "denoising_loss", "difference_correction", "difference_reconstruction_loss",
    "gradient_target", "local_loss", "noise_preserving_loss", "propagate_targets",
    "squared_error",
]


def squared_error(a: Tensor, b: Tensor) -> Tensor:
    """||a - b||^2 summed over units and averaged over the batch (dimension 0), Lee15's
    convention (docs/algorithms/target_propagation.md §4.1)."""
    return (a - b).pow(2).sum() / a.shape[0]


def gradient_target(h: Tensor, grad: Tensor, alpha: float) -> Tensor:
    """DTP's first target (Lee15; docs/algorithms/target_propagation.md §4.2):
    h^_{L-1} = h_{L-1} - alpha dL/dh_{L-1}.

    ``grad`` is the gradient of the per-example loss (alpha per example, bpdl's convention) or
    of the batch-mean loss (``alpha_convention="batch_mean"``, Lee15's code, where each example
    moves by alpha / N_b)."""
    return h - alpha * grad


def difference_correction(h_below: Tensor, g_at_h: Tensor, g_at_target: Tensor) -> Tensor:
    """DTP's difference-corrected target (Lee15; docs/algorithms/target_propagation.md §4.2):
    h^_{l-1} = h_{l-1} - g_l(h_l) + g_l(h^_l).

    The correction cancels the reconstruction error of an imperfect inverse: with h^_l = h_l the
    target is h_{l-1} exactly, and to first order h^_{l-1} - h_{l-1} = J_{g_l}(h_l) (h^_l - h_l)
    whatever g_l is."""
    # the difference first: a target equal to the activity gives h_{l-1} exactly
    return h_below + (g_at_target - g_at_h)


def propagate_targets(hidden: Sequence[Tensor], top_target: Tensor,
                      inverses: Sequence[Callable[[Tensor], Tensor] | None],
                      difference: bool = True) -> list[Tensor]:
    """Targets of the hidden layers from the target of the top one
    (docs/algorithms/target_propagation.md §4.2).

    Args:
        hidden: the hidden activities [h_1, ..., h_K] of one forward pass (K = L - 1).
        top_target: the target h^_K of the last of them.
        inverses: [g_2, ..., g_K]: ``inverses[k]`` maps layer k + 2 back to layer k + 1 (one
            fewer than ``hidden``); an entry may be None only where no target is needed below.
        difference: DTP's difference correction (``dtp``, ``sdtp``, ``aosdtp``); False is plain
            TP, h^_{l-1} = g_l(h^_l).

    Returns:
        [h^_1, ..., h^_K], computed without gradients.
    """
    if len(inverses) != len(hidden) - 1:
        raise ValueError(f"{len(hidden)} hidden layers need {len(hidden) - 1} inverses, got "
                         f"{len(inverses)}")
    with torch.no_grad():
        targets: list[Tensor] = [top_target]
        for k in range(len(hidden) - 1, 0, -1):
            g = inverses[k - 1]
            if g is None:
                raise ValueError(f"no inverse for hidden layer {k + 1}")
            if difference:
                # g at h and at the target in one call (one matrix product for both)
                both = g(torch.cat([hidden[k], targets[0]]))
                g_h, g_t = both[: hidden[k].shape[0]], both[hidden[k].shape[0]:]
                targets.insert(0, difference_correction(hidden[k - 1], g_h, g_t))
            else:
                targets.insert(0, g(targets[0]))
        return targets


def local_loss(output: Tensor, target: Tensor) -> Tensor:
    """The forward (local) loss of a hidden layer (docs/algorithms/target_propagation.md §4.1):
    L_l = ||f_l(sg(h_{l-1})) - sg(h^_l)||^2, summed over units, averaged over the batch.
    ``output`` is f_l of the detached input; the target is detached here."""
    return squared_error(output, target.detach())


def noise_preserving_loss(reconstruction: Tensor, noisy_input: Tensor) -> Tensor:
    """Lee15's inverse loss (and B18's for DTP; docs/algorithms/target_propagation.md §4.1):
    ||g_l(f_l(h~)) - h~||^2 with h~ = h_{l-1} + eps, eps ~ N(0, sigma^2 I); ``reconstruction``
    is g_l(f_l(h~)) with f_l's parameters held constant."""
    return squared_error(reconstruction, noisy_input.detach())


def denoising_loss(reconstruction: Tensor, clean_input: Tensor) -> Tensor:
    """B18's de-noising inverse loss for SDTP and AO-SDTP (docs/algorithms/target_propagation.md
    §4.1): ||h_{l-1} - g_l(f_l(h~))||^2, the reconstruction of the noisy h~ = h_{l-1} + eps
    compared with the clean h_{l-1}."""
    return squared_error(reconstruction, clean_input.detach())


def difference_reconstruction_loss(hidden: Tensor, noisy_hidden: Tensor, feedback_noisy: Tensor,
                                   feedback_clean: Tensor, sigma: float) -> Tensor:
    """M20's difference reconstruction loss for a direct feedback mapping g_l from the output
    to hidden layer l (DDTP-linear; docs/algorithms/target_propagation.md §4.5):

        L_l = ||h_l + g_l(f_{L,l}(h_l + sigma eps)) - g_l(f_{L,l}(h_l)) - (h_l + sigma eps)||^2
              / sigma^2,

    f_{L,l} the forward map from layer l to the output. The reconstruction is the
    difference-corrected target that the noisy output would produce, so minimising it trains
    g_l to carry output differences to layer l (an approximate Gauss-Newton inverse) rather
    than to invert f pointwise.

    Args:
        hidden: h_l; noisy_hidden: h_l + sigma eps;
        feedback_noisy: g_l(f_{L,l}(h_l + sigma eps)) (with graph to g_l's parameters);
        feedback_clean: g_l(f_{L,l}(h_l));
        sigma: the noise standard deviation (> 0).
    """
    if not sigma > 0:
        raise ValueError(f"the difference reconstruction loss needs sigma > 0, got {sigma}")
    reconstruction = hidden.detach() + feedback_noisy - feedback_clean
    return squared_error(reconstruction, noisy_hidden.detach()) / sigma**2
