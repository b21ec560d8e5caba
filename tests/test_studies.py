"""Hyperparameter studies: spaces, the database, the runner, resume after SIGKILL, executors
(in-process, process pool, Ray) and reports, on small subsets of real MNIST."""

from __future__ import annotations

import csv
import json
import os
import pickle
import signal
import sqlite3
import statistics
import subprocess
import sys
import time

import numpy as np
import pytest
from bpdl import nn as bnn
from bpdl import rules
from bpdl.errors import ConfigError
from bpdl.studies import spaces as sp
from bpdl.studies.runner import (
    StudyConfig,
    check_proposal,
    resolve_optimizer,
    run_study,
    study_definition,
    trial_config,
)
from bpdl.studies.store import StudyDatabaseError, StudyStore
from bpdl.studies.worker import DataSpec, Job

PY = sys.executable

#: the smallest real study: 600 MNIST training examples, 2 folds of 300, 1 epoch
TINY = dict(dataset="mnist", epochs=1, folds=2, train_subset=600, top_k=1, test_seeds=2)


def _run(cfg: StudyConfig, db, data_root, **kwargs):
    lines: list[str] = []
    kwargs.setdefault("log", lines.append)
    result = run_study(cfg, db, data_dir=str(data_root), download=False, threads=1, **kwargs)
    return result, lines


def _bpdl(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "bpdl.cli", *args], capture_output=True, text=True,
                          timeout=600, **kwargs)


# ---- search spaces ---------------------------------------------------------------------------

def test_t19_spaces_decode_and_use_log_scales():
    import nevergrad as ng

    mlp = sp.default_space("bp", "mlp")
    assert mlp.name == "mlp-t19" and sp.default_space("bp", "cnn").name == "cnn-t19"
    param = mlp.parametrization(seed=0)
    assert isinstance(param["lr"], ng.p.Log) and isinstance(param["batch_size"], ng.p.Log)
    assert isinstance(param["model_options.hidden[0]"], ng.p.Log)
    assert isinstance(param["model_options.hidden[n]"], ng.p.Scalar)  # depth: linear
    flat = {"batch_size": 100, "lr": 0.001, "model_options.hidden[n]": 2,
            **{f"model_options.hidden[{i}]": 30 + i for i in range(6)}}
    assert mlp.decode(flat) == {"batch_size": 100, "lr": 0.001,
                                "model_options": {"hidden": [30, 31]}}
    cfg = trial_config(StudyConfig(), mlp, flat, seed=7)
    assert cfg["optimizer"] == "adam" and cfg["model_options"]["init"] == "torch_default"
    assert cfg["seed"] == 7 and cfg["test"] == "never"
    # CNN kernels follow the number of channel entries
    cnn = sp.get_space("cnn-t19")
    flat = {"batch_size": 50, "lr": 0.01, "model_options.channels[n]": 3,
            "model_options.stride": 1, "model_options.padding": 2,
            **{f"model_options.channels[{i}]": 8 for i in range(5)},
            **{f"model_options.kernel_size[{i}]": 3 + i for i in range(5)}}
    assert cnn.decode(flat)["model_options"] == {"channels": [8, 8, 8],
                                                 "kernel_size": [3, 4, 5], "stride": 1,
                                                 "padding": 2}
    # sampled learning rates are spread evenly in log space: median near the geometric mean
    opt = ng.optimizers.registry["RandomSearch"](mlp.parametrization(seed=1), budget=200)
    lrs = [opt.ask().value["lr"] for _ in range(200)]
    assert 1e-4 <= min(lrs) and max(lrs) <= 0.05
    assert 0.0012 < statistics.median(lrs) < 0.0045  # sqrt(1e-4 * 0.05) = 0.00224


def test_every_registered_rule_has_a_space_whose_proposals_build():
    """Each rule's default space on its natural model proposes configurations that validate
    and build (rejections only where documented: segregated's noisy-without-symmetric)."""
    import nevergrad as ng
    from bpdl.studies.runner import check_proposal

    natural = {"segregated": "segregated", "microcircuit": "microcircuit"}
    for rule in rules.names():
        model = natural.get(rule, "mlp")
        space = sp.default_space(rule, model)
        assert space is not sp.GENERIC, f"rule {rule!r} has no registered search space"
        opt = ng.optimizers.registry["RandomSearch"](space.parametrization(seed=2), budget=20)
        built = 0
        for _ in range(20):
            d = trial_config(StudyConfig(rule=rule, model=model), space, opt.ask().value, seed=0)
            try:
                check_proposal(d, (1, 28, 28), 10)
                built += 1
            except ConfigError as err:
                assert rule == "segregated" and "noisy_symmetric" in str(err), (rule, err)
        assert built >= 10, (rule, built)
    assert sp.default_space("fa", "cnn").name == "cnn-t19"


