"""Search spaces: what a study varies, versioned in code and registered per rule and model.

A :class:`SearchSpace` maps *targets* (dotted paths into a :class:`bpdl.train.RunConfig`, such
as ``lr``, ``batch_size``, ``model_options.hidden`` or ``rule_options.eta``) to
:class:`Dimension` objects. It turns into a flat Nevergrad parametrization (one scalar per
searched number, so every proposal stores as a flat JSON dict and reads as one CSV row) and
decodes a proposal back into run-config overrides.

Log scales are used where a quantity spans orders of magnitude (learning rates, batch sizes,
layer widths, channel counts). Variable depth is encoded as in the 2019 study (T19,
docs/algorithms/published_results.md §7.9): a depth dimension plus one width per possible layer,
of which the first ``depth`` are used. :class:`IntList` does exactly this; a list can also take
its length from another list (CNN kernel sizes follow the number of channel entries).

Registering a space for a new rule is a few lines, in the rule's module or here::

    from bpdl.studies.spaces import IntList, LogUniform, SearchSpace, register_space

    register_space(SearchSpace("fa-mlp", {
        "lr": LogUniform(1e-4, 0.05),
        "model_options.hidden": IntList(30, 500, length=(1, 6), log=True),
    }, version=1), rule="fa", model="mlp")

or reuse an existing space for another rule: ``set_default_space("fa", "mlp", "mlp-t19")``.
A rule with no registered space gets :data:`GENERIC` (learning rate and batch size). Changing
what a registered space searches means bumping its ``version``: studies stored with the old
definition then refuse to resume under the new one instead of mixing two searches.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from bpdl.errors import ConfigError
from bpdl.registry import Registry

__all__ = [
    "Dimension", "LogUniform", "Uniform", "IntRange", "Choice", "IntList", "SearchSpace",
    "SPACES", "GENERIC", "MLP_T19", "CNN_T19", "SEGREGATED_T19", "register_space", "set_default_space",
    "default_space", "get_space", "space_from_dict", "space_from_file",
]

#: RunConfig fields a study fixes itself; a space may not search them.
_STUDY_OWNED = {"dataset", "model", "rule", "epochs", "seed", "device", "threads", "test",
                "val_size"}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class Dimension:
    """One searched quantity. Subclasses are frozen dataclasses with a ``kind`` tag."""

    kind: str = ""

    def validate(self, key: str) -> None:
        """ConfigError naming ``key`` if the dimension is empty or contradictory."""

    def flat_parameters(self, key: str, space: SearchSpace) -> dict[str, Any]:
        """Flat Nevergrad parameters (``flat name -> ng.p.Parameter``)."""
        raise NotImplementedError

    def decode(self, key: str, flat: Mapping[str, Any], space: SearchSpace) -> Any:
        """The run-config value of this dimension in the flat proposal ``flat``."""
        return flat[key]

    def to_dict(self) -> dict[str, Any]:
        d = {"kind": self.kind}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            d[f.name] = list(value) if isinstance(value, tuple) else value
        return d


def _check_range(key: str, low: Any, high: Any, *, log: bool, integer: bool) -> None:
    check = _is_int if integer else _is_number
    what = "integers" if integer else "finite numbers"
    if not check(low) or not check(high):
        raise ConfigError(f"search dimension {key!r}: bounds must be {what}, got "
                          f"low={low!r}, high={high!r}")
    if not low < high:
        raise ConfigError(f"search dimension {key!r}: the lower bound {low!r} is not below the "
                          f"upper bound {high!r}; an empty or one-point range searches nothing "
                          f"(fix a value with --set instead)")
    if log and low <= 0:
        raise ConfigError(f"search dimension {key!r}: a log scale needs a positive lower bound, "
                          f"got {low!r}")


def _scalar(low: float, high: float, *, log: bool, integer: bool):
    import nevergrad as ng

    param = ng.p.Log(lower=low, upper=high) if log else ng.p.Scalar(lower=low, upper=high)
    return param.set_integer_casting() if integer else param


@dataclass(frozen=True)
class LogUniform(Dimension):
    """A positive real searched on a log scale, in [low, high] (learning rates, rates)."""

    low: float
    high: float
    kind = "log_uniform"

    def validate(self, key: str) -> None:
        _check_range(key, self.low, self.high, log=True, integer=False)

    def flat_parameters(self, key, space):
        return {key: _scalar(float(self.low), float(self.high), log=True, integer=False)}

    def decode(self, key, flat, space):
        return float(flat[key])


@dataclass(frozen=True)
class Uniform(Dimension):
    """A real number in [low, high] on a linear scale."""

    low: float
    high: float
    kind = "uniform"

    def validate(self, key: str) -> None:
        _check_range(key, self.low, self.high, log=False, integer=False)

    def flat_parameters(self, key, space):
        return {key: _scalar(float(self.low), float(self.high), log=False, integer=False)}

    def decode(self, key, flat, space):
        return float(flat[key])


@dataclass(frozen=True)
class IntRange(Dimension):
    """An integer in [low, high], linear or (``log=True``) log scale (batch sizes, widths)."""

    low: int
    high: int
    log: bool = False
    kind = "int"

    def validate(self, key: str) -> None:
        _check_range(key, self.low, self.high, log=self.log, integer=True)

    def flat_parameters(self, key, space):
        return {key: _scalar(self.low, self.high, log=self.log, integer=True)}

    def decode(self, key, flat, space):
        return int(flat[key])


@dataclass(frozen=True)
class Choice(Dimension):
    """One of a few JSON values (flags, activation names)."""

    options: tuple
    kind = "choice"

    def __post_init__(self) -> None:
        object.__setattr__(self, "options", tuple(self.options))

    def validate(self, key: str) -> None:
        if len(self.options) < 2:
            raise ConfigError(f"search dimension {key!r}: a choice needs at least two options, "
                              f"got {list(self.options)} (fix a value with --set instead)")
        if len({json.dumps(o, sort_keys=True) for o in self.options}) != len(self.options):
            raise ConfigError(f"search dimension {key!r}: repeated options {list(self.options)}")
        for o in self.options:
            try:
                json.dumps(o)
            except TypeError as err:
                raise ConfigError(f"search dimension {key!r}: option {o!r} is not a JSON value"
                                  ) from err

    def flat_parameters(self, key, space):
        import nevergrad as ng

        return {key: ng.p.Choice(list(self.options))}


@dataclass(frozen=True)
class IntList(Dimension):
    """A list of integers in [low, high] (layer widths, channels, kernel sizes).

    ``length`` is either ``(min, max)``, searched as its own integer dimension, or the target
    of another IntList whose length this one follows. Flat names: ``KEY[n]`` for an own
    length and ``KEY[i]`` for entry ``i``; entries past the length are proposed but unused.
    """

    low: int
    high: int
    length: tuple[int, int] | str = (1, 1)
    log: bool = False
    kind = "int_list"

    def __post_init__(self) -> None:
        if isinstance(self.length, list):
            object.__setattr__(self, "length", tuple(self.length))

    def validate(self, key: str) -> None:
        _check_range(key, self.low, self.high, log=self.log, integer=True)
        if isinstance(self.length, str):
            return  # checked against the other dimensions by SearchSpace.validate
        if (not isinstance(self.length, tuple) or len(self.length) != 2
                or not all(_is_int(v) for v in self.length)):
            raise ConfigError(f"search dimension {key!r}: length must be (min, max) integers or "
                              f"the name of another list dimension, got {self.length!r}")
        lo, hi = self.length
        if lo < 1 or lo > hi:
            raise ConfigError(f"search dimension {key!r}: length range {lo}..{hi} is empty "
                              f"(need 1 <= min <= max)")

    def max_length(self, space: SearchSpace) -> int:
        if isinstance(self.length, str):
            return space.dims[self.length].max_length(space)  # type: ignore[attr-defined]
        return int(self.length[1])

    def flat_parameters(self, key, space):
        out = {}
        if not isinstance(self.length, str) and self.length[0] < self.length[1]:
            out[f"{key}[n]"] = _scalar(self.length[0], self.length[1], log=False, integer=True)
        for i in range(self.max_length(space)):
            out[f"{key}[{i}]"] = _scalar(self.low, self.high, log=self.log, integer=True)
        return out

    def current_length(self, key: str, flat: Mapping[str, Any], space: SearchSpace) -> int:
        if isinstance(self.length, str):
            return space.dims[self.length].current_length(  # type: ignore[attr-defined]
                self.length, flat, space)
        if self.length[0] == self.length[1]:
            return int(self.length[0])
        return int(flat[f"{key}[n]"])

    def decode(self, key, flat, space):
        return [int(flat[f"{key}[{i}]"]) for i in range(self.current_length(key, flat, space))]


_DIMENSION_KINDS: dict[str, type[Dimension]] = {
    cls.kind: cls for cls in (LogUniform, Uniform, IntRange, Choice, IntList)}


def _set_path(d: dict[str, Any], path: str, value: Any) -> None:
    parts = path.split(".")
    for part in parts[:-1]:
        d = d.setdefault(part, {})
        if not isinstance(d, dict):
            raise ConfigError(f"cannot set {path!r}: {part!r} is not a group of options")
    d[parts[-1]] = value


def deep_merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``update`` merged in; nested dicts merge, everything else is replaced."""
    out = copy.deepcopy(dict(base))
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def check_target_keys(keys: Sequence[str], rule: str, model: str, where: str) -> None:
    """ConfigError (prefixed by ``where``) for a flat key (``lr``, ``model_options.hidden``)
    that the run config, the model or the rule does not have."""
    from bpdl import nn as bnn
    from bpdl import rules
    from bpdl.train import RunConfig

    run_fields = {f.name for f in dataclasses.fields(RunConfig)}
    model_fields = {f.name for f in dataclasses.fields(bnn.MODELS.get(model).config_cls)}
    rule_cls = rules.get(rule).config_cls
    rule_fields = {f.name for f in dataclasses.fields(rule_cls)} if rule_cls else set()
    for key in keys:
        root, _, rest = key.partition(".")
        if root not in run_fields:
            raise ConfigError(f"{where}: {key!r} is not a run-config field; valid: "
                              f"{', '.join(sorted(run_fields - _STUDY_OWNED))}")
        if root == "model_options" and rest and rest.split(".")[0] not in model_fields:
            raise ConfigError(f"{where}: model {model!r} has no option {rest!r}; valid: "
                              f"{', '.join(sorted(model_fields))}")
        if root == "rule_options" and rest and rest.split(".")[0] not in rule_fields:
            raise ConfigError(f"{where}: rule {rule!r} has no option {rest!r}; valid: "
                              f"{', '.join(sorted(rule_fields)) or 'none'}")


