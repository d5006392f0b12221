"""Tensor parallelism (Megatron-style) with sequence parallelism.

Layers split their weights across the `tp` ranks of `state.tp_group`:

- `ColumnParallelLinear`: weight [out/tp, in] (output features split). Input replicated (or, with sequence
  parallel, sharded along the sequence and all-gathered first); output split along the last dim.
- `RowParallelLinear`: weight [out, in/tp] (input features split). Input split along the last dim; partial
  outputs are all-reduced (or reduce-scattered along the sequence with sequence parallel).
- `VocabParallelEmbedding`: weight [V/tp, D] (vocabulary rows split); each rank looks up its own rows.
- `vocab_parallel_cross_entropy`: loss from logits split along the vocabulary, without gathering them.

At tp=1 every layer is exactly its torch counterpart (same math, parameter names `weight`/`bias`, shapes,
default init and RNG consumption) and no collective runs.

Activations are [B, S, D] (batch first, as the model); the sequence dimension is 1.

Initialisation: every layer builds the FULL weight with the init function (from a generator seeded by
`seed`, or the global RNG when `seed` is None) and keeps its own shard, so for the same seed the
weights are the same at every tp. This costs one full weight per layer in CPU memory during
construction, which is fine up to a few GB per matrix.

Parameter attributes other code relies on:
  `p.tensor_parallel` (bool): sharded across tp (count once per shard in norms, gather for export);
  `p.partition_dim` (int) and `p.partition_sizes` (tuple[int]): how the full tensor is split, see
      `shard_tensor` / `gather_tensor`;
  `p.tp_replicas` (int): consecutive tp ranks holding the same shard (K/V heads when tp > n_kv_heads);
      use `counts_once_in_tp` to count each distinct element once (gradient norms);
  `p.full_shape` and `p.shard_full(full) -> shard`: the init protocol of `Transformer.init_weights`;
  `p.sequence_parallel` (bool): replicated across tp but its gradient comes from this rank's sequence
      shard only; `allreduce_sequence_parallel_grads` sums those after backward.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from typing import Callable, Iterator, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from engine.parallel.state import ParallelState

InitMethod = Callable[[torch.Tensor, Optional[torch.Generator]], object]
SEQ_DIM = 1  # activations are [B, S, D]

# torch 2.13 renamed the flat collectives and warns on the old names; torch 2.11 only has the old ones.
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


# --------------------------------------------------------------------------- communication timing (benchmarks)

_comm_seconds: Optional[list[float]] = None  # set only inside `measure_communication()`


@contextlib.contextmanager
def measure_communication() -> Iterator[list[float]]:
    """Accumulate the wall time spent inside tp collectives into the yielded list's single element.

    Used by `engine/bench/parallel.py`; synchronises CUDA around each collective so the number is honest
    (which also removes any overlap, so use it only for measurements).
    """
    global _comm_seconds
    prev, _comm_seconds = _comm_seconds, [0.0]
    try:
        yield _comm_seconds
    finally:
        _comm_seconds = prev


@contextlib.contextmanager
def _timed(device: torch.device) -> Iterator[None]:
    if _comm_seconds is None:
        yield
        return
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    yield
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    _comm_seconds[0] += time.perf_counter() - t0


# --------------------------------------------------------------------------- raw collectives (no autograd)


def _all_reduce(x: torch.Tensor, group: object, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
    x = x.contiguous()
    with _timed(x.device):
        dist.all_reduce(x, op=op, group=group)
    return x


def _all_gather(x: torch.Tensor, dim: int, group: object, world: int) -> torch.Tensor:
    """Concatenate each rank's x along `dim` in rank order. [.., n, ..] -> [.., world*n, ..]"""
    xt = x.movedim(dim, 0).contiguous()  # gloo gathers along dim 0 of a flat buffer
    out = torch.empty((world * xt.shape[0], *xt.shape[1:]), dtype=xt.dtype, device=xt.device)
    with _timed(x.device):
        _all_gather_flat(out, xt, group=group)
    return out.movedim(0, dim).contiguous()


