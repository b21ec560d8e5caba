"""The shared training loop: run directory, evaluation schedule, metrics, seeds, resume,
divergence and bad input."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from bpdl import rules
from bpdl.errors import ConfigError, RunDirError
from bpdl.train import RunConfig, train

TIMING_KEYS = {"examples_per_sec", "eval_time", "elapsed"}


def _cfg(**kw) -> RunConfig:
    base = dict(dataset="synthetic", model="mlp", model_options={"hidden": [32]}, epochs=2,
                batch_size=50, eval_every=300, train_eval_size=200, probe_size=0, lr=3e-3,
                device="cpu")
    base.update(kw)
    return RunConfig(**base)


def _strip(history):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in history]


def test_run_directory_and_schedule(tmp_path, synthetic_splits):
    out = tmp_path / "run"
    result = train(_cfg(), out, data=synthetic_splits, progress=False, log=lambda s: None)
    assert result.status == "completed"
    assert (out / "config.json").exists() and (out / "checkpoints" / "last.pt").exists()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["rule"] == "bp" and cfg["model_options"] == {"hidden": [32]}
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # evaluations at 0, every 300 examples, and at the end (2000 examples)
    assert [r["examples"] for r in records] == [0, 300, 600, 900, 1200, 1500, 1800, 2000]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["examples"] == 2000
    assert summary["epochs"] == pytest.approx(2.0)
    assert 0.9 < summary["test_acc"] <= 1.0  # synthetic classes are separable
    assert summary["val_acc"] == records[-1]["val_acc"]
    last = records[-1]
    for key in ("train_loss", "train_acc", "val_loss", "val_acc", "running_loss", "running_acc",
                "examples_per_sec"):
        assert key in last
    assert "test_acc" not in last  # test only at the end by default
    assert set(last["layers"]) == {"layers.0", "layers.1"}
    for stats in last["layers"].values():
        assert stats["weight_norm"] > 0 and stats["rel_change"] > 0 and stats["update_norm"] > 0
    assert records[0]["val_acc"] < 0.5 < records[-1]["val_acc"]


def test_weight_statistics_are_what_they_claim(synthetic_splits):
    seen = []
    result = train(_cfg(optimizer="sgd", lr=0.5, epochs=1, eval_every=500), None,
                   data=synthetic_splits, progress=False, log=lambda s: None,
                   callback=lambda rec: seen.append(rec))
    w = result.learner.model.layers[1].weight.detach()
    last = result.history[-1]["layers"]["layers.1"]
    assert last["weight_norm"] == pytest.approx(float(w.norm()), rel=1e-6)
    assert len(seen) == len(result.history) - 1  # callback after every evaluation but the first


def test_same_seed_same_metrics_and_different_seed_differs(synthetic_splits):
    def run(seed):
        return train(_cfg(seed=seed), data=synthetic_splits, progress=False,
                                 log=lambda s: None).history
    a, b, c = run(3), run(3), run(4)
    assert _strip(a) == _strip(b)
    assert _strip(a) != _strip(c)


class Crash(Exception):
    pass


def _crash_at(examples):
    """An evaluation callback that raises Crash at the evaluation of ``examples`` (before that
    evaluation's checkpoint is written)."""
    def callback(rec):
        if rec["examples"] == examples:
            raise Crash
    return callback


def test_resume_after_crash_matches_uninterrupted_run(tmp_path, synthetic_splits):
    reference = train(_cfg(), tmp_path / "ref", data=synthetic_splits, progress=False,
                      log=lambda s: None)
    out = tmp_path / "crashy"
    with pytest.raises(Crash):
        train(_cfg(), out, data=synthetic_splits, progress=False, log=lambda s: None,
              callback=_crash_at(900))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "failed"
    resumed = train(_cfg(), out, data=synthetic_splits, progress=False, log=lambda s: None)
    assert resumed.status == "completed"
    assert _strip(resumed.history) == _strip(reference.history)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["examples"] for x in lines] == [r["examples"] for r in reference.history]
    # a finished run is returned, not retrained
    again = train(_cfg(), out, data=synthetic_splits, progress=False, log=lambda s: None)
    assert again.learner is None and again.summary["status"] == "completed"


def test_resume_with_other_config_is_refused_naming_the_difference(tmp_path, synthetic_splits):
    out = tmp_path / "r"
    train(_cfg(max_examples=300), out, data=synthetic_splits, progress=False, log=lambda s: None)
    with pytest.raises(ConfigError, match=r"lr: 0.003 -> 0.01.*batch_size|batch_size: 50 -> 25"):
        train(_cfg(max_examples=300, lr=0.01, batch_size=25), out, data=synthetic_splits,
              progress=False, log=lambda s: None)
    # device and thread count may change on resume
    train(_cfg(max_examples=300, threads=1), out, data=synthetic_splits, progress=False,
          log=lambda s: None)


