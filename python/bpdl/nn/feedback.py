"""Feedback-alignment layers: Linear, Conv2d and locally connected layers whose backward pass
sends the error through feedback weights instead of the transposed forward weights
(docs/algorithms/feedback_alignment.md).

The forward pass of every layer here is the ordinary one (bit for bit). Only the backward pass
changes: each layer holds one :class:`~bpdl.nn.feedback_pathways.FeedbackPathway`, the rule's
feedback state and autograd Function, chosen by name from
:data:`~bpdl.nn.feedback_pathways.PATHWAYS` (fa, dfa, usf, brsf, frsf, kp, wm, bp).

In every rule the layer's own parameter gradients are backprop's, dL/dW = delta h^T and
dL/db = sum delta; the output layer always receives the true error; BatchNorm, pooling and
activations in between apply their exact local backward to whatever signal reaches them.
Feedback tensors are buffers (a parameter for Kolen-Pollack) of the layer in the layout of W,
created once (at construction or conversion) and saved in ``state_dict``.

Two ways in: the layer classes :class:`FALinear`, :class:`FAConv2d` and
:class:`FALocallyConnected2d` (one class per layer type, the rule is its ``mode``), and
:func:`convert`, which swaps the Linear, Conv2d and LocallyConnected2d layers of an existing
model for them in place, sharing the parameters, so the forward outputs stay bit-identical.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bpdl import ops
from bpdl.config import from_dict
from bpdl.errors import ConfigError, UnknownNameError
from bpdl.nn.feedback_pathways import (
    _MASK63,
    PATHWAYS,
    DFAConfig,
    DFAHub,
    FAConfig,
    FeedbackPathway,
    KPConfig,
    SignSymmetryConfig,
    WMConfig,
    pathway_class,
    rule_options_class,
)
from bpdl.nn.init import INITS, init_std
from bpdl.nn.locally_connected import LocallyConnected2d

__all__ = [
    "DFAConfig", "FAConfig", "FAConv2d", "FALinear", "FALocallyConnected2d", "FEEDBACK_RULES",
    "FeedbackLayer", "KPConfig", "SignSymmetryConfig", "WMConfig", "convert", "feedback_layers",
    "use_backprop", "rule_options_class",
]

# the pathways' own names (every rule but the reference, "bp"), for help texts and tests
FEEDBACK_RULES = tuple(name for name in PATHWAYS.names() if name != "bp")


class FeedbackLayer(nn.Module):
    """Mixin of the feedback-alignment layers: the layer's pathway, the keys of its random
    feedback stream, the forward dispatch and checkpoints.

    Subclasses implement :meth:`forward_math` (the plain forward), :meth:`backward_math`
    (gradients with a given tensor in W's place for the input gradient) and
    :meth:`_out_units`.
    """

    layer_type: ClassVar[str] = "layer"
    weight: nn.Parameter
    bias: nn.Parameter | None

    def _init_feedback(self) -> None:
        self.feedback_seed = 0
        self.layer_index = 0
        self.feedback_init = "xavier_uniform"
        self.input_shape: tuple[int, ...] | None = None
        self._use_bp = False
        self.pathway: FeedbackPathway = PATHWAYS.get("bp")(self)

    @property
    def mode(self) -> str:
        """The rule of this layer's pathway (bp, fa, dfa, usf, brsf, frsf, kp, wm)."""
        return self.pathway.name

    @property
    def last_layer_bp(self) -> bool:
        """Whether this (output) layer backpropagates under ``last_layer_rule="bp"``."""
        return self.pathway.last_layer_bp

    # -- configuration ------------------------------------------------------------------------
    def configure_feedback(self, mode: str, *, feedback_seed: int = 0, layer_index: int = 0,
                           feedback_init: str = "xavier_uniform",
                           input_shape: Sequence[int] | None = None,
                           bp_feedback: bool = False, **options: Any) -> None:
        """(Re)create the rule's feedback state for ``mode``. Called once, at construction or
        conversion; never inside forward.

        Args:
            mode: a registered pathway: bp, fa, dfa, usf, brsf, frsf, kp, wm.
            feedback_seed, layer_index: key of this layer's random feedback stream.
            feedback_init: initialiser family of random feedback (as W's, drawn independently).
            input_shape: the input shape without the batch (DFA on Conv2d/LC layers and weight
                mirrors on Conv2d layers need it).
            bp_feedback: the output layer under ``last_layer_rule="bp"``: send W^T e.
            **options: the pathway's own: ``feedback_sparsity`` (fa), ``sign_scale`` (usf),
                ``dfa_hub``, ``dfa_output``, ``dfa_storage``, ``dfa_conv`` (dfa).
        """
        cls = pathway_class(mode)
        if mode != "bp" and feedback_init not in INITS:
            raise UnknownNameError("initialiser", feedback_init, INITS)
        for name in ("feedback", "feedback_magnitude", "feedback_step"):
            self._buffers.pop(name, None)
            self._parameters.pop(name, None)
        self.feedback_seed = int(feedback_seed) & _MASK63
        self.layer_index = int(layer_index)
        self.feedback_init = feedback_init
        if input_shape is not None:
            self.input_shape = tuple(int(s) for s in input_shape)
        self.pathway = cls(self, last_layer_bp=bool(bp_feedback), **options)

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

    # -- what the rule sends back, for metrics -------------------------------------------------
    def feedback_weight(self) -> Tensor | None:
        """The tensor this layer's backward uses in W's place (None for DFA and bp). brSF: the
        magnitude of the most recent update."""
        return self.pathway.feedback_weight()

    # -- forward --------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        if self._use_bp or not torch.is_grad_enabled():
            return self.forward_math(x, self.weight, self.bias)
        return self.pathway.forward(x)

    # -- checkpoints ----------------------------------------------------------------------------
    def get_extra_state(self) -> dict[str, Any]:
        # "dfa_feedback_kind" is recorded for every layer (as bpdl 0.1.0 did), DFA's own below
        return {"mode": self.mode, "layer_index": self.layer_index,
                "feedback_seed": self.feedback_seed, "dfa_feedback_kind": "dense",
                "last_layer_bp": self.last_layer_bp, **self.pathway.extra_state()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        mode = state.get("mode")
        if mode != self.mode:
            raise ConfigError(f"checkpoint layer {self.layer_index} was trained with rule "
                              f"{mode!r} but this layer uses {self.mode!r}; convert the model "
                              f"with rule={mode!r} before loading")
        self.pathway.check_state(state)
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
        return self.pathway.describe()


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

