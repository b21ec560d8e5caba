"""Pure-PyTorch references: every fused op's math and every rule's math, written to be read."""

from bpdl.functional.random import philox4x32_10, philox_uniform
from bpdl.functional.spikes import poisson_from_uniform, poisson_spikes

__all__ = ["philox4x32_10", "philox_uniform", "poisson_from_uniform", "poisson_spikes"]