def test_divergence_stops_with_recorded_status(tmp_path, synthetic_splits):
    out = tmp_path / "div"
    result = train(_cfg(optimizer="sgd", lr=1e6, max_loss=50.0), out, data=synthetic_splits,
                   progress=False, log=lambda s: None)
    assert result.status == "diverged"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "diverged"
    assert "Lower the learning rate" in summary["message"]
    assert summary["examples"] < 2000
    assert "test_acc" not in summary


def test_layer_learning_rates_and_optimizer_options(synthetic_splits):
    cfg = _cfg(optimizer="sgd", lr=0.1, layer_lrs=(0.2, 0.05),
               optimizer_options={"momentum": 0.9}, max_examples=100)
    result = train(cfg, data=synthetic_splits, progress=False, log=lambda s: None)
    assert result.status == "completed"
    with pytest.raises(ConfigError, match="one learning rate per group"):
        train(_cfg(layer_lrs=(0.1,)), data=synthetic_splits, progress=False, log=lambda s: None)


def test_test_every_evaluation_and_max_examples(synthetic_splits):
    result = train(_cfg(test="every", max_examples=450), data=synthetic_splits, progress=False,
                   log=lambda s: None)
    assert [r["examples"] for r in result.history] == [0, 300, 450]
    assert all("test_acc" in r for r in result.history)


@pytest.mark.parametrize("overrides,match", [
    ({"epochs": 0}, "epochs must be > 0"),
    ({"epochs": -2}, "epochs must be > 0"),
    ({"batch_size": 0}, "batch_size must be > 0"),
    ({"lr": 0.0}, "learning rate must be a positive"),
    ({"lr": -1e-3}, "learning rate must be a positive"),
    ({"optimizer": "adamm"}, "valid optimizers are: .*adam"),
    ({"rule": "backprop2"}, "valid rules are: .*bp"),
    ({"model": "transformer"}, "valid models are"),
    ({"optimizer_options": {"momentum": 0.9}}, "optimizer 'adam' has no option"),
    ({"test": "sometimes"}, "test must be one of"),
    ({"device": "cuda:7"} if not torch.cuda.is_available() else {"device": "tpu"}, "device"),
])
def test_bad_configuration_is_refused_before_anything_is_written(tmp_path, synthetic_splits,
                                                                 overrides, match):
    out = tmp_path / "never"
    with pytest.raises(ConfigError, match=match):
        train(_cfg(**overrides), out, data=synthetic_splits, progress=False, log=lambda s: None)
    assert not out.exists()


def test_unwritable_output_folder(tmp_path, synthetic_splits):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(RunDirError, match="is a file"):
        train(_cfg(), blocker / "run", data=synthetic_splits, progress=False, log=lambda s: None)
    with pytest.raises(RunDirError, match="not a folder"):
        train(_cfg(), blocker, data=synthetic_splits, progress=False, log=lambda s: None)


def test_rule_registry_lists_valid_names():
    assert "bp" in rules.names()
    with pytest.raises(ValueError, match="valid rules are"):
        rules.get("nope")
    with pytest.raises(ValueError, match="already registered"):
        rules.RULES.add("bp", object)


def test_configs_pickle_and_roundtrip_json():
    import pickle

    cfg = _cfg(layer_lrs=(0.1, 0.2), rule_options={"loss": "mse"})
    assert pickle.loads(pickle.dumps(cfg)) == cfg
    assert RunConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ConfigError, match="unknown run config option"):
        RunConfig.from_dict({"epocs": 3})
    rc = rules.rule_config("bp", {"loss": "mse"})
    assert pickle.loads(pickle.dumps(rc)) == rc


# ---- the loop's contract: resolved configs, several optimisers, extra statistics -------------

def test_python_api_and_cli_resolve_the_same_config_for_every_rule():
    """One config means one run: `bpdl train` and bpdl.train.resolve_config agree for every
    registered rule, with nothing set and with a batch size set."""
    from bpdl.cli import _config_from_args, build_parser
    from bpdl.train import resolve_config

    for rule in rules.names():
        for extra_args, extra_fields in (([], {}), (["--batch-size", "8"], {"batch_size": 8})):
            args = build_parser().parse_args(["train", "--rule", rule, *extra_args])
            from_cli = resolve_config(_config_from_args(args))
            from_api = resolve_config({"rule": rule, **extra_fields})
            assert from_cli == from_api, rule
            assert from_api.model is not None and from_api.optimizer is not None
            assert resolve_config(from_api) == from_api  # idempotent
    seg = resolve_config({"rule": "segregated"})
    assert (seg.model, seg.optimizer, seg.batch_size) == ("segregated", "sgd", 32)
    assert seg.layer_lrs is not None and len(seg.layer_lrs) == 2
    # a learning rate the caller gives applies to every layer instead of the paper's rates
    assert resolve_config({"rule": "segregated", "lr": 0.1}).layer_lrs is None
    bp = resolve_config({})
    assert (bp.model, bp.optimizer, bp.lr, bp.batch_size) == ("mlp", "adam", 1e-3, 100)


