"""Elementwise/normalisation building blocks with a torch path and a fused-kernel path.

The model calls only these functions, so `model.fused_ops: true` swaps in the Triton kernels
(kernels/) without touching the model definition. The torch versions are the reference.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def _kernels_for(x: torch.Tensor):
    """The `kernels` package when its Triton path can run on x (CUDA, or the CPU interpreter), else None.

    Imported lazily: importing `kernels` sets TRITON_INTERPRET=1 on CPU-only machines."""
    import kernels

    if not kernels.TRITON_AVAILABLE:
        raise RuntimeError("model.fused_ops=true needs the triton package, which is not importable here")
    if x.is_cuda or kernels.INTERPRET:
        return kernels
    return None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, fused: bool = False) -> torch.Tensor:
    """x [..., D] * rsqrt(mean(x^2) + eps) * weight, computed in fp32 like Llama."""
    if fused and (k := _kernels_for(x)) is not None:
        return k.rms_norm(x, weight, eps)
    dtype = x.dtype
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.float()).to(dtype)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], eps: float,
               fused: bool = False) -> torch.Tensor:
    if fused and (k := _kernels_for(x)) is not None:
        return k.layer_norm(x, weight, bias, eps)
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def rope_cache(head_dim: int, max_seq_len: int, theta: float, device: torch.device | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables [max_seq_len, head_dim] in fp32 (rotate-half layout, as Llama/HF)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim))
    t = torch.arange(max_seq_len, dtype=torch.float64, device=device)
    freqs = torch.outer(t, inv_freq)  # [S, D/2]
    emb = torch.cat([freqs, freqs], dim=-1)  # [S, D]
    return emb.cos().float(), emb.sin().float()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               fused: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, Hq, S, D], k [B, Hkv, S, D]; cos/sin [S, D] or [B, S, D] (already gathered by position)."""
    if fused and (kern := _kernels_for(q)) is not None:
        return kern.apply_rope(q, k, cos, sin)
    if cos.dim() == 3:  # per-sample positions (document masking resets them)
        cos, sin = cos[:, None], sin[:, None]
    qf, kf = q.float(), k.float()
    q_out = qf * cos + _rotate_half(qf) * sin
    k_out = kf * cos + _rotate_half(kf) * sin
    return q_out.to(q.dtype), k_out.to(k.dtype)


def swiglu(gate: torch.Tensor, up: torch.Tensor, fused: bool = False) -> torch.Tensor:
    if fused and (k := _kernels_for(gate)) is not None:
        return k.swiglu(gate, up)
    return F.silu(gate) * up


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                  fused: bool = False) -> torch.Tensor:
    """Per-token loss (no reduction) in fp32. logits [N, V], targets [N]."""
    if fused and (k := _kernels_for(logits)) is not None:
        return k.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="none")
    return F.cross_entropy(logits.float(), targets, ignore_index=ignore_index, reduction="none")
