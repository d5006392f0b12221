"""AdamW over the contiguous grad buffers, replicated (ZeRO-0) or sharded over dp ranks (ZeRO-1).

The optimizer works on *segments*: the part of one parameter that lies inside the buffer range this
rank owns. With ZeRO-0 a rank owns every bucket whole, so a segment is a whole parameter; with ZeRO-1 it
owns 1/dp of every bucket (`Bucket.shard_range`), so Adam moments and fp32 master weights exist only for
that 1/dp of the elements. One step:

    finish_grad_sync()       # ZeRO-1: reduce-scatter -> this rank's shard of each bucket holds the mean grad
    step():  AdamW on the segments (torch.optim.AdamW on 1-D fp32 "master" tensors whose .grad are buffer views)
             -> copy masters into low-precision params -> ZeRO-1: all-gather each bucket's params in place

fp32 parameters need no separate master: the segment tensor is a view of the parameter itself.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
import torch
from torch import nn

from engine.optim.clip import clip_coefficient, grad_norm_squared, reduce_norm_squared
from engine.parallel.data_parallel import DataParallel
from engine.parallel.grad_buffer import GradBuffer, all_gather_into_tensor

__all__ = ["DistributedOptimizer"]

_FORMAT = "tessera.distributed_optimizer.v1"


@dataclass(eq=False)
class _Segment:
    param: nn.Parameter
    buffer: GradBuffer
    lo: int  # [lo, hi) in buffer elements
    hi: int
    p_lo: int  # the same range in param.view(-1)
    group: int
    master: nn.Parameter  # (hi - lo,) fp32; a view of the parameter when it is fp32 already

    @property
    def grad(self) -> torch.Tensor:
        return self.buffer.grad[self.lo:self.hi]

    @property
    def param_view(self) -> torch.Tensor:
        return self.param.data.view(-1)[self.p_lo:self.p_lo + self.hi - self.lo]

    @property
    def has_copy(self) -> bool:
        return self.master.data_ptr() != self.param_view.data_ptr()


class DistributedOptimizer:
    """AdamW (decoupled weight decay) on this rank's segments of a `DataParallel`'s buffers.

    `param_groups`: torch-style groups ({"params": [...], "weight_decay": ..., "lr": ...}); every trainable
    parameter of `ddp` must be in exactly one group. `self.param_groups` are the live groups (an LR schedule
    sets `group["lr"]` on them). Sharded (ZeRO-1) iff `ddp.shard_grads`.
    """

    def __init__(self, ddp: DataParallel, param_groups: list[dict], *, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0) -> None:
        self.ddp = ddp
        self.state = ddp.state
        self.sharded = ddp.shard_grads
        group_of: dict[int, int] = {}
        for gi, g in enumerate(param_groups):
            for p in g["params"]:
                if id(p) in group_of:
                    raise ValueError("a parameter appears in more than one optimizer param group")
                group_of[id(p)] = gi
        missing = [p.shape for p in ddp.params if id(p) not in group_of]
        if missing:
            raise ValueError(f"{len(missing)} trainable parameters are in no param group (shapes {missing[:4]})")

        self.segments: list[_Segment] = []
        for buf in ddp.buffers:
            for b in buf.buckets:
                own_lo, own_hi = b.shard_range(ddp.dp_rank, ddp.dp) if self.sharded else (b.start, b.end)
                for p in b.params:
                    p_start, p_end = buf.ranges[id(p)]
                    lo, hi = max(p_start, own_lo), min(p_end, own_hi)
                    if lo >= hi:
                        continue
                    self.segments.append(self._make_segment(p, buf, lo, hi, lo - p_start, group_of[id(p)]))

        groups = []
        for gi, g in enumerate(param_groups):
            opts = {k: v for k, v in g.items() if k != "params"}
            groups.append({**opts, "params": [s.master for s in self.segments if s.group == gi]})
        # foreach=False: the same per-tensor arithmetic as torch.optim.AdamW on CPU in a single process.
        self.inner = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                       foreach=False)

    @staticmethod
    def _make_segment(p: nn.Parameter, buf: GradBuffer, lo: int, hi: int, p_lo: int, group: int) -> _Segment:
        view = p.data.view(-1)[p_lo:p_lo + hi - lo]
        master_data = view if p.dtype == torch.float32 else view.detach().float().clone()
        master = nn.Parameter(master_data)
        master.grad = buf.grad[lo:hi]  # a view: finish_grad_sync's result is seen without copies
        return _Segment(p, buf, lo, hi, p_lo, group, master)

    # ------------------------------------------------------------ per step
    @property
    def param_groups(self) -> list[dict]:
        return self.inner.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.ddp.zero_grad()

    def local_grads(self) -> list[torch.Tensor]:
        """The reduced gradient pieces this rank steps on (fp16 unscaling / inf checks: reduce the result
        with `all_reduce_max` over the world, since under ZeRO-1 each rank sees only its shard)."""
        return [s.grad for s in self.segments]

    def grad_norm(self) -> float:
        """L2 norm of the global gradient (over tp, pp and, with ZeRO-1, the dp shards)."""
        local = grad_norm_squared([(s.grad, s.param) for s in self.segments], self.state)
        return float(reduce_norm_squared(local, self.state, over_dp=self.sharded).sqrt())

    def clip_grad_norm(self, max_norm: float) -> float:
        """Scale this rank's gradient segments so the global norm is <= max_norm; return the norm before."""
        norm = self.grad_norm()
        coef = clip_coefficient(norm, max_norm)
        if coef < 1.0:
            for s in self.segments:
                s.grad.mul_(coef)
        return norm

    @torch.no_grad()
    def step(self) -> None:
        """AdamW on the segments, then make every dp rank's full parameters current again."""
        self.inner.step()
        for s in self.segments:
            if s.has_copy:
                s.param_view.copy_(s.master)
        if self.sharded and self.ddp.dp > 1:
            self._all_gather_params()

    def _all_gather_params(self) -> None:
        works = []
        for buf in self.ddp.buffers:
            for b in buf.buckets:
                lo, hi = b.shard_range(self.ddp.dp_rank, self.ddp.dp)
                # A copy of the shard as input: gloo gives no guarantee when input aliases output.
                works.append(all_gather_into_tensor(buf.param[b.start:b.end], buf.param[lo:hi].clone(),
                                                    self.ddp.group, async_op=True))
        for w in works:
            w.wait()

    # ------------------------------------------------------------ memory and checkpoints
    def state_bytes(self) -> int:
        """Bytes of optimizer state held by this rank: Adam moments (+ step) and fp32 master copies."""
        n = sum(t.numel() * t.element_size() for st in self.inner.state.values() for t in st.values()
                if torch.is_tensor(t))
        return n + sum(s.master.numel() * s.master.element_size() for s in self.segments if s.has_copy)

    def _layout(self) -> list[tuple[int, int, int]]:
        index = {id(p): i for i, p in enumerate(self.ddp.params)}
        return [(index[id(s.param)], s.p_lo, s.hi - s.lo) for s in self.segments]

    def state_dict(self) -> dict:
        """This rank's shard: Adam state, fp32 masters of low-precision params, and the layout it belongs to."""
        return {
            "format": _FORMAT, "sharded": self.sharded, "dp": self.ddp.dp, "dp_rank": self.ddp.dp_rank,
            "layout": self._layout(),
            "optimizer": self.inner.state_dict(),
            "masters": {i: s.master.detach().clone() for i, s in enumerate(self.segments) if s.has_copy},
        }

    def load_state_dict(self, sd: dict) -> None:
        """Load a shard saved by the same dp rank with the same dp size, buckets and model."""
        if sd.get("format") != _FORMAT:
            raise ValueError(f"not a DistributedOptimizer state (format {sd.get('format')!r}, expected {_FORMAT!r})")
        mine = (self.sharded, self.ddp.dp, self.ddp.dp_rank)
        found = (sd["sharded"], sd["dp"], sd["dp_rank"])
        if mine != found:
            raise ValueError(f"optimizer shard (sharded, dp, dp_rank) = {found} cannot load into {mine}; "
                             "resharding needs the checkpoint converter")
        if [tuple(x) for x in sd["layout"]] != self._layout():
            raise ValueError("optimizer shard layout differs (other model, bucket_size or parameter order)")
        # deepcopy: torch keeps the given tensors when dtype/device already match, and a state_dict taken
        # in this process must not end up shared by two optimizers.
        self.inner.load_state_dict(copy.deepcopy(sd["optimizer"]))
        with torch.no_grad():
            for i, t in sd["masters"].items():
                self.segments[int(i)].master.copy_(t)
                self.segments[int(i)].param_view.copy_(t)
