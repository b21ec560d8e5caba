"""The segregated-dendrite network of Guerguiev, Lillicrap & Richards (2017), "Towards deep
learning with segregated dendrites", eLife 6:e22901 (docs/algorithms/segregated_dendrites.md).

:class:`SegregatedDendriteNet` holds the parameters (forward weights W_m and biases b_m as
``nn.Linear`` layers, feedback weights Y_m and optional feedback biases c_m), G17's
initialisation, and the feedback maintenance (symmetric recomputation, sparse masks). The
dynamics live in :mod:`bpdl.functional.segregated` (reference) and ``bpdl.ops`` (kernels); the
``segregated`` rule (:mod:`bpdl.rules.segregated`) simulates them and trains the network.

Defaults follow docs/algorithms/README.md §0.2: the published experiment as the code cited by the paper
(G-23f) ran it: spiking mode, conductance-based somata, random phase lengths, broadcast
feedback, fixed random feedback, G-23f initialisation, no feedback bias.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from bpdl.config import require_positive
from bpdl.errors import ConfigError
from bpdl.functional import segregated as seg
from bpdl.nn.models import MODELS, ModelSpec

MODES = ("spiking", "rate")
FEEDBACK_BIASES = ("none", "g23f", "ghead")
INIT_VERSIONS = ("g23f", "ghead")
PSP_KERNELS = ("fir10", "full")
FEEDBACK_DERIVATIVES = ("sigma", "lambda_max_sigma")
COMPAT = ("none", "original")


@dataclass(frozen=True)
class SegregatedNetConfig:
    """Options of the segregated-dendrite network (flag names of
    docs/algorithms/segregated_dendrites.md §5.11).

    ``None`` means "the mode's default": spiking mode runs conductance-based somata, random
    phase lengths (50 + floor(Wald(2, 1)) steps), spiking feedforward and feedback, the 10-tap
    PSP kernel, a 20-step averaging window and 250-step tests; ``mode="rate"`` is G-HEAD's
    non-spiking mode (steady-state somata, rates instead of spikes, 2 + 2 steps per training
    example, 2-step tests, window 1).

    Structure: ``hidden`` sizes (any number of hidden layers, 0 gives G17's 784-10 network);
    ``neurons_per_class`` output neurons per label; ``broadcast`` feedback from the output to
    every hidden layer (else from the layer above).

    Feedback weights: fixed random (default), ``symmetric_weights`` (Y recomputed from W after
    every update; ``noisy_symmetric`` adds N(0, 0.05^2) to each factor), ``sparse_feedback``
    (80% zeros, survivors x5), ``learn_feedback`` (Y and c learned, rates in the rule's
    ``feedback_lrs``); ``feedback_bias`` "none" (paper, G-HEAD), "g23f" (c = Y r as G-23f
    always added), "ghead" (G-HEAD's use_feedback_bias). ``use_backprop`` replaces the hidden
    error by the backpropagated one.

    Dynamics: ``apical_conductance`` (g_A = 0.05; or set ``g_A``), ``conductances``,
    ``random_plateaus`` (per-neuron plateau times), ``psp`` "fir10" (the original's truncated
    kernel, 51% of the mass) or "full" (the two-exponential kernel, truncated where its tail is
    below 1e-5 of the mass), ``window`` (steps, or "paper": from 30 steps after the phase start).

    ``compat="original"`` emulates two behaviours of the original code for step-for-step
    comparisons: the training state reset after every quick test (every 1,000 examples) and
    the steady-state soma that drops the apical term (D11).
    """

    hidden: tuple[int, ...] = (500,)
    neurons_per_class: int = 1
    mode: str = "spiking"
    conductances: bool | None = None
    random_phase_lengths: bool | None = None
    random_plateaus: bool = False
    broadcast: bool = True
    spiking_feedforward: bool | None = None
    spiking_feedback: bool | None = None
    symmetric_weights: bool = False
    noisy_symmetric: bool = False
    sparse_feedback: bool = False
    learn_feedback: bool = False
    use_backprop: bool = False
    apical_conductance: bool = False
    weight_optimization: bool = True
    feedback_bias: str = "none"
    init_version: str = "g23f"
    feedback_derivative: str = "sigma"
    psp: str = "fir10"
    forward_steps: int | None = None
    target_steps: int | None = None
    test_steps: int | None = None
    window: int | str | None = None
    test_window: int | None = None
    lambda_max: float = 0.2
    tau_s: float = 3.0
    tau_L: float = 10.0
    g_B: float = 0.6
    g_A: float | None = None
    g_L: float | None = None
    g_D: float | None = None
    E_E: float = 8.0
    E_I: float = -8.0
    plateau_sd: float = 3.0
    plateau_max: int = 5
    noise_sd: float = 0.05
    sparse_fraction: float = 0.8
    sparse_gain: float = 5.0
    compat: str = "none"

    def __post_init__(self) -> None:
        if any(isinstance(h, bool) or not isinstance(h, int) or h <= 0 for h in self.hidden):
            raise ConfigError(f"segregated hidden sizes must be positive integers, got "
                              f"{list(self.hidden)}")
        require_positive("neurons_per_class", self.neurons_per_class, integer=True)
        for name, value, valid in (("mode", self.mode, MODES),
                                   ("feedback_bias", self.feedback_bias, FEEDBACK_BIASES),
                                   ("init_version", self.init_version, INIT_VERSIONS),
                                   ("psp", self.psp, PSP_KERNELS),
                                   ("feedback_derivative", self.feedback_derivative,
                                    FEEDBACK_DERIVATIVES),
                                   ("compat", self.compat, COMPAT)):
            if value not in valid:
                raise ConfigError(f"segregated {name} must be one of {', '.join(valid)}, got "
                                  f"{value!r}")
        for name in ("lambda_max", "tau_s", "tau_L", "g_B", "noise_sd", "sparse_gain"):
            require_positive(name, getattr(self, name))
        for name in ("g_A", "g_L", "g_D"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value) or value < 0):
                raise ConfigError(f"{name} must be a number >= 0, got {value!r}")
        if self.tau_s == self.tau_L:
            raise ConfigError(f"tau_s and tau_L must differ (the PSP kernel divides by "
                              f"tau_L - tau_s), got both {self.tau_s}")
        if not (0 < self.sparse_fraction < 1):
            raise ConfigError(f"sparse_fraction must be in (0, 1), got {self.sparse_fraction}")
        if self.plateau_sd < 0 or not isinstance(self.plateau_max, int) or self.plateau_max < 0:
            raise ConfigError("plateau_sd must be >= 0 and plateau_max an integer >= 0")
        for name in ("forward_steps", "target_steps", "test_steps", "test_window"):
            value = getattr(self, name)
            if value is not None:
                require_positive(name, value, integer=True)
        if self.window is not None and self.window != "paper":
            if isinstance(self.window, str):
                raise ConfigError(f"window must be a number of steps or 'paper', got "
                                  f"{self.window!r}")
            require_positive("window", self.window, integer=True)
        if self.noisy_symmetric and not self.symmetric_weights:
            raise ConfigError("noisy_symmetric needs symmetric_weights=true (it adds noise to the "
                              "symmetric feedback weights)")
        if self.symmetric_weights and self.learn_feedback:
            raise ConfigError("symmetric_weights and learn_feedback exclude each other: symmetric "
                              "feedback is recomputed from W after every update")
        if not self.hidden:
            for flag in ("symmetric_weights", "sparse_feedback", "learn_feedback", "use_backprop",
                         "random_plateaus", "apical_conductance"):
                if getattr(self, flag):
                    raise ConfigError(f"{flag} needs at least one hidden layer (hidden is empty: "
                                      f"the network has no feedback pathway)")
            if self.feedback_bias != "none":
                raise ConfigError("feedback_bias needs at least one hidden layer")
        self.params((784, *self.hidden, 10 * self.neurons_per_class))  # phase/window checks

    # ---- resolution ------------------------------------------------------------------------
    def params(self, sizes: tuple[int, ...]) -> seg.SimParams:
        """The resolved constants and switches for a network of layer sizes ``sizes``."""
        spiking = self.mode == "spiking"

        def pick(value, spiking_default, rate_default):
            if value is not None:
                return value
            return spiking_default if spiking else rate_default

        g_L = self.g_L if self.g_L is not None else 1.0 / self.tau_L
        g_A = self.g_A if self.g_A is not None else (0.05 if self.apical_conductance else 0.0)
        g_D = self.g_D if self.g_D is not None else self.g_B
        if self.psp == "fir10":
            taps = 10 if spiking else 1
        else:  # the two-exponential kernel until its tail is below 1e-5 of the mass
            taps = int(math.ceil(max(self.tau_L, self.tau_s) * math.log(1e5))) + 1
        forward = pick(self.forward_steps, 50, 2)
        target = pick(self.target_steps, 50, 2)
        test = pick(self.test_steps, 250, 2)
        window = self.window if self.window is not None else (20 if spiking else 1)
        if window == "paper":
            window_steps = -30
            if min(forward, target) <= 30:
                raise ConfigError(f"window='paper' averages from 30 steps after the phase start, "
                                  f"so the phases must be longer than 30 steps (forward_steps "
                                  f"{forward}, target_steps {target})")
        else:
            window_steps = int(window)
            if window_steps > min(forward, target):
                raise ConfigError(f"the phases (forward_steps {forward}, target_steps {target}) "
                                  f"are shorter than the averaging window ({window_steps} steps); "
                                  f"lengthen the phases or shorten the window")
        test_window = self.test_window if self.test_window is not None else (
            test - 30 if spiking else 1)
        if test_window > test:
            raise ConfigError(f"test_window ({test_window}) is longer than test_steps ({test}); "
                              f"the test average needs test_window <= test_steps")
        if test_window <= 0:
            raise ConfigError(f"test_steps ({test}) leaves no averaging window (the default "
                              f"window is test_steps - 30); set test_window explicitly")
        apical_soma = g_A > 0
        conductances = pick(self.conductances, True, False)
        return seg.SimParams(
            sizes=tuple(sizes), neurons_per_class=self.neurons_per_class, taps=taps,
            tau_s=float(self.tau_s), tau_L=float(self.tau_L), lambda_max=float(self.lambda_max),
            g_L=float(g_L), g_B=float(self.g_B), g_A=float(g_A), g_D=float(g_D),
            E_E=float(self.E_E), E_I=float(self.E_I), conductances=bool(conductances),
            spiking_feedforward=bool(pick(self.spiking_feedforward, True, False)),
            spiking_feedback=bool(pick(self.spiking_feedback, True, False)),
            broadcast=bool(self.broadcast), apical_soma=apical_soma,
            forward_steps=int(forward), target_steps=int(target),
            random_phase_lengths=bool(pick(self.random_phase_lengths, True, False)),
            window=window_steps, test_steps=int(test), test_window=int(test_window),
            random_plateaus=bool(self.random_plateaus), plateau_sd=float(self.plateau_sd),
            plateau_max=int(self.plateau_max), feedback_bias=self.feedback_bias != "none")


def _uniform(shape, version: str, generator: torch.Generator | None = None) -> Tensor:
    """G-23f draws U(-0.5, 0.5); G-HEAD draws U(-1, 1) (section 5.8)."""
    u = torch.rand(shape, dtype=torch.float64, generator=generator) - 0.5
    return u if version == "g23f" else 2.0 * u


class SegregatedDendriteNet(nn.Module):
    """G17's network: ``layers[m]`` is ``nn.Linear(n_{m-1}, n_m)`` holding W_m (n_m, n_{m-1}) and
    b_m; ``feedback[m]`` holds Y_m (n_m, n_fb) for hidden layer m, ``feedback_bias[m]`` c_m.
    Y and c are buffers, or parameters when ``learn_feedback``.

    ``forward(x)`` is the deterministic mean-field rate network (every spike train replaced by
    its expected PSP, somata at their steady state) and returns per-class scores; the actual
    spiking test procedure is the rule's ``predict``.
    """

    def __init__(self, in_features: int, num_classes: int,
                 config: SegregatedNetConfig | None = None):
        super().__init__()
        self.config = config or SegregatedNetConfig()
        cfg = self.config
        self.num_classes = int(num_classes)
        sizes = (int(in_features), *cfg.hidden, self.num_classes * cfg.neurons_per_class)
        self.sizes = sizes
        self.sim = cfg.params(sizes)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:],
                                                                     strict=True))
        M = len(sizes) - 1
        self.n_hidden = M - 1
        fb_sizes = [sizes[self.sim.feedback_source(m) + 1] for m in range(M - 1)]
        for m in range(M - 1):
            y = torch.zeros(sizes[m + 1], fb_sizes[m])
            c = torch.zeros(sizes[m + 1]) if cfg.feedback_bias != "none" else None
            if cfg.learn_feedback:
                self.register_parameter(f"Y{m}", nn.Parameter(y))
                if c is not None:
                    self.register_parameter(f"c{m}", nn.Parameter(c))
            else:
                self.register_buffer(f"Y{m}", y)
                if c is not None:
                    self.register_buffer(f"c{m}", c)
            if cfg.sparse_feedback:
                self.register_buffer(f"Ymask{m}", torch.ones(sizes[m + 1], fb_sizes[m],
                                                             dtype=torch.bool))
        self.register_buffer("feedback_updates", torch.zeros((), dtype=torch.int64))
        self.reset_parameters()

    # ---- parameters ------------------------------------------------------------------------
    @property
    def feedback(self) -> list[Tensor]:
        return [getattr(self, f"Y{m}") for m in range(self.n_hidden)]

    @property
    def feedback_bias(self) -> list[Tensor | None]:
        return [getattr(self, f"c{m}", None) for m in range(self.n_hidden)]

    @property
    def weights(self) -> list[Tensor]:
        return [layer.weight for layer in self.layers]

    @property
    def biases(self) -> list[Tensor]:
        return [layer.bias for layer in self.layers]

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """G17's initialisation (docs/algorithms/segregated_dendrites.md §5.8), drawn from torch's generator.

        With weight optimisation each layer of fan-in N gets W = W_avg + 3.465 W_sd U and
        b = 0.8 + 3.465e-3 U (U ~ U(-0.5, 0.5) for G-23f, U(-1, 1) for G-HEAD). G-23f's
        broadcast feedback is chained: Y_{M-1} = I, Y_{m-1} = R_{m-1} Y_m with R entries
        3.465 W_sd(n_{m-1}) U; G-HEAD's is W_avg + 3.465 W_sd U of shape (n_{m-1}, n_fb).
        """
        cfg, sizes, M = self.config, self.sizes, len(self.sizes) - 1
        v = cfg.init_version
        lam = cfg.lambda_max
        chain = torch.eye(sizes[-1], dtype=torch.float64)  # G-23f: Y of the output layer
        ys: list[Tensor | None] = [None] * (M - 1)
        cs: list[Tensor | None] = [None] * (M - 1)
        for m in range(M - 1, -1, -1):
            n_out, fan_in = sizes[m + 1], sizes[m]
            if cfg.weight_optimization:
                w_avg, w_sd = seg.init_moments(fan_in, lam)
                W = w_avg + 3.465 * w_sd * _uniform((n_out, fan_in), v, generator)
                b = 0.8 + 3.465 * 0.001 * _uniform((n_out,), v, generator)
            else:
                w_avg, w_sd = 0.0, 1.0
                W = 0.1 * _uniform((n_out, fan_in), v, generator)
                b = 1.0 * _uniform((n_out,), v, generator)
            self.layers[m].weight.copy_(W)
            self.layers[m].bias.copy_(b)
            if m == 0:
                continue
            below = m - 1  # the hidden layer whose feedback is drawn here
            n_below = sizes[m]
            fb_cols = self.feedback[below].shape[1]
            opt = cfg.weight_optimization
            if v == "g23f" and cfg.broadcast and opt:
                R = 3.465 * w_sd * _uniform((n_below, n_out), v, generator)
                chain = R @ chain
                ys[below] = chain.clone()
                r = 3.465 * w_sd * _uniform((sizes[-1],), v, generator)
                cs[below] = ys[below] @ r
            elif opt:
                ys[below] = w_avg + 3.465 * w_sd * _uniform((n_below, fb_cols), v, generator)
                cs[below] = w_avg + 3.465 * w_sd * _uniform((n_below,), v, generator)
            else:
                ys[below] = _uniform((n_below, fb_cols), v, generator)
                cs[below] = _uniform((n_below,), v, generator)
            if cfg.feedback_bias == "ghead":
                cs[below] = (0.8 + 3.465 * 0.001 * _uniform((n_below,), "ghead", generator)
                             if opt else _uniform((n_below,), "ghead", generator))
        for m in range(M - 1):
            self.feedback[m].copy_(ys[m])
            if self.feedback_bias[m] is not None:
                self.feedback_bias[m].copy_(cs[m])
        if cfg.sparse_feedback:
            for m in range(M - 1):
                mask = getattr(self, f"Ymask{m}")
                n = mask.numel()
                drop = torch.randperm(n, generator=generator)[: int(cfg.sparse_fraction * n)]
                mask.fill_(True)
                mask.view(-1)[drop] = False
        if cfg.symmetric_weights:
            self.make_feedback_symmetric_()
        elif cfg.sparse_feedback:
            for m in range(M - 1):
                self.feedback[m].mul_(getattr(self, f"Ymask{m}")).mul_(cfg.sparse_gain)
        self.feedback_updates.zero_()

    @torch.no_grad()
    def make_feedback_symmetric_(self, noise_seed: int | None = None) -> None:
        """Y from the forward weights (section 5.7): broadcast Y_{M-2} = W_{M-1}^T and
        Y_m = W_{m+1}^T Y_{m+1}; layer-wise Y_m = W_{m+1}^T. ``noisy_symmetric`` adds
        N(0, noise_sd^2) to every W^T factor, elementwise (keyed by ``noise_seed`` and the update
        count). Sparse feedback re-applies its mask and gain to the fresh Y."""
        cfg, M = self.config, len(self.sizes) - 1
        count = int(self.feedback_updates)
        seed = 0 if noise_seed is None else int(noise_seed)
        above: Tensor | None = None
        for m in range(M - 2, -1, -1):
            factor = self.layers[m + 1].weight.detach().t().to(torch.float64).clone()
            if cfg.noisy_symmetric:
                n = factor.numel()
                idx = torch.arange((n + 1) // 2, dtype=torch.int64) + ((count * 64 + m) << 32)
                z = seg.philox_normals(idx, 0, seg.NOISE_STREAM, seed).reshape(-1)[:n]
                factor += cfg.noise_sd * z.reshape(factor.shape).to(factor.device)
            y = factor if (not cfg.broadcast or above is None) else factor @ above
            above = y
            if cfg.sparse_feedback:
                y = y * getattr(self, f"Ymask{m}") * cfg.sparse_gain
            self.feedback[m].copy_(y)

    @torch.no_grad()
    def after_update_(self, noise_seed: int | None = None) -> None:
        """Feedback maintenance after a weight update (section 5.4 step 4): recompute symmetric
        feedback, or re-apply the sparse mask to learned feedback (without the x5 again, D5)."""
        cfg = self.config
        self.feedback_updates += 1
        if cfg.symmetric_weights:
            self.make_feedback_symmetric_(noise_seed)
        elif cfg.sparse_feedback and cfg.learn_feedback:
            for m in range(self.n_hidden):
                self.feedback[m].mul_(getattr(self, f"Ymask{m}"))

    # ---- the mean-field network ---------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        """Mean-field rate network: p_0 = kappa_sum lambda_max x (spiking input; lambda_max x for
        rates), hidden h_m = lambda_max sigma(k_B (W_m p_m + b_m)), output C = k_D (W p + b);
        returns per-class mean of C."""
        p = self.sim
        mass = float(p.kappa().sum()) if p.spiking_feedforward else 1.0
        h = x.flatten(1) * (p.lambda_max * mass)
        for m, layer in enumerate(self.layers):
            basal = layer(h)
            if m < len(self.layers) - 1:
                h = p.lambda_max * torch.sigmoid(p.k_B * basal) * mass
            else:
                return seg.class_scores(p.k_D * basal, p.neurons_per_class)
        raise AssertionError("unreachable")


def _build(shape: tuple[int, int, int], classes: int, cfg: SegregatedNetConfig
           ) -> SegregatedDendriteNet:
    return SegregatedDendriteNet(shape[0] * shape[1] * shape[2], classes, cfg)


MODELS.add("segregated", ModelSpec(SegregatedNetConfig, _build))
