"""Feedback-alignment family: the rules' backward passes against hand computations and
backprop, conversion, checkpoints, alignment metrics, bad input (docs/algorithms/feedback_alignment.md)."""

from __future__ import annotations

import copy
import io
import math

import bpdl
import pytest
import torch
from bpdl import functional as F
from bpdl import nn as bnn
from bpdl import rules
from bpdl.errors import ConfigError
from bpdl.metrics import angle_degrees
from bpdl.nn import FAConv2d, FALinear, FALocallyConnected2d, LocallyConnected2d
from bpdl.optim import OPTIMIZERS, build_optimizer
from torch import nn

RULES = ["fa", "dfa", "usf", "brsf", "frsf", "kp", "wm"]


class Mixed(nn.Module):
    """LC -> tanh -> Conv2d -> BatchNorm -> ReLU -> MaxPool -> Linear -> tanh -> Linear."""

    def __init__(self):
        super().__init__()
        self.input_shape = (2, 8, 8)
        self.lc = LocallyConnected2d(2, 3, (8, 8), 3, 1, "same")
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(4 * 4 * 4, 6)
        self.fc2 = nn.Linear(6, 5)

    def forward(self, x):
        h = torch.tanh(self.lc(x))
        h = self.pool(torch.relu(self.bn(self.conv(h))))
        return self.fc2(torch.tanh(self.fc1(h.flatten(1))))


def _mixed(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return Mixed().to(dtype)


def _batch(dtype=torch.float64, n=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, 8, 8, generator=g, dtype=dtype), torch.randint(0, 5, (n,), generator=g)


def _grads(model, x, y):
    model.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


# ---- FA with B = W is backprop ------------------------------------------------------------------

@pytest.mark.parametrize("rule", ["fa", "kp", "wm"])
def test_fa_with_feedback_set_to_w_gives_exactly_the_bp_gradients(rule):
    reference = _mixed()
    model = copy.deepcopy(reference)
    bpdl.convert(model, rule)
    kinds = {type(m) for m in model.modules()}
    assert {FALinear, FAConv2d, FALocallyConnected2d} <= kinds
    with torch.no_grad():
        for _, layer in bnn.feedback_layers(model):
            layer.feedback.copy_(layer.weight)
    x, y = _batch()
    expected = _grads(reference, x, y)
    got = _grads(model, x, y)
    for name, grad in expected.items():
        assert torch.equal(got[name], grad), name  # bit for bit: same kernels, same order
    # with the random B they differ below the output layer
    bpdl.convert(model, rule)
    got = _grads(model, x, y)
    assert torch.equal(got["fc2.weight"], expected["fc2.weight"])
    assert not torch.allclose(got["fc1.weight"], expected["fc1.weight"])
    assert not torch.allclose(got["lc.weight"], expected["lc.weight"])


def test_fa_signal_is_b_transpose_delta_by_hand():
    layer = FALinear(4, 3, mode="fa", feedback_seed=5)
    x = torch.randn(2, 4, requires_grad=True)
    delta = torch.randn(2, 3)
    layer(x).backward(delta)
    torch.testing.assert_close(x.grad, delta @ layer.feedback)
    torch.testing.assert_close(layer.weight.grad, delta.t() @ x.detach())
    torch.testing.assert_close(layer.bias.grad, delta.sum(0))
    # B is a buffer drawn once from the initialiser: same shape as W, not W
    assert "feedback" in dict(layer.named_buffers())
    assert layer.feedback.shape == layer.weight.shape
    assert not torch.allclose(layer.feedback, layer.weight)


def test_fa_feedback_sparsity_zeroes_that_fraction():
    model = bnn.build_model("mlp", (1, 28, 28), 10)
    bpdl.convert(model, "fa", feedback_sparsity=0.5)
    b = model.layers[0].feedback
    assert abs(float((b == 0).double().mean()) - 0.5) < 0.01


# ---- DFA -----------------------------------------------------------------------------------------

def test_dfa_hidden_updates_match_a_hand_computation():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3), nn.Tanh(), nn.Linear(3, 2))
    bpdl.convert(model, "dfa")
    fc0, fc1, fc2 = model[0], model[2], model[4]
    assert fc0.feedback.numel() == 0  # the first layer sends nothing below: nothing stored
    assert fc1.feedback.shape == (2, 5) and fc2.feedback.shape == (2, 3)
    x = torch.randn(6, 4)
    y = torch.tensor([0, 1, 1, 0, 1, 0])
    nn.functional.cross_entropy(model(x), y).backward()
    with torch.no_grad():
        a0 = fc0(x)
        h0 = torch.tanh(a0)
        a1 = fc1(h0)
        h1 = torch.tanh(a1)
        a2 = fc2(h1)
        e = (torch.softmax(a2, 1) - nn.functional.one_hot(y, 2)) / 6  # dL/da_L, batch mean
        delta1 = (e @ fc2.feedback) * (1 - h1**2)  # D reaches layer 1 through the output layer
        delta0 = (e @ fc1.feedback) * (1 - h0**2)
    torch.testing.assert_close(fc2.weight.grad, e.t() @ h1)  # output layer: the true error
    torch.testing.assert_close(fc1.weight.grad, delta1.t() @ h0)
    torch.testing.assert_close(fc0.weight.grad, delta0.t() @ x)
    torch.testing.assert_close(fc0.bias.grad, delta0.sum(0))