def _reduce_scatter(x: torch.Tensor, dim: int, group: object, world: int) -> torch.Tensor:
    """Sum over ranks, keep this rank's 1/world slice along `dim`. [.., world*n, ..] -> [.., n, ..]"""
    if x.shape[dim] % world != 0:
        raise ValueError(f"reduce-scatter: dimension {dim} of size {x.shape[dim]} is not divisible by tp={world}")
    xt = x.movedim(dim, 0).contiguous()
    out = torch.empty((xt.shape[0] // world, *xt.shape[1:]), dtype=xt.dtype, device=xt.device)
    with _timed(x.device):
        _reduce_scatter_flat(out, xt, group=group)
    return out.movedim(0, dim).contiguous()


def _split(x: torch.Tensor, dim: int, rank: int, world: int) -> torch.Tensor:
    if x.shape[dim] % world != 0:
        raise ValueError(f"cannot split dimension {dim} of size {x.shape[dim]} evenly across tp={world}")
    return x.chunk(world, dim=dim)[rank].contiguous()


# --------------------------------------------------------------------------- autograd wrappers
# Each pair is the conjugate of the other: forward of one is backward of its partner.


class _CopyToTP(torch.autograd.Function):
    """Identity forward; all-reduce backward (the input feeds rank-specific weights)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, state: ParallelState) -> torch.Tensor:
        ctx.group = state.tp_group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return _all_reduce(g.clone(), ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    """All-reduce forward (sum partial outputs); identity backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, state: ParallelState) -> torch.Tensor:
        return _all_reduce(x.clone(), state.tp_group)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return g, None


class _ScatterAlong(torch.autograd.Function):
    """Keep this rank's slice of `dim` forward (the last dim for tp, SEQ_DIM for sequence
    parallelism); all-gather it backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, state: ParallelState, dim: int) -> torch.Tensor:
        ctx.group, ctx.tp, ctx.dim = state.tp_group, state.tp, dim
        return _split(x, dim, state.tp_rank, state.tp)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return _all_gather(g, ctx.dim, ctx.group, ctx.tp), None, None


class _GatherFromTP(torch.autograd.Function):
    """All-gather the last dim forward; keep this rank's slice backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, state: ParallelState) -> torch.Tensor:
        ctx.tp, ctx.tp_rank = state.tp, state.tp_rank
        return _all_gather(x, -1, state.tp_group, state.tp)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return _split(g, -1, ctx.tp_rank, ctx.tp), None


class _GatherFromSP(torch.autograd.Function):
    """All-gather the sequence forward. Backward: the gathered tensor fed rank-specific weights, so its
    gradient is partial per rank -> reduce-scatter (sum and keep own shard); if it fed replicated
    computation instead (`grad_is_partial=False`) just keep own shard."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, state: ParallelState, grad_is_partial: bool) -> torch.Tensor:
        ctx.group, ctx.tp, ctx.tp_rank, ctx.partial = state.tp_group, state.tp, state.tp_rank, grad_is_partial
        return _all_gather(x, SEQ_DIM, state.tp_group, state.tp)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        if ctx.partial:
            return _reduce_scatter(g, SEQ_DIM, ctx.group, ctx.tp), None, None
        return _split(g, SEQ_DIM, ctx.tp_rank, ctx.tp), None, None


class _ReduceScatterToSP(torch.autograd.Function):
    """Sum partial outputs and keep own sequence shard forward; all-gather the sequence backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, state: ParallelState) -> torch.Tensor:
        ctx.group, ctx.tp = state.tp_group, state.tp
        return _reduce_scatter(x, SEQ_DIM, state.tp_group, state.tp)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return _all_gather(g, SEQ_DIM, ctx.group, ctx.tp), None


def copy_to_tp_region(x: torch.Tensor, state: ParallelState) -> torch.Tensor:
    return x if state.tp == 1 else _CopyToTP.apply(x, state)


def reduce_from_tp_region(x: torch.Tensor, state: ParallelState) -> torch.Tensor:
    return x if state.tp == 1 else _ReduceFromTP.apply(x, state)


def scatter_to_tp_region(x: torch.Tensor, state: ParallelState) -> torch.Tensor:
    return x if state.tp == 1 else _ScatterAlong.apply(x, state, -1)


