"""Pipeline schedules, simulator, partitioning, deferred weight gradients and the bench (one process, no groups)."""

from __future__ import annotations

import copy
import xml.etree.ElementTree as ET

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.parallel.pipeline import (Costs, PartitionError, ScheduleError, bubble_formula, build_schedule,
                                      layers_for_stage, simulate)
from engine.parallel.pipeline.schedules import Action, Schedule
from engine.parallel.pipeline.weight_grad import WeightGradStore, defer_weight_grads

# Cost conventions: F=1 with B=1 (F=B) and B=2 (backward twice the forward); zb splits B into B-W and W.
COSTS = [Costs(1, 1, 0.5), Costs(1, 2, 1)]
SIZES = [(2, 4), (2, 8), (4, 4), (4, 8), (4, 16), (8, 16)]


@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
@pytest.mark.parametrize("pp,m", SIZES)
@pytest.mark.parametrize("costs", COSTS, ids=["FeqB", "Bx2"])
def test_bubble_gpipe_1f1b(name, pp, m, costs):
    """bubble = idle / (pp * makespan) = (p-1)/(m+p-1) for any uniform F and B."""
    r = simulate(build_schedule(name, pp, m), costs)
    assert r.bubble_total == pytest.approx((pp - 1) / (m + pp - 1), abs=1e-12)
    assert r.makespan == pytest.approx((m + pp - 1) * (costs.f + costs.b))
    assert r.bubble == pytest.approx([r.bubble_total] * pp)  # every stage idles equally


@pytest.mark.parametrize("pp,m", [s for s in SIZES if s[1] % s[0] == 0])
@pytest.mark.parametrize("vpp", [2, 4])
@pytest.mark.parametrize("costs", COSTS, ids=["FeqB", "Bx2"])
def test_bubble_interleaved(pp, m, vpp, costs):
    """Megatron: bubble time / ideal time = (p-1)/(v*m), i.e. bubble fraction (p-1)/(v*m+p-1).

    Chunk actions cost F/v and B/v (the same model cut into v times more stages)."""
    r = simulate(build_schedule("interleaved", pp, m, vpp=vpp), costs)
    ideal = m * (costs.f + costs.b)
    assert (r.makespan - ideal) / ideal == pytest.approx((pp - 1) / (vpp * m), abs=1e-12)
    assert r.bubble_total == pytest.approx(bubble_formula("interleaved", pp, m, vpp), abs=1e-12)


@pytest.mark.parametrize("pp,m", SIZES)
def test_zero_bubble_beats_1f1b_with_same_peak_memory(pp, m):
    costs = Costs(1, 2, 1)  # F = B(input) = W = 1
    zb = simulate(build_schedule("zb", pp, m), costs)
    ref = simulate(build_schedule("1f1b", pp, m), costs)
    assert zb.bubble_total < ref.bubble_total
    assert max(zb.peak_in_flight) <= max(ref.peak_in_flight) == min(pp, m)
    # ZB-H1: makespan 3m + (p-1) versus 1F1B's 3(m+p-1), i.e. a third of 1F1B's bubble at F=B=W.
    assert zb.makespan == pytest.approx(3 * m + pp - 1)


@pytest.mark.parametrize("f,b,w", [(1, 3, 1), (1, 4.5, 1.2), (2, 1, 0.3), (1, 2, 0.2)])
@pytest.mark.parametrize("pp,m", SIZES)
def test_zero_bubble_never_slower_than_1f1b(f, b, w, pp, m):
    costs = Costs(f, b, w)
    zb = simulate(build_schedule("zb", pp, m, cost_f=f, cost_b=b - w, cost_w=w), costs)
    assert zb.makespan < simulate(build_schedule("1f1b", pp, m), costs).makespan
    assert max(zb.peak_in_flight) <= pp


