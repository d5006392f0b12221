"""Model presets: plain field values of ModelConfig, not subclasses.

A preset fills the model section first; anything the user writes in `model:` wins.
Sizes follow the published models so parameter counts can be checked against them.
"""

from __future__ import annotations

import copy
import difflib

from engine.errors import ConfigError

# GPT-2 family: LayerNorm, learned positions, GELU, biases everywhere, tied embeddings.
_GPT2 = dict(vocab_size=50257, norm="layernorm", norm_eps=1e-5, activation="gelu", position="learned",
             tie_embeddings=True, bias=True, max_seq_len=1024, n_kv_heads=None, ffn_hidden=None)

# Llama family: RMSNorm, RoPE, SwiGLU, no biases, untied head.
_LLAMA = dict(norm="rmsnorm", activation="swiglu", position="rope", tie_embeddings=False, bias=False)

# Llama 3.1/3.2's RoPE frequency scaling (the factor differs: 8 for 3.1, 32 for 3.2).
_LLAMA3_SCALING = dict(rope_scaling="llama3", rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
                       rope_original_max_seq_len=8192)

# BERT family (encoder): LayerNorm (eps 1e-12), learned positions, exact GELU, biases, tied embeddings.
_BERT = dict(encoder=True, norm="layernorm", norm_eps=1e-12, activation="gelu_exact", position="learned",
             tie_embeddings=True, bias=True, max_seq_len=512, n_kv_heads=None, type_vocab_size=2,
             norm_position="post", embed_norm=True, binary_head=True)

PRESETS: dict[str, dict] = {
    "gpt2": {**_GPT2, "d_model": 768, "n_layers": 12, "n_heads": 12},
    "gpt2-medium": {**_GPT2, "d_model": 1024, "n_layers": 24, "n_heads": 16},
    "gpt2-large": {**_GPT2, "d_model": 1280, "n_layers": 36, "n_heads": 20},
    "gpt2-xl": {**_GPT2, "d_model": 1600, "n_layers": 48, "n_heads": 25},
    # A generic Llama-style shape; set the sizes yourself.
    "llama": {**_LLAMA, "vocab_size": 32000, "norm_eps": 1e-5, "rope_theta": 10000.0},
    "llama2-7b": {**_LLAMA, "vocab_size": 32000, "d_model": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 32,
                  "ffn_hidden": 11008, "max_seq_len": 4096, "norm_eps": 1e-5, "rope_theta": 10000.0},
    "llama3-8b": {**_LLAMA, "vocab_size": 128256, "d_model": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8,
                  "ffn_hidden": 14336, "max_seq_len": 8192, "norm_eps": 1e-5, "rope_theta": 500000.0},
    "llama3.1-8b": {**_LLAMA, "vocab_size": 128256, "d_model": 4096, "n_layers": 32, "n_heads": 32,
                    "n_kv_heads": 8, "ffn_hidden": 14336, "max_seq_len": 131072, "norm_eps": 1e-5,
                    "rope_theta": 500000.0, **_LLAMA3_SCALING, "rope_scaling_factor": 8.0},
    "llama3.2-1b": {**_LLAMA, "vocab_size": 128256, "d_model": 2048, "n_layers": 16, "n_heads": 32,
                    "n_kv_heads": 8, "ffn_hidden": 8192, "max_seq_len": 8192, "norm_eps": 1e-5,
                    "rope_theta": 500000.0, "tie_embeddings": True, **_LLAMA3_SCALING, "rope_scaling_factor": 32.0},
    # Qwen2: Llama shape plus a bias on q/k/v only.
    "qwen2": {**_LLAMA, "qkv_bias": True, "norm_eps": 1e-6, "rope_theta": 1000000.0, "vocab_size": 151936},
    "qwen2-0.5b": {**_LLAMA, "qkv_bias": True, "norm_eps": 1e-6, "rope_theta": 1000000.0, "vocab_size": 151936,
                   "d_model": 896, "n_layers": 24, "n_heads": 14, "n_kv_heads": 2, "ffn_hidden": 4864,
                   "max_seq_len": 32768, "tie_embeddings": True},
    # Mistral 7B: GQA 32/8, SwiGLU 14336.
    "mistral": {**_LLAMA, "vocab_size": 32000, "d_model": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8,
                "ffn_hidden": 14336, "max_seq_len": 32768, "norm_eps": 1e-5, "rope_theta": 1000000.0},
    # BERT (the encoder variant): post-norm blocks, embedding LayerNorm, token types, exact GELU, tied MLM
    # decoder; binary_head = the pooler and next-sentence head of BertForPreTraining.
    "bert-base": {**_BERT, "vocab_size": 30522, "d_model": 768, "n_layers": 12, "n_heads": 12, "ffn_hidden": 3072},
    # BERT-Tiny's shape (L=2, H=128, A=2, ffn 512) with the vocabulary taken from the tokenizer: tests, demos.
    "bert-tiny": {**_BERT, "vocab_size": 0, "d_model": 128, "n_layers": 2, "n_heads": 2, "ffn_hidden": 512},
    # The CPU demo model (~3M parameters with the byte tokenizer).
    "tiny": {**_LLAMA, "vocab_size": 0, "d_model": 256, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2,
             "ffn_hidden": 688, "max_seq_len": 256},
}


def get_preset(name: str) -> dict:
    """A copy of the preset's field values; a clear error lists the valid names."""
    if name not in PRESETS:
        close = difflib.get_close_matches(name, PRESETS, n=3, cutoff=0.4)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ConfigError(f"model.preset: unknown preset {name!r}.{hint} Valid presets: {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[name])
