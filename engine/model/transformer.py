"""The one decoder-only Transformer of Tessera.

GPT-2 (LayerNorm, learned positions, GELU, biases, tied embeddings) and Llama / Qwen2 /
Mistral (RMSNorm, RoPE, SwiGLU, GQA/MQA, optional QKV bias, untied head) are field values of
ModelConfig, not subclasses. Shapes: B batch, S sequence, D d_model, H heads, Hkv kv heads,
hd head_dim, V padded vocabulary.

A model object can be one pipeline stage: it holds the blocks `layer_range` (global indices, so
parameter names and initial values do not depend on the parallel layout), the embedding when
`pre_process` and the final norm + output head when `post_process`.
"""

from __future__ import annotations

import hashlib
import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.config import ModelConfig
from engine.model import ops
from engine.model.attention import attention, check_backend
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


def _stable_seed(seed: int, name: str) -> int:
    """A seed per parameter name: initial values do not depend on construction order or layout."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


# --------------------------------------------------------------------------- layers


class Norm(nn.Module):
    """RMSNorm or LayerNorm over the last dimension."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.kind, self.eps, self.fused = cfg.norm, cfg.norm_eps, cfg.fused_ops
        self.weight = nn.Parameter(torch.ones(cfg.d_model))
        self.bias = nn.Parameter(torch.zeros(cfg.d_model)) if (cfg.norm == "layernorm" and cfg.bias) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "rmsnorm":
            return ops.rms_norm(x, self.weight, self.eps, fused=self.fused)
        return ops.layer_norm(x, self.weight, self.bias, self.eps, fused=self.fused)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, pstate: ParallelState):
        super().__init__()
        self.n_heads, self.n_kv, self.hd = cfg.n_heads, kv_heads(cfg), head_dim(cfg)
        qkv_bias = cfg.bias if cfg.qkv_bias is None else cfg.qkv_bias
        self.q_proj = nn.Linear(cfg.d_model, self.n_heads * self.hd, bias=qkv_bias)
        self.k_proj = nn.Linear(cfg.d_model, self.n_kv * self.hd, bias=qkv_bias)
        self.v_proj = nn.Linear(cfg.d_model, self.n_kv * self.hd, bias=qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.hd, cfg.d_model, bias=cfg.bias)
        self.o_proj.weight.is_output_proj = True  # scaled init (GPT-2 / Megatron)
        self.dropout, self.backend, self.fused = cfg.dropout, cfg.attention, cfg.fused_ops

    def forward(self, x: torch.Tensor, rope: Optional[tuple[torch.Tensor, torch.Tensor]],
                doc_ids: Optional[torch.Tensor]) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, -1, self.hd).transpose(1, 2)  # [B, H, S, hd]
        k = self.k_proj(x).view(b, s, -1, self.hd).transpose(1, 2)  # [B, Hkv, S, hd]
        v = self.v_proj(x).view(b, s, -1, self.hd).transpose(1, 2)
        if rope is not None:
            q, k = ops.apply_rope(q, k, *rope, fused=self.fused)
        p = self.dropout if self.training else 0.0
        y = attention(q, k, v, causal=True, doc_ids=doc_ids, dropout_p=p, backend=self.backend)
        y = y.transpose(1, 2).reshape(b, s, -1)  # [B, S, H*hd]
        return self.o_proj(y)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, pstate: ParallelState):
        super().__init__()
        hidden = ffn_hidden(cfg)
        self.activation, self.fused = cfg.activation, cfg.fused_ops
        if cfg.activation == "swiglu":
            self.gate_proj = nn.Linear(cfg.d_model, hidden, bias=cfg.bias)
        self.up_proj = nn.Linear(cfg.d_model, hidden, bias=cfg.bias)
        self.down_proj = nn.Linear(hidden, cfg.d_model, bias=cfg.bias)
        self.down_proj.weight.is_output_proj = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation == "swiglu":
            h = ops.swiglu(self.gate_proj(x), self.up_proj(x), fused=self.fused)
        elif self.activation == "gelu":
            h = F.gelu(self.up_proj(x), approximate="tanh")  # GPT-2's gelu
        else:
            h = F.relu(self.up_proj(x))
        return self.down_proj(h)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, pstate: ParallelState):
        super().__init__()
        self.attn_norm = Norm(cfg)
        self.attn = Attention(cfg, pstate)
        self.mlp_norm = Norm(cfg)
        self.mlp = MLP(cfg, pstate)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, rope: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
                doc_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = x + self.drop(self.attn(self.attn_norm(x), rope, doc_ids))
        return x + self.drop(self.mlp(self.mlp_norm(x)))


