"""Feedback-alignment family: layers whose backward pass sends the error through feedback
weights instead of the transposed forward weights (ALGORITHMS.md section 3).

The forward pass of every layer here is the ordinary one (bit for bit). Only the backward pass
changes, through one explicit ``torch.autograd.Function`` per rule:

=====================  ==========================================================================
rule (mode)            signal sent to the layer below, for the layer's error delta = dL/da
=====================  ==========================================================================
``fa``                 B^T delta, B fixed random (Lillicrap et al. 2016)
``dfa``                D^T e, e the *output* error, D fixed random per layer (Nokland 2016)
``usf``/``frsf``/      (sign(W) * M)^T delta, M a constant, a fixed |R| or an |R| redrawn at
``brsf``               every update (Liao, Leibo & Poggio 2016; Xiao et al. 2018)
``kp``                 B^T delta, and B receives W's update (Kolen-Pollack; Akrout et al. 2019)
``wm``                 B^T delta, B learned by weight mirrors (Akrout et al. 2019)
``bp``                 W^T delta (backprop; the reference the others are measured against)
=====================  ==========================================================================

In every mode the layer's own parameter gradients are backprop's, dL/dW = delta h^T and
dL/db = sum delta; the output layer always receives the true error; BatchNorm, pooling and
activations in between apply their exact local backward to whatever signal reaches them.
Feedback tensors are buffers (a parameter for Kolen-Pollack) in the layout of W, created once
(at construction or conversion) and saved in ``state_dict``.

Two ways in: the layer classes :class:`FALinear`, :class:`FAConv2d` and
:class:`FALocallyConnected2d` (one class per layer type, the rule is its ``mode``), and
:func:`convert`, which swaps the Linear, Conv2d and LocallyConnected2d layers of an existing
model for them in place, sharing the parameters, so the forward outputs stay bit-identical.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bpdl import ops
from bpdl.config import from_dict
from bpdl.errors import ConfigError, UnknownNameError
from bpdl.functional.feedback import dfa_feedback_matrix, dfa_scale
from bpdl.functional.losses import check_loss
from bpdl.nn.init import INITS, init_std
from bpdl.nn.locally_connected import LocallyConnected2d

__all__ = [
    "DFAConfig", "FAConfig", "FAConv2d", "FALinear", "FALocallyConnected2d", "FEEDBACK_RULES",
    "FeedbackLayer", "KPConfig", "SignSymmetryConfig", "WMConfig", "convert", "feedback_layers",
    "use_backprop", "rule_options_class",
]

#: rule name -> what it needs; "bp" converts to layers that backpropagate (useful as reference)
FEEDBACK_RULES = ("fa", "dfa", "usf", "brsf", "frsf", "kp", "wm")
MODES = ("bp",) + FEEDBACK_RULES
SIGN_MODES = ("usf", "brsf", "frsf")
_MASK63 = (1 << 63) - 1


# ---- options ------------------------------------------------------------------------------------

def _check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise UnknownNameError(name, value, list(choices))


@dataclass(frozen=True)
class FeedbackConfig:
    """Options every feedback-alignment rule shares.

    Attributes:
        loss: ``cross_entropy`` on logits or ``mse`` (squared error summed over classes, as L16).
        feedback_init: initialiser family of the random feedback tensors; ``auto`` uses the
            model's own (``model.config.init``), else ``xavier_uniform``.
        feedback_seed: seed of the feedback tensors (each layer gets its own stream); None takes
            ``torch.initial_seed()``, i.e. the run's seed, without consuming the global RNG.
        last_layer_rule: ``same`` (the output layer uses the rule like the others) or ``bp``
            (the output layer sends W^T e, as X18's default ``--lalgo``). Recorded in every run.
    """

    loss: str = "cross_entropy"
    feedback_init: str = "auto"
    feedback_seed: int | None = None
    last_layer_rule: str = "same"

    def __post_init__(self) -> None:
        check_loss(self.loss)
        if self.feedback_init != "auto":
            _check_choice("initialiser", self.feedback_init, INITS)
        _check_choice("last_layer_rule", self.last_layer_rule, ("same", "bp"))
        if self.feedback_seed is not None and (
                isinstance(self.feedback_seed, bool) or not isinstance(self.feedback_seed, int)
                or not 0 <= self.feedback_seed < 2**63):
            raise ConfigError(f"feedback_seed must be an integer in [0, 2^63) or null, got "
                              f"{self.feedback_seed!r}")


@dataclass(frozen=True)
class FAConfig(FeedbackConfig):
    """Feedback alignment (L16). ``feedback_sparsity`` q zeroes a random fraction q of B."""

    feedback_sparsity: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.feedback_sparsity, bool) or not isinstance(
                self.feedback_sparsity, (int, float)) or not 0 <= self.feedback_sparsity < 1:
            raise ConfigError(f"feedback_sparsity must be in [0, 1), got "
                              f"{self.feedback_sparsity!r}")


@dataclass(frozen=True)
class DFAConfig(FeedbackConfig):
    """Direct feedback alignment (N16).

    Attributes:
        dfa_storage: ``dense`` stores each D; ``regenerate`` draws D's entries inside the kernel
            from the counter-based generator (same numbers, nothing stored).
        dfa_conv: ``dense`` (exact DFA, D over the whole input of every layer) or ``tiled``
            (SA21's variant for Conv2d layers: a (n_out, C_in, k, k) kernel applied to the error
            replicated over the output positions; a different, cheaper algorithm). Linear and
            locally connected layers are always dense.
        num_outputs: size of the output error e (default: the last layer's output size).
    """

    dfa_storage: str = "dense"
    dfa_conv: str = "dense"
    num_outputs: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_choice("dfa_storage", self.dfa_storage, ("dense", "regenerate"))
        _check_choice("dfa_conv", self.dfa_conv, ("dense", "tiled"))
        if self.num_outputs is not None and (isinstance(self.num_outputs, bool) or not isinstance(
                self.num_outputs, int) or self.num_outputs <= 0):
            raise ConfigError(f"num_outputs must be a positive integer, got {self.num_outputs!r}")


@dataclass(frozen=True)
class SignSymmetryConfig(FeedbackConfig):
    """Sign symmetry (LLP16, X18), B = sign(W) * M.

    ``sign_scale`` sets uSF's constant M = c: ``init`` (the standard deviation of the layer's
    initialiser, SA21: sqrt(2/(fan_in+fan_out)) for Xavier, 1/sqrt(3 fan_in) for PyTorch's
    default), ``x18`` (sqrt(2/(k k C_out)), X18's conv code; sqrt(2/n_out) for Linear) or a
    positive number. brSF and frSF draw |R| from the initialiser instead.
    """

    sign_scale: str | float = "init"

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.sign_scale, str):
            _check_choice("sign_scale", self.sign_scale, ("init", "x18"))
        elif isinstance(self.sign_scale, bool) or not isinstance(self.sign_scale, (int, float)) \
                or not math.isfinite(self.sign_scale) or self.sign_scale <= 0:
            raise ConfigError(f"sign_scale must be 'init', 'x18' or a positive number, got "
                              f"{self.sign_scale!r}")


@dataclass(frozen=True)
class KPConfig(FeedbackConfig):
    """Kolen-Pollack (A19): B gets W's update. ``decay`` lambda multiplies W and B by (1 - lambda)
    after every step (decoupled, so W - B = (1 - lambda)^t (W0 - B0) under any optimiser whose
    update depends only on the gradient history); A19's NumPy reference uses 0."""

    decay: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.decay, bool) or not isinstance(self.decay, (int, float)) \
                or not 0 <= self.decay < 1:
            raise ConfigError(f"decay must be in [0, 1), got {self.decay!r}")


@dataclass(frozen=True)
class WMConfig(FeedbackConfig):
    """Weight mirrors (A19): B is learned in "mirror" steps driven by input noise xi,
    dB = eta_B * y^T xi - lambda_B B with y = W xi (summed over the mirror batch).

    Attributes:
        mirror_lr: eta_B (0.01). mirror_decay: lambda_B (0, as A19's NumPy code).
        mirror_batch: noise samples per mirror step (None: the training batch size).
        mirror_noise: ``uniform`` on [-amplitude, amplitude] or ``gaussian`` with std amplitude.
        mirror_amplitude: 0.05 (A19's NumPy code: 0.1 * (U - 0.5)).
        mirror_reduction: ``sum`` (A19) or ``mean`` over the mirror batch (and locations).
        mirror_pretrain_steps: mirror steps before the first training step (A19: one epoch's
            worth of minibatches; 550 = 55,000 / 100).
    """

    mirror_lr: float = 0.01
    mirror_decay: float = 0.0
    mirror_batch: int | None = None
    mirror_noise: str = "uniform"
    mirror_amplitude: float = 0.05
    mirror_reduction: str = "sum"
    mirror_pretrain_steps: int = 550

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_choice("mirror_noise", self.mirror_noise, ("uniform", "gaussian"))
        _check_choice("mirror_reduction", self.mirror_reduction, ("sum", "mean"))
        for name in ("mirror_lr", "mirror_amplitude"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ConfigError(f"{name} must be > 0, got {value!r}")
        if not 0 <= self.mirror_decay < 1:
            raise ConfigError(f"mirror_decay must be in [0, 1), got {self.mirror_decay!r}")
        if self.mirror_batch is not None and (not isinstance(self.mirror_batch, int)
                                              or self.mirror_batch <= 0):
            raise ConfigError(f"mirror_batch must be a positive integer, got "
                              f"{self.mirror_batch!r}")
        if not isinstance(self.mirror_pretrain_steps, int) or self.mirror_pretrain_steps < 0:
            raise ConfigError(f"mirror_pretrain_steps must be an integer >= 0, got "
                              f"{self.mirror_pretrain_steps!r}")


_CONFIGS: dict[str, type] = {"fa": FAConfig, "dfa": DFAConfig, "usf": SignSymmetryConfig,
                             "brsf": SignSymmetryConfig, "frsf": SignSymmetryConfig,
                             "kp": KPConfig, "wm": WMConfig, "bp": FeedbackConfig}


def rule_options_class(rule: str) -> type:
    """The options dataclass of feedback rule ``rule``."""
    _check_choice("feedback rule", rule, MODES)
    return _CONFIGS[rule]


def _mix_seed(*values: int) -> int:
    """A 63-bit seed from integers (stable across runs and platforms)."""
    digest = hashlib.blake2b(repr(values).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & _MASK63


# ---- the autograd Functions, one per rule -------------------------------------------------------

class FeedbackAlignmentFunction(torch.autograd.Function):
    """Feedback alignment (Lillicrap, Cownden, Tweed & Akerman 2016, Nat. Commun. 7:13276).

    Forward: the layer's ordinary map a = W h + b (Linear, Conv2d or LocallyConnected2d).
    Backward, for delta = dL/da:

        dL/dW = delta h^T,   dL/db = sum delta    (as backprop)
        g     = B^T delta                          (signal to the layer below; B fixed random,
                                                    stored in W's layout; BP is B = W)

    Weight mirrors (Akrout et al. 2019) use the same pathway with a B learned off-line.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, feedback: Tensor,
                layer: FeedbackLayer) -> Tensor:
        ctx.layer = layer
        ctx.save_for_backward(x, feedback)
        return layer.forward_math(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        x, feedback = ctx.saved_tensors
        need = ctx.needs_input_grad
        gi, gw, gb = ctx.layer.backward_math(grad_output, x, feedback, need[0], need[1], need[2])
        return gi, gw, gb, None, None


class SignSymmetryFunction(torch.autograd.Function):
    """Sign symmetry (Liao, Leibo & Poggio 2016, AAAI; Xiao, Chen, Liao & Poggio 2018,
    arXiv:1811.03567; variant names from Sanfiz & Akrout 2021).

    Backward, for delta = dL/da: dL/dW = delta h^T, dL/db = sum delta, and

        g = (sign(W) * M)^T delta,

    with B = sign(W) * M recomputed from the current W (sign(0) = 0: zero weights send
    nothing). M is the constant c (uSF), a fixed |R| (frSF) or an |R| redrawn at every update
    (brSF); the scale keeps ||B|| near ||W|| (without it the signal explodes, X18).

    The feedback is built in the backward pass, in one fused pass over W
    (:func:`bpdl.ops.sign_feedback`; brSF draws |R_t| inside it,
    :func:`bpdl.ops.sign_random_feedback`), and only where a signal is sent below.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, magnitude: Tensor | None,
                layer: FeedbackLayer, step: int) -> Tensor:
        ctx.layer, ctx.step = layer, step
        ctx.save_for_backward(x, weight, magnitude)
        return layer.forward_math(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        x, weight, magnitude = ctx.saved_tensors
        need = ctx.needs_input_grad
        layer = ctx.layer
        scale = None
        if not need[0]:
            feedback = weight  # no signal below: only the shapes matter
        elif magnitude is None:  # brSF: |R_t| of this update, drawn in the pass
            feedback = layer.sign_random_feedback(weight, ctx.step)
        elif magnitude.dim() == 0:  # uSF: B = c sign(W); scale the (smaller) signal instead
            feedback, scale = torch.sign(weight), magnitude
        else:  # frSF
            feedback = ops.sign_feedback(weight, magnitude)
        gi, gw, gb = layer.backward_math(grad_output, x, feedback, need[0], need[1], need[2])
        if gi is not None and scale is not None:
            gi = gi.mul_(scale)
        return gi, gw, gb, None, None, None


class KolenPollackFunction(torch.autograd.Function):
    """Kolen-Pollack learning (Kolen & Pollack 1994; Akrout, Wilson, Humphreys, Lillicrap & Tweed
    2019, NeurIPS 32).

    Backward, for delta = dL/da: dL/dW = delta h^T, dL/db = sum delta, g = B^T delta, and B
    receives the *same* gradient as W, dL/dB := delta h^T (in W's layout, untransposed). With
    the same optimiser state and a decoupled decay lambda on both, W - B shrinks as
    (1 - lambda)^t and B aligns with W.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, feedback: Tensor,
                layer: FeedbackLayer) -> Tensor:
        ctx.layer = layer
        ctx.save_for_backward(x, feedback)
        return layer.forward_math(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        x, feedback = ctx.saved_tensors
        need = ctx.needs_input_grad
        gi, gw, gb = ctx.layer.backward_math(grad_output, x, feedback, need[0],
                                             need[1] or need[3], need[2])
        gfeedback = gw.clone() if need[3] else None
        return gi, (gw if need[1] else None), gb, gfeedback, None


class DirectFeedbackAlignmentFunction(torch.autograd.Function):
    """Direct feedback alignment (Nokland 2016, NeurIPS 29).

    For hidden layers delta_l = (D_l^T e) * f'(a_l), with e = dL/da_L the output error and D_l
    fixed random; the output layer gets e itself. Weight updates are backprop's given delta:
    dL/dW = delta h^T, dL/db = sum delta.

    Implementation: every layer but the first sends D^T e (D shaped (n_out, *input shape)) to
    its *input*, so the activation, pooling and BatchNorm below apply f' (and their exact local
    backward) as usual. The output layer's backward runs first (autograd's order) and leaves e
    in the model's :class:`DFAHub`; each lower layer reads it there. Nothing per layer is stored
    beyond D (with ``dfa_storage="regenerate"`` not even D), and no second backward pass runs:
    a hidden layer never computes W^T delta at all.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, feedback: Tensor,
                layer: FeedbackLayer) -> Tensor:
        hub = layer.dfa_hub
        if hub is None:
            raise ConfigError(f"DFA layer {layer.__class__.__name__} is not connected to an "
                              f"output layer; prepare the model with bpdl.convert(model, "
                              f"rule='dfa') (or build the 'dfa' rule on it)")
        ctx.layer = layer
        ctx.token = hub.next_forward() if layer.dfa_output else hub.forward_count + 1
        ctx.save_for_backward(x, weight, feedback)
        return layer.forward_math(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        layer = ctx.layer
        x, weight, feedback = ctx.saved_tensors
        need = ctx.needs_input_grad
        hub = layer.dfa_hub
        if layer.dfa_output:
            error = hub.set_error(ctx.token, grad_output)
        else:
            error = hub.error_for(ctx.token)
        gi = None
        if need[0]:
            if layer.dfa_output and layer.dfa_feedback_kind == "weight":
                gi, _, _ = layer.backward_math(grad_output, x, weight, True, False, False)
            else:
                gi = layer.dfa_signal(error, x, feedback)
        _, gw, gb = layer.backward_math(grad_output, x, weight, False, need[1], need[2])
        return gi, gw, gb, None, None


class DFAHub:
    """Carries the output error e from the output layer's backward to the hidden layers'.

    Each forward through the output layer gets a number; a hidden layer's forward expects the
    next one. A hidden layer whose backward finds no error of its own forward pass (the output
    layer was not part of the loss, or two forwards were interleaved) raises instead of using a
    stale error.
    """

    def __init__(self, num_outputs: int):
        self.num_outputs = num_outputs
        self.forward_count = 0
        self._error: Tensor | None = None
        self._error_token = -1

    def next_forward(self) -> int:
        self.forward_count += 1
        return self.forward_count

    def set_error(self, token: int, grad_output: Tensor) -> Tensor:
        error = grad_output.reshape(grad_output.shape[0], -1)
        if error.shape[1] != self.num_outputs:
            raise ConfigError(f"DFA expected an output error of {self.num_outputs} values per "
                              f"example, the output layer produced {error.shape[1]}; pass the "
                              f"right num_outputs to bpdl.convert")
        self._error, self._error_token = error, token
        return error

    def error_for(self, token: int) -> Tensor:
        if self._error is None or self._error_token != token:
            raise RuntimeError(
                "DFA: this layer's backward ran without the output error of its own forward "
                "pass. The loss must depend on the model's output layer, and each forward must "
                "be followed by its backward before the next forward with gradients.")
        return self._error

    def release(self) -> None:
        self._error, self._error_token = None, -1

    def __getstate__(self) -> dict[str, Any]:
        return {"num_outputs": self.num_outputs, "forward_count": 0, "_error": None,
                "_error_token": -1}


# ---- the layers ---------------------------------------------------------------------------------

class FeedbackLayer(nn.Module):
    """Mixin of the feedback-alignment layers: rule state, the forward dispatch, checkpoints.

    Subclasses implement :meth:`forward_math` (the plain forward), :meth:`backward_math`
    (gradients with a given tensor in W's place for the input gradient) and
    :meth:`_out_units`.
    """

    layer_type: ClassVar[str] = "layer"
    weight: nn.Parameter
    bias: nn.Parameter | None

    def _init_feedback(self) -> None:
        self.mode = "bp"
        self.feedback_seed = 0
        self.layer_index = 0
        self.feedback_init = "xavier_uniform"
        self.feedback_sparsity = 0.0
        self.sign_scale: str | float = "init"
        self.input_shape: tuple[int, ...] | None = None
        self.dfa_hub: DFAHub | None = None
        self.dfa_output = False
        self.dfa_feedback_kind = "dense"  # dense, regenerate, tiled, weight (output, bp)
        self.dfa_scale = 0.0
        self.last_layer_bp = False
        self._use_bp = False
        self._function: type[torch.autograd.Function] | None = None

    # -- configuration ------------------------------------------------------------------------
    def configure_feedback(self, mode: str, *, feedback_seed: int = 0, layer_index: int = 0,
                           feedback_init: str = "xavier_uniform", feedback_sparsity: float = 0.0,
                           sign_scale: str | float = "init",
                           input_shape: Sequence[int] | None = None,
                           dfa_hub: DFAHub | None = None, dfa_output: bool = False,
                           dfa_storage: str = "dense", dfa_conv: str = "dense",
                           bp_feedback: bool = False) -> None:
        """(Re)create the rule's feedback state for ``mode``. Called once, at construction or
        conversion; never inside forward.

        Args:
            mode: one of bp, fa, dfa, usf, brsf, frsf, kp, wm.
            feedback_seed, layer_index: key of this layer's random feedback stream.
            feedback_init: initialiser family of random feedback (as W's, drawn independently).
            feedback_sparsity: FA only, fraction of B's entries set to zero.
            sign_scale: uSF's constant (see :class:`SignSymmetryConfig`).
            input_shape: the input shape without the batch (DFA on Conv2d/LC layers and weight
                mirrors on Conv2d layers need it).
            dfa_hub, dfa_output: DFA wiring (the model's hub; whether this is the output layer).
            dfa_storage, dfa_conv: see :class:`DFAConfig`.
            bp_feedback: the output layer under ``last_layer_rule="bp"``: send W^T e.
        """
        _check_choice("feedback mode", mode, MODES)
        if mode != "bp" and feedback_init not in INITS:
            raise UnknownNameError("initialiser", feedback_init, INITS)
        for name in ("feedback", "feedback_magnitude", "feedback_step"):
            self._buffers.pop(name, None)
            self._parameters.pop(name, None)
        self.mode = mode
        self.feedback_seed = int(feedback_seed) & _MASK63
        self.layer_index = int(layer_index)
        self.feedback_init = feedback_init
        self.feedback_sparsity = float(feedback_sparsity)
        self.sign_scale = sign_scale
        if input_shape is not None:
            self.input_shape = tuple(int(s) for s in input_shape)
        self.dfa_hub, self.dfa_output = None, False
        self.last_layer_bp = bool(bp_feedback) and mode != "dfa"
        # the autograd Function of the rule (None: plain backprop through forward_math)
        self._function = None if mode == "bp" or self.last_layer_bp else {
            "fa": FeedbackAlignmentFunction, "wm": FeedbackAlignmentFunction,
            "kp": KolenPollackFunction, "dfa": DirectFeedbackAlignmentFunction,
        }.get(mode, SignSymmetryFunction)
        w = self.weight
        if mode in ("fa", "wm", "kp") and not self.last_layer_bp:
            b = self._draw_random(stream=1)
            if mode == "fa" and self.feedback_sparsity > 0:
                g = torch.Generator().manual_seed(_mix_seed(self.feedback_seed, self.layer_index, 2))
                keep = torch.rand(b.shape, generator=g) >= self.feedback_sparsity
                b = b * keep.to(b.dtype)
            b = b.to(w.device, w.dtype)
            if mode == "kp":
                self.feedback = nn.Parameter(b)
            else:
                self.register_buffer("feedback", b)
        elif mode == "frsf" and not self.last_layer_bp:
            self.register_buffer("feedback_magnitude",
                                 self._draw_random(stream=1).abs().to(w.device, w.dtype))
        elif mode == "usf" and not self.last_layer_bp:
            self.register_buffer("feedback_magnitude",
                                 torch.tensor(self._sign_constant(), dtype=w.dtype,
                                              device=w.device))
        elif mode == "brsf" and not self.last_layer_bp:
            self.register_buffer("feedback_step", torch.zeros((), dtype=torch.int64,
                                                              device=w.device))
        elif mode == "dfa":
            self.dfa_hub, self.dfa_output = dfa_hub, bool(dfa_output)
            if dfa_hub is None:
                raise ConfigError("a DFA layer needs the model's DFAHub; use bpdl.convert(model, "
                                  "rule='dfa')")
            self._configure_dfa(dfa_hub.num_outputs, dfa_storage, dfa_conv, bp_feedback)

    def _configure_dfa(self, num_outputs: int, storage: str, conv: str, bp_feedback: bool) -> None:
        w = self.weight
        if self.dfa_output and bp_feedback:
            self.dfa_feedback_kind = "weight"
            self.register_buffer("feedback", torch.empty(0, device=w.device, dtype=w.dtype))
            return
        if self.layer_index == 0:
            # the first layer's input is the data: nothing is sent below it, nothing stored
            self.dfa_feedback_kind = "none"
            self.register_buffer("feedback", torch.empty(0, device=w.device, dtype=w.dtype))
            return
        if conv == "tiled" and isinstance(self, nn.Conv2d):
            if self.groups != 1:
                raise ConfigError("dfa_conv='tiled' supports Conv2d layers with groups=1 only")
            self.dfa_feedback_kind = "tiled"
            shape = (num_outputs, self.in_channels, *self.kernel_size)
            fan_in, fan_out = self.in_channels * math.prod(self.kernel_size), \
                num_outputs * math.prod(self.kernel_size)
            self.dfa_scale = math.sqrt(6.0 / (fan_in + fan_out))
            d = dfa_feedback_matrix(num_outputs, math.prod(shape[1:]), self.feedback_seed,
                                    self.layer_index, self.dfa_scale, w.dtype, w.device)
            self.register_buffer("feedback", d.reshape(shape))
            return
        features = self._input_features()
        self.dfa_scale = dfa_scale(num_outputs, features)
        if storage == "regenerate":
            self.dfa_feedback_kind = "regenerate"
            self.register_buffer("feedback", torch.empty(0, device=w.device, dtype=w.dtype))
        else:
            self.dfa_feedback_kind = "dense"
            d = dfa_feedback_matrix(num_outputs, features, self.feedback_seed, self.layer_index,
                                    self.dfa_scale, w.dtype, w.device)
            self.register_buffer("feedback", d)

    def _input_features(self) -> int:
        if self.input_shape is None:
            raise ConfigError(
                f"DFA on a {self.layer_type} layer needs its input shape; pass "
                f"input_shape=(C, H, W) of the model's input to bpdl.convert (models built by "
                f"bpdl record it)")
        return math.prod(self.input_shape)

    def _draw_random(self, stream: int) -> Tensor:
        """A float64 tensor shaped like W from the feedback initialiser, on the CPU (the same
        numbers whatever W's device), keyed by (seed, layer, stream)."""
        g = torch.Generator().manual_seed(_mix_seed(self.feedback_seed, self.layer_index, stream))
        std = self.init_std(self.feedback_init)
        out = torch.empty(self.weight.shape, dtype=torch.float64)
        if self.feedback_init.endswith("normal"):
            out.normal_(0.0, std, generator=g)
        else:
            bound = math.sqrt(3.0) * std
            out.uniform_(-bound, bound, generator=g)
        return out

    def _sign_constant(self) -> float:
        if isinstance(self.sign_scale, (int, float)):
            return float(self.sign_scale)
        if self.sign_scale == "x18":
            receptive = math.prod(getattr(self, "kernel_size", (1,)))
            return math.sqrt(2.0 / (receptive * self._out_units()))
        return self.init_std(self.feedback_init)

    # -- the pieces each layer type provides ------------------------------------------------
    def forward_math(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        raise NotImplementedError

    def backward_math(self, grad_output: Tensor, x: Tensor, feedback: Tensor, need_input: bool,
                      need_weight: bool, need_bias: bool
                      ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        raise NotImplementedError

    def init_std(self, init: str, gain: float = 1.0) -> float:
        """Standard deviation of initialiser ``init`` for this layer's weight."""
        return init_std(init, self.weight, gain)

    def _out_units(self) -> int:
        raise NotImplementedError

    def dfa_signal(self, error: Tensor, x: Tensor, feedback: Tensor) -> Tensor:
        """D^T e delivered to this layer's input (shape of x)."""
        kind = self.dfa_feedback_kind
        if kind == "none":
            raise RuntimeError("DFA: the first layer sends no signal below it")
        if kind == "tiled":
            n, (oh, ow) = x.shape[0], self._output_hw(x)
            tiled = error[:, :, None, None].expand(n, error.shape[1], oh, ow)
            return torch.ops.aten.convolution_backward(
                tiled.contiguous(), x, feedback, None, list(self.stride), list(self._padding_ints),
                list(self.dilation), False, [0, 0], 1, [True, False, False])[0]
        features = math.prod(x.shape[1:])
        if kind == "regenerate":
            out = ops.dfa_project(error.to(x.dtype), features, self.feedback_seed,
                                  self.layer_index, self.dfa_scale)
        else:
            if feedback.shape[1] != features:
                raise ConfigError(f"DFA feedback of this layer expects inputs of "
                                  f"{feedback.shape[1]} values per example, got {features} "
                                  f"({tuple(x.shape[1:])})")
            out = error.to(feedback.dtype) @ feedback
        return out.reshape(x.shape)

    # -- what the rule sends back, for metrics -------------------------------------------------
    def feedback_weight(self) -> Tensor | None:
        """The tensor this layer's backward uses in W's place (None for DFA and bp). brSF: the
        magnitude of the most recent update."""
        if self.mode in ("bp", "dfa") or self.last_layer_bp:
            return None
        if self.mode in ("fa", "wm", "kp"):
            return self.feedback
        weight = self.weight.detach()
        if self.mode == "brsf":
            return self.sign_random_feedback(weight, int(self.feedback_step))
        return ops.sign_feedback(weight, self.feedback_magnitude)

    def sign_random_feedback(self, weight: Tensor, step: int) -> Tensor:
        """brSF's B = sign(W) |R_t| for update ``step``, |R_t| from the feedback initialiser
        (|U(-b, b)| = U(0, b) or a half-normal), keyed by (seed, layer, step): a resumed run
        redraws the same."""
        std = self.init_std(self.feedback_init)
        if self.feedback_init.endswith("normal"):
            return ops.sign_random_feedback(weight, self.feedback_seed, self.layer_index, step,
                                            "half_normal", std)
        return ops.sign_random_feedback(weight, self.feedback_seed, self.layer_index, step,
                                        "uniform", math.sqrt(3.0) * std)

    # -- forward --------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        function = self._function
        if function is None or self._use_bp or not torch.is_grad_enabled():
            return self.forward_math(x, self.weight, self.bias)
        if function is SignSymmetryFunction:
            if self.mode == "brsf":  # a fresh |R| for every update
                self.feedback_step.add_(1)
                return function.apply(x, self.weight, self.bias, None, self,
                                      int(self.feedback_step))
            return function.apply(x, self.weight, self.bias, self.feedback_magnitude, self, 0)
        if function is DirectFeedbackAlignmentFunction:
            self._check_rule_input(x)
        return function.apply(x, self.weight, self.bias, self._buffers.get(
            "feedback", self._parameters.get("feedback")), self)

    def _check_rule_input(self, x: Tensor) -> None:
        """Shape checks the rule's backward relies on (layer specific)."""

    # -- checkpoints ----------------------------------------------------------------------------
    def get_extra_state(self) -> dict[str, Any]:
        return {"mode": self.mode, "layer_index": self.layer_index,
                "feedback_seed": self.feedback_seed, "dfa_feedback_kind": self.dfa_feedback_kind,
                "last_layer_bp": self.last_layer_bp}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        mode = state.get("mode")
        if mode != self.mode:
            raise ConfigError(f"checkpoint layer {self.layer_index} was trained with rule "
                              f"{mode!r} but this layer uses {self.mode!r}; convert the model "
                              f"with rule={mode!r} before loading")
        kind = state.get("dfa_feedback_kind", self.dfa_feedback_kind)
        if mode == "dfa" and kind != self.dfa_feedback_kind:
            raise ConfigError(f"checkpoint layer {self.layer_index} used DFA feedback "
                              f"{kind!r} but this layer uses {self.dfa_feedback_kind!r}")
        # the regenerated DFA matrix and brSF's draws are keyed by the seed: adopt it
        self.feedback_seed = int(state.get("feedback_seed", self.feedback_seed))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        for name in ("feedback", "feedback_magnitude"):
            key = prefix + name
            own = self._buffers.get(name, self._parameters.get(name))
            if key in state_dict and own is not None and \
                    tuple(state_dict[key].shape) != tuple(own.shape):
                raise ConfigError(
                    f"checkpoint feedback {key!r} has shape {tuple(state_dict[key].shape)} but "
                    f"this {self.mode} layer ({self.layer_type}, weight "
                    f"{tuple(self.weight.shape)}) needs {tuple(own.shape)}: the checkpoint was "
                    f"saved from a different model, rule or DFA option")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def feedback_repr(self) -> str:
        extra = f", dfa={self.dfa_feedback_kind}" if self.mode == "dfa" else ""
        bp = ", last_layer_rule=bp" if self.last_layer_bp else ""
        return f"mode={self.mode}{extra}{bp}"


class FALinear(FeedbackLayer, nn.Linear):
    """``nn.Linear`` with a feedback-alignment backward (``mode``: fa, dfa, usf, brsf, frsf, kp,
    wm or bp). Forward: y = x W^T + b, bit-identical to nn.Linear. Backward: see the module
    docstring; the signal below is ``grad_output @ B``."""

    layer_type = "Linear"

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 mode: str = "fa", device=None, dtype=None, **feedback_options: Any):
        nn.Linear.__init__(self, in_features, out_features, bias, device=device, dtype=dtype)
        self._init_feedback()
        self.input_shape = (in_features,)
        if mode != "bp" or feedback_options:
            self.configure_feedback(mode, **feedback_options)

    def forward_math(self, x, weight, bias):
        return F.linear(x, weight, bias)

    def backward_math(self, grad_output, x, feedback, need_input, need_weight, need_bias):
        gi = gw = gb = None
        if need_input:
            gi = grad_output @ feedback
        if need_weight or need_bias:
            g2 = grad_output.reshape(-1, grad_output.shape[-1])
            if need_weight:
                gw = g2.t() @ x.reshape(-1, x.shape[-1])
            if need_bias:
                gb = g2.sum(0)
        return gi, gw, gb

    def _out_units(self) -> int:
        return self.out_features

    def _check_rule_input(self, x):
        if self.mode == "dfa" and x.dim() != 2:
            raise ConfigError(f"DFA on a Linear layer needs (N, features) inputs, got "
                              f"{tuple(x.shape)}")

    def extra_repr(self) -> str:
        return f"{nn.Linear.extra_repr(self)}, {self.feedback_repr()}"


class FAConv2d(FeedbackLayer, nn.Conv2d):
    """``nn.Conv2d`` with a feedback-alignment backward. Forward bit-identical to nn.Conv2d;
    the signal below is ``conv2d_input(B, grad_output)`` (one ``convolution_backward`` call
    computes it together with the weight gradient)."""

    layer_type = "Conv2d"

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros",
                 mode: str = "fa", device=None, dtype=None, **feedback_options: Any):
        nn.Conv2d.__init__(self, in_channels, out_channels, kernel_size, stride, padding,
                           dilation, groups, bias, padding_mode, device=device, dtype=dtype)
        if padding_mode != "zeros":
            raise ConfigError(f"feedback-alignment Conv2d supports padding_mode='zeros' only, "
                              f"got {padding_mode!r}")
        self._padding_ints = self._explicit_padding()
        self._init_feedback()
        if mode != "bp" or feedback_options:
            self.configure_feedback(mode, **feedback_options)

    def _explicit_padding(self) -> tuple[int, int]:
        if isinstance(self.padding, str):
            if self.padding == "valid":
                return (0, 0)
            total = [d * (k - 1) for d, k in zip(self.dilation, self.kernel_size, strict=True)]
            if any(t % 2 for t in total):
                raise ConfigError("feedback-alignment Conv2d: padding='same' with an even "
                                  "kernel pads asymmetrically; give explicit padding")
            return (total[0] // 2, total[1] // 2)
        return (int(self.padding[0]), int(self.padding[1]))

    def forward_math(self, x, weight, bias):
        return self._conv_forward(x, weight, bias)

    def backward_math(self, grad_output, x, feedback, need_input, need_weight, need_bias):
        if not (need_input or need_weight or need_bias):
            return None, None, None
        return torch.ops.aten.convolution_backward(
            grad_output, x, feedback, [self.out_channels] if need_bias else None,
            list(self.stride), list(self._padding_ints), list(self.dilation), False, [0, 0],
            self.groups, [need_input, need_weight, need_bias])

    def _output_hw(self, x: Tensor) -> tuple[int, int]:
        out = []
        for size, k, s, p, d in zip(x.shape[2:], self.kernel_size, self.stride,
                                    self._padding_ints, self.dilation, strict=True):
            out.append((size + 2 * p - d * (k - 1) - 1) // s + 1)
        return out[0], out[1]

    def _out_units(self) -> int:
        return self.out_channels

    def extra_repr(self) -> str:
        return f"{nn.Conv2d.extra_repr(self)}, {self.feedback_repr()}"


class FALocallyConnected2d(FeedbackLayer, LocallyConnected2d):
    """:class:`LocallyConnected2d` with a feedback-alignment backward; the signal below is the
    transposed locally connected map of B, ``fold(einsum('bop,pok->bkp', grad_output, B))``,
    on the fused kernel."""

    layer_type = "LocallyConnected2d"

    def __init__(self, in_channels: int, out_channels: int, input_size, kernel_size, stride=1,
                 padding="same", bias="location", mode: str = "fa", device=None, dtype=None,
                 **feedback_options: Any):
        LocallyConnected2d.__init__(self, in_channels, out_channels, input_size, kernel_size,
                                    stride, padding, bias, device=device, dtype=dtype)
        self._init_feedback()
        self.input_shape = (in_channels, *self.input_size)
        if mode != "bp" or feedback_options:
            self.configure_feedback(mode, **feedback_options)

    def init_std(self, init: str, gain: float = 1.0) -> float:
        return LocallyConnected2d.init_std(self, init, gain)

    def forward_math(self, x, weight, bias):
        LocallyConnected2d._check_input(self, x)
        return ops.locally_connected2d(x, weight, bias, self.stride, self.padding)

    def backward_math(self, grad_output, x, feedback, need_input, need_weight, need_bias):
        gi = gw = gb = None
        if need_input:
            gi = ops.locally_connected2d_grad_input(grad_output, feedback, self.input_size,
                                                    self.stride, self.padding)
        if need_weight:
            gw = ops.locally_connected2d_grad_weight(grad_output, x, self.kernel_size,
                                                     self.stride, self.padding)
        if need_bias:
            gb = grad_output.sum(0) if self.bias_kind == "location" else grad_output.sum((0, 2, 3))
        return gi, gw, gb

    def _out_units(self) -> int:
        return self.out_channels

    def extra_repr(self) -> str:
        return f"{LocallyConnected2d.extra_repr(self)}, {self.feedback_repr()}"


# ---- conversion ---------------------------------------------------------------------------------

#: Modules with parameters that are not weight layers and keep their exact backward (X18, SA21).
_PASS_THROUGH = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.PReLU)
_SUPPORTED = (nn.Linear, nn.Conv2d, LocallyConnected2d)


def feedback_layers(model: nn.Module) -> list[tuple[str, FeedbackLayer]]:
    """(name, layer) of every feedback-alignment layer of ``model`` in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, FeedbackLayer)]


@contextlib.contextmanager
def use_backprop(model: nn.Module) -> Iterator[None]:
    """Within the block, every feedback layer of ``model`` backpropagates (B = W): the exact
    gradient the alignment metrics compare against."""
    layers = [m for _, m in feedback_layers(model)]
    previous = [m._use_bp for m in layers]
    for m in layers:
        m._use_bp = True
    try:
        yield
    finally:
        for m, p in zip(layers, previous, strict=True):
            m._use_bp = p


def _weight_layers_in_order(model: nn.Module, rule: str) -> list[tuple[str, nn.Module]]:
    found = []
    for name, module in model.named_modules():
        if isinstance(module, _SUPPORTED):
            if isinstance(module, nn.Conv2d) and module.padding_mode != "zeros":
                raise ConfigError(f"rule {rule!r} cannot convert layer {name!r}: Conv2d with "
                                  f"padding_mode={module.padding_mode!r} (only 'zeros')")
            found.append((name, module))
        elif isinstance(module, _PASS_THROUGH):
            continue
        elif any(True for _ in module.parameters(recurse=False)) \
                and not isinstance(module, FeedbackLayer):
            raise ConfigError(
                f"rule {rule!r} does not support layer {name!r} of type "
                f"{type(module).__name__}; feedback-alignment rules apply to Linear, Conv2d and "
                f"LocallyConnected2d layers (BatchNorm/LayerNorm/GroupNorm keep their exact "
                f"backward)")
    if not found:
        raise ConfigError(f"rule {rule!r}: the model has no Linear, Conv2d or LocallyConnected2d "
                          f"layer to convert")
    return found


def _record_input_shapes(model: nn.Module, layers: list[nn.Module],
                         input_shape: Sequence[int]) -> dict[int, tuple[int, ...]]:
    """Input shape (without batch) of each layer, from one forward pass of a zero example."""
    shapes: dict[int, tuple[int, ...]] = {}
    def recorder(index: int):
        def hook(module: nn.Module, args: tuple) -> None:
            shapes.setdefault(index, tuple(args[0].shape[1:]))
        return hook

    hooks = [m.register_forward_pre_hook(recorder(i)) for i, m in enumerate(layers)]
    param = next(model.parameters())
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros((1, *input_shape), device=param.device, dtype=param.dtype))
    except Exception as err:
        raise ConfigError(f"cannot run the model on an input of shape {tuple(input_shape)} to "
                          f"find its layer shapes ({err}); pass the right input_shape") from err
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return shapes


def _model_input_shape(model: nn.Module) -> tuple[int, ...] | None:
    shape = getattr(model, "input_shape", None)
    return tuple(shape) if shape is not None else None


def _resolve_init(model: nn.Module, feedback_init: str) -> str:
    if feedback_init != "auto":
        return feedback_init
    init = getattr(getattr(model, "config", None), "init", None)
    return init if init in INITS else "xavier_uniform"


def _swap(old: nn.Module, mode: str) -> FeedbackLayer:
    """A feedback layer of the same geometry that shares ``old``'s parameters and buffers."""
    if isinstance(old, FeedbackLayer):
        return old
    meta = {"device": "meta", "dtype": old.weight.dtype}
    if isinstance(old, nn.Linear):
        new: FeedbackLayer = FALinear(old.in_features, old.out_features, old.bias is not None,
                                      mode="bp", **meta)
    elif isinstance(old, nn.Conv2d):
        new = FAConv2d(old.in_channels, old.out_channels, old.kernel_size, old.stride,
                       old.padding, old.dilation, old.groups, old.bias is not None,
                       old.padding_mode, mode="bp", **meta)
    else:
        new = FALocallyConnected2d(old.in_channels, old.out_channels, old.input_size,
                                   old.kernel_size, old.stride, old.padding_spec,
                                   old.bias_kind, mode="bp", **meta)
    new.weight = old.weight
    new.bias = old.bias
    for name, buf in old._buffers.items():
        new._buffers[name] = buf
    new.train(old.training)
    return new


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent = model
    parts = name.split(".")
    for part in parts[:-1]:
        parent = getattr(parent, part)
    setattr(parent, parts[-1], module)


def convert(model: nn.Module, rule: str = "fa", *, input_shape: Sequence[int] | None = None,
            **options: Any) -> nn.Module:
    """Swap the Linear, Conv2d and LocallyConnected2d layers of ``model`` for feedback-alignment
    layers of ``rule`` (fa, dfa, usf, brsf, frsf, kp, wm, or bp), in place; return ``model``.

    The new layers share the old ones' parameters (an optimiser built before keeps working) and
    compute the same forward pass bit for bit; only the backward changes. BatchNorm, pooling and
    activations are untouched and keep their exact backward. Layers already converted are
    reconfigured for the new rule. The feedback tensors are buffers (a parameter for ``kp``) of
    the converted layers, so ``state_dict`` and checkpoints carry them; loading a checkpoint into
    a model converted with another rule or shape raises :class:`ConfigError`.

    Args:
        model: any module built from supported layers (and parameter-free or normalisation
            modules); the last weight layer in module order is taken as the output layer.
        rule: the feedback rule.
        input_shape: the model input's shape without the batch, e.g. (1, 28, 28); needed by DFA
            and weight mirrors on Conv2d layers (models built by bpdl record it as
            ``model.input_shape``).
        **options: the rule's options (see :class:`FAConfig`, :class:`DFAConfig`,
            :class:`SignSymmetryConfig`, :class:`KPConfig`, :class:`WMConfig`), e.g.
            ``dfa_storage="regenerate"``; unknown options raise ConfigError.

    Example::

        model = bpdl.nn.build_model("cnn", (1, 28, 28), 10)
        bpdl.convert(model, rule="frsf")
        torch.optim.Adam(model.parameters()).step()   # any optimiser, any loop
    """
    cfg = options.pop("config", None)
    if cfg is None:
        cfg = from_dict(rule_options_class(rule), options, what=f"{rule} rule")
    elif options:
        raise ConfigError("pass either config= or keyword options to convert, not both")
    found = _weight_layers_in_order(model, rule)
    init = _resolve_init(model, cfg.feedback_init)
    seed = cfg.feedback_seed if cfg.feedback_seed is not None else torch.initial_seed()
    seed = int(seed) & _MASK63
    shape = tuple(input_shape) if input_shape is not None else _model_input_shape(model)
    modules = [m for _, m in found]
    shapes = _record_input_shapes(model, modules, shape) if shape is not None else {}
    hub = None
    last = len(found) - 1
    if rule == "dfa":
        num_outputs = cfg.num_outputs or _output_size(found[-1][1], shapes.get(last), shape)
        hub = DFAHub(num_outputs)
    options_for_layer = {
        "feedback_seed": seed, "feedback_init": init,
        "feedback_sparsity": getattr(cfg, "feedback_sparsity", 0.0),
        "sign_scale": getattr(cfg, "sign_scale", "init"),
        "dfa_storage": getattr(cfg, "dfa_storage", "dense"),
        "dfa_conv": getattr(cfg, "dfa_conv", "dense"),
    }
    for index, (name, old) in enumerate(found):
        new = _swap(old, rule)
        layer_shape = shapes.get(index)
        if isinstance(new, FALinear):
            layer_shape = (new.in_features,)
        elif isinstance(new, FALocallyConnected2d):
            layer_shape = (new.in_channels, *new.input_size)
        new.configure_feedback(rule, layer_index=index, input_shape=layer_shape,
                               dfa_hub=hub, dfa_output=index == last,
                               bp_feedback=(index == last and cfg.last_layer_rule == "bp"),
                               **options_for_layer)
        if new is not old:
            _set_module(model, name, new)
    model.feedback_rule = rule  # type: ignore[assignment]
    model.feedback_config = cfg  # type: ignore[assignment]
    return model


def _output_size(layer: nn.Module, layer_input: tuple[int, ...] | None,
                 model_input: tuple[int, ...] | None) -> int:
    if isinstance(layer, nn.Linear):
        return layer.out_features
    if isinstance(layer, LocallyConnected2d):
        return layer.out_channels * math.prod(layer.output_size)
    if layer_input is not None:
        with torch.no_grad():
            out = F.conv2d(torch.zeros((1, *layer_input)), torch.zeros(
                layer.weight.shape), None, layer.stride, layer.padding, layer.dilation,
                layer.groups)
        return math.prod(out.shape[1:])
    raise ConfigError(
        "DFA needs the size of the network's output error: the last weight layer is a Conv2d "
        "whose output size depends on the input. Pass num_outputs=N (or input_shape=(C, H, W)) "
        "to bpdl.convert / the dfa rule options")