def test_segregated_space_and_rule_defaults_in_trial_configs():
    seg = sp.default_space("segregated", "segregated")
    assert seg.name == "segregated-t19" and len(seg.dims) == 22
    flags = [k for k, d in seg.dims.items() if isinstance(d, sp.Choice)]
    assert len(flags) == 11  # T19's eleven binary flags
    cfg = StudyConfig(rule="segregated", model="segregated")
    # a space that does not fix the optimiser gets the rule's run defaults (plain SGD, the
    # paper's per-layer rates rescaled for the batch) ...
    d = trial_config(cfg, sp.GENERIC, {"lr": 0.1, "batch_size": 16}, seed=0)
    assert d["optimizer"] == "sgd" and d["lr"] == 0.1 and d["batch_size"] == 16
    assert d.get("layer_lrs") is None  # a searched lr applies to every layer
    d = trial_config(StudyConfig(rule="segregated", model="segregated",
                                 fixed={"batch_size": 32}), sp.SearchSpace(
        "seg-bs-only", {"model_options.g_B": sp.Uniform(0.3, 0.9)}), {"model_options.g_B": 0.6},
        seed=0)
    assert d["optimizer"] == "sgd" and len(d["layer_lrs"]) == 2
    # ... and rules without run defaults are untouched
    d = trial_config(StudyConfig(rule="fa", model="mlp"), sp.GENERIC,
                     {"lr": 0.01, "batch_size": 64}, seed=0)
    assert "optimizer" not in d and "layer_lrs" not in d


def test_unknown_rule_gets_the_generic_space_and_registration_rules():
    assert sp.default_space("no-such-rule", "mlp") is sp.GENERIC
    assert set(sp.GENERIC.dims) == {"lr", "batch_size"}
    with pytest.raises(ValueError, match="already registered"):
        sp.register_space(sp.SearchSpace("mlp-t19", {"lr": sp.LogUniform(1e-3, 1.0)}))
    with pytest.raises(ValueError, match="already has default"):
        sp.set_default_space("bp", "mlp", "generic")


@pytest.mark.parametrize("dims, fixed, message", [
    ({}, {}, "is empty"),
    ({"lr": sp.LogUniform(0.1, 0.01)}, {}, "lower bound 0.1 is not below"),
    ({"lr": sp.LogUniform(0.01, 0.01)}, {}, "not below"),
    ({"lr": sp.LogUniform(0.0, 0.1)}, {}, "positive lower bound"),
    ({"batch_size": sp.IntRange(10.5, 20)}, {}, "must be integers"),
    ({"model_options.activation": sp.Choice(["relu"])}, {}, "at least two options"),
    ({"model_options.hidden": sp.IntList(30, 500, length=(3, 1))}, {}, "is empty"),
    ({"model_options.kernel_size": sp.IntList(2, 5, length="model_options.channels")}, {},
     "not a list dimension"),
    ({"lr": sp.LogUniform(1e-3, 1.0)}, {"lr": 0.1}, "both searched and fixed"),
    ({"epochs": sp.IntRange(1, 5)}, {}, "cannot search 'epochs'"),
])
def test_empty_or_contradictory_spaces_are_refused(dims, fixed, message):
    with pytest.raises(ConfigError, match=message):
        sp.SearchSpace("bad", dims, fixed=fixed).validate()


def test_space_targets_and_json_form():
    with pytest.raises(ConfigError, match="model 'mlp' has no option 'channels'"):
        sp.SearchSpace("x", {"model_options.channels": sp.IntList(3, 9, (1, 2))}
                       ).check_targets("bp", "mlp")
    with pytest.raises(ConfigError, match="not a run-config field"):
        sp.SearchSpace("x", {"learning_rate": sp.LogUniform(1e-3, 1.0)}).check_targets("bp", "mlp")
    cnn = sp.get_space("cnn-t19")
    again = sp.space_from_dict(json.loads(json.dumps(cnn.to_dict())))
    assert again.to_dict() == cnn.to_dict()
    assert pickle.loads(pickle.dumps(cnn)).to_dict() == cnn.to_dict()
    with pytest.raises(ConfigError, match="needs \"kind\""):
        sp.space_from_dict({"dims": {"lr": {"low": 1, "high": 2}}})
    with pytest.raises(ConfigError, match="unknown field"):
        sp.space_from_dict({"dims": {"lr": {"kind": "log_uniform", "low": 1e-3, "hi": 2}}})


def test_configs_and_jobs_pickle_and_optimizer_names():
    cfg = StudyConfig(rule="bp", budget=7, fixed={"max_examples": 100})
    assert pickle.loads(pickle.dumps(cfg)) == cfg
    assert StudyConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    job = Job("trial", "s", 3, {"lr": 0.1}, DataSpec("mnist", 3, 0))
    assert pickle.loads(pickle.dumps(job)) == job
    assert resolve_optimizer("ngopt") == "NGOpt"
    with pytest.raises(ConfigError, match="unknown Nevergrad optimizer 'NoSuchOpt'; for "
                                          "example NGOpt, TwoPointsDE, CMA"):
        resolve_optimizer("NoSuchOpt")
    with pytest.raises(ConfigError, match="unknown study config option"):
        StudyConfig.from_dict({"budgets": 3})


def test_check_proposal_rejects_collapsing_cnn():
    space = sp.get_space("cnn-t19")
    flat = {"batch_size": 50, "lr": 0.01, "model_options.channels[n]": 5,
            "model_options.stride": 3, "model_options.padding": 1,
            **{f"model_options.channels[{i}]": 8 for i in range(5)},
            **{f"model_options.kernel_size[{i}]": 10 for i in range(5)}}
    with pytest.raises(ConfigError, match="CNN block 2"):
        check_proposal(trial_config(StudyConfig(model="cnn"), space, flat, 0), (1, 28, 28), 10)
    flat["model_options.channels[n]"] = 1
    check_proposal(trial_config(StudyConfig(model="cnn"), space, flat, 0), (1, 28, 28), 10)


# ---- the database ------------------------------------------------------------------------------

