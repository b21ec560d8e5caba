"""Segregated dendrites (Guerguiev, Lillicrap & Richards 2017, eLife 6:e22901): the ``segregated``
rule trains a :class:`~bpdl.nn.segregated.SegregatedDendriteNet` by simulating its spiking
dynamics (ALGORITHMS.md section 5).

Each minibatch of B examples is simulated in B *lanes* that share the weights (section 5.16):
every lane runs its example's forward phase and target phase from the state its previous example
left (state carries over, as in the original), then the end-of-phase plasticity of every lane is
summed and written as a pseudo-gradient, ``.grad = -dW / eta``:

    output  dW = eta P_1 sum_b e_b p_b^T,  e = (lam_t - lambda_max s) s' k_D lambda_max
    hidden  dW = eta P_0 sum_b e_b p_b^T,  e = (sigma(A_t) - sigma(A_f)) s' k_B lambda_max

(s = sigma(C_f), s' its derivative, p the mean forward-phase input PSP). Plain SGD with the
per-layer learning rates of the paper (``layer_lrs``: (0.21, 0.21) for 784-500-10) then applies
exactly the original update; with one lane it is the original online algorithm step for step.
Any other optimiser changes the algorithm (ALGORITHMS.md 8.13).

``predict`` runs the test procedure: every test example starts from zero state and runs 250 steps
(``test_steps``); the prediction is the class whose output neurons have the largest mean somatic
potential over the last 220 steps. ``alignment`` reports, per hidden layer, the angle between the
rule's update and the backprop update computed from the same phase averages (section 3.7 item 5).

The simulation runs on the fused kernels of ``bpdl.ops`` (``backend="kernels"``) or the
pure-PyTorch reference of :mod:`bpdl.functional.segregated` (``backend="reference"``); both draw
the same counter-based random numbers.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from bpdl.config import require_positive
from bpdl.errors import ConfigError
from bpdl.functional import segregated as seg
from bpdl.nn.segregated import SegregatedDendriteNet
from bpdl.rules.base import Learner, angle_degrees
from bpdl.rules.registry import RULES

REDUCTIONS = ("sum", "mean")
PHASE_LENGTHS = ("per_lane", "shared")
BACKENDS = ("auto", "kernels", "reference")
DTYPES = {"float32": torch.float32, "float64": torch.float64}
#: Paper learning rates (f_etas, output last) per number of hidden layers (ALGORITHMS.md 5.9).
PAPER_LAYER_LRS: dict[int, tuple[float, ...]] = {
    0: (0.19,),
    1: (0.21, 0.21),
    2: (0.23, 0.23, 0.12),
}
#: Examples between the original's quick tests, after each of which it cleared the state (D3).
QUICK_TEST_INTERVAL = 1000
#: Lanes simulated at once by ``predict`` and ``alignment`` (bounds their memory).
EVAL_CHUNK = 2048


#: Default minibatch (lanes simulated in parallel). Large enough to amortise the per-batch
#: work (weight update, optimiser step) on a CPU, small enough to keep learning per example
#: close to the online algorithm with the rescaled rates of :func:`batch_layer_lrs`.
DEFAULT_BATCH_SIZE = 32
#: Lanes per update up to which the paper's per-example rates are applied unscaled (summed
#: updates), for the hidden layers and the output layer; above, the summed update is scaled
#: by LANES / batch (a fixed total step per update). From the sweep in benchmarks/RESULTS.md
#: (hidden layers tolerate summing at least 64 lanes, the output layer about 6).
HIDDEN_LANES = 64.0
OUTPUT_LANES = 6.0
#: The output layer's lanes in rate mode (``mode="rate"``, steady-state somata, 2 + 2 steps):
#: its per-example step is larger than in spiking mode, so fewer summed lanes fit. Measured on
#: MNIST, 784-500-10, batch 32, 10,000 examples: output rate 0.02 stays at chance, 0.01 reaches
#: 87 % test accuracy, 0.005 81 % (0.21 * 1.5 / 32 = 0.0098).
OUTPUT_LANES_RATE = 1.5


def paper_layer_lrs(n_hidden: int) -> tuple[float, ...]:
    """G17's per-layer learning rates for a network with ``n_hidden`` hidden layers; deeper
    networks repeat the first hidden rate and keep the output rate of the deepest published
    network."""
    if n_hidden in PAPER_LAYER_LRS:
        return PAPER_LAYER_LRS[n_hidden]
    deepest = PAPER_LAYER_LRS[2]
    return (deepest[0],) * n_hidden + (deepest[-1],)


def batch_layer_lrs(n_hidden: int, batch_size: int, mode: str = "spiking"
                    ) -> tuple[float, ...]:
    """Per-layer SGD rates for minibatches of ``batch_size`` lanes with summed updates: the
    paper's rates times min(1, HIDDEN_LANES / B) (hidden layers) and min(1, OUTPUT_LANES / B)
    (output layer).

    Summing B lanes' updates computed with the same (stale) weights multiplies the step by B;
    the output layer's step (eta P_1 k_D lambda_max = 18 per example) already sits near the
    edge where outputs overshoot into saturation (sigma' ~ 0) and stop learning, so it
    tolerates about six summed examples, while the hidden layers (3.6 per example) learn best
    with the plain sum of at least 64 lanes. With one lane the rates are the paper's. In
    ``mode="rate"`` the output layer tolerates about 1.5 summed lanes (OUTPUT_LANES_RATE).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    rates = paper_layer_lrs(n_hidden)
    hidden = min(1.0, HIDDEN_LANES / batch_size)
    output = min(1.0, (OUTPUT_LANES_RATE if mode == "rate" else OUTPUT_LANES) / batch_size)
    return tuple(r * hidden for r in rates[:-1]) + (rates[-1] * output,)


@dataclass(frozen=True)
class SegregatedConfig:
    """Options of the ``segregated`` rule (the network's own options are the model's).

    ``reduction``: the lanes' updates are summed (default; keeps the published per-example
    learning rates meaningful) or averaged. ``phase_lengths``: each lane draws its own random
    phase lengths (default) or one draw per batch. ``backend``: ``kernels`` (fused C++/CUDA),
    ``reference`` (pure PyTorch) or ``auto`` (kernels where compiled for the device).
    ``dtype``: float32 (default) or float64 state and weights. ``seed``: key of the spike
    draws (default: drawn from torch's generator, so it follows the run seed); ``test_seed``
    keys the test procedure's draws. ``feedback_lrs``: learning rates of the feedback weights
    per hidden layer (needed by the model's ``learn_feedback``).
    """

    reduction: str = "sum"
    phase_lengths: str = "per_lane"
    backend: str = "auto"
    dtype: str = "float32"
    seed: int | None = None
    test_seed: int | None = None
    feedback_lrs: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        for name, value, valid in (("reduction", self.reduction, REDUCTIONS),
                                   ("phase_lengths", self.phase_lengths, PHASE_LENGTHS),
                                   ("backend", self.backend, BACKENDS),
                                   ("dtype", self.dtype, tuple(DTYPES))):
            if value not in valid:
                raise ConfigError(f"segregated rule option {name} must be one of "
                                  f"{', '.join(valid)}, got {value!r}")
        for name in ("seed", "test_seed"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or not 0 <= value < 2**62):
                raise ConfigError(f"{name} must be an integer in [0, 2^62), got {value!r}")
        if self.feedback_lrs is not None:
            for i, v in enumerate(self.feedback_lrs):
                require_positive(f"feedback_lrs[{i}]", v)


def kernels_available(device: torch.device) -> bool:
    """Whether the fused segregated-dendrite kernels are compiled for ``device``."""
    from bpdl import ops

    return ops.has_kernel("segregated_train_example", device)


#: Examples per block of cached phase-length draws (one vectorised draw per block).
PLAN_BLOCK = 1 << 14


@RULES.register("segregated")
class SegregatedDendrites(Learner):
    """The segregated-dendrite rule of G17; see the module docstring."""

    name = "segregated"
    config_cls = SegregatedConfig
    supported_models = ("segregated",)

    def __init__(self, model: nn.Module, config: SegregatedConfig | None = None):
        if not isinstance(model, SegregatedDendriteNet):
            raise ConfigError(f"the segregated rule trains the 'segregated' model family, got "
                              f"{type(model).__name__}; use --model segregated")
        super().__init__(model, config or SegregatedConfig())
        cfg: SegregatedConfig = self.config
        net_cfg = model.config
        self.params = model.sim
        if net_cfg.learn_feedback:
            if cfg.feedback_lrs is None or len(cfg.feedback_lrs) != model.n_hidden:
                raise ConfigError(
                    f"learn_feedback needs one feedback learning rate per hidden layer "
                    f"(feedback_lrs with {model.n_hidden} entries, the b_etas of G17), got "
                    f"{cfg.feedback_lrs}")
        elif cfg.feedback_lrs is not None:
            raise ConfigError("feedback_lrs is set but the model's feedback weights are fixed; "
                              "set the model option learn_feedback=true or drop feedback_lrs")
        self.dtype = DTYPES[cfg.dtype]
        if self.dtype != torch.float32:
            model.to(self.dtype)
        gen_seed = int(torch.randint(0, 2**62, (1,)))
        self.seed = cfg.seed if cfg.seed is not None else gen_seed
        self.test_seed = cfg.test_seed if cfg.test_seed is not None else (self.seed + 2) % 2**62
        self.probe_seed = (self.seed + 1) % 2**62
        self.register_buffer("examples_seen", torch.zeros((), dtype=torch.int64))
        self.lanes: seg.LaneState | None = None
        self.last_stats: dict[str, float] = {}

    # ---- options and parameters --------------------------------------------------------------
    @property
    def net(self) -> SegregatedDendriteNet:
        return self.model  # type: ignore[return-value]

    def backend(self, device: torch.device | None = None) -> str:
        """The simulation backend in use on ``device`` (the model's device by default)."""
        device = device or self.net.layers[0].weight.device
        choice = self.config.backend
        if choice == "auto":
            return "kernels" if kernels_available(device) else "reference"
        if choice == "kernels" and not kernels_available(device):
            raise ConfigError(f"backend='kernels' but the fused segregated kernels are not "
                              f"compiled for {device.type}; use backend='reference' or 'auto'")
        return choice

    def parameter_groups(self) -> list[dict[str, Any]]:
        groups = [{"name": f"layers.{m}", "params": [layer.weight, layer.bias]}
                  for m, layer in enumerate(self.net.layers)]
        if self.net.config.learn_feedback:
            for m in range(self.net.n_hidden):
                params = [self.net.feedback[m]]
                if self.net.feedback_bias[m] is not None:
                    params.append(self.net.feedback_bias[m])
                groups.append({"name": f"feedback.{m}", "params": params,
                               "lr": float(self.config.feedback_lrs[m])})
        return groups

    def weight_layers(self) -> OrderedDict[str, Tensor]:
        return OrderedDict((f"layers.{m}", layer.weight) for m, layer in enumerate(self.net.layers))

    @classmethod
    def run_defaults(cls, config: Any) -> dict[str, Any]:
        """Plain SGD with the paper's per-layer rates, rescaled for the batch size
        (:func:`batch_layer_lrs`), and a batch of DEFAULT_BATCH_SIZE lanes; a learning rate or
        an optimiser the caller set applies to every layer instead."""
        out: dict[str, Any] = {"optimizer": "sgd"}
        batch = config.batch_size if config.batch_size is not None else DEFAULT_BATCH_SIZE
        out["batch_size"] = batch
        if config.lr is None and config.optimizer is None:
            model_options = config.model_options or {}
            hidden = model_options.get("hidden", (500,))
            try:
                out["layer_lrs"] = list(batch_layer_lrs(len(hidden), int(batch),
                                                        model_options.get("mode", "spiking")))
            except (ConfigError, TypeError, ValueError):
                pass  # the run config's validation reports the bad value
        return out

    def extra_state_for_config(self) -> dict[str, Any]:
        return {"assumes_optimizer": "sgd (momentum 0, no weight decay), per-layer rates",
                "paper_layer_lrs": list(paper_layer_lrs(self.net.n_hidden)),
                "seed": self.seed}

    def get_extra_state(self) -> dict[str, Any]:
        return {"seed": self.seed, "test_seed": self.test_seed,
                "lanes": None if self.lanes is None else self.lanes.to_dict()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.seed = int(state["seed"])
        self.test_seed = int(state["test_seed"])
        self.probe_seed = (self.seed + 1) % 2**62
        lanes = state.get("lanes")
        # copies: a state dict taken from a live learner must not alias its lanes
        self.lanes = None if lanes is None else seg.LaneState.from_dict(lanes).clone()

    def _apply(self, fn, recurse=True):  # keep the lane state on the module's device
        out = super()._apply(fn, recurse)
        if self.lanes is not None:
            device = self.net.layers[0].weight.device
            d = self.lanes.to_dict()
            moved = {k: ([t.to(device) for t in v] if isinstance(v, list) else v.to(device))
                     for k, v in d.items()}
            self.lanes = seg.LaneState.from_dict(moved)
        return out

    # ---- input checks ---------------------------------------------------------------------------
    def _rates(self, x: Tensor) -> Tensor:
        """Input rates lambda_max * x (B, n_in) after checking x: finite, in [0, 1], right size."""
        if not torch.is_tensor(x) or not x.is_floating_point():
            raise ConfigError("the segregated network takes floating-point images with pixels in "
                              "[0, 1] (spike rates are lambda_max * pixel)")
        flat = x.reshape(x.shape[0], -1)
        n_in = self.params.sizes[0]
        if flat.shape[1] != n_in:
            raise ConfigError(f"inputs have {flat.shape[1]} values per example but the network "
                              f"has {n_in} input neurons")
        if flat.numel():
            lo, hi = torch.aminmax(flat)
            lo, hi = float(lo), float(hi)
            if not (math.isfinite(lo) and math.isfinite(hi)):
                raise ConfigError("inputs contain NaN or infinite values")
            if lo < 0 or hi > 1:
                raise ConfigError(f"inputs must lie in [0, 1] (they set spike rates "
                                  f"lambda_max * pixel); found values in [{lo:.4g}, {hi:.4g}]")
        return flat.to(self.dtype) * self.params.lambda_max

    def _targets(self, y: Tensor) -> Tensor:
        """Teaching signals (B, n_out): 1 for the neurons of each example's class, else 0."""
        classes = self.net.num_classes
        if y.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise ConfigError(f"labels must be integer class indices, got {y.dtype}")
        if y.numel():
            lo, hi = (int(v) for v in torch.aminmax(y))
            if lo < 0 or hi >= classes:
                raise ConfigError(f"labels must lie in [0, {classes - 1}], found [{lo}, {hi}]")
        device = self.net.layers[0].weight.device
        table = self.__dict__.get("_target_table")
        if table is None or table.dtype != self.dtype or table.device != device:
            eye = torch.eye(classes, dtype=self.dtype, device=device)
            table = eye.repeat_interleave(self.params.neurons_per_class, dim=1)
            self.__dict__["_target_table"] = table
        return table[y.to(device=device, dtype=torch.int64)]

    # ---- the phase plan ---------------------------------------------------------------------------
    def phase_plan(self, example: Tensor, seed: int, shared: bool = False
                   ) -> tuple[Tensor, Tensor, list[Tensor] | None]:
        """Phase lengths (B, 2), averaging windows (B, 2) and random plateau offsets (per hidden
        layer (B, 2, n_m)) for examples with global indices ``example`` (B,)."""
        p = self.params
        B = example.shape[0]
        base = torch.tensor([p.forward_steps, p.target_steps], dtype=torch.int64)
        lengths = base.repeat(B, 1)
        key = example.cpu()
        if shared and B:
            key = torch.full_like(key, int(key[0]))
        if p.random_phase_lengths:
            lengths += self._extensions(key, seed)
        windows = p.windows(lengths)
        offsets = None
        if p.random_plateaus:
            offsets = []
            for m in range(p.n_hidden):
                n = p.sizes[m + 1]
                offsets.append(torch.stack(
                    [seg.plateau_offsets(key, m, n, ph, seed, p.plateau_sd, p.plateau_max)
                     for ph in (0, 1)], dim=1))
        device = self.net.layers[0].weight.device
        return (lengths.to(device), windows.to(device),
                None if offsets is None else [o.to(device) for o in offsets])

    def _plan_slices(self, first: int, count: int, seed: int, device: torch.device
                     ) -> tuple[Tensor, Tensor] | None:
        """Phase lengths and windows (count, 2) of the consecutive examples first, first + 1,
        ... as slices of a cached block of PLAN_BLOCK examples (the same values as
        :meth:`phase_plan`, without per-batch work), or None where that shortcut does not apply
        (random plateau times, or the range straddles two blocks)."""
        p = self.params
        block = first // PLAN_BLOCK
        if p.random_plateaus or count <= 0 or (first + count - 1) // PLAN_BLOCK != block:
            return None
        cache = self.__dict__.setdefault("_plan_slices_cache", {})
        key = (seed, block, device)
        hit = cache.get(key)
        if hit is None:
            if len(cache) > 4:
                cache.clear()
            idx = torch.arange(block * PLAN_BLOCK, (block + 1) * PLAN_BLOCK, dtype=torch.int64)
            lengths, windows, _ = self.phase_plan(idx, seed)
            hit = (lengths.to(device), windows.to(device))
            cache[key] = hit
        lo = first - block * PLAN_BLOCK
        return hit[0][lo:lo + count], hit[1][lo:lo + count]

    def _extensions(self, example: Tensor, seed: int) -> Tensor:
        """floor(Wald(2, 1)) extensions (B, 2) of the forward and target phase of each example,
        drawn a block of PLAN_BLOCK examples at a time and cached (the draws are keyed by the
        example index, so caching changes nothing but the cost)."""
        out = torch.empty(example.shape[0], 2, dtype=torch.int64)
        blocks = torch.div(example, PLAN_BLOCK, rounding_mode="floor")
        cache = self.__dict__.setdefault("_plan_cache", {})
        for block in blocks.unique().tolist():
            key = (seed, block)
            if key not in cache:
                if len(cache) > 8:
                    cache.clear()
                idx = torch.arange(block * PLAN_BLOCK, (block + 1) * PLAN_BLOCK)
                cache[key] = torch.stack([seg.wald_extensions(idx, 0, seed),
                                          seg.wald_extensions(idx, 1, seed)], dim=1)
            sel = blocks == block
            out[sel] = cache[key][example[sel] - block * PLAN_BLOCK]
        return out

    # ---- simulation -----------------------------------------------------------------------------
    def _net_tensors(self) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor | None]]:
        net = self.net
        return ([w.detach() for w in net.weights], [b.detach() for b in net.biases],
                [y.detach() for y in net.feedback],
                [None if c is None else c.detach() for c in net.feedback_bias])

    def simulate_example(self, state: seg.LaneState, x_rate: Tensor, target: Tensor,
                         lengths: Tensor, windows: Tensor, offsets: list[Tensor] | None,
                         seed: int, lane_key: Tensor, recorder=None,
                         backend: str | None = None, validated: bool = False
                         ) -> seg.PhaseAverages:
        """Forward and target phase in every lane of ``state`` (advanced in place).
        ``validated``: ``x_rate`` comes from :meth:`_rates` (checked there)."""
        W, b, Y, c = self._net_tensors()
        quirks = self.net.config.compat == "original"
        backend = backend or self.backend(x_rate.device)
        if backend == "kernels" and recorder is None:
            from bpdl import ops
            return ops.segregated_train_example(W, b, Y, c, state, x_rate, target, lengths,
                                                windows, offsets, seed, lane_key, self.params,
                                                original_quirks=quirks,
                                                validate=self._op_validates(validated))
        return seg.simulate_training_example(W, b, Y, c, state, x_rate, target, lengths,
                                             windows, offsets, seed, lane_key, self.params,
                                             recorder=recorder, original_quirks=quirks)

    def test_potentials(self, x_rate: Tensor, seed: int | None = None,
                        backend: str | None = None, validated: bool = False) -> Tensor:
        """Averaged output potentials (B, n_out) of the test procedure, from zero state.
        ``validated``: ``x_rate`` comes from :meth:`_rates` (checked there)."""
        W, b, Y, c = self._net_tensors()
        seed = self.test_seed if seed is None else seed
        quirks = self.net.config.compat == "original"
        backend = backend or self.backend(x_rate.device)
        validate = self._op_validates(validated)
        out = []
        for start in range(0, x_rate.shape[0], EVAL_CHUNK):
            chunk = x_rate[start:start + EVAL_CHUNK]
            keys = torch.arange(start, start + chunk.shape[0], device=chunk.device)
            if backend == "kernels":
                from bpdl import ops
                out.append(ops.segregated_test(W, b, Y, c, chunk, seed, keys, self.params,
                                               original_quirks=quirks, validate=validate))
            else:
                out.append(seg.simulate_test(W, b, Y, c, chunk, seed, keys, self.params,
                                             self.dtype, original_quirks=quirks))
        if not out:
            return x_rate.new_zeros(0, self.params.sizes[-1])
        return torch.cat(out)

    def _op_validates(self, validated: bool) -> bool:
        """Whether the kernels must check their input rates: not when they come from
        :meth:`_rates` (``validated``), whose bound lambda_max is within the kernels' range."""
        from bpdl import ops
        return not (validated and self.params.lambda_max <= ops.MAX_POISSON_MEAN)

    def _lane_keys(self, n: int, device: torch.device) -> Tensor:
        """The lane keys 0 .. n - 1 of the training lanes (cached: they never change)."""
        keys = self.__dict__.get("_lane_key_cache")
        if keys is None or keys.shape[0] < n or keys.device != device:
            keys = torch.arange(max(n, DEFAULT_BATCH_SIZE), dtype=torch.int64, device=device)
            self.__dict__["_lane_key_cache"] = keys
        return keys[:n]

    def _ensure_lanes(self, n: int, device: torch.device) -> seg.LaneState:
        if self.lanes is None or self.lanes.lanes < n:
            fresh = seg.LaneState.zeros(n, self.params, self.dtype, device)
            if self.lanes is not None:
                old = self.lanes
                k = old.lanes
                for dst, src in zip(fresh.tensors(), old.tensors(), strict=True):
                    dst[:k].copy_(src)
            self.lanes = fresh
        return self.lanes if self.lanes.lanes == n else self.lanes.narrow(n)

    def plasticity(self, avg: seg.PhaseAverages, lanes: int, backend: str | None = None
                   ) -> tuple[list[dict[str, Tensor]], list[Tensor]]:
        """Per layer (forward order) the pseudo-gradients {"W", "b"[, "Y", "c"]} of the lanes'
        summed (or averaged) updates, and the per-lane error vectors e_m (B, n_m)."""
        p, net = self.params, self.net
        M = p.n_layers
        div = float(lanes) if self.config.reduction == "mean" else 1.0
        fb_gain = 1.0 if net.config.feedback_derivative == "sigma" else p.lambda_max
        learn_fb = net.config.learn_feedback
        backend = backend or self.backend(avg.C_f[0].device)
        if backend == "kernels":
            from bpdl import ops
            fn = ops.segregated_plasticity
        else:
            fn = seg.plasticity
        grads: list[dict[str, Tensor]] = [{} for _ in range(M)]
        errors: list[Tensor] = [avg.C_f[m] for m in range(M)]
        for m in range(M - 1, -1, -1):
            if m == M - 1:
                kind, a, b_, gain, P = seg.KIND_OUTPUT, avg.lam_t[m], None, p.k_D, p.P_output
            elif net.config.use_backprop:
                # the pre-update weights of the layer above carry its backprop error (D8)
                kind, gain, P = seg.KIND_BACKPROP, p.k_B, p.P_hidden
                a, b_ = errors[m + 1] @ net.weights[m + 1].detach(), None
            else:
                kind, a, b_, gain, P = seg.KIND_HIDDEN, avg.A_t[m], avg.A_f[m], p.k_B, p.P_hidden
            fb = learn_fb and m < M - 1
            e, gW, gb, gY, gc = fn(kind, avg.C_f[m], avg.P_f[m], a, b_, p.lambda_max, gain,
                                   -P / div, A_f=avg.A_f[m] if fb else None,
                                   Q_f=avg.Q_f[m] if fb else None, fb_gain=fb_gain,
                                   fb_scale=-1.0 / div)
            errors[m] = e
            grads[m] = {"W": gW, "b": gb}
            if fb:
                grads[m]["Y"] = gY
                grads[m]["c"] = gc
        return grads, errors

    # ---- the protocol --------------------------------------------------------------------------
    def training_step(self, x: Tensor, y: Tensor) -> dict[str, Any]:
        x_rate = self._rates(x)
        target = self._targets(y)
        B = x_rate.shape[0]
        device = x_rate.device
        state = self._ensure_lanes(B, device)
        first = int(self.examples_seen)
        shared = self.config.phase_lengths == "shared"
        plan = None if shared else self._plan_slices(first, B, self.seed, device)
        if plan is not None:
            (lengths, windows), offsets = plan, None
        else:
            example = torch.arange(first, first + B, dtype=torch.int64)
            lengths, windows, offsets = self.phase_plan(example, self.seed, shared=shared)
        lane_key = self._lane_keys(B, device)
        avg = self.simulate_example(state, x_rate, target, lengths, windows, offsets, self.seed,
                                    lane_key, validated=True)
        grads, _ = self.plasticity(avg, B)
        net = self.net
        for layer, g in zip(net.layers, grads, strict=True):
            layer.weight.grad = g["W"].to(layer.weight.dtype)
            layer.bias.grad = g["b"].to(layer.bias.dtype)
        if net.config.learn_feedback:
            for m, g in enumerate(grads[:-1]):
                net.feedback[m].grad = g["Y"].to(net.feedback[m].dtype)
                if net.feedback_bias[m] is not None:
                    net.feedback_bias[m].grad = g["c"].to(net.feedback_bias[m].dtype)
        loss = seg.output_loss(avg, self.params.lambda_max).mean()
        scores = seg.class_scores(avg.C_f[-1], self.params.neurons_per_class)
        correct = (scores.argmax(1) == y.to(device)).sum()
        self.examples_seen += B
        if net.config.compat == "original":
            # the original cleared every layer (and the input history) after each quick test
            if first // QUICK_TEST_INTERVAL != (first + B) // QUICK_TEST_INTERVAL:
                self.lanes.zero_()
        return {"loss": loss.detach(), "correct": correct}

    def after_step(self) -> None:
        self.net.after_update_(noise_seed=self.seed)

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        x_rate = self._rates(x)
        C_bar = self.test_potentials(x_rate, validated=True)
        return seg.class_scores(C_bar, self.params.neurons_per_class).to(torch.float32)

    # ---- analysis -----------------------------------------------------------------------------
    @torch.no_grad()
    def probe_errors(self, x: Tensor, y: Tensor) -> tuple[seg.PhaseAverages, list[Tensor],
                                                         list[Tensor]]:
        """Simulate training examples on fresh lanes (the training lanes are untouched) and
        return the averages, the rule's errors e_m and the backprop errors computed from the
        same averages: e^BP_out = e_out, e^BP_m = (e^BP_{m+1} W_{m+1}) k_B lambda_max s'."""
        p, net = self.params, self.net
        x_rate = self._rates(x)
        target = self._targets(y)
        B = x_rate.shape[0]
        state = seg.LaneState.zeros(B, p, self.dtype, x_rate.device)
        example = torch.arange(B, dtype=torch.int64)
        lengths, windows, offsets = self.phase_plan(example, self.probe_seed)
        keys = torch.arange(B, dtype=torch.int64, device=x_rate.device)
        avg = self.simulate_example(state, x_rate, target, lengths, windows, offsets,
                                    self.probe_seed, keys)
        _, errors = self.plasticity(avg, B)
        bp = [None] * p.n_layers
        bp[-1] = errors[-1]
        for m in range(p.n_layers - 2, -1, -1):
            s = torch.sigmoid(avg.C_f[m])
            bp[m] = (bp[m + 1] @ net.weights[m + 1].detach()) * (s * (1 - s)) * (
                p.k_B * p.lambda_max)
        return avg, errors, bp

    def alignment(self, x: Tensor, y: Tensor) -> dict[str, dict[str, float]]:
        """Per hidden layer: ``angle_bp``, the angle between the rule's weight update and the
        backprop update over the probe batch (sum_b e_b p_b^T, Frobenius); ``angle_delta``,
        the angle between the (B, n_m) matrices of errors; ``angle_delta_example``, the mean
        over examples of the per-example angle (the quantity of G17's Figure 5)."""
        p = self.params
        if p.n_hidden == 0 or x.shape[0] == 0:
            return {}
        out: dict[str, dict[str, float]] = {}
        n = x.shape[0]
        parts = []
        for start in range(0, n, EVAL_CHUNK):
            parts.append(self.probe_errors(x[start:start + EVAL_CHUNK], y[start:start + EVAL_CHUNK]))
        for m in range(p.n_hidden):
            e_rule = torch.cat([pt[1][m] for pt in parts]).double()
            e_bp = torch.cat([pt[2][m] for pt in parts]).double()
            P_f = torch.cat([pt[0].P_f[m] for pt in parts]).double()
            dw_rule, dw_bp = e_rule.t() @ P_f, e_bp.t() @ P_f
            per_example = [angle_degrees(a, b) for a, b in zip(e_rule, e_bp, strict=True)]
            finite = [a for a in per_example if math.isfinite(a)]
            out[f"layers.{m}"] = {
                "angle_bp": angle_degrees(dw_rule, dw_bp),
                "angle_delta": angle_degrees(e_rule, e_bp),
                "angle_delta_example": (sum(finite) / len(finite)) if finite else float("nan"),
            }
        return out

    @torch.no_grad()
    def record_dynamics(self, x: Tensor, y: Tensor, neurons: int | dict[int, list[int]] = 5,
                        from_training_state: bool = True) -> dict[str, Any]:
        """Simulate one training example (forward and target phase) of ``x[0]`` with the
        reference simulator and record, for the chosen neurons of every layer, the basal (B),
        apical (A) and somatic (C) potentials, the rate and the spike counts at every step, and
        the plateau potentials alpha_f = sigma(A_f), alpha_t = sigma(A_t) of the hidden layers.

        ``neurons``: per layer index the neuron indices, or a number of neurons per layer (the
        first ones). The simulation starts from a copy of the first training lane (or zero state)
        and leaves the training lanes untouched. Returns plain lists (JSON-ready).
        """
        p = self.params
        x_rate = self._rates(x[:1])
        target = self._targets(y[:1])
        device = x_rate.device
        if isinstance(neurons, int):
            count = neurons
            neurons = {m: list(range(min(count, p.sizes[m + 1]))) for m in range(p.n_layers)}
            # the output neurons of the example's label first, then others
            r = p.neurons_per_class
            own = list(range(int(y[0]) * r, int(y[0]) * r + r))
            rest = [j for j in range(p.sizes[-1]) if j not in own]
            neurons[p.n_layers - 1] = (own + rest)[:min(count, p.sizes[-1])]
        if from_training_state and self.lanes is not None:
            state = self.lanes.clone().narrow(1).clone()
        else:
            state = seg.LaneState.zeros(1, p, self.dtype, device)
        example = torch.tensor([int(self.examples_seen)], dtype=torch.int64)
        lengths, windows, offsets = self.phase_plan(example, self.seed)
        trace: dict[str, Any] = {"phase": [], "layers": {
            str(m): {k: [] for k in ("B", "A", "C", "lam", "spikes")} for m in neurons}}

        def recorder(phase: str, t_rel: int, snapshot: list[dict[str, Tensor]]) -> None:
            trace["phase"].append(phase)
            for m, idx in neurons.items():
                for key in ("B", "A", "C", "lam", "spikes"):
                    v = snapshot[m].get(key)
                    values = None if v is None else v[0, idx].double().tolist()
                    trace["layers"][str(m)][key].append(values)

        keys = torch.zeros(1, dtype=torch.int64, device=device)
        avg = self.simulate_example(state, x_rate, target, lengths, windows, offsets,
                                    self.seed, keys, recorder=recorder, backend="reference")
        trace["neurons"] = {str(m): list(idx) for m, idx in neurons.items()}
        trace["label"] = int(y[0])
        trace["lengths"] = lengths[0].tolist()
        trace["windows"] = windows[0].tolist()
        trace["plateaus"] = {
            str(m): {"alpha_f": torch.sigmoid(avg.A_f[m][0, neurons[m]]).tolist(),
                     "alpha_t": torch.sigmoid(avg.A_t[m][0, neurons[m]]).tolist()}
            for m in range(p.n_hidden) if m in neurons}
        trace["output_rates_t"] = avg.lam_t[-1][0].tolist()
        trace["output_C_f"] = avg.C_f[-1][0].tolist()
        return trace