def flatten_paths(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"model_options": {"hidden": [5]}}`` -> ``{"model_options.hidden": [5]}``."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, Mapping) and key in ("model_options", "rule_options",
                                                  "optimizer_options"):
            out.update(flatten_paths(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


@dataclass(frozen=True)
class SearchSpace:
    """A named, versioned set of searched dimensions plus fixed run-config settings.

    Args:
        name: registry name (``mlp-t19``); the study records it with ``version``.
        dims: target path -> :class:`Dimension`. Targets are RunConfig fields (``lr``,
            ``batch_size``, ``optimizer``, ``layer_lrs``, ...) or options of the model, rule
            or optimiser (``model_options.hidden``, ``rule_options.eta``, ...).
        version: bump it whenever the dimensions or ``fixed`` change.
        fixed: run-config settings every trial of this space uses (e.g. the optimiser the
            space's learning-rate range is meant for).
        description: one line for listings and reports.
    """

    name: str
    dims: Mapping[str, Dimension]
    version: int = 1
    fixed: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""

    def validate(self) -> None:
        """ConfigError if the space is empty or contradictory (before any work starts)."""
        if not self.dims:
            raise ConfigError(f"search space {self.name!r} is empty: it has no dimensions, so "
                              f"there is nothing to search; add at least one (e.g. lr)")
        if not _is_int(self.version) or self.version < 1:
            raise ConfigError(f"search space {self.name!r}: version must be an integer >= 1")
        fixed_paths = flatten_paths(self.fixed)
        for key, dim in self.dims.items():
            if not isinstance(dim, Dimension):
                raise ConfigError(f"search space {self.name!r}: {key!r} is not a Dimension "
                                  f"({dim!r})")
            root = key.split(".")[0]
            if not key or root in _STUDY_OWNED or any(not part for part in key.split(".")):
                raise ConfigError(f"search space {self.name!r}: cannot search {key!r}; the study "
                                  f"itself sets {', '.join(sorted(_STUDY_OWNED))}")
            if key in fixed_paths:
                raise ConfigError(f"search space {self.name!r}: {key!r} is both searched and "
                                  f"fixed to {fixed_paths[key]!r}")
            dim.validate(key)
            if isinstance(dim, IntList) and isinstance(dim.length, str):
                seen = [key]
                ref = dim
                while isinstance(ref, IntList) and isinstance(ref.length, str):
                    target = ref.length
                    if target in seen:
                        raise ConfigError(f"search dimension {key!r}: circular length "
                                          f"reference {' -> '.join(seen + [target])}")
                    other = self.dims.get(target)
                    if not isinstance(other, IntList):
                        raise ConfigError(f"search dimension {key!r}: length follows "
                                          f"{target!r}, which is not a list dimension of this "
                                          f"space")
                    seen.append(target)
                    ref = other

    def check_targets(self, rule: str, model: str) -> None:
        """ConfigError for targets that the run config, model or rule does not have."""
        check_target_keys(list(self.dims) + list(flatten_paths(self.fixed)), rule, model,
                          f"search space {self.name!r}")

    def parametrization(self, seed: int | None = None):
        """A fresh flat ``nevergrad.p.Dict``, its random state seeded with ``seed``."""
        import nevergrad as ng
        import numpy as np

        flat: dict[str, Any] = {}
        for key, dim in self.dims.items():
            flat.update(dim.flat_parameters(key, self))
        param = ng.p.Dict(**flat)
        if seed is not None:
            param.random_state = np.random.RandomState(seed)
        return param

    def decode(self, flat: Mapping[str, Any]) -> dict[str, Any]:
        """Run-config overrides (nested dict) of the searched values of a flat proposal
        (``fixed`` is not included)."""
        out: dict[str, Any] = {}
        for key, dim in self.dims.items():
            _set_path(out, key, dim.decode(key, flat, self))
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "description": self.description,
                "fixed": json.loads(json.dumps(self.fixed)),
                "dims": {k: d.to_dict() for k, d in self.dims.items()}}

    def describe(self) -> list[str]:
        """One line per dimension, e.g. ``lr: log_uniform [0.0001, 0.05]``."""
        lines = []
        for key, dim in self.dims.items():
            d = dim.to_dict()
            kind = d.pop("kind")
            lines.append(f"{key}: {kind} " + ", ".join(f"{k}={v}" for k, v in d.items()))
        for key, value in flatten_paths(self.fixed).items():
            lines.append(f"{key} = {value!r} (fixed)")
        return lines


def space_from_dict(d: Mapping[str, Any]) -> SearchSpace:
    """A SearchSpace from its JSON form (:meth:`SearchSpace.to_dict`); ConfigError if malformed.

    ``{"name": "mine", "version": 1, "fixed": {"optimizer": "sgd"}, "dims": {"lr":
    {"kind": "log_uniform", "low": 1e-3, "high": 1.0}}}``
    """
    if not isinstance(d, Mapping):
        raise ConfigError(f"a search space must be a JSON object, got {type(d).__name__}")
    unknown = set(d) - {"name", "version", "fixed", "dims", "description"}
    if unknown:
        raise ConfigError(f"unknown search-space key(s) {sorted(unknown)}; valid: name, version, "
                          f"description, fixed, dims")
    dims_in = d.get("dims")
    if dims_in is None or not isinstance(dims_in, Mapping):
        raise ConfigError("a search space needs \"dims\": an object mapping targets (lr, "
                          "model_options.hidden, ...) to dimensions")
    dims: dict[str, Dimension] = {}
    for key, spec in dims_in.items():
        if not isinstance(spec, Mapping) or spec.get("kind") not in _DIMENSION_KINDS:
            raise ConfigError(f"search dimension {key!r}: needs \"kind\", one of "
                              f"{', '.join(_DIMENSION_KINDS)}; got {spec!r}")
        cls = _DIMENSION_KINDS[spec["kind"]]
        args = {k: v for k, v in spec.items() if k != "kind"}
        valid = {f.name for f in dataclasses.fields(cls)}
        if set(args) - valid:
            raise ConfigError(f"search dimension {key!r} ({spec['kind']}): unknown field(s) "
                              f"{sorted(set(args) - valid)}; valid: {', '.join(sorted(valid))}")
        try:
            dims[key] = cls(**args)
        except TypeError as err:
            raise ConfigError(f"search dimension {key!r}: {err}") from err
    fixed = d.get("fixed") or {}
    if not isinstance(fixed, Mapping):
        raise ConfigError("search space \"fixed\" must be an object of run-config settings")
    space = SearchSpace(str(d.get("name", "custom")), dims, int(d.get("version", 1)),
                        dict(fixed), str(d.get("description", "")))
    space.validate()
    return space


def space_from_file(path: str) -> SearchSpace:
    """Read a JSON search space (see :func:`space_from_dict`)."""
    try:
        with open(path) as f:
            d = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"cannot read the search-space file {path}: {err}") from err
    return space_from_dict(d)


