"""Tensor-parallel layers (Megatron-style), each registering the sharding spec of its parameters.

- `ColumnParallelLinear`: weight [out/tp, in] (output features split). Input replicated (or, with sequence
  parallel, sharded along the sequence and all-gathered first); output split along the last dim.
- `RowParallelLinear`: weight [out, in/tp] (input features split). Input split along the last dim; partial
  outputs are all-reduced (or reduce-scattered along the sequence with sequence parallel).
- `VocabParallelEmbedding`: weight [V_padded/tp, D] (vocabulary rows split); each rank looks up its own rows.

At tp=1 every layer is exactly its torch counterpart (same math, parameter names `weight`/`bias`, shapes,
default init and RNG consumption) and no collective runs. Activations are [B, S, D] (batch first).

Each layer's `param_specs` maps its parameter attribute names ("weight", "bias") to a ShardSpec
(engine/parallel/sharding.py) named by that attribute; the model prefixes the names. The padded vocabulary
of the embedding and the output head is described by `real_size` (the canonical row count): the runtime
rows beyond it are padding.

Initialisation: built on the meta device, a layer allocates nothing and initialises nothing (the model's
one initialiser fills it later, shard by shard). Built on a real device, it initialises itself like its
torch counterpart: the FULL weight from `init_method` and a generator seeded by `seed` (the global RNG
when None), of which it keeps its shard, so for the same seed the weights are the same at every tp.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.parallel.collectives import (
    gather_from_tp_region,
    reduce_from_tp_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
    scatter_to_tp_region,
    to_tp_region,
)
from engine.parallel.sharding import ShardSpec, replicated
from engine.parallel.state import ParallelState

InitMethod = Callable[[torch.Tensor, Optional[torch.Generator]], object]


def divide(n: int, d: int, what: str) -> int:
    if n % d != 0:
        raise ValueError(f"{what}={n} is not divisible by tensor-parallel size tp={d}")
    return n // d


def _generator(seed: Optional[int]) -> Optional[torch.Generator]:
    return None if seed is None else torch.Generator().manual_seed(seed)


def _default_linear_init(weight: torch.Tensor, gen: Optional[torch.Generator]) -> None:
    # Same as nn.Linear.reset_parameters (so tp=1 with seed=None consumes the global RNG identically).
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=gen)


def _parameter(spec: ShardSpec, device: torch.device, tp_rank: int,
               init: Optional[Callable[[torch.Tensor], None]]) -> nn.Parameter:
    """This rank's shard of `spec`: empty on the meta device, else cut from a full runtime tensor that
    `init` fills (CPU, fp32: values independent of device and dtype)."""
    if device.type == "meta" or init is None:
        return nn.Parameter(torch.empty(spec.local_shape, device=device))
    full = torch.empty(spec.runtime_shape, dtype=torch.float32)
    with torch.no_grad():
        init(full)
    return nn.Parameter(spec.shard_runtime(full, tp_rank).to(device))


def _bias_init(in_features: int, gen: Optional[torch.Generator], default: bool) -> Callable[[torch.Tensor], None]:
    def init(b: torch.Tensor) -> None:
        b.zero_()
        if default:  # nn.Linear's bias init; an explicit init_method means zero bias (Megatron)
            bound = 1 / math.sqrt(in_features) if in_features > 0 else 0
            nn.init.uniform_(b, -bound, bound, generator=gen)
    return init


LinearFn = Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]  # F.linear's contract


def column_parallel_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                           pstate: ParallelState, sequence_parallel: bool = False,
                           gather_output: bool = False, input_in_tp_region: bool = False,
                           linear_fn: Optional[LinearFn] = None) -> torch.Tensor:
    """x [B, S, in] (or [B, S/tp, in] with sequence_parallel), weight [out/tp, in] -> [B, S, out/tp]
    (or [B, S, out] with gather_output). Also the tied output head (weight = the embedding shard).
    `linear_fn` replaces F.linear for the local matmul (the FP8 linear); the collectives stay."""
    if not input_in_tp_region:
        x = to_tp_region(x, pstate, sequence_parallel)
    y = (linear_fn or F.linear)(x, weight, bias)
    return gather_from_tp_region(y, pstate) if gather_output else y


class ColumnParallelLinear(nn.Module):
    """Linear layer with the output features split across tp: y_local = x @ W_local^T + b_local.

    `partition_sizes` (default [out_features]) describes a fused weight made of blocks (e.g. [F, F] for
    SwiGLU gate|up, or the q, k, v sizes): each block is split separately, so a rank's output is
    cat(block_0 shard, block_1 shard, ...) and `.split(layer.local_sizes, -1)` pairs them correctly.

    `replicas` > 1 makes each shard be held by that many consecutive tp ranks (the weight is split in
    tp/replicas pieces), as K/V projections need when tp > n_kv_heads. Replicas compute partial
    gradients (each from its own query heads); engine/parallel/grad_sync.py sums them.

    `real_size` < out_features: the last out_features - real_size outputs are padding (the output head over
    a padded vocabulary); the canonical weight has real_size rows.

    `linear_fn` (None = F.linear) is the local matmul; the FP8 swap (engine/precision/fp8_swap.py) sets it.
    """

    def __init__(self, in_features: int, out_features: int, pstate: ParallelState, bias: bool = True,
                 gather_output: bool = False, sequence_parallel: Optional[bool] = None,
                 init_method: Optional[InitMethod] = None, seed: Optional[int] = None,
                 partition_sizes: Optional[Sequence[int]] = None, replicas: int = 1,
                 device: Optional[torch.device] = None, real_size: Optional[int] = None) -> None:
        super().__init__()
        tp = pstate.tp
        if replicas < 1 or tp % replicas != 0:
            raise ValueError(f"ColumnParallelLinear: replicas={replicas} must divide tp={tp}")
        n_shards = tp // replicas
        sizes = list(partition_sizes or [out_features])
        if sum(sizes) != out_features:
            raise ValueError(f"partition_sizes {sizes} must sum to out_features={out_features}")
        for s in sizes:
            divide(s, n_shards, "ColumnParallelLinear output block size")
        self.in_features, self.out_features = in_features, out_features
        self.pstate = pstate
        self.gather_output = gather_output
        self.sequence_parallel = pstate.sequence_parallel if sequence_parallel is None else sequence_parallel
        if gather_output and (self.sequence_parallel or replicas > 1):
            raise ValueError("ColumnParallelLinear: gather_output works only without sequence_parallel and replicas")
        self.partition_sizes = sizes
        self.local_sizes = [s // n_shards for s in sizes]
        self.replicas = replicas
        device = torch.device(device) if device is not None else pstate.device
        rows = out_features if real_size is None else real_size

        gen = _generator(seed)
        w_spec = ShardSpec("weight", (rows, in_features), split_dim=0, split_sizes=tuple(sizes), tp=tp,
                           tp_replicas=replicas)
        init = init_method or _default_linear_init
        self.weight = _parameter(w_spec, device, pstate.tp_rank, lambda w: init(w, gen))  # [out/tp, in]
        self.param_specs: dict[str, ShardSpec] = {"weight": w_spec}
        if bias:
            b_spec = ShardSpec("bias", (rows,), split_dim=0, split_sizes=tuple(sizes), tp=tp, tp_replicas=replicas)
            self.bias = _parameter(b_spec, device, pstate.tp_rank, _bias_init(in_features, gen, init_method is None))
            self.param_specs["bias"] = b_spec  # [out/tp]
        else:
            self.register_parameter("bias", None)
        self.linear_fn: Optional[LinearFn] = None

    def forward(self, x: torch.Tensor, input_in_tp_region: bool = False) -> torch.Tensor:
        """x [B, S, in] ([B, S/tp, in] with sequence parallel), or the output of `to_tp_region` when
        `input_in_tp_region`."""
        return column_parallel_linear(x, self.weight, self.bias, self.pstate, self.sequence_parallel,
                                      self.gather_output, input_in_tp_region, self.linear_fn)

    def extra_repr(self) -> str:
        rep = f" x{self.replicas} replicas" if self.replicas > 1 else ""
        return (f"in_features={self.in_features}, out_features={self.out_features} (/{self.pstate.tp}{rep}), "
                f"bias={self.bias is not None}, sequence_parallel={self.sequence_parallel}")


class RowParallelLinear(nn.Module):
    """Linear layer with the input features split across tp: y = sum_ranks(x_local @ W_local^T) + b.

    Input [B, S, in/tp] (already split, e.g. attention heads or MLP hidden); output [B, S, out], or
    [B, S/tp, out] with sequence parallel (reduce-scatter instead of all-reduce). The bias is replicated
    and added after the reduction; with sequence parallel its gradient is per-shard (its spec says so).
    `linear_fn` (None = F.linear) is the local matmul, as in ColumnParallelLinear.
    """

    def __init__(self, in_features: int, out_features: int, pstate: ParallelState, bias: bool = True,
                 input_is_parallel: bool = True, sequence_parallel: Optional[bool] = None,
                 init_method: Optional[InitMethod] = None, seed: Optional[int] = None,
                 device: Optional[torch.device] = None) -> None:
        super().__init__()
        tp = pstate.tp
        divide(in_features, tp, "RowParallelLinear in_features")
        self.in_features, self.out_features = in_features, out_features
        self.pstate = pstate
        self.input_is_parallel = input_is_parallel
        self.sequence_parallel = pstate.sequence_parallel if sequence_parallel is None else sequence_parallel
        if self.sequence_parallel and not input_is_parallel:
            raise ValueError("RowParallelLinear: sequence_parallel needs input_is_parallel=True")
        device = torch.device(device) if device is not None else pstate.device

        gen = _generator(seed)
        w_spec = ShardSpec("weight", (out_features, in_features), split_dim=1, split_sizes=(in_features,), tp=tp)
        init = init_method or _default_linear_init
        self.weight = _parameter(w_spec, device, pstate.tp_rank, lambda w: init(w, gen))  # [out, in/tp]
        self.param_specs: dict[str, ShardSpec] = {"weight": w_spec}
        if bias:
            b_spec = replicated("bias", (out_features,), sequence_parallel=self.sequence_parallel and tp > 1, tp=tp)
            self.bias = _parameter(b_spec, device, pstate.tp_rank, _bias_init(in_features, gen, init_method is None))
            self.param_specs["bias"] = b_spec  # [out], replicated
        else:
            self.register_parameter("bias", None)
        self.linear_fn: Optional[LinearFn] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter_to_tp_region(x, self.pstate)
        y = (self.linear_fn or F.linear)(x, self.weight, None)  # partial sums [B, S, out]
        if self.pstate.tp > 1:
            y = (reduce_scatter_to_sequence_parallel_region(y, self.pstate) if self.sequence_parallel
                 else reduce_from_tp_region(y, self.pstate))
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features} (/{self.pstate.tp}), out_features={self.out_features}, "
                f"bias={self.bias is not None}, sequence_parallel={self.sequence_parallel}")


class VocabParallelEmbedding(nn.Module):
    """Embedding with the vocabulary rows split across tp: rank r holds rows [r*V/tp, (r+1)*V/tp).

    ids [B, S] -> [B, S, D] (all-reduced), or [B, S/tp, D] with sequence parallel (reduce-scattered, so
    the following dropout/norm already run on the sequence shard). `num_embeddings` must divide by tp:
    pad the vocabulary (model.vocab_pad_multiple) and let the loss ignore the padded rows; `real_size`
    is the real vocabulary (the canonical row count).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, pstate: ParallelState,
                 sequence_parallel: Optional[bool] = None, init_method: Optional[InitMethod] = None,
                 seed: Optional[int] = None, device: Optional[torch.device] = None,
                 real_size: Optional[int] = None) -> None:
        super().__init__()
        tp = pstate.tp
        per_rank = divide(num_embeddings, tp, "VocabParallelEmbedding num_embeddings (padded vocabulary)")
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.pstate = pstate
        self.sequence_parallel = pstate.sequence_parallel if sequence_parallel is None else sequence_parallel
        self.vocab_start = pstate.tp_rank * per_rank
        self.vocab_end = self.vocab_start + per_rank
        device = torch.device(device) if device is not None else pstate.device
        rows = num_embeddings if real_size is None else real_size
        spec = ShardSpec("weight", (rows, embedding_dim), split_dim=0, split_sizes=(num_embeddings,), tp=tp)
        init = init_method or (lambda w, g: nn.init.normal_(w, generator=g))  # nn.Embedding's default: N(0, 1)
        gen = _generator(seed)
        self.weight = _parameter(spec, device, pstate.tp_rank, lambda w: init(w, gen))  # [V/tp, D]
        self.param_specs: dict[str, ShardSpec] = {"weight": spec}

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.pstate.tp == 1:
            out = F.embedding(ids, self.weight)
            return scatter_to_sequence_parallel_region(out, self.pstate) if self.sequence_parallel else out
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
        local_ids = (ids - self.vocab_start).masked_fill(outside, 0)
        out = F.embedding(local_ids, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)  # partial [B, S, D]
        if self.sequence_parallel:
            return reduce_scatter_to_sequence_parallel_region(out, self.pstate)
        return reduce_from_tp_region(out, self.pstate)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings} (/{self.pstate.tp}), {self.embedding_dim}, "
                f"sequence_parallel={self.sequence_parallel}")


__all__ = ["ColumnParallelLinear", "RowParallelLinear", "VocabParallelEmbedding", "column_parallel_linear",
           "divide"]