def test_dfa_regenerated_feedback_trains_like_the_stored_one():
    data = _batch(torch.float32, n=16)
    out = []
    for storage in ("dense", "regenerate"):
        model = _mixed(torch.float32)
        learner = rules.build("dfa", model, {"dfa_storage": storage, "feedback_seed": 4})
        opt = torch.optim.SGD(learner.parameters(), lr=0.1)
        for _ in range(3):
            opt.zero_grad()
            learner.training_step(*data)
            opt.step()
        out.append({k: v.clone() for k, v in model.state_dict().items()
                    if torch.is_tensor(v) and "feedback" not in k})
        if storage == "regenerate":
            assert all(layer.feedback.numel() == 0 for _, layer in bnn.feedback_layers(model))
    for key, value in out[0].items():
        torch.testing.assert_close(out[1][key], value, rtol=1e-5, atol=1e-6)


def test_dfa_tiled_conv_replicates_the_error_over_positions():
    model = _mixed()
    bpdl.convert(model, "dfa", dfa_conv="tiled")
    conv = model.conv
    assert conv.pathway.kind == "tiled" and conv.feedback.shape == (5, 3, 3, 3)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    e = torch.randn(2, 5, dtype=torch.float64)
    signal = conv.pathway.signal(e, x, conv.feedback)
    expected = torch.nn.grad.conv2d_input(x.shape, conv.feedback, e[:, :, None, None].expand(
        2, 5, 8, 8), padding=1)
    torch.testing.assert_close(signal, expected)
    # Linear and LC layers stay dense in the tiled variant
    assert model.fc1.pathway.kind == "dense" and model.lc.pathway.kind == "none"


def test_dfa_hidden_layer_without_output_error_raises():
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    bpdl.convert(model, "dfa")
    hidden = model[:2](torch.randn(2, 4))
    with pytest.raises(RuntimeError, match="without the output error"):
        hidden.sum().backward()  # the output layer is not part of this loss


# ---- sign symmetry -------------------------------------------------------------------------------

