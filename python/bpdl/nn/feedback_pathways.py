"""The feedback-alignment family's rules as *pathways*: how each rule sends the error below a
layer (docs/algorithms/feedback_alignment.md).

Every rule is one :class:`FeedbackPathway` subclass, registered by name in :data:`PATHWAYS` next
to its options dataclass: its feedback tensors (created once, as buffers or parameters of the
layer, in W's layout), its ``torch.autograd.Function`` (one per rule, below), the state it keeps
in checkpoints and the signal the alignment metrics compare with backprop's. A feedback layer
(:class:`bpdl.nn.feedback.FeedbackLayer`) holds one pathway and supplies the geometry (Linear,
Conv2d or locally connected forward and backward maps).

=====================  ==========================================================================
rule (pathway)         signal sent to the layer below, for the layer's error delta = dL/da
=====================  ==========================================================================
``fa``                 B^T delta, B fixed random (Lillicrap et al. 2016)
``dfa``                D^T e, e the *output* error, D fixed random per layer (Nokland 2016)
``usf``/``frsf``/      (sign(W) * M)^T delta, M a constant, a fixed |R| or an |R| redrawn at
``brsf``               every update (Liao, Leibo & Poggio 2016; Xiao et al. 2018)
``kp``                 B^T delta, and B receives W's update (Kolen-Pollack; Akrout et al. 2019)
``wm``                 B^T delta, B learned by weight mirrors (Akrout et al. 2019)
``bp``                 W^T delta (backprop; the reference the others are measured against)
=====================  ==========================================================================
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from bpdl import ops
from bpdl.errors import ConfigError, UnknownNameError
from bpdl.functional.feedback import dfa_feedback_matrix, dfa_scale
from bpdl.functional.losses import check_loss
from bpdl.nn.init import INITS
from bpdl.registry import Registry

__all__ = [
    "PATHWAYS", "DFAConfig", "DFAHub", "FAConfig", "FeedbackConfig", "FeedbackPathway",
    "KPConfig", "SignSymmetryConfig", "WMConfig", "pathway_class", "rule_options_class",
]

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
                layer: nn.Module) -> Tensor:
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
                layer: nn.Module, step: int) -> Tensor:
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
            feedback = layer.pathway.random_feedback(weight, ctx.step)
        elif magnitude.dim() == 0:  # uSF: B = c sign(W); scale the (smaller) signal instead
            feedback, scale = torch.sign(weight), magnitude
        else:  # frSF
            feedback = ops.sign_feedback(weight, magnitude)
        gi, gw, gb = layer.backward_math(grad_output, x, feedback, need[0], need[1], need[2])
        if gi is not None and scale is not None:
            gi = gi.mul_(scale)
        return gi, gw, gb, None, None, None


class KolenPollackFunction(FeedbackAlignmentFunction):
    """Kolen-Pollack learning (Kolen & Pollack 1994; Akrout, Wilson, Humphreys, Lillicrap & Tweed
    2019, NeurIPS 32).

    Backward, for delta = dL/da: dL/dW = delta h^T, dL/db = sum delta, g = B^T delta, and B
    receives the *same* gradient as W, dL/dB := delta h^T (in W's layout, untransposed). With
    the same optimiser state and a decoupled decay lambda on both, W - B shrinks as
    (1 - lambda)^t and B aligns with W. The forward is feedback alignment's.
    """

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
    in the model's :class:`DFAHub`; each lower layer reads it there (through its pathway).
    Nothing per layer is stored beyond D (with ``dfa_storage="regenerate"`` not even D), and no
    second backward pass runs: a hidden layer never computes W^T delta at all.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, feedback: Tensor,
                layer: nn.Module) -> Tensor:
        pathway = layer.pathway
        ctx.layer = layer
        ctx.token = pathway.hub.next_forward() if pathway.output else pathway.hub.forward_count + 1
        ctx.save_for_backward(x, weight, feedback)
        return layer.forward_math(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        layer = ctx.layer
        x, weight, feedback = ctx.saved_tensors
        need = ctx.needs_input_grad
        pathway = layer.pathway
        if pathway.output:
            error = pathway.hub.set_error(ctx.token, grad_output)
        else:
            error = pathway.hub.error_for(ctx.token)
        gi = None
        if need[0]:
            if pathway.output and pathway.kind == "weight":
                gi, _, _ = layer.backward_math(grad_output, x, weight, True, False, False)
            else:
                gi = pathway.signal(error, x, feedback)
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




# ---- the pathways, one per rule -----------------------------------------------------------------

#: Feedback rules by name: each entry is a :class:`FeedbackPathway` subclass that names its
#: options dataclass (``config_cls``). The one list of the family's rules.
PATHWAYS: Registry[type] = Registry("feedback rule")


def _pathway(name: str):
    """Class decorator: register a pathway under ``name`` (its ``name`` attribute)."""

    def decorator(cls: type) -> type:
        cls.name = name
        PATHWAYS.add(name, cls)
        return cls

    return decorator


def pathway_class(rule: str) -> type[FeedbackPathway]:
    """The pathway of feedback rule ``rule`` (UnknownNameError listing the rules otherwise)."""
    return PATHWAYS.get(rule)


def rule_options_class(rule: str) -> type:
    """The options dataclass of feedback rule ``rule``."""
    return pathway_class(rule).config_cls


class FeedbackPathway:
    """How one rule sends the error below one layer: the rule's state (created once, as buffers
    or parameters *of the layer*, so ``state_dict`` keys stay the layer's), its autograd
    Function, what it keeps in checkpoints and what the alignment metrics read.

    The layer supplies the geometry (``forward_math``, ``backward_math``, ``init_std``) and the
    keys of its random stream (``feedback_seed``, ``layer_index``, ``feedback_init``); the
    pathway supplies the rule. ``last_layer_bp``: the output layer under
    ``last_layer_rule="bp"`` backpropagates and holds no feedback state.
    """

    name: ClassVar[str] = "bp"
    config_cls: ClassVar[type] = FeedbackConfig
    function: ClassVar[type[torch.autograd.Function] | None] = None

    def __init__(self, layer: nn.Module, *, last_layer_bp: bool = False, **options: Any):
        self.layer = layer
        self.last_layer_bp = bool(last_layer_bp)
        if not self.last_layer_bp:
            self.create_state(**options)

    def create_state(self, **options: Any) -> None:
        """Register the rule's feedback tensors on the layer (called once)."""

    @property
    def active(self) -> bool:
        """Whether the backward differs from backprop's."""
        return self.function is not None and not self.last_layer_bp

    def forward(self, x: Tensor) -> Tensor:
        """The layer's output, through the rule's Function when gradients are recorded."""
        layer = self.layer
        if not self.active:
            return layer.forward_math(x, layer.weight, layer.bias)
        return self.function.apply(x, layer.weight, layer.bias, self.feedback_tensor(), layer)

    def feedback_tensor(self) -> Tensor | None:
        layer = self.layer
        return layer._buffers.get("feedback", layer._parameters.get("feedback"))

    def feedback_weight(self) -> Tensor | None:
        """The tensor the backward uses in W's place (W's layout), None where there is none."""
        return None

    def signal_sent(self, delta: Tensor, x: Tensor, output_error: Tensor | None) -> Tensor | None:
        """What the layer sends below for its error ``delta`` (the alignment metrics compare it
        with W^T delta): B^T delta where the rule has a B."""
        feedback = self.feedback_weight()
        if feedback is None:
            return None
        return self.layer.backward_math(delta, x, feedback, True, False, False)[0]

    def draw_random(self, stream: int) -> Tensor:
        """A float64 tensor shaped like W from the feedback initialiser, on the CPU (the same
        numbers whatever W's device), keyed by (seed, layer, stream)."""
        layer = self.layer
        g = torch.Generator().manual_seed(_mix_seed(layer.feedback_seed, layer.layer_index, stream))
        std = layer.init_std(layer.feedback_init)
        out = torch.empty(layer.weight.shape, dtype=torch.float64)
        if layer.feedback_init.endswith("normal"):
            out.normal_(0.0, std, generator=g)
        else:
            bound = math.sqrt(3.0) * std
            out.uniform_(-bound, bound, generator=g)
        return out

    def _register(self, name: str, value: Tensor, parameter: bool = False) -> None:
        w = self.layer.weight
        value = value.to(w.device, w.dtype)
        if parameter:
            setattr(self.layer, name, nn.Parameter(value))
        else:
            self.layer.register_buffer(name, value)

    def extra_state(self) -> dict[str, Any]:
        """What checkpoints record about the pathway besides its tensors."""
        return {}

    def check_state(self, state: dict[str, Any]) -> None:
        """ConfigError if a checkpoint's recorded state does not fit this pathway."""

    def describe(self) -> str:
        return f"mode={self.name}" + (", last_layer_rule=bp" if self.last_layer_bp else "")


@_pathway("bp")
class BackpropPathway(FeedbackPathway):
    """Backprop: W^T delta (the reference every rule is measured against)."""


@_pathway("fa")
class FeedbackAlignmentPathway(FeedbackPathway):
    """Feedback alignment (L16): a fixed random B from the feedback initialiser; with
    ``feedback_sparsity`` q a random fraction q of its entries is zero."""

    config_cls = FAConfig
    function = FeedbackAlignmentFunction

    def create_state(self, feedback_sparsity: float = 0.0, **_: Any) -> None:
        b = self.draw_random(stream=1)
        if feedback_sparsity > 0:
            layer = self.layer
            g = torch.Generator().manual_seed(_mix_seed(layer.feedback_seed, layer.layer_index, 2))
            keep = torch.rand(b.shape, generator=g) >= feedback_sparsity
            b = b * keep.to(b.dtype)
        self._register("feedback", b)

    def feedback_weight(self) -> Tensor | None:
        return None if self.last_layer_bp else self.layer.feedback


@_pathway("wm")
class WeightMirrorPathway(FeedbackAlignmentPathway):
    """Weight mirrors (A19): FA's pathway, with a B that the ``wm`` rule learns in mirror steps
    (a buffer it updates with an optimiser of its own)."""

    config_cls = WMConfig

    def create_state(self, **_: Any) -> None:
        self._register("feedback", self.draw_random(stream=1))


@_pathway("kp")
class KolenPollackPathway(FeedbackAlignmentPathway):
    """Kolen-Pollack (A19): B is a parameter that receives W's gradient."""

    config_cls = KPConfig
    function = KolenPollackFunction

    def create_state(self, **_: Any) -> None:
        self._register("feedback", self.draw_random(stream=1), parameter=True)


class SignSymmetryPathway(FeedbackPathway):
    """Sign symmetry (LLP16, X18): B = sign(W) * M, rebuilt from the current W in the backward."""

    config_cls = SignSymmetryConfig
    function = SignSymmetryFunction

    def forward(self, x: Tensor) -> Tensor:
        if not self.active:
            return super().forward(x)
        layer = self.layer
        return self.function.apply(x, layer.weight, layer.bias, layer.feedback_magnitude, layer, 0)

    def feedback_weight(self) -> Tensor | None:
        if self.last_layer_bp:
            return None
        return ops.sign_feedback(self.layer.weight.detach(), self.layer.feedback_magnitude)


@_pathway("usf")
class UniformSignPathway(SignSymmetryPathway):
    """uSF: M = c, a constant (``sign_scale``: the initialiser's std, X18's conv value, or a
    number)."""

    def create_state(self, sign_scale: str | float = "init", **_: Any) -> None:
        layer = self.layer
        if isinstance(sign_scale, (int, float)):
            c = float(sign_scale)
        elif sign_scale == "x18":
            receptive = math.prod(getattr(layer, "kernel_size", (1,)))
            c = math.sqrt(2.0 / (receptive * layer._out_units()))
        else:
            c = layer.init_std(layer.feedback_init)
        self._register("feedback_magnitude", torch.tensor(c, dtype=torch.float64))


@_pathway("frsf")
class FixedRandomSignPathway(SignSymmetryPathway):
    """frSF: M = |R|, drawn once from the feedback initialiser."""

    def create_state(self, **_: Any) -> None:
        self._register("feedback_magnitude", self.draw_random(stream=1).abs())


@_pathway("brsf")
class BatchwiseRandomSignPathway(SignSymmetryPathway):
    """brSF: M = |R_t|, redrawn at every update inside the fused kernel, keyed by (seed, layer,
    update counter ``feedback_step``) so a resumed run redraws the same."""

    def create_state(self, **_: Any) -> None:
        w = self.layer.weight
        self.layer.register_buffer("feedback_step", torch.zeros((), dtype=torch.int64,
                                                                device=w.device))

    def forward(self, x: Tensor) -> Tensor:
        if not self.active:
            return FeedbackPathway.forward(self, x)
        layer = self.layer
        layer.feedback_step.add_(1)  # a fresh |R| for every update
        return self.function.apply(x, layer.weight, layer.bias, None, layer,
                                   int(layer.feedback_step))

    def random_feedback(self, weight: Tensor, step: int) -> Tensor:
        """B = sign(W) |R_t| for update ``step``, |R_t| from the feedback initialiser
        (|U(-b, b)| = U(0, b) or a half-normal)."""
        layer = self.layer
        std = layer.init_std(layer.feedback_init)
        if layer.feedback_init.endswith("normal"):
            return ops.sign_random_feedback(weight, layer.feedback_seed, layer.layer_index, step,
                                            "half_normal", std)
        return ops.sign_random_feedback(weight, layer.feedback_seed, layer.layer_index, step,
                                        "uniform", math.sqrt(3.0) * std)

    def feedback_weight(self) -> Tensor | None:
        """The magnitude of the most recent update."""
        if self.last_layer_bp:
            return None
        return self.random_feedback(self.layer.weight.detach(), int(self.layer.feedback_step))


@_pathway("dfa")
class DirectFeedbackPathway(FeedbackPathway):
    """Direct feedback alignment (N16): the output error e reaches every hidden layer through
    its own fixed random D (n_L, input features), D^T e delivered to the layer's input.

    ``kind``: ``dense`` (D stored), ``regenerate`` (D drawn inside the kernel, nothing stored),
    ``tiled`` (SA21's Conv2d variant), ``none`` (the first layer: nothing below it) or
    ``weight`` (the output layer under ``last_layer_rule="bp"``: W^T e).
    """

    config_cls = DFAConfig
    function = DirectFeedbackAlignmentFunction

    def __init__(self, layer: nn.Module, *, last_layer_bp: bool = False, **options: Any):
        # DFA's output layer sends e itself; "bp" there means W^T e, kind "weight"
        self.hub: DFAHub | None = None
        self.output = False
        self.kind = "dense"
        self.scale = 0.0
        super().__init__(layer, last_layer_bp=False, bp_feedback=last_layer_bp, **options)

    def create_state(self, dfa_hub: DFAHub | None = None, dfa_output: bool = False,
                     dfa_storage: str = "dense", dfa_conv: str = "dense",
                     bp_feedback: bool = False, **_: Any) -> None:
        if dfa_hub is None:
            raise ConfigError("a DFA layer needs the model's DFAHub; use bpdl.convert(model, "
                              "rule='dfa')")
        self.hub, self.output = dfa_hub, bool(dfa_output)
        layer, num_outputs = self.layer, dfa_hub.num_outputs
        empty = torch.empty(0)
        if self.output and bp_feedback:
            self.kind = "weight"
            self._register("feedback", empty)
        elif layer.layer_index == 0:
            # the first layer's input is the data: nothing is sent below it, nothing stored
            self.kind = "none"
            self._register("feedback", empty)
        elif dfa_conv == "tiled" and isinstance(layer, nn.Conv2d):
            self._create_tiled(num_outputs)
        else:
            features = self._input_features()
            self.scale = dfa_scale(num_outputs, features)
            if dfa_storage == "regenerate":
                self.kind = "regenerate"
                self._register("feedback", empty)
            else:
                self.kind = "dense"
                w = layer.weight
                self._register("feedback", dfa_feedback_matrix(
                    num_outputs, features, layer.feedback_seed, layer.layer_index, self.scale,
                    w.dtype, w.device))

    def _create_tiled(self, num_outputs: int) -> None:
        layer = self.layer
        if layer.groups != 1:
            raise ConfigError("dfa_conv='tiled' supports Conv2d layers with groups=1 only")
        self.kind = "tiled"
        shape = (num_outputs, layer.in_channels, *layer.kernel_size)
        fan_in, fan_out = layer.in_channels * math.prod(layer.kernel_size), \
            num_outputs * math.prod(layer.kernel_size)
        self.scale = math.sqrt(6.0 / (fan_in + fan_out))
        w = layer.weight
        d = dfa_feedback_matrix(num_outputs, math.prod(shape[1:]), layer.feedback_seed,
                                layer.layer_index, self.scale, w.dtype, w.device)
        self._register("feedback", d.reshape(shape))

    def _input_features(self) -> int:
        layer = self.layer
        if layer.input_shape is None:
            raise ConfigError(
                f"DFA on a {layer.layer_type} layer needs its input shape; pass "
                f"input_shape=(C, H, W) of the model's input to bpdl.convert (models built by "
                f"bpdl record it)")
        return math.prod(layer.input_shape)

    @property
    def active(self) -> bool:
        return True

    def forward(self, x: Tensor) -> Tensor:
        layer = self.layer
        if self.hub is None:
            raise ConfigError(f"DFA layer {layer.__class__.__name__} is not connected to an "
                              f"output layer; prepare the model with bpdl.convert(model, "
                              f"rule='dfa') (or build the 'dfa' rule on it)")
        if isinstance(layer, nn.Linear) and x.dim() != 2:
            raise ConfigError(f"DFA on a Linear layer needs (N, features) inputs, got "
                              f"{tuple(x.shape)}")
        return self.function.apply(x, layer.weight, layer.bias, self.feedback_tensor(), layer)

    def signal(self, error: Tensor, x: Tensor, feedback: Tensor) -> Tensor:
        """D^T e delivered to this layer's input (shape of x)."""
        layer = self.layer
        if self.kind == "none":
            raise RuntimeError("DFA: the first layer sends no signal below it")
        if self.kind == "tiled":
            n, (oh, ow) = x.shape[0], layer._output_hw(x)
            tiled = error[:, :, None, None].expand(n, error.shape[1], oh, ow)
            return torch.ops.aten.convolution_backward(
                tiled.contiguous(), x, feedback, None, list(layer.stride),
                list(layer._padding_ints), list(layer.dilation), False, [0, 0], 1,
                [True, False, False])[0]
        features = math.prod(x.shape[1:])
        if self.kind == "regenerate":
            out = ops.dfa_project(error.to(x.dtype), features, layer.feedback_seed,
                                  layer.layer_index, self.scale)
        else:
            if feedback.shape[1] != features:
                raise ConfigError(f"DFA feedback of this layer expects inputs of "
                                  f"{feedback.shape[1]} values per example, got {features} "
                                  f"({tuple(x.shape[1:])})")
            out = error.to(feedback.dtype) @ feedback
        return out.reshape(x.shape)

    def signal_sent(self, delta: Tensor, x: Tensor, output_error: Tensor | None) -> Tensor | None:
        if self.kind in ("none", "weight") or output_error is None:
            return None
        return self.signal(output_error, x, self.layer.feedback)

    def release(self) -> None:
        """Drop the output error carried since the last backward."""
        if self.hub is not None:
            self.hub.release()

    def extra_state(self) -> dict[str, Any]:
        return {"dfa_feedback_kind": self.kind}

    def check_state(self, state: dict[str, Any]) -> None:
        kind = state.get("dfa_feedback_kind", self.kind)
        if kind != self.kind:
            raise ConfigError(f"checkpoint layer {self.layer.layer_index} used DFA feedback "
                              f"{kind!r} but this layer uses {self.kind!r}")

    def describe(self) -> str:
        return f"mode=dfa, dfa={self.kind}"

