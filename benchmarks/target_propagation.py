"""Target-propagation family: training-step time of every rule against backprop on B18's MNIST
networks (docs/algorithms/target_propagation.md §4.3, "Cost per step").

For each model (B18's 5x256 tanh MLP and its MNIST locally connected network, batch 100) and
each rule (bp, then tp, dtp, sdtp, aosdtp, ddtp), one training step as the loop takes it: zero
every optimiser, ``training_step``, step every optimiser (Adam for the forward weights and, for
the target-propagation rules, the inverses' own Adam), ``after_step``. The parallel schedule
(inverses and forward weights on every minibatch) is timed, and the two steps of the
alternating schedule (an inverse-pass step and a forward-pass step) separately.

Correctness first: on the same batch each rule's output-layer gradient must equal backprop's
(every target-propagation variant trains the output layer on the task loss) before anything is
timed. Reported: median step time over interleaved rounds (every rule in turn, so that load on
a shared machine hits them alike) and its ratio to backprop's on the same model.

    python benchmarks/target_propagation.py [--threads 1] [--repeats 5] [--models ...]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import machine, today, write_csv  # noqa: E402

TP_RULES = ["tp", "dtp", "sdtp", "aosdtp", "ddtp"]
#: label -> (model family, options, input shape, batch size)
MODELS = {
    "mlp 5x256 tanh (B18 FC)": ("mlp", {"hidden": [256] * 5, "activation": "tanh",
                                        "bias_init": 0.0}, (1, 28, 28), 100),
    "lc MNIST (B18)": ("lc", {}, (1, 28, 28), 100),
}
#: what is timed: (label, rule, phase the learner is put in)
VARIANTS = [("bp", "bp", None)] + [(f"{r} parallel", r, None) for r in TP_RULES] + [
    (f"{r} alternating/{p}", r, p) for r in TP_RULES for p in ("inverse", "forward")]


def _setup(model_label: str, rule: str, phase: str | None, device: str):
    from bpdl import nn as bnn
    from bpdl import rules
    from bpdl.train import RunConfig

    name, options, shape, batch = MODELS[model_label]
    torch.manual_seed(0)
    model = bnn.build_model(name, shape, 10, options)
    learner = rules.build(rule, model, {}).to(device)
    if phase is not None:
        learner.phase = phase
    opts = learner.setup_optimizers(RunConfig(optimizer="adam", lr=1e-4))
    g = torch.Generator().manual_seed(1)
    x = torch.rand((batch, *shape), generator=g).to(device)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    return learner, opts, x, y


def _step(learner, opts, x, y) -> None:
    for opt in opts.values():
        opt.zero_grad(set_to_none=True)
    learner.training_step(x, y)
    for opt in opts.values():
        opt.step()
    learner.after_step()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def check_output_gradients(model_label: str, device: str) -> None:
    """Every rule's output-layer gradient is backprop's (the delta rule on the same batch)."""
    ref, _, x, y = _setup(model_label, "bp", None, device)
    out = ref.model.layers[-1]
    ref.training_step(x, y)
    expected = out.weight.grad.clone()
    for rule in TP_RULES:
        learner, _, _, _ = _setup(model_label, rule, None, device)
        learner.training_step(x, y)
        got = learner.model.layers[-1].weight.grad
        if not torch.allclose(got, expected, rtol=1e-5, atol=1e-7):
            raise SystemExit(f"{model_label}/{rule}: the output layer's gradient differs from "
                             f"backprop's")


def time_steps(model_label: str, device: str, repeats: int, steps: int) -> dict[str, float]:
    setups = {label: _setup(model_label, rule, phase, device) for label, rule, phase in VARIANTS}
    for setup in setups.values():
        for _ in range(2):
            _step(*setup)
    samples: dict[str, list[float]] = {label: [] for label in setups}
    for _ in range(repeats):
        for label, setup in setups.items():
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(steps):
                _step(*setup)
            _sync(device)
            samples[label].append((time.perf_counter() - t0) / steps)
    return {label: statistics.median(v) for label, v in samples.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import bpdl  # noqa: F401

    print(f"machine: {machine()}; date {today()}", flush=True)
    rows = []
    for label in args.models:
        check_output_gradients(label, args.device)
        steps = 20 if label.startswith("mlp") else 3
        times = time_steps(label, args.device, args.repeats, steps)
        alternating = {r: (times[f"{r} alternating/inverse"] + times[f"{r} alternating/forward"])
                       / 2 for r in TP_RULES}
        for variant, t in list(times.items()) + [(f"{r} alternating (mean of both passes)", a)
                                                 for r, a in alternating.items()]:
            row = {"model": label, "variant": variant, "batch": MODELS[label][3],
                   "step_ms": round(1e3 * t, 3), "ratio_to_bp": round(t / times["bp"], 3),
                   "threads": torch.get_num_threads(), "device": args.device,
                   "repeats": args.repeats, "date": today()}
            rows.append(row)
            print(f"{label:26s} {variant:40s} {row['step_ms']:9.2f} ms  "
                  f"x{row['ratio_to_bp']:.3f}", flush=True)
    path = Path(args.out) / "target_propagation_steps.csv"
    write_csv(path, rows)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
