"""Feedback-alignment family: training-step time and peak memory of every rule against backprop,
and the LocallyConnected2d kernels against the unfold reference.

Part 1 (``steps``): for each model (T19's MLP and CNN, B18's 5x256 tanh MLP, B18's MNIST and
CIFAR-10 locally connected networks) and each rule (bp, fa, dfa, usf, brsf, frsf, kp, wm), one
Adam training step (zero_grad, forward, loss, backward, step, after_step) on a fixed random
batch. Correctness first: the converted model's forward output must equal backprop's bit for bit
before anything is timed. Reported: median step time over repeats, its ratio to backprop's on
the same model, and the step's peak extra memory.

Part 2 (``lc``): at B18's CIFAR-10 layer sizes (docs/algorithms/baselines.md §2.3; batch 128), the fused
kernels (forward, input gradient, weight gradient, and a whole forward + backward of the layer)
against the unfold/einsum reference of ``bpdl.functional``. Correctness first: kernel and
reference must agree (float32, rtol 1e-4). Reported: median time, speed-up, peak extra memory
and its ratio.

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` above the memory held before the
measured call. On the CPU, each measurement runs in a fresh subprocess with
``MALLOC_MMAP_THRESHOLD_`` fixed at 64 KiB (so every tensor is its own mapping, returned on
free), resets the kernel's resident-set high-water mark (``/proc/self/clear_refs``) just
before the call and reports that mark (VmHWM) above the resident size at the reset.

    python benchmarks/feedback_alignment.py [steps|lc|all] [--threads 1] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import machine, today, write_csv  # noqa: E402

RULE_NAMES = ["bp", "fa", "dfa", "usf", "brsf", "frsf", "kp", "wm"]
#: label -> (model family, options, input shape, batch size)
MODELS = {
    "mlp 784-500-10 (T19)": ("mlp", {"hidden": [500]}, (1, 28, 28), 100),
    "mlp 5x256 tanh (B18 FC)": ("mlp", {"hidden": [256] * 5, "activation": "tanh",
                                        "bias_init": 0.0}, (1, 28, 28), 100),
    "cnn [16,32] (T19)": ("cnn", {}, (1, 28, 28), 100),
    "lc MNIST (B18)": ("lc", {}, (1, 28, 28), 100),
    "lc CIFAR-10 (B18)": ("lc", {}, (3, 32, 32), 128),
}
#: B18's CIFAR-10 LC layers: (C, H, O, kernel, stride) with SAME padding
LC_LAYERS = {
    "LC1 3x32x32 -> 64x16x16, 5x5/2": (3, 32, 64, 5, 2),
    "LC2 64x16x16 -> 128x8x8, 5x5/2": (64, 16, 128, 5, 2),
    "LC3 128x8x8 -> 256x8x8, 3x3/1": (128, 8, 256, 3, 1),
}


# ---- memory -----------------------------------------------------------------------------------------

def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak_rss() -> None:
    """Reset the kernel's high-water mark of this process's resident set (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_rss_bytes() -> int:
    """High-water mark of the resident set since the last :func:`_reset_peak_rss` (VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _in_subprocess(task: dict) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, __file__, "--worker", json.dumps(task)], env=env,
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"worker failed for {task}:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---- part 1: training steps --------------------------------------------------------------------------

def _learner(model_label: str, rule: str, device: str):
    from bpdl import nn as bnn
    from bpdl import rules

    name, options, shape, batch = MODELS[model_label]
    torch.manual_seed(0)
    model = bnn.build_model(name, shape, 10, options)
    opts = {"mirror_pretrain_steps": 0} if rule == "wm" else {}
    learner = rules.build(rule, model, opts).to(device)
    opt = torch.optim.Adam(learner.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    x = torch.rand((batch, *shape), generator=g).to(device)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    return learner, opt, x, y


def _step(learner, opt, x, y) -> None:
    opt.zero_grad(set_to_none=True)
    learner.training_step(x, y)
    opt.step()
    learner.after_step()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def check_forward_identical(model_label: str, device: str) -> None:
    """Every rule's converted model computes backprop's forward output bit for bit."""
    ref, _, x, _ = _learner(model_label, "bp", device)
    with torch.no_grad():
        expected = ref.model(x)
    for rule in RULE_NAMES[1:]:
        learner, _, _, _ = _learner(model_label, rule, device)
        with torch.no_grad():
            if not torch.equal(learner.model(x), expected):
                raise SystemExit(f"{model_label}/{rule}: forward differs from backprop's")


def time_steps(model_label: str, rules_: list[str], device: str, repeats: int,
               steps: int) -> dict[str, float]:
    """Median seconds per training step for each rule, measured in interleaved rounds so that
    load on a shared machine affects every rule alike."""
    setups = {rule: _learner(model_label, rule, device) for rule in rules_}
    for rule in rules_:
        for _ in range(2):
            _step(*setups[rule])
    samples: dict[str, list[float]] = {rule: [] for rule in rules_}
    for _ in range(repeats):
        for rule in rules_:
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(steps):
                _step(*setups[rule])
            _sync(device)
            samples[rule].append((time.perf_counter() - t0) / steps)
    return {rule: statistics.median(v) for rule, v in samples.items()}


def step_memory(model_label: str, rule: str, device: str) -> int:
    """Peak extra bytes of one training step (activations, gradients, temporaries) above the
    memory held between steps (parameters, feedback, optimiser state)."""
    if device.startswith("cuda"):
        learner, opt, x, y = _learner(model_label, rule, device)
        _step(learner, opt, x, y)
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        _step(learner, opt, x, y)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    return _in_subprocess({"kind": "step", "model": model_label, "rule": rule})["peak"]


def _worker_step(task: dict) -> dict:
    torch.set_num_threads(1)
    learner, opt, x, y = _learner(task["model"], task["rule"], "cpu")
    small = _learner("mlp 784-500-10 (T19)", task["rule"], "cpu")
    _step(*small)  # load code paths before the baseline
    learner.train()
    # allocate the optimiser state without running a full step
    for p in learner.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    base = _rss_bytes()
    _reset_peak_rss()
    _step(learner, opt, x, y)
    opt.zero_grad(set_to_none=True)
    return {"peak": max(0, _peak_rss_bytes() - base)}


def run_steps(args) -> list[dict]:
    device = args.device
    rows = []
    for label in args.models:
        check_forward_identical(label, device)
        steps = 20 if label.startswith("mlp") else (5 if label.startswith("cnn") else 2)
        if label.startswith("lc CIFAR"):
            steps = 1
        times = time_steps(label, RULE_NAMES, device, args.repeats, steps)
        for rule in RULE_NAMES:
            peak = step_memory(label, rule, device) if not args.no_memory else None
            row = {"model": label, "rule": rule, "batch": MODELS[label][3],
                   "step_ms": round(1e3 * times[rule], 3),
                   "ratio_to_bp": round(times[rule] / times["bp"], 3),
                   "peak_step_MiB": None if peak is None else round(peak / 2**20, 1),
                   "threads": torch.get_num_threads(), "device": device,
                   "repeats": args.repeats, "date": today()}
            rows.append(row)
            print(f"{label:28s} {rule:5s} {row['step_ms']:9.2f} ms  x{row['ratio_to_bp']:.3f}  "
                  f"peak {row['peak_step_MiB']} MiB", flush=True)
    return rows


# ---- part 2: locally connected kernels -------------------------------------------------------------

def _lc_tensors(layer: str, device: str, batch: int, requires_grad: bool = False):
    from bpdl.functional.locally_connected import same_padding

    c, h, o, k, s = LC_LAYERS[layer]
    oh, pt, _ = same_padding(h, k, s)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, c, h, h, generator=g).to(device)
    w = (torch.randn(oh, oh, o, c, k, k, generator=g) * 0.05).to(device)
    gy = torch.randn(batch, o, oh, oh, generator=g).to(device)
    if requires_grad:
        x.requires_grad_(True)
        w.requires_grad_(True)
    return x, w, gy, (h, h), k, s, pt


def _lc_call(impl: str, op: str, tensors):
    from bpdl import functional as F
    from bpdl import ops

    x, w, gy, size, k, s, p = tensors
    lib = ops if impl == "kernel" else F
    if op == "forward":
        return lambda: lib.locally_connected2d(x, w, None, s, p)
    if op == "grad_input":
        return lambda: lib.locally_connected2d_grad_input(gy, w, size, s, p)
    if op == "grad_weight":
        return lambda: lib.locally_connected2d_grad_weight(gy, x, k, s, p)

    def layer():  # forward and backward through autograd; the layer's output counts as
        # returned (a network needs it either way), not as workspace
        y = lib.locally_connected2d(x, w, None, s, p)
        return (y.detach(), *torch.autograd.grad(y, (x, w), gy))
    return layer


LC_OPS = ["forward", "grad_input", "grad_weight", "forward+backward"]


def check_lc(device: str, batch: int) -> None:
    for layer in LC_LAYERS:
        tensors = _lc_tensors(layer, device, min(batch, 16), requires_grad=True)
        for op in LC_OPS:
            got = _lc_call("kernel", op, tensors)()
            ref = _lc_call("reference", op, tensors)()
            for a, b in zip(got if isinstance(got, tuple) else (got,),
                            ref if isinstance(ref, tuple) else (ref,), strict=True):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def lc_memory(layer: str, op: str, impl: str, device: str, batch: int) -> dict[str, int]:
    """Peak extra bytes of one call (``peak``) and the bytes of what it returns (``output``);
    their difference is the call's workspace."""
    if device.startswith("cuda"):
        tensors = _lc_tensors(layer, device, batch, requires_grad=op == "forward+backward")
        fn = _lc_call(impl, op, tensors)
        fn()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        torch.cuda.synchronize()
        return {"peak": torch.cuda.max_memory_allocated() - base, "output": _nbytes(out)}
    return _in_subprocess({"kind": "lc", "layer": layer, "op": op, "impl": impl,
                           "batch": batch})


def _worker_lc(task: dict) -> dict:
    torch.set_num_threads(1)
    small = _lc_tensors("LC3 128x8x8 -> 256x8x8, 3x3/1", "cpu", 2,
                        requires_grad=task["op"] == "forward+backward")
    _lc_call(task["impl"], task["op"], small)()  # load code paths before the baseline
    tensors = _lc_tensors(task["layer"], "cpu", task["batch"],
                          requires_grad=task["op"] == "forward+backward")
    fn = _lc_call(task["impl"], task["op"], tensors)
    base = _rss_bytes()
    _reset_peak_rss()
    out = fn()
    peak = max(0, _peak_rss_bytes() - base)
    return {"peak": peak, "output": _nbytes(out)}


def _nbytes(out) -> int:
    tensors = out if isinstance(out, tuple) else (out,)
    return sum(t.numel() * t.element_size() for t in tensors)


def run_lc(args) -> list[dict]:
    device, batch = args.device, args.lc_batch
    check_lc(device, batch)
    rows = []
    totals = {op: {"kernel": 0.0, "reference": 0.0} for op in LC_OPS}
    for layer in LC_LAYERS:
        for op in LC_OPS:
            tensors = _lc_tensors(layer, device, batch, requires_grad=op == "forward+backward")
            fns = {impl: _lc_call(impl, op, tensors) for impl in ("kernel", "reference")}
            for fn in fns.values():
                fn()
            samples: dict[str, list[float]] = {"kernel": [], "reference": []}
            for _ in range(args.repeats):
                for impl, fn in fns.items():
                    _sync(device)
                    t0 = time.perf_counter()
                    fn()
                    _sync(device)
                    samples[impl].append(time.perf_counter() - t0)
            tk, tr = statistics.median(samples["kernel"]), statistics.median(samples["reference"])
            row = {"layer": layer, "op": op, "batch": batch,
                   "kernel_ms": round(1e3 * tk, 2), "reference_ms": round(1e3 * tr, 2),
                   "speedup": round(tr / tk, 2)}
            if not args.no_memory:
                mk = lc_memory(layer, op, "kernel", device, batch)
                mr = lc_memory(layer, op, "reference", device, batch)
                wk, wr = mk["peak"] - mk["output"], mr["peak"] - mr["output"]
                row.update({
                    "output_MiB": round(mk["output"] / 2**20, 1),
                    "kernel_peak_MiB": round(mk["peak"] / 2**20, 1),
                    "reference_peak_MiB": round(mr["peak"] / 2**20, 1),
                    "peak_ratio": round(mk["peak"] / mr["peak"], 3) if mr["peak"] else None,
                    "kernel_workspace_MiB": round(max(wk, 0) / 2**20, 1),
                    "reference_workspace_MiB": round(max(wr, 0) / 2**20, 1),
                    "workspace_ratio": round(max(wk, 0) / wr, 3) if wr > 0 else None})
            row.update({"threads": torch.get_num_threads(), "device": device,
                        "repeats": args.repeats, "date": today()})
            rows.append(row)
            totals[op]["kernel"] += tk
            totals[op]["reference"] += tr
            print(f"{layer:32s} {op:17s} kernel {row['kernel_ms']:8.1f} ms  reference "
                  f"{row['reference_ms']:8.1f} ms  x{row['speedup']:.2f}  peak "
                  f"{row.get('kernel_peak_MiB')} vs {row.get('reference_peak_MiB')} MiB "
                  f"(ratio {row.get('peak_ratio')}; workspace ratio "
                  f"{row.get('workspace_ratio')})", flush=True)
    for op, t in totals.items():  # B18's whole CIFAR-10 LC stack
        row = {"layer": "all three (B18 CIFAR-10)", "op": op, "batch": batch,
               "kernel_ms": round(1e3 * t["kernel"], 2),
               "reference_ms": round(1e3 * t["reference"], 2),
               "speedup": round(t["reference"] / t["kernel"], 2),
               "threads": torch.get_num_threads(), "device": device,
               "repeats": args.repeats, "date": today()}
        rows.append(row)
        print(f"{'all three (B18 CIFAR-10)':32s} {op:17s} kernel {row['kernel_ms']:8.1f} ms  "
              f"reference {row['reference_ms']:8.1f} ms  x{row['speedup']:.2f}", flush=True)
    return rows


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        import bpdl  # noqa: F401  (registers the ops)

        task = json.loads(sys.argv[2])
        result = _worker_step(task) if task["kind"] == "step" else _worker_lc(task)
        print(json.dumps(result))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("part", nargs="?", default="all", choices=("steps", "lc", "all"))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--lc-batch", type=int, default=128)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import bpdl  # noqa: F401

    print(f"machine: {machine()}; date {today()}", flush=True)
    out = Path(args.out)
    if args.part in ("steps", "all"):
        write_csv(out / "feedback_alignment_steps.csv", run_steps(args))
        print(f"wrote {out / 'feedback_alignment_steps.csv'}")
    if args.part in ("lc", "all"):
        write_csv(out / "locally_connected.csv", run_lc(args))
        print(f"wrote {out / 'locally_connected.csv'}")


if __name__ == "__main__":
    main()