@pytest.mark.parametrize("pp,m", SIZES)
def test_peak_in_flight(pp, m):
    assert simulate(build_schedule("1f1b", pp, m)).peak_in_flight == [min(pp - r, m) for r in range(pp)]
    assert simulate(build_schedule("gpipe", pp, m)).peak_in_flight == [m] * pp


def test_schedules_are_complete_and_ordered():
    for name, vpp in (("gpipe", 1), ("1f1b", 1), ("interleaved", 2), ("zb", 1)):
        s = build_schedule(name, 4, 8, vpp=vpp)
        for acts in s.actions:
            kinds = {"F": 0, "B": 0, "W": 0}
            for a in acts:
                kinds[a.kind] += 1
            assert kinds["F"] == kinds["B"] == 8 * vpp
            assert kinds["W"] == (8 if name == "zb" else 0)


def test_schedule_errors():
    with pytest.raises(ScheduleError, match="multiple of pp"):
        build_schedule("interleaved", 4, 6, vpp=2)
    with pytest.raises(ScheduleError, match="unknown schedule"):
        build_schedule("pipedream", 2, 4)
    with pytest.raises(ScheduleError, match="needs schedule 'interleaved'"):
        build_schedule("1f1b", 2, 4, vpp=2)


def test_simulator_detects_deadlock():
    # rank 1 wants micro-batch 1 first, rank 0 only sends it after B0, which needs rank 1's B0: a cycle.
    F, B = (lambda i: Action("F", i)), (lambda i: Action("B", i))
    bad = Schedule("bad", 2, 1, 2, ((F(0), B(0), F(1), B(1)), (F(1), F(0), B(0), B(1))))
    with pytest.raises(ScheduleError, match="deadlock"):
        simulate(bad)
    missing = Schedule("bad", 2, 1, 2, ((F(0), B(0), F(1), B(1)), (F(0), B(0), F(1))))
    with pytest.raises(ScheduleError, match="rank 1"):
        simulate(missing)


# ----------------------------------------------------------------------------- partitioning


def test_layers_even_and_interleaved():
    assert [layers_for_stage(8, 4, 1, r, 0) for r in range(4)] == [range(0, 2), range(2, 4), range(4, 6),
                                                                   range(6, 8)]
    # vpp=2: virtual stage s = chunk*pp + rank, so rank 0 holds layers 0 and 4.
    assert [layers_for_stage(8, 4, 2, 0, c) for c in range(2)] == [range(0, 1), range(4, 5)]
    assert layers_for_stage(8, 4, 2, 3, 1) == range(7, 8)


def test_layers_explicit_layout():
    layout = [1, 3, 3, 1]  # lighter first/last stage: they also hold the embedding and the head
    got = [layers_for_stage(8, 4, 1, r, 0, layout) for r in range(4)]
    assert got == [range(0, 1), range(1, 4), range(4, 7), range(7, 8)]


def test_layers_errors():
    with pytest.raises(PartitionError, match="does not split evenly"):
        layers_for_stage(10, 4, 1, 0, 0)
    with pytest.raises(PartitionError, match="summing to n_layers=8"):
        layers_for_stage(8, 4, 1, 0, 0, [2, 2, 2, 1])
    with pytest.raises(PartitionError, match="pp\\*vpp = 4"):
        layers_for_stage(8, 4, 1, 0, 0, [4, 4])
    with pytest.raises(PartitionError, match="out of range"):
        layers_for_stage(8, 4, 1, 4, 0)


# ----------------------------------------------------------------------------- deferred weight grads


