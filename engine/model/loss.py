"""Language-model loss over (possibly padded) logits."""

from __future__ import annotations

from typing import Optional

import torch

from engine.model import ops
from engine.parallel.state import ParallelState
from engine.parallel.tensor_parallel import vocab_parallel_cross_entropy

IGNORE_INDEX = -100


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int,
            loss_mask: Optional[torch.Tensor] = None, fused: bool = False,
            pstate: Optional[ParallelState] = None) -> torch.Tensor:
    """Mean next-token cross entropy (fp32).

    logits [B, S, V_padded] (or [B, S, V_padded/tp], this rank's vocabulary columns, when `pstate.tp` > 1:
    the vocab-parallel cross entropy never gathers them): entries >= vocab_size are padding and never
    enter the softmax. targets [B, S] (IGNORE_INDEX positions are skipped); loss_mask [B, S] optional 0/1
    weights.
    """
    if pstate is not None and pstate.tp > 1:
        per_token = vocab_parallel_cross_entropy(logits, targets, pstate, vocab_size, IGNORE_INDEX).reshape(-1)
    else:
        logits = logits[..., :vocab_size]
        per_token = ops.cross_entropy(logits.reshape(-1, vocab_size), targets.reshape(-1), IGNORE_INDEX,
                                      fused=fused)
    valid = (targets.reshape(-1) != IGNORE_INDEX).float()
    if loss_mask is not None:
        valid = valid * loss_mask.reshape(-1).float()
    return (per_token * valid).sum() / valid.sum().clamp_min(1.0)