@pytest.mark.parametrize("rule", ["usf", "brsf", "frsf"])
def test_sign_symmetric_feedback_is_sign_w_times_scale_after_every_step(rule):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4))
    learner = rules.build(rule, model)
    out = model[2]
    c = math.sqrt(2.0 / (8 + 4))  # Xavier std of the 8 -> 4 layer
    with torch.no_grad():
        out.weight[0, :3] = 0.0  # sign(0) = 0: these send nothing
    opt = torch.optim.Adam(learner.parameters(), lr=0.05)
    x, y = torch.randn(16, 6), torch.randint(0, 4, (16,))
    magnitudes = []
    fixed = out.feedback_magnitude.clone() if rule == "frsf" else None
    for step in range(4):
        captured = {}
        hidden = model[1](model[0](x))
        hidden.register_hook(lambda g, store=captured: store.setdefault("signal", g))
        scores = out(hidden)
        delta = torch.autograd.grad(nn.functional.cross_entropy(scores, y), scores,
                                    retain_graph=True)[0]
        opt.zero_grad()
        nn.functional.cross_entropy(scores, y).backward()
        b = out.feedback_weight()
        if rule == "usf":
            torch.testing.assert_close(b, torch.sign(out.weight.detach()) * c)
        elif rule == "frsf":
            assert torch.equal(out.feedback_magnitude, fixed)  # |R| drawn once
            torch.testing.assert_close(b, torch.sign(out.weight.detach()) * fixed)
        else:
            # |R_t| of this update, regenerated from (seed, layer, update counter)
            reference = F.sign_random_feedback(out.weight.detach(), out.feedback_seed,
                                               out.layer_index, int(out.feedback_step),
                                               "uniform", math.sqrt(3) * c)
            assert torch.equal(b, reference)
            magnitudes.append(b.abs())
        assert torch.all(b[out.weight.detach() == 0] == 0)  # sign(0) = 0
        if step == 0:
            assert torch.all(b[0, :3] == 0)
        # the backward used exactly this B
        torch.testing.assert_close(captured["signal"], delta @ b)
        opt.step()
    if rule == "brsf":
        assert not torch.allclose(magnitudes[1], magnitudes[2])
        # |R| drawn from the initialiser: E|R| = bound / 2 for U(-bound, bound)
        bound = math.sqrt(3) * c
        assert abs(float(magnitudes[1][1:].mean()) / (bound / 2) - 1) < 0.25


def test_sign_symmetry_scale_options():
    for scale, expected in (("init", math.sqrt(2 / (6 + 3))), ("x18", math.sqrt(2 / 3)),
                            (0.25, 0.25)):
        layer = nn.Sequential(nn.Linear(6, 3))
        bpdl.convert(layer, "usf", sign_scale=scale)
        assert float(layer[0].feedback_magnitude) == pytest.approx(expected)
    conv = nn.Sequential(nn.Conv2d(2, 4, 3))
    bpdl.convert(conv, "usf", sign_scale="x18")
    assert float(conv[0].feedback_magnitude) == pytest.approx(math.sqrt(2 / (9 * 4)))


def test_batch_manhattan_sgd_steps_on_the_gradient_sign():
    p = nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    opt = OPTIMIZERS.get("bm_sgd")([p], lr=0.1)
    p.grad = torch.tensor([0.5, -7.0, 0.0])
    opt.step()
    torch.testing.assert_close(p.detach(), torch.tensor([0.9, -1.9, 3.0]))


# ---- Kolen-Pollack -------------------------------------------------------------------------------

@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_kp_invariant_and_alignment_on_a_regression_task(optimizer):
    torch.manual_seed(0)
    # non-square layers: a transposed increment would not even have B's shape (pitfall 8.1);
    # float64 so that the invariant is checked to 1e-6 of ||W - B||, not to float32 rounding
    model = nn.Sequential(nn.Linear(7, 12), nn.Tanh(), nn.Linear(12, 5)).double()
    decay = 0.01
    learner = rules.build("kp", model, {"decay": decay, "loss": "mse"})
    layer = model[2]
    assert isinstance(layer.feedback, nn.Parameter)
    groups = learner.parameter_groups()
    assert any(layer.feedback is p for p in groups[-1]["params"])  # B in W's group
    opt = build_optimizer(optimizer, groups, 0.05 if optimizer == "sgd" else 0.01)
    teacher = torch.randn(5, 7, dtype=torch.float64)
    angles = []
    for step in range(400):
        x = torch.randn(32, 7, dtype=torch.float64)
        target = x @ teacher.t()
        diff_before = (layer.weight - layer.feedback).detach().clone()
        opt.zero_grad()
        scores = model(x)
        loss = ((scores - target) ** 2).sum(1).mean()
        loss.backward()
        assert torch.equal(layer.feedback.grad, layer.weight.grad)
        opt.step()
        learner.after_step()
        diff_after = (layer.weight - layer.feedback).detach()
        # invariant of docs/algorithms/feedback_alignment.md §3.5
        assert float((diff_after - (1 - decay) * diff_before).norm()) <= \
            1e-6 * float(diff_before.norm())
        if step % 100 == 99:
            angles.append(angle_degrees(layer.weight, layer.feedback))
    assert angles[0] > angles[-1]
    assert angles[-1] < 10.0, angles