def test_corrupted_and_foreign_database_files_are_refused(tmp_path):
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not a database at all" * 100)
    with pytest.raises(StudyDatabaseError, match="not an SQLite file"):
        StudyStore(junk)
    assert junk.read_bytes() == b"this is not a database at all" * 100  # untouched
    foreign = tmp_path / "foreign.db"
    with sqlite3.connect(foreign) as conn:
        conn.execute("CREATE TABLE customers (id INTEGER, name TEXT)")
    with pytest.raises(StudyDatabaseError, match=r"not a bpdl study database \(its tables: "
                                                 r"customers\)"):
        StudyStore(foreign)
    # a real study database with garbage written over its pages
    good = tmp_path / "good.db"
    with StudyStore(good) as store:
        store.create_or_check("s", {"a": 1})
        conn = store.conn
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    data = bytearray(good.read_bytes())
    data[100:len(data)] = os.urandom(len(data) - 100)
    good.write_bytes(bytes(data))
    for suffix in ("-wal", "-shm"):
        (tmp_path / f"good.db{suffix}").unlink(missing_ok=True)
    with pytest.raises(StudyDatabaseError, match="corrupted"):
        StudyStore(good)
    with pytest.raises(StudyDatabaseError, match="no study database"):
        StudyStore(tmp_path / "absent.db", create=False)
    with pytest.raises(StudyDatabaseError, match="is a folder"):
        StudyStore(tmp_path)


def test_database_uses_wal_and_refuses_another_definition(tmp_path):
    db = tmp_path / "s.db"
    space = sp.get_space("mlp-t19")
    a = study_definition(StudyConfig(epochs=1), space)
    b = study_definition(StudyConfig(epochs=2, optimizer="CMA"), space)
    with StudyStore(db) as store:
        assert store.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert store.create_or_check("s", a) is True
        assert store.create_or_check("s", a) is False
        with pytest.raises(ConfigError, match=r"different definition.*epochs: 1 -> 2; "
                                              r"optimizer: 'NGOpt' -> 'CMA'"):
            store.create_or_check("s", b)
        assert store.create_or_check("other", b) is True  # two studies, one file
        assert store.study_names() == ["s", "other"]


def test_reports_leave_a_committed_database_byte_for_byte_unchanged(mlp_study, tmp_path):
    """A database committed in journal mode DELETE (as benchmarks/results/studies/ holds them)
    must not be rewritten by `study report` or `study compare`: they open it read-only."""
    import sqlite3

    from bpdl.cli import main

    _, db, _, _ = mlp_study
    committed = tmp_path / "committed.db"
    src, dst = sqlite3.connect(db), sqlite3.connect(committed)
    src.backup(dst)
    dst.execute("PRAGMA journal_mode=DELETE")
    dst.close()
    src.close()
    before = committed.read_bytes()
    assert main(["study", "report", str(committed), "--out", str(tmp_path / "rep")]) == 0
    assert main(["study", "compare", str(committed), "--out", str(tmp_path / "cmp")]) == 0
    assert committed.read_bytes() == before
    with StudyStore(committed) as store:  # a writer (study run) still switches it to WAL
        assert store.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    with pytest.raises(ValueError, match="read_only=True needs create=False"):
        StudyStore(committed, read_only=True)


def test_a_study_run_by_a_live_process_is_refused(tmp_path):
    import socket

    db = tmp_path / "s.db"
    sleeper = subprocess.Popen([PY, "-c", "import time; time.sleep(60)"])
    try:
        with StudyStore(db) as store:
            store.create_or_check("s", {"a": 1})
            with store.transaction() as c:
                c.execute("UPDATE studies SET owner = ?, heartbeat = ?",
                          (f"{socket.gethostname()}:{sleeper.pid}:?", time.time()))
            with pytest.raises(StudyDatabaseError, match=f"being run by process {sleeper.pid}"):
                store.claim("s")
            sleeper.kill()
            sleeper.wait()
            token = store.claim("s")  # its runner is dead: the study is free again
            assert store.study("s")["owner"] == token
    finally:
        sleeper.kill()
        sleeper.wait()


# ---- running studies ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mlp_study(tmp_path_factory, real_data_root):
    """One complete tiny bp-MLP study (in-process), shared by the tests that read it."""
    db = tmp_path_factory.mktemp("study") / "bp.db"
    cfg = StudyConfig(rule="bp", model="mlp", budget=4, seed=3, **TINY)
    result, lines = _run(cfg, db, real_data_root)
    return cfg, db, result, lines


def test_study_runs_stores_every_trial_and_retests_the_best(mlp_study):
    cfg, db, result, lines = mlp_study
    assert result.status == "complete"
    assert result.counts == {"completed": 4, "diverged": 0, "failed": 0, "running": 0,
                             "rejected": 0}
    with StudyStore(db, create=False) as store:
        trials = store.trials(cfg.study_name)
        tests = store.test_runs(cfg.study_name)
    assert [t["number"] for t in trials] == [1, 2, 3, 4]
    for t in trials:
        assert t["status"] == "completed" and t["attempts"] == 1
        assert len(t["folds"]) == 2 and {f["n_train"] for f in t["folds"]} == {300}
        assert t["objective"] == pytest.approx(statistics.fmean(f["val_acc"] for f in t["folds"]),
                                               abs=1e-12)
        assert t["loss"] == pytest.approx(1 - t["objective"])
        assert t["seed"] == 3 * 100_000 + t["number"]
        # one learning curve per fold: the evaluation at 0 and after the epoch
        assert [[p["examples"] for p in c] for c in t["curves"]] == [[0, 300], [0, 300]]
        assert 0.0 <= t["objective"] <= 1.0 and t["duration"] > 0
        assert t["config"]["model_options"]["hidden"] == [
            t["params"][f"model_options.hidden[{i}]"]
            for i in range(t["params"]["model_options.hidden[n]"])]
    best = max(trials, key=lambda t: t["objective"])
    assert result.best["number"] == best["number"]
    # held-out test: the best configuration, 2 seeds, apart from the search objective
    assert [(r["trial"], r["rank"], r["status"]) for r in tests] == [
        (best["number"], 1, "completed")] * 2
    assert len({r["seed"] for r in tests}) == 2 and all(0 < r["test_acc"] <= 1 for r in tests)
    # a progress line per trial with the best so far and the time left
    trial_lines = [ln for ln in lines if "] trial " in ln]
    assert len(trial_lines) == 4
    assert all("best " in ln and "elapsed" in ln and "remaining ~" in ln for ln in trial_lines)
    assert any("held-out test, rank 1" in ln for ln in lines)


