"""Language-model loss over (possibly padded) logits."""

from __future__ import annotations

from typing import Optional

import torch

from engine.model import ops

IGNORE_INDEX = -100


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int,
            loss_mask: Optional[torch.Tensor] = None, fused: bool = False) -> torch.Tensor:
    """Mean next-token cross entropy (fp32).

    logits [B, S, V_padded]: entries >= vocab_size are padding and never enter the softmax.
    targets [B, S] (IGNORE_INDEX positions are skipped); loss_mask [B, S] optional 0/1 weights.
    """
    logits = logits[..., :vocab_size]
    per_token = ops.cross_entropy(logits.reshape(-1, vocab_size), targets.reshape(-1), IGNORE_INDEX, fused=fused)
    valid = (targets.reshape(-1) != IGNORE_INDEX).float()
    if loss_mask is not None:
        valid = valid * loss_mask.reshape(-1).float()
    return (per_token * valid).sum() / valid.sum().clamp_min(1.0)
