"""Layers and models: backprop baselines and the networks of the local learning rules."""

from bpdl.nn.init import INITS, init_std, initialise
from bpdl.nn.models import (
    CNN,
    MLP,
    MODELS,
    CNNConfig,
    MLPConfig,
    ModelSpec,
    build_model,
    cnn_geometry,
    model_config,
)
from bpdl.nn.segregated import SegregatedDendriteNet, SegregatedNetConfig

__all__ = [
    "CNN", "CNNConfig", "INITS", "MLP", "MLPConfig", "MODELS", "ModelSpec", "build_model",
    "cnn_geometry", "init_std", "initialise", "model_config", "SegregatedDendriteNet",
    "SegregatedNetConfig",
]