def gather_from_tp_region(x: torch.Tensor, state: ParallelState) -> torch.Tensor:
    return x if state.tp == 1 else _GatherFromTP.apply(x, state)


def scatter_to_sequence_parallel_region(x: torch.Tensor, state: ParallelState) -> torch.Tensor:
    """[B, S, D] -> [B, S/tp, D] (this rank's contiguous sequence shard)."""
    return x if state.tp == 1 else _ScatterAlong.apply(x, state, SEQ_DIM)


def gather_from_sequence_parallel_region(x: torch.Tensor, state: ParallelState,
                                         grad_is_partial: bool = True) -> torch.Tensor:
    """[B, S/tp, D] -> [B, S, D]."""
    return x if state.tp == 1 else _GatherFromSP.apply(x, state, grad_is_partial)


def reduce_scatter_to_sequence_parallel_region(x: torch.Tensor, state: ParallelState) -> torch.Tensor:
    """Partial sums [B, S, D] -> reduced shard [B, S/tp, D]."""
    return x if state.tp == 1 else _ReduceScatterToSP.apply(x, state)


# --------------------------------------------------------------------------- sharding helpers


def divide(n: int, d: int, what: str) -> int:
    if n % d != 0:
        raise ValueError(f"{what}={n} is not divisible by tensor-parallel size tp={d}")
    return n // d


def shard_tensor(full: torch.Tensor, dim: int, sizes: Sequence[int], rank: int, world: int) -> torch.Tensor:
    """Shard `rank` of `world` of `full` along `dim`, where `full` is the concatenation of blocks of `sizes`
    (e.g. [gate; up] or [q; k; v]) and every block is split evenly, so each rank holds matching pieces of
    all blocks: shard = cat(block_0[rank], block_1[rank], ...)."""
    blocks = full.split(list(sizes), dim=dim)
    return torch.cat([_split(b, dim, rank, world) for b in blocks], dim=dim).contiguous()


def _shard_param(full: torch.Tensor, dim: int, sizes: tuple[int, ...], tp_rank: int, tp: int,
                 replicas: int) -> torch.Tensor:
    # Shards are held by `replicas` consecutive tp ranks each (GQA with tp > n_kv_heads).
    return shard_tensor(full, dim, sizes, tp_rank // replicas, tp // replicas)


def gather_tensor(local: torch.Tensor, param: nn.Parameter, state: ParallelState) -> torch.Tensor:
    """Inverse of the sharding (a collective over the tp group): the full tensor of a sharded parameter,
    or of its gradient when `local` is `param.grad`. Returns `local` itself for replicated parameters."""
    if state.tp == 1 or not getattr(param, "tensor_parallel", False):
        return local
    dim, sizes, replicas = param.partition_dim, param.partition_sizes, getattr(param, "tp_replicas", 1)
    gathered = _all_gather(local.detach(), dim, state.tp_group, state.tp)  # [rank0 shard | rank1 shard | ...]
    n_shards = state.tp // replicas
    local_sizes = [s // n_shards for s in sizes]
    per_rank = gathered.chunk(state.tp, dim=dim)[::replicas]  # one holder per distinct shard
    blocks = [torch.cat([r.split(local_sizes, dim=dim)[i] for r in per_rank], dim=dim) for i in range(len(sizes))]
    return torch.cat(blocks, dim=dim)


def _mark(p: nn.Parameter, dim: int, sizes: Sequence[int], full_shape: tuple[int, ...], state: ParallelState,
          replicas: int = 1) -> None:
    """Attach the sharding description (see the module docstring) and the init protocol of
    `Transformer.init_weights`: `full_shape` and `shard_full(full) -> this rank's shard`."""
    p.tensor_parallel = state.tp > 1
    p.partition_dim = dim
    p.partition_sizes = tuple(sizes)
    p.tp_replicas = replicas
    p.full_shape = tuple(full_shape)
    # functools.partial of a module-level function, not a lambda, so the model stays picklable
    p.shard_full = functools.partial(_shard_param, dim=dim, sizes=tuple(sizes), tp_rank=state.tp_rank,
                                     tp=state.tp, replicas=replicas)


def _generator(seed: Optional[int]) -> Optional[torch.Generator]:
    return None if seed is None else torch.Generator().manual_seed(seed)


def _default_linear_init(weight: torch.Tensor, gen: Optional[torch.Generator]) -> None:
    # Same as nn.Linear.reset_parameters (so tp=1 with seed=None consumes the global RNG identically).
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=gen)


def _init_full(shape: tuple[int, ...], init: InitMethod, gen: Optional[torch.Generator]) -> torch.Tensor:
    full = torch.empty(shape, dtype=torch.float32)  # CPU, fp32: values independent of device and dtype
    with torch.no_grad():
        init(full, gen)
    return full


# --------------------------------------------------------------------------- layers


def to_tp_region(x: torch.Tensor, state: ParallelState, sequence_parallel: bool = False) -> torch.Tensor:
    """Make x the full input of column-parallel layers: identity forward / all-reduce backward, or with
    sequence parallel all-gather [B, S/tp, D] -> [B, S, D] forward / reduce-scatter backward.

    Layers that read the same input (q, k, v; gate, up) call this ONCE and pass `input_in_tp_region=True`,
    so the backward does one collective on the summed gradient instead of one per layer."""
    if state.tp == 1:
        return x
    return gather_from_sequence_parallel_region(x, state) if sequence_parallel else copy_to_tp_region(x, state)


def column_parallel_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                           state: ParallelState, sequence_parallel: bool = False,
                           gather_output: bool = False, input_in_tp_region: bool = False) -> torch.Tensor:
    """x [B, S, in] (or [B, S/tp, in] with sequence_parallel), weight [out/tp, in] -> [B, S, out/tp]
    (or [B, S, out] with gather_output). Also the tied output head (weight = the embedding shard)."""
    if not input_in_tp_region:
        x = to_tp_region(x, state, sequence_parallel)
    y = F.linear(x, weight, bias)
    return gather_from_tp_region(y, state) if gather_output else y