# --------------------------------------------------------------------------- model


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, pstate: Optional[ParallelState] = None,
                 layer_range: Optional[tuple[int, int]] = None, pre_process: bool = True,
                 post_process: bool = True):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("model.vocab_size must be set (> 0) before building the model; the training "
                             "entry point fills it from the tokenizer")
        check_backend(cfg.attention)
        self.cfg = cfg
        self.pstate = pstate or ParallelState.single()
        self.pre_process, self.post_process = pre_process, post_process
        start, stop = layer_range or (0, cfg.n_layers)
        self.layer_range = (start, stop)
        self.vocab_size = cfg.vocab_size
        self.padded_vocab = padded_vocab(cfg, self.pstate.tp)
        d = cfg.d_model

        if pre_process:
            self.embed = nn.Embedding(self.padded_vocab, d)
            if cfg.position == "learned":
                self.pos_embed = nn.Embedding(cfg.max_seq_len, d)
            self.embed_drop = nn.Dropout(cfg.dropout)
        # ModuleDict keyed by the global layer index: names match the full model on every stage.
        self.layers = nn.ModuleDict({str(i): Block(cfg, self.pstate) for i in range(start, stop)})
        if post_process:
            self.norm = Norm(cfg)
            # Tied and holding the embedding: reuse it. A last pipeline stage without the embedding
            # keeps its own copy, kept equal by the pipeline code.
            self.head = None if (cfg.tie_embeddings and pre_process) else nn.Linear(d, self.padded_vocab, bias=False)
        if cfg.position == "rope":
            cos, sin = ops.rope_cache(head_dim(cfg), cfg.max_seq_len, cfg.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)

    # ------------------------------------------------------------ init
    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Normal(0, init_std) for matrices and embeddings, std/sqrt(2*n_layers) for output projections,
        zeros for biases, ones for norm weights. Each parameter draws from a generator seeded by its name,
        so every layout (tp, pp) starts from the same full weights. A parameter that is a shard of a larger
        tensor carries `shard_full(full) -> local` and `full_shape` (set by the tensor-parallel layers)."""
        cfg = self.cfg
        out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
                continue
            if name.endswith(".bias"):
                p.zero_()
                continue
            std = out_std if getattr(p, "is_output_proj", False) else cfg.init_std
            init_name = "embed.weight" if name == "head.weight" and cfg.tie_embeddings else name
            gen = torch.Generator().manual_seed(_stable_seed(seed, init_name))
            full = torch.empty(getattr(p, "full_shape", p.shape), dtype=torch.float32)
            full.normal_(0.0, std, generator=gen)
            shard = p.shard_full(full) if hasattr(p, "shard_full") else full
            p.copy_(shard)

    # ------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, position_ids: Optional[torch.Tensor] = None,
                doc_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: token ids [B, S] (first stage) or hidden states [B, S, D] (later stages).
        Returns logits [B, S, V] on the last stage (V = padded vocab / tp), hidden states otherwise."""
        if self.pre_process:
            h = self.embed(x)
            if self.cfg.position == "learned":
                pos = position_ids if position_ids is not None else torch.arange(x.shape[1], device=x.device)
                h = h + self.pos_embed(pos)
            h = self.embed_drop(h)
        else:
            h = x
        rope = None
        if self.cfg.position == "rope":
            s = h.shape[1]
            if position_ids is None:
                rope = (self.rope_cos[:s], self.rope_sin[:s])
            else:  # [B, S] -> [B, S, hd]
                rope = (self.rope_cos[position_ids], self.rope_sin[position_ids])
        for block in self.layers.values():
            h = block(h, rope, doc_ids)
        if not self.post_process:
            return h
        h = self.norm(h)
        weight = self.embed.weight if self.head is None else self.head.weight
        return F.linear(h, weight)  # [B, S, V]

    # ------------------------------------------------------------ accounting
    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings and self.pre_process:
            n -= self.embed.weight.numel()
            if self.cfg.position == "learned":
                n -= self.pos_embed.weight.numel()
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
    total = cfg.n_layers * per_layer + v * d + norm
    if cfg.position == "learned":
        total += cfg.max_seq_len * d
    if not cfg.tie_embeddings:
        total += v * d
    return total


def build_model(cfg: ModelConfig, pstate: Optional[ParallelState] = None, seed: int = 1234,
                device: Optional[torch.device] = None) -> Transformer:
    """The whole model for a single pipeline stage layout (pp=1); pipeline code builds stages itself."""
    model = Transformer(cfg, pstate)
    model.init_weights(seed)
    if device is not None:
        model.to(device)
    return model
