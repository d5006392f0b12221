"""Tensor-parallel gradient completion and gathering, driven by the sharding specs.

After the last backward of a step (after gradient accumulation, before data-parallel reduction, clipping
and the optimizer step), two kinds of gradients are partial per tp rank and must be summed over tp:

- sequence-parallel ones (norm weights and biases, row-parallel biases, learned positions): each rank saw
  only its sequence shard;
- shards held by several tp ranks (`tp_replicas` > 1: K/V projections when tp > n_kv_heads): each replica
  back-propagated only its own query heads.

`gather_tensor` rebuilds the canonical (full, unpadded) tensor of a sharded parameter or of its gradient.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch

from engine.parallel.collectives import all_gather, all_reduce
from engine.parallel.sharding import ShardSpec, box_view
from engine.parallel.state import ParallelState


def sync_tp_grads(grads: Iterable[tuple[Optional[torch.Tensor], ShardSpec]], pstate: ParallelState) -> None:
    """Sum, in place and over the tp group, the gradients the specs mark as partial (see module docstring).
    `grads`: (gradient or None, spec) of this rank's parameters, e.g. the data-parallel main grads. No-op
    at tp=1."""
    if pstate.tp == 1:
        return
    sp: list[torch.Tensor] = []
    rep: list[tuple[torch.Tensor, ShardSpec]] = []
    for g, spec in grads:
        if g is None:
            continue
        if spec.sequence_parallel:
            sp.append(g)
        elif spec.tp_replicas > 1:
            rep.append((g, spec))
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for g in sp:
        by_dtype.setdefault(g.dtype, []).append(g)
    for same in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in same])  # one collective per dtype, not one per tensor
        all_reduce(flat, pstate.tp_group)
        offset = 0
        for g in same:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
    for g, spec in rep:
        # Every rank writes its partial gradient into its shard's slot of a zero buffer; the tp all-reduce
        # then sums the replicas of each shard (only the tp group exists, no replica sub-groups needed).
        slot = pstate.tp_rank // spec.tp_replicas
        buf = torch.zeros((spec.n_shards, *g.shape), dtype=g.dtype, device=g.device)
        buf[slot] = g
        all_reduce(buf, pstate.tp_group)
        g.copy_(buf[slot])


def gather_tensor(local: torch.Tensor, spec: ShardSpec, pstate: ParallelState) -> torch.Tensor:
    """The canonical tensor (global shape, padding removed) from every tp rank's runtime `local` (a
    parameter or its gradient). A collective over the tp group when the spec is split."""
    local = local.detach()
    if not spec.is_split:
        if spec.runtime_shape == spec.global_shape:
            return local
        return local.narrow(spec.split_dim, 0, spec.global_shape[spec.split_dim])  # cut the vocabulary padding
    d = spec.split_dim
    gathered = all_gather(local, d, pstate.tp_group, pstate.tp)  # [.., tp * local, ..] in rank order
    out = torch.empty(spec.global_shape, dtype=local.dtype, device=local.device)
    for r, part in enumerate(gathered.chunk(pstate.tp, dim=d)):
        if r % spec.tp_replicas:
            continue  # a replica of the shard already placed
        for cbox, values in spec.canonical_pieces(part, r):
            box_view(out, cbox).copy_(values)
    return out


__all__ = ["gather_tensor", "sync_tp_grads"]