class ColumnParallelLinear(nn.Module):
    """Linear layer with the output features split across tp: y_local = x @ W_local^T + b_local.

    `partition_sizes` (default [out_features]) describes a fused weight made of blocks (e.g. [F, F] for
    SwiGLU gate|up, or the q, k, v sizes): each block is split separately, so a rank's output is
    cat(block_0 shard, block_1 shard, ...) and `.split(layer.local_sizes, -1)` pairs them correctly.

    `replicas` > 1 makes each shard be held by that many consecutive tp ranks (the weight is split in
    tp/replicas pieces), as K/V projections need when tp > n_kv_heads. Replicas compute partial
    gradients (each from its own query heads); `allreduce_sequence_parallel_grads` sums them.
    """

    def __init__(self, in_features: int, out_features: int, state: ParallelState, bias: bool = True,
                 gather_output: bool = False, sequence_parallel: Optional[bool] = None,
                 init_method: Optional[InitMethod] = None, seed: Optional[int] = None,
                 partition_sizes: Optional[Sequence[int]] = None, replicas: int = 1,
                 device: Optional[torch.device] = None) -> None:
        super().__init__()
        tp = state.tp
        if replicas < 1 or tp % replicas != 0:
            raise ValueError(f"ColumnParallelLinear: replicas={replicas} must divide tp={tp}")
        n_shards = tp // replicas
        sizes = list(partition_sizes or [out_features])
        if sum(sizes) != out_features:
            raise ValueError(f"partition_sizes {sizes} must sum to out_features={out_features}")
        for s in sizes:
            divide(s, n_shards, "ColumnParallelLinear output block size")
        self.in_features, self.out_features = in_features, out_features
        self.state = state
        self.gather_output = gather_output
        self.sequence_parallel = state.sequence_parallel if sequence_parallel is None else sequence_parallel
        if gather_output and (self.sequence_parallel or replicas > 1):
            raise ValueError("ColumnParallelLinear: gather_output works only without sequence_parallel and replicas")
        self.partition_sizes = sizes
        self.local_sizes = [s // n_shards for s in sizes]
        self.replicas = replicas
        device = device or state.device

        gen = _generator(seed)
        w = _init_full((out_features, in_features), init_method or _default_linear_init, gen)
        self.weight = nn.Parameter(_shard_param(w, 0, tuple(sizes), state.tp_rank, tp, replicas).to(device))
        _mark(self.weight, 0, sizes, (out_features, in_features), state, replicas)  # [out/tp, in]
        if bias:
            b = torch.zeros(out_features)
            if init_method is None:  # nn.Linear's bias init; an explicit init_method means zero bias (Megatron)
                bound = 1 / math.sqrt(in_features) if in_features > 0 else 0
                nn.init.uniform_(b, -bound, bound, generator=gen)
            self.bias = nn.Parameter(_shard_param(b, 0, tuple(sizes), state.tp_rank, tp, replicas).to(device))
            _mark(self.bias, 0, sizes, (out_features,), state, replicas)  # [out/tp]
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor, input_in_tp_region: bool = False) -> torch.Tensor:
        """x [B, S, in] ([B, S/tp, in] with sequence parallel), or the output of `to_tp_region` when
        `input_in_tp_region`."""
        return column_parallel_linear(x, self.weight, self.bias, self.state, self.sequence_parallel,
                                      self.gather_output, input_in_tp_region)

    def extra_repr(self) -> str:
        rep = f" x{self.replicas} replicas" if self.replicas > 1 else ""
        return (f"in_features={self.in_features}, out_features={self.out_features} (/{self.state.tp}{rep}), "
                f"bias={self.bias is not None}, sequence_parallel={self.sequence_parallel}")


