"""Study runner overhead and process-pool speedup.

1. Overhead. A study of short trials (an MLP on a 3,000-example MNIST subset, 3 folds, one
   epoch, about a second per trial) runs in-process. The runner's overhead is the study
   loop's wall time minus the time spent inside trials (the workers' own timers), relative to
   the trial time: asking and telling Nevergrad, validating proposals, pickling the optimiser
   snapshot and writing SQLite, progress lines. Start-up (loading the data, opening the
   database) is reported apart.
2. Speedup. The same fixed-cost study (only the learning rate varies, so every trial does the
   same work) runs on a process pool with 1 and with 2 single-threaded workers. Makespan is
   from the first trial's start to the last trial's end as timed by the workers (pool start-up
   excluded: the workers load the data when they start); speedup = makespan(1) / makespan(2).
   RandomSearch proposes the same points whatever the order of results, and a trial is
   deterministic given its seed, so before timing counts the script checks that both runs
   produced identical objectives trial by trial: parallel runs compute what a serial run does.
3. Control. On a shared machine two processes may not get two cores. The script times a
   fixed single-threaded torch loop in 1 process and in 2 concurrent processes; the ratio
   2 * t(1) / t(2) is the parallel speedup the machine offered at that moment (2.0 on an idle
   2-core machine), to read the pool speedup against.

    python benchmarks/studies.py [--data-dir DIR] [--repeats 3] [--trials 8]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from _common import HERE, default_data_dir, machine, today, write_csv
from bpdl.studies import SearchSpace, StudyConfig, StudyStore, run_study
from bpdl.studies.spaces import LogUniform

FIXED_COST_SPACE = SearchSpace(
    "bench-lr-only", {"lr": LogUniform(1e-4, 1e-2)}, version=1,
    fixed={"optimizer": "adam", "batch_size": 100, "model_options": {"hidden": [256]}},
    description="benchmark: a fixed 784-256-10 MLP, only Adam's learning rate varies")


def _quiet(_: str) -> None:
    pass


def _trials(db: Path, name: str) -> list[dict]:
    with StudyStore(db, create=False) as store:
        return store.trials(name), store.test_runs(name)


def overhead(data_dir: str | None, budget: int, tmp: Path) -> dict:
    cfg = StudyConfig(rule="bp", model="mlp", dataset="mnist", budget=budget, epochs=1, folds=3,
                      train_subset=3000, top_k=1, test_seeds=1, optimizer="NGOpt",
                      name="overhead")
    db = tmp / "overhead.db"
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    result = run_study(cfg, db, space=FIXED_COST_SPACE, executor="inprocess", threads=1,
                       data_dir=data_dir, download=False, log=_quiet)
    total = time.perf_counter() - t0
    trials, tests = _trials(db, "overhead")
    # correctness first: every trial completed, counted once, objective = mean of its folds
    assert [t["number"] for t in trials] == list(range(1, budget + 1))
    assert all(t["status"] == "completed" for t in trials)
    for t in trials:
        mean = statistics.fmean(f["val_acc"] for f in t["folds"])
        assert abs(mean - t["objective"]) < 1e-12
    busy = sum(t["duration"] for t in trials) + sum(r["duration"] for r in tests)
    loop = result.wall_time_s
    return {"measure": "overhead", "executor": "inprocess", "workers": 1, "threads": 1,
            "trials": budget, "trial_time_s": round(busy, 3),
            "mean_trial_s": round(statistics.fmean(t["duration"] for t in trials), 3),
            "loop_wall_s": round(loop, 3), "startup_s": round(total - loop, 3),
            "overhead_pct": round(100 * (loop - busy) / busy, 2),
            "load_before": round(load, 2), "load_after": round(os.getloadavg()[0], 2)}


def _burn(_: int) -> float:
    import torch

    torch.set_num_threads(1)
    a = torch.randn(256, 256)
    t0 = time.perf_counter()
    for _ in range(2000):
        a = torch.tanh(a @ a * 0.01)
    return time.perf_counter() - t0


def control() -> dict:
    """Parallel capacity of the machine right now: 2 * t(one process) / t(two at once)."""
    import concurrent.futures
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    load = os.getloadavg()[0]
    with concurrent.futures.ProcessPoolExecutor(2, mp_context=ctx) as ex:
        list(ex.map(_burn, [0, 0]))  # start both workers
        alone = list(ex.map(_burn, [0]))[0]
        t0 = time.perf_counter()
        list(ex.map(_burn, [0, 1]))
        both = time.perf_counter() - t0
    return {"measure": "control", "workers": 2, "burn_alone_s": round(alone, 3),
            "burn_two_s": round(both, 3), "capacity": round(2 * alone / both, 2),
            "load_before": round(load, 2), "load_after": round(os.getloadavg()[0], 2)}


def pool(data_dir: str | None, workers: int, trials: int, tmp: Path, tag: str) -> tuple[dict, list]:
    cfg = StudyConfig(rule="bp", model="mlp", dataset="mnist", budget=trials, epochs=1, folds=3,
                      train_subset=12000, top_k=1, test_seeds=1, optimizer="RandomSearch",
                      name=f"pool{workers}")
    db = tmp / f"pool-{workers}-{tag}.db"
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    run_study(cfg, db, space=FIXED_COST_SPACE, executor="process", workers=workers, threads=1,
              data_dir=data_dir, download=False, log=_quiet)
    total = time.perf_counter() - t0
    rows, _ = _trials(db, cfg.study_name)
    assert [t["status"] for t in rows] == ["completed"] * trials
    # worker clocks: from the first trial's start to the last one's end (pool start-up apart)
    makespan = max(t["finished"] for t in rows) - min(t["finished"] - t["duration"]
                                                       for t in rows)
    return {"measure": "pool", "executor": "process", "workers": workers, "threads": 1,
            "trials": trials, "trial_time_s": round(sum(t["duration"] for t in rows), 3),
            "mean_trial_s": round(statistics.fmean(t["duration"] for t in rows), 3),
            "makespan_s": round(makespan, 3), "end_to_end_s": round(total, 3),
            "load_before": round(load, 2), "load_after": round(os.getloadavg()[0], 2)}, rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=default_data_dir())
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--trials", type=int, default=8, help="trials per pool measurement")
    p.add_argument("--overhead-trials", type=int, default=20)
    p.add_argument("--csv", type=Path, default=HERE / "results" / "studies.csv")
    args = p.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for r in range(args.repeats):
            row = overhead(args.data_dir, args.overhead_trials, tmp / f"o{r}")
            rows.append({"repeat": r, **row})
            print(row, flush=True)
        for r in range(args.repeats):
            row = control()
            rows.append({"repeat": r, **row})
            print(row, flush=True)
            results = {}
            for workers in ((1, 2) if r % 2 == 0 else (2, 1)):  # interleave the order
                row, trials = pool(args.data_dir, workers, args.trials, tmp, str(r))
                results[workers] = trials
                rows.append({"repeat": r, **row})
                print(row, flush=True)
            # correctness: the parallel study computed exactly what the serial one did
            a, b = results[1], results[2]
            assert [t["params"] for t in a] == [t["params"] for t in b]
            assert [t["objective"] for t in a] == [t["objective"] for t in b], \
                "2 workers gave other objectives than 1 worker"
    write_csv(args.csv, rows)

    over = [r for r in rows if r["measure"] == "overhead"]
    one = [r["makespan_s"] for r in rows if r["measure"] == "pool" and r["workers"] == 1]
    two = [r["makespan_s"] for r in rows if r["measure"] == "pool" and r["workers"] == 2]
    e1 = [r["end_to_end_s"] for r in rows if r["measure"] == "pool" and r["workers"] == 1]
    e2 = [r["end_to_end_s"] for r in rows if r["measure"] == "pool" and r["workers"] == 2]
    print(f"\n{machine()}; {today()}; load averages "
          f"{min(r['load_before'] for r in rows)}-{max(r['load_after'] for r in rows)}")
    print("| measure | value (median of repeats) |\n|---|---|")
    print(f"| runner overhead, in-process, {args.overhead_trials} trials of "
          f"~{statistics.median(r['mean_trial_s'] for r in over):.2f} s | "
          f"{statistics.median(r['overhead_pct'] for r in over):.2f}% of trial time "
          f"(start-up {statistics.median(r['startup_s'] for r in over):.1f} s apart) |")
    print(f"| process pool makespan, {args.trials} trials, 1 worker | "
          f"{statistics.median(one):.1f} s |")
    print(f"| process pool makespan, {args.trials} trials, 2 workers | "
          f"{statistics.median(two):.1f} s |")
    print(f"| speedup (makespan 1 / makespan 2) | {statistics.median(one) / statistics.median(two):.2f}x |")
    print(f"| speedup end to end (pool start-up included) | "
          f"{statistics.median(e1) / statistics.median(e2):.2f}x |")
    cap = [r["capacity"] for r in rows if r["measure"] == "control"]
    print(f"| control: 2 x t(1 process) / t(2 processes) of a fixed torch loop | "
          f"{statistics.median(cap):.2f}x (2.0 = two free cores) |")
    print(f"CSV: {args.csv}")


if __name__ == "__main__":
    main()