# ---- weight mirrors ----------------------------------------------------------------------------

def test_weight_mirrors_align_b_with_w():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 8), nn.Tanh(), nn.Linear(8, 4))
    learner = rules.build("wm", model, {"mirror_decay": 0.05, "mirror_lr": 0.5,
                                        "mirror_pretrain_steps": 0})
    before = angle_degrees(model[2].weight, model[2].feedback)
    for _ in range(300):
        learner.mirror_step(64)
    after = angle_degrees(model[2].weight, model[2].feedback)
    assert before > 80 and after < 10
    conv = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(3 * 6 * 6, 2))
    learner = rules.build("wm", conv, {"mirror_decay": 0.05, "mirror_lr": 0.1,
                                       "mirror_pretrain_steps": 0})
    bpdl.convert(conv, "wm", input_shape=(2, 8, 8), mirror_decay=0.05, mirror_lr=0.1,
                 mirror_pretrain_steps=0)
    for _ in range(200):
        learner.mirror_step(16)
    assert angle_degrees(conv[0].weight, conv[0].feedback) < 20


def test_weight_mirror_step_through_its_optimiser_is_the_published_update():
    """B <- (1 - lambda_B) B + eta_B sum_n y_n xi_n^T, bit for bit, with the increment taken by
    the rule's own "mirror" optimiser, which the loop builds, zeroes and checkpoints."""
    from bpdl.nn.feedback_pathways import _mix_seed
    from bpdl.train import RunConfig

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 8), nn.Tanh(), nn.Linear(8, 4))
    learner = rules.build("wm", model, {"mirror_decay": 0.05, "mirror_lr": 0.5,
                                        "mirror_pretrain_steps": 0})
    expected = []
    for layer in (model[0], model[2]):
        g = torch.Generator().manual_seed(_mix_seed(layer.feedback_seed, layer.layer_index, 4, 0))
        xi = torch.empty(64, layer.in_features).uniform_(-0.05, 0.05, generator=g)
        y = layer.forward_math(xi, layer.weight.detach(), None)
        delta = layer.backward_math(y, xi, layer.weight.detach(), False, True, False)[1]
        expected.append(layer.feedback.clone().mul_(1 - 0.05).add_(delta, alpha=0.5))
    learner.mirror_step(64)
    assert torch.equal(model[0].feedback, expected[0])
    assert torch.equal(model[2].feedback, expected[1])
    optimizers = learner.setup_optimizers(RunConfig(optimizer="adam", lr=1e-3))
    assert set(optimizers) == {"main", "mirror"}
    mirrored = optimizers["mirror"].param_groups[0]["params"]
    assert mirrored[0] is model[0].feedback and mirrored[1] is model[2].feedback
    assert optimizers["mirror"].param_groups[0]["lr"] == 0.5


# ---- conversion ----------------------------------------------------------------------------------

@pytest.mark.parametrize("model_name", ["mlp", "cnn", "lc"])
@pytest.mark.parametrize("rule", RULES)
def test_conversion_keeps_outputs_bit_identical(model_name, rule):
    torch.manual_seed(0)
    model = bnn.build_model(model_name, (1, 28, 28), 10,
                            {"hidden": [32]} if model_name != "cnn" else {"channels": [4, 8]})
    model.eval()
    x = torch.rand(5, 1, 28, 28)
    before = model(x)
    params = [id(p) for p in model.parameters()]
    bpdl.convert(model, rule)
    assert torch.equal(model(x), before)
    model.train()
    with torch.enable_grad():
        y = model(x)
    # the parameters are the same objects: an optimiser built before still works
    kept = [p for p in model.parameters() if id(p) in params]
    assert len(kept) == len(params)
    assert y.shape == (5, 10)


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS.names()))
def test_converted_model_is_trainable_with_every_optimizer(optimizer):
    model = _mixed(torch.float32)
    bpdl.convert(model, "frsf")
    opt = OPTIMIZERS.get(optimizer)(model.parameters(), lr=0.01)
    x, y = _batch(torch.float32, n=16)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert all(math.isfinite(v) for v in losses)
    for name, value in model.named_parameters():
        if name != "conv.bias":  # BatchNorm after the conv: its bias gets no gradient
            assert not torch.equal(value, before[name]), name


