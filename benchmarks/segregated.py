"""Segregated dendrites (G17): time per training example and per test example of

  (a) bpdl's fused kernels (``backend="kernels"``) at the batch size of the run,
  (b) bpdl's pure-PyTorch reference (``backend="reference"``) at the same batch size,
  (c) a faithful single-example NumPy implementation of the original algorithm
      (:class:`bpdl.functional.segregated_original.OriginalNetwork`, the way the original
      program simulates: one example, shifting spike histories, dense PSP products),

for 784-500-10 and 784-500-100-10 in spiking and rate mode, on real MNIST. Correctness first:
before timing, the kernels and the reference simulate the same examples with the same random
numbers and must produce identical spikes and equal states. Times are per example, the median of
``--repeats`` measurements; the training time includes the weight update and optimiser step.
Writes benchmarks/results/segregated.csv and prints a markdown table. CUDA is timed too when a
GPU is present (``--device all``, the default); ``--device cpu`` or ``--device cuda`` times bpdl
on that device only (the NumPy port always runs on the CPU).

A second table times one example per update, as G17 and T19 trained: batch-1 training steps, and
online training (rule option ``online``: the same updates, bit for bit, checked first) with the
batch's examples trained one after another inside one fused call, next to the time per lane
inside a batch (the issue's target: online within 1.3x of a lane, run with ``--threads 1``).

    python benchmarks/segregated.py [--threads 2] [--batch-size 32] [--quick] [--device all]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from _common import HERE, default_data_dir, machine, today, write_csv
from bpdl import data as bdata
from bpdl.functional.segregated_original import OriginalNetwork, numpy_draws
from bpdl.nn.segregated import SegregatedDendriteNet, SegregatedNetConfig
from bpdl.rules.segregated import SegregatedConfig, SegregatedDendrites, batch_layer_lrs

NETWORKS = {"784-500-10": (500,), "784-500-100-10": (500, 100)}
MODES = ("spiking", "rate")
#: The original program's times on this machine kind (docs/algorithms/segregated_dendrites.md
#: §5.12 and the issue), ms per example, 784-500-10 spiking: quiet machine / loaded machine.
ORIGINAL_MS = {"train": (19.0, 34.0), "test": (40.0, 76.0)}


def build(hidden, mode, backend, dtype="float32", seed=0, online=False):
    torch.manual_seed(seed)
    net = SegregatedDendriteNet(784, 10, SegregatedNetConfig(hidden=hidden, mode=mode))
    learner = SegregatedDendrites(net, SegregatedConfig(backend=backend, dtype=dtype, seed=7,
                                                        online=online))
    return learner


def _sgd(learner, lrs):
    from bpdl.train import RunConfig

    # the loop's optimiser (online training reads its rates from it)
    return learner.setup_optimizers(RunConfig(rule="segregated", optimizer="sgd", lr=0.1,
                                              layer_lrs=tuple(lrs)))["main"]


def check_online_matches_batch_one(train_set, device) -> None:
    """Online chunks and batch-1 steps train the same weights, bit for bit."""
    x = bdata.to_float(train_set.images[:12]).to(device)
    y = train_set.labels[:12].to(device)
    for hidden in NETWORKS.values():
        for mode in MODES:
            learners = []
            for online, chunk in ((False, 1), (True, 6)):
                learner = build(hidden, mode, "kernels", online=online).to(device)
                opt = _sgd(learner, batch_layer_lrs(len(hidden), 1, mode))
                for start in range(0, 12, chunk):
                    opt.zero_grad(set_to_none=True)
                    learner.training_step(x[start:start + chunk], y[start:start + chunk])
                    opt.step()
                    learner.after_step()
                learners.append(learner)
            for a, b in zip(learners[0].net.weights, learners[1].net.weights, strict=True):
                assert torch.equal(a, b), "online training differs from batch-1 steps"


def check_kernels_match_reference(train_set, device) -> None:
    """The fused kernels and the reference on the same examples and random numbers."""
    for hidden in NETWORKS.values():
        for mode in MODES:
            x = bdata.to_float(train_set.images[:4], torch.float64).to(device)
            y = train_set.labels[:4].to(device)
            states = []
            for backend in ("reference", "kernels"):
                learner = build(hidden, mode, backend, "float64").to(device)
                learner.training_step(x, y)
                states.append(learner.lanes)
            ref, ker = states
            assert torch.equal(ref.in_ring.cpu(), ker.in_ring.cpu()), "input spikes differ"
            for a, b in zip(ref.rings, ker.rings, strict=True):
                assert torch.equal(a.cpu(), b.cpu()), "spikes differ"
            for a, b in zip(ref.C, ker.C, strict=True):
                torch.testing.assert_close(a.cpu(), b.cpu(), rtol=1e-10, atol=1e-10)


def time_bpdl(learner, train_set, test_set, batch, n_train, n_test, repeats, device,
              rate_batch=None):
    """Median ms per training and per test example; ``rate_batch``: the batch the learning
    rates are rescaled for (default ``batch``; 1 for batch-1 and online training)."""
    mode = learner.net.config.mode
    lrs = batch_layer_lrs(learner.net.n_hidden, rate_batch or batch, mode)
    opt = _sgd(learner, lrs)
    images = bdata.to_float(train_set.images[:max(n_train, batch)]).to(device)
    labels = train_set.labels[:max(n_train, batch)].to(device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def train_once():
        for start in range(0, n_train, batch):
            x, y = images[start:start + batch], labels[start:start + batch]
            opt.zero_grad(set_to_none=True)
            learner.training_step(x, y)
            opt.step()
            learner.after_step()
        sync()

    test_x = bdata.to_float(test_set.images[:n_test]).to(device)

    def test_once():
        learner.predict(test_x)
        sync()

    train_once()  # warm up (allocations, caches)
    train_ms, test_ms = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        train_once()
        train_ms.append((time.perf_counter() - t0) / n_train * 1e3)
        t0 = time.perf_counter()
        test_once()
        test_ms.append((time.perf_counter() - t0) / n_test * 1e3)
    return statistics.median(train_ms), statistics.median(test_ms)


def time_original(hidden, mode, train_set, test_set, n_train, n_test, repeats):
    learner = build(hidden, mode, "reference", "float64")
    net = learner.net
    p = learner.params
    port = OriginalNetwork(net.weights, net.biases, net.feedback, net.feedback_bias, p,
                           numpy_draws(0), batch_layer_lrs(net.n_hidden, 1))
    rng = np.random.default_rng(0)
    xs = (train_set.images[:n_train].reshape(n_train, -1).double() / 255).numpy()
    ys = train_set.labels[:n_train].numpy()
    xt = (test_set.images[:n_test].reshape(n_test, -1).double() / 255).numpy()
    train_ms, test_ms = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in range(n_train):
            ext = (np.floor(rng.wald(2, 1, 2)).astype(int) if p.random_phase_lengths
                   else np.zeros(2, dtype=int))
            lengths = (p.forward_steps + int(ext[0]), p.target_steps + int(ext[1]))
            windows = tuple(int(v) for v in p.windows(torch.tensor(lengths)))
            port.train_example(xs[i], np.eye(10)[ys[i]], lengths, windows)
        train_ms.append((time.perf_counter() - t0) / n_train * 1e3)
        t0 = time.perf_counter()
        for i in range(n_test):
            port.test_example(xt[i])
        test_ms.append((time.perf_counter() - t0) / n_test * 1e3)
    return statistics.median(train_ms), statistics.median(test_ms)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data-dir", default=default_data_dir())
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--train-examples", type=int, default=1024)
    ap.add_argument("--test-examples", type=int, default=1024)
    ap.add_argument("--reference-examples", type=int, default=64)
    ap.add_argument("--original-examples", type=int, default=20)
    ap.add_argument("--batch1-examples", type=int, default=256,
                    help="examples timed at batch 1 (one training step each)")
    ap.add_argument("--quick", action="store_true", help="fewer examples (a smoke run)")
    ap.add_argument("--out", default=None,
                    help="CSV to write (default benchmarks/results/segregated.csv)")
    ap.add_argument("--device", choices=("all", "cpu", "cuda"), default="all",
                    help="where bpdl is timed: all (default: the CPU, and CUDA when a GPU is "
                         "present), cpu or cuda")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.train_examples = args.test_examples = 128
        args.reference_examples, args.original_examples, args.repeats = 32, 4, 1
        args.batch1_examples = 32
    train_set = bdata.load_dataset("mnist", "train", args.data_dir, download=False)
    test_set = bdata.load_dataset("mnist", "test", args.data_dir, download=False)
    devices = ([torch.device("cpu")] if args.device in ("all", "cpu") else []) + (
        [torch.device("cuda")] if args.device != "cpu" and torch.cuda.is_available() else [])
    for device in devices:
        check_kernels_match_reference(train_set, device)
        check_online_matches_batch_one(train_set, device)
    print(f"kernels match the reference, online chunks match batch-1 steps "
          f"({', '.join(d.type for d in devices)}); {machine()}; {today()}", flush=True)
    rows = []
    B = args.batch_size
    for name, hidden in NETWORKS.items():
        for mode in MODES:
            o_train, o_test = time_original(hidden, mode, train_set, test_set,
                                            args.original_examples, args.original_examples,
                                            args.repeats)
            for device in devices:
                k_train, k_test = time_bpdl(build(hidden, mode, "kernels").to(device), train_set,
                                            test_set, B, args.train_examples, args.test_examples,
                                            args.repeats, device)
                r_train, r_test = time_bpdl(build(hidden, mode, "reference").to(device), train_set,
                                            test_set, B, max(B, args.reference_examples),
                                            args.reference_examples, args.repeats, device)
                # batch 1 (one example per training step) and online chunks of B examples per
                # call (the same training, bit for bit)
                one_train, _ = time_bpdl(build(hidden, mode, "kernels").to(device), train_set,
                                         test_set, 1, args.batch1_examples, 1, args.repeats,
                                         device, rate_batch=1)
                onl_train, _ = time_bpdl(build(hidden, mode, "kernels", online=True).to(device),
                                         train_set, test_set, B, args.train_examples, 1,
                                         args.repeats, device, rate_batch=1)
                row = {"network": name, "mode": mode, "device": device.type, "batch": B,
                       "threads": torch.get_num_threads(),
                       "kernels_train_ms": k_train, "kernels_test_ms": k_test,
                       "reference_train_ms": r_train, "reference_test_ms": r_test,
                       "original_train_ms": o_train, "original_test_ms": o_test,
                       "batch1_train_ms": one_train, "online_train_ms": onl_train,
                       "online_vs_lane": onl_train / k_train,
                       "speedup_vs_reference_train": r_train / k_train,
                       "speedup_vs_reference_test": r_test / k_test,
                       "speedup_vs_numpy_port_train": o_train / k_train,
                       "speedup_vs_numpy_port_test": o_test / k_test}
                if name == "784-500-10" and mode == "spiking":
                    row["speedup_vs_original_19_40ms_train"] = ORIGINAL_MS["train"][0] / k_train
                    row["speedup_vs_original_19_40ms_test"] = ORIGINAL_MS["test"][0] / k_test
                rows.append(row)
                print(row, flush=True)
    out = Path(args.out) if args.out else HERE / "results" / "segregated.csv"
    write_csv(out, rows)
    print(f"\n{machine()}; {today()}; batch {B}; wrote {out}\n")
    print("| network | mode | device | fused train | fused test | reference train | "
          "reference test | NumPy port train | NumPy port test | vs reference (train/test) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['network']} | {r['mode']} | {r['device']} | {r['kernels_train_ms']:.3f} | "
              f"{r['kernels_test_ms']:.3f} | {r['reference_train_ms']:.2f} | "
              f"{r['reference_test_ms']:.2f} | {r['original_train_ms']:.2f} | "
              f"{r['original_test_ms']:.2f} | {r['speedup_vs_reference_train']:.0f}x / "
              f"{r['speedup_vs_reference_test']:.0f}x |")
    print("\nOne example per update (ms per training example): batch-1 steps, online chunks of "
          f"{B} examples per call, and the time per lane inside a batch of {B}\n")
    print("| network | mode | device | batch 1 | online | per lane (batch) | online / lane |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['network']} | {r['mode']} | {r['device']} | {r['batch1_train_ms']:.3f} | "
              f"{r['online_train_ms']:.3f} | {r['kernels_train_ms']:.3f} | "
              f"{r['online_vs_lane']:.2f} |")


if __name__ == "__main__":
    main()