class _TwoOptimizerRule(rules.Learner):
    """A toy rule with parameters of its own, trained by their own loss and optimiser: the
    model by backprop (``main``) and a linear read-out of the hidden layer by Adam at a rate
    of its own (``readout``), like target propagation's inverses."""

    name = "test-two-optimizers"

    def __init__(self, model, config=None):
        super().__init__(model, config)
        self.readout = torch.nn.Linear(model.layers[0].out_features, 10)

    def parameter_groups(self):
        return [g for g in super().parameter_groups() if g["name"] != "rule"]

    def configure_optimizers(self, cfg):
        return {**super().configure_optimizers(cfg),
                "readout": torch.optim.Adam(self.readout.parameters(), lr=0.01)}

    def training_step(self, x, y):
        hidden = torch.relu(self.model.layers[0](x.flatten(1)))
        scores = self.model.layers[1](hidden)
        loss = torch.nn.functional.cross_entropy(scores, y)
        aux = torch.nn.functional.cross_entropy(self.readout(hidden.detach()), y)
        (loss + aux).backward()
        return {"loss": loss.detach(), "correct": (scores.argmax(1) == y).sum(),
                "readout_loss": aux.detach()}


@pytest.fixture
def two_optimizer_rule():
    rules.RULES.add(_TwoOptimizerRule.name, _TwoOptimizerRule)
    yield _TwoOptimizerRule.name
    rules.RULES._items.pop(_TwoOptimizerRule.name)


def test_a_rule_with_two_optimizers_resumes_bit_for_bit(tmp_path, synthetic_splits, two_optimizer_rule):
    cfg = _cfg(rule=two_optimizer_rule, max_examples=1500)
    reference = train(cfg, tmp_path / "ref", data=synthetic_splits, progress=False, log=lambda s: None)
    assert reference.status == "completed"
    ckpt = torch.load(tmp_path / "ref" / "checkpoints" / "last.pt", weights_only=False)
    assert set(ckpt["optimizers"]) == {"main", "readout"}
    assert ckpt["optimizers"]["readout"]["state"]  # Adam moments of the read-out are saved
    # the extra statistic is averaged and logged, and falls as the read-out learns
    curve = [r["running_readout_loss"] for r in reference.history[1:]]
    assert curve[-1] < curve[0]

    out = tmp_path / "crashy"
    with pytest.raises(Crash):
        train(cfg, out, data=synthetic_splits, progress=False, log=lambda s: None,
              callback=_crash_at(600))
    lines = []
    resumed = train(cfg, out, data=synthetic_splits, progress=False, log=lines.append)
    # the crash came before the checkpoint of example 600: the resume starts at 300
    assert lines[0].startswith(f"resuming {out} at example 300")  # not a fresh start
    assert _strip(resumed.history) == _strip(reference.history)
    final = torch.load(out / "checkpoints" / "last.pt", weights_only=False)
    for key, value in ckpt["learner"].items():
        assert torch.equal(value, final["learner"][key]), key
    for name in ("main", "readout"):
        for pid, state in ckpt["optimizers"][name]["state"].items():
            for k, v in state.items():
                assert torch.equal(v, final["optimizers"][name]["state"][pid][k]), (name, k)


def test_optimisers_that_share_a_parameter_are_refused(synthetic_splits, two_optimizer_rule):
    class Sharing(_TwoOptimizerRule):
        def configure_optimizers(self, cfg):
            return {**super().configure_optimizers(cfg),
                    "again": torch.optim.SGD(self.model.parameters(), lr=0.1)}

    from bpdl import nn as bnn

    model = bnn.build_model("mlp", (1, 8, 8), 10, {"hidden": [16]})
    learner = Sharing(model)
    with pytest.raises(ConfigError, match="belongs to both optimisers"):
        learner.setup_optimizers(RunConfig(optimizer="adam", lr=1e-3))


class _TwoPassRule(_TwoOptimizerRule):
    """The toy rule with an alternating schedule: one pass trains only the read-out, the next
    only the model (two passes make one epoch)."""

    name = "test-two-passes"
    passes_per_epoch = 2

    def on_epoch_start(self, epoch):
        self.phase = "readout" if epoch % 2 == 0 else "model"

    def training_step(self, x, y):
        stats = super().training_step(x, y)
        keep = self.readout.parameters() if self.phase == "readout" else self.model.parameters()
        kept = {id(p) for p in keep}
        for p in self.parameters():
            if id(p) not in kept:
                p.grad = None
        return stats


