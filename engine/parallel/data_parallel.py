"""Data parallelism without torch DDP: contiguous grad buffers, bucketed reductions overlapped with backward.

    ddp = DataParallel(model_chunks, pstate, bucket_size=2**22, shard_grads=(zero == 1))
    ddp.zero_grad()
    for i, mb in enumerate(micro_batches):          # gradient accumulation
        with ddp.no_sync(enabled=i < len(micro_batches) - 1):
            (loss_fn(model(mb)) / len(micro_batches)).backward()
    ddp.finish_grad_sync()                           # grads: mean over the global batch, in ddp.main_grad(p)
    ...optimizer step on ddp.segments()...
    ddp.sync_params()                                # ZeRO-1: all-gather the updated shards

Gradients land in the buffers (`ddp.main_grad(param)` is a view); `param.grad` is set back to None by the
hook, so autograd never holds a second copy. The reduction is the MEAN over dp ranks; the caller divides
each micro-batch loss by the number of micro-batches, so the result is the gradient of the global-batch
mean (when every micro-batch has the same number of loss terms). At dp=1 nothing is communicated: the
buffers only give one process the same gradient storage and optimizer path as many.

Pipeline parallel: the pipeline executor runs the whole schedule under `no_sync()`, the caller sums the tied
embedding copies' main grads over the embedding group (engine/parallel/pipeline/tied.py), and then calls
`finish_grad_sync()`. Anything that edits main grads across ranks (tied embeddings, tp sums) must run either
inside `no_sync` before `finish_grad_sync`, or after it.

Why buckets are launched strictly in order: gloo/NCCL match collectives on a group by issue order, and
which bucket fills first can differ between ranks (a parameter unused on one rank). Launching bucket i
only after buckets 0..i-1 keeps every rank's sequence identical; `finish_grad_sync` launches whatever is
still missing (parameters that got no gradient this step reduce as zeros).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence, Union

import torch
import torch.distributed as dist
from torch import nn

from engine.parallel.collectives import all_gather_flat
from engine.parallel.grad_buffer import Bucket, GradBuffer, launch_reduce, wait_reduce
from engine.parallel.state import ParallelState

__all__ = ["DataParallel", "Segment"]


@dataclass(eq=False)
class Segment:
    """A contiguous run of one parameter's elements that this rank updates in the optimizer step, with the
    tensor holding the reduced gradient of exactly those elements.

    `param` holds the elements ([lo, hi) of param.view(-1)); `offset` is the flat index of param's first
    element in the tp-local parameter (0 here; an FSDP2 row shard starts further in)."""

    name: str
    param: torch.Tensor
    lo: int
    hi: int
    grad: Union[torch.Tensor, Callable[[], torch.Tensor]]  # (hi - lo,), or a function returning it at step time
    offset: int = 0

    def current_grad(self) -> torch.Tensor:
        return self.grad() if callable(self.grad) else self.grad


class DataParallel:
    """Owns the grad buffers and reduction hooks of one or more model chunks (pipeline vpp chunks).

    Not an nn.Module: the chunks keep their own names and state_dict keys; `ddp(x)` calls the only chunk.
    `shard_grads=True` reduce-scatters buckets (ZeRO-1): after `finish_grad_sync` only this rank's shard
    of each bucket holds the reduced gradient, and `segments()` lists just that shard.
    """

    def __init__(self, modules: Union[nn.Module, Sequence[nn.Module]], pstate: ParallelState, *,
                 bucket_size: int = 2 ** 22, overlap: bool = True, shard_grads: bool = False) -> None:
        self.modules: list[nn.Module] = [modules] if isinstance(modules, nn.Module) else list(modules)
        self.pstate = pstate
        self.dp, self.dp_rank = pstate.dp, pstate.dp_rank
        self.group = pstate.dp_group
        self.overlap = overlap
        self.shard_grads = shard_grads
        self.sync_enabled = True

        # Unique trainable params (tied/shared ones once), model order; buffers use the reverse order.
        self.params: list[nn.Parameter] = []
        self.names: dict[int, str] = {}  # id(param) -> its name in its chunk
        for m in self.modules:
            for name, p in m.named_parameters():
                if p.requires_grad and id(p) not in self.names:
                    self.names[id(p)] = name
                    self.params.append(p)
        by_dtype: dict[torch.dtype, list[nn.Parameter]] = {}
        for p in reversed(self.params):
            by_dtype.setdefault(p.dtype, []).append(p)
        self.buffers: list[GradBuffer] = [GradBuffer(ps, bucket_size, self.dp, with_param_buffer=shard_grads)
                                          for ps in by_dtype.values()]
        self._buffer_of: dict[int, GradBuffer] = {id(p): buf for buf in self.buffers for p in buf_params(buf)}
        # One global launch order over all buckets of all buffers (see module docstring).
        self.buckets: list[Bucket] = [b for buf in self.buffers for b in buf.buckets]
        self._bucket_of: dict[int, int] = {id(p): i for i, b in enumerate(self.buckets) for p in b.params}
        self._next_launch = 0
        self._handles = [p.register_post_accumulate_grad_hook(self._on_grad) for p in self.params]

    # ------------------------------------------------------------ per step API
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if len(self.modules) != 1:
            raise RuntimeError("DataParallel over several chunks: call the chunks (ddp.modules[i]) directly")
        return self.modules[0](*args, **kwargs)

    def main_grad(self, param: torch.Tensor) -> torch.Tensor:
        """The buffer view holding `param`'s gradient (fp32 for low-precision parameters)."""
        return self._buffer_of[id(param)].views[id(param)]

    @contextlib.contextmanager
    def no_sync(self, enabled: bool = True) -> Iterator[None]:
        """Inside: gradients only accumulate locally (non-final micro-batches). `enabled=False` is a no-op."""
        old = self.sync_enabled
        self.sync_enabled = old and not enabled
        try:
            yield
        finally:
            self.sync_enabled = old

    def set_is_last_microbatch(self, is_last: bool) -> None:
        """Flag form of `no_sync` for schedules that cannot use a context manager."""
        self.sync_enabled = is_last

    def zero_grad(self) -> None:
        """Zero every main grad and reset the bucket state; call before the first micro-batch of a step."""
        for buf in self.buffers:
            buf.grad.zero_()
        for p in self.params:
            p.grad = None
        for b in self.buckets:
            b.reset()
        self._next_launch = 0
        self.sync_enabled = True

    def finish_grad_sync(self) -> None:
        """Fold any gradient autograd left in `param.grad` (a parameter whose hook did not run), launch the
        buckets not yet launched (in order) and wait for all of them."""
        for p in self.params:
            if p.grad is not None:
                self.main_grad(p).add_(p.grad)
                p.grad = None
        for b in self.buckets:
            b.pending.clear()
        self._launch_ready()
        for b in self.buckets:
            wait_reduce(b, self.dp, self.dp_rank)
            b.reset()
        self._next_launch = 0

    def segments(self) -> list[Segment]:
        """What this rank updates: whole parameters (ZeRO-0), or its 1/dp of every bucket (ZeRO-1)."""
        out = []
        for buf in self.buffers:
            for b in buf.buckets:
                own_lo, own_hi = b.shard_range(self.dp_rank, self.dp) if self.shard_grads else (b.start, b.end)
                for p in b.params:
                    p_start, p_end = buf.ranges[id(p)]
                    lo, hi = max(p_start, own_lo), min(p_end, own_hi)
                    if lo < hi:
                        out.append(Segment(self.names[id(p)], p, lo - p_start, hi - p_start, buf.grad[lo:hi]))
        return out

    @torch.no_grad()
    def sync_params(self) -> None:
        """After the optimizer step: ZeRO-1 all-gathers every bucket's updated shard so all dp ranks hold
        the full parameters again (into the flat parameter buffers the parameters are views of)."""
        if not self.shard_grads or self.dp == 1:
            return
        works = []
        for buf in self.buffers:
            for b in buf.buckets:
                lo, hi = b.shard_range(self.dp_rank, self.dp)
                # A copy of the shard as input: gloo gives no guarantee when input aliases output.
                works.append(all_gather_flat(buf.param[b.start:b.end], buf.param[lo:hi].clone(), self.group,
                                             async_op=True))
        for w in works:
            w.wait()

    def broadcast_params(self) -> None:
        """Copy dp rank 0's weights to the other dp ranks (models initialised with different seeds)."""
        if self.dp == 1:
            return
        src = dist.get_global_rank(self.group, 0)
        with torch.no_grad():
            for p in self.params:
                dist.broadcast(p.data, src=src, group=self.group)

    def remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    # ------------------------------------------------------------ internals
    def _on_grad(self, param: torch.Tensor) -> None:
        # Runs right after autograd accumulated into param.grad: move it into the buffer (fp32 for bf16).
        if param.grad is None:
            return
        self.main_grad(param).add_(param.grad)
        param.grad = None
        if self.sync_enabled and self.overlap:
            bucket = self.buckets[self._bucket_of[id(param)]]
            bucket.pending.discard(id(param))
            if not bucket.pending:
                self._launch_ready()

    def _launch_ready(self) -> None:
        while self._next_launch < len(self.buckets) and not self.buckets[self._next_launch].pending:
            launch_reduce(self.buckets[self._next_launch], self.group, self.dp, self.shard_grads)
            self._next_launch += 1


def buf_params(buf: GradBuffer) -> list[nn.Parameter]:
    return [p for b in buf.buckets for p in b.params]