def test_deferred_weight_grad_matches_autograd():
    torch.manual_seed(0)
    head = nn.Parameter(torch.randn(4, 16) * 0.1)  # a functional F.linear, like the output head
    net = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.LayerNorm(16))
    ref, ref_head = copy.deepcopy(net), nn.Parameter(head.detach().clone())
    x = torch.randn(3, 5, 8, requires_grad=True)
    xr = x.detach().clone().requires_grad_(True)
    store = WeightGradStore()
    for mb in range(2):  # two micro-batches accumulate
        with defer_weight_grads(store):
            out = F.linear(net(x * (mb + 1)), head)
        with store.capture(mb):
            (out ** 2).sum().backward()
        if mb == 0:
            assert net[0].weight.grad is None and head.grad is None  # deferred: not there after B
        assert net[0].bias.grad is not None and net[2].weight.grad is not None  # the rest is computed in B
        (F.linear(ref(xr * (mb + 1)), ref_head) ** 2).sum().backward()
    assert store.n_deferred_layers == 4 and len(store) == 2
    store.flush(0)
    store.flush(1)
    assert len(store) == 0
    pairs = list(zip(net.parameters(), ref.parameters())) + [(head, ref_head)]
    for p, q in pairs:
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-7)
        assert not p.grad.requires_grad  # W must not build a graph through the saved inputs
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-6, atol=1e-7)
    # Outside capture the routed layers compute their full gradient in backward, as plain linears.
    net.zero_grad()
    with defer_weight_grads(store):
        y = net(x)
    y.sum().backward()
    assert net[0].weight.grad is not None and len(store) == 0


# ----------------------------------------------------------------------------- timeline + bench


def test_bench_and_svg(tmp_path, capsys):
    from engine.bench.pipeline import main

    svg, js = tmp_path / "t.svg", tmp_path / "t.json"
    assert main(["--pp", "4", "--vpp", "2", "--micro-batches", "8", "--schedule", "all", "--svg", str(svg),
                 "--json", str(js)]) == 0
    out = capsys.readouterr().out
    for name in ("gpipe", "1f1b", "interleaved", "zb"):
        assert name in out
    root = ET.parse(svg).getroot()
    assert root.tag.endswith("svg") and len(root) > 4 * 8 * 2
    assert main(["--pp", "4", "--micro-batches", "6", "--schedule", "interleaved"]) == 2


def test_deferred_weight_grad_under_bf16_autocast():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
    ref = copy.deepcopy(net)
    x = torch.randn(3, 5, 8)
    store = WeightGradStore()
    with torch.autocast("cpu", dtype=torch.bfloat16), defer_weight_grads(store):
        out = net(x)
    assert out.dtype == torch.bfloat16  # same dtype as autocast gives plain linears
    with store.capture(0):
        out.float().sum().backward()
    store.flush(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref(x).float().sum().backward()
    for p, q in zip(net.parameters(), ref.parameters()):
        assert p.grad.dtype == torch.float32
        torch.testing.assert_close(p.grad, q.grad, rtol=2e-2, atol=2e-2)


def test_executor_single_stage_matches_step():
    """pp=1 (no process group): the executor degenerates to plain gradient accumulation."""
    import contextlib

    from engine.config import ModelConfig
    from engine.model.transformer import build_model
    from engine.parallel.pipeline.executor import forward_backward_pipeline
    from engine.parallel.state import ParallelState
    from engine.model.loss import lm_loss
    from engine.train.step import forward_backward, split_batch

    cfg = ModelConfig(vocab_size=61, vocab_pad_multiple=8, d_model=32, n_layers=2, n_heads=4, ffn_hidden=64,
                      max_seq_len=16)
    g = torch.Generator().manual_seed(0)
    batches = [split_batch({"tokens": torch.randint(0, 61, (2, 9), generator=g)}, torch.device("cpu"))
               for _ in range(4)]
    ref, model = build_model(cfg, seed=3), build_model(cfg, seed=3)
    ref_losses = forward_backward(ref, batches, 61, autocast=contextlib.nullcontext)
    for schedule in ("1f1b", "zb"):
        model.zero_grad()
        losses = forward_backward_pipeline([model], batches, ParallelState.single(), schedule=schedule,
                                           loss_fn=lambda logits, b: lm_loss(logits, b["targets"], 61),
                                           seq_len=8, micro_batch_size=2, d_model=32)
        assert losses == pytest.approx(ref_losses, rel=1e-6)
        for (n, p), q in zip(model.named_parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=n)