class RowParallelLinear(nn.Module):
    """Linear layer with the input features split across tp: y = sum_ranks(x_local @ W_local^T) + b.

    Input [B, S, in/tp] (already split, e.g. attention heads or MLP hidden); output [B, S, out], or
    [B, S/tp, out] with sequence parallel (reduce-scatter instead of all-reduce). The bias is replicated
    and added after the reduction; with sequence parallel its gradient is per-shard (`sequence_parallel`).
    """

    def __init__(self, in_features: int, out_features: int, state: ParallelState, bias: bool = True,
                 input_is_parallel: bool = True, sequence_parallel: Optional[bool] = None,
                 init_method: Optional[InitMethod] = None, seed: Optional[int] = None,
                 device: Optional[torch.device] = None) -> None:
        super().__init__()
        tp = state.tp
        divide(in_features, tp, "RowParallelLinear in_features")
        self.in_features, self.out_features = in_features, out_features
        self.state = state
        self.input_is_parallel = input_is_parallel
        self.sequence_parallel = state.sequence_parallel if sequence_parallel is None else sequence_parallel
        if self.sequence_parallel and not input_is_parallel:
            raise ValueError("RowParallelLinear: sequence_parallel needs input_is_parallel=True")
        device = device or state.device

        gen = _generator(seed)
        w = _init_full((out_features, in_features), init_method or _default_linear_init, gen)
        self.weight = nn.Parameter(shard_tensor(w, 1, [in_features], state.tp_rank, tp).to(device))  # [out, in/tp]
        _mark(self.weight, 1, [in_features], (out_features, in_features), state)
        if bias:
            b = torch.zeros(out_features)
            if init_method is None:
                bound = 1 / math.sqrt(in_features) if in_features > 0 else 0
                nn.init.uniform_(b, -bound, bound, generator=gen)
            self.bias = nn.Parameter(b.to(device))  # [out], replicated
            self.bias.sequence_parallel = self.sequence_parallel and tp > 1
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter_to_tp_region(x, self.state)
        y = F.linear(x, self.weight)  # partial sums [B, S, out]
        if self.state.tp > 1:
            y = (reduce_scatter_to_sequence_parallel_region(y, self.state) if self.sequence_parallel
                 else reduce_from_tp_region(y, self.state))
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features} (/{self.state.tp}), out_features={self.out_features}, "
                f"bias={self.bias is not None}, sequence_parallel={self.sequence_parallel}")


