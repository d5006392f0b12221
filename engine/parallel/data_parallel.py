"""Data parallelism without torch DDP: contiguous grad buffers, bucketed reductions overlapped with backward.

    ddp = DataParallel(model_chunks, pstate, bucket_size=2**22, shard_grads=(zero == 1))
    ddp.zero_grad()
    for i, mb in enumerate(micro_batches):          # gradient accumulation
        with ddp.no_sync(enabled=i < len(micro_batches) - 1):
            (loss_fn(model(mb)) / len(micro_batches)).backward()
    ddp.finish_grad_sync()                           # grads: mean over the global batch, in p.main_grad

Gradients land in `param.main_grad` (views of the buffers); `param.grad` is set back to None by the hook,
so autograd never holds a second copy. The reduction is the MEAN over dp ranks; the caller divides each
micro-batch loss by the number of micro-batches, so the result is the gradient of the global-batch mean
(when every micro-batch has the same number of loss terms).

Pipeline parallel: the pipeline executor runs the whole schedule under `no_sync()`, sums the tied
embedding copies' `main_grad` over the embedding group (engine/parallel/pipeline/tied.py), and then the
loop calls `finish_grad_sync()`. Anything that edits `main_grad` across ranks (tied embeddings,
sequence-parallel tp sums) must run either inside `no_sync` before `finish_grad_sync`, or after it.

Why buckets are launched strictly in order: gloo/NCCL match collectives on a group by issue order, and
which bucket fills first can differ between ranks (a parameter unused on one rank). Launching bucket i
only after buckets 0..i-1 keeps every rank's sequence identical; `finish_grad_sync` launches whatever is
still missing (parameters that got no gradient this step reduce as zeros).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch import nn

from engine.parallel.grad_buffer import Bucket, GradBuffer, launch_reduce, wait_reduce
from engine.optim.adamw import param_groups
from engine.parallel.state import ParallelState

__all__ = ["DataParallel", "wrap_data_parallel"]


class DataParallel:
    """Owns the grad buffers and reduction hooks of one or more model chunks (pipeline vpp chunks).

    Not an nn.Module: the chunks keep their own names and state_dict keys; `ddp(x)` calls the only chunk.
    `shard_grads=True` reduce-scatters buckets (ZeRO-1): after `finish_grad_sync` only this rank's shard
    of each bucket holds the reduced gradient (see `DistributedOptimizer`).
    """

    def __init__(self, modules: Union[nn.Module, Sequence[nn.Module]], state: ParallelState, *,
                 bucket_size: int = 2 ** 22, overlap: bool = True, shard_grads: bool = False) -> None:
        self.modules: list[nn.Module] = [modules] if isinstance(modules, nn.Module) else list(modules)
        self.state = state
        self.dp, self.dp_rank = state.dp, state.dp_rank
        self.group = state.dp_group
        self.overlap = overlap
        self.shard_grads = shard_grads
        self.sync_enabled = True

        # Unique trainable params (tied/shared ones once), model order; buffers use the reverse order.
        self.params: list[nn.Parameter] = []
        seen: set[int] = set()
        for m in self.modules:
            for p in m.parameters():
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    self.params.append(p)
        by_dtype: dict[torch.dtype, list[nn.Parameter]] = {}
        for p in reversed(self.params):
            by_dtype.setdefault(p.dtype, []).append(p)
        self.buffers: list[GradBuffer] = [GradBuffer(ps, bucket_size, self.dp, with_param_buffer=shard_grads)
                                          for ps in by_dtype.values()]
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
        """Launch the buckets not yet launched (in order) and wait for all of them."""
        for b in self.buckets:
            b.pending.clear()
        self._launch_ready()
        for b in self.buckets:
            wait_reduce(b, self.dp, self.dp_rank)
            b.reset()
        self._next_launch = 0

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
        param.main_grad.add_(param.grad)
        param.grad = None
        if self.sync_enabled and self.overlap :
            bucket = self.buckets[self._bucket_of[id(param)]]
            bucket.pending.discard(id(param))
            if not bucket.pending:
                self._launch_ready()

    def _launch_ready(self) -> None:
        while self._next_launch < len(self.buckets) and not self.buckets[self._next_launch].pending:
            launch_reduce(self.buckets[self._next_launch], self.group, self.dp, self.shard_grads)
            self._next_launch += 1


def _named(chunks: Sequence[nn.Module]) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for c in chunks for n, p in c.named_parameters()]


def wrap_data_parallel(model_chunks: Union[nn.Module, Sequence[nn.Module]], optimizer_param_groups: Optional[list],
                       cfg: Any, state: ParallelState, *, bucket_size: int = 2 ** 22,
                       overlap: bool = True) -> tuple[Any, Any]:
    """Set up data parallelism and the optimizer from the config; returns `(ddp, optimizer)`.

    cfg.parallel.zero: 0 -> all-reduce + replicated AdamW, 1 -> reduce-scatter + ZeRO-1 `DistributedOptimizer`,
    3 -> torch FSDP2 (`fully_shard`) with the same per-step interface (`engine.parallel.fsdp.FSDPWrapper`).
    `optimizer_param_groups` None = `engine.optim.param_groups` over the chunks' parameters.
    """
    from engine.parallel.distributed_optimizer import DistributedOptimizer

    zero = cfg.parallel.zero
    chunks = [model_chunks] if isinstance(model_chunks, nn.Module) else list(model_chunks)
    o = cfg.optim
    adam = dict(lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    if zero == 3:
        from engine.parallel.fsdp import FSDPWrapper

        ddp = FSDPWrapper(chunks, state)
        groups = optimizer_param_groups or param_groups(_named(chunks), o.weight_decay)
        return ddp, ddp.make_optimizer(groups, **adam)
    if zero not in (0, 1):
        raise ValueError(f"parallel.zero must be 0, 1 or 3, found {zero!r}")
    groups = optimizer_param_groups or param_groups(_named(chunks), o.weight_decay)
    ddp = DataParallel(chunks, state, bucket_size=bucket_size, overlap=overlap, shard_grads=(zero == 1))
    return ddp, DistributedOptimizer(ddp, groups, **adam)