# ---- registry ---------------------------------------------------------------------------------

SPACES: Registry[SearchSpace] = Registry("search space")
#: (rule, model) -> space name; model "*" matches every model of the rule.
_DEFAULTS: dict[tuple[str, str], str] = {}


def register_space(space: SearchSpace, *, rule: str | None = None,
                   model: str | None = None) -> SearchSpace:
    """Register ``space`` by name (validated; a duplicate name is an error) and, given ``rule``
    (and optionally ``model``, default every model), make it that rule's default."""
    space.validate()
    SPACES.add(space.name, space)
    if rule is not None:
        set_default_space(rule, model or "*", space.name)
    return space


def set_default_space(rule: str, model: str, space_name: str) -> None:
    """Use registered space ``space_name`` for studies of ``rule`` on ``model`` ("*": any)."""
    key = (rule.lower(), model.lower())
    if key in _DEFAULTS and _DEFAULTS[key] != space_name:
        raise ValueError(f"rule {rule!r} on model {model!r} already has default search space "
                         f"{_DEFAULTS[key]!r}")
    _DEFAULTS[key] = space_name


def get_space(name: str) -> SearchSpace:
    """The registered space ``name`` (UnknownNameError listing the registered ones)."""
    return SPACES.get(name)


def default_space(rule: str, model: str) -> SearchSpace:
    """The space registered for (rule, model), else for (rule, any model), else GENERIC."""
    for key in ((rule.lower(), model.lower()), (rule.lower(), "*")):
        if key in _DEFAULTS:
            return SPACES.get(_DEFAULTS[key])
    return GENERIC


