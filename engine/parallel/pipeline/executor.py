"""Run a schedule's action list on this rank's model chunks: the pp > 1 version of
engine.train.step.forward_backward.

Contract (same as the single-stage step): gradients end up as
d(mean over micro-batches of loss * loss_scale)/dθ on every stage's parameters, and the
unscaled per-micro-batch losses are returned on every pipeline rank (computed on the last
stage, broadcast over the pp group).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Optional, Sequence, Union

import torch
import torch.distributed as dist
import torch.nn as nn

from engine.model.loss import lm_loss
from engine.parallel.pipeline.p2p import StageP2P, activation_shape
from engine.parallel.pipeline.schedules import Schedule, ScheduleError, build_schedule
from engine.parallel.pipeline.tied import allreduce_tied_embedding_grads
from engine.parallel.pipeline.weight_grad import WeightGradStore, defer_weight_grads
from engine.parallel.state import ParallelState
from engine.train.step import split_batch


def _nullctx() -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


def _default_loss_fn(vocab_size: int, fused: bool, pstate: ParallelState
                     ) -> Callable[[torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]:
    """lm_loss on the last stage (vocab-parallel at tp > 1), with the batch made by step.split_batch."""
    def loss_fn(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return lm_loss(logits, batch["targets"], vocab_size, batch.get("loss_mask"), fused=fused, pstate=pstate)
    return loss_fn


def prepare_zero_bubble(chunks: Sequence[nn.Module]) -> WeightGradStore:
    """The store that holds deferred weight gradients between B and W (one per set of chunks, reused)."""
    store = getattr(chunks[0], "_pp_wgrad_store", None)
    if store is None:
        store = WeightGradStore()
        chunks[0]._pp_wgrad_store = store
    return store


def forward_backward_pipeline(
    chunks: Sequence[nn.Module],
    micro_batches: Iterable[dict[str, torch.Tensor]],
    n_micro: int,
    pstate: ParallelState,
    *,
    schedule: Union[str, Schedule],
    seq_len: int,
    micro_batch_size: int,
    d_model: int,
    vocab_size: int,
    device: Optional[torch.device] = None,
    autocast: Callable[[], contextlib.AbstractContextManager] = _nullctx,
    loss_scale: float = 1.0,
    comm_dtype: torch.dtype = torch.float32,
    fused: bool = False,
    sync_tied: bool = True,
    ddp: Optional[object] = None,
    loss_fn: Optional[Callable[[torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]] = None,
) -> list[float]:
    """Forward and backward of `n_micro` micro-batches over the pipeline, following `schedule`.

    chunks: this rank's model chunks, chunk c = virtual stage c*pp + pp_rank.
    micro_batches: dicts with "tokens" [B, S+1] (+ optional position_ids/doc_ids/loss_mask); every pp rank
      passes the same stream (first and last stage use tokens; all use position/doc ids).
    The boundary tensors are [micro_batch_size, seq_len (/tp if sequence parallel), d_model] in comm_dtype.
    sync_tied: all-reduce tied-embedding gradients over the embedding group at the end.
    ddp: the DataParallel wrapper of these chunks, if any. Its reductions are held back for the whole
      schedule (a chunk's gradients are complete only after its last B/W, and tied embeddings must be
      summed first); call ddp.finish_grad_sync() after this returns, as for pp=1.
    loss_fn(logits, batch) -> scalar loss on the last stage; default engine.model.loss.lm_loss with
      batch["targets"] and the optional batch["loss_mask"] (batch as made by engine.train.step.split_batch).
    """
    device = device or pstate.device
    pp, r, vpp = pstate.pp, pstate.pp_rank, len(chunks)
    if pp == 1 and vpp > 1:
        raise ValueError("pipeline executor: several chunks need pp > 1 (with pp=1 use one model chunk)")
    sched = schedule if isinstance(schedule, Schedule) else build_schedule(schedule, pp, n_micro, vpp=vpp)
    if sched.pp != pp or sched.vpp != vpp or sched.num_micro != n_micro:
        raise ScheduleError(f"schedule is for pp={sched.pp}, vpp={sched.vpp}, m={sched.num_micro}; this run has "
                            f"pp={pp}, {vpp} chunks, {n_micro} micro-batches")
    store = prepare_zero_bubble(chunks) if sched.split_backward else None
    shape = activation_shape(micro_batch_size, seq_len, d_model, pstate.tp, pstate.sequence_parallel)
    comm = StageP2P(pstate, vpp, n_micro, shape, comm_dtype, device)

    # Same data stream on every pp rank; token ids are tiny, so take all micro-batches up front.
    it = iter(micro_batches)
    batches = [split_batch(next(it), device) for _ in range(n_micro)]
    losses: dict[int, torch.Tensor] = {}
    loss_fn = loss_fn or _default_loss_fn(vocab_size, fused, pstate)

    with ddp.no_sync() if ddp is not None else contextlib.nullcontext():
        _run_actions(sched, chunks, comm, store, batches, losses, r, loss_scale / n_micro, loss_fn, autocast)
    comm.wait_sends()

    if sync_tied:
        allreduce_tied_embedding_grads(chunks, pstate)
    return _broadcast_losses(losses, n_micro, pstate, device)


def _run_actions(sched: Schedule, chunks: Sequence[nn.Module], comm: StageP2P, store: Optional[WeightGradStore],
                 batches: list[dict[str, torch.Tensor]], losses: dict[int, torch.Tensor], r: int, scale: float,
                 loss_fn: Callable[[torch.Tensor, dict[str, torch.Tensor]], torch.Tensor],
                 autocast: Callable[[], contextlib.AbstractContextManager]) -> None:
    """This rank's action list: F receives/computes/sends, B receives a gradient/backprops/sends, W flushes."""
    last_stage = sched.num_stages - 1
    saved: dict[tuple[int, int], tuple[Optional[torch.Tensor], torch.Tensor]] = {}  # (mb, chunk) -> (input, output)
    for a in sched.actions[r]:
        s = sched.stage(r, a.chunk)
        key = (a.mb, a.chunk)
        batch = batches[a.mb]
        if a.kind == "F":
            if s == 0:
                x = batch["inputs"]  # [B, S] token ids
            else:
                x = comm.recv_forward(a.mb, a.chunk).requires_grad_(True)  # [B, S, D]
            defer = defer_weight_grads(store) if store is not None else contextlib.nullcontext()
            with autocast(), defer:
                out = chunks[a.chunk](x, position_ids=batch.get("position_ids"), doc_ids=batch.get("doc_ids"))
                if s == last_stage:
                    loss = loss_fn(out, batch)
            if s == last_stage:
                losses[a.mb] = loss.detach()
                out = loss * scale
            else:
                comm.send_forward(out, a.mb, a.chunk)
            saved[key] = (x if s > 0 else None, out)
        elif a.kind == "B":
            x, out = saved.pop(key)
            grad = None if s == last_stage else comm.recv_backward(a.mb, a.chunk).to(out.dtype)
            ctx = store.capture(key) if store is not None else contextlib.nullcontext()
            with ctx:
                torch.autograd.backward(out, grad)
            if s > 0:
                gx = x.grad if x.grad is not None else torch.zeros_like(x)  # stage output ignores its input
                comm.send_backward(gx, a.mb, a.chunk)
        else:  # W: the deferred weight gradients of this (micro-batch, chunk)
            assert store is not None
            store.flush(key)