@pytest.mark.parametrize("rule", RULES)
def test_rule_survives_save_and_load(rule):
    model = _mixed(torch.float32, seed=1)
    bpdl.convert(model, rule, feedback_seed=11)
    x, y = _batch(torch.float32)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    fresh = _mixed(torch.float32, seed=2)
    bpdl.convert(fresh, rule, feedback_seed=99)  # different feedback until the load
    fresh.load_state_dict(torch.load(buffer))
    assert torch.equal(fresh.state_dict()["fc1.weight"], model.state_dict()["fc1.weight"])
    for key, value in model.state_dict().items():
        if torch.is_tensor(value):
            assert torch.equal(fresh.state_dict()[key], value), key
    # the same next update
    g1, g2 = _grads(model, x, y), _grads(fresh, x, y)
    for key in g1:
        torch.testing.assert_close(g2[key], g1[key])
    # the whole module pickles and deep-copies
    whole = io.BytesIO()
    torch.save(model, whole)
    whole.seek(0)
    loaded = torch.load(whole, weights_only=False)
    assert torch.equal(loaded(x), model(x))
    assert torch.equal(copy.deepcopy(model)(x), model(x))


def test_loading_a_checkpoint_of_another_rule_or_shape_is_refused():
    model = _mixed(torch.float32)
    bpdl.convert(model, "frsf")
    state = model.state_dict()
    other = _mixed(torch.float32)
    bpdl.convert(other, "fa")
    with pytest.raises(ConfigError, match="trained with rule 'frsf'"):
        other.load_state_dict(state)
    bad = _mixed(torch.float32)
    bpdl.convert(bad, "fa")
    state = bad.state_dict()
    state["fc1.feedback"] = torch.zeros(3, 3)
    with pytest.raises(ConfigError, match=r"checkpoint feedback 'fc1.feedback' has shape \(3, 3\)"):
        bad.load_state_dict(state)


def test_unsupported_layer_is_refused_with_its_name():
    model = nn.Sequential(nn.Conv1d(2, 3, 3), nn.Flatten(), nn.Linear(6, 2))
    with pytest.raises(ConfigError, match=r"does not support layer '0' of type Conv1d"):
        bpdl.convert(model, "fa")
    with pytest.raises(ConfigError, match="unknown feedback rule"):
        bpdl.convert(nn.Sequential(nn.Linear(2, 2)), "fancy")
    with pytest.raises(ConfigError, match="unknown dfa rule option"):
        bpdl.convert(nn.Sequential(nn.Linear(2, 2)), "dfa", feedback_sparsity=0.5)


def test_dfa_without_a_known_output_size_is_refused():
    model = nn.Sequential(nn.Linear(4, 4), nn.Unflatten(1, (1, 2, 2)), nn.Conv2d(1, 2, 1))
    with pytest.raises(ConfigError, match="DFA needs the size of the network's output"):
        bpdl.convert(model, "dfa")
    bpdl.convert(model, "dfa", input_shape=(4,))
    assert model[2].pathway.hub.num_outputs == 8 and model[2].feedback.shape == (8, 4)
    model(torch.randn(3, 4)).sum().backward()
    assert model[0].weight.grad is not None
    # a hidden Conv2d's dense D needs the layer's input shape
    hidden_conv = nn.Sequential(nn.Linear(2, 8), nn.Unflatten(1, (2, 2, 2)), nn.Conv2d(2, 2, 1),
                                nn.Flatten(), nn.Linear(8, 3))
    with pytest.raises(ConfigError, match="DFA on a Conv2d layer needs its input shape"):
        bpdl.convert(hidden_conv, "dfa")
    bpdl.convert(hidden_conv, "dfa", input_shape=(2,))
    assert hidden_conv[2].feedback.shape == (3, 8)


# ---- rules in the training loop, alignment metrics ------------------------------------------------