def defaults() -> dict[tuple[str, str], str]:
    """A copy of the (rule, model) -> space-name table."""
    return dict(_DEFAULTS)


# ---- built-in spaces ---------------------------------------------------------------------------

#: Fallback for rules without a dedicated space: learning rate and batch size only.
GENERIC = register_space(SearchSpace(
    "generic",
    {"lr": LogUniform(1e-4, 1e-1), "batch_size": IntRange(16, 512, log=True)},
    version=1,
    description="fallback for rules without a dedicated space: learning rate and batch size "
                "(log scales), the rule's and model's other settings at their defaults"))

#: T19's backprop MLP space (docs/algorithms/published_results.md §7.9): batch 50-500, Adam lr
#: 1e-4-0.05, 1-6 hidden layers of 30-500 units. PyTorch's default init, as every T19 run
#: actually had (docs/algorithms/pitfalls.md §8.5).
MLP_T19 = register_space(SearchSpace(
    "mlp-t19",
    {"batch_size": IntRange(50, 500, log=True),
     "lr": LogUniform(1e-4, 0.05),
     "model_options.hidden": IntList(30, 500, length=(1, 6), log=True)},
    version=1,
    fixed={"optimizer": "adam", "model_options": {"init": "torch_default"}},
    description="T19 MLP: Adam lr 1e-4..0.05, batch 50..500, 1..6 layers of 30..500 units"),
    rule="bp", model="mlp")

