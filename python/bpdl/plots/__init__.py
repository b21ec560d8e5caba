"""Figures from run directories (:mod:`~bpdl.plots.curves`: learning curves, weight dynamics,
alignment, comparisons) and of a trained network's neuron dynamics (:mod:`~bpdl.plots.dynamics`:
recording one presentation from a run's checkpoint, and drawing it). Every function returns a
``matplotlib.figure.Figure`` (no pyplot state) and, given ``out``, writes it as PNG and PDF.
``bpdl plot`` is the command-line front end."""

from bpdl.plots.curves import (
    load_run,
    plot_alignment,
    plot_comparison,
    plot_learning_curves,
    plot_weight_dynamics,
    run_label,
    save_figure,
)

__all__ = ["load_run", "plot_alignment", "plot_comparison", "plot_learning_curves",
           "plot_weight_dynamics", "run_label", "save_figure"]
