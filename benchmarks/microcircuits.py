"""Dendritic cortical microcircuits (S18), full dynamics: time per example-step of

  (a) bpdl's fused kernels (``bpdl::microcircuit_run``, :mod:`bpdl.ops.microcircuit`),
  (b) bpdl's pure-PyTorch reference (:func:`bpdl.functional.microcircuit.full_run`),
  (c) a faithful single-example NumPy port (:class:`bpdl.functional.microcircuit_numpy.
      NumpyMicrocircuit`: one example, one Euler-Maruyama step after another, NumPy products),

for 784-500-10 on real MNIST images, with every weight plastic (continuous, low-pass filtered
plasticity at every step, as in training) and the noise on, at ``--lanes`` examples in parallel
(shared weights). Correctness first: before timing, the kernels and the reference simulate the
same lanes with the same random numbers and must agree to rounding. An example-step is one time
step of one example; a presented example is the network's ``steps`` (1,000) of them, so the time
per presented example and the full-dynamics epoch estimate (60,000 presentations) follow. Times
are the median of ``--repeats``. Writes benchmarks/results/microcircuits.csv and prints a
markdown table.

    python benchmarks/microcircuits.py [--threads 2] [--lanes 1 10 32] [--quick]

The accuracy figures of the issue (steady state MNIST; ``bpdl reproduce sacramento2018_*``) come
from the commands recorded in benchmarks/RESULTS.md; ``--train`` runs the short one here::

    bpdl train --rule microcircuit --dataset mnist --epochs 1 --max-examples 20000 --test final
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from _common import HERE, default_data_dir, machine, today, write_csv
from bpdl import data as bdata
from bpdl.functional import microcircuit as mc
from bpdl.functional.microcircuit_numpy import NumpyMicrocircuit
from bpdl.nn.microcircuit import MicrocircuitConfig, MicrocircuitNet
from bpdl.ops.microcircuit import microcircuit_run

SIZES = (784, 500, 10)
#: presentations per MNIST epoch (the training set)
EPOCH = 60000


def _setup(images: torch.Tensor, labels: torch.Tensor, lanes: int, dtype=torch.float32,
           device: str | torch.device = "cpu"):
    net = MicrocircuitNet(SIZES[0], SIZES[-1], MicrocircuitConfig(hidden=list(SIZES[1:-1])))
    p = net.sim
    w = mc.MicroWeights(*[[t.detach().to(device, dtype).clone() for t in ts]
                          for ts in net.weights().named().values()])
    etas = {"W": [0.01, 0.003], "b": [0.01, 0.003], "W_td": [0.0], "W_pi": [0.005],
            "W_ip": [0.01], "b_ip": [0.01]}
    traces = {f: [torch.zeros_like(t) for t in ts] for f, ts in w.named().items() if f != "W_td"}
    state = mc.MicroState.zeros(lanes, p, dtype, device)
    x = images[:lanes].to(device, dtype)
    u_trgt = torch.where(torch.nn.functional.one_hot(labels[:lanes], SIZES[-1]) > 0, 4.0,
                         -4.0).to(device, dtype)
    example = torch.arange(lanes, dtype=torch.int64, device=device)
    return w, traces, state, x, u_trgt, p, etas, example


def _clone(args):
    w, traces, state, *rest = args
    return (mc.MicroWeights(*[[t.clone() for t in ts] for ts in w.named().values()]),
            {k: [t.clone() for t in v] for k, v in traces.items()}, state.clone(), *rest)


def check_kernels_match_reference(images, labels, device="cpu") -> None:
    for lanes in (1, 7):
        for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 2e-4)):
            a = _setup(images, labels, lanes, dtype, device)
            b = _clone(a)
            mc.full_run(*a[:7], a[7], 0, 30, 5)
            microcircuit_run(*b[:7], b[7], 0, 30, 5)
            for x, y in zip([t for ts in a[0].named().values() for t in ts] + a[2].tensors(),
                            [t for ts in b[0].named().values() for t in ts] + b[2].tensors(),
                            strict=True):
                torch.testing.assert_close(x, y, rtol=tol, atol=tol)


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _median_time(fn, repeats: int, device="cpu") -> float:
    fn()  # warm-up
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_torch(run, images, labels, lanes: int, steps: int, repeats: int,
               warmup: int = 0, device="cpu") -> float:
    """Seconds per example-step of ``run`` (the kernel or the reference) at ``lanes``."""
    args = _setup(images, labels, lanes, device=device)
    run(*args[:7], args[7], 0, warmup, 5)  # past the first presentations' transients
    counter = [warmup]

    def once():
        run(*args[:7], args[7], counter[0], steps, 5)
        counter[0] += steps

    return _median_time(once, repeats, device) / (lanes * steps)


def time_numpy(images, labels, steps: int, repeats: int, dtype) -> float:
    w, _, _, x, u_trgt, p, etas, _ = _setup(images, labels, 1)
    port = NumpyMicrocircuit(w, p, etas, dtype=dtype)
    x0, t0 = x[0].numpy(), u_trgt[0].numpy()
    return _median_time(lambda: port.present(x0, t0, steps), repeats) / steps


def run_train(data_dir: str | None) -> dict:
    """The issue's short MNIST run, through the command line; returns its summary."""
    out = HERE / "results" / "microcircuit_train"
    cmd = [sys.executable, "-c", "import sys; from bpdl.cli import main; sys.exit(main())",
           "train", "--rule", "microcircuit", "--dataset", "mnist", "--epochs", "1",
           "--max-examples", "20000", "--test", "final", "--out", str(out)]
    if data_dir:
        cmd += ["--data-dir", data_dir]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    summary = json.loads((out / "summary.json").read_text())
    summary["wall_s"] = time.perf_counter() - t0
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data-dir", default=default_data_dir())
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--lanes", type=int, nargs="+", default=[1, 10, 32])
    ap.add_argument("--steps", type=int, default=200, help="steps per timed call (fused)")
    ap.add_argument("--reference-steps", type=int, default=50)
    ap.add_argument("--numpy-steps", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="fewer steps (a smoke run)")
    ap.add_argument("--device", default="cpu",
                    help="where the kernels and the reference run: cpu (default), cuda, cuda:N "
                         "(the NumPy port always runs on the CPU)")
    ap.add_argument("--out", default=str(HERE / "results"),
                    help="folder of microcircuits.csv (default benchmarks/results)")
    ap.add_argument("--train", action="store_true",
                    help="also run the 20,000-example MNIST training of the issue (minutes)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    # subnormals flushed to zero for all three (the kernels do it themselves): a dark pixel's
    # input filter decays into them within a few presentations and each costs a microcode assist
    torch.set_flush_denormal(True)
    if args.quick:
        args.steps, args.reference_steps, args.numpy_steps, args.repeats = 20, 5, 10, 1
    train_set = bdata.load_dataset("mnist", "train", args.data_dir, download=False)
    n = max(max(args.lanes), 7)
    images = train_set.images[:n].reshape(n, -1).double() / 255.0
    labels = train_set.labels[:n]
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit(f"error: --device {args.device}: CUDA is not available on this machine")
    check_kernels_match_reference(images, labels, device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else machine()
    print(f"kernels match the reference on {device}; {where}; {today()}", flush=True)
    np32 = time_numpy(images, labels, args.numpy_steps, args.repeats, np.float32)
    np64 = time_numpy(images, labels, args.numpy_steps, args.repeats, np.float64)
    rows = []
    steps_per_example = MicrocircuitConfig().steps
    for lanes in args.lanes:
        fused = time_torch(microcircuit_run, images, labels, lanes, args.steps, args.repeats,
                           warmup=0 if args.quick else 3 * steps_per_example, device=device)
        ref = time_torch(mc.full_run, images, labels, lanes, args.reference_steps, args.repeats,
                         device=device)
        row = {"network": "784-500-10", "device": str(device), "device_name": where,
               "lanes": lanes,
               "threads": torch.get_num_threads(),
               "dtype": "float32", "fused_us_per_example_step": fused * 1e6,
               "reference_us_per_example_step": ref * 1e6,
               "numpy_f32_us_per_example_step": np32 * 1e6,
               "numpy_f64_us_per_example_step": np64 * 1e6,
               "speedup_vs_reference": ref / fused, "speedup_vs_numpy_f32": np32 / fused,
               "speedup_vs_numpy_f64": np64 / fused,
               "fused_ms_per_presented_example": fused * steps_per_example * 1e3,
               "fused_epoch_hours": fused * steps_per_example * EPOCH / 3600,
               "numpy_f32_epoch_hours": np32 * steps_per_example * EPOCH / 3600}
        rows.append(row)
        print(row, flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    out = Path(args.out) / "microcircuits.csv"
    write_csv(out, rows)
    print(f"\n{machine()}; {today()}; 784-500-10, float32, {steps_per_example} steps per "
          f"presented example; wrote {out}\n")
    print("| lanes | fused (us/example-step) | reference | NumPy port f32 / f64 | fused vs "
          "reference | fused vs NumPy f32 / f64 | fused ms per presented example | epoch (h) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['lanes']} | {r['fused_us_per_example_step']:.2f} | "
              f"{r['reference_us_per_example_step']:.1f} | "
              f"{r['numpy_f32_us_per_example_step']:.1f} / "
              f"{r['numpy_f64_us_per_example_step']:.1f} | {r['speedup_vs_reference']:.1f}x | "
              f"{r['speedup_vs_numpy_f32']:.0f}x / {r['speedup_vs_numpy_f64']:.0f}x | "
              f"{r['fused_ms_per_presented_example']:.1f} | {r['fused_epoch_hours']:.2f} |")
    if args.train:
        s = run_train(args.data_dir)
        print(f"\nbpdl train --rule microcircuit --dataset mnist --epochs 1 --max-examples 20000 "
              f"--test final: test accuracy {s.get('test_acc')}, {s['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