#: T19's backprop CNN space: batch 50-500, Adam lr 1e-4-0.05, 1-5 blocks of 3-64 channels with
#: kernels 2-10 (per block), stride and padding 1-3 (shared). Collapsing geometries are
#: rejected proposals, recorded and told to the optimiser (runner.py).
CNN_T19 = register_space(SearchSpace(
    "cnn-t19",
    {"batch_size": IntRange(50, 500, log=True),
     "lr": LogUniform(1e-4, 0.05),
     "model_options.channels": IntList(3, 64, length=(1, 5), log=True),
     "model_options.kernel_size": IntList(2, 10, length="model_options.channels"),
     "model_options.stride": IntRange(1, 3),
     "model_options.padding": IntRange(1, 3)},
    version=1,
    fixed={"optimizer": "adam", "model_options": {"init": "torch_default"}},
    description="T19 CNN: Adam lr 1e-4..0.05, batch 50..500, 1..5 blocks of 3..64 channels, "
                "kernel 2..10 per block, stride and padding 1..3"),
    rule="bp", model="cnn")

#: The feedback-alignment family on T19's backprop spaces, so that a study of ``fa`` and one of
#: ``bp`` search the same box and compare like with like.
for _rule in ("fa", "dfa", "usf", "brsf", "frsf", "kp", "wm"):
    set_default_space(_rule, "mlp", "mlp-t19")
    set_default_space(_rule, "cnn", "cnn-t19")

