"""Sharding specs: for every model tensor, its canonical name, its global shape, and which part of it this
tensor-parallel rank holds.

The canonical tensor is the one the single-process model would have with the REAL vocabulary: the same
name and shape at every tp, pp, vpp and dp. What a rank holds at run time may differ from it in two ways:

- split over tp along `split_dim`: the runtime tensor along that dim is the concatenation of blocks
  `split_sizes` (one block for an ordinary weight; several for a fused one such as [gate; up]); each
  block is cut into tp / tp_replicas equal pieces and a rank holds piece `tp_rank // tp_replicas` of
  every block (K/V heads are held by `tp_replicas` consecutive ranks when tp > n_kv_heads);
- padded: the runtime size of `split_dim` (sum of split_sizes) may exceed the canonical one. Only the
  vocabulary is padded (to a multiple of vocab_pad_multiple * tp), at the end of its single block; the
  padding rows are a runtime detail that is never saved or exported.

A spec is registered by the layer that creates the parameter and exposed by the model as one mapping
(`Transformer.shard_specs()`); everything that needs to know a tensor's layout (grad norms, tp grad sums,
initialisation, data parallelism, export, checkpoints) reads it there, never from the Parameter object.

Index arithmetic is in "boxes": (start, size) per dimension. `local_boxes(box)` maps a box of this rank's
runtime tensor to the boxes of the canonical tensor it covers, so any sub-range a rank owns (a ZeRO-1
segment, an FSDP2 row range) can be written into, or cut from, the canonical tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional, Sequence

import torch

Box = tuple[tuple[int, ...], tuple[int, ...]]  # (start per dim, size per dim)


@dataclass(frozen=True)
class ShardSpec:
    """The layout of one parameter: canonical name and shape, and this layout's tp split and padding."""

    name: str  # canonical name, e.g. "layers.7.attn.q_proj.weight" (global layer index)
    global_shape: tuple[int, ...]  # canonical shape (real vocabulary)
    split_dim: Optional[int] = None  # dim split over tp and/or padded; None = replicated over tp, unpadded
    split_sizes: tuple[int, ...] = ()  # runtime blocks along split_dim (sum = runtime size, padding included)
    tp: int = 1
    tp_replicas: int = 1  # consecutive tp ranks holding the same shard
    sequence_parallel: bool = False  # replicated over tp, but each rank's gradient covers its sequence shard only
    tied_to: Optional[str] = None  # this parameter is a runtime copy of that canonical tensor (pp tied head)

    def __post_init__(self) -> None:
        if self.split_dim is None:
            return
        if not 0 <= self.split_dim < len(self.global_shape):
            raise ValueError(f"{self.name}: split_dim {self.split_dim} out of range for shape {self.global_shape}")
        if self.tp % self.tp_replicas:
            raise ValueError(f"{self.name}: tp_replicas={self.tp_replicas} must divide tp={self.tp}")
        n = self.n_shards
        for s in self.split_sizes:
            if s % n:
                raise ValueError(f"{self.name}: block size {s} is not divisible into {n} tensor-parallel shards")
        if sum(self.split_sizes) < self.global_shape[self.split_dim]:
            raise ValueError(f"{self.name}: runtime size {sum(self.split_sizes)} along dim {self.split_dim} is "
                             f"smaller than the canonical {self.global_shape[self.split_dim]}")
        if len(self.split_sizes) > 1 and sum(self.split_sizes) != self.global_shape[self.split_dim]:
            raise ValueError(f"{self.name}: only a single-block tensor may be padded")

    # ------------------------------------------------------------ shapes
    @property
    def n_shards(self) -> int:
        return self.tp // self.tp_replicas if self.split_dim is not None else 1

    @property
    def is_split(self) -> bool:
        """Each tp rank holds a different part (a tp-sharded weight)."""
        return self.split_dim is not None and self.n_shards > 1

    @property
    def runtime_shape(self) -> tuple[int, ...]:
        """The full tensor at run time: the canonical shape with padding."""
        if self.split_dim is None:
            return self.global_shape
        shape = list(self.global_shape)
        shape[self.split_dim] = sum(self.split_sizes)
        return tuple(shape)

    @property
    def local_shape(self) -> tuple[int, ...]:
        if self.split_dim is None:
            return self.global_shape
        shape = list(self.global_shape)
        shape[self.split_dim] = sum(self.split_sizes) // self.n_shards
        return tuple(shape)

    @property
    def numel(self) -> int:
        return math.prod(self.global_shape)

    def renamed(self, name: str, tied_to: Optional[str] = None) -> "ShardSpec":
        return replace(self, name=name, tied_to=tied_to)

    # ------------------------------------------------------------ who counts it
    def counts_once(self, tp_rank: int) -> bool:
        """Whether this tp rank's copy is the one to count when summing over tp (norms, parameter counts):
        every distinct shard once (on the first of its replicas), a replicated tensor on tp rank 0. A tied
        copy never counts: its canonical tensor is counted where it lives."""
        if self.tied_to is not None:
            return False
        if self.is_split:
            return tp_rank % self.tp_replicas == 0
        return tp_rank == 0 or self.tp == 1

    # ------------------------------------------------------------ index maps
    def pieces(self, tp_rank: int) -> list[tuple[int, int, int]]:
        """(local start, canonical start, length) along split_dim: the canonical rows this rank holds.
        Padding rows (runtime index >= canonical size) are left out. [(0, 0, n)] when not split."""
        if self.split_dim is None:
            return [(0, 0, self.global_shape[0] if self.global_shape else 1)]
        n, shard = self.n_shards, tp_rank // self.tp_replicas
        real = self.global_shape[self.split_dim]
        out, local, runtime = [], 0, 0
        for block in self.split_sizes:
            size = block // n
            lo = runtime + shard * size
            hi = min(lo + size, real)
            if hi > lo:
                out.append((local, lo, hi - lo))
            local += size
            runtime += block
        return out

    def local_to_canonical(self, box: Box, tp_rank: int) -> list[tuple[Box, Box]]:
        """A box of this rank's runtime tensor -> [(sub-box in local coords, the same elements' box in the
        canonical tensor)]. Parts of the box that fall on padding are dropped."""
        start, size = box
        if self.split_dim is None or not self.global_shape:
            return [(box, box)]
        d = self.split_dim
        out = []
        for l0, c0, n in self.pieces(tp_rank):
            lo, hi = max(start[d], l0), min(start[d] + size[d], l0 + n)
            if hi <= lo:
                continue
            ls, lz = list(start), list(size)
            ls[d], lz[d] = lo, hi - lo
            cs = list(start)
            cs[d] = c0 + (lo - l0)
            out.append(((tuple(ls), tuple(lz)), (tuple(cs), tuple(lz))))
        return out

    def canonical_numel_held(self, tp_rank: int) -> int:
        """Elements of the canonical tensor this tp rank holds (padding excluded)."""
        box = ((0,) * len(self.local_shape), self.local_shape)
        return sum(math.prod(c[1]) for _, c in self.local_to_canonical(box, tp_rank))

    # ------------------------------------------------------------ tensors
    def shard_runtime(self, full: torch.Tensor, tp_rank: int) -> torch.Tensor:
        """This rank's shard of a full RUNTIME tensor (padding included), e.g. from the initialiser."""
        if tuple(full.shape) != self.runtime_shape:
            raise ValueError(f"{self.name}: expected a runtime tensor of shape {self.runtime_shape}, "
                             f"found {tuple(full.shape)}")
        if self.split_dim is None or self.n_shards == 1:
            return full  # the whole tensor: no copy (the initialiser's peak is one full tensor)
        return shard_tensor(full, self.split_dim, self.split_sizes, tp_rank // self.tp_replicas, self.n_shards)

    def shard_canonical(self, canonical: torch.Tensor, tp_rank: int) -> torch.Tensor:
        """This rank's runtime shard of a CANONICAL tensor (loaded weights); padding rows are zero."""
        if tuple(canonical.shape) != self.global_shape:
            raise ValueError(f"{self.name}: expected shape {self.global_shape}, found {tuple(canonical.shape)}")
        local = torch.zeros(self.local_shape, dtype=canonical.dtype, device=canonical.device)
        full_box = ((0,) * len(self.local_shape), self.local_shape)
        for lbox, cbox in self.local_to_canonical(full_box, tp_rank):
            box_view(local, lbox).copy_(box_view(canonical, cbox))
        return local

    def canonical_pieces(self, local: torch.Tensor, tp_rank: int) -> list[tuple[Box, torch.Tensor]]:
        """The canonical boxes this rank's runtime tensor covers, with their values (views of `local`)."""
        full_box = ((0,) * local.dim(), tuple(local.shape))
        return [(cbox, box_view(local, lbox)) for lbox, cbox in self.local_to_canonical(full_box, tp_rank)]


def shard_tensor(full: torch.Tensor, dim: int, sizes: Sequence[int], rank: int, world: int) -> torch.Tensor:
    """Shard `rank` of `world` of `full` along `dim`, where `full` is the concatenation of blocks of `sizes`
    (e.g. [gate; up] or [q; k; v]) and every block is split evenly, so each rank holds matching pieces of
    all blocks: shard = cat(block_0[rank], block_1[rank], ...)."""
    blocks = full.split(list(sizes), dim=dim)
    for b in blocks:
        if b.shape[dim] % world:
            raise ValueError(f"cannot split a block of size {b.shape[dim]} along dim {dim} evenly across tp={world}")
    return torch.cat([b.chunk(world, dim=dim)[rank] for b in blocks], dim=dim).contiguous()


def collect_specs(module: torch.nn.Module, default_replicated: bool = False) -> dict[str, ShardSpec]:
    """{parameter name: spec} over a module tree: every submodule's `param_specs` ({name relative to that
    submodule: spec}), renamed to the full parameter name. A parameter without spec is an error, or, with
    `default_replicated` (a plain torch module in one process), a replicated tensor of its own shape."""
    specs: dict[str, ShardSpec] = {}
    for prefix, m in module.named_modules():
        for rel, spec in getattr(m, "param_specs", {}).items():
            name = f"{prefix}.{rel}" if prefix else rel
            specs[name] = spec.renamed(name, spec.tied_to)
    missing = [n for n, _ in module.named_parameters() if n not in specs]
    if default_replicated:
        params = dict(module.named_parameters())
        specs.update({n: replicated(n, params[n].shape) for n in missing})
        missing = []
    if missing:
        raise ValueError(f"parameters without a sharding spec: {missing[:5]}")
    return specs


def box_view(t: torch.Tensor, box: Box) -> torch.Tensor:
    """The view of `t` covered by `box`."""
    start, size = box
    for d, (s, n) in enumerate(zip(start, size)):
        t = t.narrow(d, s, n)
    return t


def flat_range_boxes(shape: Sequence[int], lo: int, hi: int) -> list[Box]:
    """The elements [lo, hi) of a row-major tensor of `shape` as a few boxes (at most 2 per dim + 1):
    a partial first row, whole rows, a partial last row, recursively."""
    shape = tuple(shape)
    if hi <= lo:
        return []
    if not shape:
        return [((), ())]
    if len(shape) == 1:
        return [((lo,), (hi - lo,))]
    inner = math.prod(shape[1:])
    out: list[Box] = []
    r0, r1 = lo // inner, (hi - 1) // inner  # first and last row touched
    if r0 == r1:
        for s, z in flat_range_boxes(shape[1:], lo - r0 * inner, hi - r0 * inner):
            out.append(((r0, *s), (1, *z)))
        return out
    first_full = r0 if lo % inner == 0 else r0 + 1
    last_full = r1 if hi % inner == 0 else r1 - 1  # inclusive
    if lo % inner:
        for s, z in flat_range_boxes(shape[1:], lo - r0 * inner, inner):
            out.append(((r0, *s), (1, *z)))
    if last_full >= first_full:
        out.append(((first_full, *(0,) * (len(shape) - 1)), (last_full - first_full + 1, *shape[1:])))
    if hi % inner:
        for s, z in flat_range_boxes(shape[1:], 0, hi - r1 * inner):
            out.append(((r1, *s), (1, *z)))
    return out


def replicated(name: str, shape: Sequence[int], sequence_parallel: bool = False, tp: int = 1) -> ShardSpec:
    """A tensor every tp rank holds whole (norm weights, row-parallel biases, learned positions)."""
    return ShardSpec(name=name, global_shape=tuple(shape), tp=tp, sequence_parallel=sequence_parallel)


__all__ = ["Box", "ShardSpec", "box_view", "collect_specs", "flat_range_boxes", "replicated", "shard_tensor"]
