"""The one Transformer of Tessera: decoder-only, or the encoder variant (BERT).

GPT-2 (LayerNorm, learned positions, GELU, biases, tied embeddings) and Llama / Qwen2 /
Mistral (RMSNorm, RoPE, SwiGLU, GQA/MQA, optional QKV bias, untied head) are field values of
ModelConfig, not subclasses. So is BERT (`model.encoder`): bidirectional attention, token-type
embeddings, embedding norm, post-norm blocks and the masked-LM head (+ pooler and next-sentence head
with `binary_head`); its last stage returns (mlm_logits, nsp_logits or None) instead of logits.
Shapes: B batch, S sequence, D d_model, H heads, Hkv kv heads, hd head_dim, V padded vocabulary.

Tensor parallelism is a property of the layers: q/k/v and MLP up/gate are column-parallel, the
output projections row-parallel, the embedding vocab-parallel and the head column-parallel (its
logits stay split along the vocabulary; `engine.model.loss.lm_loss(..., pstate=)` never gathers
them). With sequence parallelism the residual stream, norms and dropout run on [B, S/tp, D] shards.
At tp=1 the layers are plain nn.Linear / nn.Embedding math.

A model object can be one pipeline stage: it holds the blocks `layer_range` (global indices, so
parameter names and initial values do not depend on the parallel layout), the embedding when
`pre_process` and the final norm + output head when `post_process` (the encoder: its heads).

State: `shard_specs()` maps every parameter name to its ShardSpec (canonical name, global shape with the
real vocabulary, tp split and padding). A tied head on a last pipeline stage without the embedding is a
runtime copy (`tied_to="embed.weight"`), not a tensor of its own. Built on the meta device (the default of
`build_model`/the build module), the model allocates nothing until it is materialised shard by shard
(engine/model/init.py).
"""

from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.config import ModelConfig
from engine.model import ops
from engine.model.attention import attention, check_backend
from engine.parallel.collectives import gather_from_sequence_parallel_region, to_tp_region
from engine.parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, column_parallel_linear
from engine.parallel.random import model_parallel_rng
from engine.parallel.sharding import ShardSpec, collect_specs, replicated
from engine.parallel.state import ParallelState


# --------------------------------------------------------------------------- derived sizes


def head_dim(cfg: ModelConfig) -> int:
    return cfg.head_dim or cfg.d_model // cfg.n_heads


def kv_heads(cfg: ModelConfig) -> int:
    return cfg.n_kv_heads or cfg.n_heads


def ffn_hidden(cfg: ModelConfig) -> int:
    if cfg.ffn_hidden:
        return cfg.ffn_hidden
    if cfg.activation == "swiglu":  # Llama: 2/3 of 4*D, rounded up to a multiple of 256
        return 256 * math.ceil(int(8 * cfg.d_model / 3) / 256)
    return 4 * cfg.d_model


def padded_vocab(cfg: ModelConfig, tp: int = 1) -> int:
    """Vocabulary rounded up to a multiple of vocab_pad_multiple * tp (each tp shard stays aligned)."""
    mult = cfg.vocab_pad_multiple * tp
    return mult * math.ceil(cfg.vocab_size / mult)


# --------------------------------------------------------------------------- layers


class Norm(nn.Module):
    """RMSNorm or LayerNorm over the last dimension."""

    def __init__(self, cfg: ModelConfig, pstate: Optional[ParallelState] = None,
                 device: Optional[torch.device] = None):
        super().__init__()
        pstate = pstate or ParallelState.single()
        self.kind, self.eps, self.fused = cfg.norm, cfg.norm_eps, cfg.fused_ops
        self.weight = nn.Parameter(torch.ones(cfg.d_model, device=device))
        has_bias = cfg.norm == "layernorm" and cfg.bias
        self.bias = nn.Parameter(torch.zeros(cfg.d_model, device=device)) if has_bias else None
        # With sequence parallel it runs on a sequence shard: its gradients are per-shard partial sums.
        sp = pstate.sequence_parallel and pstate.tp > 1
        self.param_specs: dict[str, ShardSpec] = {
            n: replicated(n, (cfg.d_model,), sequence_parallel=sp, tp=pstate.tp)
            for n in (("weight", "bias") if has_bias else ("weight",))}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "rmsnorm":
            return ops.rms_norm(x, self.weight, self.eps, fused=self.fused)
        return ops.layer_norm(x, self.weight, self.bias, self.eps, fused=self.fused)