#: T19's "comp" space for segregated dendrites (docs/algorithms/published_results.md §7.9): the eleven
#: binary flags of §5.11, phase and test lengths, lambda_max, tau_s, tau_L, g_B, E_E, E_I, one learning
#: rate for every layer (0.01-0.5) and 1-6 hidden layers of 30-500 units. Differences from T19, each
#: deliberate: one example per update (online, so the searched rate is the paper's per-example rate, as
#: T19 ran it); phases from 20 steps, not 2 (bpdl rejects phases shorter than its 20-step averaging
#: window); no dt (bpdl's time step is the paper's) and no g_A (T19 notes its code ignored it; the
#: ``apical_conductance`` flag sets it). Proposals the network rejects (noisy symmetric without symmetric
#: weights, about a quarter of random draws) are recorded as rejected and told to the optimiser; they do
#: not use up the budget.
SEGREGATED_T19 = register_space(SearchSpace(
    "segregated-t19",
    {"model_options.random_phase_lengths": Choice((False, True)),
     "model_options.random_plateaus": Choice((False, True)),
     "model_options.conductances": Choice((False, True)),
     "model_options.broadcast": Choice((False, True)),
     "model_options.spiking_feedback": Choice((False, True)),
     "model_options.spiking_feedforward": Choice((False, True)),
     "model_options.symmetric_weights": Choice((False, True)),
     "model_options.noisy_symmetric": Choice((False, True)),
     "model_options.sparse_feedback": Choice((False, True)),
     "model_options.apical_conductance": Choice((False, True)),
     "model_options.weight_optimization": Choice((False, True)),
     "model_options.forward_steps": IntRange(20, 50),
     "model_options.target_steps": IntRange(20, 50),
     "model_options.test_steps": IntRange(50, 100),
     "model_options.lambda_max": Uniform(0.2, 0.5),
     "model_options.tau_s": Uniform(1.0, 5.0),
     "model_options.tau_L": Uniform(7.0, 13.0),
     "model_options.g_B": Uniform(0.3, 0.9),
     "model_options.E_E": Uniform(5.0, 12.0),
     "model_options.E_I": Uniform(-12.0, -5.0),
     "lr": LogUniform(0.01, 0.5),
     "model_options.hidden": IntList(30, 500, length=(1, 6), log=True)},
    # v2: one example per update as before (v1 ran batch 1), now online in chunks of 32
    # examples per kernel call (rule option online: the same training, bit for bit, ~3x faster)
    version=2,
    fixed={"optimizer": "sgd", "batch_size": 32, "rule_options": {"online": True}},
    description="T19 comp: 11 flags, phases 20..50 and test 50..100 steps, lambda_max, tau_s, "
                "tau_L, g_B, E_E, E_I, SGD lr 0.01..0.5 per example (online: one example per "
                "update, 32 per kernel call), 1..6 layers of 30..500 units"),
    rule="segregated", model="segregated")

