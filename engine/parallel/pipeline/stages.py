"""Build this rank's model chunks (one per virtual stage it holds)."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from engine.config import ModelConfig
from engine.parallel.pipeline.partition import is_first_stage, is_last_stage, layers_for_stage
from engine.parallel.pipeline.tied import sync_tied_embeddings
from engine.parallel.state import ParallelState


def build_stage_chunks(cfg: ModelConfig, pstate: ParallelState, seed: int = 1234,
                       layout: Optional[Sequence[int]] = None, device: Optional[torch.device] = None,
                       vpp: Optional[int] = None) -> list:
    """Chunks [chunk 0, ..., chunk vpp-1] of pipeline rank pstate.pp_rank, initialised like the full model.

    Parameter names use global layer indices and init seeds per name, so the union of all stages'
    parameters equals build_model(cfg) exactly. Tied embeddings are synchronised across stages.
    """
    from engine.model.transformer import Transformer  # model imports parallel.state; keep import lazy

    vpp = vpp or pstate.vpp
    chunks = []
    for c in range(vpp):
        rng = layers_for_stage(cfg.n_layers, pstate.pp, vpp, pstate.pp_rank, c, layout)
        m = Transformer(cfg, pstate, layer_range=(rng.start, rng.stop),
                        pre_process=is_first_stage(pstate.pp_rank, c),
                        post_process=is_last_stage(pstate.pp, vpp, pstate.pp_rank, c))
        m.init_weights(seed)
        if device is not None:
            m.to(device)
        chunks.append(m)
    if pstate.pp > 1:
        sync_tied_embeddings(chunks, pstate)
    return chunks