def test_alignment_metrics_of_fa_and_dfa():
    torch.manual_seed(0)
    x = torch.rand(32, 1, 28, 28)
    y = torch.randint(0, 10, (32,))
    model = bnn.build_model("mlp", (1, 28, 28), 10, {"hidden": [50, 40]})
    learner = rules.build("fa", model)
    metrics = learner.alignment(x, y)
    first, middle, last = metrics["layers.0"], metrics["layers.1"], metrics["layers.2"]
    assert first["feedback_used"] == 0.0 and middle["feedback_used"] == 1.0
    assert 70 < first["angle_weight_feedback"] < 110  # random B: about 90 degrees
    assert last["angle_update_bp"] == pytest.approx(0.0, abs=1e-6)  # the true error
    assert middle["angle_update_bp"] > 30 and "angle_signal_local" in middle
    assert middle["norm_ratio_feedback"] == pytest.approx(1.0, abs=0.1)
    # setting B = W makes every angle zero
    with torch.no_grad():
        for _, layer in bnn.feedback_layers(model):
            layer.feedback.copy_(layer.weight)
    for values in learner.alignment(x, y).values():
        for key, value in values.items():
            if key.startswith("angle"):
                assert value == pytest.approx(0.0, abs=1e-3), key
    dfa = rules.build("dfa", bnn.build_model("cnn", (1, 28, 28), 10, {"channels": [4, 8]}))
    metrics = dfa.alignment(x, y)
    assert set(metrics) == {"blocks.0.0", "blocks.1.0", "readout"}
    assert all("angle_update_bp" in v and "angle_weight_feedback" not in v
               for v in metrics.values())


def test_alignment_probe_leaves_batchnorm_statistics_untouched():
    learner = rules.build("brsf", bnn.build_model("cnn", (1, 28, 28), 10, {"channels": [4]}))
    before = copy.deepcopy(learner.model.state_dict())
    learner.alignment(torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,)))
    for key, value in learner.model.state_dict().items():
        if torch.is_tensor(value):
            assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("rule", RULES)
def test_rules_train_in_the_loop_and_log_alignment(rule, synthetic_data, tmp_path):
    from bpdl.train import RunConfig, train

    cfg = RunConfig(dataset="synthetic", model="mlp", model_options={"hidden": [32]}, rule=rule,
                    optimizer="adam", lr=0.01, batch_size=20, epochs=4, val_size=0,
                    train_eval_size=200, probe_size=64, test="never", seed=0, device="cpu",
                    rule_options={"mirror_pretrain_steps": 5} if rule == "wm" else {})
    result = train(cfg, tmp_path / rule, data=(synthetic_data, None, None), progress=False,
                   log=lambda s: None)
    assert result.status == "completed"
    assert result.summary["rule_state"]["last_layer_rule"] == "same"
    assert result.history[-1]["train_acc"] > 0.5  # chance is 0.1
    layers = result.history[-1]["layers"]
    assert "angle_update_bp" in layers["layers.0"] and "weight_norm" in layers["layers.0"]
    ckpt = torch.load(tmp_path / rule / "checkpoints" / "last.pt", weights_only=False)
    saved = ckpt["learner"]
    assert saved["model.layers.0._extra_state"]["mode"] == rule
    feedback = {"fa": "feedback", "wm": "feedback", "kp": "feedback", "dfa": "feedback",
                "usf": "feedback_magnitude", "frsf": "feedback_magnitude",
                "brsf": "feedback_step"}[rule]
    assert f"model.layers.1.{feedback}" in saved


# ---- command line, experiments, plots ---------------------------------------------------------------

def test_default_comparison_compares_feedback_rules():
    from bpdl.cli import DEFAULT_COMPARISON
    from bpdl.train import RunConfig, validate

    labels = dict(DEFAULT_COMPARISON)
    assert {"fa-mlp", "dfa-mlp"} <= set(labels)
    for overrides in labels.values():
        validate(RunConfig.from_dict(overrides))