#: S18's microcircuit in the steady-state variant (docs/algorithms/microcircuits.md §6.4): the
#: scale of the per-layer forward rates (the rule's defaults times lr_scale: S18 tuned them "by
#: hand", with the inverse-mixing rescaling), the interneurons' rate, the initial and top-down
#: weight scales, the nudging and apical conductances, and 1..3 hidden layers of 100..500.
#: Plain SGD on minibatches of 10 (the rule's run defaults).
MICROCIRCUIT_S18 = register_space(SearchSpace(
    "microcircuit-s18",
    {"rule_options.lr_scale": LogUniform(0.1, 3.0),
     "rule_options.ip_lr": LogUniform(0.01, 0.3),
     "model_options.init_scale": LogUniform(2.0, 16.0),
     "model_options.td_scale": LogUniform(0.3, 3.0),
     "model_options.g_som": Uniform(0.1, 1.0),
     "model_options.g_A": Uniform(0.1, 1.0),
     "model_options.hidden": IntList(100, 500, length=(1, 3), log=True)},
    version=1,
    description="S18 steady state: lr_scale 0.1..3 on the default per-layer rates, W^IP lr "
                "0.01..0.3, init scale 2..16, top-down scale 0.3..3, g_som and g_A 0.1..1, "
                "1..3 layers of 100..500"),
    rule="microcircuit", model="microcircuit")

#: B18's random search for the target-propagation rules (docs/algorithms/target_propagation.md
#: §4.3): forward and inverse Adam learning rates in [1e-5, 3e-4] (B18 does not state the
#: distribution; bpdl samples log-uniformly), beta_2 in {0.99, 0.999} and epsilon in {1e-4,
#: 1e-6, 1e-8} for each of the two Adam instances (searched separately: B18 does not say whether
#: they were shared), the inverse-training noise sigma in [0.01, 0.3] and, for the rules whose
#: first target is a gradient step (tp, dtp; ddtp's output target), alpha in [0.01, 0.2]. The
#: schedule is not searched: fix it per study (``--set rule_options.schedule=alternating``).
_B18_ADAM_BETAS = Choice(([0.9, 0.99], [0.9, 0.999]))
_B18_ADAM_EPS = Choice((1e-4, 1e-6, 1e-8))


def _b18_tp_space(name: str, alpha: bool, description: str) -> SearchSpace:
    dims: dict[str, Dimension] = {
        "lr": LogUniform(1e-5, 3e-4),
        "optimizer_options.betas": _B18_ADAM_BETAS,
        "optimizer_options.eps": _B18_ADAM_EPS,
        "rule_options.inverse_lr": LogUniform(1e-5, 3e-4),
        "rule_options.inverse_optimizer_options.betas": _B18_ADAM_BETAS,
        "rule_options.inverse_optimizer_options.eps": _B18_ADAM_EPS,
        "rule_options.sigma": Uniform(0.01, 0.3)}
    if alpha:
        dims["rule_options.alpha"] = Uniform(0.01, 0.2)
    return SearchSpace(name, dims, version=1,
                       fixed={"optimizer": "adam", "rule_options": {"inverse_optimizer": "adam"}},
                       description=description)


B18_DTP = register_space(_b18_tp_space(
    "b18-dtp", True, "B18 DTP: forward and inverse Adam lr 1e-5..3e-4 (log), beta_2, epsilon, "
                     "sigma 0.01..0.3, alpha 0.01..0.2"), rule="dtp")
B18_TP = register_space(_b18_tp_space(
    "b18-tp", True, "B18 ranges for plain TP: as b18-dtp"), rule="tp")
B18_SDTP = register_space(_b18_tp_space(
    "b18-sdtp", False, "B18 SDTP and AO-SDTP: forward and inverse Adam lr 1e-5..3e-4 (log), "
                       "beta_2, epsilon, sigma 0.01..0.3"), rule="sdtp")
set_default_space("aosdtp", "*", "b18-sdtp")
B18_DDTP = register_space(_b18_tp_space(
    "b18-ddtp", True, "B18's ranges for M20's DDTP-linear: as b18-dtp, alpha the output "
                      "target's step"), rule="ddtp")
#: The same optimiser box for a rule with one Adam instance (bp, fa, dfa), so that a study of a
#: baseline on B18's ranges compares like with like: ``--space b18-adam``.
B18_ADAM = register_space(SearchSpace(
    "b18-adam", {"lr": LogUniform(1e-5, 3e-4), "optimizer_options.betas": _B18_ADAM_BETAS,
                 "optimizer_options.eps": _B18_ADAM_EPS},
    version=1, fixed={"optimizer": "adam"},
    description="B18's Adam ranges for a rule without inverses: lr 1e-5..3e-4 (log), beta_2, "
                "epsilon"))
