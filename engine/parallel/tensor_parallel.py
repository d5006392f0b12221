"""Tensor parallelism (Megatron-style) with sequence parallelism: the public names in one place.

The code lives in modules with one job each:

    collectives.py        raw tp collectives, the autograd region functions, the comm-timing hook
    layers.py             ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
    vocab_parallel_ce.py  cross entropy from vocabulary-split logits, never gathering them
    grad_sync.py          tp gradient sums after backward (sequence parallel, replicated K/V shards), gather
    sharding.py           ShardSpec: canonical name, global shape and this rank's part of every parameter
"""

from __future__ import annotations

import torch.nn as nn

from engine.parallel.collectives import (  # noqa: F401  (re-exported)
    SEQ_DIM,
    CommTimer,
    copy_to_tp_region,
    gather_from_sequence_parallel_region,
    gather_from_tp_region,
    reduce_from_tp_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
    scatter_to_tp_region,
    to_tp_region,
)
from engine.parallel.grad_sync import gather_tensor, sync_tp_grads
from engine.parallel.layers import (  # noqa: F401
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    column_parallel_linear,
    divide,
)
from engine.parallel.sharding import ShardSpec, collect_specs, shard_tensor  # noqa: F401
from engine.parallel.state import ParallelState
from engine.parallel.vocab_parallel_ce import vocab_parallel_cross_entropy  # noqa: F401


def allreduce_sequence_parallel_grads(module: nn.Module, pstate: ParallelState) -> None:
    """`sync_tp_grads` over the `.grad` of a module's parameters (a module without data-parallel buffers,
    e.g. a layer under test); the training loop syncs its data-parallel main grads instead."""
    specs = collect_specs(module)
    sync_tp_grads(((p.grad, specs[n]) for n, p in module.named_parameters()), pstate)


__all__ = ["SEQ_DIM", "ColumnParallelLinear", "CommTimer", "RowParallelLinear", "ShardSpec", "VocabParallelEmbedding",
           "allreduce_sequence_parallel_grads", "collect_specs", "column_parallel_linear", "copy_to_tp_region",
           "divide", "gather_from_sequence_parallel_region", "gather_from_tp_region", "gather_tensor",
           "reduce_from_tp_region", "reduce_scatter_to_sequence_parallel_region",
           "scatter_to_sequence_parallel_region", "scatter_to_tp_region", "shard_tensor", "sync_tp_grads",
           "to_tp_region", "vocab_parallel_cross_entropy"]
