"""Input/output embeddings tied across pipeline stages.

With model.tie_embeddings and pp > 1 the first stage owns `embed.weight` and the last stage a runtime copy
(`head.weight`, its spec says `tied_to="embed.weight"`). They stay one value by (a) starting equal --
broadcast from the first stage -- and (b) summing their gradients over ParallelState.embedding_group
(first + last stage, same tp/dp coordinates) before every optimizer step, so both copies receive the
gradient of the shared parameter and identical updates. The caller passes its end of the tie explicitly
(`Transformer.tied_embedding()`), or None on a rank that holds neither end.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from engine.parallel.state import ParallelState


@torch.no_grad()
def sync_tied_embedding(weight: Optional[torch.Tensor], pstate: ParallelState) -> None:
    """Make the last stage's copy equal to the first stage's embedding (call after init or load).
    Collective over the embedding group: both ends call it; ranks holding neither pass None."""
    if weight is None or pstate.pp <= 1:
        return
    src = pstate.global_rank(pstate.tp_rank, pstate.dp_rank, 0)
    dist.broadcast(weight.data, src=src, group=pstate.embedding_group)


@torch.no_grad()
def allreduce_tied_embedding_grad(grad: Optional[torch.Tensor], pstate: ParallelState) -> None:
    """Sum the two copies' gradients in place (after the pipeline step, before the data-parallel reduction:
    the two copies sit in different grad buffers, so their ZeRO-1 shards do not line up afterwards)."""
    if grad is None or pstate.pp <= 1:
        return
    dist.all_reduce(grad, group=pstate.embedding_group)