def test_rerunning_a_complete_study_runs_nothing(mlp_study, real_data_root):
    cfg, db, result, _ = mlp_study
    again, lines = _run(cfg, db, real_data_root)
    assert lines[0] == f"study {cfg.study_name} is already complete; nothing to run"
    assert again.counts == result.counts and again.best["number"] == result.best["number"]
    with pytest.raises(ConfigError, match="budget: 4 -> 5"):
        _run(StudyConfig(**{**cfg.to_dict(), "budget": 5}), db, real_data_root)


def test_report_tables_and_figures(mlp_study, tmp_path, capsys):
    from bpdl.cli import main

    cfg, db, _, _ = mlp_study
    assert main(["study", "report", str(db), "--out", str(tmp_path / "rep")]) == 0
    out = capsys.readouterr().out
    assert "| bp-mlp-mnist | mnist | bp/mlp | mlp-t19 v1 | 4/4 |" in out
    with StudyStore(db, create=False) as store:
        objs = [t["objective"] for t in store.trials(cfg.study_name)]
        accs = [r["test_acc"] for r in store.test_runs(cfg.study_name)]
    rows = list(csv.DictReader((tmp_path / "rep" / "summary.csv").open()))
    assert len(rows) == 1
    row = rows[0]
    assert float(row["best"]) == pytest.approx(max(objs))
    assert float(row["worst"]) == pytest.approx(min(objs))
    assert float(row["mean"]) == pytest.approx(np.mean(objs))
    assert float(row["median"]) == pytest.approx(np.median(objs))
    assert float(row["std"]) == pytest.approx(np.std(objs, ddof=0))  # population, as T19
    assert int(row["chance"]) == sum(o <= 0.15 for o in objs)
    assert float(row["test_mean"]) == pytest.approx(np.mean(accs))
    assert float(row["test_std"]) == pytest.approx(np.std(accs))
    trials = list(csv.DictReader((tmp_path / "rep" / "trials.csv").open()))
    assert [int(t["trial"]) for t in trials] == [1, 2, 3, 4]
    assert {"lr", "batch_size", "model_options.hidden", "fold0_val_acc"} <= set(trials[0])
    tests = list(csv.DictReader((tmp_path / "rep" / "tests.csv").open()))
    assert len(tests) == 2
    for name in ("report.md", "bp-mlp-mnist.png", "bp-mlp-mnist.pdf"):
        assert (tmp_path / "rep" / name).stat().st_size > 1000
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "Held-out test accuracy of the best configurations" in md


def _interrupt_after_two_trials(cfg, db, data_root) -> None:
    """Run the study into ``db`` and interrupt it (Ctrl-C) when the log line of its
    second trial appears, leaving two completed trials."""

    def stop_after_two(line: str) -> None:
        if "] trial 2 " in line:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(cfg, db, data_root, log=stop_after_two)


def test_resume_continues_exactly_where_it_stopped(mlp_study, tmp_path, real_data_root):
    """Interrupted after two trials, the resumed study proposes the same points as the
    uninterrupted one (the optimizer comes back from its snapshot, RNG included)."""
    cfg, full_db, _, _ = mlp_study
    db = tmp_path / "interrupted.db"
    _interrupt_after_two_trials(cfg, db, real_data_root)
    with StudyStore(db, create=False) as store:
        assert [t["status"] for t in store.trials(cfg.study_name)] == ["completed"] * 2
        assert store.study(cfg.study_name)["owner"] is None  # released on the way out
    result, lines = _run(cfg, db, real_data_root)
    assert "optimizer snapshot" in next(ln for ln in lines if ln.startswith("resuming"))
    with StudyStore(db, create=False) as a, StudyStore(full_db, create=False) as b:
        resumed, full = a.trials(cfg.study_name), b.trials(cfg.study_name)
    assert [t["params"] for t in resumed] == [t["params"] for t in full]
    assert [t["objective"] for t in resumed] == [t["objective"] for t in full]
    assert result.counts["completed"] == 4


def test_resume_without_snapshot_replays_the_trial_log(mlp_study, tmp_path, real_data_root):
    cfg, _, _, _ = mlp_study
    db = tmp_path / "replay.db"
    _interrupt_after_two_trials(cfg, db, real_data_root)
    with StudyStore(db, create=False) as store:
        first = store.trials(cfg.study_name)
        with store.transaction() as c:  # as if written by another Nevergrad version
            c.execute("UPDATE studies SET optimizer_state = x'00ff'")
    result, lines = _run(cfg, db, real_data_root)
    assert "replayed from the trial log (snapshot unreadable" in "\n".join(lines)
    with StudyStore(db, create=False) as store:
        trials = store.trials(cfg.study_name)
    assert [t["number"] for t in trials] == [1, 2, 3, 4]
    assert [t["params"] for t in trials[:2]] == [t["params"] for t in first]
    assert result.counts["completed"] == 4


