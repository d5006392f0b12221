"""Hugging Face config.json <-> ModelConfig, for the architectures our one model computes exactly.

Supported: LlamaForCausalLM (Llama 2/3/3.1/3.2, rope_type default or llama3), MistralForCausalLM (no sliding
window, or one at least as long as max_position_embeddings), Qwen2ForCausalLM (q/k/v bias, tied in the small
sizes; sliding window off), GPT2LMHeadModel (learned positions, tanh GELU, Conv1D weights) and the BERT encoder
as BertForPreTraining (MLM head + pooler + next-sentence head: model.binary_head) or BertForMaskedLM (MLM head
only; absolute positions, post-norm blocks, embedding LayerNorm, erf GELU "gelu" = our gelu_exact, or the tanh
GELU "gelu_new"). Anything else our model would only approximate -- another activation, a short sliding window,
MoE, partial rotary, another RoPE scaling, BERT's relative position embeddings -- is refused with the field
named, never converted approximately.

A BertForMaskedLM config.json whose files also hold the pooler and the next-sentence head (the Hub's
bert-base-uncased is one) is converted with them (binary_head, decided by engine/convert/from_hf.py from the
files: nothing is dropped) and its config.json is written back as it was.

Both spellings of RoPE in config.json are read: transformers 5's `rope_parameters` ({rope_type, rope_theta,
factor, ...}) and 4.x's `rope_theta` + `rope_scaling` ({rope_type or type, factor, ...}). A config written
from scratch (no Hugging Face source recorded in the checkpoint) uses 4.x's spelling, which both read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from engine.config import ModelConfig
from engine.errors import ConversionError

__all__ = ["ARCHITECTURES", "arch_of_model", "hf_class", "hf_config_from_model", "model_fields_from_hf",
           "read_hf_config"]

# config.json `architectures[0]` -> our name for the weight layout (engine/convert/hf_names.py)
ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
                 "GPT2LMHeadModel": "gpt2", "BertForPreTraining": "bert", "BertForMaskedLM": "bert"}
_MODEL_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "gpt2": "gpt2", "bert": "bert"}
_CLASS = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
          "gpt2": "GPT2LMHeadModel"}
# BERT's hidden_act -> ours: "gelu" is the erf GELU; gelu_new / gelu_pytorch_tanh the tanh GELU (GPT-2's)
_BERT_ACT = {"gelu": "gelu_exact", "gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "relu": "relu"}
_BERT_ACT_OUT = {"gelu_exact": "gelu", "gelu": "gelu_new", "relu": "relu"}
# the decoder variant's values of the encoder fields (a decoder source resets a base config's encoder fields)
_DECODER = {"encoder": False, "norm_position": "pre", "embed_norm": False, "binary_head": False}
# fields that mean a different model than ours whenever they are set at all
_ROPE_KEYS = ("rope_parameters", "rope_scaling", "rope_theta", "dtype", "torch_dtype")
_MOE_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_intermediate_size")


def read_hf_config(hf_dir: str | Path) -> dict:
    """config.json of a Hugging Face model directory, as a dict."""
    path = Path(hf_dir) / "config.json"
    if not Path(hf_dir).is_dir():
        raise ConversionError(f"Hugging Face directory {str(hf_dir)!r}: expected a directory with config.json and "
                              f"safetensors, found {'a file' if Path(hf_dir).exists() else 'nothing'}")
    try:
        cfg = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConversionError(f"Hugging Face directory {str(hf_dir)!r}: config.json is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConversionError(f"{str(path)!r}: not a readable JSON config ({e})") from None
    if not isinstance(cfg, dict):
        raise ConversionError(f"{str(path)!r}: expected a JSON object, found {type(cfg).__name__}")
    return cfg


def _arch(cfg: dict, where: str) -> str:
    archs = cfg.get("architectures") or []
    name = archs[0] if isinstance(archs, list) and archs else None
    if name in ARCHITECTURES:
        return ARCHITECTURES[name]
    if name is None and cfg.get("model_type") in _MODEL_TYPES:
        return _MODEL_TYPES[cfg["model_type"]]
    raise ConversionError(f"{where}: architecture {name or cfg.get('model_type')!r} is not supported (expected one "
                          f"of {', '.join(ARCHITECTURES)})")


def _refuse(where: str, field: str, found: Any, why: str) -> None:
    raise ConversionError(f"{where}: {field}={found!r} is not supported: {why}; the model is not converted "
                          f"(an approximation would be a different model)")


def _rope(cfg: dict, where: str) -> dict:
    """Our rope_* fields from rope_parameters (transformers 5) or rope_theta + rope_scaling (4.x)."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and params and all(isinstance(v, dict) for v in params.values()):
        _refuse(where, "rope_parameters", sorted(params), "per-layer-type RoPE parameters")
    scaling = dict(params) if isinstance(params, dict) else dict(cfg.get("rope_scaling") or {})
    theta = scaling.pop("rope_theta", None) if isinstance(params, dict) else None
    theta = theta if theta is not None else cfg.get("rope_theta", 10000.0)
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    out: dict[str, Any] = {"rope_theta": float(theta)}
    if cfg.get("partial_rotary_factor", 1.0) not in (None, 1, 1.0):
        _refuse(where, "partial_rotary_factor", cfg["partial_rotary_factor"], "our RoPE rotates the whole head")
    if kind in (None, "default"):
        out["rope_scaling"] = "none"
    elif kind == "llama3":
        missing = [k for k in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
                   if k not in scaling]
        if missing:
            raise ConversionError(f"{where}: rope scaling llama3 without {', '.join(missing)}")
        out.update(rope_scaling="llama3", rope_scaling_factor=float(scaling["factor"]),
                   rope_low_freq_factor=float(scaling["low_freq_factor"]),
                   rope_high_freq_factor=float(scaling["high_freq_factor"]),
                   rope_original_max_seq_len=int(scaling["original_max_position_embeddings"]))
        if scaling.get("attention_factor") not in (None, 1, 1.0):
            _refuse(where, "rope attention_factor", scaling["attention_factor"], "llama3 scaling keeps 1.0")
    else:
        _refuse(where, "rope_type", kind, "implemented are default and llama3")
    return out