class VocabParallelEmbedding(nn.Module):
    """Embedding with the vocabulary rows split across tp: rank r holds rows [r*V/tp, (r+1)*V/tp).

    ids [B, S] -> [B, S, D] (all-reduced), or [B, S/tp, D] with sequence parallel (reduce-scattered, so
    the following dropout/norm already run on the sequence shard). `num_embeddings` must divide by tp:
    pad the vocabulary (model.vocab_pad_multiple) and let the loss ignore the padded rows.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, state: ParallelState,
                 sequence_parallel: Optional[bool] = None, init_method: Optional[InitMethod] = None,
                 seed: Optional[int] = None, device: Optional[torch.device] = None) -> None:
        super().__init__()
        tp = state.tp
        per_rank = divide(num_embeddings, tp, "VocabParallelEmbedding num_embeddings (padded vocabulary)")
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.state = state
        self.sequence_parallel = state.sequence_parallel if sequence_parallel is None else sequence_parallel
        self.vocab_start = state.tp_rank * per_rank
        self.vocab_end = self.vocab_start + per_rank
        # nn.Embedding's default init is N(0, 1)
        init = init_method or (lambda w, g: nn.init.normal_(w, generator=g))
        w = _init_full((num_embeddings, embedding_dim), init, _generator(seed))
        self.weight = nn.Parameter(shard_tensor(w, 0, [num_embeddings], state.tp_rank, tp)
                                   .to(device or state.device))  # [V/tp, D]
        _mark(self.weight, 0, [num_embeddings], (num_embeddings, embedding_dim), state)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.state.tp == 1:
            out = F.embedding(ids, self.weight)
            return scatter_to_sequence_parallel_region(out, self.state) if self.sequence_parallel else out
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
        local_ids = (ids - self.vocab_start).masked_fill(outside, 0)
        out = F.embedding(local_ids, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)  # partial [B, S, D]
        if self.sequence_parallel:
            return reduce_scatter_to_sequence_parallel_region(out, self.state)
        return reduce_from_tp_region(out, self.state)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings} (/{self.state.tp}), {self.embedding_dim}, "
                f"sequence_parallel={self.sequence_parallel}")


# --------------------------------------------------------------------------- vocab-parallel cross entropy


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """loss_i = logsumexp_v(z_iv) - z_i,t_i over the FULL vocabulary, from local logits [N, V/tp].

    Only [N]-sized vectors cross ranks (max, sum of exp, target logit); the backward is local:
    d loss_i / d z_iv = softmax_iv - [v == t_i], with the softmax saved from forward.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, state: ParallelState, vocab_size: int,
                ignore_index: int) -> torch.Tensor:
        group = state.tp_group
        z = logits.float()  # [N, Vl] (copy only if not fp32 already)
        n, v_local = z.shape
        start = state.tp_rank * v_local
        if vocab_size < start + v_local:  # padded vocabulary columns on this rank never enter the loss
            z = z.clone()
            z[:, max(vocab_size - start, 0):] = float("-inf")
        zmax = z.max(dim=-1).values  # [N]
        zmax = _all_reduce(zmax, group, dist.ReduceOp.MAX)
        z = z - zmax.unsqueeze(-1)

        ignored = targets == ignore_index
        local_t = targets - start
        mine = (local_t >= 0) & (local_t < v_local) & ~ignored
        idx = local_t.clamp(0, v_local - 1)
        target_logit = torch.where(mine, z.gather(1, idx.unsqueeze(1)).squeeze(1), torch.zeros_like(zmax))

        exp = z.exp_()  # [N, Vl], in place: z is a fresh tensor
        sum_exp = exp.sum(dim=-1)
        both = _all_reduce(torch.stack([target_logit, sum_exp]), group)  # one collective for two vectors
        target_logit, sum_exp = both[0], both[1]
        loss = (sum_exp.log() - target_logit).masked_fill(ignored, 0.0)

        softmax = exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, idx, mine, ignored)
        ctx.in_dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        softmax, idx, mine, ignored = ctx.saved_tensors
        grad = softmax  # reuse the saved buffer: backward runs once
        rows = torch.arange(grad.shape[0], device=grad.device)
        grad[rows[mine], idx[mine]] -= 1.0
        grad.mul_(g.masked_fill(ignored, 0.0).unsqueeze(-1))
        return grad.to(ctx.in_dtype), None, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, state: ParallelState,
                                 vocab_size: Optional[int] = None, ignore_index: int = -100,
                                 reduction: str = "none") -> torch.Tensor:
    """Cross entropy from logits split along the vocabulary across tp, never gathering them.

    logits [..., V_padded/tp] (this rank's columns, any float dtype; computed in fp32), targets [...] with
    ids in [0, vocab_size) or ignore_index. Columns >= `vocab_size` (vocabulary padding) are excluded.
    reduction: "none" -> per-token fp32 loss [...] (0 where ignored), "sum", or "mean" over non-ignored
    tokens (as F.cross_entropy). At tp=1 this is F.cross_entropy on logits[..., :vocab_size].
    """
    if reduction not in ("none", "sum", "mean"):
        raise ValueError(f"reduction: expected 'none', 'sum' or 'mean', found {reduction!r}")
    v_total = logits.shape[-1] * state.tp
    vocab_size = v_total if vocab_size is None else vocab_size
    if not 0 < vocab_size <= v_total:
        raise ValueError(f"vocab_size={vocab_size} must be in (0, {v_total}] (tp={state.tp} x local vocab "
                         f"{logits.shape[-1]})")
    shape = targets.shape
    if logits.shape[:-1] != shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(shape)} do not match")
    if state.tp == 1:
        return F.cross_entropy(logits[..., :vocab_size].float().reshape(-1, vocab_size), targets.reshape(-1),
                               ignore_index=ignore_index, reduction=reduction).reshape(
            shape if reduction == "none" else ())
    loss = _VocabParallelCrossEntropy.apply(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), state,
                                            vocab_size, ignore_index).reshape(shape)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / (targets != ignore_index).sum()  # nan when all are ignored, as F.cross_entropy