def _check_tp_heads(cfg: ModelConfig, tp: int) -> int:
    """KV replicas per shard: 1 when tp divides n_kv_heads, tp/n_kv_heads when n_kv_heads divides tp."""
    kv = kv_heads(cfg)
    if cfg.n_heads % tp != 0:
        raise ValueError(f"tensor parallelism: model.n_heads={cfg.n_heads} is not divisible by parallel.tp={tp}; "
                         f"every tp rank needs a whole number of attention heads")
    if kv % tp == 0:
        return 1
    if tp % kv == 0:
        return tp // kv  # Megatron-style: each KV head is replicated on tp/kv consecutive ranks
    raise ValueError(f"tensor parallelism: model.n_kv_heads={kv} and parallel.tp={tp}: one must divide the other")


class Attention(nn.Module):
    """Self-attention; at tp > 1 this rank holds H/tp query heads and the K/V heads they use."""

    def __init__(self, cfg: ModelConfig, pstate: ParallelState, device: Optional[torch.device] = None):
        super().__init__()
        tp = pstate.tp
        kv_replicas = _check_tp_heads(cfg, tp)
        self.n_heads, self.n_kv, self.hd = cfg.n_heads, kv_heads(cfg), head_dim(cfg)
        qkv_bias = cfg.bias if cfg.qkv_bias is None else cfg.qkv_bias
        d, hq, hkv = cfg.d_model, self.n_heads * self.hd, self.n_kv * self.hd
        self.q_proj = ColumnParallelLinear(d, hq, pstate, bias=qkv_bias, device=device)  # -> [B, S, H/tp * hd]
        self.k_proj = ColumnParallelLinear(d, hkv, pstate, bias=qkv_bias, replicas=kv_replicas, device=device)
        self.v_proj = ColumnParallelLinear(d, hkv, pstate, bias=qkv_bias, replicas=kv_replicas, device=device)
        self.o_proj = RowParallelLinear(hq, d, pstate, bias=cfg.bias, device=device)  # [B, S, H/tp*hd] -> [B, S, D]
        self.dropout, self.backend, self.fused = cfg.dropout, cfg.attention, cfg.fused_ops
        self.causal = not cfg.encoder  # the encoder attends in both directions
        self.pstate = pstate

    def forward(self, x: torch.Tensor, rope: Optional[tuple[torch.Tensor, torch.Tensor]],
                doc_ids: Optional[torch.Tensor]) -> torch.Tensor:
        # x [B, S, D], or [B, S/tp, D] with sequence parallel; one collective for the three projections
        x = to_tp_region(x, self.pstate, self.q_proj.sequence_parallel)  # [B, S, D]
        q, k, v = (proj(x, input_in_tp_region=True) for proj in (self.q_proj, self.k_proj, self.v_proj))
        b, s, _ = q.shape  # full sequence
        q = q.view(b, s, -1, self.hd).transpose(1, 2)  # [B, H/tp, S, hd]
        k = k.view(b, s, -1, self.hd).transpose(1, 2)  # [B, Hkv/tp (at least 1), S, hd]
        v = v.view(b, s, -1, self.hd).transpose(1, 2)
        if rope is not None:
            q, k = ops.apply_rope(q, k, *rope, fused=self.fused)
        y = self.core(q, k, v, doc_ids)  # [B, H/tp, S, hd]
        y = y.transpose(1, 2).reshape(b, s, -1)  # [B, S, H*hd]
        return self.o_proj(y)

    def core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             doc_ids: Optional[torch.Tensor]) -> torch.Tensor:
        """The attention core softmax(q k^T) v with its dropout: q [B, H/tp, S, hd], k/v [B, Hkv/tp, S, hd]
        -> [B, H/tp, S, hd]. Its own method so that selective recompute can wrap exactly this part."""
        p = self.dropout if self.training else 0.0
        with model_parallel_rng(self.pstate) if p > 0 else contextlib.nullcontext():  # heads differ per tp rank
            return attention(q, k, v, causal=self.causal, doc_ids=doc_ids, dropout_p=p, backend=self.backend)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, pstate: ParallelState, device: Optional[torch.device] = None):
        super().__init__()
        hidden = ffn_hidden(cfg)
        if hidden % pstate.tp != 0:
            raise ValueError(f"tensor parallelism: the MLP hidden size {hidden} (model.ffn_hidden) is not divisible "
                             f"by parallel.tp={pstate.tp}")
        self.activation, self.fused = cfg.activation, cfg.fused_ops
        # gate and up are separate column-parallel layers, so rank r holds the SAME hidden units [r*F/tp,
        # (r+1)*F/tp) of both and silu(gate) * up pairs correctly; down is row-parallel over those units.
        if cfg.activation == "swiglu":
            self.gate_proj = ColumnParallelLinear(cfg.d_model, hidden, pstate, bias=cfg.bias, device=device)
        self.up_proj = ColumnParallelLinear(cfg.d_model, hidden, pstate, bias=cfg.bias, device=device)  # [B, S, F/tp]
        self.down_proj = RowParallelLinear(hidden, cfg.d_model, pstate, bias=cfg.bias, device=device)
        self.pstate = pstate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x [B, S, D] or [B, S/tp, D] (sequence parallel); one collective for gate and up
        x = to_tp_region(x, self.pstate, self.up_proj.sequence_parallel)
        up = self.up_proj(x, input_in_tp_region=True)  # [B, S, F/tp]
        if self.activation == "swiglu":
            h = ops.swiglu(self.gate_proj(x, input_in_tp_region=True), up, fused=self.fused)
        else:
            h = activate(up, self.activation)
        return self.down_proj(h)  # [B, S, D] or [B, S/tp, D]


