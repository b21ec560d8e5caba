"""The segregated-dendrite network and rule (G17): configuration and bad input, initialisation,
the reproduction contract against a single-example port of the original algorithm, batching,
checkpoints, analysis, training on real MNIST through the shared loop, and the command line."""

from __future__ import annotations

import json
import math
import pickle

import numpy as np
import pytest
import torch
from bpdl import data as bdata
from bpdl import rules
from bpdl.cli import main
from bpdl.config import to_dict
from bpdl.errors import ConfigError
from bpdl.functional.segregated_original import OriginalNetwork, philox_draws
from bpdl.nn.segregated import SegregatedDendriteNet, SegregatedNetConfig
from bpdl.rules.segregated import (
    SegregatedConfig,
    SegregatedDendrites,
    batch_layer_lrs,
    paper_layer_lrs,
)
from bpdl.train import RunConfig, train

# many small simulation steps: one torch thread (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def mnist(shared_data_dir):
    train_set = bdata.load_dataset("mnist", "train", str(shared_data_dir), download=False)
    return train_set.subset(torch.arange(12000))


def _learner(dtype="float32", backend="auto", seed=0, n_in=784, classes=10, **model_opts):
    torch.manual_seed(seed)
    net = SegregatedDendriteNet(n_in, classes, SegregatedNetConfig(**model_opts))
    return SegregatedDendrites(net, SegregatedConfig(dtype=dtype, backend=backend, seed=123))


def _sgd(learner, lrs):
    return torch.optim.SGD([{"params": g["params"], "lr": lr}
                            for g, lr in zip(learner.parameter_groups(), lrs, strict=True)], lr=0.1)


# ---- configuration and bad input ------------------------------------------------------------------

@pytest.mark.parametrize("options,match", [
    (dict(hidden=(500, 0)), "positive integers"),
    (dict(hidden=(-3,)), "positive integers"),
    (dict(tau_s=-1.0), "tau_s must be > 0"),
    (dict(lambda_max=-0.2), "lambda_max must be > 0"),
    (dict(tau_L=3.0), "must differ"),
    (dict(g_A=-0.1), "g_A must be a number >= 0"),
    (dict(forward_steps=10), "shorter than the averaging window"),
    (dict(window="paper", target_steps=25), "longer than 30 steps"),
    (dict(test_steps=20), "leaves no averaging window"),
    (dict(test_window=300), "longer than test_steps"),
    (dict(noisy_symmetric=True), "needs symmetric_weights"),
    (dict(symmetric_weights=True, learn_feedback=True), "exclude each other"),
    (dict(hidden=(), sparse_feedback=True), "needs at least one hidden layer"),
    (dict(mode="bursting"), "mode must be one of"),
    (dict(feedback_bias="yes"), "feedback_bias must be one of"),
])
def test_model_options_are_validated(options, match):
    with pytest.raises(ConfigError, match=match):
        SegregatedNetConfig(**options)


def test_rule_options_are_validated():
    with pytest.raises(ConfigError, match="reduction must be one of"):
        SegregatedConfig(reduction="max")
    with pytest.raises(ConfigError, match="feedback_lrs"):
        SegregatedConfig(feedback_lrs=(0.1, -1.0))
    net = SegregatedDendriteNet(784, 10, SegregatedNetConfig(learn_feedback=True))
    with pytest.raises(ConfigError, match="one feedback learning rate per hidden layer"):
        SegregatedDendrites(net, SegregatedConfig())
    net = SegregatedDendriteNet(784, 10, SegregatedNetConfig())
    with pytest.raises(ConfigError, match="feedback weights are fixed"):
        SegregatedDendrites(net, SegregatedConfig(feedback_lrs=(0.1,)))
    with pytest.raises(ConfigError, match="segregated"):
        rules.build("segregated", torch.nn.Linear(3, 2), {}, model_name="mlp")