# --------------------------------------------------------------------------- after backward


def counts_once_in_tp(p: nn.Parameter, state: ParallelState) -> bool:
    """Whether this rank's copy of `p` is the one to count when summing over the tp group (gradient
    norms, parameter counts): every shard once, replicated parameters on tp rank 0, a shard held by
    `tp_replicas` ranks on the first of them."""
    if state.tp == 1:
        return True
    if getattr(p, "tensor_parallel", False):
        return state.tp_rank % getattr(p, "tp_replicas", 1) == 0
    return state.tp_rank == 0


def sequence_parallel_params(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if getattr(p, "sequence_parallel", False)]


def _grad_of(p: nn.Parameter) -> Optional[torch.Tensor]:
    g = getattr(p, "main_grad", None)  # a contiguous data-parallel grad buffer may provide this
    return p.grad if g is None else g


def allreduce_sequence_parallel_grads(module: nn.Module, state: ParallelState) -> None:
    """Finish the tensor-parallel gradients of `module` after backward:

    - sum over the tp group the gradients of parameters marked `sequence_parallel` (norm weights and
      biases, row-parallel biases, learned positions): each rank saw only its sequence shard;
    - sum the partial gradients of shards held by several tp ranks (`tp_replicas` > 1: K/V projections
      when tp > n_kv_heads).

    Call after the last backward of a step (after gradient accumulation), before data-parallel gradient
    reduction, clipping and the optimizer step. No-op at tp=1 or when nothing is marked. Uses
    `p.main_grad` when a contiguous grad buffer provides one, else `p.grad`.
    """
    if state.tp == 1:
        return
    sp, rep = [], []
    for p in module.parameters():
        g = _grad_of(p)
        if g is None:
            continue
        if getattr(p, "sequence_parallel", False):
            sp.append(g)
        elif getattr(p, "tp_replicas", 1) > 1:
            rep.append((p, g))
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for g in sp:
        by_dtype.setdefault(g.dtype, []).append(g)
    for same in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in same])  # one collective per dtype, not one per tensor
        _all_reduce(flat, state.tp_group)
        offset = 0
        for g in same:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
    for p, g in rep:
        # Every rank writes its partial gradient into its shard's slot of a zero buffer; the tp all-reduce
        # then sums the replicas of each shard (only the tp group exists, no replica sub-groups needed).
        n_shards = state.tp // p.tp_replicas
        slot = state.tp_rank // p.tp_replicas
        buf = torch.zeros((n_shards, *g.shape), dtype=g.dtype, device=g.device)
        buf[slot] = g
        _all_reduce(buf, state.tp_group)
        g.copy_(buf[slot])
