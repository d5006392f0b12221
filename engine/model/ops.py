"""Elementwise/normalisation building blocks with a torch path and a fused-kernel path.

The model calls only these functions, so `model.fused_ops: true` swaps in the Triton kernels
(kernels/) without touching the model definition. The torch versions are the reference.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F


_WARNED: set[str] = set()


def warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def kernels_for(x: torch.Tensor, feature: str = "model.fused_ops"):
    """The `kernels` package when its Triton path can run on x, else None: the caller then takes the
    torch path, and the reason is warned once per feature.

    Triton runs on CUDA tensors, and on CPU tensors only when the user asked for the interpreter
    (TRITON_INTERPRET=1 set before start): an interpreted training step is minutes, not milliseconds.
    Imported lazily: importing `kernels` sets TRITON_INTERPRET=1 on CPU-only machines."""
    from engine import kernels

    if not kernels.TRITON_AVAILABLE:
        warn_once(f"{feature}: the triton package is not importable here; using the torch path")
        return None
    if x.is_cuda or (x.device.type == "cpu" and kernels.INTERPRET_REQUESTED):
        return kernels
    warn_once(f"{feature}: Triton needs a CUDA device (got {x.device.type} tensors); using the torch path. "
               "Set TRITON_INTERPRET=1 before start to run the Triton kernels in the CPU interpreter (slow).")
    return None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, fused: bool = False) -> torch.Tensor:
    """x [..., D] * rsqrt(mean(x^2) + eps) * weight, computed in fp32 like Llama."""
    if fused and (k := kernels_for(x)) is not None:
        return k.rms_norm(x, weight, eps)
    dtype = x.dtype
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.float()).to(dtype)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], eps: float,
               fused: bool = False) -> torch.Tensor:
    if fused and (k := kernels_for(x)) is not None:
        return k.layer_norm(x, weight, bias, eps)
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


@dataclass(frozen=True)
class Llama3Scaling:
    """Llama 3.1's RoPE frequency scaling (HF rope_type "llama3"): frequencies whose wavelength exceeds
    original_len / low_freq_factor are divided by `factor`, those below original_len / high_freq_factor
    are kept, and the band between blends the two linearly in original_len / wavelength."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_len: int

    def apply(self, inv_freq: torch.Tensor) -> torch.Tensor:
        wavelen = 2 * math.pi / inv_freq
        low_wavelen = self.original_len / self.low_freq_factor
        high_wavelen = self.original_len / self.high_freq_factor
        smooth = (self.original_len / wavelen - self.low_freq_factor) / (self.high_freq_factor - self.low_freq_factor)
        blended = (1 - smooth) * inv_freq / self.factor + smooth * inv_freq
        out = torch.where(wavelen > low_wavelen, inv_freq / self.factor, inv_freq)
        return torch.where((wavelen >= high_wavelen) & (wavelen <= low_wavelen), blended, out)


def rope_scaling_of(cfg) -> Optional[Llama3Scaling]:  # cfg: ModelConfig (not imported: ops stays a leaf)
    if getattr(cfg, "rope_scaling", "none") != "llama3":
        return None
    return Llama3Scaling(cfg.rope_scaling_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor,
                         cfg.rope_original_max_seq_len)


def rope_cache(head_dim: int, max_seq_len: int, theta: float, device: torch.device | None = None,
               scaling: Optional[Llama3Scaling] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables [max_seq_len, head_dim] in fp32 (rotate-half layout, as Llama/HF)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim))
    if scaling is not None:
        inv_freq = scaling.apply(inv_freq)
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
    if fused and (kern := kernels_for(q)) is not None:
        return kern.apply_rope(q, k, cos, sin)
    if cos.dim() == 3:  # per-sample positions (document masking resets them)
        cos, sin = cos[:, None], sin[:, None]
    qf, kf = q.float(), k.float()
    q_out = qf * cos + _rotate_half(qf) * sin
    k_out = kf * cos + _rotate_half(kf) * sin
    return q_out.to(q.dtype), k_out.to(k.dtype)


def swiglu(gate: torch.Tensor, up: torch.Tensor, fused: bool = False) -> torch.Tensor:
    if fused and (k := kernels_for(gate)) is not None:
        return k.swiglu(gate, up)
    return F.silu(gate) * up


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                  fused: bool = False, vocab_size: Optional[int] = None) -> torch.Tensor:
    """Per-token loss (no reduction) in fp32. logits [N, V_padded], targets [N].

    Columns >= vocab_size (default: all columns real) are vocabulary padding, outside the loss."""
    if fused and (k := kernels_for(logits)) is not None:
        # The kernel skips the padding itself and writes a zero gradient there: no slice-backward copy.
        return k.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="none",
                               vocab_size=vocab_size)
    if vocab_size is not None:
        logits = logits[..., :vocab_size]
    return F.cross_entropy(logits.float(), targets, ignore_index=ignore_index, reduction="none")