def test_learned_feedback_trains_y_at_its_own_rates():
    """learn_feedback: Y and c get their own parameter groups at the feedback_lrs (a list, or one
    number for every hidden layer) and one SGD step moves them by -lr * grad."""
    from bpdl.train import RunConfig

    for feedback_lrs, expected in (((0.05, 0.02), (0.05, 0.02)), (0.01, (0.01, 0.01))):
        torch.manual_seed(0)
        net = SegregatedDendriteNet(784, 10, SegregatedNetConfig(
            hidden=(20, 12), learn_feedback=True, feedback_bias="ghead"))
        learner = SegregatedDendrites(net, SegregatedConfig(feedback_lrs=feedback_lrs, seed=3))
        optimizer = learner.setup_optimizers(RunConfig(rule="segregated", optimizer="sgd",
                                                       lr=0.1))["main"]
        rates = {g["name"]: g["lr"] for g in optimizer.param_groups}
        assert (rates["feedback.0"], rates["feedback.1"]) == expected
        x, y = torch.rand(8, 784), torch.arange(8)
        before = [y_.detach().clone() for y_ in learner.net.feedback]
        learner.training_step(x, y)
        grads = [y_.grad.clone() for y_ in learner.net.feedback]
        assert all(g.abs().sum() > 0 for g in grads)
        assert learner.net.feedback_bias[0].grad is not None
        optimizer.step()
        for m, (b0, g) in enumerate(zip(before, grads, strict=True)):
            assert torch.equal(learner.net.feedback[m].detach(), b0 - expected[m] * g)


def test_cli_learned_feedback_with_one_rate(real_data_root, tmp_path):
    """``--rule-opt feedback_lrs=0.01`` (one number) works from the command line."""
    out = tmp_path / "fb"
    rc = main(["train", "--rule", "segregated", "--dataset", "mnist", "--data-dir",
               str(real_data_root), "--offline", "--max-examples", "64", "--val-size", "100",
               "--model-opt", "learn_feedback=true", "--model-opt", "hidden=[30]",
               "--rule-opt", "feedback_lrs=0.01", "--test", "never", "--no-progress",
               "--out", str(out), "--threads", "1"])
    assert rc == 0
    assert json.loads((out / "summary.json").read_text())["status"] == "completed"
    assert json.loads((out / "config.json").read_text())["rule_options"]["feedback_lrs"] == 0.01


@pytest.mark.parametrize("x,match", [
    (torch.full((2, 1, 28, 28), float("nan")), "NaN"),
    (torch.full((2, 1, 28, 28), 1.5), r"in \[0, 1\]"),
    (torch.full((2, 1, 28, 28), -0.1), r"in \[0, 1\]"),
    (torch.zeros(2, 1, 20, 20), "input neurons"),
    (torch.zeros(2, 784, dtype=torch.int64), "floating-point"),
])
def test_bad_inputs_are_rejected_before_simulation(x, match):
    learner = _learner(hidden=(20,))
    with pytest.raises(ConfigError, match=match):
        learner.training_step(x, torch.tensor([0, 1]))
    with pytest.raises(ConfigError, match=match):
        learner.predict(x)
    assert learner.lanes is None and int(learner.examples_seen) == 0  # nothing ran
    with pytest.raises(ConfigError, match="labels"):
        learner.training_step(torch.zeros(2, 784), torch.tensor([0, 10]))


def test_configs_pickle_and_round_trip_json():
    net_cfg = SegregatedNetConfig(hidden=(500, 100), window="paper", feedback_bias="g23f")
    rule_cfg = SegregatedConfig(reduction="mean", feedback_lrs=None, seed=4)
    for cfg in (net_cfg, rule_cfg):
        assert pickle.loads(pickle.dumps(cfg)) == cfg
        assert type(cfg)(**{k: (tuple(v) if isinstance(v, list) else v)
                            for k, v in json.loads(json.dumps(to_dict(cfg))).items()}) == cfg
    run = RunConfig(model="segregated", rule="segregated", model_options=to_dict(net_cfg),
                    rule_options=to_dict(rule_cfg))
    assert RunConfig.from_dict(json.loads(json.dumps(run.to_dict()))) == run
    assert pickle.loads(pickle.dumps(run)) == run


