"""How many trials S18's teacher-student regression needs, measured on backprop.

The regression reproduction (``bpdl reproduce sacramento2018_regression``, docs/algorithms/
microcircuits.md §6.5) asks for a 10x fall of the student's held-out error. This script trains
the same 30-50-10 student as a plain network with backprop, on the same teacher, patterns,
held-out set and transfer function (S18's soft rectifier), ten patterns per step, and prints the
fall after each budget of trials. It answers whether a budget of trials is enough for any
learner, before the microcircuit's own rates are blamed. Initial weights are uniform on
+-``init``/sqrt(fan_in), the microcircuit student's convention, biases zero.

    python benchmarks/regression_backprop.py [--trials 20000 200000] [--optimizer sgd adam]
"""

from __future__ import annotations

import argparse
import math

import torch
from bpdl.experiments import microcircuits as M
from bpdl.functional import microcircuit as mc


def run(optimizer: str, lr: float, budgets: list[int], init: float,
        seed: int = 0) -> tuple[float, list[float]]:
    """The held-out error at the start and after each budget of trials (one run to the largest
    budget: the patterns are a function of the step, so a shorter run is its prefix)."""
    d = M.REGRESSION_DEFAULTS
    dtype = torch.float64
    teacher = M.regression_teacher(seed, dtype)
    p = mc.MicroParams(d["teacher"], transfer="soft_relu")
    n0, _, n2 = d["teacher"]
    x_test = M.regression_patterns(seed, -1, d["test_patterns"], n0, dtype)
    y_test = mc.phi(M.teacher_potentials(x_test, teacher, p), p)
    g = torch.Generator().manual_seed(seed)
    sizes = (n0, d["hidden"], n2)
    params = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:], strict=True):
        w = (torch.rand(fan_out, fan_in, generator=g, dtype=dtype) * 2 - 1) * init / math.sqrt(fan_in)
        params += [w.requires_grad_(), torch.zeros(fan_out, dtype=dtype, requires_grad=True)]
    opt = (torch.optim.SGD if optimizer == "sgd" else torch.optim.Adam)(params, lr=lr)

    def student(x: torch.Tensor) -> torch.Tensor:
        h = mc.phi(x @ params[0].t() + params[1], p)
        return mc.phi(h @ params[2].t() + params[3], p)

    def error() -> float:
        with torch.no_grad():
            return float((student(x_test) - y_test).square().sum(1).mean())

    start, errors = error(), []
    for k in range(max(budgets) // 10):
        x = M.regression_patterns(seed, k, 10, n0, dtype)
        loss = (student(x) - mc.phi(M.teacher_potentials(x, teacher, p), p)).square().sum(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (k + 1) * 10 in budgets:
            errors.append(error())
    return start, errors


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, nargs="+", default=[20000, 200000])
    ap.add_argument("--optimizer", nargs="+", default=["sgd", "adam"], choices=["sgd", "adam"])
    ap.add_argument("--init", type=float, default=M.REGRESSION_DEFAULTS["model"]["init_scale"])
    args = ap.parse_args()
    if any(t <= 0 or t % 10 for t in args.trials):
        ap.error(f"--trials must be positive multiples of 10 (ten patterns per step), got "
                 f"{args.trials}")
    torch.set_num_threads(1)
    rates = {"sgd": (1.0, 3.0, 10.0), "adam": (1e-3, 1e-2)}
    print("| optimizer | lr | trials | held-out error at start | final | fall |")
    print("|---|---|---|---|---|---|")
    for optimizer in args.optimizer:
        for lr in rates[optimizer]:
            budgets = sorted(set(args.trials))
            start, errors = run(optimizer, lr, budgets, args.init)
            for trials, final in zip(budgets, errors, strict=True):
                print(f"| {optimizer} | {lr:g} | {trials:,} | {start:.4g} | {final:.4g} | "
                      f"{start / final:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