@torch.no_grad()
def forward_only_pipeline(
    chunks: Sequence[nn.Module],
    micro_batches: Iterable[dict[str, torch.Tensor]],
    n_micro: int,
    pstate: ParallelState,
    *,
    seq_len: int,
    micro_batch_size: int,
    d_model: int,
    vocab_size: int,
    device: Optional[torch.device] = None,
    autocast: Callable[[], contextlib.AbstractContextManager] = _nullctx,
    comm_dtype: torch.dtype = torch.float32,
    fused: bool = False,
    loss_fn: Optional[Callable[[torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]] = None,
) -> list[float]:
    """Evaluation: forwards only (micro-batch by micro-batch, each through this rank's chunks in stage
    order), per-micro-batch losses returned on every pp rank. The pp > 1 version of step.forward_only."""
    device = device or pstate.device
    pp, r, vpp = pstate.pp, pstate.pp_rank, len(chunks)
    shape = activation_shape(micro_batch_size, seq_len, d_model, pstate.tp, pstate.sequence_parallel)
    comm = StageP2P(pstate, vpp, n_micro, shape, comm_dtype, device)
    loss_fn = loss_fn or _default_loss_fn(vocab_size, fused, pstate)
    last_stage = pp * vpp - 1
    losses: dict[int, torch.Tensor] = {}
    it = iter(micro_batches)
    for mb in range(n_micro):
        batch = split_batch(next(it), device)
        for c in range(vpp):
            s = c * pp + r
            x = batch["inputs"] if s == 0 else comm.recv_forward(mb, c)
            with autocast():
                out = chunks[c](x, position_ids=batch.get("position_ids"), doc_ids=batch.get("doc_ids"))
                if s == last_stage:
                    losses[mb] = loss_fn(out, batch).detach()
            if s != last_stage:
                comm.send_forward(out, mb, c)
    comm.wait_sends()
    return _broadcast_losses(losses, n_micro, pstate, device)


def _broadcast_losses(losses: dict[int, torch.Tensor], n_micro: int, pstate: ParallelState,
                      device: torch.device) -> list[float]:
    """Per-micro-batch losses from the last stage to every rank of the pp group."""
    buf = torch.zeros(n_micro, dtype=torch.float32, device=device)
    if pstate.is_last_stage:
        buf.copy_(torch.stack([losses[i].float() for i in range(n_micro)]))
    if pstate.pp > 1:
        src = pstate.global_rank(pstate.tp_rank, pstate.dp_rank, pstate.pp - 1)
        dist.broadcast(buf, src=src, group=pstate.pp_group)
    return [float(x) for x in buf.cpu()]
