"""Which Hugging Face tensor holds which of our canonical tensors, and how.

A `Group` is one Hugging Face tensor and the canonical tensors it is made of, concatenated along our dim 0
(GPT-2's c_attn = [q; k; v]). `transpose` marks GPT-2's Conv1D weights, stored [in, out] where our linear
weights are [out, in]. Everything else is a rename: Llama-family q/k weights on the Hub are already in the
rotate-half order our RoPE uses (HF's conversion scripts permuted Meta's interleaved layout once), so no
permutation is applied in either direction -- the logit tests would catch one applied twice or not at all.

A tied output head is not a tensor of its own on either side (HF drops `lm_head.weight` from the files;
ours is `embed.weight`). Hugging Face files may also hold non-parameter buffers that carry no weights
(GPT-2's causal-mask `attn.bias`/`attn.masked_bias`, old Llama's `rotary_emb.inv_freq`): ignored on import.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from engine.config import ModelConfig

__all__ = ["Group", "IGNORED", "groups", "hf_to_ours", "ours_to_hf"]

IGNORED = re.compile(r"(^|\.)(attn\.bias|attn\.masked_bias|rotary_emb\.inv_freq)$")


@dataclass(frozen=True)
class Group:
    hf: str  # the Hugging Face tensor name
    ours: tuple[str, ...]  # canonical names, concatenated along dim 0 in this order
    transpose: bool = False  # GPT-2 Conv1D: HF [in, out] = ours.T


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


def groups(arch: str, m: ModelConfig) -> list[Group]:
    """Every Hugging Face tensor of the model, in the order Hugging Face writes them."""
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
