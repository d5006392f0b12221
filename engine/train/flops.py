"""Model FLOPs per token and MFU. The formula is written out in docs/metrics.md.

Training FLOPs per token = 6 * N_matmul + 12 * L * (H * hd) * S
  N_matmul: parameters that take part in matrix multiplies per token (all linear layers of the blocks
            plus the output head; embedding lookups are not matmuls and do not count),
  12 * L * H*hd * S: the two attention matmuls (QK^T and PV), forward (2 * 2 * S * H*hd per token per layer)
            plus backward (twice that). Counted for full S x S like PaLM / Megatron / torchtitan, also for
            causal attention, so our MFU is comparable with theirs.
MFU = achieved model FLOP/s / (peak dense FLOP/s of the device x number of devices).
"""

from __future__ import annotations

from typing import Optional

import torch

from engine.config import ModelConfig
from engine.model.transformer import count_parameters, ffn_hidden, head_dim, kv_heads, padded_vocab

# Dense (no sparsity) peak TFLOP/s from the vendors' datasheets.
PEAK_TFLOPS = {
    #  name pattern: {dtype: TFLOP/s}
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "fp8": 1513.0, "fp32": 51.0},
    "H100": {"bf16": 989.4, "fp16": 989.4, "fp8": 1978.9, "fp32": 67.0},  # SXM / HBM3
    "H200": {"bf16": 989.4, "fp16": 989.4, "fp8": 1978.9, "fp32": 67.0},
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5},
    "B200": {"bf16": 2250.0, "fp16": 2250.0, "fp8": 4500.0, "fp32": 80.0},
}


def matmul_params_per_token(cfg: ModelConfig) -> int:
    d, hd, h, kv, f = cfg.d_model, head_dim(cfg), cfg.n_heads, kv_heads(cfg), ffn_hidden(cfg)
    attn = d * h * hd + 2 * d * kv * hd + h * hd * d
    mlp = (3 if cfg.activation == "swiglu" else 2) * d * f
    return cfg.n_layers * (attn + mlp) + d * padded_vocab(cfg)


def training_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    return 6.0 * matmul_params_per_token(cfg) + 12.0 * cfg.n_layers * cfg.n_heads * head_dim(cfg) * seq_len


def peak_tflops(device: torch.device, dtype: str) -> Optional[float]:
    """Peak dense TFLOP/s of one device for this dtype, or None (CPU, unknown GPU) -> MFU n/a."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for pattern, table in PEAK_TFLOPS.items():  # "H100 PCIe" is listed before "H100"
        if pattern in name:
            return table.get(dtype)
    return None


__all__ = ["PEAK_TFLOPS", "training_flops_per_token", "peak_tflops", "count_parameters"]