# ---- initialisation and feedback ---------------------------------------------------------------------

def test_g23f_initialisation_moments():
    torch.manual_seed(0)
    net = SegregatedDendriteNet(784, 10, SegregatedNetConfig())
    W0, W1 = net.weights[0].detach().double(), net.weights[1].detach().double()
    assert float(W0.mean()) == pytest.approx(0.01871, abs=0.004)
    assert float(W0.std()) == pytest.approx(0.5049, rel=0.01)
    assert float(W1.std()) == pytest.approx(0.6321, rel=0.03)
    assert float(W0.abs().max()) <= 0.01871 + 3.465 * 0.5049 / 2 + 1e-6  # uniform half-width
    assert float(net.biases[0].detach().mean()) == pytest.approx(0.8, abs=0.001)
    assert float(net.Y0.std()) == pytest.approx(0.632, rel=0.05)  # Y_0 = R I, zero mean
    assert abs(float(net.Y0.mean())) < 0.03
    torch.manual_seed(0)
    head = SegregatedDendriteNet(784, 10, SegregatedNetConfig(init_version="ghead"))
    assert float(head.weights[0].detach().std()) == pytest.approx(2 * 0.5049, rel=0.01)  # 2x (8.5)
    assert float(head.Y0.mean()) == pytest.approx(0.0293, abs=0.02)


def test_feedback_shapes_chain_and_variants():
    torch.manual_seed(1)
    net = SegregatedDendriteNet(784, 10, SegregatedNetConfig(hidden=(500, 100)))
    assert net.Y0.shape == (500, 10) and net.Y1.shape == (100, 10)
    assert float(net.Y1.std()) == pytest.approx(1.41, rel=0.1)
    assert float(net.Y0.std()) == pytest.approx(8.9, rel=0.15)  # a product of random matrices
    layer = SegregatedDendriteNet(784, 10, SegregatedNetConfig(hidden=(500, 100), broadcast=False))
    assert layer.Y0.shape == (500, 100) and layer.Y1.shape == (100, 10)
    sparse = SegregatedDendriteNet(784, 10, SegregatedNetConfig(sparse_feedback=True))
    zeros = int((sparse.Y0 == 0).sum())
    assert zeros == int(0.8 * 5000)
    sym = SegregatedDendriteNet(784, 10, SegregatedNetConfig(hidden=(500, 100),
                                                             symmetric_weights=True))
    W1, W2 = sym.weights[1].detach().clone(), sym.weights[2].detach().clone()
    torch.testing.assert_close(sym.Y1, W2.t())
    torch.testing.assert_close(sym.Y0, W1.t() @ W2.t(), rtol=1e-5, atol=1e-5)
    noisy = SegregatedDendriteNet(784, 10, SegregatedNetConfig(symmetric_weights=True,
                                                               noisy_symmetric=True))
    noise = noisy.Y0 - noisy.weights[1].detach().t()
    assert float(noise.std()) == pytest.approx(0.05, rel=0.1)
    with torch.no_grad():
        sym.layers[2].weight.mul_(2.0)
    sym.after_update_()
    torch.testing.assert_close(sym.Y1, 2 * W2.t())


def test_mean_field_forward_gives_class_scores():
    net = SegregatedDendriteNet(784, 10, SegregatedNetConfig(neurons_per_class=2))
    scores = net(torch.rand(3, 1, 28, 28))
    assert scores.shape == (3, 10) and torch.isfinite(scores).all()