def _window(cfg: dict, where: str, arch: str) -> None:
    window = cfg.get("sliding_window")
    if arch == "qwen2" and not cfg.get("use_sliding_window", False):
        window = None
    types = cfg.get("layer_types")
    if isinstance(types, list) and any(t != "full_attention" for t in types):
        _refuse(where, "layer_types", sorted(set(types)), "every layer attends to the whole sequence here")
    if window is not None and int(window) < int(cfg.get("max_position_embeddings", 0)):
        _refuse(where, "sliding_window", window, f"the window is shorter than max_position_embeddings="
                f"{cfg.get('max_position_embeddings')} and our attention is not windowed")


def model_fields_from_hf(cfg: dict, where: str = "config.json") -> tuple[str, dict]:
    """(architecture, ModelConfig field values) for a supported config.json; refusals name the field."""
    arch = _arch(cfg, where)
    for f in _MOE_FIELDS:
        if cfg.get(f):
            _refuse(where, f, cfg[f], "mixture-of-experts layers are not implemented")
    if arch == "bert":
        return arch, _bert_fields(cfg, where)
    if arch == "gpt2":
        return arch, {**_gpt2_fields(cfg, where), **_DECODER}
    act = cfg.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        _refuse(where, "hidden_act", act, "the gated MLP here is SwiGLU (silu)")
    heads = int(cfg["num_attention_heads"])
    d = int(cfg["hidden_size"])
    hd = cfg.get("head_dim")
    fields: dict[str, Any] = {
        "vocab_size": int(cfg["vocab_size"]), "d_model": d, "n_layers": int(cfg["num_hidden_layers"]),
        "n_heads": heads, "n_kv_heads": int(cfg.get("num_key_value_heads") or heads),
        "head_dim": int(hd) if hd is not None and int(hd) != d // heads else None,
        "ffn_hidden": int(cfg["intermediate_size"]), "max_seq_len": int(cfg.get("max_position_embeddings", 2048)),
        "norm": "rmsnorm", "norm_eps": float(cfg.get("rms_norm_eps", 1e-6)), "activation": "swiglu",
        "position": "rope", "tie_embeddings": bool(cfg.get("tie_word_embeddings", False)), "dropout": 0.0,
        **_DECODER,
    }
    fields.update(_rope(cfg, where))
    _window(cfg, where, arch)
    if arch == "qwen2":
        fields.update(bias=False, qkv_bias=True)
    else:
        attn_bias, mlp_bias = bool(cfg.get("attention_bias", False)), bool(cfg.get("mlp_bias", False))
        if attn_bias != mlp_bias:
            _refuse(where, "attention_bias/mlp_bias", (attn_bias, mlp_bias),
                    "biases are on every linear layer (bias) or on q/k/v only (qkv_bias)")
        fields.update(bias=attn_bias, qkv_bias=None)
    return arch, fields