def test_experiments_are_valid_run_configs():
    from bpdl.experiments import EXPERIMENTS
    from bpdl.train import RunConfig, validate

    assert {"lillicrap2016", "bartunov2018_mnist_fc", "bartunov2018_mnist_lc"} <= \
        set(EXPERIMENTS.names())
    published = {}
    for name in EXPERIMENTS.names():
        for run, cfg in EXPERIMENTS.get(name).run_configs(epochs=1):
            validate(RunConfig.from_dict(cfg))
            published[(name, run.label)] = run.published_test_error
    assert published[("lillicrap2016", "fa")] == 2.1
    assert published[("bartunov2018_mnist_fc", "dfa")] == 2.75
    with pytest.raises(ConfigError, match="has no run"):
        EXPERIMENTS.get("lillicrap2016").run_configs(entries=["kp"])


@pytest.mark.slow
def test_reproduce_command_runs_and_tabulates(tmp_path, real_data_root, capsys):
    from bpdl.cli import main

    assert main(["reproduce", "--list"]) == 0
    assert "bartunov2018_mnist_fc" in capsys.readouterr().out
    out = tmp_path / "m21"
    code = main(["reproduce", "meulemans2021_dfa", "--epochs", "1", "--entries", "dfa",
                 "--max-examples", "8000", "--out", str(out), "--data-dir", str(real_data_root),
                 "--offline", "--no-progress", "--threads", "2"])
    assert code == 0
    table = (out / "results.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith("| dfa"))
    cells = [c.strip() for c in row.split("|")[1:-1]]
    assert cells[2] == "same" and cells[5] == "2.69"  # last layer rule, published
    assert 0 < float(cells[6]) < 20                # 8,000 examples of DFA: about 90% right
    assert (out / "learning_curves.png").exists() and (out / "alignment.png").exists()
    # another run into the same folder joins the table
    assert main(["reproduce", "meulemans2021_dfa", "--epochs", "1", "--entries", "bp",
                 "--max-examples", "2000", "--out", str(out), "--data-dir",
                 str(real_data_root), "--offline", "--no-progress", "--threads", "2"]) == 0
    rows = [line.split("|")[1].strip() for line in (out / "results.md").read_text().splitlines()
            if line.startswith("| bp") or line.startswith("| dfa")]
    assert rows == ["bp", "dfa"]  # in the experiment's order
    assert main(["reproduce", "nonexistent", "--out", str(tmp_path / "x")]) == 2


def test_reproduce_folder_written_from_another_directory_resumes(tmp_path, real_data_root,
                                                                 monkeypatch):
    """results.json written with a relative --out in one working directory; the same folder
    extended from another directory (absolute path) still finds every run for its figures."""
    from bpdl.cli import main

    args = ["--epochs", "1", "--max-examples", "500", "--data-dir", str(real_data_root),
            "--offline", "--no-progress", "--threads", "1"]
    monkeypatch.chdir(tmp_path)
    assert main(["reproduce", "meulemans2021_dfa", "--entries", "bp", "--out", "rel", *args]) == 0
    monkeypatch.chdir(real_data_root.parent)
    out = tmp_path / "rel"
    assert main(["reproduce", "meulemans2021_dfa", "--entries", "dfa", "--out", str(out),
                 *args]) == 0
    table = (out / "results.md").read_text()
    assert "| bp |" in table and "| dfa |" in table
    assert (out / "learning_curves.png").stat().st_mtime >= (out / "dfa").stat().st_mtime


def test_alignment_plot_marks_the_unused_feedback():
    from bpdl.plots import plot_alignment

    history = [{"epoch": e, "layers": {
        "layers.0": {"angle_weight_feedback": 90.0, "feedback_used": 0.0, "angle_update_bp": 50.0},
        "layers.1": {"angle_weight_feedback": 60.0 - e, "feedback_used": 1.0,
                     "angle_update_bp": 0.0}}} for e in range(3)]
    run = {"path": __import__("pathlib").Path("fa"), "config": {}, "history": history,
           "summary": None}
    fig = plot_alignment([run], labels=["fa"])
    titles = [ax.get_ylabel() for ax in fig.axes]
    assert titles == ["angle_weight_feedback (degrees)", "angle_update_bp (degrees)"]
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend == ["fa layers.0 (unused)", "fa layers.1"]