# ---- the reproduction contract -------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["reference", "kernels"])
@pytest.mark.parametrize("variant", ["default", "rate", "layerwise_apical_bias"])
def test_one_lane_follows_the_single_example_port_step_for_step(mnist, backend, variant):
    """With one lane and float64, bpdl's batched simulator and the single-example port of the
    original algorithm, driven by the same random numbers, end every example with the same
    state and the same weights."""
    opts = {"default": dict(hidden=(30,), test_steps=60),
            "rate": dict(hidden=(30,), mode="rate"),
            "layerwise_apical_bias": dict(hidden=(30, 12), broadcast=False, apical_conductance=True,
                                          feedback_bias="g23f", test_steps=60)}[variant]
    learner = _learner("float64", backend, **opts)
    net = learner.net
    lrs = paper_layer_lrs(net.n_hidden)
    opt = _sgd(learner, lrs)
    port = OriginalNetwork(net.weights, net.biases, net.feedback, net.feedback_bias, learner.params,
                           philox_draws(learner.seed, lane_key=0), lrs)
    for i in range(2):
        x = bdata.to_float(mnist.images[i:i + 1], torch.float64)
        y = mnist.labels[i:i + 1]
        lengths, windows, offsets = learner.sim.phase_plan(torch.tensor([i]), learner.seed)
        loss, pred = port.train_example(x.reshape(-1).numpy(), np.eye(10)[int(y)],
                                        tuple(lengths[0].tolist()), tuple(windows[0].tolist()))
        opt.zero_grad()
        stats = learner.training_step(x, y)
        opt.step()
        learner.after_step()
        assert float(stats["loss"]) == pytest.approx(loss, rel=1e-9, abs=1e-12)
        for m in range(net.n_hidden + 1):
            np.testing.assert_allclose(net.weights[m].detach().numpy(), port.W[m], rtol=1e-10,
                                       atol=1e-10)
            np.testing.assert_allclose(net.biases[m].detach().numpy(), port.b[m][:, 0], rtol=1e-10,
                                       atol=1e-10)
            np.testing.assert_allclose(learner.lanes.C[m][0].numpy(), port.C[m][:, 0], rtol=1e-10,
                                       atol=1e-10)
        assert int(learner.lanes.step[0]) == port.step
    # the test procedure from zero state, with the test draws
    port.spikes = philox_draws(learner.test_seed, lane_key=0)
    x = bdata.to_float(mnist.images[5:6], torch.float64)
    expected = port.test_example(x.reshape(-1).numpy())
    got = learner.sim.test_potentials(learner.sim.rates(x))[0].numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-10)


# ---- batching, checkpoints, compatibility ------------------------------------------------------------

def test_summed_and_averaged_updates(mnist):
    x = bdata.to_float(mnist.images[:8])
    y = mnist.labels[:8]
    grads = {}
    for reduction in ("sum", "mean"):
        torch.manual_seed(0)
        net = SegregatedDendriteNet(784, 10, SegregatedNetConfig(hidden=(40,)))
        learner = SegregatedDendrites(net, SegregatedConfig(reduction=reduction, seed=1))
        learner.training_step(x, y)
        grads[reduction] = [w.grad.clone() for w in net.weights]
    for s, m in zip(grads["sum"], grads["mean"], strict=True):
        torch.testing.assert_close(s, 8 * m, rtol=1e-5, atol=1e-6)
        assert float(s.abs().sum()) > 0


@pytest.mark.parametrize("model_opts", [{}, {"window": "paper"},
                                        {"random_phase_lengths": False}])
