"""Collectives of tensor parallelism: raw (no autograd) and as autograd-aware region functions.

- Raw: `all_reduce`, `all_gather`, `reduce_scatter` along any dim, `split`. Also the ONE compatibility
  shim for the flat collectives torch 2.13 renamed (`all_gather_single` / `reduce_scatter_single`; torch
  2.11 only has `all_gather_into_tensor` / `reduce_scatter_tensor`), which data parallelism uses too.
- Regions (Megatron's names; each pair is the conjugate of the other, forward of one = backward of its
  partner): copy_to / reduce_from / scatter_to / gather_from the tp region, and the sequence-parallel
  scatter / gather / reduce-scatter along the sequence dim (activations are [B, S, D], SEQ_DIM = 1).

Communication timing for benchmarks is a hook on the ParallelState (`pstate.comm_timer`, a CommTimer),
owned by whoever sets it: nothing here keeps module-level state.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist

from engine.parallel.state import ParallelState

SEQ_DIM = 1  # activations are [B, S, D]


# --------------------------------------------------------------------------- renamed flat collectives

def all_gather_flat(out: torch.Tensor, inp: torch.Tensor, group: Any = None, async_op: bool = False) -> Any:
    """Concatenate every rank's `inp` along dim 0 into `out` ([world * n, ...])."""
    fn = getattr(dist, "all_gather_single", None)
    if fn is not None:
        return fn(out, inp, group=group, async_op=async_op)
    with warnings.catch_warnings():  # torch versions between the rename and its removal warn on the old name
        warnings.simplefilter("ignore", FutureWarning)
        return dist.all_gather_into_tensor(out, inp, group=group, async_op=async_op)


def reduce_scatter_flat(out: torch.Tensor, inp: torch.Tensor, group: Any = None, async_op: bool = False) -> Any:
    """Sum `inp` over ranks and keep this rank's 1/world slice of dim 0 in `out`."""
    fn = getattr(dist, "reduce_scatter_single", None)
    if fn is not None:
        return fn(out, inp, group=group, async_op=async_op)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return dist.reduce_scatter_tensor(out, inp, group=group, async_op=async_op)


# --------------------------------------------------------------------------- timing hook (benchmarks)

class CommTimer:
    """Accumulates wall time spent inside tp collectives. A benchmark sets `pstate.comm_timer = CommTimer()`;
    CUDA is synchronised around each collective so the number is honest (which also removes any overlap,
    so use it only for measurements)."""

    def __init__(self) -> None:
        self.seconds = 0.0

    @contextlib.contextmanager
    def time(self, device: torch.device) -> Iterator[None]:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        yield
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        self.seconds += time.perf_counter() - t0


def _timed(timer: Optional[CommTimer], device: torch.device) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext() if timer is None else timer.time(device)


# --------------------------------------------------------------------------- raw collectives (no autograd)

def all_reduce(x: torch.Tensor, group: Any, op: Any = dist.ReduceOp.SUM,
               timer: Optional[CommTimer] = None) -> torch.Tensor:
    x = x.contiguous()
    with _timed(timer, x.device):
        dist.all_reduce(x, op=op, group=group)
    return x


def all_gather(x: torch.Tensor, dim: int, group: Any, world: int, timer: Optional[CommTimer] = None) -> torch.Tensor:
    """Concatenate each rank's x along `dim` in rank order. [.., n, ..] -> [.., world*n, ..]"""
    xt = x.movedim(dim, 0).contiguous()  # gloo gathers along dim 0 of a flat buffer
    out = torch.empty((world * xt.shape[0], *xt.shape[1:]), dtype=xt.dtype, device=xt.device)
    with _timed(timer, x.device):
        all_gather_flat(out, xt, group=group)
    return out.movedim(0, dim).contiguous()