def _gpt2_fields(cfg: dict, where: str) -> dict:
    act = cfg.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh", "relu"):
        _refuse(where, "activation_function", act, "implemented are the tanh GELU (gelu_new) and relu")
    for f, ok in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                  ("add_cross_attention", False)):
        if bool(cfg.get(f, ok)) != ok:
            _refuse(where, f, cfg.get(f), f"attention here is scaled by 1/sqrt(head_dim) only ({f}={ok})")
    d = int(cfg["n_embd"])
    return {
        "vocab_size": int(cfg["vocab_size"]), "d_model": d, "n_layers": int(cfg["n_layer"]),
        "n_heads": int(cfg["n_head"]), "n_kv_heads": None, "head_dim": None,
        "ffn_hidden": int(cfg.get("n_inner") or 4 * d), "max_seq_len": int(cfg["n_positions"]),
        "norm": "layernorm", "norm_eps": float(cfg.get("layer_norm_epsilon", 1e-5)),
        "activation": "relu" if act == "relu" else "gelu", "position": "learned",
        "tie_embeddings": bool(cfg.get("tie_word_embeddings", True)), "bias": True, "qkv_bias": None,
        "rope_scaling": "none", "dropout": 0.0,
    }


def _bert_fields(cfg: dict, where: str) -> dict:
    pos = cfg.get("position_embedding_type", "absolute")
    if pos not in (None, "absolute"):
        _refuse(where, "position_embedding_type", pos, "positions here are a learned absolute table (absolute)")
    act = cfg.get("hidden_act", "gelu")
    if act not in _BERT_ACT:
        _refuse(where, "hidden_act", act, f"implemented are {', '.join(_BERT_ACT)}")
    for f in ("is_decoder", "add_cross_attention"):
        if cfg.get(f):
            _refuse(where, f, cfg[f], "the encoder here attends bidirectionally to its own input only")
    d, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    if d % heads:
        _refuse(where, "num_attention_heads", heads, f"hidden_size={d} must be a multiple of it (head_dim = "
                f"hidden_size / num_attention_heads)")
    if cfg.get("embedding_size") not in (None, d):
        _refuse(where, "embedding_size", cfg["embedding_size"], f"embeddings here have hidden_size={d} columns")
    archs = cfg.get("architectures") or []
    return {
        "vocab_size": int(cfg["vocab_size"]), "d_model": d, "n_layers": int(cfg["num_hidden_layers"]),
        "n_heads": heads, "n_kv_heads": None, "head_dim": None, "ffn_hidden": int(cfg["intermediate_size"]),
        "max_seq_len": int(cfg.get("max_position_embeddings", 512)), "norm": "layernorm",
        "norm_eps": float(cfg.get("layer_norm_eps", 1e-12)), "activation": _BERT_ACT[act], "position": "learned",
        "tie_embeddings": bool(cfg.get("tie_word_embeddings", True)), "bias": True, "qkv_bias": None,
        "rope_scaling": "none", "dropout": 0.0, "encoder": True, "norm_position": "post", "embed_norm": True,
        "type_vocab_size": int(cfg.get("type_vocab_size", 2)),
        "binary_head": bool(archs) and archs[0] == "BertForPreTraining",
    }