def test_cached_phase_plan_slices_equal_the_phase_plan(model_opts):
    from bpdl.nn.segregated_simulator import PLAN_BLOCK

    learner = _learner(hidden=(20,), **model_opts)
    cpu = torch.device("cpu")
    for first, count in ((0, 32), (1000, 7), (PLAN_BLOCK - 32, 32), (3 * PLAN_BLOCK + 5, 1)):
        lengths, windows = learner.sim.plan_slices(first, count, learner.seed, cpu)
        ref_lengths, ref_windows, offsets = learner.sim.phase_plan(
            torch.arange(first, first + count), learner.seed)
        assert offsets is None
        assert torch.equal(lengths, ref_lengths) and torch.equal(windows, ref_windows)
    if learner.params.random_phase_lengths:  # the comparison above is not between constants
        assert learner.sim.plan_slices(0, 32, learner.seed, cpu)[0].unique().numel() > 1
    # a batch across two cached blocks, and random plateau times, take the general plan
    assert learner.sim.plan_slices(PLAN_BLOCK - 3, 8, learner.seed, cpu) is None
    plateaus = _learner(hidden=(20,), random_plateaus=True)
    assert plateaus.sim.plan_slices(0, 4, plateaus.seed, cpu) is None


def test_state_carries_over_and_checkpoints_restore_it(mnist):
    a = _learner(hidden=(40,))
    opt_a = _sgd(a, batch_layer_lrs(1, 4))
    for i in range(2):
        opt_a.zero_grad()
        a.training_step(bdata.to_float(mnist.images[4 * i:4 * i + 4]), mnist.labels[4 * i:4 * i + 4])
        opt_a.step()
    assert int(a.lanes.step.min()) >= 200 and float(a.lanes.C[0].abs().sum()) > 0
    b = _learner(hidden=(40,), seed=5)  # different initial weights, overwritten by the checkpoint
    b.load_state_dict(a.state_dict())
    opt_b = _sgd(b, batch_layer_lrs(1, 4))
    opt_b.load_state_dict(opt_a.state_dict())
    x, y = bdata.to_float(mnist.images[8:12]), mnist.labels[8:12]
    for learner, opt in ((a, opt_a), (b, opt_b)):
        opt.zero_grad()
        learner.training_step(x, y)
        opt.step()
    for wa, wb in zip(a.net.weights, b.net.weights, strict=True):
        assert torch.equal(wa, wb)
    assert torch.equal(a.lanes.in_ring, b.lanes.in_ring)


def test_compat_original_resets_the_state_every_1000_examples(mnist):
    learner = _learner(hidden=(20,), compat="original", forward_steps=25, target_steps=25)
    learner.examples_seen.fill_(996)
    learner.training_step(bdata.to_float(mnist.images[:3]), mnist.labels[:3])
    assert float(learner.lanes.C[0].abs().sum()) > 0
    learner.training_step(bdata.to_float(mnist.images[:3]), mnist.labels[:3])  # crosses 1000
    assert float(learner.lanes.C[0].abs().sum()) == 0 and int(learner.lanes.step.sum()) == 0


def test_backends_agree_and_predictions_are_deterministic(mnist):
    x = bdata.to_float(mnist.images[:6], torch.float64)
    ref = _learner("float64", "reference", hidden=(30,), test_steps=60)
    ker = _learner("float64", "kernels", hidden=(30,), test_steps=60)
    s_ref, s_ker = ref.predict(x), ker.predict(x)
    torch.testing.assert_close(s_ref, s_ker)
    assert torch.equal(ker.predict(x), s_ker)


# ---- analysis -------------------------------------------------------------------------------------------

def test_alignment_and_recorded_dynamics(mnist):
    learner = _learner(hidden=(40, 20))
    x, y = bdata.to_float(mnist.images[:16]), mnist.labels[:16]
    angles = learner.alignment(x, y)
    assert set(angles) == {"layers.0", "layers.1"}
    for values in angles.values():
        assert set(values) == {"angle_bp", "angle_delta", "angle_delta_example"}
        assert all(0 <= v <= 180 for v in values.values())
    assert learner.lanes is None  # the probe used its own lanes
    bp = _learner(hidden=(40, 20), use_backprop=True)
    assert all(v["angle_delta"] < 1e-3 for v in bp.alignment(x, y).values())
    trace = learner.record_dynamics(x, y, neurons=3)
    L_f, L_t = trace["lengths"]
    assert len(trace["phase"]) == L_f + L_t
    for layer in ("0", "1", "2"):
        assert len(trace["layers"][layer]["C"]) == L_f + L_t
        assert len(trace["layers"][layer]["C"][0]) == 3
    assert set(trace["plateaus"]) == {"0", "1"}
    assert all(0 < a < 1 for a in trace["plateaus"]["0"]["alpha_t"])


