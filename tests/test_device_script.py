"""The CPU-side logic of the GPU device script ``benchmarks/device/run.sh`` (issue 16): the dry
run lists every stage in order with its budget and exact command, honours ``OUT`` and the
data-dir option, bad usage exits with status 2, and a failing, cut or skipped stage is recorded
in ``summary.txt`` while the later stages still run. Only bash runs (a fake interpreter stands
in for Python), so this takes a few seconds and needs no GPU."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "benchmarks" / "device" / "run.sh"
STAGES = ["build", "info", "cuda-tests", "tests", "segregated", "fa-steps", "fa-lc", "microcircuits",
          "reproduce"]
DEFAULT_BUDGETS = {"build": 150, "info": 20, "cuda-tests": 60, "tests": 90, "segregated": 60,
                   "fa-steps": 45, "fa-lc": 30, "microcircuits": 35}
TOTAL, RESERVE = 540, 15

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and GNU timeout")


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment without the caller's OUT and BPDL_* settings (the GPU machine sets OUT), and
    with a private work folder."""
    env = {k: v for k, v in os.environ.items() if k != "OUT" and not k.startswith("BPDL_")}
    env["BPDL_DEVICE_WORK"] = str(tmp_path / "work")
    env.update(extra)
    return env


def _run(args: list[str], env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


def _stage_lines(stdout: str) -> list[re.Match]:
    return [m for m in (re.match(r"\[(\d+)/(\d+)\] ([\w-]+): budget (\d+) s", line)
                        for line in stdout.splitlines()) if m]


def test_script_is_executable_and_parses():
    assert os.access(SCRIPT, os.X_OK), f"{SCRIPT} is not executable"
    out = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr


def test_dry_run_lists_every_stage_in_order_with_budget_and_runs_nothing(tmp_path):
    out, data = tmp_path / "out", tmp_path / "data"
    r = _run(["--dry-run", "--data-dir", str(data)], _env(tmp_path, OUT=str(out)))
    assert r.returncode == 0, r.stderr
    stages = _stage_lines(r.stdout)
    assert [m.group(3) for m in stages] == STAGES
    assert [int(m.group(1)) for m in stages] == list(range(1, len(STAGES) + 1))
    budgets = {m.group(3): int(m.group(4)) for m in stages}
    assert budgets == {**DEFAULT_BUDGETS, "reproduce": TOTAL - sum(DEFAULT_BUDGETS.values()) - RESERVE}
    assert sum(budgets.values()) + RESERVE <= 9 * 60
    text = r.stdout
    assert re.search(rf"^OUT: +{re.escape(str(out))}$", text, re.M)
    assert re.search(rf"^data dir: +{re.escape(str(data))} \(--data-dir; MNIST NOT found", text, re.M)
    work = tmp_path / "work"
    for command in (
            "env PIP_BREAK_SYSTEM_PACKAGES=1 PIP_NO_INDEX=1 python3 -m pip install "
            "--no-build-isolation --no-deps -v .",
            ".device-venv/bin/python -m pip install torch==2.14.1 torchvision==0.29.1",
            f"python3 -m bpdl.cli info --data-dir {data}",
            f"python3 -m pytest -m cuda -v -p no:cacheprovider --junitxml {work}/tests/cuda-tests.xml",
            f"python3 -m pytest -p no:cacheprovider --durations=15 --junitxml {work}/tests/tests.xml",
            f"python3 benchmarks/segregated.py --device cuda --data-dir {data}",
            f"python3 benchmarks/feedback_alignment.py steps --device cuda --out {work}/bench",
            f"python3 benchmarks/feedback_alignment.py lc --device cuda --out {work}/bench",
            f"python3 benchmarks/microcircuits.py --device cuda --data-dir {data} --out "
            f"{work}/bench --lanes 1 10 32 256",
            f"python3 -m bpdl.cli reproduce guerguiev2017 --layers 1 --device cuda --out "
            f"{work}/reproduce --data-dir {data} --offline --no-progress"):
        assert f"$ {command}" in text, command
    # the commands appear under their own stage, in the stage order
    positions = [text.index(f"] {s}: budget") for s in STAGES]
    assert positions == sorted(positions)
    assert positions[2] < text.index("pytest -m cuda") < positions[3]
    assert positions[7] < text.index("benchmarks/microcircuits.py") < positions[8]
    assert positions[8] < text.index("reproduce guerguiev2017 --layers 1")
    assert not out.exists() and not work.exists(), "a dry run must not write anything"


def test_dry_run_budgets_stages_and_out_option_are_overridable(tmp_path):
    env = _env(tmp_path, OUT=str(tmp_path / "env-out"), BPDL_BUDGET_TESTS="77",
               BPDL_BUDGET_REPRODUCE="300", BPDL_DEVICE_STAGES="info,tests,reproduce")
    r = _run(["--dry-run", "--out", str(tmp_path / "opt-out")], env)
    assert r.returncode == 0, r.stderr
    assert [(m.group(3), int(m.group(4))) for m in _stage_lines(r.stdout)] == [
        ("info", 20), ("tests", 77), ("reproduce", 300)]
    assert re.search(rf"^OUT: +{re.escape(str(tmp_path / 'opt-out'))}$", r.stdout, re.M)
    # --stages wins over BPDL_DEVICE_STAGES and the script's order wins over the list's
    r = _run(["--dry-run", "--stages", "fa-lc,build"], env)
    assert [m.group(3) for m in _stage_lines(r.stdout)] == ["build", "fa-lc"]


def test_data_dir_from_option_environment_or_default(tmp_path):
    r = _run(["--dry-run"], _env(tmp_path, BPDL_DATA_DIR=str(tmp_path / "env-data")))
    assert re.search(rf"^data dir: +{re.escape(str(tmp_path / 'env-data'))} \(BPDL_DATA_DIR", r.stdout, re.M)
    assert f"--data-dir {tmp_path / 'env-data'} --offline" in r.stdout
    r = _run(["--dry-run", f"--data-dir={tmp_path / 'opt-data'}"],
             _env(tmp_path, BPDL_DATA_DIR=str(tmp_path / "env-data")))
    assert re.search(rf"^data dir: +{re.escape(str(tmp_path / 'opt-data'))} \(--data-dir", r.stdout, re.M)
    assert "env-data" not in r.stdout
    r = _run(["--dry-run"], _env(tmp_path))
    assert re.search(rf"^data dir: +{re.escape(str(REPO_ROOT / '.device-data'))} \(default", r.stdout, re.M)
    assert re.search(rf"^OUT: +{re.escape(str(REPO_ROOT / 'runs' / 'device'))}$", r.stdout, re.M)


@pytest.mark.parametrize("args, message", [
    (["--bogus"], "unknown option '--bogus'"),
    (["--dry-run", "extra"], "unexpected argument 'extra'"),
    (["--data-dir"], "option '--data-dir' needs a value"),
    (["--stages", "build,nope"], "unknown stage 'nope'"),
])
def test_bad_usage_exits_2_with_a_clear_message(tmp_path, args, message):
    r = _run(args, _env(tmp_path, OUT=str(tmp_path / "out")))
    assert r.returncode == 2
    assert message in r.stderr and "usage:" in r.stderr
    assert not (tmp_path / "out").exists()


def test_bad_budget_exits_2(tmp_path):
    r = _run(["--dry-run"], _env(tmp_path, BPDL_BUDGET_BUILD="soon"))
    assert r.returncode == 2 and "BPDL_BUDGET_BUILD must be a positive whole number" in r.stderr


FAKE_PYTHON = """#!/bin/sh
echo "fake python: $*"
case "$*" in
  *"bpdl.cli info"*) echo "info breaks" >&2; exit 3 ;;
  *"-m cuda"*) sleep 30 ;;
esac
exit 0
"""


def _summary_rows(text: str) -> dict[str, tuple[str, str]]:
    rows = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 5 and parts[0] in STAGES:
            rows[parts[0]] = (parts[1], parts[2])
    return rows


def test_a_failing_cut_or_skipped_stage_is_recorded_and_later_stages_still_run(tmp_path):
    fake = tmp_path / "fakepython"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    out, data = tmp_path / "out", tmp_path / "no-data"
    env = _env(tmp_path, OUT=str(out), BPDL_DEVICE_PYTHON=str(fake), BPDL_BUDGET_CUDA_TESTS="1",
               BPDL_DEVICE_STAGES="info,cuda-tests,segregated,fa-lc")
    r = _run(["--data-dir", str(data)], env, timeout=40)
    assert r.returncode == 1, r.stdout + r.stderr
    summary = (out / "summary.txt").read_text()
    rows = _summary_rows(summary)
    assert rows == {"info": ("failed", "3"), "cuda-tests": ("timed-out", "124"),
                    "segregated": ("skipped", "-"), "fa-lc": ("ok", "0")}, summary
    # the stages ran in order and the one after the failures really ran its command
    log = (out / "device.log").read_text()
    assert "info breaks" in log
    assert (f"fake python: benchmarks/feedback_alignment.py lc --device cuda --out {tmp_path}/work/bench"
            in log)
    order = [log.index(f"===== {name} =====")
             for name in ("01-info", "02-cuda-tests", "03-segregated", "04-fa-lc")]
    assert order == sorted(order)
    assert "no MNIST in" in log
    # what comes back from OUT: at most 8 plain files with plain names, none in sub-folders
    names = sorted(p.name for p in out.iterdir())
    assert len(names) <= 8 and all(re.fullmatch(r"[A-Za-z0-9._-]+", n) for n in names), names
    assert all((out / n).is_file() for n in names)
    assert {"summary.txt", "device.log", "results.tar.gz"} <= set(names)

    # all stages succeed: exit status 0
    r = _run(["--data-dir", str(data), "--stages", "fa-steps,fa-lc"], env, timeout=40)
    assert r.returncode == 0, r.stdout + r.stderr
    assert _summary_rows((out / "summary.txt").read_text()) == {"fa-steps": ("ok", "0"),
                                                                "fa-lc": ("ok", "0")}
