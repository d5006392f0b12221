"""The one initialiser: canonical initial values for every parameter, cut to this rank's shard.

Rules (GPT-2 / Megatron): norm weights 1, biases 0, the output projections of every block (attention
o_proj and MLP down_proj) N(0, init_std / sqrt(2 * n_layers)), every other matrix and embedding
N(0, init_std). Each parameter draws from its own generator, seeded by the run seed and its canonical
name (a tied head copy uses the embedding's), over its full runtime shape, so the values do not depend
on construction order, tp, pp, vpp or dp. One full fp32 tensor exists at a time, on the CPU: peak memory
is this rank's shards plus the largest single tensor, not the whole model twice.
"""

from __future__ import annotations

import hashlib
import math

import torch
import torch.nn as nn

from engine.parallel.sharding import ShardSpec

_OUTPUT_PROJECTIONS = ("attn.o_proj.weight", "mlp.down_proj.weight")


def stable_seed(seed: int, name: str) -> int:
    """A seed per parameter name: initial values do not depend on construction order or layout."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def initial_value(spec: ShardSpec, seed: int, init_std: float, n_layers: int) -> torch.Tensor:
    """The full runtime tensor (padding included) of `spec` at initialisation, fp32 on the CPU."""
    name = spec.tied_to or spec.name
    full = torch.empty(spec.runtime_shape, dtype=torch.float32)
    if name.endswith("norm.weight"):
        return full.fill_(1.0)
    if name.endswith(".bias"):
        return full.zero_()
    std = init_std / math.sqrt(2 * n_layers) if name.endswith(_OUTPUT_PROJECTIONS) else init_std
    gen = torch.Generator().manual_seed(stable_seed(seed, name))
    return full.normal_(0.0, std, generator=gen)


@torch.no_grad()
def init_parameters(model: nn.Module, seed: int) -> None:
    """Fill every parameter of a Transformer chunk (already materialised) with its initial shard."""
    specs = model.shard_specs()
    tp_rank = model.pstate.tp_rank
    cfg = model.cfg
    for name, p in model.named_parameters():
        spec = specs[name]
        local = spec.shard_runtime(initial_value(spec, seed, cfg.init_std, cfg.n_layers), tp_rank)
        p.copy_(local)


@torch.no_grad()
def materialize(model: nn.Module, device: torch.device | str, seed: int) -> None:
    """A chunk built on the meta device -> real storage on `device`, initialised by `init_parameters`."""
    model.to_empty(device=torch.device(device))
    model.reset_buffers()
    init_parameters(model, seed)


__all__ = ["init_parameters", "initial_value", "materialize", "stable_seed"]
