"""Global gradient norm and clipping across tensor, pipeline and data parallelism.

The norm is the L2 norm of the gradient of the *whole* model, counting every distinct element once:

- tensor parallel: a sharded parameter (column/row-parallel weight, vocab-parallel embedding) contributes
  its shard on every tp rank (on the first holder when `tp_replicas` > 1, e.g. replicated KV heads); a
  replicated one (norm weights, row-parallel bias) only on tp rank 0 (`counts_once_in_tp`);
- pipeline parallel: each stage contributes its own layers; a tied embedding held by the first and the
  last stage counts on the first stage only;
- data parallel: with replicated gradients nothing is summed over dp; with ZeRO-1 every dp rank holds
  a disjoint shard of the buffers, so the squares are summed over dp as well.

Parameters are marked by the layers that create them: `param.tensor_parallel`/`tp_replicas` (tp layers),
`param.shared_embedding_copy` (pipeline/tied.py: the last stage's copy of a tied embedding, not counted).
"""

from __future__ import annotations

import math
from typing import Iterable, Optional

import torch
import torch.distributed as dist

from engine.parallel.state import ParallelState
from engine.parallel.tensor_parallel import counts_once_in_tp

__all__ = ["clip_grad_norm", "grad_norm", "grad_norm_squared", "reduce_norm_squared", "clip_coefficient",
           "is_pp_tied_copy", "counts_toward_norm"]

_EPS = 1e-6  # same as torch.nn.utils.clip_grad_norm_


def is_pp_tied_copy(param: torch.Tensor, state: ParallelState) -> bool:
    """True for the last stage's copy of an embedding tied across pipeline stages (counted once, on the
    first stage)."""
    return bool(getattr(param, "shared_embedding_copy", False)) and state.pp > 1


def counts_toward_norm(param: torch.Tensor, state: ParallelState) -> bool:
    # tp rule from the tp layers themselves (`param.tensor_parallel`, `param.tp_replicas`): every shard
    # once, replicated parameters on tp rank 0, a shard held by several tp ranks on the first of them.
    return counts_once_in_tp(param, state) and not is_pp_tied_copy(param, state)


def grad_norm_squared(pieces: Iterable[tuple[torch.Tensor, torch.Tensor]], state: ParallelState) -> torch.Tensor:
    """Sum of squares (fp64 scalar) of the local gradient pieces [(grad, owning param)] that count here.

    fp32 gradients (main-grad buffers, fp32 master weights) go through one `torch._foreach_norm` per
    device, as torch.nn.utils.clip_grad_norm_ does; other dtypes are reduced one by one in fp32."""
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    total = torch.zeros((), dtype=torch.float64, device=state.device)
    for grad, param in pieces:
        if grad is None or not counts_toward_norm(param, state):
            continue
        if grad.dtype == torch.float32:
            by_device.setdefault(grad.device, []).append(grad)
        else:
            total = total + torch.linalg.vector_norm(grad, 2, dtype=torch.float32).double().to(total.device) ** 2
    for grads in by_device.values():
        norms = torch.stack(torch._foreach_norm(grads, 2)).double()
        total = total + norms.pow(2).sum().to(total.device)
    return total


def reduce_norm_squared(sq: torch.Tensor, state: ParallelState, over_dp: bool = False) -> torch.Tensor:
    """Sum a local squared norm over the model-parallel group (tp x pp) and, for sharded grads, over dp."""
    sq = sq.detach().clone()
    if state.tp * state.pp > 1 and state.mp_group is not None:
        dist.all_reduce(sq, group=state.mp_group)
    if over_dp and state.dp > 1 and state.dp_group is not None:
        dist.all_reduce(sq, group=state.dp_group)
    return sq


def clip_coefficient(norm: float, max_norm: float) -> float:
    """Factor the grads are multiplied by; 1.0 when no clipping is needed, or when the norm is not finite
    (the caller skips the step then: scaling by 0 or nan would only hide the problem)."""
    if max_norm <= 0 or not math.isfinite(norm):
        return 1.0
    return min(1.0, max_norm / (norm + _EPS))


def _grads(params: Iterable[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out, seen = [], set()
    for p in params:
        if id(p) in seen:
            continue
        seen.add(id(p))
        g = getattr(p, "main_grad", None)
        g = p.grad if g is None else g
        if g is not None:
            out.append((g, p))
    return out


def grad_norm(params: Iterable[torch.Tensor], state: Optional[ParallelState] = None) -> float:
    """Global L2 gradient norm of replicated-over-dp gradients (`param.main_grad`, else `param.grad`)."""
    state = state or ParallelState.single()
    return float(reduce_norm_squared(grad_norm_squared(_grads(params), state), state).sqrt())


def clip_grad_norm(params: Iterable[torch.Tensor], max_norm: float, state: Optional[ParallelState] = None) -> float:
    """Clip gradients in place to a global L2 norm of `max_norm`; return the norm before clipping.

    In one process this equals `torch.nn.utils.clip_grad_norm_(params, max_norm)`. With ZeRO-1 use
    `DistributedOptimizer.clip_grad_norm`, which sums the dp shards.
    """
    state = state or ParallelState.single()
    pieces = _grads(params)
    norm = float(reduce_norm_squared(grad_norm_squared(pieces, state), state).sqrt())
    coef = clip_coefficient(norm, max_norm)
    if coef < 1.0:
        for g, _ in pieces:
            g.mul_(coef)
    return norm
