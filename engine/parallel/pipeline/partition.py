"""Which transformer layers live on which pipeline stage.

Virtual stage s = chunk*pp + pp_rank (Megatron's interleaved order), so with vpp > 1 rank r holds
the non-contiguous blocks s = r, r+pp, ... The default is an even split; `layout` gives the layer
count of every virtual stage explicitly, e.g. [3, 4, 4, 3] puts fewer blocks on the first and last
stage, which also carry the embedding and the output head.
"""

from __future__ import annotations

from typing import Optional, Sequence


class PartitionError(ValueError):
    """Layers cannot be split as requested."""


def stage_sizes(n_layers: int, num_stages: int, layout: Optional[Sequence[int]] = None) -> list[int]:
    """Layer count of each virtual stage (len = num_stages)."""
    if num_stages < 1:
        raise PartitionError(f"need at least one pipeline stage, found {num_stages}")
    if layout is not None:
        layout = list(layout)
        if len(layout) != num_stages:
            raise PartitionError(f"pp_layout has {len(layout)} entries but pp*vpp = {num_stages} stages; "
                                 f"give one layer count per virtual stage")
        if any(x < 0 for x in layout) or sum(layout) != n_layers:
            raise PartitionError(f"pp_layout {layout} must be non-negative counts summing to n_layers={n_layers} "
                                 f"(sums to {sum(layout)})")
        return layout
    if n_layers % num_stages != 0:
        raise PartitionError(f"n_layers={n_layers} does not split evenly into pp*vpp={num_stages} stages; "
                             f"change the sizes or give an explicit pp_layout")
    return [n_layers // num_stages] * num_stages


def layers_for_stage(n_layers: int, pp: int, vpp: int, pp_rank: int, chunk: int,
                     layout: Optional[Sequence[int]] = None) -> range:
    """Global layer indices held by `chunk` of pipeline rank `pp_rank`."""
    if not (0 <= pp_rank < pp and 0 <= chunk < vpp):
        raise PartitionError(f"pp_rank={pp_rank}, chunk={chunk} out of range for pp={pp}, vpp={vpp}")
    sizes = stage_sizes(n_layers, pp * vpp, layout)
    s = chunk * pp + pp_rank
    start = sum(sizes[:s])
    return range(start, start + sizes[s])


def is_first_stage(pp_rank: int, chunk: int) -> bool:
    """Holds the embedding: virtual stage 0."""
    return pp_rank == 0 and chunk == 0


def is_last_stage(pp: int, vpp: int, pp_rank: int, chunk: int) -> bool:
    """Holds the final norm, output head and loss: the last virtual stage."""
    return pp_rank == pp - 1 and chunk == vpp - 1
