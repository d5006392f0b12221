"""Contiguous gradient buffers, split into buckets that are reduced over the data-parallel group.

Every trainable parameter of one dtype gets a slice of one flat buffer; its "main grad" is a view of that
slice (fp32 for bf16/fp16 parameters, so accumulation over micro-batches happens in fp32), kept in the
buffer's own `views` map (keyed by the parameter object's id), never as an attribute of the parameter. The
buffer is cut into buckets of roughly `bucket_size` elements; a bucket is reduced with ONE collective
(all-reduce, or reduce-scatter for the ZeRO-1 optimizer) as soon as backward has produced all of its
gradients, so communication overlaps with the rest of backward.

Layout of one buffer (N elements; every bucket padded so that dp divides its length):

    | bucket 0: params p_k .. p_j, pad | bucket 1: ... , pad | ...
                 ^ shard of dp rank r = bucket[r*len/dp : (r+1)*len/dp]

Parameters are laid out in reverse registration order because backward produces the gradients of
the last layers first, so the first bucket fills first.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

from engine.parallel.collectives import reduce_scatter_flat

_LOW_PRECISION = (torch.bfloat16, torch.float16)


def main_grad_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """Accumulate and reduce gradients of low-precision parameters in fp32 (Megatron's main grads)."""
    return torch.float32 if param_dtype in _LOW_PRECISION else param_dtype


@dataclass(eq=False)
class Bucket:
    """A contiguous range [start, end) of one buffer, reduced by one collective."""

    buffer: "GradBuffer"
    start: int
    end: int  # (end - start) % dp == 0
    params: list[nn.Parameter]
    pending: set[int] = field(default_factory=set)  # ids of params whose grad has not arrived this step
    work: Any = None  # async handle of the in-flight collective
    scattered: Optional[torch.Tensor] = None  # reduce-scatter output, copied into the shard on wait

    @property
    def numel(self) -> int:
        return self.end - self.start

    def shard_range(self, dp_rank: int, dp: int) -> tuple[int, int]:
        """Buffer range owned by `dp_rank` under ZeRO-1 (the whole bucket when dp == 1)."""
        size = self.numel // dp
        return self.start + dp_rank * size, self.start + (dp_rank + 1) * size

    def reset(self) -> None:
        self.pending = {id(p) for p in self.params}
        self.work = None
        self.scattered = None


class GradBuffer:
    """Flat gradient storage (and, for ZeRO-1, flat parameter storage) for parameters of one dtype.

    `params` must be given in bucket order (reverse of the model's registration order) and be unique.
    With `with_param_buffer`, each `param.data` is moved into a flat buffer of the same layout, so the
    ZeRO-1 optimizer can all-gather updated parameters bucket by bucket into place.
    """

    def __init__(self, params: list[nn.Parameter], bucket_size: int, dp: int, with_param_buffer: bool = False) -> None:
        if not params:
            raise ValueError("GradBuffer needs at least one parameter")
        self.param_dtype = params[0].dtype
        self.grad_dtype = main_grad_dtype(self.param_dtype)
        device = params[0].device
        self.ranges: dict[int, tuple[int, int]] = {}  # id(param) -> [lo, hi) in the buffer
        self.buckets: list[Bucket] = []

        # Assign offsets; close a bucket once it holds >= bucket_size elements (params are never split).
        offset, bucket_start, members = 0, 0, []
        for p in params:
            self.ranges[id(p)] = (offset, offset + p.numel())
            offset += p.numel()
            members.append(p)
            if offset - bucket_start >= bucket_size:
                offset = bucket_start + _round_up(offset - bucket_start, dp)
                self.buckets.append(Bucket(self, bucket_start, offset, members))
                bucket_start, members = offset, []
        if members:
            offset = bucket_start + _round_up(offset - bucket_start, dp)
            self.buckets.append(Bucket(self, bucket_start, offset, members))
        self.numel = offset

        self.grad = torch.zeros(self.numel, dtype=self.grad_dtype, device=device)  # (N,)
        self.param: Optional[torch.Tensor] = None
        if with_param_buffer:
            self.param = torch.zeros(self.numel, dtype=self.param_dtype, device=device)  # (N,)
        self.views: dict[int, torch.Tensor] = {}  # id(param) -> its main grad, a view of self.grad
        for p in params:
            lo, hi = self.ranges[id(p)]
            self.views[id(p)] = self.grad[lo:hi].view(p.shape)
            if self.param is not None:
                self.param[lo:hi].copy_(p.data.reshape(-1))
                p.data = self.param[lo:hi].view(p.shape)
        for b in self.buckets:
            b.reset()


def _round_up(n: int, multiple: int) -> int:
    return (n + multiple - 1) // multiple * multiple


def launch_reduce(bucket: Bucket, group: Any, dp: int, scatter: bool) -> None:
    """Start the async reduction of one bucket: the mean over dp ranks of its gradients.

    The gradient is pre-divided by dp and then summed (gloo has no PREMUL_SUM; dividing first also keeps
    fp16/bf16 sums in range); for power-of-two dp the division is exact.
    """
    grad = bucket.buffer.grad[bucket.start:bucket.end]  # (L,)
    if dp == 1:
        return
    grad.mul_(1.0 / dp)
    if scatter:
        bucket.scattered = torch.empty(bucket.numel // dp, dtype=grad.dtype, device=grad.device)  # (L/dp,)
        # A separate output: gloo gives no guarantee for an output that aliases the input.
        bucket.work = reduce_scatter_flat(bucket.scattered, grad, group, async_op=True)
    else:
        bucket.work = dist.all_reduce(grad, group=group, async_op=True)


def wait_reduce(bucket: Bucket, dp: int, dp_rank: int) -> None:
    """Wait for a bucket's collective; for reduce-scatter copy the reduced shard into the buffer."""
    if bucket.work is not None:
        bucket.work.wait()
    if bucket.scattered is not None:
        lo, hi = bucket.shard_range(dp_rank, dp)
        bucket.buffer.grad[lo:hi].copy_(bucket.scattered)