@pytest.fixture
def raising_rule():
    """A rule whose training step raises: a trial that fails for reasons of its own."""
    from bpdl.rules.backprop import Backprop

    class Raising(Backprop):
        name = "test-raises"

        def training_step(self, x, y):
            raise RuntimeError("boom in the training step")

    rules.RULES.add("test-raises", Raising)
    try:
        yield "test-raises"
    finally:
        del rules.RULES._items["test-raises"]


def test_failing_and_diverging_trials_are_recorded_and_the_study_goes_on(
        tmp_path, real_data_root, raising_rule):
    cfg = StudyConfig(rule=raising_rule, budget=2, **TINY)
    result, lines = _run(cfg, tmp_path / "f.db", real_data_root)
    assert result.status == "complete" and result.counts["failed"] == 2
    with StudyStore(tmp_path / "f.db", create=False) as store:
        trials = store.trials(cfg.study_name)
        assert store.test_runs(cfg.study_name) == []  # nothing completed: nothing to test
    assert all(t["status"] == "failed" and t["loss"] == 1.0 and t["objective"] is None
               and t["error"].startswith("RuntimeError: boom in the training step")
               for t in trials)
    assert sum("FAILED (RuntimeError: boom" in ln for ln in lines) == 2
    # learning rates that blow the loss up: diverged (NaN/inf), recorded, the study completes
    space = sp.SearchSpace("too-hot", {"lr": sp.LogUniform(1e6, 1e8)},
                           fixed={"optimizer": "sgd"})
    cfg = StudyConfig(rule="bp", budget=2, name="hot", **TINY)
    result, _ = _run(cfg, tmp_path / "f.db", real_data_root, space=space)
    assert result.counts["diverged"] == 2 and result.status == "complete"
    with StudyStore(tmp_path / "f.db", create=False) as store:
        hot = store.trials("hot")
        assert store.study_names() == [f"{raising_rule}-mlp-mnist", "hot"]
    assert all(t["status"] == "diverged" and "training loss became" in t["error"]
               for t in hot)


def test_invalid_cnn_proposals_are_rejected_recorded_and_not_counted(tmp_path, real_data_root):
    space = sp.SearchSpace("cnn-risky", {
        "model_options.channels": sp.IntList(3, 4, length=(1, 3)),
        "model_options.kernel_size": sp.IntList(2, 12, length="model_options.channels"),
        "model_options.stride": sp.IntRange(1, 3)}, fixed={"model_options": {"padding": 0}})
    cfg = StudyConfig(rule="bp", model="cnn", budget=3, optimizer="RandomSearch",
                      fixed={"max_examples": 100}, **TINY)
    result, lines = _run(cfg, tmp_path / "c.db", real_data_root, space=space)
    assert result.counts["completed"] + result.counts["diverged"] == 3
    with StudyStore(tmp_path / "c.db", create=False) as store:
        rejections = store.rejections(cfg.study_name)
        trials = store.trials(cfg.study_name)
    assert len(rejections) >= 1 and result.counts["rejected"] == len(rejections)
    assert sum("proposal rejected, not counted" in ln for ln in lines) == len(rejections)
    for rej in rejections:  # each rejection really is an impossible network
        assert "CNN block" in rej["error"]
        opts = space.decode(rej["params"])["model_options"]
        with pytest.raises(ConfigError):
            bnn.cnn_geometry((1, 28, 28), bnn.CNNConfig(**opts, padding=0))
    for t in trials:  # and every evaluated trial is a possible one, as proposed
        bnn.cnn_geometry((1, 28, 28), bnn.CNNConfig(**space.decode(t["params"])["model_options"],
                                                    padding=0))
    # every proposal and every told result is on record, in the order it happened
    seqs = sorted([r["seq"] for r in rejections] + [t["ask_seq"] for t in trials]
                  + [t["tell_seq"] for t in trials])
    assert seqs == list(range(len(seqs)))


def test_repeated_proposals_are_retested_once(tmp_path, real_data_root):
    """Four trials over two possible points: the test set sees the two distinct ones."""
    space = sp.SearchSpace("two-points", {"lr": sp.Choice([0.001, 0.003])})
    cfg = StudyConfig(rule="bp", budget=4, optimizer="RandomSearch",
                      **{**TINY, "top_k": 3, "test_seeds": 1})
    result, _ = _run(cfg, tmp_path / "d.db", real_data_root, space=space)
    with StudyStore(tmp_path / "d.db", create=False) as store:
        trials = {t["number"]: t for t in store.trials(cfg.study_name)}
        runs = store.test_runs(cfg.study_name)
    assert len({t["config"]["lr"] for t in trials.values()}) == 2
    assert sorted(trials[r["trial"]]["config"]["lr"] for r in runs) == [0.001, 0.003]
    assert [r["rank"] for r in runs] == [1, 2] and len(result.tests) == 2


def test_a_space_with_no_valid_point_stops_with_a_clear_error(tmp_path, real_data_root):
    space = sp.SearchSpace("cnn-impossible", {
        "model_options.kernel_size": sp.IntRange(29, 40)},
        fixed={"model_options": {"padding": 0, "channels": [4]}})
    cfg = StudyConfig(rule="bp", model="cnn", budget=2, **TINY)
    with pytest.raises(ConfigError, match="produced 15 invalid proposals in a row.*narrow it"):
        _run(cfg, tmp_path / "x.db", real_data_root, space=space, max_rejections=15)
    with StudyStore(tmp_path / "x.db", create=False) as store:
        assert len(store.rejections(cfg.study_name)) == 15
        assert store.trials(cfg.study_name) == []


