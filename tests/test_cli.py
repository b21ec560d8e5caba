"""The ``bpdl`` command: train, plot, info, compare, and one-line errors for bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from bpdl.cli import main

PY = sys.executable


def _bpdl(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "bpdl.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)


def test_help_everywhere():
    for args in ([], ["train"], ["plot"], ["info"], ["compare"]):
        proc = _bpdl(*args, "--help")
        assert proc.returncode == 0, proc.stderr
        assert "usage: bpdl" in proc.stdout


def test_info_reports_build(tmp_path, capsys):
    assert main(["info", "--data-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "torch " in out and "CUDA kernels compiled:" in out and "OpenMP:" in out
    assert f"data root: {tmp_path}" in out
    assert "poisson_spikes" in out
    rules_line = next(line for line in out.splitlines() if line.startswith("rules: "))
    assert "bp" in rules_line[len("rules: "):].split(", ")
    assert any(f"CPU kernels: {isa}" in out for isa in ("base", "avx2", "avx512"))


def test_info_reports_the_capped_cpu_instruction_set(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("BPDL_CPU_ISA", "base")
    assert main(["info", "--data-dir", str(tmp_path)]) == 0
    assert "CPU kernels: base" in capsys.readouterr().out


def test_train_mnist_writes_run_directory_and_learns(tmp_path, real_data_root):
    out = tmp_path / "mlp"
    proc = _bpdl("train", "--model", "mlp", "--rule", "bp", "--dataset", "mnist", "--epochs",
                 "1", "--max-examples", "6000", "--eval-every", "3000", "--out", str(out),
                 "--data-dir", str(real_data_root), "--threads", "2")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["examples"] == 6000
    assert summary["test_acc"] > 0.88  # 6000 examples of a 784-500-10 MLP
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["examples"] for r in records] == [0, 3000, 6000]
    assert "test_acc" in proc.stdout and str(out) in proc.stdout
    # plain progress lines (stderr is not a terminal here)
    assert "val_acc" in proc.stderr


def test_plot_two_runs_into_one_figure(tmp_path, capsys):
    from bpdl.data import synthetic_dataset
    from bpdl.train import RunConfig, train

    data = synthetic_dataset(600, shape=(1, 6, 6), seed=1)
    parts = (data.subset(range(0, 400)), data.subset(range(400, 500)),
             data.subset(range(500, 600)))
    runs = []
    for name, hidden in (("a", [16]), ("b", [8, 8])):
        cfg = RunConfig(dataset="synthetic", model_options={"hidden": hidden}, epochs=2,
                        eval_every=200, device="cpu", probe_size=0)
        train(cfg, tmp_path / name, data=parts, progress=False, log=lambda s: None)
        runs.append(str(tmp_path / name))
    out = tmp_path / "fig" / "curves"
    assert main(["plot", *runs, "--out", str(out), "--labels", "small,deep"]) == 0
    assert (tmp_path / "fig" / "curves.png").stat().st_size > 10_000
    assert (tmp_path / "fig" / "curves.pdf").stat().st_size > 1_000
    from bpdl.plots import plot_learning_curves

    fig = plot_learning_curves(runs, labels=["small", "deep"])
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert any(t.startswith("small") for t in legend) and any(t.startswith("deep") for t in
                                                               legend)
    assert main(["plot", "weights", runs[0]]) == 0
    assert (tmp_path / "a" / "figures" / "weights.png").exists()
    capsys.readouterr()
    # a damaged metrics file is one error line and exit status 2, not an empty figure
    metrics = tmp_path / "a" / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join([lines[0], "{not json", *lines[1:]]) + "\n")
    broken = tmp_path / "fig" / "broken"
    assert main(["plot", runs[0], "--out", str(broken)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "line 2 is not a JSON record" in err
    assert not broken.with_suffix(".png").exists()
    metrics.write_text("")
    assert main(["plot", runs[0], "--out", str(broken)]) == 2
    assert "holds no evaluation record" in capsys.readouterr().err
    # a line cut short by a crash at the end is what a resume drops too: the rest is plotted
    metrics.write_text("\n".join(lines) + '\n{"eval": 9, "exa')
    assert main(["plot", runs[0], "--out", str(broken)]) == 0
    capsys.readouterr()
    # a figure path under a file: one error line naming the file, exit status 2
    assert main(["plot", runs[0], "--out", str(broken.with_suffix(".png") / "x.png")]) == 2
    assert capsys.readouterr().err == (
        f"error: cannot create the output folder {broken.with_suffix('.png')}: "
        f"{broken.with_suffix('.png')} is a file, not a folder; choose another path with --out\n")


@pytest.mark.parametrize("args,match", [
    (["train", "--dataset", "imagenet"], "unknown dataset 'imagenet'"),
    (["train", "--model", "rnn"], "unknown model 'rnn'; valid models are"),
    (["train", "--rule", "hebb"], "unknown rule 'hebb'; valid rules are"),
    (["train", "--optimizer", "lion"], "unknown optimizer 'lion'"),
    (["train", "--epochs", "0"], "epochs must be > 0"),
    (["train", "--batch-size", "-5"], "batch_size must be > 0"),
    (["train", "--lr", "0"], "learning rate must be a positive"),
    (["train", "--model", "cnn", "--channels", "8,8,8,8,8"], "CNN block 5"),
    (["train", "--hidden", "10", "--model", "cnn"], "unknown cnn model option"),
    (["plot", "/nonexistent/run"], "not a bpdl run directory"),
    (["reproduce", "lillicrap2016", "--layers", "2"],
     "experiment 'lillicrap2016' has no option.*--layers"),
    (["reproduce", "lillicrap2016", "--entries", "nope"], "has no run"),
])
def test_bad_input_is_one_clear_line(tmp_path, args, match):
    out = tmp_path / "run"
    proc = _bpdl(*args, *(["--out", str(out), "--data-dir", str(tmp_path / "nodata")]
                          if args[0] == "train" else []))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: ")
    assert match.split("'")[0] in proc.stderr or match in proc.stderr
    import re

    assert re.search(match, proc.stderr), proc.stderr
    assert not out.exists()


def test_missing_data_file_is_one_clear_line(tmp_path):
    proc = _bpdl("train", "--dataset", "mnist", "--out", str(tmp_path / "run"), "--data-dir",
                 str(tmp_path / "empty"), env={"BPDL_OFFLINE": "1"})
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "train-images-idx3-ubyte.gz" in proc.stderr and "f68b3c2dcbeaaa9fbdd348bbdeb94873" \
        in proc.stderr
    assert not (tmp_path / "run").exists()


def test_corrupt_data_file_is_one_clear_line(tmp_path, real_data_root):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(real_data_root / "MNIST", root / "MNIST")
    target = root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz"
    target.write_bytes(target.read_bytes()[:100])  # truncated
    proc = _bpdl("train", "--dataset", "mnist", "--out", str(tmp_path / "run"), "--data-dir",
                 str(root))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "t10k-labels-idx1-ubyte.gz" in proc.stderr and "ec29112dd5afa0611ce80d1b7f02629c" \
        in proc.stderr
    assert not (tmp_path / "run").exists()


def test_resume_with_different_config_via_cli(tmp_path, real_data_root):
    out = tmp_path / "run"
    common = ["train", "--dataset", "mnist", "--max-examples", "500", "--out", str(out),
              "--data-dir", str(real_data_root), "--val-size", "1000", "--test", "never"]
    assert _bpdl(*common).returncode == 0
    proc = _bpdl(*common, "--lr", "0.01")
    assert proc.returncode == 2
    assert "lr: 0.001 -> 0.01" in proc.stderr and "Traceback" not in proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed"
