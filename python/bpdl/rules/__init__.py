"""Learning rules behind one interface (:class:`Learner`) and one registry.

``get(name)`` returns the rule's Learner class; ``build(name, model, options)`` an instance.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from bpdl.config import from_dict
from bpdl.errors import ConfigError
from bpdl.rules import (
    backprop,  # noqa: F401  (registers "bp")
    feedback_alignment,  # noqa: F401  (fa, dfa, usf, brsf, frsf, kp, wm)
    microcircuit,  # noqa: F401  (registers "microcircuit")
    segregated,  # noqa: F401  (registers "segregated")
    target_propagation,  # noqa: F401  (tp, dtp, sdtp, aosdtp, ddtp)
)
from bpdl.rules.base import Learner, LearnerProtocol, angle_degrees
from bpdl.rules.registry import RULES


def get(name: str) -> type[Learner]:
    """The Learner class registered as ``name``; ConfigError listing valid names otherwise."""
    return RULES.get(name)


def names() -> list[str]:
    """Registered rule names."""
    return RULES.names()


def rule_config(name: str, options: dict[str, Any] | None = None) -> Any:
    """Validated options dataclass of rule ``name``."""
    cls = get(name)
    if cls.config_cls is None:
        if options:
            raise ConfigError(f"rule {name!r} takes no options, got {sorted(options)}")
        return None
    return from_dict(cls.config_cls, options, what=f"{name} rule")


def build(name: str, model: nn.Module, options: dict[str, Any] | Any | None = None,
          model_name: str | None = None) -> Learner:
    """Instantiate rule ``name`` on ``model`` (an options dict or the rule's config dataclass)."""
    cls = get(name)
    if model_name is not None and cls.supported_models is not None \
            and model_name not in cls.supported_models:
        raise ConfigError(
            f"rule {name!r} cannot train model {model_name!r}; it supports: "
            f"{', '.join(cls.supported_models)}"
        )
    cfg = options if dataclasses.is_dataclass(options) else rule_config(name, options)
    return cls(model, cfg)


__all__ = ["Learner", "LearnerProtocol", "RULES", "angle_degrees", "build", "get", "names",
           "rule_config"]