def test_bad_study_input_is_refused_before_any_work(tmp_path, real_data_root):
    bad = [
        (StudyConfig(rule="nope"), "unknown rule 'nope'"),
        (StudyConfig(folds=1), "folds must be >= 2"),
        (StudyConfig(budget=0), "budget must be > 0"),
        (StudyConfig(optimizer="Nope"), "unknown Nevergrad optimizer"),
        (StudyConfig(fixed={"lr": 0.1}), "both searched by space 'mlp-t19' and fixed"),
        (StudyConfig(fixed={"epochs": 3}), "cannot fix epochs"),
        (StudyConfig(space="nope"), "unknown search space 'nope'"),
        (StudyConfig(train_subset=10**6, **{k: v for k, v in TINY.items()
                                            if k != "train_subset"}), "train_subset must be"),
    ]
    for cfg, message in bad:
        with pytest.raises(ConfigError, match=message):
            _run(cfg, tmp_path / "bad.db", real_data_root)
    assert not (tmp_path / "bad.db").exists()


def test_every_registered_rule_runs_a_study_from_the_command_line(tmp_path, real_data_root):
    from bpdl.cli import main

    for rule in rules.names():
        cls = rules.get(rule)
        model = "mlp" if cls.supported_models is None or "mlp" in cls.supported_models \
            else cls.supported_models[0]
        # segregated dendrites in spiking mode test 10,000 images for ~75 steps each: the
        # suite runs its study in rate mode on the generic space (its T19 space is checked by
        # test_every_registered_rule_has_a_space_whose_proposals_build)
        extra = (["--space", "generic", "--set", "model_options.mode=rate",
                  "--set", "model_options.hidden=[64]"] if rule == "segregated" else [])
        code = main(["study", "run", "--rule", rule, "--model", model, "--budget", "1",
                     "--epochs", "1", "--folds", "2", "--train-subset", "400", "--top-k", "1",
                     "--test-seeds", "1", "--db", str(tmp_path / "all.db"), "--data-dir",
                     str(real_data_root), "--offline", "--threads", "1", *extra])
        assert code == 0, rule
    with StudyStore(tmp_path / "all.db", create=False) as store:
        for rule in rules.names():
            name = next(n for n in store.study_names() if n.startswith(f"{rule}-"))
            assert [t["status"] for t in store.trials(name)] == ["completed"]


def test_cli_errors_are_one_line(tmp_path):
    proc = _bpdl("study", "run", "--optimizer", "Nope", "--db", str(tmp_path / "e.db"),
                 "--offline", "--data-dir", str(tmp_path))
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: unknown Nevergrad optimizer 'Nope'; for example NGOpt")
    # A bad worker count is told at once, before the (here missing) dataset is looked for.
    proc = _bpdl("study", "run", "--workers", "0", "--db", str(tmp_path / "e.db"),
                 "--offline", "--data-dir", str(tmp_path))
    assert proc.returncode == 2 and proc.stderr == "error: --workers must be >= 1, got 0\n"
    # A misspelt --set key is told at once, not after 1000 proposals rejected for it.
    proc = _bpdl("study", "run", "--set", "model_options.hiden=[5]", "--db",
                 str(tmp_path / "e.db"), "--offline", "--data-dir", str(tmp_path))
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: --set: model 'mlp' has no option 'hiden'; valid: ")
    (tmp_path / "junk.db").write_text("hello")
    proc = _bpdl("study", "report", str(tmp_path / "junk.db"))
    assert proc.returncode == 2 and "not an SQLite file" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


# ---- reliability with real processes -------------------------------------------------------------

def _study_args(db, data_root, *extra: str) -> list[str]:
    return ["study", "run", "--rule", "bp", "--model", "mlp", "--dataset", "mnist", "--epochs",
            "1", "--folds", "2", "--train-subset", "1200", "--top-k", "1", "--test-seeds", "1",
            "--db", str(db), "--data-dir", str(data_root), "--offline", *extra]


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[-1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(entry))
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def _statuses(db, name: str) -> list[tuple[int, str]]:
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
        try:
            return conn.execute("SELECT number, status FROM trials WHERE study = ? ORDER BY "
                                "number", (name,)).fetchall()
        finally:
            conn.close()
    except sqlite3.OperationalError:  # not created yet
        return []


