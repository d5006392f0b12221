"""Tied input/output embeddings across pipeline stages.

With model.tie_embeddings and pp > 1 the first stage owns `embed.weight` and the last stage a
separate `head.weight` copy (engine/model/transformer.py). They stay one value by (a) starting
equal -- broadcast from the first stage -- and (b) summing their gradients over
ParallelState.embedding_group (first + last stage, same tp/dp coordinates) before every optimizer
step, so both copies receive the gradient of the shared parameter and identical updates.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from engine.parallel.state import ParallelState


def tied_embedding_weight(chunks: Sequence[nn.Module], pstate: ParallelState) -> Optional[nn.Parameter]:
    """This rank's copy of the shared embedding, or None if the rank holds neither end (or no tying)."""
    if pstate.pp <= 1 or not chunks or not getattr(chunks[0].cfg, "tie_embeddings", False):
        return None
    if pstate.is_first_stage and getattr(chunks[0], "pre_process", False):
        return chunks[0].embed.weight
    if pstate.is_last_stage and getattr(chunks[-1], "post_process", False) and chunks[-1].head is not None:
        return chunks[-1].head.weight
    return None


@torch.no_grad()
def sync_tied_embeddings(chunks: Sequence[nn.Module], pstate: ParallelState) -> None:
    """Make the last stage's head copy equal to the first stage's embedding (call after init or load)."""
    w = tied_embedding_weight(chunks, pstate)
    if w is None:
        return
    src = pstate.global_rank(pstate.tp_rank, pstate.dp_rank, 0)
    dist.broadcast(w.data, src=src, group=pstate.embedding_group)
    if not pstate.is_first_stage:
        # Grad-norm code must count the shared weight once: skip parameters carrying this flag.
        w.shared_embedding_copy = True


@torch.no_grad()
def allreduce_tied_embedding_grads(chunks: Sequence[nn.Module], pstate: ParallelState) -> None:
    """Sum the two copies' gradients (after the pipeline step, before the data-parallel reduction).

    Must run on the local gradients, before DP reduce(-scatter)s them: the two copies sit in different
    grad buffers, so their ZeRO-1 shards do not line up afterwards.
    """
    w = tied_embedding_weight(chunks, pstate)
    if w is None:
        return
    main = getattr(w, "main_grad", None)  # DataParallel moves .grad into its buffer during backward
    if main is not None:
        if w.grad is not None:
            main.add_(w.grad)
            w.grad = None
        dist.all_reduce(main, group=pstate.embedding_group)
        return
    if w.grad is None:
        w.grad = torch.zeros_like(w)
    dist.all_reduce(w.grad, group=pstate.embedding_group)
