"""The one initialiser: canonical initial values for every parameter, cut to this rank's shard.

Rules (GPT-2 / Megatron): norm weights 1, biases 0, the output projections of every block (attention
o_proj and MLP down_proj) N(0, init_std / sqrt(2 * n_layers)), every other matrix and embedding
N(0, init_std). The encoder (BERT) keeps N(0, init_std) for the output projections too, as BERT does; its
extra tensors follow the same name rules (type_embed, pooler, nsp_head, mlm_head.dense: N(0, init_std);
embed_norm / mlm_head.norm weights 1; mlm_head.bias and the other biases 0, padding entries included).
Each parameter draws from its own generator, seeded by the run seed and its canonical name (a tied head
copy uses the embedding's), over its full runtime shape, so the values do not depend on construction
order, tp, pp, vpp or dp. One full fp32 tensor exists at a time, on the CPU: peak memory
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


def initial_value(spec: ShardSpec, seed: int, init_std: float, n_layers: int,
                  scale_output_projections: bool = True) -> torch.Tensor:
    """The full runtime tensor (padding included) of `spec` at initialisation, fp32 on the CPU.
    `scale_output_projections` False (the encoder) gives o_proj/down_proj the plain init_std."""
    name = spec.tied_to or spec.name
    full = torch.empty(spec.runtime_shape, dtype=torch.float32)
    if name.endswith("norm.weight"):
        return full.fill_(1.0)
    if name.endswith(".bias"):
        return full.zero_()
    scaled = scale_output_projections and name.endswith(_OUTPUT_PROJECTIONS)
    std = init_std / math.sqrt(2 * n_layers) if scaled else init_std
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
        full = initial_value(spec, seed, cfg.init_std, cfg.n_layers, scale_output_projections=not cfg.encoder)
        local = spec.shard_runtime(full, tp_rank)
        p.copy_(local)


@torch.no_grad()
def materialize(model: nn.Module, device: torch.device | str, seed: int) -> None:
    """A chunk built on the meta device -> real storage on `device`, initialised by `init_parameters`."""
    model.to_empty(device=torch.device(device))
    model.reset_buffers()
    init_parameters(model, seed)


__all__ = ["init_parameters", "initial_value", "materialize", "stable_seed"]
