"""Segregated dendrites (Guerguiev, Lillicrap & Richards 2017, eLife 6:e22901, "G17"): the
``segregated`` rule trains a :class:`~bpdl.nn.segregated.SegregatedDendriteNet` from the phase
averages of its spiking dynamics (docs/algorithms/segregated_dendrites.md).

The network's :class:`~bpdl.nn.segregated_simulator.SegregatedSimulator` runs each minibatch of
B examples in B *lanes* that share the weights (§5.16): every lane runs its example's forward
phase and target phase from the state its previous example left (state carries over, as in the
original). This rule owns the plasticity (§5.7): the end-of-phase updates of every lane are
summed and written as a pseudo-gradient, ``.grad = -dW / eta``:

    output  dW = eta P_1 sum_b e_b p_b^T,  e = (lam_t - lambda_max s) s' k_D lambda_max
    hidden  dW = eta P_0 sum_b e_b p_b^T,  e = (sigma(A_t) - sigma(A_f)) s' k_B lambda_max

(s = sigma(C_f), s' its derivative, p the mean forward-phase input PSP). Plain SGD with the
per-layer learning rates of the paper (``layer_lrs``: (0.21, 0.21) for 784-500-10) then applies
exactly the original update; with one lane it is the original online algorithm step for step.
Any other optimiser changes the algorithm (docs/algorithms/pitfalls.md §8.13).

``predict`` runs the test procedure: every test example starts from zero state and runs 250 steps
(``test_steps``); the prediction is the class whose output neurons have the largest mean somatic
potential over the last 220 steps. ``alignment`` reports, per hidden layer, the angle between the
rule's update and the backprop update computed from the same phase averages
(docs/algorithms/feedback_alignment.md §3.7 item 5).
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
from bpdl.nn.segregated_simulator import BACKENDS, DTYPES, EVAL_CHUNK, SegregatedSimulator
from bpdl.rules.base import Learner, angle_degrees
from bpdl.rules.registry import RULES

REDUCTIONS = ("sum", "mean")
PHASE_LENGTHS = ("per_lane", "shared")
#: Paper learning rates (f_etas, output last) per number of hidden layers
#: (docs/algorithms/segregated_dendrites.md §5.9).
PAPER_LAYER_LRS: dict[int, tuple[float, ...]] = {
    0: (0.19,),
    1: (0.21, 0.21),
    2: (0.23, 0.23, 0.12),
}
#: Examples between the original's quick tests, after each of which it cleared the state (D3).
QUICK_TEST_INTERVAL = 1000
#: SGD options that online training supports (it applies plain SGD inside the kernels).
_PLAIN_SGD = {"momentum": 0, "dampening": 0, "weight_decay": 0, "nesterov": False,
              "maximize": False}


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
    per hidden layer, or one rate for all of them (needed by the model's ``learn_feedback``).

    ``online``: train one example at a time, as G17 and T19 did, with the weights updated by
    plain SGD after every example; the run's batch is then a *chunk* of consecutive examples
    trained inside one fused call (``bpdl.ops.segregated_train_online``), the same run as
    batch 1, bit for bit, without a call per example. Needs ``optimizer="sgd"`` without
    momentum or weight decay; the rates are the paper's per-example ones.
    """

    reduction: str = "sum"
    phase_lengths: str = "per_lane"
    backend: str = "auto"
    dtype: str = "float32"
    seed: int | None = None
    test_seed: int | None = None
    feedback_lrs: tuple[float, ...] | float | None = None
    online: bool = False

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
            if isinstance(self.feedback_lrs, (int, float)) and not isinstance(
                    self.feedback_lrs, bool):
                require_positive("feedback_lrs", self.feedback_lrs)
            elif isinstance(self.feedback_lrs, (list, tuple)) and self.feedback_lrs:
                for i, v in enumerate(self.feedback_lrs):
                    require_positive(f"feedback_lrs[{i}]", v)
            else:
                raise ConfigError(f"feedback_lrs must be a positive number or a list of them "
                                  f"(one per hidden layer), got {self.feedback_lrs!r}")

    def feedback_rates(self, n_hidden: int) -> tuple[float, ...] | None:
        """One feedback learning rate per hidden layer (a single number applies to all)."""
        if self.feedback_lrs is None:
            return None
        if isinstance(self.feedback_lrs, (list, tuple)):
            return tuple(float(v) for v in self.feedback_lrs)
        return (float(self.feedback_lrs),) * n_hidden


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
        feedback_lrs = cfg.feedback_rates(model.n_hidden)
        if model.config.learn_feedback:
            if feedback_lrs is None or len(feedback_lrs) != model.n_hidden:
                raise ConfigError(
                    f"learn_feedback needs one feedback learning rate per hidden layer "
                    f"(feedback_lrs with {model.n_hidden} entries, the b_etas of G17, or one "
                    f"number for all), got {cfg.feedback_lrs}")
        elif cfg.feedback_lrs is not None:
            raise ConfigError("feedback_lrs is set but the model's feedback weights are fixed; "
                              "set the model option learn_feedback=true or drop feedback_lrs")
        self.feedback_lrs = feedback_lrs
        dtype = DTYPES[cfg.dtype]
        if dtype != torch.float32:
            model.to(dtype)
        gen_seed = int(torch.randint(0, 2**62, (1,)))
        self.sim = SegregatedSimulator(model, cfg.seed if cfg.seed is not None else gen_seed,
                                       cfg.test_seed, cfg.backend, dtype)
        self.register_buffer("examples_seen", torch.zeros((), dtype=torch.int64))

    # ---- options and parameters --------------------------------------------------------------
    @property
    def net(self) -> SegregatedDendriteNet:
        return self.model  # type: ignore[return-value]

    # the simulator's seeds, parameters and lanes, as the rule's (what checkpoints and the
    # repeated tests of a reproduction read and set)
    @property
    def params(self):
        return self.sim.params

    @property
    def dtype(self) -> torch.dtype:
        return self.sim.dtype

    @property
    def seed(self) -> int:
        return self.sim.seed

    @property
    def test_seed(self) -> int:
        return self.sim.test_seed

    @test_seed.setter
    def test_seed(self, value: int) -> None:
        self.sim.test_seed = int(value)

    @property
    def lanes(self):
        return self.sim.lanes

    def backend(self, device: torch.device | None = None) -> str:
        """The simulation backend in use on ``device`` (the model's device by default)."""
        return self.sim.backend(device)

    def parameter_groups(self) -> list[dict[str, Any]]:
        groups = [{"name": f"layers.{m}", "params": [layer.weight, layer.bias]}
                  for m, layer in enumerate(self.net.layers)]
        if self.net.config.learn_feedback:
            for m in range(self.net.n_hidden):
                params = [self.net.feedback[m]]
                if self.net.feedback_bias[m] is not None:
                    params.append(self.net.feedback_bias[m])
                groups.append({"name": f"feedback.{m}", "params": params,
                               "lr": float(self.feedback_lrs[m])})
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
        # online training updates after every example: the paper's per-example rates
        online = bool((config.rule_options or {}).get("online", False))
        if config.lr is None and config.optimizer is None:
            model_options = config.model_options or {}
            hidden = model_options.get("hidden", (500,))
            try:
                out["layer_lrs"] = list(batch_layer_lrs(len(hidden), 1 if online else int(batch),
                                                        model_options.get("mode", "spiking")))
            except (ConfigError, TypeError, ValueError):
                pass  # the run config's validation reports the bad value
        return out

    def configure_optimizers(self, cfg: Any) -> dict[str, torch.optim.Optimizer]:
        optimizers = super().configure_optimizers(cfg)
        if self.config.online:
            opt = optimizers["main"]
            bad = {k: v for g in opt.param_groups for k, v in g.items()
                   if k in _PLAIN_SGD and v != _PLAIN_SGD[k]}
            if not isinstance(opt, torch.optim.SGD) or type(opt) is not torch.optim.SGD or bad:
                raise ConfigError(
                    f"the segregated rule's online=true applies plain SGD after every example "
                    f"inside the kernels; it needs --optimizer sgd without momentum, dampening, "
                    f"weight decay or nesterov, got {cfg.optimizer} {bad or ''}".rstrip())
            self._online_optimizer = opt
        return optimizers

    def extra_state_for_config(self) -> dict[str, Any]:
        return {"assumes_optimizer": "sgd (momentum 0, no weight decay), per-layer rates",
                "paper_layer_lrs": list(paper_layer_lrs(self.net.n_hidden)),
                "seed": self.seed}

    def get_extra_state(self) -> dict[str, Any]:
        return self.sim.state()

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.sim.load_state(state)

    def _apply(self, fn, recurse=True):  # keep the lane state on the module's device
        out = super()._apply(fn, recurse)
        self.sim.move_lanes()
        return out

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
        if self.config.online:
            return self._train_online(x, y)
        sim = self.sim
        x_rate = sim.rates(x)
        target = sim.targets(y)
        B = x_rate.shape[0]
        device = x_rate.device
        state = sim.ensure_lanes(B, device)
        first = int(self.examples_seen)
        lengths, windows, offsets = sim.training_plan(
            first, B, self.config.phase_lengths == "shared", device)
        avg = sim.simulate_example(state, x_rate, target, lengths, windows, offsets, sim.seed,
                                   sim.lane_keys(B, device), validated=True)
        grads, _ = self.plasticity(avg, B)
        self._write_grads(grads)
        loss = seg.output_loss(avg, self.params.lambda_max).mean()
        scores = seg.class_scores(avg.C_f[-1], self.params.neurons_per_class)
        correct = (scores.argmax(1) == y.to(device)).sum()
        self.examples_seen += B
        if self.net.config.compat == "original":
            # the original cleared every layer (and the input history) after each quick test
            if first // QUICK_TEST_INTERVAL != (first + B) // QUICK_TEST_INTERVAL:
                sim.lanes.zero_()
        return {"loss": loss.detach(), "correct": correct}

    # ---- online training -------------------------------------------------------------------------
    def _online_rates(self) -> tuple[list[float], list[float]]:
        """The SGD learning rates of every layer's (W, b) and of the learned feedback, read from
        the optimiser that :meth:`configure_optimizers` built (they may be scheduled)."""
        opt = self.__dict__.get("_online_optimizer")
        if opt is None:
            raise ConfigError("online=true takes its learning rates from the SGD optimiser of "
                              "configure_optimizers (the training loop builds it); call "
                              "learner.setup_optimizers(run_config) before training_step")
        rate = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
        net = self.net
        lrs = [rate[id(layer.weight)] for layer in net.layers]
        fb = [rate[id(y)] for y in net.feedback] if net.config.learn_feedback else []
        return lrs, fb

    def _online_settings(self) -> dict[str, Any]:
        """The plasticity and feedback settings of :func:`bpdl.ops.segregated_train_online`."""
        p, cfg = self.params, self.net.config
        M = p.n_layers
        lrs, fb_lrs = self._online_rates()
        masks = []
        if cfg.sparse_feedback and (cfg.symmetric_weights or cfg.learn_feedback):
            masks = [getattr(self.net, f"Ymask{m}") for m in range(M - 1)]
        hidden = seg.KIND_BACKPROP if cfg.use_backprop else seg.KIND_HIDDEN
        return {"kinds": [seg.KIND_OUTPUT if m == M - 1 else hidden for m in range(M)],
                "lrs": lrs, "fb_lrs": fb_lrs,
                "scales": [-(p.P_output if m == M - 1 else p.P_hidden) for m in range(M)],
                "gains": [p.k_D if m == M - 1 else p.k_B for m in range(M)],
                "fb_gain": 1.0 if cfg.feedback_derivative == "sigma" else p.lambda_max,
                "fb_scale": -1.0, "symmetric": cfg.symmetric_weights,
                "sparse_gain": cfg.sparse_gain, "masks": masks}

    def _train_online(self, x: Tensor, y: Tensor) -> dict[str, Any]:
        """The examples of the minibatch one after another in one lane, the weights updated by
        plain SGD after each (batch-1 training); the last example's update is written as
        .grad for the optimiser. Fused in one call where the configuration allows
        (:func:`bpdl.ops.segregated_train_online`), else example by example with the same ops."""
        sim, net = self.sim, self.net
        x_rate, target = sim.rates(x), sim.targets(y)
        K, device = x_rate.shape[0], x_rate.device
        first = int(self.examples_seen)
        # the original's quick tests cleared the state every QUICK_TEST_INTERVAL examples: run
        # the pieces between them separately (all but the last piece train every example)
        cuts = [first, *range((first // QUICK_TEST_INTERVAL + 1) * QUICK_TEST_INTERVAL, first + K,
                              QUICK_TEST_INTERVAL)] if net.config.compat == "original" else [first]
        ends = cuts[1:] + [first + K]
        lam_out, C_out = [], []
        avg = None
        for start, end in zip(cuts, ends, strict=True):
            rows = slice(start - first, end - first)
            avg, lam, C = self._online_piece(x_rate[rows], target[rows], start, device)
            lam_out.append(lam)
            C_out.append(C)
            if end < first + K:  # an inner piece: its last example trains here too
                self._online_last_update(avg)
            if net.config.compat == "original" and end % QUICK_TEST_INTERVAL == 0:
                sim.lanes.zero_()
        grads, _ = self.plasticity(avg, 1)
        self._write_grads(grads)
        self.examples_seen += K
        lam_t, C_f = torch.cat(lam_out), torch.cat(C_out)
        loss = torch.sub(lam_t, torch.sigmoid(C_f), alpha=self.params.lambda_max).square_().mean()
        scores = seg.class_scores(C_f, self.params.neurons_per_class)
        return {"loss": loss.detach(), "correct": (scores.argmax(1) == y.to(device)).sum()}

    def _online_piece(self, x_rate: Tensor, target: Tensor, first: int, device: torch.device):
        sim, net = self.sim, self.net
        K = x_rate.shape[0]
        state = sim.ensure_lanes(1, device)
        lengths, windows, offsets = sim.training_plan(first, K, False, device)
        W, b, Y, c = sim.net_tensors()
        settings = self._online_settings()
        quirks = net.config.compat == "original"
        keys = sim.lane_keys(1, device)
        if sim.backend(device) == "kernels" and not net.config.noisy_symmetric:
            from bpdl import ops

            out = ops.segregated_train_online(
                W, b, Y, c, settings.pop("masks"), state, x_rate, target, lengths, windows,
                offsets, sim.seed, keys, self.params, original_quirks=quirks,
                validate=sim._op_validates(True), **settings)
            net.feedback_updates += K - 1
            return out
        # example by example through the same simulation and plasticity functions
        kernels = sim.backend(device) == "kernels"
        if kernels:
            from bpdl import ops

            simulate, plasticity_fn = ops.segregated_train_example, ops.segregated_plasticity
        else:
            simulate, plasticity_fn = seg.simulate_training_example, seg.plasticity
        return seg.train_online(
            W, b, Y, c, settings.pop("masks"), state, x_rate, target, lengths, windows, offsets,
            sim.seed, keys, self.params, original_quirks=quirks, simulate=simulate,
            plasticity_fn=plasticity_fn,
            after_update=lambda: net.after_update_(noise_seed=sim.seed), **settings)

    def _online_last_update(self, avg: seg.PhaseAverages) -> None:
        """The SGD step of a piece's last example, taken here (not by the optimiser)."""
        s = self._online_settings()
        W, b, Y, c = self.sim.net_tensors()
        seg.online_update(W, b, Y, c, avg, self.params.lambda_max, s["kinds"], s["lrs"],
                          s["scales"], s["gains"], s["fb_lrs"], s["fb_gain"], s["fb_scale"],
                          self._plasticity_fn())
        self.net.after_update_(noise_seed=self.seed)

    def _plasticity_fn(self):
        if self.sim.backend() == "kernels":
            from bpdl import ops

            return ops.segregated_plasticity
        return seg.plasticity

    def _write_grads(self, grads: list[dict[str, Tensor]]) -> None:
        net = self.net
        for layer, g in zip(net.layers, grads, strict=True):
            layer.weight.grad = g["W"].to(layer.weight.dtype)
            layer.bias.grad = g["b"].to(layer.bias.dtype)
        if net.config.learn_feedback:
            for m, g in enumerate(grads[:-1]):
                net.feedback[m].grad = g["Y"].to(net.feedback[m].dtype)
                if net.feedback_bias[m] is not None:
                    net.feedback_bias[m].grad = g["c"].to(net.feedback_bias[m].dtype)

    def after_step(self) -> None:
        self.net.after_update_(noise_seed=self.seed)

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        C_bar = self.sim.test_potentials(self.sim.rates(x), validated=True)
        return seg.class_scores(C_bar, self.params.neurons_per_class).to(torch.float32)

    # ---- analysis -----------------------------------------------------------------------------
    @torch.no_grad()
    def probe_errors(self, x: Tensor, y: Tensor) -> tuple[seg.PhaseAverages, list[Tensor],
                                                         list[Tensor]]:
        """Simulate training examples on fresh lanes (the training lanes are untouched) and
        return the averages, the rule's errors e_m and the backprop errors computed from the
        same averages: e^BP_out = e_out, e^BP_m = (e^BP_{m+1} W_{m+1}) k_B lambda_max s'."""
        p, net = self.params, self.net
        x_rate = self.sim.rates(x)
        avg = self.sim.probe(x_rate, self.sim.targets(y))
        _, errors = self.plasticity(avg, x_rate.shape[0])
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

    def record_dynamics(self, x: Tensor, y: Tensor, neurons: int | dict[int, list[int]] = 5,
                        from_training_state: bool = True) -> dict[str, Any]:
        """Neuron traces of one training example of ``x[0]`` as the next training example would
        run (:meth:`bpdl.nn.segregated_simulator.SegregatedSimulator.record`); what
        ``bpdl plot dynamics`` draws."""
        return self.sim.record(x, y, int(self.examples_seen), neurons, from_training_state)