def reduce_scatter(x: torch.Tensor, dim: int, group: Any, world: int,
                   timer: Optional[CommTimer] = None) -> torch.Tensor:
    """Sum over ranks, keep this rank's 1/world slice along `dim`. [.., world*n, ..] -> [.., n, ..]"""
    if x.shape[dim] % world != 0:
        raise ValueError(f"reduce-scatter: dimension {dim} of size {x.shape[dim]} is not divisible by tp={world}")
    xt = x.movedim(dim, 0).contiguous()
    out = torch.empty((xt.shape[0] // world, *xt.shape[1:]), dtype=xt.dtype, device=xt.device)
    with _timed(timer, x.device):
        reduce_scatter_flat(out, xt, group=group)
    return out.movedim(0, dim).contiguous()


def split(x: torch.Tensor, dim: int, rank: int, world: int) -> torch.Tensor:
    if x.shape[dim] % world != 0:
        raise ValueError(f"cannot split dimension {dim} of size {x.shape[dim]} evenly across tp={world}")
    return x.chunk(world, dim=dim)[rank].contiguous()


# --------------------------------------------------------------------------- autograd wrappers


class _CopyToTP(torch.autograd.Function):
    """Identity forward; all-reduce backward (the input feeds rank-specific weights)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, pstate: ParallelState) -> torch.Tensor:
        ctx.group, ctx.timer = pstate.tp_group, pstate.comm_timer
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return all_reduce(g.clone(), ctx.group, timer=ctx.timer), None


class _ReduceFromTP(torch.autograd.Function):
    """All-reduce forward (sum partial outputs); identity backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, pstate: ParallelState) -> torch.Tensor:
        return all_reduce(x.clone(), pstate.tp_group, timer=pstate.comm_timer)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return g, None


class _ScatterAlong(torch.autograd.Function):
    """Keep this rank's slice of `dim` forward (the last dim for tp, SEQ_DIM for sequence parallelism);
    all-gather it backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, pstate: ParallelState, dim: int) -> torch.Tensor:
        ctx.group, ctx.tp, ctx.dim, ctx.timer = pstate.tp_group, pstate.tp, dim, pstate.comm_timer
        return split(x, dim, pstate.tp_rank, pstate.tp)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return all_gather(g, ctx.dim, ctx.group, ctx.tp, ctx.timer), None, None


class _GatherFromTP(torch.autograd.Function):
    """All-gather the last dim forward; keep this rank's slice backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, pstate: ParallelState) -> torch.Tensor:
        ctx.tp, ctx.tp_rank = pstate.tp, pstate.tp_rank
        return all_gather(x, -1, pstate.tp_group, pstate.tp, pstate.comm_timer)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return split(g, -1, ctx.tp_rank, ctx.tp), None


class _GatherFromSP(torch.autograd.Function):
    """All-gather the sequence forward. Backward: the gathered tensor fed rank-specific weights, so its
    gradient is partial per rank -> reduce-scatter (sum and keep own shard); if it fed replicated
    computation instead (`grad_is_partial=False`) just keep own shard."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, pstate: ParallelState, grad_is_partial: bool) -> torch.Tensor:
        ctx.group, ctx.tp, ctx.tp_rank, ctx.partial = pstate.tp_group, pstate.tp, pstate.tp_rank, grad_is_partial
        ctx.timer = pstate.comm_timer
        return all_gather(x, SEQ_DIM, pstate.tp_group, pstate.tp, pstate.comm_timer)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        if ctx.partial:
            return reduce_scatter(g, SEQ_DIM, ctx.group, ctx.tp, ctx.timer), None, None
        return split(g, SEQ_DIM, ctx.tp_rank, ctx.tp), None, None


class _ReduceScatterToSP(torch.autograd.Function):
    """Sum partial outputs and keep own sequence shard forward; all-gather the sequence backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, pstate: ParallelState) -> torch.Tensor:
        ctx.group, ctx.tp, ctx.timer = pstate.tp_group, pstate.tp, pstate.comm_timer
        return reduce_scatter(x, SEQ_DIM, pstate.tp_group, pstate.tp, pstate.comm_timer)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return all_gather(g, SEQ_DIM, ctx.group, ctx.tp, ctx.timer), None


def copy_to_tp_region(x: torch.Tensor, pstate: ParallelState) -> torch.Tensor:
    return x if pstate.tp == 1 else _CopyToTP.apply(x, pstate)


def reduce_from_tp_region(x: torch.Tensor, pstate: ParallelState) -> torch.Tensor:
    return x if pstate.tp == 1 else _ReduceFromTP.apply(x, pstate)


def scatter_to_tp_region(x: torch.Tensor, pstate: ParallelState) -> torch.Tensor:
    return x if pstate.tp == 1 else _ScatterAlong.apply(x, pstate, -1)


def gather_from_tp_region(x: torch.Tensor, pstate: ParallelState) -> torch.Tensor:
    return x if pstate.tp == 1 else _GatherFromTP.apply(x, pstate)


def scatter_to_sequence_parallel_region(x: torch.Tensor, pstate: ParallelState) -> torch.Tensor:
    """[B, S, D] -> [B, S/tp, D] (this rank's contiguous sequence shard)."""
    return x if pstate.tp == 1 else _ScatterAlong.apply(x, pstate, SEQ_DIM)


def gather_from_sequence_parallel_region(x: torch.Tensor, pstate: ParallelState,
                                         grad_is_partial: bool = True) -> torch.Tensor:
    """[B, S/tp, D] -> [B, S, D]."""
    return x if pstate.tp == 1 else _GatherFromSP.apply(x, pstate, grad_is_partial)


def reduce_scatter_to_sequence_parallel_region(x: torch.Tensor, pstate: ParallelState) -> torch.Tensor:
    """Partial sums [B, S, D] -> reduced shard [B, S/tp, D]."""
    return x if pstate.tp == 1 else _ReduceScatterToSP.apply(x, pstate)


def to_tp_region(x: torch.Tensor, pstate: ParallelState, sequence_parallel: bool = False) -> torch.Tensor:
    """Make x the full input of column-parallel layers: identity forward / all-reduce backward, or with
    sequence parallel all-gather [B, S/tp, D] -> [B, S, D] forward / reduce-scatter backward.

    Layers that read the same input (q, k, v; gate, up) call this ONCE and pass `input_in_tp_region=True`,
    so the backward does one collective on the summed gradient instead of one per layer."""
    if pstate.tp == 1:
        return x
    return gather_from_sequence_parallel_region(x, pstate) if sequence_parallel else copy_to_tp_region(x, pstate)


__all__ = ["SEQ_DIM", "CommTimer", "all_gather", "all_gather_flat", "all_reduce", "copy_to_tp_region",
           "gather_from_sequence_parallel_region", "gather_from_tp_region", "reduce_from_tp_region",
           "reduce_scatter", "reduce_scatter_flat", "reduce_scatter_to_sequence_parallel_region",
           "scatter_to_sequence_parallel_region", "scatter_to_tp_region", "split", "to_tp_region"]
