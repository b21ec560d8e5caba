"""The registry of learning rules: ``bpdl.rules.get("fa")``; unknown names list the valid ones."""

from __future__ import annotations

from bpdl.registry import Registry

RULES: Registry[type] = Registry("rule")
