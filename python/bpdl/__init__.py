"""bpdl: biologically plausible deep learning in PyTorch.

Learning rules (backprop baselines, feedback alignment, target propagation, segregated
dendrites, dendritic microcircuits) behind one training loop, with their neuron dynamics and
plasticity updates on fused C++/CUDA kernels (``torch.ops.bpdl``), and Nevergrad-driven
hyperparameter robustness studies.
"""

from __future__ import annotations

import torch  # noqa: F401  (must be imported before the extension: _C has no RPATH to torch)

from bpdl._native import load_extension

_C = load_extension()

from bpdl import ops  # noqa: E402,F401  (registers fake and autograd functions)
from bpdl.nn.feedback import convert  # noqa: E402

__version__ = "0.1.0"

__all__ = ["__version__", "convert", "ops"]
