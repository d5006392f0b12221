"""Which Hugging Face tensor holds which of our canonical tensors, and how.

A `Group` is one Hugging Face tensor and the canonical tensors it is made of, concatenated along our dim 0
(GPT-2's c_attn = [q; k; v]). `transpose` marks GPT-2's Conv1D weights, stored [in, out] where our linear
weights are [out, in]. Everything else is a rename: Llama-family q/k weights on the Hub are already in the
rotate-half order our RoPE uses (HF's conversion scripts permuted Meta's interleaved layout once), so no
permutation is applied in either direction -- the logit tests would catch one applied twice or not at all.

A tied output head is not a tensor of its own on either side (HF drops `lm_head.weight` from the files;
ours is `embed.weight`). Hugging Face files may also hold non-parameter buffers that carry no weights
(GPT-2's causal-mask `attn.bias`/`attn.masked_bias`, old Llama's `rotary_emb.inv_freq`, old BERT's
`embeddings.position_ids`): ignored on import.

BERT (BertForPreTraining / BertForMaskedLM) is renames only: q/k/v are separate tensors, nn.Linear weights
are [out, in] as ours, and there is no RoPE. Its MLM decoder is the tied word embedding, with the output bias
`cls.predictions.bias` (= our `mlm_head.bias`); files written by transformers 4.x (and the Hub's) also hold the
tied copies `cls.predictions.decoder.weight` / `.decoder.bias`, tolerated on import (TIED_COPIES). Untied,
transformers 5 computes with `cls.predictions.decoder.bias` (a parameter of its own there), so that one is
`mlm_head.bias` and `cls.predictions.bias` is written as a copy of it (an `alias` group: written on export,
never read on import). The pooler and `cls.seq_relationship` exist with model.binary_head only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from engine.config import ModelConfig

__all__ = ["Group", "IGNORED", "TIED_COPIES", "groups", "hf_shape", "hf_to_ours", "ours_to_hf"]

IGNORED = re.compile(r"(^|\.)(attn\.bias|attn\.masked_bias|rotary_emb\.inv_freq|embeddings\.position_ids)$")
# per architecture: copies of a tied tensor that some files keep (accepted on import, never read or written)
TIED_COPIES = {"bert": ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias")}


@dataclass(frozen=True)
class Group:
    hf: str  # the Hugging Face tensor name
    ours: tuple[str, ...]  # canonical names, concatenated along dim 0 in this order
    transpose: bool = False  # GPT-2 Conv1D: HF [in, out] = ours.T
    alias: bool = False  # a second Hugging Face copy of a canonical tensor: written on export, not read


def _llama(m: ModelConfig, i: int) -> list[Group]:
    p, o = f"model.layers.{i}.", f"layers.{i}."
    qkv_bias = m.bias if m.qkv_bias is None else m.qkv_bias
    out = [Group(p + "input_layernorm.weight", (o + "attn_norm.weight",)),
           Group(p + "post_attention_layernorm.weight", (o + "mlp_norm.weight",))]
    for proj in ("q", "k", "v", "o"):
        out.append(Group(f"{p}self_attn.{proj}_proj.weight", (f"{o}attn.{proj}_proj.weight",)))
        if (proj != "o" and qkv_bias) or (proj == "o" and m.bias):
            out.append(Group(f"{p}self_attn.{proj}_proj.bias", (f"{o}attn.{proj}_proj.bias",)))
    for proj in ("gate", "up", "down"):
        out.append(Group(f"{p}mlp.{proj}_proj.weight", (f"{o}mlp.{proj}_proj.weight",)))
        if m.bias:
            out.append(Group(f"{p}mlp.{proj}_proj.bias", (f"{o}mlp.{proj}_proj.bias",)))
    return out


def _gpt2(m: ModelConfig, i: int) -> list[Group]:
    p, o = f"transformer.h.{i}.", f"layers.{i}."
    qkv = tuple(f"{o}attn.{x}_proj" for x in "qkv")
    return [
        Group(p + "ln_1.weight", (o + "attn_norm.weight",)), Group(p + "ln_1.bias", (o + "attn_norm.bias",)),
        Group(p + "attn.c_attn.weight", tuple(n + ".weight" for n in qkv), transpose=True),
        Group(p + "attn.c_attn.bias", tuple(n + ".bias" for n in qkv)),
        Group(p + "attn.c_proj.weight", (o + "attn.o_proj.weight",), transpose=True),
        Group(p + "attn.c_proj.bias", (o + "attn.o_proj.bias",)),
        Group(p + "ln_2.weight", (o + "mlp_norm.weight",)), Group(p + "ln_2.bias", (o + "mlp_norm.bias",)),
        Group(p + "mlp.c_fc.weight", (o + "mlp.up_proj.weight",), transpose=True),
        Group(p + "mlp.c_fc.bias", (o + "mlp.up_proj.bias",)),
        Group(p + "mlp.c_proj.weight", (o + "mlp.down_proj.weight",), transpose=True),
        Group(p + "mlp.c_proj.bias", (o + "mlp.down_proj.bias",)),
    ]


def _linear(hf: str, ours: str) -> list[Group]:
    return [Group(f"{hf}.weight", (f"{ours}.weight",)), Group(f"{hf}.bias", (f"{ours}.bias",))]


def _bert_layer(i: int) -> list[Group]:
    p, o = f"bert.encoder.layer.{i}.", f"layers.{i}."
    out = []
    for hf, ours in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
        out += _linear(f"{p}attention.self.{hf}", f"{o}attn.{ours}")
    # post-norm: attn_norm follows the attention residual, mlp_norm the MLP residual
    return out + (_linear(p + "attention.output.dense", o + "attn.o_proj")
                  + _linear(p + "attention.output.LayerNorm", o + "attn_norm")
                  + _linear(p + "intermediate.dense", o + "mlp.up_proj")
                  + _linear(p + "output.dense", o + "mlp.down_proj")
                  + _linear(p + "output.LayerNorm", o + "mlp_norm"))


def _bert(m: ModelConfig) -> list[Group]:
    e = "bert.embeddings."
    out = [Group(e + "word_embeddings.weight", ("embed.weight",)),
           Group(e + "position_embeddings.weight", ("pos_embed.weight",))]
    if m.type_vocab_size > 0:
        out.append(Group(e + "token_type_embeddings.weight", ("type_embed.weight",)))
    out += _linear(e + "LayerNorm", "embed_norm")
    for i in range(m.n_layers):
        out += _bert_layer(i)
    if m.binary_head:
        out += _linear("bert.pooler.dense", "pooler")
    out += _linear("cls.predictions.transform.dense", "mlm_head.dense")
    out += _linear("cls.predictions.transform.LayerNorm", "mlm_head.norm")
    if m.tie_embeddings:
        out.append(Group("cls.predictions.bias", ("mlm_head.bias",)))
    else:
        out += [Group("cls.predictions.bias", ("mlm_head.bias",), alias=True),
                Group("cls.predictions.decoder.weight", ("head.weight",)),
                Group("cls.predictions.decoder.bias", ("mlm_head.bias",))]
    if m.binary_head:
        out += _linear("cls.seq_relationship", "nsp_head")
    return out


def groups(arch: str, m: ModelConfig) -> list[Group]:
    """Every Hugging Face tensor of the model, in the order Hugging Face writes them."""
    if arch == "bert":
        return _bert(m)
    if arch == "gpt2":
        out = [Group("transformer.wte.weight", ("embed.weight",)), Group("transformer.wpe.weight",
                                                                         ("pos_embed.weight",))]
        for i in range(m.n_layers):
            out += _gpt2(m, i)
        out += [Group("transformer.ln_f.weight", ("norm.weight",)), Group("transformer.ln_f.bias", ("norm.bias",))]
    else:
        out = [Group("model.embed_tokens.weight", ("embed.weight",))]
        for i in range(m.n_layers):
            out += _llama(m, i)
        out.append(Group("model.norm.weight", ("norm.weight",)))
    if not m.tie_embeddings:
        out.append(Group("lm_head.weight", ("head.weight",)))
    return out


def hf_to_ours(g: Group, t: torch.Tensor, shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """The canonical tensors of one group from its Hugging Face tensor (views where possible)."""
    if g.transpose:
        t = t.t()
    sizes = [shapes[n][0] for n in g.ours]
    return dict(zip(g.ours, torch.split(t, sizes, dim=0)))


def ours_to_hf(g: Group, parts: dict[str, torch.Tensor]) -> torch.Tensor:
    t = parts[g.ours[0]] if len(g.ours) == 1 else torch.cat([parts[n] for n in g.ours], dim=0)
    return t.t().contiguous() if g.transpose else t.contiguous()


def hf_shape(g: Group, shapes: dict[str, tuple[int, ...]]) -> tuple[int, ...]:
    """The Hugging Face tensor's shape from our canonical shapes."""
    first = shapes[g.ours[0]]
    shape = (sum(shapes[n][0] for n in g.ours),) + tuple(first[1:])
    return tuple(reversed(shape)) if g.transpose else shape
