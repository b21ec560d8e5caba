"""Layers and models: backprop baselines and the networks of the local learning rules."""

from bpdl.nn.feedback import (
    FAConv2d,
    FALinear,
    FALocallyConnected2d,
    FeedbackLayer,
    convert,
    feedback_layers,
    use_backprop,
)
from bpdl.nn.init import INITS, init_std, initialise
from bpdl.nn.locally_connected import LocallyConnected2d
from bpdl.nn.microcircuit import MicrocircuitConfig, MicrocircuitNet
from bpdl.nn.models import (
    CNN,
    MLP,
    MODELS,
    CNNConfig,
    LCNet,
    LCNetConfig,
    MLPConfig,
    ModelSpec,
    build_model,
    cnn_geometry,
    model_config,
)
from bpdl.nn.segregated import SegregatedDendriteNet, SegregatedNetConfig

__all__ = [
    "CNN", "CNNConfig", "FAConv2d", "FALinear", "FALocallyConnected2d", "FeedbackLayer", "INITS",
    "LCNet", "LCNetConfig", "LocallyConnected2d", "MLP", "MLPConfig", "MODELS",
    "MicrocircuitConfig", "MicrocircuitNet", "ModelSpec",
    "SegregatedDendriteNet", "SegregatedNetConfig", "build_model", "cnn_geometry", "convert",
    "feedback_layers", "init_std", "initialise", "model_config", "use_backprop",
]
