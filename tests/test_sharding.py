"""Sharding-spec index maps, checked by brute force on small tensors whose values are their own indices.

Every spec kind the model uses (vocabulary padded at the end of a single block, a column split of a fused
two-block weight, K/V shards held by 2 ranks at tp 4, a row split along dim 1) and every tp rank: the local
shard cut from a canonical tensor, the canonical pieces it covers (each canonical element held by exactly
one distinct shard), arbitrary flat ranges of the local tensor (ZeRO-1 segments), and the optimizer's
canonical state over such ranges.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from engine.optim.optimizer import Optimizer
from engine.parallel.data_parallel import Segment
from engine.parallel.sharding import ShardSpec, box_view, flat_range_boxes
from engine.parallel.state import ParallelState

SPECS = {
    "padded_vocab": lambda tp: ShardSpec("embed.weight", (61, 3), split_dim=0, split_sizes=(64,), tp=tp),
    "fused_blocks": lambda tp: ShardSpec("fused.weight", (24, 5), split_dim=0, split_sizes=(16, 8), tp=tp),
    "kv_replicas": lambda tp: ShardSpec("k.weight", (8, 3), split_dim=0, split_sizes=(8,), tp=tp,
                                        tp_replicas=max(tp // 2, 1)),
    "row_split": lambda tp: ShardSpec("o.weight", (3, 8), split_dim=1, split_sizes=(8,), tp=tp),
    "replicated": lambda tp: ShardSpec("norm.weight", (7,), tp=tp),
}


def _canonical(spec: ShardSpec) -> torch.Tensor:
    return torch.arange(spec.numel, dtype=torch.float32).view(spec.global_shape) + 1.0  # 0 marks padding


def test_flat_range_boxes_cover_exactly_the_range():
    for shape in [(5,), (4, 6), (3, 4, 5)]:
        n = torch.Size(shape).numel()
        ref = torch.arange(n).view(shape)
        for lo, hi in itertools.combinations(range(n + 1), 2):
            got = torch.cat([box_view(ref, b).reshape(-1) for b in flat_range_boxes(shape, lo, hi)])
            assert torch.equal(got, torch.arange(lo, hi)), (shape, lo, hi)  # in order, each element once
            assert len(flat_range_boxes(shape, lo, hi)) <= 2 * len(shape) - 1


@pytest.mark.parametrize("kind", list(SPECS))
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_shards_and_canonical_pieces_round_trip(kind, tp):
    spec = SPECS[kind](tp)
    canon = _canonical(spec)
    rebuilt = torch.zeros(spec.global_shape)
    count = torch.zeros(spec.global_shape, dtype=torch.int32)
    for r in range(tp):
        local = spec.shard_canonical(canon, r)
        assert tuple(local.shape) == spec.local_shape
        if spec.runtime_shape != spec.global_shape:  # the runtime shard cut from a padded full tensor agrees
            full = torch.zeros(spec.runtime_shape)
            full.narrow(spec.split_dim, 0, spec.global_shape[spec.split_dim]).copy_(canon)
            assert torch.equal(spec.shard_runtime(full, r), local)
        if not spec.counts_once(r):
            continue
        for box, values in spec.canonical_pieces(local, r):
            box_view(rebuilt, box).copy_(values)
            box_view(count, box).add_(1)
        assert spec.canonical_numel_held(r) == sum(torch.Size(b[1]).numel() for b, _ in spec.canonical_pieces(local, r))
    assert torch.equal(rebuilt, canon) and torch.equal(count, torch.ones_like(count)), kind
    if kind == "padded_vocab":  # runtime rows 61..63 are padding: zero in the shard holding them
        per = 64 // tp
        last = spec.shard_canonical(canon, tp - 1)
        assert torch.equal(last[61 - (tp - 1) * per:], torch.zeros(3, 3))


@pytest.mark.parametrize("whole", [True, False], ids=["whole", "segments"])
@pytest.mark.parametrize("kind", ["padded_vocab", "fused_blocks", "row_split"])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_optimizer_canonical_state_over_segments(kind, tp, whole):
    """An Optimizer whose slots are whole shards (ZeRO-0) or odd flat segments of them (as ZeRO-1 cuts
    buckets) lists its state as canonical boxes that assemble to the canonical tensors, and loads it back
    exactly. A whole fused shard spans both blocks: its box is cut in two along the split dim."""
    spec = SPECS[kind](tp)
    canon = _canonical(spec)
    state = {"exp_avg": canon * 2.0, "exp_avg_sq": canon * 3.0, "master": canon}
    assembled = {k: torch.zeros(spec.global_shape) for k in state}
    count = torch.zeros(spec.global_shape, dtype=torch.int32)
    for r in range(tp):
        if not spec.counts_once(r):
            continue
        pstate = ParallelState(tp=tp, tp_rank=r, world_size=tp)
        param = torch.nn.Parameter(torch.zeros(spec.local_shape))
        n = param.numel()
        cuts = [0, n] if whole else sorted({0, n, n // 3 + 1, (2 * n) // 3 - 1} & set(range(n + 1)))
        segments = [Segment(spec.name, param, lo, hi, torch.zeros(hi - lo)) for lo, hi in zip(cuts, cuts[1:])]
        opt = Optimizer(segments, {spec.name: spec}, pstate)
        opt.load_canonical_state(lambda name, key: state[key], {spec.name: 3.0})
        assert torch.equal(param.detach(), spec.shard_canonical(canon, r))  # fp32: the master is the parameter
        pieces, steps = opt.canonical_state()
        assert steps == {spec.name: 3.0}
        for p in pieces:
            box_view(assembled[p.key], p.box).copy_(p.value)
            if p.key == "master":
                box_view(count, p.box).add_(1)
    assert torch.equal(count, torch.ones_like(count))
    for k, want in state.items():
        assert torch.equal(assembled[k], want), k
