"""Online (batch-1) training of segregated dendrites in chunks: ``online=true`` and the fused
``bpdl::segregated_train_online`` against batch-1 steps through the rule and ``torch.optim.SGD``
(bit for bit), the op against its pure-PyTorch reference, opcheck, bad arguments and options."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from bpdl import ops
from bpdl.cli import main
from bpdl.errors import ConfigError
from bpdl.functional import segregated as seg
from bpdl.nn.segregated import SegregatedDendriteNet, SegregatedNetConfig
from bpdl.rules.segregated import SegregatedConfig, SegregatedDendrites
from bpdl.train import RunConfig, resolve_config
from conftest import DEVICES

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SGD = RunConfig(rule="segregated", optimizer="sgd", lr=0.3)


def _pair(opts, backend="auto", dtype="float32", device="cpu", n_in=784):
    """Two identical learners: one trained one example per step, the other online in chunks."""
    torch.manual_seed(0)
    net = SegregatedDendriteNet(n_in, 10, SegregatedNetConfig(**opts))
    fb = (0.05,) * net.n_hidden if opts.get("learn_feedback") else None
    kw = dict(seed=5, backend=backend, feedback_lrs=fb, dtype=dtype)
    one = SegregatedDendrites(net, SegregatedConfig(**kw)).to(device)
    chunked = SegregatedDendrites(copy.deepcopy(net), SegregatedConfig(online=True, **kw)).to(device)
    return one, chunked


def _data(n, learner, n_in=784, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, n_in, generator=g) * (torch.rand(n, n_in, generator=g) < 0.2)
    return x.to(learner.dtype), torch.randint(0, 10, (n,), generator=g)


def _train_both(one, chunked, x, y, chunk, first=0):
    device = next(one.parameters()).device
    x, y = x.to(device), y.to(device)
    for learner in (one, chunked):
        learner.examples_seen.fill_(first)
    opt_one = one.setup_optimizers(SGD)["main"]
    opt_chunked = chunked.setup_optimizers(SGD)["main"]
    losses_one, losses_chunked = [], []
    for k in range(x.shape[0]):
        opt_one.zero_grad(set_to_none=True)
        losses_one.append(float(one.training_step(x[k:k + 1], y[k:k + 1])["loss"]))
        opt_one.step()
        one.after_step()
    for k in range(0, x.shape[0], chunk):
        opt_chunked.zero_grad(set_to_none=True)
        stats = chunked.training_step(x[k:k + chunk], y[k:k + chunk])
        losses_chunked.append(float(stats["loss"]) * min(chunk, x.shape[0] - k))
        opt_chunked.step()
        chunked.after_step()
    return sum(losses_one), sum(losses_chunked)


def _assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key, value in sa.items():
        if torch.is_tensor(value):
            assert torch.equal(value, sb[key]), key
    for u, v in zip(a.lanes.tensors(), b.lanes.tensors(), strict=True):
        assert torch.equal(u, v)


CONFIGS = {
    "spiking": dict(hidden=(60,)),
    "rate-2-layers": dict(hidden=(50, 20), mode="rate"),
    "learned-sparse-feedback": dict(hidden=(40, 30), learn_feedback=True, sparse_feedback=True,
                                    feedback_bias="ghead"),
    "symmetric-sparse": dict(hidden=(40, 30), symmetric_weights=True, sparse_feedback=True),
    "backprop-plateaus-layerwise": dict(hidden=(40, 20), use_backprop=True, random_plateaus=True,
                                        broadcast=False),
    "noisy-symmetric": dict(hidden=(30, 20), symmetric_weights=True, noisy_symmetric=True),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_online_chunks_equal_batch_one_steps(name, device):
    """K examples in one chunk are K batch-1 steps, bit for bit: weights, feedback, counters and
    the lane state (the fused op on the kernels' configurations, the per-example fallback for
    noisy symmetric feedback)."""
    one, chunked = _pair(CONFIGS[name], device=device)
    x, y = _data(13, one)
    loss_one, loss_chunked = _train_both(one, chunked, x, y, chunk=5)
    _assert_same_state(one, chunked)
    assert loss_chunked == pytest.approx(loss_one, rel=1e-5)
    assert int(chunked.examples_seen) == 13 and int(chunked.net.feedback_updates) == 13


@pytest.mark.parametrize("isa", ["base", "avx2", "avx512"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("mode", ["spiking", "rate"])
def test_every_cpu_instruction_set_trains_online_exactly(isa, dtype, mode, monkeypatch):
    """Each instruction set's SGD loops (masked vector blocks of columns, the transposes updated
    in their place and W written back at the end) against batch-1 steps through torch.optim.SGD;
    70 units and inputs 20 % nonzero cover full, partial and skipped blocks."""
    monkeypatch.setenv("BPDL_CPU_ISA", isa)
    one, chunked = _pair(dict(hidden=(70,), mode=mode), dtype=dtype)
    x, y = _data(9, one)
    _train_both(one, chunked, x, y, chunk=9)
    _assert_same_state(one, chunked)


def test_online_with_the_original_quick_test_resets():
    """compat="original" clears the lanes every 1,000 examples: a chunk across the boundary
    trains in pieces and clears the state where batch-1 training does."""
    one, chunked = _pair(dict(hidden=(30,), compat="original"))
    x, y = _data(12, one)
    _train_both(one, chunked, x, y, chunk=6, first=994)
    _assert_same_state(one, chunked)


def test_online_reference_backend_equals_batch_one_reference():
    one, chunked = _pair(dict(hidden=(20,)), backend="reference", dtype="float64")
    x, y = _data(6, one)
    _train_both(one, chunked, x, y, chunk=3)
    _assert_same_state(one, chunked)


def _online_args(p, device, dtype=torch.float64, K=5):
    torch.manual_seed(3)
    sizes = p.sizes
    M = len(sizes) - 1
    W = [((torch.rand(sizes[m + 1], sizes[m], dtype=dtype) - 0.3) * 3 / sizes[m] ** 0.5)
         .to(device) for m in range(M)]
    b = [torch.rand(sizes[m + 1], dtype=dtype, device=device) for m in range(M)]
    Y = [torch.randn(sizes[m + 1], sizes[-1], dtype=dtype, device=device) for m in range(M - 1)]
    g = torch.Generator().manual_seed(4)
    x = (0.2 * torch.rand(K, sizes[0], generator=g, dtype=dtype)
         * (torch.rand(K, sizes[0], generator=g) < 0.5)).to(device)
    target = torch.zeros(K, sizes[-1], dtype=dtype, device=device)
    target[torch.arange(K), torch.arange(K) % sizes[-1]] = 1
    lengths = torch.tensor([[25 + k % 3, 24 + k % 2] for k in range(K)], device=device)
    return W, b, Y, x, target, lengths, p.windows(lengths)


def _settings(p):
    M = p.n_layers
    return dict(kinds=[seg.KIND_OUTPUT if m == M - 1 else seg.KIND_HIDDEN for m in range(M)],
                lrs=[0.3] * M, scales=[-(p.P_output if m == M - 1 else p.P_hidden)
                                       for m in range(M)],
                gains=[p.k_D if m == M - 1 else p.k_B for m in range(M)])


@pytest.mark.parametrize("device", DEVICES)
def test_online_op_matches_its_reference(device):
    """The fused op against :func:`bpdl.functional.segregated.train_online` (reference
    simulation and plasticity), float64: the same spikes, states and weights to rounding."""
    p = seg.SimParams(sizes=(30, 12, 4), forward_steps=25, target_steps=24, window=6)
    results = []
    for fused in (True, False):
        W, b, Y, x, target, lengths, windows = _online_args(p, device)
        state = seg.LaneState.zeros(1, p, torch.float64, device)
        keys = torch.zeros(1, dtype=torch.int64, device=device)
        fn = ops.segregated_train_online if fused else seg.train_online
        avg, lam_out, C_out = fn(W, b, Y, None, [], state, x, target, lengths, windows, None, 9,
                                 keys, p, **_settings(p))
        results.append((W, b, state, avg, lam_out, C_out))
    (W1, b1, s1, a1, l1, c1), (W2, b2, s2, a2, l2, c2) = results
    assert torch.equal(s1.in_ring.cpu(), s2.in_ring.cpu())
    for r1, r2 in zip(s1.rings, s2.rings, strict=True):
        assert torch.equal(r1.cpu(), r2.cpu())
    for u, v in zip(W1 + b1 + [l1, c1] + a1.tensors(), W2 + b2 + [l2, c2] + a2.tensors(),
                    strict=True):
        torch.testing.assert_close(u.cpu(), v.cpu(), rtol=1e-10, atol=1e-11)
    assert not torch.equal(W1[0].cpu(), _online_args(p, device)[0][0].cpu())  # it trained


@pytest.mark.parametrize("device", DEVICES)
def test_online_opcheck_and_bad_arguments(device):
    p = seg.SimParams(sizes=(12, 6, 3), forward_steps=25, target_steps=25, window=5)
    W, b, Y, x, target, lengths, windows = _online_args(p, device, torch.float32, K=3)
    state = seg.LaneState.zeros(1, p, torch.float32, device)
    values, flags = ops.segregated._seg_lists(p)
    need = [int(v) for v in p.spiking_populations(True)]
    s = _settings(p)
    keys = torch.zeros(1, dtype=torch.int64, device=device)

    def args(**kw):
        a = dict(W=W, b=b, Y=Y, c=[], masks=[], x=x, target=target,
                 kappa=p.kappa(torch.float32, device), kinds=s["kinds"], lrs=s["lrs"])
        a.update(kw)
        return (a["W"], a["b"], a["Y"], a["c"], a["masks"], a["x"], a["target"], a["kappa"],
                state.in_ring, state.rings, state.C, state.lam, state.A, state.step, keys,
                lengths, windows, [], 3, values, flags, need, need, a["kinds"], a["lrs"],
                s["scales"], s["gains"], [], 1.0, -1.0, False, 1.0)

    torch.library.opcheck(torch.ops.bpdl.segregated_train_online.default, args(),
                          test_utils=("test_schema", "test_autograd_registration",
                                      "test_faketensor"))
    op = torch.ops.bpdl.segregated_train_online
    with pytest.raises(RuntimeError, match="one entry per layer"):
        op(*args(kinds=[0]))
    with pytest.raises(RuntimeError, match="must be contiguous"):
        op(*args(W=[W[0].t().contiguous().t(), W[1]]))
    with pytest.raises(RuntimeError, match="output layer's kind must be 0"):
        op(*args(kinds=[0, 1]))
    with pytest.raises(RuntimeError, match="masks"):
        op(*args(masks=[torch.ones(6, 3, device=device)]))


def test_online_needs_plain_sgd_and_its_optimiser():
    torch.manual_seed(0)
    net = SegregatedDendriteNet(784, 10, SegregatedNetConfig(hidden=(20,)))
    learner = SegregatedDendrites(net, SegregatedConfig(online=True))
    x = torch.rand(2, 784)
    with pytest.raises(ConfigError, match="setup_optimizers"):
        learner.training_step(x, torch.tensor([1, 2]))
    with pytest.raises(ConfigError, match="plain SGD"):
        learner.setup_optimizers(RunConfig(rule="segregated", optimizer="adam", lr=1e-3))
    with pytest.raises(ConfigError, match="momentum"):
        learner.setup_optimizers(RunConfig(rule="segregated", optimizer="sgd", lr=0.1,
                                           optimizer_options={"momentum": 0.9}))


def test_online_run_defaults_are_the_papers_per_example_rates():
    online = resolve_config({"rule": "segregated", "rule_options": {"online": True}})
    lanes = resolve_config({"rule": "segregated"})
    assert online.batch_size == lanes.batch_size == 32  # a chunk of 32 examples per call
    assert online.layer_lrs == pytest.approx((0.21, 0.21))  # the paper's, unscaled
    assert lanes.layer_lrs[1] < 0.21  # summed lanes: the output rate is rescaled


def test_cli_online_training(real_data_root, tmp_path):
    out = tmp_path / "online"
    rc = main(["train", "--rule", "segregated", "--dataset", "mnist", "--data-dir",
               str(real_data_root), "--offline", "--max-examples", "96", "--val-size", "100",
               "--model-opt", "hidden=[40]", "--model-opt", "mode=rate", "--rule-opt",
               "online=true", "--test", "never", "--no-progress", "--out", str(out),
               "--threads", "1"])
    assert rc == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["rule_options"]["online"] is True and cfg["batch_size"] == 32
    assert json.loads((out / "summary.json").read_text())["examples"] == 96
