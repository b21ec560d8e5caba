"""Pure-PyTorch references: every fused op's math and every rule's math, written to be read."""

from bpdl.functional.feedback import (
    dfa_feedback_matrix,
    dfa_project,
    dfa_scale,
    sign_random_feedback,
    sign_random_magnitude,
    sign_symmetric_feedback,
)
from bpdl.functional.locally_connected import (
    locally_connected2d,
    locally_connected2d_grad_input,
    locally_connected2d_grad_weight,
    locally_connected_output_size,
    same_padding,
)
from bpdl.functional.random import philox4x32_10, philox_uniform
from bpdl.functional.spikes import poisson_from_uniform, poisson_spikes

__all__ = [
    "dfa_feedback_matrix", "dfa_project", "dfa_scale", "locally_connected2d",
    "locally_connected2d_grad_input", "locally_connected2d_grad_weight",
    "locally_connected_output_size", "philox4x32_10", "philox_uniform", "poisson_from_uniform",
    "poisson_spikes", "same_padding", "sign_random_feedback", "sign_random_magnitude",
    "sign_symmetric_feedback",
]
