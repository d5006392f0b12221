"""Final weights: one `model.safetensors` with canonical names and the real vocabulary, from any layout.

Writing is streamed and collective. Every rank walks the canonical tensors in the same order (the full
model's parameter order); the ranks holding a part of the current tensor (data-parallel rank 0 of its
pipeline stage, one holder per distinct tp shard) send their canonical pieces to global rank 0, which
assembles that one tensor and appends it to the file. Rank 0 therefore never holds more than one full
tensor beyond its own shards. Under FSDP2 (tp = pp = 1) each tensor is all-gathered over dp instead.

The file is written in the safetensors format (an 8-byte header length, a JSON header of names, dtypes,
shapes and byte offsets, then the raw little-endian data): the header is known before any data exists,
because the canonical shapes come from the sharding specs. It is written to a temporary name and renamed
when complete, so a crash never leaves a half-written model.safetensors. Loading uses the safetensors
library itself.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from engine.checkpoint.files import pid_alive
from engine.config import ModelConfig
from engine.errors import CheckpointError
from engine.model.transformer import Transformer
from engine.parallel.pipeline.partition import layers_for_stage
from engine.parallel.sharding import ShardSpec, box_view
from engine.parallel.state import ParallelState

__all__ = ["ST_DTYPES", "canonical_specs", "load_weights", "remove_stale_temporaries", "safetensors_header",
           "save_weights"]

ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64"}


def canonical_specs(cfg: ModelConfig, pstate: ParallelState) -> dict[str, ShardSpec]:
    """{canonical name: spec at this run's tp} for the WHOLE model, in parameter order (a meta build: free)."""
    meta = Transformer(cfg, pstate, device="meta")
    return {n: s for n, s in meta.shard_specs().items() if s.tied_to is None}


def _stage_of(name: str, cfg: ModelConfig, pstate: ParallelState, layout: Optional[Sequence[int]]) -> int:
    """The pipeline rank holding a canonical tensor."""
    if name.startswith("layers."):
        layer = int(name.split(".")[1])
        for r in range(pstate.pp):
            for c in range(pstate.vpp):
                if layer in layers_for_stage(cfg.n_layers, pstate.pp, pstate.vpp, r, c, layout):
                    return r
        raise ValueError(f"{name}: layer {layer} is on no pipeline stage")
    if name.startswith(("embed.", "pos_embed.", "type_embed.", "embed_norm.")):  # the encoder's too
        return 0
    return pstate.pp - 1  # final norm, output head (the encoder's MLM head, pooler, next-sentence head)


def _holders(spec: ShardSpec) -> list[int]:
    """tp ranks holding one distinct shard each."""
    if spec.is_split:
        return [r for r in range(spec.tp) if r % spec.tp_replicas == 0]
    return [0]


def safetensors_header(tensors: Sequence[tuple[str, torch.dtype, Sequence[int]]], metadata: dict) -> tuple[bytes, int]:
    """The safetensors header for tensors (name, dtype, shape) written in this order: 8-byte length + JSON
    padded to 8 bytes. Also returns the size of the data that follows. Known before any data exists, so a
    file can be streamed tensor by tensor."""
    entries, offset = {}, 0
    for name, dt, shape in tensors:
        nbytes = math.prod(shape) * torch.empty((), dtype=dt).element_size()
        entries[name] = {"dtype": ST_DTYPES[dt], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header = json.dumps({"__metadata__": metadata, **entries}, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the format pads the header to an 8-byte boundary
    return struct.pack("<Q", len(header)) + header, offset


@torch.no_grad()
def save_weights(path: Path, chunks: Sequence[nn.Module], cfg: ModelConfig, pstate: ParallelState,
                 layout: Optional[Sequence[int]] = None, dtype: Optional[torch.dtype] = None) -> Optional[Path]:
    """Write the canonical weights of the model held by `chunks` over all ranks to `path` (collective:
    every rank calls it). Returns the path on rank 0, None elsewhere."""
    path = Path(path)
    if pstate.is_rank0:
        remove_stale_temporaries(path)
    specs = canonical_specs(cfg, pstate)
    local = {n: p for c in chunks for n, p in c.named_parameters()}
    dtypes = {n: dtype or next(iter(local.values())).dtype for n in specs}
    fsdp = any(hasattr(p, "full_tensor") for p in local.values())
    out = None
    if pstate.is_rank0:
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        out = open(tmp, "wb")
        out.write(safetensors_header([(n, dtypes[n], spec.global_shape) for n, spec in specs.items()],
                                     {"format": "pt", "producer": "tessera", "vocab_size": str(cfg.vocab_size)})[0])
    try:
        for name, spec in specs.items():
            full = _gather_one(name, spec, local, cfg, pstate, layout, fsdp, dtypes[name])
            if out is not None:
                out.write(full.cpu().contiguous().view(torch.uint8).numpy().tobytes())
    except BaseException:
        if out is not None:
            out.close()
            tmp.unlink(missing_ok=True)
        raise
    if out is None:
        return None
    out.close()
    os.replace(tmp, path)
    return path


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Delete `.<name>.tmp<pid>` files next to `path` left by a process that died while writing it (a live
    writer's file is kept). Returns what was removed."""
    removed = []
    for tmp in path.parent.glob(f".{path.name}.tmp*"):
        pid = tmp.name.rsplit(".tmp", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def _gather_one(name: str, spec: ShardSpec, local: dict[str, torch.Tensor], cfg: ModelConfig,
                pstate: ParallelState, layout: Optional[Sequence[int]], fsdp: bool,
                dtype: torch.dtype) -> Optional[torch.Tensor]:
    """The canonical tensor `name` on rank 0 (None elsewhere); the holders send their parts."""
    if fsdp:  # tp = pp = 1: every rank joins the dp all-gather of the parameter
        full = local[name].full_tensor()
        if not pstate.is_rank0:
            return None
        if spec.runtime_shape != spec.global_shape:  # cut the vocabulary padding
            full = full.narrow(spec.split_dim, 0, spec.global_shape[spec.split_dim])
        return full.to(dtype)
    stage = _stage_of(name, cfg, pstate, layout)
    senders = [(r, pstate.global_rank(r, 0, stage)) for r in _holders(spec)]
    if pstate.is_rank0:
        full = torch.empty(spec.global_shape, dtype=dtype, device=pstate.device)
        for tp_rank, src in senders:
            if src == 0:
                for cbox, values in spec.canonical_pieces(local[name].detach(), tp_rank):
                    box_view(full, cbox).copy_(values)
                continue
            shape = spec.local_shape
            for _lbox, cbox in spec.local_to_canonical(((0,) * len(shape), shape), tp_rank):
                buf = torch.empty(cbox[1], dtype=dtype, device=pstate.device)
                dist.recv(buf, src=src)
                box_view(full, cbox).copy_(buf)
        return full
    me = pstate.rank
    for tp_rank, src in senders:
        if src == me:
            for _cbox, values in spec.canonical_pieces(local[name].detach(), tp_rank):
                dist.send(values.to(dtype).contiguous(), dst=0)
    return None


@torch.no_grad()
def load_weights(model: nn.Module, path: Path) -> None:
    """Fill a model (one chunk, any tp rank) from a canonical model.safetensors; padding rows get zeros.

    Errors name the file, the tensor, what was expected and what was found. A file written before weights
    were canonical (vocabulary padded to the runtime size) is accepted by dropping the padding rows."""
    from safetensors.torch import load_file

    path = Path(path)
    try:
        state = load_file(str(path))
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for a bad file
        raise CheckpointError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    specs = model.shard_specs()
    want = {s.tied_to or s.name for s in specs.values()}
    missing = sorted(want - set(state))
    unexpected = sorted(set(state) - want - {"head.weight"})  # old files stored a tied head separately
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not match the model: missing {missing[:5]}, unexpected "
                          f"{unexpected[:5]}")
    tp_rank = model.pstate.tp_rank
    for name, p in model.named_parameters():
        spec = specs[name]
        canon = state[spec.tied_to or spec.name]
        if tuple(canon.shape) != spec.global_shape:
            d = spec.split_dim
            padded_ok = (d is not None and canon.dim() == len(spec.global_shape)
                         and canon.shape[d] >= spec.global_shape[d]
                         and all(a == b for i, (a, b) in enumerate(zip(canon.shape, spec.global_shape)) if i != d))
            if not padded_ok:
                raise CheckpointError(f"{path}: tensor {spec.name!r} has shape {tuple(canon.shape)}, expected "
                                  f"{spec.global_shape}")
            canon = canon.narrow(d, 0, spec.global_shape[d])
        p.copy_(spec.shard_canonical(canon.to(p.dtype), tp_rank).to(p.device))
