"""The dendritic cortical microcircuit of Sacramento, Costa, Bengio & Senn (2018, "S18";
docs/algorithms/microcircuits.md): :class:`MicrocircuitNet` holds the weights (forward W^PP
with learnable thresholds, top-down W^PP_{k,k+1}, interneuron-to-pyramidal W^PI, pyramidal-to-
interneuron W^IP with thresholds), the constants (:class:`~bpdl.functional.microcircuit.
MicroParams`) and the self-predicting initialisation. The dynamics are in
:mod:`bpdl.functional.microcircuit` (reference) and ``bpdl.ops.microcircuit`` (kernels); the
``microcircuit`` rule (:mod:`bpdl.rules.microcircuit`) runs them and trains the network.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
from torch import Tensor, nn

from bpdl.config import require_positive
from bpdl.errors import ConfigError
from bpdl.functional import microcircuit as mc
from bpdl.nn.models import MODELS, ModelSpec

INITS = ("self_predicting", "random")
TD_INITS = ("random", "transposed")

__all__ = ["INITS", "TD_INITS", "MicrocircuitConfig", "MicrocircuitNet"]


#: The simulation constants and their defaults, defined once in MicroParams (the model options
#: of the same names take them as defaults and hand them back in :meth:`MicrocircuitConfig.params`).
_SIM = {f.name: f.default for f in fields(mc.MicroParams) if f.name != "sizes"}


@dataclass(frozen=True)
class MicrocircuitConfig:
    """Options of the microcircuit network (constants: docs/algorithms/microcircuits.md §6.5).

    ``hidden``: pyramidal sizes of the hidden layers (S18's MNIST network: 500, 500; its
    regression student: 50). ``transfer``: ``logistic`` (MNIST) or ``soft_relu``
    (gamma log(1 + e^(beta (u - theta))), the regression task). Conductances ``g_lk``, ``g_B``,
    ``g_A``, ``g_D``, ``g_som`` (output nudging), ``g_som_I`` (interneuron nudging); ``dt``,
    ``tau_w`` (plasticity low-pass), ``tau_in`` (input low-pass) in ms; ``sigma`` (somatic
    noise, Euler-Maruyama: sigma sqrt(dt) xi per step); ``steps`` per presentation.
    ``init``: ``self_predicting`` (S18's MNIST start: W^PI = -W^td and W^IP matching the forward
    weights above) or ``random``; weights uniform on +-``init_scale`` / sqrt(fan_in), top-down
    on +-``td_scale`` / sqrt(fan_in). ``td_init``: ``random`` (the uniform start above) or
    ``transposed``: each top-down matrix starts as the transpose of the forward weights into the
    layer above, scaled to the random start's expected norm,
    W^PP_{k,k+1} = (td_scale / init_scale) sqrt(n_k / n_{k+1}) (W^PP_{k+1,k})^T (a symmetric start:
    the top-down path then carries backprop's error through the hidden-to-hidden weights while
    they stay near their start; docs/algorithms/microcircuits.md §6.6). ``target_rates``: the
    teacher's rates for the wrong and the right class (S18: 0.1, 0.8).
    """

    hidden: tuple[int, ...] = (500, 500)
    transfer: str = _SIM["transfer"]
    gamma: float = _SIM["gamma"]
    beta: float = _SIM["beta"]
    theta: float = _SIM["theta"]
    g_lk: float = _SIM["g_lk"]
    g_B: float = _SIM["g_B"]
    g_A: float = _SIM["g_A"]
    g_D: float = _SIM["g_D"]
    g_som: float = _SIM["g_som"]
    g_som_I: float = _SIM["g_som_I"]
    dt: float = _SIM["dt"]
    tau_w: float = _SIM["tau_w"]
    tau_in: float = _SIM["tau_in"]
    sigma: float = _SIM["sigma"]
    steps: int = 1000
    init: str = "self_predicting"
    init_scale: float = 8.0
    td_scale: float = 1.0
    td_init: str = "random"
    target_rates: tuple[float, float] = (0.1, 0.8)

    def __post_init__(self) -> None:
        if not isinstance(self.hidden, (tuple, list)) or not all(
                isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in self.hidden):
            raise ConfigError(f"hidden must be a list of positive layer sizes, got {self.hidden!r}")
        if len(self.hidden) < 1:
            raise ConfigError("a microcircuit needs at least one hidden layer (its interneurons "
                              "and apical dendrites carry the error)")
        if self.transfer not in mc.TRANSFERS:
            raise ConfigError(f"transfer must be one of {', '.join(mc.TRANSFERS)}, got "
                              f"{self.transfer!r}")
        if self.init not in INITS:
            raise ConfigError(f"init must be one of {', '.join(INITS)}, got {self.init!r}")
        if self.td_init not in TD_INITS:
            raise ConfigError(f"td_init must be one of {', '.join(TD_INITS)}, got "
                              f"{self.td_init!r}")
        for name in ("g_lk", "g_B", "g_D", "dt", "tau_w", "tau_in", "beta", "gamma",
                     "init_scale", "td_scale"):
            require_positive(name, getattr(self, name))
        for name in ("g_A", "g_som", "g_som_I", "sigma"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                    not math.isfinite(value) or value < 0:
                raise ConfigError(f"{name} must be a number >= 0, got {value!r}")
        require_positive("steps", self.steps, integer=True)
        low, high = (tuple(self.target_rates) + (None, None))[:2]
        if len(tuple(self.target_rates)) != 2 or not (0 < low < high < 1):
            raise ConfigError(f"target_rates must be two rates 0 < low < high < 1 (S18: 0.1, "
                              f"0.8), got {self.target_rates!r}")
        if self.transfer == "logistic" and self.dt > 1.0:
            raise ConfigError(f"dt = {self.dt} ms is too coarse for the 1-ms-scale somata; use "
                              f"dt <= 1")

    def params(self, sizes: tuple[int, ...]) -> mc.MicroParams:
        return mc.MicroParams(tuple(sizes), **{name: getattr(self, name) for name in _SIM})


class MicrocircuitNet(nn.Module):
    """Pyramidal neurons and interneurons of S18 (see the module docstring). ``forward`` returns
    the bottom-up (no teacher, no noise) output potentials, whose argmax is the prediction."""

    def __init__(self, in_features: int, num_classes: int,
                 config: MicrocircuitConfig | None = None):
        super().__init__()
        self.config = config or MicrocircuitConfig()
        sizes = (int(in_features), *[int(n) for n in self.config.hidden], int(num_classes))
        self.sizes = sizes
        self.num_classes = num_classes
        self.sim = self.config.params(sizes)
        N = len(sizes) - 1
        self.pp = nn.ModuleList(nn.Linear(sizes[k - 1], sizes[k]) for k in range(1, N + 1))
        self.td = nn.ParameterList(nn.Parameter(torch.empty(sizes[k], sizes[k + 1]))
                                   for k in range(1, N))
        self.pi = nn.ParameterList(nn.Parameter(torch.empty(sizes[k], sizes[k + 1]))
                                   for k in range(1, N))
        self.ip = nn.ModuleList(nn.Linear(sizes[k], sizes[k + 1]) for k in range(1, N))
        self.reset_parameters()

    @property
    def n_hidden(self) -> int:
        return len(self.sizes) - 2

    def weights(self) -> mc.MicroWeights:
        """The weights as the functional code takes them (views of the parameters)."""
        return mc.MicroWeights([m.weight for m in self.pp], [m.bias for m in self.pp],
                               list(self.td), list(self.pi), [m.weight for m in self.ip],
                               [m.bias for m in self.ip])

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Uniform weights on +-init_scale / sqrt(fan_in) (top-down: td_scale, or the scaled
        transpose of the forward weights above with ``td_init="transposed"``), zero thresholds;
        then, by default, :meth:`init_self_predicting`."""
        cfg = self.config

        def uniform(t: Tensor, scale: float) -> None:
            bound = scale / math.sqrt(t.shape[1])
            t.copy_((torch.rand(t.shape, generator=generator, dtype=torch.float64) * 2 - 1)
                    * bound)

        for m in self.pp:
            uniform(m.weight, cfg.init_scale)
            m.bias.zero_()
        for k, t in enumerate(self.td, start=1):
            uniform(t, cfg.td_scale)   # drawn either way, so the other weights do not shift
            if cfg.td_init == "transposed":
                n_k, n_above = t.shape
                t.copy_(self.pp[k].weight.t() * (cfg.td_scale / cfg.init_scale
                                                 * math.sqrt(n_k / n_above)))
        for t in self.pi:
            uniform(t, cfg.td_scale)
        for m in self.ip:
            uniform(m.weight, cfg.init_scale)
            m.bias.zero_()
        if cfg.init == "self_predicting":
            self.init_self_predicting()

    @torch.no_grad()
    def init_self_predicting(self, mode: str = "exact") -> None:
        """Put the network in the self-predicting state (docs/algorithms/microcircuits.md §6.3):
        W^PI_k = -W^PP_{k,k+1} (the top-down input cancels) and W^IP_k = s_k W^PP_{k+1,k},
        b^I_k = s_k b_{k+1}, so that without a teacher the interneurons copy the layer above
        and the apical potentials are zero. ``exact`` (the dynamics' fixed point):
        s_k = g_B (g_lk + g_D) / (g_D (g_lk + g_B + g_A,k+1)). ``paper_literal`` (S18's sweeps,
        bottom-up u = v_B, hidden u = (1 - lambda) v_B + lambda v_A): s_k = 1 below the output
        and 1 - lambda below a hidden layer (whose soma the sweep down leaves at
        (1 - lambda) v_B when v_A = 0)."""
        p = self.sim
        lam = p.g_A / (p.g_lk + p.g_B + p.g_A)
        for k in range(1, p.N):
            if mode == "exact":
                s = p.self_predicting_scale(k)
            else:
                s = 1.0 if k + 1 == p.N else 1.0 - lam
            self.pi[k - 1].copy_(-self.td[k - 1])
            self.ip[k - 1].weight.copy_(s * self.pp[k].weight)
            self.ip[k - 1].bias.copy_(s * self.pp[k].bias)

    def forward(self, x: Tensor, mode: str = "exact") -> Tensor:
        """Bottom-up output potentials: u_k = a_k v_B,k (``exact``, the fixed point of the
        dynamics without a teacher in the self-predicting state) or u_k = v_B,k
        (``paper_literal``, S18's steady-state sweeps)."""
        p = self.sim
        r = x.flatten(1)
        u = r
        for k, layer in enumerate(self.pp, start=1):
            u = (p.basal_factor(k) if mode == "exact" else 1.0) * layer(r)
            r = mc.phi(u, p)
        return u


def _build(shape: tuple[int, int, int], classes: int, cfg: MicrocircuitConfig) -> MicrocircuitNet:
    return MicrocircuitNet(shape[0] * shape[1] * shape[2], classes, cfg)


MODELS.add("microcircuit", ModelSpec(MicrocircuitConfig, _build))