def test_batch_learning_rates():
    assert batch_layer_lrs(1, 1) == paper_layer_lrs(1) == (0.21, 0.21)
    lrs = batch_layer_lrs(1, 32)
    assert lrs[0] == pytest.approx(0.21) and lrs[1] == pytest.approx(0.21 * 6 / 32)
    assert batch_layer_lrs(1, 128)[0] == pytest.approx(0.21 * 64 / 128)
    assert len(batch_layer_lrs(2, 64)) == 3
    defaults = SegregatedDendrites.run_defaults(
        RunConfig(rule="segregated", model_options={"hidden": [500, 100]}))
    assert defaults["optimizer"] == "sgd" and len(defaults["layer_lrs"]) == 3
    assert "layer_lrs" not in SegregatedDendrites.run_defaults(RunConfig(lr=0.1))
    rate = batch_layer_lrs(1, 32, mode="rate")
    assert rate[0] == pytest.approx(0.21) and rate[1] == pytest.approx(0.21 * 1.5 / 32)
    defaults = SegregatedDendrites.run_defaults(RunConfig(model_options={"mode": "rate"}))
    assert defaults["layer_lrs"] == pytest.approx(list(rate))


def test_rule_picks_its_own_model_unless_one_is_given():
    from bpdl.train import resolve_config

    assert resolve_config({"rule": "segregated"}).model == "segregated"
    given = resolve_config({"rule": "segregated", "model": "mlp"})
    assert given.model == "mlp"  # the run config then refuses it with a clear message
    assert resolve_config({"rule": "fa"}).model == "mlp"


