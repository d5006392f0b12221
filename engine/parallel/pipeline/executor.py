"""Run a schedule's action list on this rank's model chunks: the pp > 1 version of
engine.train.step.forward_backward.

Contract (same as the single-stage step): gradients end up as
d(mean over micro-batches of loss * loss_scale)/dθ on every stage's parameters, and the
unscaled per-micro-batch losses are returned on every pipeline rank (computed on the last
stage, broadcast over the pp group). The caller gives the micro-batches and the loss function: the
executor knows schedules and stages, not the model or the training loop.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Optional, Sequence, Union

import torch
import torch.distributed as dist
import torch.nn as nn

from engine.parallel.pipeline.p2p import StageP2P, activation_shape
from engine.parallel.pipeline.schedules import Schedule, ScheduleError, build_schedule
from engine.parallel.pipeline.weight_grad import WeightGradStore, defer_weight_grads
from engine.parallel.state import ParallelState

LossFn = Callable[[torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]


def _nullctx() -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


def _no_lap(phase: str) -> None:
    """No step timer."""


def forward_backward_pipeline(
    chunks: Sequence[nn.Module],
    batches: Sequence[dict[str, torch.Tensor]],
    pstate: ParallelState,
    *,
    schedule: Union[str, Schedule],
    loss_fn: LossFn,
    seq_len: int,
    micro_batch_size: int,
    d_model: int,
    device: Optional[torch.device] = None,
    autocast: Callable[[], contextlib.AbstractContextManager] = _nullctx,
    loss_scale: float = 1.0,
    comm_dtype: torch.dtype = torch.float32,
    ddp: Optional[object] = None,
    wgrad_store: Optional[WeightGradStore] = None,
    lap: Optional[Callable[[str], None]] = None,
) -> list[float]:
    """Forward and backward of the micro-batches `batches` over the pipeline, following `schedule`.

    chunks: this rank's model chunks, chunk c = virtual stage c*pp + pp_rank.
    batches: one dict per micro-batch, already on the device: "inputs" [B, S] token ids and whatever
      `loss_fn` and the model read ("targets", optional "position_ids" / "doc_ids" / "loss_mask"); every pp
      rank passes the same micro-batches (first and last stage use the tokens; all use position/doc ids).
    loss_fn(logits, batch) -> scalar loss of one micro-batch on the last stage.
    The boundary tensors are [micro_batch_size, seq_len (/tp if sequence parallel), d_model] in comm_dtype.
    ddp: the data-parallel wrapper of these chunks, if any. Its reductions are held back for the whole
      schedule (a chunk's gradients are complete only after its last B/W, and tied embeddings must be
      summed first); sum the tied copies and call ddp.finish_grad_sync() after this returns, as for pp=1.
    wgrad_store: where zero-bubble schedules keep deferred weight gradients between B and W (a new one
      when None).
    lap(phase): called at the end of each piece of work with "forward", "backward" or "communication" (the
      stage-to-stage receives and sends, waiting for the neighbouring stage included) for a step timer.
    """
    device = device or pstate.device
    n_micro = len(batches)
    pp, r, vpp = pstate.pp, pstate.pp_rank, len(chunks)
    if pp == 1 and vpp > 1:
        raise ValueError("pipeline executor: several chunks need pp > 1 (with pp=1 use one model chunk)")
    sched = schedule if isinstance(schedule, Schedule) else build_schedule(schedule, pp, n_micro, vpp=vpp)
    if sched.pp != pp or sched.vpp != vpp or sched.num_micro != n_micro:
        raise ScheduleError(f"schedule is for pp={sched.pp}, vpp={sched.vpp}, m={sched.num_micro}; this run has "
                            f"pp={pp}, {vpp} chunks, {n_micro} micro-batches")
    store = None
    if sched.split_backward:
        store = wgrad_store if wgrad_store is not None else WeightGradStore()
        store.grad_target = getattr(ddp, "main_grad", None) if ddp is not None else None
    shape = activation_shape(micro_batch_size, seq_len, d_model, pstate.tp, pstate.sequence_parallel)
    comm = StageP2P(pstate, vpp, n_micro, shape, comm_dtype, device)
    losses: dict[int, torch.Tensor] = {}

    with ddp.no_sync() if ddp is not None else contextlib.nullcontext():
        _run_actions(sched, chunks, comm, store, list(batches), losses, r, loss_scale / n_micro, loss_fn, autocast,
                     lap or _no_lap)
    comm.wait_sends()
    return _broadcast_losses(losses, n_micro, pstate, device)


def _run_actions(sched: Schedule, chunks: Sequence[nn.Module], comm: StageP2P, store: Optional[WeightGradStore],
                 batches: list[dict[str, torch.Tensor]], losses: dict[int, torch.Tensor], r: int, scale: float,
                 loss_fn: LossFn,
                 autocast: Callable[[], contextlib.AbstractContextManager],
                 lap: Callable[[str], None]) -> None:
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
                lap("communication")
            defer = defer_weight_grads(store) if store is not None else contextlib.nullcontext()
            with autocast(), defer:
                out = chunks[a.chunk](x, position_ids=batch.get("position_ids"), doc_ids=batch.get("doc_ids"),
                    token_types=batch.get("token_types"))
                if s == last_stage:
                    loss = loss_fn(out, batch)
            lap("forward")
            if s == last_stage:
                losses[a.mb] = loss.detach()
                out = loss * scale
            else:
                comm.send_forward(out, a.mb, a.chunk)
                lap("communication")
            saved[key] = (x if s > 0 else None, out)
        elif a.kind == "B":
            x, out = saved.pop(key)
            grad = None if s == last_stage else comm.recv_backward(a.mb, a.chunk).to(out.dtype)
            if s != last_stage:
                lap("communication")
            ctx = store.capture(key) if store is not None else contextlib.nullcontext()
            with ctx:
                torch.autograd.backward(out, grad)
            lap("backward")
            if s > 0:
                gx = x.grad if x.grad is not None else torch.zeros_like(x)  # stage output ignores its input
                comm.send_backward(gx, a.mb, a.chunk)
                lap("communication")
        else:  # W: the deferred weight gradients of this (micro-batch, chunk)
            assert store is not None
            store.flush(key)
            lap("backward")


@torch.no_grad()
def forward_only_pipeline(
    chunks: Sequence[nn.Module],
    batches: Sequence[dict[str, torch.Tensor]],
    pstate: ParallelState,
    *,
    loss_fn: LossFn,
    seq_len: int,
    micro_batch_size: int,
    d_model: int,
    device: Optional[torch.device] = None,
    autocast: Callable[[], contextlib.AbstractContextManager] = _nullctx,
    comm_dtype: torch.dtype = torch.float32,
) -> list[float]:
    """Evaluation: forwards only (micro-batch by micro-batch, each through this rank's chunks in stage
    order), per-micro-batch losses returned on every pp rank. Batches and loss_fn as for the training step."""
    device = device or pstate.device
    n_micro = len(batches)
    pp, r, vpp = pstate.pp, pstate.pp_rank, len(chunks)
    shape = activation_shape(micro_batch_size, seq_len, d_model, pstate.tp, pstate.sequence_parallel)
    comm = StageP2P(pstate, vpp, n_micro, shape, comm_dtype, device)
    last_stage = pp * vpp - 1
    losses: dict[int, torch.Tensor] = {}
    for mb, batch in enumerate(batches):
        for c in range(vpp):
            s = c * pp + r
            x = batch["inputs"] if s == 0 else comm.recv_forward(mb, c)
            with autocast():
                out = chunks[c](x, position_ids=batch.get("position_ids"), doc_ids=batch.get("doc_ids"),
                    token_types=batch.get("token_types"))
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
