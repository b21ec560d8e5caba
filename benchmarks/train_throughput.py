"""Training throughput: bpdl's shared loop against a minimal hand-written PyTorch loop.

Both train the same model (same architecture, initialisation and seed) with the same optimiser,
batch size and in-memory MNIST tensors for the same number of examples; the hand-written loop
does nothing but index a minibatch, convert it to float, and take the step. Throughput counts
training steps only (bpdl's evaluations are timed separately and reported as wall time).
Correctness first: before timing, both loops are run for a few steps from the same
initialisation and must produce identical weights.

    python benchmarks/train_throughput.py [--data-dir DIR] [--repeats 3] [--examples 30000]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _common import HERE, default_data_dir, machine, today, write_csv
from bpdl import data as bdata
from bpdl import nn as bnn
from bpdl.train import RunConfig, train

MODELS = {
    "mlp 784-500-10": ("mlp", {"hidden": [500]}),
    "cnn [16,32] k5": ("cnn", {}),
}


def hand_written(model, train_set, batch_size, examples, seed, lr):
    """The loop a user would write by hand."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    images, labels = train_set.images, train_set.labels
    n = len(train_set)
    g = torch.Generator().manual_seed(seed)
    seen = 0
    t0 = time.perf_counter()
    while seen < examples:
        perm = torch.randperm(n, generator=g)
        for start in range(0, n, batch_size):
            idx = perm[start:start + batch_size]
            x = images[idx].float().div_(255)
            y = labels[idx]
            opt.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            seen += idx.numel()
            if seen >= examples:
                break
    return seen / (time.perf_counter() - t0)


def bpdl_loop(name, options, sets, batch_size, examples, seed, lr):
    cfg = RunConfig(dataset="mnist", model=name, model_options=options, optimizer="adam", lr=lr,
                    batch_size=batch_size, epochs=1000, max_examples=examples, eval_every=None,
                    train_eval_size=0, probe_size=0, test="never", seed=seed, device="cpu")
    t0 = time.perf_counter()
    result = train(cfg, data=sets, progress=False, log=lambda s: None)
    wall = time.perf_counter() - t0
    s = result.summary
    return s["examples"] / s["train_time_s"], s["examples"] / wall, result


def check_same_updates(name, options, sets, seed, lr):
    """A few steps of both loops from the same initialisation give the same weights."""
    cfg = RunConfig(dataset="mnist", model=name, model_options=options, lr=lr, batch_size=100,
                    max_examples=300, train_eval_size=0, probe_size=0, test="never", seed=seed,
                    device="cpu", epochs=1)
    result = train(cfg, data=sets, progress=False, log=lambda s: None)
    torch.manual_seed(seed)
    model = bnn.build_model(name, sets[0].shape, 10, options)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    from bpdl.train import _shuffle_generator

    perm = torch.randperm(len(sets[0]), generator=_shuffle_generator(seed, 0))
    for b in range(3):
        idx = perm[b * 100:(b + 1) * 100]
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(bdata.to_float(sets[0].images[idx])),
                                          sets[0].labels[idx]).backward()
        opt.step()
    for p, q in zip(model.parameters(), result.learner.model.parameters(), strict=False):
        if not torch.equal(p, q):
            raise SystemExit(f"{name}: bpdl's loop and the hand-written loop disagree")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", default=default_data_dir())
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--examples", type=int, default=30000)
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--out", default=str(HERE / "results" / "train_throughput.csv"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sets = bdata.train_val_test("mnist", val_size=5000, seed=0, data_dir=args.data_dir)
    rows = []
    print(f"machine: {machine()}; date {today()}")
    for label in args.models:
        name, options = MODELS[label]
        check_same_updates(name, options, sets, 0, 1e-3)
        examples = args.examples if name == "mlp" else args.examples // 5
        hand, loop, loop_wall = [], [], []
        for r in range(args.repeats):  # interleaved, so drift affects both alike
            torch.manual_seed(r)
            model = bnn.build_model(name, sets[0].shape, 10, options)
            hand.append(hand_written(model, sets[0], args.batch_size, examples, r, 1e-3))
            eps, eps_wall, _ = bpdl_loop(name, options, sets, args.batch_size, examples, r, 1e-3)
            loop.append(eps)
            loop_wall.append(eps_wall)
        row = {
            "model": label, "batch_size": args.batch_size, "examples": examples,
            "repeats": args.repeats, "threads": torch.get_num_threads(),
            "hand_written_ex_per_s": round(statistics.median(hand), 1),
            "bpdl_ex_per_s": round(statistics.median(loop), 1),
            "bpdl_wall_ex_per_s": round(statistics.median(loop_wall), 1),
            "ratio": round(statistics.median(loop) / statistics.median(hand), 3),
            "date": today(), "machine": machine(),
        }
        rows.append(row)
        print(f"{label}: hand-written {row['hand_written_ex_per_s']:.0f} ex/s, bpdl "
              f"{row['bpdl_ex_per_s']:.0f} ex/s (ratio {row['ratio']:.3f}; with its "
              f"evaluations {row['bpdl_wall_ex_per_s']:.0f} ex/s)", flush=True)
    write_csv(__import__("pathlib").Path(args.out), rows)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
