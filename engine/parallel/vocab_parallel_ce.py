"""Cross entropy from logits split along the vocabulary across tp, never gathering them.

Only [N]-sized vectors cross ranks (max, sum of exp, target logit); the backward is local. Padded
vocabulary columns (ids >= vocab_size) never enter the softmax.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from engine.parallel.collectives import all_reduce
from engine.parallel.state import ParallelState


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """loss_i = logsumexp_v(z_iv) - z_i,t_i over the FULL vocabulary, from local logits [N, V/tp].

    Only [N]-sized vectors cross ranks (max, sum of exp, target logit); the backward is local:
    d loss_i / d z_iv = softmax_iv - [v == t_i], with the softmax saved from forward.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, pstate: ParallelState, vocab_size: int,
                ignore_index: int) -> torch.Tensor:
        group = pstate.tp_group
        z = logits.float()  # [N, Vl] (copy only if not fp32 already)
        n, v_local = z.shape
        start = pstate.tp_rank * v_local
        if vocab_size < start + v_local:  # padded vocabulary columns on this rank never enter the loss
            z = z.clone()
            z[:, max(vocab_size - start, 0):] = float("-inf")
        zmax = z.max(dim=-1).values  # [N]
        zmax = all_reduce(zmax, group, dist.ReduceOp.MAX)
        z = z - zmax.unsqueeze(-1)

        ignored = targets == ignore_index
        local_t = targets - start
        mine = (local_t >= 0) & (local_t < v_local) & ~ignored
        idx = local_t.clamp(0, v_local - 1)
        target_logit = torch.where(mine, z.gather(1, idx.unsqueeze(1)).squeeze(1), torch.zeros_like(zmax))

        exp = z.exp_()  # [N, Vl], in place: z is a fresh tensor
        sum_exp = exp.sum(dim=-1)
        both = all_reduce(torch.stack([target_logit, sum_exp]), group)  # one collective for two vectors
        target_logit, sum_exp = both[0], both[1]
        loss = (sum_exp.log() - target_logit).masked_fill(ignored, 0.0)

        softmax = exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, idx, mine, ignored)
        ctx.in_dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        softmax, idx, mine, ignored = ctx.saved_tensors
        grad = softmax  # reuse the saved buffer: backward runs once
        rows = torch.arange(grad.shape[0], device=grad.device)
        grad[rows[mine], idx[mine]] -= 1.0
        grad.mul_(g.masked_fill(ignored, 0.0).unsqueeze(-1))
        return grad.to(ctx.in_dtype), None, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, pstate: ParallelState,
                                 vocab_size: Optional[int] = None, ignore_index: int = -100,
                                 reduction: str = "none") -> torch.Tensor:
    """Cross entropy from logits split along the vocabulary across tp, never gathering them.

    logits [..., V_padded/tp] (this rank's columns, any float dtype; computed in fp32), targets [...] with
    ids in [0, vocab_size) or ignore_index. Columns >= `vocab_size` (vocabulary padding) are excluded.
    reduction: "none" -> per-token fp32 loss [...] (0 where ignored), "sum", or "mean" over non-ignored
    tokens (as F.cross_entropy). At tp=1 this is F.cross_entropy on logits[..., :vocab_size].
    """
    if reduction not in ("none", "sum", "mean"):
        raise ValueError(f"reduction: expected 'none', 'sum' or 'mean', found {reduction!r}")
    v_total = logits.shape[-1] * pstate.tp
    vocab_size = v_total if vocab_size is None else vocab_size
    if not 0 < vocab_size <= v_total:
        raise ValueError(f"vocab_size={vocab_size} must be in (0, {v_total}] (tp={pstate.tp} x local vocab "
                         f"{logits.shape[-1]})")
    shape = targets.shape
    if logits.shape[:-1] != shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(shape)} do not match")
    if pstate.tp == 1:
        return F.cross_entropy(logits[..., :vocab_size].float().reshape(-1, vocab_size), targets.reshape(-1),
                               ignore_index=ignore_index, reduction=reduction).reshape(
            shape if reduction == "none" else ())
    loss = _VocabParallelCrossEntropy.apply(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), pstate,
                                            vocab_size, ignore_index).reshape(shape)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / (targets != ignore_index).sum()  # nan when all are ignored, as F.cross_entropy


__all__ = ["vocab_parallel_cross_entropy"]