def test_rate_mode_learns_with_the_command_line_defaults(tmp_path, real_data_root):
    """``bpdl train --rule segregated --model-opt mode=rate`` with nothing else set learns
    (the batch-rescaled output rate of spiking mode saturates the rate-mode output)."""
    from bpdl.cli import main

    out = tmp_path / "rate"
    rc = main(["train", "--rule", "segregated", "--dataset", "mnist",
               "--data-dir", str(real_data_root), "--offline", "--max-examples", "6400",
               "--val-size", "1000", "--model-opt", "mode=rate", "--test", "never",
               "--eval-every", "6400", "--no-progress", "--out", str(out), "--threads", "1"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["val_acc"] > 0.6, summary["val_acc"]


# ---- training on MNIST through the shared loop, and the command line ---------------------------------

@pytest.mark.slow
def test_learns_mnist_through_the_training_loop(mnist):
    train_set = mnist.subset(torch.arange(10000))
    val_set = mnist.subset(torch.arange(10000, 10500))
    cfg = RunConfig(dataset="mnist", model="segregated", rule="segregated",
                    model_options={"hidden": [500]}, optimizer="sgd",
                    layer_lrs=batch_layer_lrs(1, 32), batch_size=32, max_examples=6400,
                    eval_every=3200, train_eval_size=0, probe_size=64, test="never",
                    device="cpu", threads=1)
    result = train(cfg, data=(train_set, val_set, None), progress=False, log=lambda s: None)
    assert result.status == "completed"
    accs = [r["val_acc"] for r in result.history]
    assert accs[0] < 0.2 and accs[-1] > 0.4, accs  # ~0.5 (chance 0.1)
    angles = result.history[-1]["layers"]["layers.0"]
    assert 0 < angles["angle_delta_example"] < 90  # the rule's hidden error points with backprop's


def test_cli_train_and_plot_dynamics(real_data_root, tmp_path, capsys):
    out = tmp_path / "run"
    small = tmp_path / "small.json"  # keep the evaluations small: a few hundred examples
    small.write_text(json.dumps({"train_eval_size": 100, "test": "never", "probe_size": 16}))
    rc = main(["train", "--rule", "segregated", "--model", "segregated", "--dataset", "mnist",
               "--data-dir", str(real_data_root), "--offline", "--max-examples", "64",
               "--val-size", "200", "--model-opt", "hidden=[40]", "--model-opt", "test_steps=60",
               "--config", str(small), "--no-progress", "--out", str(out), "--threads", "1"])
    assert rc == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["optimizer"] == "sgd" and cfg["batch_size"] == 32
    assert cfg["layer_lrs"] == pytest.approx(list(batch_layer_lrs(1, 32)))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["examples"] == 64
    rc = main(["plot", "dynamics", str(out), "--data-dir", str(real_data_root), "--offline",
               "--neurons", "2"])
    assert rc == 0
    assert (out / "figures" / "dynamics.png").exists()
    trace = json.loads((out / "figures" / "dynamics.json").read_text())
    assert trace["examples_trained"] == 64 and math.isfinite(trace["output_C_f"][0])
    rc = main(["plot", "alignment", str(out)])
    assert rc == 0
    capsys.readouterr()
    rc = main(["train", "--rule", "segregated", "--model", "segregated", "--dataset", "mnist",
               "--data-dir", str(real_data_root), "--offline", "--model-opt", "window=80",
               "--no-progress", "--out", str(tmp_path / "bad")])
    assert rc == 2
    assert "shorter than the averaging window" in capsys.readouterr().err


def test_guerguiev2017_config_defaults_and_errors():
    from bpdl.experiments.segregated import REPRODUCTION_BATCH, guerguiev2017_config
    from bpdl.train import resolve_config

    one, two = guerguiev2017_config(layers=1), guerguiev2017_config(layers=2)
    assert one["batch_size"] == 32 and one["model_options"]["hidden"] == [500]
    assert two["batch_size"] == REPRODUCTION_BATCH[2] == 16
    assert two["model_options"]["hidden"] == [500, 100]
    # the rates come from the rule's run defaults, as for every entry point
    assert resolve_config(two).layer_lrs == pytest.approx(batch_layer_lrs(2, 16))
    assert resolve_config(two).optimizer == "sgd"
    explicit = guerguiev2017_config(layers=2, batch_size=8)
    assert explicit["batch_size"] == 8
    assert resolve_config(explicit).layer_lrs == pytest.approx(batch_layer_lrs(2, 8))
    assert guerguiev2017_config(layers=1, variant="sparse")["model_options"]["sparse_feedback"]
    assert guerguiev2017_config(variant="symmetric")["model_options"]["symmetric_weights"]
    with pytest.raises(ConfigError, match="--layers 1"):
        guerguiev2017_config(layers=2, variant="symmetric")
    with pytest.raises(ConfigError, match="0, 1 or 2"):
        guerguiev2017_config(layers=3)


@pytest.mark.slow
def test_cli_reproduce_guerguiev2017_two_layers(real_data_root, tmp_path, capsys):
    out = tmp_path / "g17"
    rc = main(["reproduce", "guerguiev2017", "--layers", "2", "--max-examples", "32",
               "--test-repeats", "2", "--data-dir", str(real_data_root), "--offline",
               "--no-progress", "--threads", "2", "--out", str(out)])
    assert rc == 0
    assert "784-500-100-10" in capsys.readouterr().out
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["batch_size"] == 16 and cfg["model_options"]["hidden"] == [500, 100]
    record = json.loads((out / "reproduction.json").read_text())
    assert record["status"] == "completed" and record["published_test_error"] == 3.2
    errors = record["final_test_errors"]
    assert len(errors) == 2 and all(0 <= e <= 100 for e in errors)
    assert record["final_test_error_mean"] == pytest.approx(sum(errors) / 2)
    assert (out / "figures" / "test_error.png").exists()
