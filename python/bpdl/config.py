"""Configuration dataclasses: plain data that pickles (process pools, Ray) and round-trips JSON."""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from typing import Any, TypeVar

from bpdl.errors import ConfigError

C = TypeVar("C")


def _coerce(value: Any, annotation: Any) -> Any:
    """Turn JSON values back into the annotated type (lists into tuples, ints into floats)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if origin is tuple and isinstance(value, (list, tuple)):
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0]) for v in value)
        return tuple(value)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None:
            return None
        for arg in args:
            if arg is type(None):
                continue
            if typing.get_origin(arg) is tuple and isinstance(value, (list, tuple)):
                return _coerce(value, arg)
            if arg is float and isinstance(value, int) and not isinstance(value, bool):
                return float(value)
    return value


def from_dict(cls: type[C], data: dict[str, Any] | None, *, what: str | None = None) -> C:
    """Build dataclass ``cls`` from a dict, refusing unknown keys with the list of valid ones."""
    data = dict(data or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        label = what or cls.__name__
        raise ConfigError(
            f"unknown {label} option(s) {', '.join(map(repr, unknown))}; valid options are: "
            f"{', '.join(sorted(fields))}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {k: _coerce(v, hints.get(k, Any)) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise ConfigError(f"invalid {what or cls.__name__} options {data}: {err}") from err


def to_dict(obj: Any) -> dict[str, Any]:
    """A JSON-ready dict of a dataclass (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(obj)))


def diff(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """Human-readable differences between two nested config dicts: ``key: old -> new``."""
    out: list[str] = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key, "<unset>"), b.get(key, "<unset>")
        name = f"{prefix}{key}"
        if isinstance(va, dict) and isinstance(vb, dict):
            out.extend(diff(va, vb, name + "."))
        elif va != vb:
            out.append(f"{name}: {va!r} -> {vb!r}")
    return out


def require_positive(name: str, value: float, *, integer: bool = False) -> None:
    """Raise ConfigError unless ``value`` is a finite number > 0 (an int if ``integer``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    if integer and not float(value).is_integer():
        raise ConfigError(f"{name} must be a whole number, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{name} must be > 0, got {value!r}")
