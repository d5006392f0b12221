"""Forward/backward over the micro-batches of one optimizer step (single pipeline stage).

The pipeline schedules in engine/parallel/pipeline/ provide the same contract for pp > 1:
take the model chunks and the micro-batches, run forward and backward with the loss scaled by
`loss_scale / n_micro`, and return the unscaled per-micro-batch losses.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Optional, Sequence

import torch

from engine.model.loss import lm_loss
from engine.parallel.data_parallel import DataParallel
from engine.parallel.grad_sync import sync_tp_grads
from engine.parallel.pipeline.tied import allreduce_tied_embedding_grad
from engine.parallel.sharding import ShardSpec
from engine.parallel.state import ParallelState


# Per-sample features that travel with a micro-batch to the model and the loss, beside inputs and targets.
FEATURES = ("position_ids", "doc_ids", "loss_mask", "token_types", "nsp_label")


def split_batch(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """{"tokens": [B, S+1], ...} -> inputs [B, S], targets [B, S] and the optional masking features.
    A masked-LM batch already holds "inputs" and "targets" [B, S] (the targets are not a shift of the inputs)."""
    if "inputs" in batch:
        out = {k: batch[k].to(device, non_blocking=True) for k in ("inputs", "targets")}
    else:
        tokens = batch["tokens"].to(device, non_blocking=True)
        out = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    for key in FEATURES:
        if key in batch:
            out[key] = batch[key].to(device, non_blocking=True)
    return out


LossFn = Callable[[object, dict[str, torch.Tensor]], torch.Tensor]


def micro_batch_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], vocab_size: int,
                     fused: bool = False, pstate: Optional[ParallelState] = None,
                     loss_fn: Optional[LossFn] = None) -> torch.Tensor:
    """loss_fn(model output, batch) -> scalar; None = the next-token loss of the logits."""
    out = model(batch["inputs"], position_ids=batch.get("position_ids"), doc_ids=batch.get("doc_ids"),
                token_types=batch.get("token_types"))
    if loss_fn is not None:
        return loss_fn(out, batch)
    # at tp > 1 the logits are this rank's vocabulary columns: the loss is vocab-parallel
    return lm_loss(out, batch["targets"], vocab_size, batch.get("loss_mask"), fused=fused, pstate=pstate)


def forward_backward(model: torch.nn.Module, batches: Sequence[dict[str, torch.Tensor]], vocab_size: int,
                     autocast: Callable[[], contextlib.AbstractContextManager], loss_scale: float = 1.0,
                     no_sync: Optional[Callable[[], contextlib.AbstractContextManager]] = None,
                     fused: bool = False, pstate: Optional[ParallelState] = None,
                     loss_fn: Optional[LossFn] = None, lap: Optional[Callable[[str], None]] = None) -> list[float]:
    """Gradient accumulation over `batches` (split by `split_batch`, on the device): grads end up as
    d(mean over micro-batches of loss * loss_scale)/dθ.

    `no_sync` (data parallel) suppresses gradient reduction on every micro-batch but the last.
    `lap(phase)` marks the end of each forward and backward (engine/train/timing.py StepTimer.lap).
    Returns the per-micro-batch losses (unscaled floats).
    """
    losses = []
    n_micro = len(batches)
    for i, batch in enumerate(batches):
        sync_ctx = no_sync() if (no_sync is not None and i < n_micro - 1) else contextlib.nullcontext()
        with sync_ctx:
            with autocast():
                loss = micro_batch_loss(model, batch, vocab_size, fused, pstate, loss_fn)
            if lap is not None:
                lap("forward")
            (loss * (loss_scale / n_micro)).backward()
            if lap is not None:
                lap("backward")
        losses.append(loss.detach())
    return [float(x) for x in torch.stack(losses).cpu()]


@torch.no_grad()
def forward_only(model: torch.nn.Module, batches: Sequence[dict[str, torch.Tensor]], vocab_size: int,
                 autocast: Callable[[], contextlib.AbstractContextManager], fused: bool = False,
                 pstate: Optional[ParallelState] = None, loss_fn: Optional[LossFn] = None) -> list[float]:
    losses = []
    for batch in batches:
        with autocast():
            losses.append(micro_batch_loss(model, batch, vocab_size, fused, pstate, loss_fn).detach())
    return [float(x) for x in torch.stack(losses).cpu()]


def complete_grads(chunks: Sequence[torch.nn.Module], specs: dict[str, ShardSpec], pstate: ParallelState,
                   ddp: Optional[object] = None, tied: Optional[torch.nn.Parameter] = None) -> None:
    """After the last backward of a step, in this order: sum the tied embedding copies over the embedding
    group (pp > 1; `tied` = this rank's end), the data-parallel reduction (`ddp.finish_grad_sync`), then
    the tp sums the sharding specs ask for (sequence-parallel and replicated-shard gradients). Gradients
    are the wrapper's main grads, or `param.grad` without a wrapper."""
    grad_of = ddp.main_grad if isinstance(ddp, DataParallel) else (lambda q: q.grad)
    if tied is not None:
        if ddp is None and tied.grad is None:
            tied.grad = torch.zeros_like(tied)  # this stage's copy got no gradient: the sum still needs it
        allreduce_tied_embedding_grad(grad_of(tied), pstate)
    if ddp is not None:
        ddp.finish_grad_sync()
    if pstate.tp > 1 and (ddp is None or isinstance(ddp, DataParallel)):  # FSDP2 runs at tp = 1 only
        sync_tp_grads(((grad_of(q), specs[n]) for c in chunks for n, q in c.named_parameters()), pstate)
