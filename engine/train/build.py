"""The one build step, in a fixed order:

    config -> this rank's model chunks on the meta device (nothing allocated)
           -> materialised shard by shard on the device by the one initialiser (engine/model/init.py)
           -> tied embedding copies made equal across pipeline stages
           -> FP8 layer swaps (precision.fp8; engine/precision/fp8_swap.py)
           -> activation-recompute wrappers and torch.compile per block (`wrap_blocks`; train.recompute,
              train.compile), on every chunk of every pipeline stage
           -> data-parallel wrapper (DataParallel for zero 0/1 and one process, FSDP2 for zero 3)
           -> the optimizer over the segments the wrapper says this rank updates

Everything a later step needs is in the returned `Built`: the chunks, their sharding specs by name, the
data-parallel wrapper, the optimizer, this rank's end of a cross-stage embedding tie and the FP8 state.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import nn

from engine.config import Config, ModelConfig
from engine.model.init import materialize
from engine.model.transformer import Transformer
from engine.optim.optimizer import Optimizer
from engine.parallel.data_parallel import DataParallel
from engine.parallel.fsdp import FSDP2
from engine.parallel.pipeline.partition import is_first_stage, is_last_stage, layers_for_stage
from engine.parallel.pipeline.tied import sync_tied_embedding
from engine.parallel.recompute import checkpoint_method
from engine.parallel.sharding import ShardSpec
from engine.parallel.state import ParallelState
from engine.precision.fp8_swap import Fp8Manager, apply_fp8

__all__ = ["Built", "build", "build_chunks", "chunk_specs", "tied_embedding", "wrap_blocks", "wrap_data_parallel"]


@dataclass
class Built:
    chunks: list[Transformer]  # this rank's virtual stages, chunk c = stage c * pp + pp_rank
    specs: dict[str, ShardSpec]  # every parameter of the chunks, by name
    ddp: Union[DataParallel, FSDP2]
    optimizer: Optimizer
    forward: nn.Module  # what runs the forward at pp = 1: chunks[0] (train.compile compiles its blocks in place)
    tied: Optional[nn.Parameter]  # this rank's end of an embedding tied across stages
    fp8: Optional[Fp8Manager] = None  # the FP8 layers and their scaling state (precision.fp8), else None


def build_chunks(cfg: ModelConfig, pstate: ParallelState, seed: int = 1234, layout: Optional[Sequence[int]] = None,
                 device: Optional[torch.device] = None, vpp: Optional[int] = None) -> list[Transformer]:
    """Chunks [chunk 0, ..., chunk vpp-1] of pipeline rank pstate.pp_rank, initialised like the full model.

    Parameter names use global layer indices and init seeds per canonical name, so the union of all stages'
    parameters equals build_model(cfg) exactly. Tied embeddings are synchronised across stages.
    """
    vpp = vpp or pstate.vpp
    device = device or pstate.device
    chunks = []
    for c in range(vpp):
        rng = layers_for_stage(cfg.n_layers, pstate.pp, vpp, pstate.pp_rank, c, layout)
        m = Transformer(cfg, pstate, layer_range=(rng.start, rng.stop), pre_process=is_first_stage(pstate.pp_rank, c),
                        post_process=is_last_stage(pstate.pp, vpp, pstate.pp_rank, c), device="meta")
        materialize(m, device, seed)
        chunks.append(m)
    if pstate.pp > 1:
        sync_tied_embedding(tied_embedding(chunks), pstate)
    return chunks


def wrap_blocks(chunks: Sequence[Transformer], pstate: ParallelState, *, recompute: str = "none",
                recompute_every: int = 1, compile: bool = False) -> None:
    """Activation recompute and torch.compile of every Transformer block of `chunks`, in place (parameter
    names, state dicts and the chunks' own forward are unchanged). Mechanism: engine/parallel/recompute.py.

    recompute: "none"; "selective" = the attention core of every block (`Attention.core`: softmax(QK^T)V
      with its dropout, whose [B, H/tp, S, S] probabilities are the largest activations); "full" = whole
      blocks whose global layer index is a multiple of `recompute_every` (1: every block), keeping only
      their input.
    compile: torch.compile each block's forward (not the whole chunk: the embedding, head and loss stay
      eager, and one compiled graph serves every block of the same structure). With "full" the compiled
      forward runs inside the checkpoint (the recompute wrapper cannot be traced: its backward re-enters
      autograd). With "selective" the compiled block calls the recomputed attention core through
      torch.compiler.disable: a graph break before and after it, the core itself runs eagerly. In eval mode
      (evaluation) blocks run eagerly: a no_grad/eval forward would need graphs of its own.
    Generic over the block: `forward` and `core` are wrapped with *args/**kwargs, never copied.
    """
    if recompute not in ("none", "selective", "full"):
        raise ValueError(f"train.recompute: expected none, selective or full, found {recompute!r}")
    if recompute_every < 1:
        raise ValueError(f"train.recompute_every: expected an integer >= 1, found {recompute_every}")
    for chunk in chunks:
        for index, block in chunk.layers.items():
            if recompute == "selective":
                checkpoint_method(block.attn, "core", pstate)
                if compile:
                    block.attn.core = torch.compiler.disable(block.attn.core)
            if compile:
                block.forward = _compiled_in_training(block)
            if recompute == "full" and int(index) % recompute_every == 0:
                checkpoint_method(block, "forward", pstate)  # around the compiled forward, if any


def _compiled_in_training(block: nn.Module) -> Callable[..., Any]:
    """The block's forward, compiled while the block is in training mode and eager in eval mode: evaluation
    runs a few no_grad forwards per eval interval, not worth compiling once more for."""
    eager = block.forward
    compiled = torch.compile(eager)

    @functools.wraps(eager)
    def forward(*args: Any, **kwargs: Any) -> Any:  # the block's own arguments, whatever they are
        return (compiled if block.training else eager)(*args, **kwargs)

    return forward


def tied_embedding(chunks: Sequence[Transformer]) -> Optional[nn.Parameter]:
    """This rank's end of an embedding tied across pipeline stages, if it holds one."""
    return next((w for w in (c.tied_embedding() for c in chunks) if w is not None), None)


def chunk_specs(chunks: Sequence[Transformer]) -> dict[str, ShardSpec]:
    """{parameter name: spec} over all chunks (names are unique: global layer indices)."""
    specs: dict[str, ShardSpec] = {}
    for c in chunks:
        specs.update(c.shard_specs())
    return specs


def wrap_data_parallel(chunks: Sequence[nn.Module], specs: dict[str, ShardSpec], cfg: Config, pstate: ParallelState,
                       *, bucket_size: int = 2 ** 22, overlap: bool = True
                       ) -> tuple[Union[DataParallel, FSDP2], Optimizer]:
    """The data-parallel wrapper chosen by parallel.zero and the one optimizer over its segments.

    zero 0: all-reduce, every dp rank steps on everything; 1: reduce-scatter, each dp rank steps on 1/dp of
    every bucket (ZeRO-1); 3: FSDP2. One process uses the zero 0 path (no communication)."""
    zero = cfg.parallel.zero
    if zero not in (0, 1, 3):
        raise ValueError(f"parallel.zero must be 0, 1 or 3, found {zero!r}")
    if zero == 3:
        ddp: Union[DataParallel, FSDP2] = FSDP2(chunks, pstate)
        sharded = pstate.dp > 1
    else:
        sharded = zero == 1 and pstate.dp > 1
        ddp = DataParallel(chunks, pstate, bucket_size=bucket_size, overlap=overlap, shard_grads=sharded)
    o = cfg.optim
    with torch.no_grad():
        segments = ddp.segments()
    optimizer = Optimizer(segments, specs, pstate, lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                          weight_decay=o.weight_decay, grads_sharded=sharded, after_step=ddp.sync_params,
                          zero_grad=ddp.zero_grad)
    return ddp, optimizer


def build(cfg: Config, pstate: ParallelState) -> Built:
    """Everything the training step needs, built in the fixed order of the module docstring."""
    p, t = cfg.parallel, cfg.train
    chunks = build_chunks(cfg.model, pstate, seed=t.seed, layout=p.pp_layout, device=pstate.device)
    specs = chunk_specs(chunks)  # before FSDP2 replaces the parameters by DTensors
    tied = tied_embedding(chunks)
    f = cfg.precision.fp8
    fp8 = None if f is None else apply_fp8(
        chunks, pstate, recipe=f.recipe, backend=f.backend, keep_high_precision=f.keep_high_precision,
        n_layers=cfg.model.n_layers, amax_history_len=f.amax_history_len, margin=f.margin)
    # Activation-recompute wrappers and per-block compile, before the data-parallel wrapper (FSDP2 wraps blocks).
    wrap_blocks(chunks, pstate, recompute=t.recompute, recompute_every=t.recompute_every, compile=t.compile)
    ddp, optimizer = wrap_data_parallel(chunks, specs, cfg, pstate)
    return Built(chunks, specs, ddp, optimizer, chunks[0], tied, fp8)
