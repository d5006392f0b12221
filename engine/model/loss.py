"""Language-model loss over (possibly padded) logits."""

from __future__ import annotations

from typing import Optional

import torch

from engine.model import ops
from engine.parallel.state import ParallelState
from engine.parallel.vocab_parallel_ce import vocab_parallel_cross_entropy

IGNORE_INDEX = -100


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int,
            loss_mask: Optional[torch.Tensor] = None, fused: bool = False,
            pstate: Optional[ParallelState] = None) -> torch.Tensor:
    """Mean next-token cross entropy (fp32).

    logits [B, S, V_padded] (or [B, S, V_padded/tp], this rank's vocabulary columns, when `pstate.tp` > 1:
    the vocab-parallel cross entropy never gathers them): entries >= vocab_size are padding and never
    enter the softmax. targets [B, S] (IGNORE_INDEX positions are skipped); loss_mask [B, S] optional 0/1
    weights. `fused` uses the Triton cross entropy where it can run (CUDA, or the CPU interpreter), also
    at tp > 1: it streams the logits and keeps only per-row fp32 stats, where the torch vocab-parallel path
    saves an fp32 softmax [B*S, V_padded/tp] for the backward.
    """
    if pstate is not None and pstate.tp > 1:
        per_token = _tp_cross_entropy(logits, targets, vocab_size, fused, pstate)
    else:
        per_token = ops.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), IGNORE_INDEX,
                                      fused=fused, vocab_size=vocab_size)
    valid = (targets.reshape(-1) != IGNORE_INDEX).float()
    if loss_mask is not None:
        valid = valid * loss_mask.reshape(-1).float()
    return (per_token * valid).sum() / valid.sum().clamp_min(1.0)


def _tp_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int, fused: bool,
                      pstate: ParallelState) -> torch.Tensor:
    """Per-token loss [B*S] (0 where ignored) from this rank's vocab shard [B, S, V_padded/tp]."""
    if fused and (k := ops.kernels_for(logits)) is not None:
        v_local = logits.shape[-1]
        return k.cross_entropy(logits, targets, IGNORE_INDEX, reduction="none", process_group=pstate.tp_group,
                               vocab_start=pstate.tp_rank * v_local, vocab_size=vocab_size).reshape(-1)
    return vocab_parallel_cross_entropy(logits, targets, pstate, vocab_size, IGNORE_INDEX).reshape(-1)