def activate(x: torch.Tensor, kind: str) -> torch.Tensor:
    """The single-input activations: gelu = GPT-2's tanh approximation, gelu_exact = the erf form (BERT)."""
    if kind == "gelu":
        return F.gelu(x, approximate="tanh")
    if kind == "gelu_exact":
        return F.gelu(x)
    if kind == "relu":
        return F.relu(x)
    raise ValueError(f"model.activation: {kind!r} is not a single-input activation (gelu, gelu_exact or relu)")


def residual_dropout(drop: nn.Dropout, y: torch.Tensor, pstate: ParallelState) -> torch.Tensor:
    """Dropout on the residual stream. With sequence parallel each tp rank holds different positions, so its
    mask comes from its own stream; replicated activations use the shared default stream (equal masks)."""
    if pstate.sequence_parallel and drop.training and drop.p > 0:
        with model_parallel_rng(pstate):
            return drop(y)
    return drop(y)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)). With model.norm_position=post
    (BERT): x = attn_norm(x + attn(x)), then x = mlp_norm(x + mlp(x))."""

    def __init__(self, cfg: ModelConfig, pstate: ParallelState, device: Optional[torch.device] = None):
        super().__init__()
        self.attn_norm = Norm(cfg, pstate, device)
        self.attn = Attention(cfg, pstate, device)
        self.mlp_norm = Norm(cfg, pstate, device)
        self.mlp = MLP(cfg, pstate, device)
        self.drop = nn.Dropout(cfg.dropout)
        self.post_norm = cfg.norm_position == "post"
        self.pstate = pstate

    def forward(self, x: torch.Tensor, rope: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
                doc_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        # x [B, S, D], or [B, S/tp, D] with sequence parallel
        if self.post_norm:
            x = self.attn_norm(x + residual_dropout(self.drop, self.attn(x, rope, doc_ids), self.pstate))
            return self.mlp_norm(x + residual_dropout(self.drop, self.mlp(x), self.pstate))
        x = x + residual_dropout(self.drop, self.attn(self.attn_norm(x), rope, doc_ids), self.pstate)
        return x + residual_dropout(self.drop, self.mlp(self.mlp_norm(x)), self.pstate)


class MLMHead(nn.Module):
    """BERT's masked-LM head up to the vocabulary projection (HF BertPredictionHeadTransform): dense D->D,
    activation, norm, on [B, S, D] or the sequence shard [B, S/tp, D]; then the vocabulary projection by the
    model's tied embedding or untied head (column-parallel) plus `bias` [V_padded/tp]: vocab-parallel like the
    head's rows, its canonical tensor has the real vocabulary and the padding entries stay zero."""

    def __init__(self, cfg: ModelConfig, pstate: ParallelState, vocab_padded: int,
                 device: Optional[torch.device] = None):
        super().__init__()
        d, tp = cfg.d_model, pstate.tp
        sp = pstate.sequence_parallel and tp > 1
        self.activation = "gelu_exact" if cfg.activation == "swiglu" else cfg.activation
        self.dense = nn.Linear(d, d, bias=cfg.bias, device=device)  # replicated
        self.norm = Norm(cfg, pstate, device)
        # on a sequence shard each rank's gradient covers its positions only (summed over tp, like the norms)
        self.param_specs: dict[str, ShardSpec] = {"dense.weight": replicated("dense.weight", (d, d), sp, tp)}
        if cfg.bias:
            self.param_specs["dense.bias"] = replicated("dense.bias", (d,), sp, tp)
            self.bias = nn.Parameter(torch.zeros(vocab_padded // tp, device=device))  # [V_padded/tp]
            self.param_specs["bias"] = ShardSpec("bias", (cfg.vocab_size,), split_dim=0, split_sizes=(vocab_padded,),
                                                 tp=tp)
        else:
            self.register_parameter("bias", None)

    def transform(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm(activate(self.dense(h), self.activation))  # [B, S(/tp), D]


# --------------------------------------------------------------------------- model


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, pstate: Optional[ParallelState] = None,
                 layer_range: Optional[tuple[int, int]] = None, pre_process: bool = True,
                 post_process: bool = True, device: Optional[torch.device | str] = None):
        """device: where parameters live; "meta" allocates nothing (materialise with engine.model.init).
        None = pstate.device, with the layers' own torch-style default init (tests of single layers)."""
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("model.vocab_size must be set (> 0) before building the model; the training "
                             "entry point fills it from the tokenizer")
        check_backend(cfg.attention)
        self.cfg = cfg
        self.pstate = pstate or ParallelState.single()
        device = torch.device(device) if device is not None else self.pstate.device
        self.pre_process, self.post_process = pre_process, post_process
        start, stop = layer_range or (0, cfg.n_layers)
        self.layer_range = (start, stop)
        self.vocab_size = cfg.vocab_size
        self.padded_vocab = padded_vocab(cfg, self.pstate.tp)
        d, tp = cfg.d_model, self.pstate.tp

        self.sequence_parallel = self.pstate.sequence_parallel and tp > 1
        self.param_specs: dict[str, ShardSpec] = {}  # parameters of plain torch submodules
        # encoder parts (None where this chunk or this config has none)
        self.type_embed: Optional[nn.Embedding] = None
        self.embed_norm: Optional[Norm] = None
        self.mlm_head: Optional[MLMHead] = None
        self.pooler: Optional[nn.Linear] = None
        self.nsp_head: Optional[nn.Linear] = None
        if pre_process:
            # rows split over tp; the canonical embedding has the real vocabulary (padding is runtime only)
            self.embed = VocabParallelEmbedding(self.padded_vocab, d, self.pstate, device=device,
                                                real_size=cfg.vocab_size)
            if cfg.position == "learned":
                self.pos_embed = nn.Embedding(cfg.max_seq_len, d, device=device)  # replicated
                # with sequence parallel each rank adds only its positions: a partial gradient
                self.param_specs["pos_embed.weight"] = replicated(
                    "pos_embed.weight", (cfg.max_seq_len, d), sequence_parallel=self.sequence_parallel, tp=tp)
            if cfg.encoder and cfg.type_vocab_size > 0:
                self.type_embed = nn.Embedding(cfg.type_vocab_size, d, device=device)  # replicated, like positions
                self.param_specs["type_embed.weight"] = replicated(
                    "type_embed.weight", (cfg.type_vocab_size, d), sequence_parallel=self.sequence_parallel, tp=tp)
            if cfg.embed_norm:
                self.embed_norm = Norm(cfg, self.pstate, device)
            self.embed_drop = nn.Dropout(cfg.dropout)
        # ModuleDict keyed by the global layer index: names match the full model on every stage.
        self.layers = nn.ModuleDict({str(i): Block(cfg, self.pstate, device) for i in range(start, stop)})
        self.head: Optional[ColumnParallelLinear] = None
        if post_process:
            # post-norm blocks end normalised: no final norm (BERT)
            self.norm = Norm(cfg, self.pstate, device) if cfg.norm_position == "pre" else None
            # Tied and holding the embedding: reuse it. A last pipeline stage without the embedding keeps a
            # runtime copy, kept equal by the pipeline code. Column-parallel: logits split over the vocabulary.
            if not (cfg.tie_embeddings and pre_process):
                self.head = ColumnParallelLinear(d, self.padded_vocab, self.pstate, bias=False, device=device,
                                                 real_size=cfg.vocab_size)
            if cfg.encoder:
                self.mlm_head = MLMHead(cfg, self.pstate, self.padded_vocab, device)
                if cfg.binary_head:
                    # replicated and fed the replicated first token: full (not partial) gradients on every rank
                    self.pooler = nn.Linear(d, d, bias=cfg.bias, device=device)
                    self.nsp_head = nn.Linear(d, 2, bias=cfg.bias, device=device)
                    for name, shape in (("pooler", (d, d)), ("nsp_head", (2, d))):
                        self.param_specs[f"{name}.weight"] = replicated(f"{name}.weight", shape, tp=tp)
                        if cfg.bias:
                            self.param_specs[f"{name}.bias"] = replicated(f"{name}.bias", shape[:1], tp=tp)
        if cfg.position == "rope":
            cos, sin = ops.rope_cache(head_dim(cfg), cfg.max_seq_len, cfg.rope_theta, scaling=ops.rope_scaling_of(cfg))
            buf_device = device if device.type != "meta" else None  # tables are small: real even on meta builds
            self.register_buffer("rope_cos", cos.to(buf_device), persistent=False)
            self.register_buffer("rope_sin", sin.to(buf_device), persistent=False)

    # ------------------------------------------------------------ state
    def shard_specs(self) -> dict[str, ShardSpec]:
        """{parameter name: ShardSpec} of this chunk. The names are the canonical ones (global layer index);
        a tied head held apart from the embedding is marked `tied_to="embed.weight"`."""
        specs = collect_specs(self)
        if self.head is not None and self.cfg.tie_embeddings:
            specs["head.weight"] = specs["head.weight"].renamed("head.weight", tied_to="embed.weight")
        return specs

    def tied_embedding(self) -> Optional[nn.Parameter]:
        """This chunk's end of an embedding tied ACROSS pipeline stages (the embedding on the first stage,
        the head copy on the last), or None when the tie is inside this chunk or there is none."""
        if not self.cfg.tie_embeddings or (self.pre_process and self.post_process):
            return None
        if self.pre_process:
            return self.embed.weight
        if self.post_process:
            return self.head.weight
        return None

    def reset_buffers(self) -> None:
        """Recompute the non-persistent buffers (RoPE tables) after `to_empty` materialised the module."""
        if self.cfg.position == "rope":
            cos, sin = ops.rope_cache(head_dim(self.cfg), self.cfg.max_seq_len, self.cfg.rope_theta,
                                      scaling=ops.rope_scaling_of(self.cfg))
            self.rope_cos = cos.to(self.rope_cos.device)
            self.rope_sin = sin.to(self.rope_sin.device)

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """The one initialiser (engine/model/init.py): every layout starts from the same canonical weights."""
        from engine.model.init import init_parameters

        init_parameters(self, seed)

    # ------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, position_ids: Optional[torch.Tensor] = None,
                doc_ids: Optional[torch.Tensor] = None, token_types: Optional[torch.Tensor] = None
                ) -> torch.Tensor | tuple[torch.Tensor, Optional[torch.Tensor]]:
        """x: token ids [B, S] (first stage) or hidden states [B, S, D] (later stages). doc_ids [B, S]: attention
        stays within runs of equal ids (packed documents; for the encoder also padding: real 0, pads 1).
        token_types [B, S] (encoder, first stage; None = all type 0).
        Returns, on the last stage, logits [B, S, V] (V = padded vocab / tp), or for the encoder the pair
        (mlm_logits [B, S, V], nsp_logits [B, 2] or None without binary_head); hidden states otherwise."""
        tp, sp = self.pstate.tp, self.sequence_parallel
        if self.pre_process:
            if sp and x.shape[1] % tp != 0:
                raise ValueError(f"sequence parallel: sequence length {x.shape[1]} is not divisible by tp={tp}")
            h = self.embed(x)  # [B, S, D], or [B, S/tp, D] with sequence parallel
            if self.cfg.position == "learned":
                pos = position_ids if position_ids is not None else torch.arange(x.shape[1], device=x.device)
                if sp:  # this rank's contiguous block of positions
                    pos = pos.chunk(tp, dim=-1)[self.pstate.tp_rank]
                h = h + self.pos_embed(pos)
            h = self._add_token_types(h, x, token_types)
            if self.embed_norm is not None:  # BERT's order: sum -> norm -> dropout
                h = self.embed_norm(h)
            h = residual_dropout(self.embed_drop, h, self.pstate)
        else:
            h = x
        rope = None
        if self.cfg.position == "rope":
            s = h.shape[1] * (tp if sp else 1)  # attention sees the full sequence
            if position_ids is None:
                rope = (self.rope_cos[:s], self.rope_sin[:s])
            else:  # [B, S] -> [B, S, hd]
                rope = (self.rope_cos[position_ids], self.rope_sin[position_ids])
        for block in self.layers.values():
            h = block(h, rope, doc_ids)
        if not self.post_process:
            return h
        if self.norm is not None:
            h = self.norm(h)
        weight = self.embed.weight if self.head is None else self.head.weight  # [V/tp, D]
        if not self.cfg.encoder:
            return column_parallel_linear(h, weight, None, self.pstate, sequence_parallel=sp)  # [B, S, V/tp]
        t = self.mlm_head.transform(h)  # [B, S(/tp), D]
        mlm_logits = column_parallel_linear(t, weight, self.mlm_head.bias, self.pstate, sequence_parallel=sp)
        nsp_logits = None
        if self.pooler is not None:
            pooled = torch.tanh(self.pooler(self._first_token(h)))  # [B, D]
            nsp_logits = self.nsp_head(pooled)  # [B, 2], equal on every tp rank
        return mlm_logits, nsp_logits  # [B, S, V/tp], [B, 2] or None

    def _add_token_types(self, h: torch.Tensor, ids: torch.Tensor, token_types: Optional[torch.Tensor]) -> torch.Tensor:
        """h [B, S(/tp), D] + the token-type embedding (type 0 everywhere when token_types is None)."""
        if self.type_embed is None:
            if token_types is not None:
                raise ValueError("token_types given, but this model has no token-type embedding: expected "
                                 "model.encoder=true and model.type_vocab_size > 0, found "
                                 f"encoder={self.cfg.encoder}, type_vocab_size={self.cfg.type_vocab_size}")
            return h
        if token_types is None:
            return h + self.type_embed.weight[0]  # the same as looking up type 0 at every position
        if token_types.shape != ids.shape[:2]:
            raise ValueError(f"token_types: expected shape {tuple(ids.shape[:2])} (the token ids'), found "
                             f"{tuple(token_types.shape)}")
        if self.sequence_parallel:  # this rank's contiguous block of positions
            token_types = token_types.chunk(self.pstate.tp, dim=-1)[self.pstate.tp_rank]
        return h + self.type_embed(token_types)

    def _first_token(self, h: torch.Tensor) -> torch.Tensor:
        """h[:, 0] [B, D] on every tp rank. With sequence parallel token 0 is in tp rank 0's shard: every rank
        contributes its first row ([B, 1, D] -> [B, tp, D]) and keeps rank 0's. The pooler after it is replicated,
        so each rank's gradient is the full one; the backward keeps this rank's slot (grad_is_partial=False), and
        only rank 0's slot is non-zero."""
        if not self.sequence_parallel:
            return h[:, 0]
        first = gather_from_sequence_parallel_region(h[:, :1].contiguous(), self.pstate, grad_is_partial=False)
        return first[:, 0]

    # ------------------------------------------------------------ accounting
    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings and self.pre_process:
            n -= self.embed.weight.numel()
            if self.cfg.position == "learned":
                n -= self.pos_embed.weight.numel()
            if self.type_embed is not None:
                n -= self.type_embed.weight.numel()
        return n


def count_parameters(cfg: ModelConfig, padded: bool = False) -> int:
    """Parameter count of the full model from its config (no allocation). padded=False uses the real
    vocabulary, as published figures do (e.g. GPT-2 124M = 124,439,808)."""
    d, hd, h, kv, f = cfg.d_model, head_dim(cfg), cfg.n_heads, kv_heads(cfg), ffn_hidden(cfg)
    v = padded_vocab(cfg) if padded else cfg.vocab_size
    qkv_bias = cfg.bias if cfg.qkv_bias is None else cfg.qkv_bias
    norm = d * (2 if (cfg.norm == "layernorm" and cfg.bias) else 1)
    attn = d * h * hd + 2 * d * kv * hd + h * hd * d
    if qkv_bias:
        attn += h * hd + 2 * kv * hd
    if cfg.bias:
        attn += d
    n_mat = 3 if cfg.activation == "swiglu" else 2
    mlp = n_mat * d * f + ((n_mat - 1) * f + d if cfg.bias else 0)
    per_layer = attn + mlp + 2 * norm
    total = cfg.n_layers * per_layer + v * d + (norm if cfg.norm_position == "pre" else 0)  # final norm: pre only
    if cfg.position == "learned":
        total += cfg.max_seq_len * d
    if not cfg.tie_embeddings:
        total += v * d
    if cfg.embed_norm:
        total += norm
    if cfg.encoder:  # BERT: bert-base with binary_head = BertForPreTraining's 110,106,428
        b = 1 if cfg.bias else 0
        total += cfg.type_vocab_size * d
        total += d * d + b * d + norm + b * v  # MLM head: dense, norm, vocabulary bias
        if cfg.binary_head:
            total += d * d + b * d + 2 * d + b * 2  # pooler, next-sentence head
    return total


def build_model(cfg: ModelConfig, pstate: Optional[ParallelState] = None, seed: int = 1234,
                device: Optional[torch.device] = None) -> Transformer:
    """The whole model for a single pipeline stage layout (pp=1): built on the meta device, materialised on
    `device` (default: pstate.device) and filled by the one initialiser. Pipeline stages: engine/train/build.py."""
    from engine.model.init import materialize

    pstate = pstate or ParallelState.single()
    model = Transformer(cfg, pstate, device="meta")
    materialize(model, device or pstate.device, seed)
    return model
