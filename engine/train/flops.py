"""Model FLOPs per token and MFU. The formula is written out in docs/metrics.md.

Training FLOPs per token = 6 * N_matmul + 12 * L * (H * hd) * S
  N_matmul: parameters that take part in matrix multiplies per token (all linear layers of the blocks
            plus the output head, and the encoder's MLM dense; embedding lookups are not matmuls and do not count),
  12 * L * H*hd * S: the two attention matmuls (QK^T and PV), forward (2 * 2 * S * H*hd per token per layer)
            plus backward (twice that). Counted for full S x S like PaLM / Megatron / torchtitan, also for
            causal attention, so our MFU is comparable with theirs.
MFU = achieved model FLOP/s / (peak dense FLOP/s of the device x number of devices).
FP8 runs (precision.fp8) are measured against the FP8 peak (`peak_dtype`), about twice the bf16 one on
Hopper, and labelled so: the attention core and the output head still run in bf16, so an FP8 run's MFU is a
conservative figure, not comparable with a bf16 run's MFU (compare tokens/s instead).
"""

from __future__ import annotations

import re
from typing import Optional

import torch

from engine.config import ModelConfig
from engine.model.transformer import count_parameters, ffn_hidden, head_dim, kv_heads, padded_vocab

# Dense (no sparsity) peak TFLOP/s per GPU from NVIDIA's datasheets; the datasheets quote tensor-core
# figures with 2:4 sparsity, so those are halved here. fp32 is the non-tensor-core figure: Tessera does
# not enable TF32, so fp32 matmuls run on the CUDA cores.
#   H100 SXM / PCIe / NVL: H100 Tensor Core GPU datasheet (SXM bf16 1,979*, PCIe 1,513*, NVL 1,671*)
#   H200 SXM / NVL: H200 datasheet (SXM = H100 SXM compute, bf16 1,979*; NVL bf16 1,671*, fp32 60)
#   GH200: GH200 Grace Hopper datasheet; its GPU is an H100/H200 SXM-class part (bf16 1,979*)
#   A100 SXM and PCIe: A100 datasheet, the same 312 bf16 dense for both form factors
#   B200 (HGX, 1,000 W) and GB200 (1,200 W): Blackwell datasheet, per GPU bf16 4.5* / 5* PFLOP/s
#   (* = with sparsity)
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    #  row: {dtype: TFLOP/s}
    "H100 SXM": {"bf16": 989.4, "fp16": 989.4, "fp8": 1978.9, "fp32": 67.0},
    "H100 PCIe": {"bf16": 756.5, "fp16": 756.5, "fp8": 1513.0, "fp32": 51.0},
    "H100 NVL": {"bf16": 835.5, "fp16": 835.5, "fp8": 1670.5, "fp32": 60.0},
    "H200 SXM": {"bf16": 989.4, "fp16": 989.4, "fp8": 1978.9, "fp32": 67.0},
    "H200 NVL": {"bf16": 835.5, "fp16": 835.5, "fp8": 1670.5, "fp32": 60.0},
    "GH200": {"bf16": 989.4, "fp16": 989.4, "fp8": 1978.9, "fp32": 67.0},
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5},
    "B200": {"bf16": 2250.0, "fp16": 2250.0, "fp8": 4500.0, "fp32": 75.0},
    "GB200": {"bf16": 2500.0, "fp16": 2500.0, "fp8": 5000.0, "fp32": 80.0},
}

# torch.cuda.get_device_name() -> PEAK_TFLOPS row. Tried in this order, first match wins: the more specific
# names (NVL, PCIe) come before the plain model name they contain. Model names match as whole words, so
# "GH200" is not taken for "H200" and "GB200" not for "B200". Names as the driver reports them, e.g.
# "NVIDIA H100 80GB HBM3" (SXM), "NVIDIA H100 PCIe", "NVIDIA H100 NVL", "NVIDIA H200", "NVIDIA H200 NVL",
# "NVIDIA GH200 480GB", "NVIDIA A100-SXM4-80GB", "NVIDIA A100 80GB PCIe", "NVIDIA B200".
DEVICE_ROWS: tuple[tuple[str, str], ...] = (
    (r"\bH100\b.*\bNVL\b", "H100 NVL"),
    (r"\bH100\b.*\bPCIe\b", "H100 PCIe"),
    (r"\bH100\b", "H100 SXM"),
    (r"\bH200\b.*\bNVL\b", "H200 NVL"),
    (r"\bH200\b", "H200 SXM"),
    (r"\bGH200\b", "GH200"),
    (r"\bA100\b", "A100"),  # SXM4 and PCIe have the same tensor-core peaks
    (r"\bGB200\b", "GB200"),
    (r"\bB200\b", "B200"),
)
_DEVICE_RES = tuple((re.compile(p), row) for p, row in DEVICE_ROWS)


def matmul_params_per_token(cfg: ModelConfig) -> int:
    d, hd, h, kv, f = cfg.d_model, head_dim(cfg), cfg.n_heads, kv_heads(cfg), ffn_hidden(cfg)
    attn = d * h * hd + 2 * d * kv * hd + h * hd * d
    mlp = (3 if cfg.activation == "swiglu" else 2) * d * f
    # the encoder's MLM head adds its dense D->D at every position; the pooler and next-sentence head run once
    # per sequence (1/S of a token's share) and are left out
    mlm_dense = d * d if cfg.encoder else 0
    return cfg.n_layers * (attn + mlp) + mlm_dense + d * padded_vocab(cfg)


def training_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    return 6.0 * matmul_params_per_token(cfg) + 12.0 * cfg.n_layers * cfg.n_heads * head_dim(cfg) * seq_len


def device_row(name: str) -> Optional[str]:
    """The PEAK_TFLOPS row for a CUDA device name, or None when no pattern matches."""
    for regex, row in _DEVICE_RES:
        if regex.search(name):
            return row
    return None


def peak_dtype(dtype: str, fp8: bool) -> str:
    """The PEAK_TFLOPS column an MFU is computed against: "fp8" for FP8 runs, else the compute dtype."""
    return "fp8" if fp8 else dtype


def peak_tflops(device: torch.device, dtype: str) -> Optional[float]:
    """Peak dense TFLOP/s of one device for this dtype, or None (CPU, unknown GPU) -> MFU n/a."""
    if device.type != "cuda":
        return None
    row = device_row(torch.cuda.get_device_name(device))
    return None if row is None else PEAK_TFLOPS[row].get(dtype)


__all__ = ["PEAK_TFLOPS", "DEVICE_ROWS", "device_row", "training_flops_per_token", "peak_dtype", "peak_tflops",
           "count_parameters"]