def test_a_rule_with_two_passes_per_epoch(tmp_path, synthetic_splits):
    rules.RULES.add(_TwoPassRule.name, _TwoPassRule)
    try:
        cfg = _cfg(rule=_TwoPassRule.name, epochs=2, eval_every=None)
        result = train(cfg, tmp_path / "run", data=synthetic_splits, progress=False,
                       log=lambda s: None)
    finally:
        rules.RULES._items.pop(_TwoPassRule.name)
    history = result.history
    # one evaluation per pass (1000 examples), four passes for two epochs
    assert [r["examples"] for r in history] == [0, 1000, 2000, 3000, 4000]
    assert [r["epoch"] for r in history] == [0.0, 0.5, 1.0, 1.5, 2.0]
    assert [r.get("phase") for r in history[1:]] == ["readout", "model", "readout", "model"]
    assert result.summary["epochs"] == 2.0
    # the model's weights change only in "model" passes
    norms = [r["layers"]["layers.0"]["weight_norm"] for r in history]
    assert norms[1] == norms[0] and norms[2] != norms[1] and norms[3] == norms[2]


# ---- learning-rate schedules -------------------------------------------------------------------

def test_lr_schedule_factors():
    from bpdl.optim import lr_schedule_factor

    cosine = lr_schedule_factor("cosine", 4)
    assert [cosine(e) for e in range(4)] == pytest.approx([1.0, 0.8535534, 0.5, 0.1464466])
    step = lr_schedule_factor("step:3,5:0.1", 6)
    assert [step(e) for e in range(6)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    assert lr_schedule_factor("exp:0.5", 3)(2) == 0.25
    assert lr_schedule_factor(None, 3)(7) == 1.0
    for bad, why in (("cos", "unknown form"), ("step:1:0.1", "epochs >= 2"),
                     ("exp:2", r"\(0, 1\]"), ("step:a:0.1", "whole epochs"), (3, "a string")):
        with pytest.raises(ConfigError, match=why):
            lr_schedule_factor(bad, 3)


def test_lr_schedule_sets_every_optimisers_rates_per_epoch(tmp_path, synthetic_splits,
                                                           two_optimizer_rule):
    cfg = _cfg(rule=two_optimizer_rule, optimizer="sgd", lr=0.1, layer_lrs=(0.2, 0.05),
               epochs=3, eval_every=None, lr_schedule="step:2,3:0.5")
    result = train(cfg, tmp_path / "run", data=synthetic_splits, progress=False, log=lambda s: None)
    assert [r.get("lr_factor") for r in result.history] == [1.0, 0.5, 0.25, 0.25]
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=False)
    main = ckpt["optimizers"]["main"]["param_groups"]
    # each group keeps its own rate's ratio; the rule's second optimiser follows the schedule
    assert [g["lr"] for g in main] == pytest.approx([0.2 * 0.25, 0.05 * 0.25])
    readout = ckpt["optimizers"]["readout"]["param_groups"][0]
    assert readout["lr"] == pytest.approx(readout["initial_lr"] * 0.25)
    # with the schedule the weights end elsewhere than at constant rates
    constant = train(dataclasses.replace(cfg, lr_schedule=None), tmp_path / "const",
                     data=synthetic_splits, progress=False, log=lambda s: None)
    assert "lr_factor" not in constant.history[-1]
    assert constant.history[-1]["train_loss"] != result.history[-1]["train_loss"]


def test_lr_schedule_resumes_bit_for_bit(tmp_path, synthetic_splits):
    cfg = _cfg(epochs=3, lr_schedule="cosine")
    reference = train(cfg, tmp_path / "ref", data=synthetic_splits, progress=False, log=lambda s: None)
    out = tmp_path / "crashy"
    with pytest.raises(Crash):  # in the second epoch, after the schedule has stepped
        train(cfg, out, data=synthetic_splits, progress=False, log=lambda s: None,
              callback=_crash_at(1500))
    resumed = train(cfg, out, data=synthetic_splits, progress=False, log=lambda s: None)
    assert _strip(resumed.history) == _strip(reference.history)
    assert reference.history[-1]["lr_factor"] == pytest.approx(0.0)


def test_runs_written_before_a_config_field_existed_still_resume(tmp_path, synthetic_splits):
    out = tmp_path / "old"
    cfg = _cfg(max_examples=600)
    with pytest.raises(Crash):
        train(cfg, out, data=synthetic_splits, progress=False, log=lambda s: None,
              callback=_crash_at(600))
    stored = json.loads((out / "config.json").read_text())
    del stored["lr_schedule"]  # as bpdl <= 0.1 wrote it
    (out / "config.json").write_text(json.dumps(stored))
    assert train(cfg, out, data=synthetic_splits, progress=False, log=lambda s: None).status == \
        "completed"
