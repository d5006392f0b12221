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


# --------------------------------------------------------------------------- masked-LM + next-sentence

# The per-micro-batch statistics vector of `pretraining_loss` (fp64, detached), summed over micro-batches and
# data-parallel ranks by the trainer: index -> meaning.
PRETRAIN_STATS = ("mlm_loss", "mlm_correct", "mlm_count", "nsp_loss", "nsp_correct", "nsp_count", "micro_batches")


@torch.no_grad()
def _masked_correct(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int,
                    pstate: Optional[ParallelState]) -> torch.Tensor:
    """Count of positions whose target is the argmax over the REAL vocabulary (targets != IGNORE_INDEX).

    logits [N, V_local] (this rank's vocabulary columns at tp > 1). At tp > 1 only [N] vectors cross ranks:
    the global max and the target's logit; a tie with the max counts as correct (measure zero in practice)."""
    z = logits.float()
    n, v_local = z.shape
    tp = pstate.tp if pstate is not None else 1
    start = pstate.tp_rank * v_local if tp > 1 else 0
    if vocab_size < start + v_local:  # padded columns never win
        z = z.clone()
        z[:, max(vocab_size - start, 0):] = float("-inf")
    zmax = z.max(dim=-1).values  # [N]
    valid = targets != IGNORE_INDEX
    local_t = targets - start
    mine = (local_t >= 0) & (local_t < v_local) & valid
    target_logit = torch.where(mine, z.gather(1, local_t.clamp(0, v_local - 1).unsqueeze(1)).squeeze(1),
                               torch.zeros_like(zmax))
    if tp > 1:
        import torch.distributed as dist

        dist.all_reduce(zmax, op=dist.ReduceOp.MAX, group=pstate.tp_group)
        dist.all_reduce(target_logit, group=pstate.tp_group)  # one rank holds each target's column
    return ((target_logit >= zmax) & valid).sum()


def pretraining_loss(outputs: tuple[torch.Tensor, Optional[torch.Tensor]], batch: dict[str, torch.Tensor],
                     vocab_size: int, nsp_weight: float = 1.0, fused: bool = False,
                     pstate: Optional[ParallelState] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT pretraining loss of one micro-batch: masked-LM over the chosen positions (+ nsp_weight x NSP).

    outputs: the encoder's (mlm_logits [B, S, V_padded(/tp)], nsp_logits [B, 2] or None). batch["targets"]
    [B, S] holds the original token at the chosen positions and IGNORE_INDEX elsewhere, so the masked-LM mean
    runs over the chosen positions only; batch["nsp_label"] [B] (0 = the true next segment, 1 = random) is
    read when nsp_logits is given. Returns (loss, stats): stats is the fp64 vector named by PRETRAIN_STATS.
    """
    mlm_logits, nsp_logits = outputs
    targets = batch["targets"].reshape(-1)
    # Only the chosen rows (~15%) enter the cross entropy and the accuracy: its fp32 softmax and the accuracy's
    # fp32 copy cover [K, V] instead of [B*S, V]. The targets are equal on every tp rank, so are the rows.
    chosen = (targets != IGNORE_INDEX).nonzero().squeeze(1)  # [K]
    logits = mlm_logits.reshape(-1, mlm_logits.shape[-1]).index_select(0, chosen)  # [K, V_padded(/tp)]
    targets = targets.index_select(0, chosen)
    mlm = lm_loss(logits.unsqueeze(0), targets.unsqueeze(0), vocab_size, fused=fused, pstate=pstate)
    correct = _masked_correct(logits, targets, vocab_size, pstate)
    count = torch.tensor(chosen.numel(), device=mlm.device)
    loss = mlm
    nsp_stats = [torch.zeros((), device=mlm.device)] * 3
    if nsp_logits is not None:
        labels = batch["nsp_label"].reshape(-1)
        nsp = torch.nn.functional.cross_entropy(nsp_logits.float(), labels)
        loss = mlm + nsp_weight * nsp
        nsp_stats = [nsp.detach(), (nsp_logits.detach().argmax(-1) == labels).sum(),
                     torch.tensor(labels.numel(), device=mlm.device)]
    stats = torch.stack([x.double() for x in (mlm.detach(), correct, count, *nsp_stats)]
                        + [torch.ones((), dtype=torch.float64, device=mlm.device)])
    return loss, stats


def pretraining_metrics(stats: torch.Tensor) -> dict[str, float]:
    """Summed PRETRAIN_STATS (over micro-batches and data-parallel ranks) -> mlm_loss, mlm_acc, and with
    next-sentence prediction nsp_loss, nsp_acc: losses are means over micro-batches (as `loss`), accuracies
    are over every chosen position / every sample of the global batch."""
    s = dict(zip(PRETRAIN_STATS, stats.tolist()))
    micro = max(s["micro_batches"], 1.0)
    out = {"mlm_loss": s["mlm_loss"] / micro, "mlm_acc": s["mlm_correct"] / max(s["mlm_count"], 1.0)}
    if s["nsp_count"] > 0:
        out.update(nsp_loss=s["nsp_loss"] / micro, nsp_acc=s["nsp_correct"] / s["nsp_count"])
    return out
