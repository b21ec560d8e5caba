"""Dendritic cortical microcircuits (Sacramento, Costa, Bengio & Senn 2018, "S18"): the
``microcircuit`` rule trains a :class:`~bpdl.nn.microcircuit.MicrocircuitNet`
(docs/algorithms/microcircuits.md).

Errors are apical mismatches and every weight learns from local quantities (S18 Eqs. 7-9):
the forward weights from phi(u) - phi(v_hat_B) of their own neuron, the interneuron weights from
the interneuron's mismatch, W^PI from the apical potential. The rule writes each weight change
per unit learning rate as a pseudo-gradient (``.grad = -dW / eta``) and an optimiser (plain SGD
with a rate per connection family, the rule's run defaults) takes the step.

``dynamics="steady_state"`` (default; S18 §3.4, the MNIST experiment): every minibatch is
presented at the noiseless fixed point of the dynamics (:func:`bpdl.functional.microcircuit.
steady_state`, ``steady_state="exact"`` or ``"paper_literal"``), and the changes are averaged
over the minibatch. ``dynamics="full"``: every example of the minibatch is a lane simulated for
``steps`` Euler-Maruyama steps of the full dynamics with continuous, low-pass filtered
plasticity (weights shared by the lanes, one trace per weight matrix), on the fused
``bpdl::microcircuit_run`` kernels; the weights move at every step inside the kernel and the
last step's change is the optimiser's (so plain SGD is required). Lanes keep their state from
one example to the next, and the traces persist, as in S18's continuous presentation.

``pretrain_examples`` > 0 starts with the self-predicting pre-training of S18: that many
training examples without a teacher, only W^IP and W^PI plastic.
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
from bpdl.functional import microcircuit as mc
from bpdl.nn.microcircuit import MicrocircuitNet
from bpdl.rules.base import Learner, angle_degrees
from bpdl.rules.registry import RULES

DYNAMICS = ("steady_state", "full")
STEADY_STATES = ("exact", "paper_literal")
FAMILIES = ("W", "b", "W_ip", "b_ip", "W_pi")
BACKENDS = ("auto", "kernels", "reference")
_PLAIN_SGD = {"momentum": 0, "dampening": 0, "weight_decay": 0, "nesterov": False,
              "maximize": False}
#: Default learning rates: forward weights per layer (input side first; S18 scales them by the
#: inverse of the mixing factor, larger below) and the interneuron weights; tuned on MNIST's
#: validation split (benchmarks/RESULTS.md).
DEFAULT_LRS = {"forward": (8.0, 2.0, 0.06), "W_ip": 0.12, "W_pi": 0.02}


def full_rate_factor(steps: int, dt: float, batch: int) -> float:
    """The full dynamics' default rates are the steady state's times this factor (docs/
    algorithms/microcircuits.md §6.6): a presentation of ``steps * dt`` ms moves a weight by
    about eta * steps * dt * (sum of the lanes' induction terms), a steady-state minibatch by lr
    * (their mean), so eta = lr / (steps * dt * batch) gives the same change per minibatch."""
    return 1.0 / (steps * dt * batch)


@dataclass(frozen=True)
class MicrocircuitRuleConfig:
    """Options of the ``microcircuit`` rule (the network's constants are the model's).

    ``dynamics``: ``steady_state`` or ``full``. ``steady_state``: ``exact`` (the fixed point of the
    dynamics) or ``paper_literal`` (S18's convex mixing). ``sweeps``: rounds up and down the layers per
    steady state (1 is S18's procedure; more converge to the fixed point). ``plastic``: which weight
    families learn (of W, b, W_ip, b_ip, W_pi; S18's MNIST run keeps the top-down weights and W^PI
    fixed). ``fixed_layers``: forward layers (1 = input to first hidden) kept fixed (S18's variant with
    fixed hidden-to-hidden weights: [2]). ``ip_lr``, ``pi_lr``: learning rates of W^IP and W^PI (the
    forward rates are the run's ``lr`` / ``layer_lrs``; default DEFAULT_LRS, under the full
    dynamics times :func:`full_rate_factor`, since there a rate is per ms: W += dt eta T at
    every step). ``pretrain_examples``: self-predicting
    pre-training (no teacher, only W^IP and W^PI plastic) on the first that many training examples.
    ``lr_scale`` multiplies the default forward rates (studies search it; see
    :meth:`Microcircuit.run_defaults`). ``backend``, ``seed``: of the full dynamics (kernels or the
    PyTorch reference; the noise's Philox key, default from the run seed).
    """

    dynamics: str = "steady_state"
    steady_state: str = "exact"
    sweeps: int = 1
    plastic: tuple[str, ...] = ("W", "b", "W_ip", "b_ip")
    fixed_layers: tuple[int, ...] = ()
    ip_lr: float | tuple[float, ...] | None = None
    pi_lr: float | tuple[float, ...] | None = None
    pretrain_examples: int = 0
    lr_scale: float = 1.0
    backend: str = "auto"
    seed: int | None = None

    def __post_init__(self) -> None:
        for name, value, valid in (("dynamics", self.dynamics, DYNAMICS),
                                   ("steady_state", self.steady_state, STEADY_STATES),
                                   ("backend", self.backend, BACKENDS)):
            if value not in valid:
                raise ConfigError(f"microcircuit rule option {name} must be one of "
                                  f"{', '.join(valid)}, got {value!r}")
        unknown = sorted(set(self.plastic) - set(FAMILIES))
        if unknown:
            raise ConfigError(f"plastic may name {', '.join(FAMILIES)}; unknown: {unknown}")
        require_positive("sweeps", self.sweeps, integer=True)
        require_positive("lr_scale", self.lr_scale)
        for name in ("ip_lr", "pi_lr"):
            value = getattr(self, name)
            if value is None:
                continue
            for v in (value if isinstance(value, (tuple, list)) else (value,)):
                require_positive(name, v)
        if isinstance(self.pretrain_examples, bool) or not isinstance(self.pretrain_examples, int) \
                or self.pretrain_examples < 0:
            raise ConfigError(f"pretrain_examples must be an integer >= 0, got "
                              f"{self.pretrain_examples!r}")
        if self.seed is not None and not (isinstance(self.seed, int) and 0 <= self.seed < 2**62):
            raise ConfigError(f"seed must be an integer in [0, 2^62), got {self.seed!r}")


def _model_defaults() -> dict[str, Any]:
    from bpdl.nn.microcircuit import MicrocircuitConfig

    d = MicrocircuitConfig()
    return {"steps": d.steps, "dt": d.dt}


def _per_layer(value: float | tuple[float, ...], k: int, name: str, hidden: int) -> float:
    """Hidden layer k's rate of an option given as one rate or one per hidden layer."""
    if not isinstance(value, (tuple, list)):
        return float(value)
    if len(value) != hidden:
        raise ConfigError(f"{name} has {len(value)} rates but the network has {hidden} hidden "
                          f"layer(s); give one rate, or one per hidden layer")
    return float(value[k - 1])


@RULES.register("microcircuit")
class Microcircuit(Learner):
    """S18's dendritic cortical microcircuits; see the module docstring."""

    name = "microcircuit"
    config_cls = MicrocircuitRuleConfig
    supported_models = ("microcircuit",)

    def __init__(self, model: nn.Module, config: MicrocircuitRuleConfig | None = None):
        if not isinstance(model, MicrocircuitNet):
            raise ConfigError(f"the microcircuit rule trains the 'microcircuit' model family, "
                              f"got {type(model).__name__}; use --model microcircuit")
        super().__init__(model, config or MicrocircuitRuleConfig())
        cfg = self.config
        N = model.sim.N
        bad = [k for k in cfg.fixed_layers if not (isinstance(k, int) and 1 <= k <= N)]
        if bad:
            raise ConfigError(f"fixed_layers are forward layers 1..{N} (1: input to the first "
                              f"hidden layer), got {list(cfg.fixed_layers)}")
        self.seed = cfg.seed if cfg.seed is not None else int(torch.randint(0, 2**62, (1,)))
        self.register_buffer("examples_seen", torch.zeros((), dtype=torch.int64))
        self._optimizer: torch.optim.Optimizer | None = None
        self.lanes: mc.MicroState | None = None
        self.traces: dict[str, list[Tensor | None]] | None = None
        c = model.config
        self._rate_factor = full_rate_factor(c.steps, c.dt, 10) if cfg.dynamics == "full" else 1.0

    @property
    def net(self) -> MicrocircuitNet:
        return self.model  # type: ignore[return-value]

    @property
    def params(self) -> mc.MicroParams:
        return self.net.sim

    # ---- parameters ------------------------------------------------------------------------
    def parameter_groups(self) -> list[dict[str, Any]]:
        """The forward layers first (``lr`` / ``layer_lrs`` apply to them), then the interneuron
        weights at ``ip_lr`` and ``pi_lr``; the top-down weights are never trained."""
        net, cfg = self.net, self.config
        ip_lr = cfg.ip_lr if cfg.ip_lr is not None else DEFAULT_LRS["W_ip"] * self._rate_factor
        pi_lr = cfg.pi_lr if cfg.pi_lr is not None else DEFAULT_LRS["W_pi"] * self._rate_factor
        groups = [{"name": f"pp.{k}", "params": [layer.weight, layer.bias]}
                  for k, layer in enumerate(net.pp, start=1)]
        for k, layer in enumerate(net.ip, start=1):
            groups.append({"name": f"ip.{k}", "params": [layer.weight, layer.bias],
                           "lr": _per_layer(ip_lr, k, "ip_lr", net.n_hidden)})
        for k, w in enumerate(net.pi, start=1):
            groups.append({"name": f"pi.{k}", "params": [w],
                           "lr": _per_layer(pi_lr, k, "pi_lr", net.n_hidden)})
        return groups

    def weight_layers(self) -> OrderedDict[str, Tensor]:
        net = self.net
        out = OrderedDict((f"pp.{k}", layer.weight) for k, layer in enumerate(net.pp, start=1))
        for k, layer in enumerate(net.ip, start=1):
            out[f"ip.{k}"] = layer.weight
        return out

    @classmethod
    def run_defaults(cls, config: Any) -> dict[str, Any]:
        """Plain SGD on minibatches of 10 (S18 §3.4) with the per-layer forward rates of
        DEFAULT_LRS (the network's depth picks them; the last ones for shallower networks, the
        first repeated for deeper ones) times the rule option ``lr_scale``; a learning rate the
        caller gives applies to every forward layer instead."""
        out: dict[str, Any] = {"optimizer": "sgd", "batch_size": 10}
        if config.lr is None and config.layer_lrs is None and config.optimizer in (None, "sgd"):
            hidden = (config.model_options or {}).get("hidden", (500, 500))
            scale = (config.rule_options or {}).get("lr_scale", 1.0)
            if isinstance(scale, bool) or not isinstance(scale, (int, float)) or \
                    not math.isfinite(scale) or scale <= 0:
                raise ConfigError(f"lr_scale must be a positive number, got {scale!r}")
            if (config.rule_options or {}).get("dynamics") == "full":
                m = {**_model_defaults(), **(config.model_options or {})}
                scale *= full_rate_factor(m["steps"], m["dt"], config.batch_size or 10)
            rates = DEFAULT_LRS["forward"]
            n = len(hidden) + 1
            out["layer_lrs"] = [scale * rates[max(0, len(rates) - n + i)] for i in range(n)]
        return out

    def configure_optimizers(self, cfg: Any) -> dict[str, torch.optim.Optimizer]:
        if self.config.dynamics == "full":  # the default W^IP, W^PI rates for this batch size
            c = self.net.config
            self._rate_factor = full_rate_factor(c.steps, c.dt, cfg.batch_size or 10)
        optimizers = super().configure_optimizers(cfg)
        opt = optimizers["main"]
        if self.config.dynamics == "full":
            bad = {k: v for g in opt.param_groups for k, v in g.items()
                   if k in _PLAIN_SGD and v != _PLAIN_SGD[k]}
            if type(opt) is not torch.optim.SGD or bad:
                raise ConfigError("dynamics=full consolidates the filtered plasticity at every "
                                  "time step inside the kernels (plain SGD); use --optimizer sgd "
                                  "without momentum or weight decay")
        self._optimizer = opt
        return optimizers

    def extra_state_for_config(self) -> dict[str, Any]:
        return {"dynamics": self.config.dynamics, "steady_state": self.config.steady_state,
                "seed": self.seed, "constants": {k: getattr(self.params, k) for k in (
                    "g_lk", "g_B", "g_A", "g_D", "g_som", "g_som_I", "dt", "tau_w", "sigma")}}

    def get_extra_state(self) -> dict[str, Any]:
        return {"seed": self.seed,
                "lanes": None if self.lanes is None else [t.clone() for t in self.lanes.tensors()],
                "traces": None if self.traces is None else {
                    k: [None if t is None else t.clone() for t in v]
                    for k, v in self.traces.items()}}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.seed = int(state["seed"])
        lanes = state.get("lanes")
        if lanes is None:
            self.lanes = None
        else:
            N = self.params.N
            self.lanes = mc.MicroState([t.clone() for t in lanes[:N]],
                                       [t.clone() for t in lanes[N:2 * N - 1]], lanes[-1].clone())
        traces = state.get("traces")
        self.traces = None if traces is None else {
            k: [None if t is None else t.clone() for t in v] for k, v in traces.items()}

    def _apply(self, fn, recurse=True):  # keep lanes and traces with the weights
        out = super()._apply(fn, recurse)
        if self.lanes is not None:
            self.lanes = mc.MicroState([fn(t) for t in self.lanes.u],
                                       [fn(t) for t in self.lanes.u_I], fn(self.lanes.r0))
        if self.traces is not None:
            self.traces = {k: [None if t is None else fn(t) for t in v]
                           for k, v in self.traces.items()}
        return out

    # ---- inputs and targets -----------------------------------------------------------------
    def _inputs(self, x: Tensor) -> Tensor:
        if not torch.is_tensor(x) or not x.is_floating_point():
            raise ConfigError("the microcircuit takes floating-point inputs (rates in [0, 1])")
        flat = x.reshape(x.shape[0], -1)
        if flat.shape[1] != self.params.sizes[0]:
            raise ConfigError(f"inputs have {flat.shape[1]} values per example but the network "
                              f"has {self.params.sizes[0]} input neurons")
        return flat.to(self.net.pp[0].weight.dtype)

    def target_potentials(self, y: Tensor) -> Tensor:
        """u_trgt: the logit of the teacher's rate, high for the label, low elsewhere."""
        if self.net.config.transfer != "logistic":
            raise ConfigError("classification targets need the logistic transfer (S18's MNIST "
                              "set-up); the soft rectifier is for regression (present() with "
                              "target potentials, as sacramento2018_regression does)")
        low, high = self.net.config.target_rates
        classes = self.params.sizes[-1]
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= classes):
            raise ConfigError(f"labels must lie in [0, {classes - 1}]")
        rates = torch.full((y.shape[0], classes), low, dtype=self.net.pp[0].weight.dtype,
                           device=y.device)
        rates[torch.arange(y.shape[0], device=y.device), y] = high
        return torch.logit(rates)

    def _pretraining(self) -> bool:
        return int(self.examples_seen) < self.config.pretrain_examples

    def _plastic(self, pretraining: bool) -> set[str]:
        return {"W_ip", "b_ip", "W_pi"} if pretraining else set(self.config.plastic)

    # ---- the protocol --------------------------------------------------------------------------
    def present(self, x: Tensor, u_trgt: Tensor | None) -> Tensor:
        """Present the minibatch ``x`` with output target potentials ``u_trgt`` (None: no
        teacher) and write the plasticity as pseudo-gradients (the optimiser's step applies
        them); during the self-predicting pre-training the teacher is off and only the
        interneuron weights learn. Returns the output potentials the presentation ended in."""
        x = self._inputs(x)
        pretraining = self._pretraining()
        if pretraining:
            u_trgt = None
        elif u_trgt is not None and tuple(u_trgt.shape) != (x.shape[0], self.params.sizes[-1]):
            want = (x.shape[0], self.params.sizes[-1])
            raise ConfigError(f"target potentials must have shape {want}, got "
                              f"{tuple(u_trgt.shape)}")
        if self.config.dynamics == "full":
            u_out = self._train_full(x, u_trgt, self._plastic(pretraining))
        else:
            u_out = self._train_steady(x, u_trgt, self._plastic(pretraining))
        self.examples_seen += x.shape[0]
        return u_out

    def training_step(self, x: Tensor, y: Tensor) -> dict[str, Any]:
        x = self._inputs(x)
        u_out = self.present(x, self.target_potentials(y.to(x.device)))
        with torch.no_grad():
            bottom_up = self.predict(x)
            target = torch.sigmoid(self.target_potentials(y.to(x.device)))
            loss = (mc.phi(bottom_up, self.params) - target).square().sum(1).mean()
        stats = {"loss": loss, "correct": (bottom_up.argmax(1) == y.to(x.device)).sum()}
        if u_out is not None:
            stats["output_nudge"] = (u_out - bottom_up).abs().mean()
        return stats

    @torch.no_grad()
    def _train_steady(self, x: Tensor, u_trgt: Tensor | None, plastic: set[str]) -> Tensor:
        cfg = self.config
        w = self.net.weights()
        s = mc.steady_state(w, x, u_trgt, self.params, cfg.steady_state, cfg.sweeps)
        updates = mc.steady_state_updates(s, self.params, cfg.steady_state)
        self._write_grads(updates, plastic)
        return s.u[-1]

    def _write_grads(self, updates: dict[str, list[Tensor]], plastic: set[str]) -> None:
        named = self.net.weights().named()
        fixed = set(self.config.fixed_layers)
        for family, tensors in named.items():
            for i, param in enumerate(tensors):
                learn = family in plastic and family in updates and i < len(updates[family])
                if family in ("W", "b") and (i + 1) in fixed:
                    learn = False
                param.grad = -updates[family][i].to(param.dtype) if learn else None

    def _train_full(self, x: Tensor, u_trgt: Tensor | None, plastic: set[str]) -> Tensor:
        from bpdl.nn.microcircuit_simulator import run_presentation

        return run_presentation(self, x, u_trgt, plastic)

    def record_dynamics(self, x: Tensor, y: Tensor, neurons: int = 4) -> dict[str, Any]:
        """One lane's potentials over a free and a nudged presentation of ``x[0]``
        (:func:`bpdl.nn.microcircuit_simulator.record_presentation`; ``bpdl plot dynamics``)."""
        from bpdl.nn.microcircuit_simulator import record_presentation

        return record_presentation(self, x, y, neurons)

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        """Bottom-up output potentials (no teacher, no noise): the neuron with the highest rate
        is the prediction."""
        return self.net(self._inputs(x), self._forward_mode)

    @property
    def _forward_mode(self) -> str:
        """The bottom-up state predictions read: attenuated (exact, the full dynamics) or the
        paper's u = v_B."""
        return "paper_literal" if self.config.dynamics == "steady_state" and \
            self.config.steady_state == "paper_literal" else "exact"

    def loss(self, scores: Tensor, y: Tensor) -> Tensor:
        target = torch.sigmoid(self.target_potentials(y))
        return (mc.phi(scores, self.params) - target).square().sum(1).mean()

    # ---- analysis ---------------------------------------------------------------------------
    @torch.no_grad()
    def alignment(self, x: Tensor, y: Tensor) -> dict[str, dict[str, float]]:
        """Per forward layer: ``angle_update_bp``, the angle between the rule's weight change (the steady
        state with the teacher) and backprop's for the output error phi(u_trgt) - phi(u_N) on the same
        batch (:meth:`_backprop_directions`); per hidden layer ``angle_weight_feedback``, between the
        forward weights above and the top-down weights (S18's forward/top-down alignment, transposed);
        and ``apical_ratio`` = ||v_A|| / ||v_B|| without a teacher (0 in the self-predicting
        state)."""
        x = self._inputs(x)
        p, net, cfg = self.params, self.net, self.config
        u_trgt = self.target_potentials(y.to(x.device))
        s = mc.steady_state(net.weights(), x, u_trgt, p, cfg.steady_state, cfg.sweeps)
        rule = mc.steady_state_updates(s, p, cfg.steady_state)["W"]
        bp = self._backprop_directions(x, u_trgt)
        free = mc.steady_state(net.weights(), x, None, p, cfg.steady_state, cfg.sweeps)
        out: dict[str, dict[str, float]] = {}
        for k in range(1, p.N + 1):
            rec = {"angle_update_bp": angle_degrees(rule[k - 1], bp[k - 1])}
            if k < p.N:
                rec["angle_weight_feedback"] = angle_degrees(net.pp[k].weight.t(), net.td[k - 1])
                vB = float(free.v_B[k - 1].norm())
                rec["apical_ratio"] = float(free.v_A[k - 1].norm()) / vB if vB > 0 else math.nan
            out[f"pp.{k}"] = rec
        return out

    def _backprop_directions(self, x: Tensor, u_trgt: Tensor) -> list[Tensor]:
        """Backprop's weight directions through the bottom-up network for the output error
        delta_N = phi(u_trgt) - phi(u_N) at the output potential (the cross-entropy gradient of
        logistic units). In the weak-nudging limit the output error of S18's rule is
        lambda_N phi'(u_N) (u_trgt - u_N), which is proportional to this delta to first order,
        and each hidden layer's apical error carries it down as backprop does when the
        top-down weights are the transposed forward weights (docs/algorithms/microcircuits.md
        §6.3)."""
        p = self.params
        with torch.enable_grad():
            Ws = [layer.weight.detach().clone().requires_grad_(True) for layer in self.net.pp]
            r = x
            u = r
            literal = self._forward_mode == "paper_literal"
            for k, (W, layer) in enumerate(zip(Ws, self.net.pp, strict=True), start=1):
                u = (1.0 if literal else p.basal_factor(k)) * (r @ W.t() + layer.bias.detach())
                r = mc.phi(u, p)
            delta = (mc.phi(u_trgt, p) - r).detach()
            loss = -(delta * u).sum() / x.shape[0]
            grads = torch.autograd.grad(loss, Ws)
        return [-g for g in grads]
