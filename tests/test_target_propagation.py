"""Target-propagation family (tp, dtp, sdtp, aosdtp, ddtp): targets against hand computations
and exact inverses, where gradients may and may not flow, the inverse losses, the transposed
LC map, training in the loop, checkpoints, metrics and bad options
(docs/algorithms/target_propagation.md)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from bpdl import nn as bnn
from bpdl import rules
from bpdl.errors import ConfigError
from bpdl.functional import target_propagation as tpf
from bpdl.nn import LocallyConnected2d
from bpdl.nn.target_propagation import LinearInverse, LocallyConnectedInverse
from bpdl.train import RunConfig, train
from torch import nn
from torch.nn import functional as F

TP_RULES = ["tp", "dtp", "sdtp", "aosdtp", "ddtp"]
SMALL_LC = {"kernel_size": [3, 3], "channels": [3, 4], "stride": [2, 1], "hidden": [12]}


def _mlp(hidden=(12, 10, 8), shape=(1, 4, 4), seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return bnn.build_model("mlp", shape, 5, {"hidden": list(hidden), "activation": "tanh",
                                             "bias_init": 0.0}).to(dtype)


def _lc(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return bnn.build_model("lc", (1, 7, 7), 5, SMALL_LC).to(dtype)


def _batch(shape=(1, 4, 4), n=9, seed=1, dtype=torch.float64, classes=5):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, *shape, generator=g, dtype=dtype),
            torch.randint(0, classes, (n,), generator=g))


def _learner(rule, model, **options):
    learner = rules.build(rule, model, options)
    return learner.to(next(model.parameters()).dtype)


# ---- the targets ------------------------------------------------------------------------------

def test_with_exact_inverses_the_targets_are_the_top_target_carried_down_exactly():
    """g = f^-1 on an invertible tanh network: each target maps onto the one above it through
    f, the difference correction vanishes (DTP and TP agree), and the top target is h - alpha
    dL/dh (§4.2)."""
    torch.manual_seed(0)
    n, width, depth = 6, 4, 3
    weights = [torch.linalg.qr(torch.randn(width, width, dtype=torch.float64))[0] * 0.8
               for _ in range(depth)]
    biases = [0.1 * torch.randn(width, dtype=torch.float64) for _ in range(depth)]

    def f(i, h):
        return torch.tanh(h @ weights[i].T + biases[i])

    def f_inverse(i):
        return lambda h: (torch.atanh(h) - biases[i]) @ torch.linalg.inv(weights[i]).T

    x = 0.5 * torch.randn(n, width, dtype=torch.float64)
    hidden = []
    h = x
    for i in range(depth):
        h = f(i, h)
        hidden.append(h)
    grad = torch.randn(n, width, dtype=torch.float64)
    top = tpf.gradient_target(hidden[-1], grad, 0.05)
    assert torch.equal(top, hidden[-1] - 0.05 * grad)
    inverses = [f_inverse(i) for i in range(1, depth)]  # g_2, g_3
    targets = tpf.propagate_targets(hidden, top, inverses, difference=True)
    assert torch.equal(targets[-1], top)
    for k in range(depth - 1):  # f_{k+2}(h^_{k+1}) = h^_{k+2}
        torch.testing.assert_close(f(k + 1, targets[k]), targets[k + 1], rtol=0, atol=1e-12)
    plain = tpf.propagate_targets(hidden, top, inverses, difference=False)
    for a, b in zip(targets, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    # a target equal to the activity stays the activity all the way down
    same = tpf.propagate_targets(hidden, hidden[-1], inverses, difference=True)
    for a, b in zip(same, hidden, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_difference_correction_first_order_identity_with_a_random_inverse():
    """h^_{l-1} - h_{l-1} = J_g(h_l) (h^_l - h_l) + O(|h^_l - h_l|^2) for any g (§4.2), and a
    target equal to the activity gives exactly the activity below."""
    torch.manual_seed(3)
    g = LinearInverse(6, (5,), "tanh").double()
    h_below = torch.randn(4, 5, dtype=torch.float64)
    h = torch.tanh(torch.randn(4, 6, dtype=torch.float64))
    assert torch.equal(tpf.difference_correction(h_below, g(h), g(h)), h_below)
    direction = torch.randn(4, 6, dtype=torch.float64)
    errors = []
    for eps in (1e-2, 1e-3, 1e-4):
        target = h + eps * direction
        got = tpf.difference_correction(h_below, g(h), g(target)) - h_below
        linear = torch.func.jvp(g, (h,), (eps * direction,))[1]
        errors.append(float((got - linear).detach().norm() / linear.detach().norm()))
    assert errors[0] < 0.05
    # the relative error of the linearisation shrinks in proportion to the step
    assert errors[1] < errors[0] / 5 and errors[2] < errors[1] / 5


def test_learner_targets_follow_the_reference_recursion():
    model = _mlp()
    learner = _learner("dtp", model, alpha=0.2)
    x, y = _batch()
    r = learner.rule_gradients(x, y, inverse=False)
    h = r["h"]
    # the first target by hand: one backprop step, dl/dh = W_L^T (p - y) per example
    out = model.layers[-1]
    p = F.softmax(out(h[-1]), 1)
    grad = (p - F.one_hot(y, 5).double()) @ out.weight
    top = h[-1] - 0.2 * grad
    expected = tpf.propagate_targets(h[1:], top, [learner.inverses["g2"], learner.inverses["g3"]])
    for a, b in zip(r["targets"], expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # Lee15's batch-mean convention moves each example by alpha / N_b
    lee = _learner("dtp", _mlp(), alpha=0.2, alpha_convention="batch_mean")
    top_lee = lee.rule_gradients(x, y, inverse=False)["targets"][-1]
    torch.testing.assert_close(top_lee, h[-1] - 0.2 * grad / x.shape[0], rtol=1e-12, atol=1e-12)


def test_sdtp_and_ddtp_targets_by_hand():
    x, y = _batch()
    model = _mlp()
    sdtp = _learner("sdtp", model)
    r = sdtp.rule_gradients(x, y, inverse=False)
    h = r["h"]
    g4 = sdtp.inverses["g4"]
    p = F.softmax(model.layers[-1](h[-1]), 1)
    top = h[-1] - g4(p) + g4(F.one_hot(y, 5).double())
    torch.testing.assert_close(r["targets"][-1], top, rtol=1e-12, atol=1e-12)
    # AO-SDTP keeps the auxiliary units z in both terms
    ao = _learner("aosdtp", _mlp(), aux_size=7)
    r = ao.rule_gradients(x, y, inverse=False)
    z = torch.tanh(r["h"][-1] @ ao.auxiliary.weight.T + ao.auxiliary.bias)
    g4 = ao.inverses["g4"]
    p = F.softmax(ao.model.layers[-1](r["h"][-1]), 1)
    top = r["h"][-1] - g4(torch.cat([p, z], 1)) + g4(torch.cat([F.one_hot(y, 5).double(), z], 1))
    torch.testing.assert_close(r["targets"][-1], top, rtol=1e-12, atol=1e-12)
    # DDTP-linear: h^_l = h_l + Q_l (a^ - a), a^ = a - alpha (p - y)
    dd = _learner("ddtp", _mlp(), alpha=0.3)
    r = dd.rule_gradients(x, y, inverse=False)
    a = dd.model(x)
    shift = -0.3 * (F.softmax(a, 1) - F.one_hot(y, 5).double())
    for l, target in enumerate(r["targets"], start=1):
        q = dd.inverses[f"q{l}"]
        torch.testing.assert_close(target, r["h"][l] + shift @ q.weight.T, rtol=1e-10,
                                   atol=1e-12)


def _hidden_grads(learner, x, y):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # full backward hooks on detached inputs
        r = learner.rule_gradients(x, y, inverse=False)
    return {name: r["grads"][layer.weight].clone()
            for name, layer in learner.model.named_modules()
            if isinstance(layer, nn.Linear) and name != "layers.3"}


def _cut_input_gradient(module):
    """Zero the gradient that flows from ``module`` back into its input."""
    return module.register_full_backward_hook(
        lambda m, grad_in, grad_out: tuple(None if g is None else torch.zeros_like(g)
                                           for g in grad_in))


def test_sdtp_sends_no_task_gradient_below_the_output_and_dtp_exactly_one_step():
    x, y = _batch()
    for rule, changes in (("sdtp", False), ("aosdtp", False), ("ddtp", False), ("dtp", True)):
        learner = _learner(rule, _mlp())
        before = _hidden_grads(learner, x, y)
        assert all(g.abs().sum() > 0 for g in before.values()), rule
        hook = _cut_input_gradient(learner.model.layers[-1])
        after = _hidden_grads(learner, x, y)
        hook.remove()
        same = all(torch.equal(before[k], after[k]) for k in before)
        assert same != changes, rule
        if rule == "dtp":  # cut, DTP's targets are its activities: no hidden learning at all
            assert all(g.abs().max() < 1e-12 for g in after.values())
            # and nothing flows further down than that one step through the output layer
            hook = _cut_input_gradient(learner.model.layers[-2])
            again = _hidden_grads(learner, x, y)
            hook.remove()
            assert all(torch.equal(before[k], again[k]) for k in before)


# ---- the inverses ---------------------------------------------------------------------------

def test_inverse_losses_match_hand_written_formulas():
    g = torch.Generator().manual_seed(0)
    rec, clean, noise = (torch.randn(5, 7, generator=g, dtype=torch.float64) for _ in range(3))
    noisy = clean + noise
    by_hand = sum(((rec[i] - noisy[i]) ** 2).sum() for i in range(5)) / 5
    torch.testing.assert_close(tpf.noise_preserving_loss(rec, noisy), by_hand)
    by_hand = sum(((clean[i] - rec[i]) ** 2).sum() for i in range(5)) / 5
    torch.testing.assert_close(tpf.denoising_loss(rec, clean), by_hand)
    q_noisy, q_clean = (torch.randn(5, 7, generator=g, dtype=torch.float64) for _ in range(2))
    sigma = 0.3
    by_hand = sum(((clean[i] + q_noisy[i] - q_clean[i] - noisy[i]) ** 2).sum()
                  for i in range(5)) / 5 / sigma**2
    torch.testing.assert_close(tpf.difference_reconstruction_loss(clean, noisy, q_noisy, q_clean,
                                                                  sigma), by_hand)


@pytest.mark.parametrize("rule", ["dtp", "sdtp", "ddtp"])
def test_the_learners_inverse_losses_by_hand(rule, monkeypatch):
    x, y = _batch()
    model = _mlp()
    learner = _learner(rule, model, sigma=0.2)
    eps = {}

    def fixed_noise(like, step, layer):
        eps[layer] = 0.2 * torch.randn(like.shape, dtype=like.dtype,
                                       generator=torch.Generator().manual_seed(layer))
        return eps[layer]

    monkeypatch.setattr(learner, "_noise", fixed_noise)
    r = learner.rule_gradients(x, y, forward=False)
    h = r["h"]
    W = [(m.weight, m.bias) for m in model.layers]
    for key, value in r["inverse_losses"].items():
        l = int(key[1:])
        inv = learner.inverses[key]
        if rule == "ddtp":
            noisy = h[l] + eps[l]
            a_noisy = noisy
            for i in range(l, 4):
                a_noisy = a_noisy @ W[i][0].T + W[i][1]
                if i < 3:
                    a_noisy = torch.tanh(a_noisy)
            rec = h[l] + (a_noisy - r["logits"]) @ inv.weight.T
            expected = ((rec - noisy) ** 2).sum(1).mean() / 0.2**2
        else:
            below = h[l - 1]
            noisy = below + eps[l]
            f = noisy @ W[l - 1][0].T + W[l - 1][1]
            f = F.softmax(f, 1) if l == 4 else torch.tanh(f)
            rec = torch.tanh(f @ inv.weight.T + inv.bias)
            reference = noisy if rule == "dtp" else below  # noise-preserving / de-noising
            expected = ((rec - reference) ** 2).sum(1).mean()
        torch.testing.assert_close(value, expected, rtol=1e-10, atol=1e-12)
    assert set(r["inverse_losses"]) == {"dtp": {"g2", "g3"}, "sdtp": {"g2", "g3", "g4"},
                                        "ddtp": {"q1", "q2", "q3"}}[rule]
    # only the inverses get gradients in an inverse step
    assert set(map(id, r["grads"])) == {id(p) for p in learner.inverses.parameters()}


@pytest.mark.parametrize("rule,model", [("dtp", "mlp"), ("sdtp", "mlp"),
                                        pytest.param("sdtp", "lc", marks=pytest.mark.slow),
                                        ("aosdtp", "mlp"), ("ddtp", "mlp")])
def test_inverse_training_lowers_the_reconstruction_error(rule, model):
    net = _mlp() if model == "mlp" else _lc()
    learner = _learner(rule, net, sigma=0.05, inverse_lr=3e-3)
    shape = (1, 4, 4) if model == "mlp" else (1, 7, 7)
    x, y = _batch(shape=shape, n=32)
    opts = learner.setup_optimizers(RunConfig(optimizer="adam", lr=1e-3))
    learner.phase = "inverse"
    forward_before = {k: v.clone() for k, v in net.state_dict().items()}

    def errors():
        return {k: v["reconstruction_error"] for k, v in learner.alignment(x, y).items()
                if "reconstruction_error" in v}

    start = errors()
    assert len(start) == len(learner.inverses)
    for _ in range(100):
        for opt in opts.values():
            opt.zero_grad(set_to_none=True)
        learner.training_step(x, y)
        for opt in opts.values():
            opt.step()
    end = errors()
    for name in start:
        assert end[name] < 0.7 * start[name], (name, start[name], end[name])
    for k, v in net.state_dict().items():  # the inverse phase leaves the forward weights alone
        assert torch.equal(v, forward_before[k]), k


def test_lc_inverse_is_the_transposed_lc_map():
    """With V = W, zero bias and no nonlinearity the inverse is the adjoint of the layer's map,
    <W x, y> = <x, W^T y>, and equals the reference transposed map."""
    from bpdl import functional as BF

    torch.manual_seed(0)
    layer = LocallyConnected2d(2, 3, (7, 6), 3, 2, "same", bias="none").double()
    inverse = LocallyConnectedInverse(layer, "identity").double()
    with torch.no_grad():
        inverse.weight.copy_(layer.weight)
        inverse.bias.zero_()
    x = torch.randn(4, 2, 7, 6, dtype=torch.float64)
    y = torch.randn(4, 3, *layer.output_size, dtype=torch.float64)
    lhs = (layer(x) * y).sum()
    rhs = (x * inverse(y)).sum()
    torch.testing.assert_close(lhs, rhs, rtol=1e-12, atol=1e-12)
    reference = BF.locally_connected2d_grad_input(y, layer.weight, (7, 6), layer.stride,
                                                  layer.padding)
    torch.testing.assert_close(inverse(y), reference, rtol=1e-12, atol=1e-12)
    # its weight gradient comes from the op's registered backward (fused kernels)
    inverse(y).pow(2).sum().backward()
    assert inverse.weight.grad is not None and inverse.weight.grad.abs().sum() > 0


def test_auxiliary_output_is_fixed_and_not_optimised():
    learner = _learner("aosdtp", _mlp(), aux_size=16)
    assert "auxiliary.weight" in learner.state_dict()
    opts = learner.setup_optimizers(RunConfig(optimizer="adam", lr=1e-3))
    optimised = {id(p) for o in opts.values() for g in o.param_groups for p in g["params"]}
    assert id(learner.auxiliary.weight) not in optimised
    assert learner.inverses["g4"].in_features == 5 + 16
    inverse_ids = {id(p) for p in learner.inverses.parameters()}
    assert {id(p) for g in opts["inverse"].param_groups for p in g["params"]} == inverse_ids
    assert not inverse_ids & {id(p) for g in opts["main"].param_groups for p in g["params"]}


# ---- in the loop ------------------------------------------------------------------------------

def _cfg(**kw) -> RunConfig:
    base = dict(dataset="synthetic", model="mlp",
                model_options={"hidden": [32, 16], "activation": "tanh"}, epochs=2,
                batch_size=50, eval_every=300, train_eval_size=200, probe_size=64, lr=3e-3,
                device="cpu", rule_options={"inverse_lr": 3e-3})
    base.update(kw)
    return RunConfig(**base)


@pytest.mark.parametrize("rule", TP_RULES)
def test_rules_learn_in_the_loop_and_log_their_metrics(rule, synthetic_splits, tmp_path):
    result = train(_cfg(rule=rule, eval_every=None, epochs=4, lr=1e-2,
                        rule_options={"inverse_lr": 1e-2}), tmp_path / rule, data=synthetic_splits,
                   progress=False, log=lambda s: None)
    assert result.status == "completed"
    # chance is 0.1; plain TP (no difference correction) learns, but unsteadily
    if rule == "tp":
        assert max(r["val_acc"] for r in result.history) > 0.4
    else:
        assert result.history[-1]["val_acc"] > 0.5
    last = result.history[-1]
    assert last["running_inverse_loss"] > 0 and "running_local_loss" in last
    layers = last["layers"]
    assert "angle_update_bp" in layers["layers.0"] and "angle_target_bp" in layers["layers.1"]
    assert any("reconstruction_error" in v for v in layers.values())
    assert result.summary["rule_state"]["target_propagation"] == rule
    ckpt = torch.load(tmp_path / rule / "checkpoints" / "last.pt", weights_only=False)
    assert set(ckpt["optimizers"]) == {"main", "inverse"}
    assert any(k.startswith("inverses.") for k in ckpt["learner"])


def test_alternating_schedule_makes_two_passes_per_epoch(synthetic_splits, tmp_path):
    result = train(_cfg(rule="sdtp", eval_every=None, lr=1e-2,
                        rule_options={"schedule": "alternating", "inverse_lr": 1e-2}),
                   tmp_path / "alt", data=synthetic_splits, progress=False, log=lambda s: None)
    h = result.history
    assert [r.get("phase") for r in h] == [None, "inverse", "forward", "inverse", "forward"]
    assert [r["examples"] for r in h] == [0, 1000, 2000, 3000, 4000]
    assert h[-1]["epoch"] == pytest.approx(2.0)
    # the inverse passes leave the forward weights (and the accuracy) where they were
    assert h[1]["val_acc"] == h[0]["val_acc"] and h[3]["val_acc"] == h[2]["val_acc"]
    assert "running_local_loss" not in h[1] and "running_inverse_loss" not in h[2]
    assert h[4]["val_acc"] > 0.5


class Crash(Exception):
    pass


def _crash_at(examples):
    def callback(rec):
        if rec["examples"] == examples:
            raise Crash
    return callback


def _strip(history):
    return [{k: v for k, v in r.items() if k not in {"examples_per_sec", "eval_time", "elapsed"}}
            for r in history]


@pytest.mark.parametrize("rule,schedule", [("dtp", "alternating"), ("aosdtp", "parallel")])
def test_an_interrupted_run_resumes_bit_for_bit(rule, schedule, synthetic_splits, tmp_path):
    cfg = _cfg(rule=rule, epochs=1 if schedule == "alternating" else 2,
               rule_options={"schedule": schedule, "inverse_lr": 3e-3, "aux_size": 8}
               if rule == "aosdtp" else {"schedule": schedule, "inverse_lr": 3e-3})
    reference = train(cfg, tmp_path / "ref", data=synthetic_splits, progress=False, log=lambda s: None)
    assert reference.status == "completed"
    ckpt = torch.load(tmp_path / "ref" / "checkpoints" / "last.pt", weights_only=False)
    assert ckpt["optimizers"]["inverse"]["state"]  # the inverses' Adam moments are saved
    out = tmp_path / "crashy"
    with pytest.raises(Crash):
        train(cfg, out, data=synthetic_splits, progress=False, log=lambda s: None,
              callback=_crash_at(1200))
    lines = []
    resumed = train(cfg, out, data=synthetic_splits, progress=False, log=lines.append)
    assert lines[0].startswith(f"resuming {out} at example 900")
    assert _strip(resumed.history) == _strip(reference.history)
    final = torch.load(out / "checkpoints" / "last.pt", weights_only=False)
    for key, value in ckpt["learner"].items():
        assert torch.equal(value, final["learner"][key]), key
    for name in ("main", "inverse"):
        for pid, state in ckpt["optimizers"][name]["state"].items():
            for k, v in state.items():
                assert torch.equal(v, final["optimizers"][name]["state"][pid][k]), (name, k)


def test_inverse_optimiser_options_are_used():
    learner = _learner("sdtp", _mlp(), inverse_optimizer="sgd", inverse_lr=0.05,
                       inverse_optimizer_options={"momentum": 0.5})
    opts = learner.setup_optimizers(RunConfig(optimizer="adam", lr=1e-4))
    inv = opts["inverse"]
    assert isinstance(inv, torch.optim.SGD) and isinstance(opts["main"], torch.optim.Adam)
    assert all(g["lr"] == 0.05 and g["momentum"] == 0.5 for g in inv.param_groups)
    assert all(g["lr"] == 1e-4 for g in opts["main"].param_groups)


# ---- bad options ------------------------------------------------------------------------------

@pytest.mark.parametrize("rule,options,match", [
    ("sdtp", {"schedule": "sideways"}, "unknown schedule 'sideways'"),
    ("dtp", {"sigma": 0}, "sigma .* must be a positive number"),
    ("sdtp", {"sigma": -0.1}, "sigma .* must be a positive number"),
    ("dtp", {"alpha": 0}, r"alpha .* must be in \(0, 1\]"),
    ("dtp", {"alpha": 1.5}, r"alpha .* must be in \(0, 1\]"),
    ("ddtp", {"alpha": -1}, r"alpha .* must be in \(0, 1\]"),
    ("aosdtp", {"aux_size": 0}, "aux_size .* must be a positive integer"),
    ("sdtp", {"alpha": 0.1}, "unknown sdtp rule option"),
    ("dtp", {"inverse_loss": "hinge"}, "unknown inverse_loss 'hinge'"),
    ("ddtp", {"inverse_loss": "denoising"}, "unknown inverse_loss 'denoising'"),
    ("sdtp", {"inverse_optimizer": "lion"}, "unknown optimizer 'lion'"),
    ("sdtp", {"inverse_lr": 0}, "inverse optimiser: learning rate must be a positive"),
    ("sdtp", {"inverse_optimizer_options": {"nesterov": True}}, "has no option"),
    ("tp", {"first_target": "guess"}, "unknown first_target"),
])
def test_bad_options_are_one_clear_config_error(rule, options, match):
    with pytest.raises(ConfigError, match=match):
        rules.rule_config(rule, options)


def test_models_without_inverses_are_refused():
    with pytest.raises(ConfigError, match="max-pooling.*--model lc"):
        rules.build("sdtp", bnn.build_model("cnn", (1, 28, 28), 10), model_name="cnn")
    with pytest.raises(ConfigError, match="unshared"):
        rules.build("dtp", bnn.build_model("lc", (1, 28, 28), 10, {"shared": True}))
    with pytest.raises(ConfigError, match="at least one hidden layer"):
        rules.build("dtp", bnn.build_model("mlp", (1, 8, 8), 10, {"hidden": []}))
    with pytest.raises(ConfigError, match="output_activation must be 'identity'"):
        rules.build("sdtp", bnn.build_model("mlp", (1, 8, 8), 10,
                                            {"output_activation": "sigmoid"}))


@pytest.mark.parametrize("args,match", [
    (["--rule", "sdtp", "--rule-opt", "schedule=sideways"], "unknown schedule 'sideways'"),
    (["--rule", "aosdtp", "--rule-opt", "aux_size=0"], "aux_size"),
    (["--rule", "dtp", "--model", "cnn"], "max-pooling"),
])
def test_bad_options_from_the_command_line(args, match, tmp_path, capsys):
    from bpdl.cli import main

    out = tmp_path / "run"
    code = main(["train", *args, "--out", str(out), "--data-dir", str(tmp_path / "nodata"),
                 "--offline"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and match in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()


# ---- registrations: comparison, experiments, spaces, plots -----------------------------------

def test_registrations_are_valid():
    from bpdl.cli import DEFAULT_COMPARISON
    from bpdl.experiments import EXPERIMENTS
    from bpdl.studies.spaces import default_space
    from bpdl.train import validate

    assert dict(DEFAULT_COMPARISON)["sdtp-mlp"]["rule"] == "sdtp"
    for name in ("bartunov2018_tp_mnist_fc", "bartunov2018_tp_mnist_lc"):
        exp = EXPERIMENTS.get(name)
        labels = {run.label for run in exp.runs}
        for variant in ("dtp", "sdtp", "aosdtp"):
            assert {f"{variant}-parallel", f"{variant}-alternating"} <= labels
        assert {"bp", "fa", "dfa"} <= labels
        for _run, cfg in exp.run_configs(epochs=1):
            validate(RunConfig.from_dict(cfg))
    published = {r.label: r.published_test_error
                 for r in EXPERIMENTS.get("bartunov2018_tp_mnist_fc").runs}
    assert published["dtp-alternating"] == 1.83 and published["sdtp-parallel"] == 3.52
    for rule in TP_RULES:
        space = default_space(rule, "mlp")
        assert space.name.startswith("b18-")
        space.check_targets(rule, "mlp")
        assert space.dims["lr"].low == 1e-5 and space.dims["lr"].high == 3e-4


def test_weight_dynamics_plot_draws_the_reconstruction_errors(synthetic_splits, tmp_path):
    from bpdl.plots import plot_weight_dynamics

    train(_cfg(rule="sdtp", epochs=1), tmp_path / "run", data=synthetic_splits, progress=False,
          log=lambda s: None)
    fig = plot_weight_dynamics(tmp_path / "run")
    labels = [ax.get_ylabel() for ax in fig.axes]
    assert any("reconstruction" in label for label in labels)
    ax = fig.axes[[i for i, label in enumerate(labels) if "reconstruction" in label][0]]
    assert len(ax.get_lines()) == 2  # g_2 and the output inverse g_3 = g_L
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text()
               .splitlines()]
    assert "reconstruction_error" in records[-1]["layers"]["layers.2"]