@pytest.mark.slow
def test_sigkill_during_trials_then_resume_completes_the_budget_exactly(tmp_path,
                                                                       real_data_root):
    """Kill -9 the study process (2 pool workers) while trials run; the same command resumes:
    finished trials kept as they were, the killed ones retried, each trial counted once."""
    db = tmp_path / "kill.db"
    args = _study_args(db, real_data_root, "--budget", "6", "--workers", "2", "--threads", "1")
    proc = subprocess.Popen([PY, "-m", "bpdl.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    try:
        while time.time() < deadline:
            statuses = [s for _, s in _statuses(db, "bp-mlp-mnist")]
            if statuses.count("completed") >= 2 and "running" in statuses:
                break
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.05)
        else:
            pytest.fail("the study never had two finished trials and one running")
        workers = _children(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        # the pool workers die with the study process instead of finishing trials for nobody
        deadline = time.time() + 30
        while any(_alive(w) for w in workers) and time.time() < deadline:
            time.sleep(0.1)
        assert workers and not any(_alive(w) for w in workers)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    with StudyStore(db, create=False) as store:
        before = {t["number"]: t for t in store.trials("bp-mlp-mnist")}
    finished = {n: t for n, t in before.items() if t["status"] != "running"}
    killed = {n: t for n, t in before.items() if t["status"] == "running"}
    assert len(finished) >= 2 and killed

    again = _bpdl(*args)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"{len(finished)} finished trial(s) kept, {len(killed)} interrupted trial(s) " \
           f"retried" in again.stdout
    with StudyStore(db, create=False) as store:
        after = {t["number"]: t for t in store.trials("bp-mlp-mnist")}
        tests = store.test_runs("bp-mlp-mnist")
    assert sorted(after) == [1, 2, 3, 4, 5, 6]
    assert all(t["status"] == "completed" for t in after.values())
    for n, t in finished.items():  # untouched: not run again
        assert after[n] == t
    for n, t in killed.items():  # retried with the same point and seed
        assert after[n]["params"] == t["params"] and after[n]["seed"] == t["seed"]
        assert after[n]["attempts"] == 2
    assert len(tests) == 1 and tests[0]["status"] == "completed"
    from bpdl.cli import main

    assert main(["study", "report", str(db), "--out", str(tmp_path / "rep")]) == 0
    rows = list(csv.DictReader((tmp_path / "rep" / "trials.csv").open()))
    assert sorted(int(r["trial"]) for r in rows) == [1, 2, 3, 4, 5, 6]
    summary = next(csv.DictReader((tmp_path / "rep" / "summary.csv").open()))
    assert summary["n"] == "6" and summary["completed"] == "6"


@pytest.mark.slow
def test_two_studies_share_one_database_concurrently(tmp_path, real_data_root):
    db = tmp_path / "shared.db"
    procs = [subprocess.Popen([PY, "-m", "bpdl.cli", *_study_args(
        db, real_data_root, "--budget", "3", "--name", name, "--seed", str(seed),
        "--threads", "1")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for seed, name in enumerate(("first", "second"))]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    with StudyStore(db, create=False) as store:
        assert sorted(store.study_names()) == ["first", "second"]
        for name in ("first", "second"):
            assert [t["status"] for t in store.trials(name)] == ["completed"] * 3
            assert store.study(name)["status"] == "complete"


@pytest.mark.ray
@pytest.mark.slow
def test_ray_executor_runs_a_study_on_a_local_ray_instance(tmp_path, real_data_root):
    pytest.importorskip("ray")
    cfg = StudyConfig(rule="bp", budget=2, **TINY)
    result, lines = _run(cfg, tmp_path / "ray.db", real_data_root, executor="ray", workers=2)
    assert result.status == "complete" and result.counts["completed"] == 2
    with StudyStore(tmp_path / "ray.db", create=False) as store:
        trials = store.trials(cfg.study_name)
        tests = store.test_runs(cfg.study_name)
    # the trials ran in Ray worker processes, not in this one
    assert all(t["worker"].split(":")[1] != str(os.getpid()) for t in trials)
    assert len(tests) == 2 and all(r["status"] == "completed" for r in tests)


def test_compare_draws_the_grid_and_bars(mlp_study, tmp_path, capsys):
    from bpdl.cli import main
    from bpdl.studies.report import load_studies

    _, db, _, _ = mlp_study
    assert main(["study", "compare", str(db), str(db), "--out", str(tmp_path / "cmp")]) == 0
    out = capsys.readouterr().out
    assert out.count("| bp-mlp-mnist | mnist | bp/mlp |") == 2
    for name in ("compare_grid.png", "compare_grid.pdf", "compare_bars.png", "compare.md",
                 "compare.csv"):
        assert (tmp_path / "cmp" / name).stat().st_size > 500
    studies = load_studies([db])
    assert studies[0]["stats"]["n"] == 4
    # An output path blocked by a file is one error line, exit 2, for compare and report.
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    for cmd in (["compare", str(db), "--out", str(blocker)],
                ["report", str(db), "--out", str(blocker / "sub")]):
        assert main(["study", *cmd]) == 2
        err = capsys.readouterr().err
        assert err == (f"error: cannot create the output folder {cmd[-1]}: {blocker} is a "
                       f"file, not a folder; choose another path with --out\n")


def _fake_study(rule, dataset, objectives, tests=()):
    """A loaded study as the reports see it, from objective values (statistics computed by
    study_statistics from a minimal definition)."""
    from bpdl.studies.report import study_statistics

    trials = [{"number": i, "status": "completed", "objective": o, "duration": 1.0,
               "config": {}} for i, o in enumerate(objectives)]
    study = {"name": f"{rule}-{dataset}", "status": "running", "definition": {
        "rule": rule, "model": "mlp", "dataset": dataset, "space": {"name": "s", "version": 1},
        "optimizer": "NGOpt", "budget": 50, "epochs": 10, "folds": 3}}
    tests = [{"rank": r + 1, "trial": r, "objective": objectives[r], "mean": m, "std": 0.001,
              "n": 3, "runs": 3} for r, m in enumerate(tests)]
    return {"name": study["name"], "trials": trials, "tests": tests,
            "stats": study_statistics(study, trials, [], tests)}


def test_compare_bars_show_every_trial_the_chance_count_and_the_test_accuracy(tmp_path):
    """T19's planned figure: a panel per dataset, bars per model, every trial as a point, the
    count at chance under the bars, the best configurations' test accuracy as diamonds."""
    from bpdl.studies.report import plot_compare_bars
    from matplotlib.collections import PathCollection

    studies = [_fake_study("bp", "mnist", [0.97, 0.96, 0.10, 0.95], tests=(0.971, 0.965)),
               _fake_study("fa", "mnist", [0.93, 0.12, 0.11]),
               _fake_study("bp", "fashion_mnist", [0.88, 0.87], tests=(0.879,))]
    fig = plot_compare_bars(studies, tmp_path / "bars.png")
    assert (tmp_path / "bars.png").stat().st_size > 500
    axes = fig.axes
    assert [ax.get_title() for ax in axes] == ["MNIST", "Fashion-MNIST"]
    points = [sum(len(c.get_offsets()) for c in ax.collections if isinstance(c, PathCollection))
              for ax in axes]
    assert points == [7, 2]  # every completed trial
    texts = [[t.get_text() for t in ax.texts] for ax in axes]
    assert texts[0] == ["n=4\n# chance 1", "n=3\n# chance 2"]
    assert texts[1] == ["n=2\n# chance 0"]
    diamonds = [line for ax in axes for line in ax.lines if line.get_marker() == "D"]
    assert sorted(len(line.get_ydata()) for line in diamonds) == [1, 2]
    assert list(diamonds[0].get_ydata()) == [0.971, 0.965]


def test_t19_bayesian_optimiser_runs_a_study(tmp_path, real_data_root):
    """T19's GP-UCB (Matern 2.5, kappa 2.5) is offered by name and drives a study."""
    from bpdl.studies.runner import T19_BAYES, optimizer_names, resolve_optimizer

    assert T19_BAYES in optimizer_names() and resolve_optimizer("t19-gp-ucb") == T19_BAYES
    space = sp.SearchSpace("lr-only", {"lr": sp.LogUniform(1e-4, 1e-2)})
    cfg = StudyConfig(rule="bp", budget=3, optimizer=T19_BAYES, **{**TINY, "test_seeds": 1})
    result, lines = _run(cfg, tmp_path / "bo.db", real_data_root, space=space)
    assert result.status == "complete" and result.counts["completed"] == 3
    assert any(f"optimizer {T19_BAYES}" in line for line in lines)


def test_study_run_takes_no_progress_and_a_closed_pipe_is_quiet(tmp_path, real_data_root):
    import subprocess
    import sys

    from bpdl.cli import build_parser

    args = build_parser().parse_args(["study", "run", "--no-progress"])
    assert args.no_progress
    # a reader that stops early (`bpdl study optimizers | head -1`) gets no traceback
    proc = subprocess.run(f"{sys.executable} -m bpdl.cli study optimizers | head -1",
                          shell=True, capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() and "Traceback" not in proc.stderr
    assert "BrokenPipe" not in proc.stderr, proc.stderr


def test_the_whole_study_path_on_cifar10_files_in_cifar_format(tmp_path, monkeypatch):
    """CIFAR-10 cannot be downloaded here: a small set written in CIFAR's own format (Python-2
    pickles of HWC-ordered rows) goes through `bpdl study run` for an MLP, a CNN and segregated
    dendrites (online, rate mode), then `bpdl study report` and `bpdl study compare`. The
    files are not the real ones, so their checksums are not checked here."""
    import numpy as np
    from bpdl.cli import main
    from test_data import write_cifar

    root = tmp_path / "data"
    # class k: a bright square at one of ten positions in one colour channel, noise elsewhere
    rng = np.random.default_rng(0)

    def pixel(i):
        img = rng.integers(0, 60, (3, 32, 32))
        k = i % 10
        img[k % 3, 3 * k:3 * k + 6, 3 * k:3 * k + 6] = 250
        return img

    write_cifar(root, pixel, lambda i: i % 10, per_batch=60, n_test=50)
    monkeypatch.setenv("BPDL_VERIFY_DATA", "0")
    db = tmp_path / "cifar.db"
    common = ["--dataset", "cifar10", "--data-dir", str(root), "--offline", "--db", str(db),
              "--budget", "2", "--epochs", "1", "--folds", "2", "--top-k", "1",
              "--test-seeds", "1", "--no-progress", "--threads", "1"]
    assert main(["study", "run", "--rule", "bp", "--model", "mlp", *common]) == 0
    assert main(["study", "run", "--rule", "bp", "--model", "cnn", "--optimizer",
                 "RandomSearch", *common]) == 0
    assert main(["study", "run", "--rule", "segregated", "--model", "segregated", "--space",
                 "generic", "--set", "model_options.mode=rate", "--set",
                 "model_options.hidden=[20]", "--set", "rule_options.online=true",
                 "--set", "optimizer=sgd", *common]) == 0
    with StudyStore(db, create=False) as store:
        names = ["bp-cnn-cifar10", "bp-mlp-cifar10", "segregated-segregated-cifar10"]
        for name in names:
            assert store.study(name)["status"] == "complete", name
            trials = store.trials(name)
            assert len(trials) == 2 and all(t["status"] == "completed" for t in trials), name
            assert len(store.test_runs(name)) == 1
    assert main(["study", "report", str(db), "--out", str(tmp_path / "report")]) == 0
    assert main(["study", "compare", str(db), "--out", str(tmp_path / "compare")]) == 0
    figures = sorted(p.name for p in (tmp_path / "compare").iterdir() if p.suffix == ".png")
    assert len(figures) >= 2, figures  # the grid and the bar chart
