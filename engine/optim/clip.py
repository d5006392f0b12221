"""Global gradient norm and clipping across tensor, pipeline and data parallelism.

The norm is the L2 norm of the gradient of the *whole* model, counting every distinct element once,
decided by each tensor's sharding spec (engine/parallel/sharding.py, `ShardSpec.counts_once`):

- tensor parallel: a sharded parameter contributes its shard on every tp rank (on the first holder when
  `tp_replicas` > 1, e.g. replicated KV heads); a replicated one (norm weights, row-parallel bias) only on
  tp rank 0;
- pipeline parallel: each stage contributes its own layers; the last stage's copy of an embedding tied
  across stages (`tied_to`) is not counted (the first stage counts the embedding);
- data parallel: with replicated gradients nothing is summed over dp; with sharded ones (ZeRO-1, FSDP2)
  every dp rank holds a disjoint part, so the squares are summed over dp as well.
"""

from __future__ import annotations

import math
from typing import Iterable, Optional

import torch
import torch.distributed as dist

from engine.parallel.sharding import ShardSpec
from engine.parallel.state import ParallelState

__all__ = ["clip_grad_norm", "grad_norm", "grad_norm_squared", "reduce_norm_squared", "clip_coefficient"]

_EPS = 1e-6  # same as torch.nn.utils.clip_grad_norm_


def grad_norm_squared(pieces: Iterable[tuple[Optional[torch.Tensor], Optional[ShardSpec]]],
                      pstate: ParallelState) -> torch.Tensor:
    """Sum of squares (fp64 scalar) of the local gradient pieces [(grad, spec of its parameter)] that count
    on this rank (a piece without spec always counts: one process, no sharding).

    fp32 gradients (main-grad buffers, fp32 master weights) go through one `torch._foreach_norm` per
    device, as torch.nn.utils.clip_grad_norm_ does; other dtypes are reduced one by one in fp32."""
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    total = torch.zeros((), dtype=torch.float64, device=pstate.device)
    for grad, spec in pieces:
        if grad is None or (spec is not None and not spec.counts_once(pstate.tp_rank)):
            continue
        if grad.dtype == torch.float32:
            by_device.setdefault(grad.device, []).append(grad)
        else:
            total = total + torch.linalg.vector_norm(grad, 2, dtype=torch.float32).double().to(total.device) ** 2
    for grads in by_device.values():
        norms = torch.stack(torch._foreach_norm(grads, 2)).double()
        total = total + norms.pow(2).sum().to(total.device)
    return total


def reduce_norm_squared(sq: torch.Tensor, pstate: ParallelState, over_dp: bool = False) -> torch.Tensor:
    """Sum a local squared norm over the model-parallel group (tp x pp) and, for sharded grads, over dp."""
    sq = sq.detach().clone()
    if pstate.tp * pstate.pp > 1 and pstate.mp_group is not None:
        dist.all_reduce(sq, group=pstate.mp_group)
    if over_dp and pstate.dp > 1 and pstate.dp_group is not None:
        dist.all_reduce(sq, group=pstate.dp_group)
    return sq


def clip_coefficient(norm: float, max_norm: float) -> float:
    """Factor the grads are multiplied by; 1.0 when no clipping is needed, or when the norm is not finite
    (the caller skips the step then: scaling by 0 or nan would only hide the problem)."""
    if max_norm <= 0 or not math.isfinite(norm):
        return 1.0
    return min(1.0, max_norm / (norm + _EPS))


def _grads(params: Iterable[torch.Tensor]) -> list[tuple[torch.Tensor, None]]:
    out, seen = [], set()
    for p in params:
        if id(p) in seen or p.grad is None:
            continue
        seen.add(id(p))
        out.append((p.grad, None))
    return out


def grad_norm(params: Iterable[torch.Tensor]) -> float:
    """L2 norm of the `.grad` of unsharded parameters in one process (as torch.nn.utils.clip_grad_norm_)."""
    pstate = ParallelState.single()
    return float(grad_norm_squared(_grads(params), pstate).sqrt())


def clip_grad_norm(params: Iterable[torch.Tensor], max_norm: float) -> float:
    """Clip the `.grad` of unsharded parameters in place to a global L2 norm of `max_norm`; return the norm
    before clipping. Equals `torch.nn.utils.clip_grad_norm_(params, max_norm)`. The training loop clips
    through its optimizer (`Optimizer.clip_grad_norm`), which knows the shards."""
    pstate = ParallelState.single()
    pieces = _grads(params)
    norm = float(grad_norm_squared(pieces, pstate).sqrt())
    coef = clip_coefficient(norm, max_norm)
    if coef < 1.0:
        for g, _ in pieces:
            g.mul_(coef)
    return norm
