"""The dynamics of a segregated-dendrite network (Guerguiev, Lillicrap & Richards 2017, "G17";
docs/algorithms/segregated_dendrites.md): :class:`SegregatedSimulator` runs a
:class:`~bpdl.nn.segregated.SegregatedDendriteNet` on Poisson spikes, in *lanes* that share the
weights (§5.16), on the fused kernels of :mod:`bpdl.ops.segregated` (``backend="kernels"``) or
the pure-PyTorch reference of :mod:`bpdl.functional.segregated` (``backend="reference"``), both
drawing the same counter-based random numbers.

It owns everything about *running* the network: the input rates and teaching targets, the
lanes' state (which carries over between training examples, as in the original), the seeds of
the spike draws (training, test procedure, probes), the phase plan of every training example
(random phase lengths and plateau times, keyed by the example's global index, §5.4), the choice
of backend, the test procedure (§5.5) and the recording of neuron traces. The ``segregated``
rule (:mod:`bpdl.rules.segregated`) owns the plasticity: it asks the simulator for the phase
averages of a minibatch and turns them into pseudo-gradients.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from bpdl.errors import ConfigError
from bpdl.functional import segregated as seg
from bpdl.nn.segregated import SegregatedDendriteNet

BACKENDS = ("auto", "kernels", "reference")
DTYPES = {"float32": torch.float32, "float64": torch.float64}
#: Lanes simulated at once by the test procedure and the probes (bounds their memory).
EVAL_CHUNK = 2048
#: Examples per block of cached phase-length draws (one vectorised draw per block).
PLAN_BLOCK = 1 << 14
#: Lanes whose keys are cached (the default minibatch of the rule).
_LANE_KEYS = 32

__all__ = ["BACKENDS", "DTYPES", "EVAL_CHUNK", "PLAN_BLOCK", "SegregatedSimulator",
           "kernels_available"]


def kernels_available(device: torch.device) -> bool:
    """Whether the fused segregated-dendrite kernels are compiled for ``device``."""
    from bpdl import ops

    return ops.has_kernel("segregated_train_example", device)


class SegregatedSimulator:
    """Runs ``net``'s dynamics; see the module docstring.

    Args:
        net: the network (its weights are read, never written).
        seed: key of the training spike draws and phase plans; ``test_seed`` keys the test
            procedure (default seed + 2), the probes use seed + 1.
        backend: ``kernels``, ``reference`` or ``auto`` (kernels where compiled for the device).
        dtype: ``torch.float32`` or ``torch.float64`` state.
    """

    def __init__(self, net: SegregatedDendriteNet, seed: int, test_seed: int | None = None,
                 backend: str = "auto", dtype: torch.dtype = torch.float32):
        self.net = net
        self.params = net.sim
        self.backend_choice = backend
        self.dtype = dtype
        self.set_seeds(seed, test_seed)
        self.lanes: seg.LaneState | None = None
        self._caches: dict[str, Any] = {}

    def set_seeds(self, seed: int, test_seed: int | None = None) -> None:
        self.seed = int(seed)
        self.test_seed = int(test_seed) if test_seed is not None else (self.seed + 2) % 2**62
        self.probe_seed = (self.seed + 1) % 2**62

    @property
    def device(self) -> torch.device:
        return self.net.layers[0].weight.device

    def backend(self, device: torch.device | None = None) -> str:
        """The simulation backend in use on ``device`` (the network's device by default)."""
        device = device or self.device
        if self.backend_choice == "auto":
            return "kernels" if kernels_available(device) else "reference"
        if self.backend_choice == "kernels" and not kernels_available(device):
            raise ConfigError(f"backend='kernels' but the fused segregated kernels are not "
                              f"compiled for {device.type}; use backend='reference' or 'auto'")
        return self.backend_choice

    # ---- state carried in checkpoints ---------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {"seed": self.seed, "test_seed": self.test_seed,
                "lanes": None if self.lanes is None else self.lanes.to_dict()}

    def load_state(self, state: dict[str, Any]) -> None:
        self.set_seeds(int(state["seed"]), int(state["test_seed"]))
        lanes = state.get("lanes")
        # copies: a state dict taken from a live learner must not alias its lanes
        self.lanes = None if lanes is None else seg.LaneState.from_dict(lanes).clone()

    def move_lanes(self) -> None:
        """Keep the lane state on the network's device (after ``.to(device)``)."""
        if self.lanes is None:
            return
        device = self.device
        d = self.lanes.to_dict()
        self.lanes = seg.LaneState.from_dict(
            {k: ([t.to(device) for t in v] if isinstance(v, list) else v.to(device))
             for k, v in d.items()})

    # ---- inputs ---------------------------------------------------------------------------------
    def rates(self, x: Tensor) -> Tensor:
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

    def targets(self, y: Tensor) -> Tensor:
        """Teaching signals (B, n_out): 1 for the neurons of each example's class, else 0."""
        classes = self.net.num_classes
        if y.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise ConfigError(f"labels must be integer class indices, got {y.dtype}")
        if y.numel():
            lo, hi = (int(v) for v in torch.aminmax(y))
            if lo < 0 or hi >= classes:
                raise ConfigError(f"labels must lie in [0, {classes - 1}], found [{lo}, {hi}]")
        device = self.device
        table = self._caches.get("targets")
        if table is None or table.dtype != self.dtype or table.device != device:
            eye = torch.eye(classes, dtype=self.dtype, device=device)
            table = eye.repeat_interleave(self.params.neurons_per_class, dim=1)
            self._caches["targets"] = table
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
        device = self.device
        return (lengths.to(device), windows.to(device),
                None if offsets is None else [o.to(device) for o in offsets])

    def plan_slices(self, first: int, count: int, seed: int, device: torch.device
                    ) -> tuple[Tensor, Tensor] | None:
        """Phase lengths and windows (count, 2) of the consecutive examples first, first + 1,
        ... as slices of a cached block of PLAN_BLOCK examples (the same values as
        :meth:`phase_plan`, without per-batch work), or None where that shortcut does not apply
        (random plateau times, or the range straddles two blocks)."""
        p = self.params
        block = first // PLAN_BLOCK
        if p.random_plateaus or count <= 0 or (first + count - 1) // PLAN_BLOCK != block:
            return None
        cache = self._caches.setdefault("plan_slices", {})
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

    def training_plan(self, first: int, count: int, shared: bool, device: torch.device
                      ) -> tuple[Tensor, Tensor, list[Tensor] | None]:
        """(lengths, windows, offsets) of the training examples first .. first + count - 1 (one
        draw for all of them with ``shared``), from the cached blocks where possible."""
        plan = None if shared else self.plan_slices(first, count, self.seed, device)
        if plan is not None:
            return plan[0], plan[1], None
        example = torch.arange(first, first + count, dtype=torch.int64)
        return self.phase_plan(example, self.seed, shared=shared)

    def _extensions(self, example: Tensor, seed: int) -> Tensor:
        """floor(Wald(2, 1)) extensions (B, 2) of the forward and target phase of each example,
        drawn a block of PLAN_BLOCK examples at a time and cached (the draws are keyed by the
        example index, so caching changes nothing but the cost)."""
        out = torch.empty(example.shape[0], 2, dtype=torch.int64)
        blocks = torch.div(example, PLAN_BLOCK, rounding_mode="floor")
        cache = self._caches.setdefault("extensions", {})
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

    # ---- lanes ----------------------------------------------------------------------------------
    def lane_keys(self, n: int, device: torch.device) -> Tensor:
        """The lane keys 0 .. n - 1 of the training lanes (cached: they never change)."""
        keys = self._caches.get("lane_keys")
        if keys is None or keys.shape[0] < n or keys.device != device:
            keys = torch.arange(max(n, _LANE_KEYS), dtype=torch.int64, device=device)
            self._caches["lane_keys"] = keys
        return keys[:n]

    def ensure_lanes(self, n: int, device: torch.device) -> seg.LaneState:
        """The first ``n`` training lanes (grown with zero state when there are fewer)."""
        if self.lanes is None or self.lanes.lanes < n:
            fresh = seg.LaneState.zeros(n, self.params, self.dtype, device)
            if self.lanes is not None:
                old = self.lanes
                k = old.lanes
                for dst, src in zip(fresh.tensors(), old.tensors(), strict=True):
                    dst[:k].copy_(src)
            self.lanes = fresh
        return self.lanes if self.lanes.lanes == n else self.lanes.narrow(n)

    # ---- simulation -----------------------------------------------------------------------------
    def net_tensors(self) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor | None]]:
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
        ``validated``: ``x_rate`` comes from :meth:`rates` (checked there)."""
        W, b, Y, c = self.net_tensors()
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
        ``validated``: ``x_rate`` comes from :meth:`rates` (checked there)."""
        W, b, Y, c = self.net_tensors()
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

    def probe(self, x_rate: Tensor, target: Tensor) -> seg.PhaseAverages:
        """Phase averages of training examples simulated on fresh lanes with the probe seed
        (the training lanes are untouched)."""
        B = x_rate.shape[0]
        state = seg.LaneState.zeros(B, self.params, self.dtype, x_rate.device)
        lengths, windows, offsets = self.phase_plan(torch.arange(B, dtype=torch.int64),
                                                    self.probe_seed)
        keys = torch.arange(B, dtype=torch.int64, device=x_rate.device)
        return self.simulate_example(state, x_rate, target, lengths, windows, offsets,
                                     self.probe_seed, keys)

    def _op_validates(self, validated: bool) -> bool:
        """Whether the kernels must check their input rates: not when they come from
        :meth:`rates` (``validated``), whose bound lambda_max is within the kernels' range."""
        from bpdl import ops
        return not (validated and self.params.lambda_max <= ops.MAX_POISSON_MEAN)

    # ---- neuron traces -----------------------------------------------------------------------
    @torch.no_grad()
    def record(self, x: Tensor, y: Tensor, example_index: int,
               neurons: int | dict[int, list[int]] = 5, from_training_state: bool = True
               ) -> dict[str, Any]:
        """Simulate one training example (forward and target phase) of ``x[0]`` with the
        reference simulator and record, for the chosen neurons of every layer, the basal (B),
        apical (A) and somatic (C) potentials, the rate and the spike counts at every step, and
        the plateau potentials alpha_f = sigma(A_f), alpha_t = sigma(A_t) of the hidden layers.

        ``example_index`` keys the phase plan (the global index of the next training example);
        ``neurons``: per layer index the neuron indices, or a number of neurons per layer (the
        first ones; the output neurons of the example's label first). The simulation starts
        from a copy of the first training lane (or zero state) and leaves the training lanes
        untouched. Returns plain lists (JSON-ready), the trace format of
        :func:`bpdl.plots.dynamics.plot_dynamics`.
        """
        p = self.params
        x_rate = self.rates(x[:1])
        target = self.targets(y[:1])
        device = x_rate.device
        if isinstance(neurons, int):
            neurons = self._default_neurons(neurons, int(y[0]))
        if from_training_state and self.lanes is not None:
            state = self.lanes.clone().narrow(1).clone()
        else:
            state = seg.LaneState.zeros(1, p, self.dtype, device)
        example = torch.tensor([int(example_index)], dtype=torch.int64)
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

    def _default_neurons(self, count: int, label: int) -> dict[int, list[int]]:
        p = self.params
        neurons = {m: list(range(min(count, p.sizes[m + 1]))) for m in range(p.n_layers)}
        # the output neurons of the example's label first, then others
        r = p.neurons_per_class
        own = list(range(label * r, label * r + r))
        rest = [j for j in range(p.sizes[-1]) if j not in own]
        neurons[p.n_layers - 1] = (own + rest)[:min(count, p.sizes[-1])]
        return neurons