def hf_class(arch: str, m: ModelConfig) -> str:
    """The transformers class name for our layout name (BERT: with or without the next-sentence head)."""
    if arch == "bert":
        return "BertForPreTraining" if m.binary_head else "BertForMaskedLM"
    return _CLASS[arch]


def _bert_problems(m: ModelConfig) -> list[str]:
    """What keeps an encoder from being exactly a Hugging Face BERT (empty: it is one)."""
    qkv_bias = m.bias if m.qkv_bias is None else m.qkv_bias
    want = [("norm", m.norm, "layernorm"), ("bias", m.bias, True), ("qkv_bias", qkv_bias, True),
            ("position", m.position, "learned"), ("norm_position", m.norm_position, "post"),
            ("embed_norm", m.embed_norm, True)]
    out = [f"{k}={v!r} (BERT: {w!r})" for k, v, w in want if v != w]
    if m.activation not in _BERT_ACT_OUT:
        out.append(f"activation={m.activation!r} (BERT: one of {', '.join(_BERT_ACT_OUT)})")
    if m.head_dim not in (None, m.d_model // m.n_heads) or m.d_model % m.n_heads:
        out.append(f"head_dim={m.head_dim!r} (BERT: d_model / n_heads)")
    if m.n_kv_heads not in (None, m.n_heads):
        out.append(f"n_kv_heads={m.n_kv_heads!r} (BERT: n_heads)")
    if m.type_vocab_size < 1:
        out.append(f"type_vocab_size={m.type_vocab_size} (BERT: at least 1)")
    return out


def arch_of_model(m: ModelConfig) -> str:
    """The Hugging Face architecture that computes exactly what this ModelConfig does."""
    if m.encoder:
        problems = _bert_problems(m)
        if problems:
            raise ConversionError(f"encoder model: no Hugging Face architecture computes exactly this model (BERT "
                                  f"differs in {'; '.join(problems)})")
        return "bert"
    qkv_bias = m.bias if m.qkv_bias is None else m.qkv_bias
    if m.norm_position != "pre" or m.embed_norm:
        raise ConversionError(f"model (norm_position={m.norm_position}, embed_norm={m.embed_norm}): no Hugging Face "
                              f"decoder architecture computes exactly this model (GPT-2 / Llama / Qwen2 are pre-norm "
                              f"without an embedding norm)")
    if m.position == "learned" and m.norm == "layernorm" and m.activation in ("gelu", "relu") and m.bias \
            and qkv_bias and (m.head_dim in (None, m.d_model // m.n_heads)) and (m.n_kv_heads in (None, m.n_heads)):
        return "gpt2"
    if m.position == "rope" and m.norm == "rmsnorm" and m.activation == "swiglu":
        if qkv_bias and not m.bias:
            return "qwen2"
        if qkv_bias == m.bias:
            return "llama"
    raise ConversionError(
        f"model (norm={m.norm}, activation={m.activation}, position={m.position}, bias={m.bias}, "
        f"qkv_bias={m.qkv_bias}): no Hugging Face architecture computes exactly this model (expected a GPT-2 "
        f"shape: layernorm + gelu/relu + learned positions + biases, or a Llama/Qwen2 shape: rmsnorm + swiglu + "
        f"rope)")


def _rope_to_hf(m: ModelConfig) -> dict:
    out: dict[str, Any] = {"rope_theta": m.rope_theta}
    if m.rope_scaling == "llama3":
        out["rope_scaling"] = {"rope_type": "llama3", "factor": m.rope_scaling_factor,
                               "low_freq_factor": m.rope_low_freq_factor, "high_freq_factor": m.rope_high_freq_factor,
                               "original_max_position_embeddings": m.rope_original_max_seq_len}
    else:
        out["rope_scaling"] = None
    return out


def hf_config_from_model(m: ModelConfig, dtype: str, base: Optional[dict] = None,
                         token_ids: Optional[dict] = None) -> dict:
    """config.json for our model. With `base` (the Hugging Face config the weights came from) every field of it
    is kept and only what our config determines is checked against it (a difference means the checkpoint is
    not that model any more: refused); without, a fresh config in transformers 4.x's spelling."""
    arch = arch_of_model(m)
    if base is not None:
        base_arch, fields = model_fields_from_hf(base, "the Hugging Face config recorded in the checkpoint")
        if base_arch == "bert" and not fields["binary_head"]:
            fields["binary_head"] = m.binary_head  # a BertForMaskedLM config whose files held the NSP head too
        here = {k: getattr(m, k) for k in fields if k != "dropout"}
        diff = [f"{k}: source {fields[k]!r}, checkpoint {v!r}" for k, v in here.items() if fields[k] != v]
        if not diff:
            out = dict(base)
            key = "dtype" if "dtype" in out and "torch_dtype" not in out else "torch_dtype"
            out[key] = dtype
            return out
        # The model changed since it came from Hugging Face (e.g. a longer context): the fields our config
        # determines are written fresh, every other field of the source (token ids, ...) is kept.
        fresh = hf_config_from_model(m, dtype, None, token_ids)
        keep = {k: v for k, v in base.items() if k not in fresh and k not in _ROPE_KEYS}
        return {**keep, **fresh}
    ids = {k: v for k, v in (token_ids or {}).items() if v is not None}
    if arch == "bert":
        cfg = {"architectures": [hf_class(arch, m)], "model_type": "bert", "vocab_size": m.vocab_size,
               "hidden_size": m.d_model, "num_hidden_layers": m.n_layers, "num_attention_heads": m.n_heads,
               "intermediate_size": _ffn(m), "hidden_act": _BERT_ACT_OUT[m.activation],
               "hidden_dropout_prob": m.dropout, "attention_probs_dropout_prob": m.dropout,
               "max_position_embeddings": m.max_seq_len, "type_vocab_size": m.type_vocab_size,
               "initializer_range": m.init_std, "layer_norm_eps": m.norm_eps, "position_embedding_type": "absolute",
               "tie_word_embeddings": m.tie_embeddings, "is_decoder": False, "add_cross_attention": False,
               "classifier_dropout": None, "use_cache": True}
    elif arch == "gpt2":
        cfg = {"architectures": [_CLASS["gpt2"]], "model_type": "gpt2", "vocab_size": m.vocab_size,
               "n_embd": m.d_model, "n_layer": m.n_layers, "n_head": m.n_heads,
               "n_inner": None if _ffn(m) == 4 * m.d_model else _ffn(m), "n_positions": m.max_seq_len,
               "n_ctx": m.max_seq_len, "layer_norm_epsilon": m.norm_eps,
               "activation_function": "gelu_new" if m.activation == "gelu" else "relu",
               "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "initializer_range": m.init_std,
               "scale_attn_weights": True, "tie_word_embeddings": m.tie_embeddings, "use_cache": True}
    else:
        hd = m.head_dim or m.d_model // m.n_heads
        cfg = {"architectures": [_CLASS[arch]], "model_type": arch, "vocab_size": m.vocab_size,
               "hidden_size": m.d_model, "num_hidden_layers": m.n_layers, "num_attention_heads": m.n_heads,
               "num_key_value_heads": m.n_kv_heads or m.n_heads, "head_dim": hd, "intermediate_size": _ffn(m),
               "max_position_embeddings": m.max_seq_len, "rms_norm_eps": m.norm_eps, "hidden_act": "silu",
               "initializer_range": m.init_std, "tie_word_embeddings": m.tie_embeddings, "use_cache": True,
               "attention_dropout": 0.0, **_rope_to_hf(m)}
        if arch == "llama":
            cfg.update(attention_bias=m.bias, mlp_bias=m.bias, pretraining_tp=1)
        elif arch == "qwen2":
            cfg.update(use_sliding_window=False, sliding_window=None, max_window_layers=m.n_layers)
        else:
            cfg.update(sliding_window=None)
    cfg.update(ids)
    cfg["torch_dtype"] = dtype
    return cfg


def _ffn(m: ModelConfig) -> int:
    from engine.model.transformer import ffn_hidden

    return ffn_hidden(m)
