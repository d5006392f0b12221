"""FP8 scaling recipes: how a high-precision tensor becomes (fp8 values, dequantisation scale).

Formats: e4m3 (max 448, 3 mantissa bits) for weights and activations, e5m2 (max 57344, 2 mantissa bits) for
gradients, whose range matters more than their precision. A tensor t is cast as q = fp8(clamp(t * s)), and
the matmul gets 1/s back as its dequantisation scale (engine/precision/fp8_rules.py).

- tensorwise: "current" scaling, s = fp8_max / amax(t), computed from the tensor being cast.
- rowwise: one scale per row of each matmul operand (per token of the activations, per output feature of
  the weight), rounded down to a power of two so that scaling is exact (only the exponent changes).
  Gradients use e4m3 too, as torchao's rowwise recipe does: CUDA's row-wise kernel is built for e4m3 pairs.
- delayed: s = fp8_max / (max(amax history) * 2^margin) for activations and gradients, from the amaxes of
  the previous `history_len` optimizer steps (no reduction before the cast); this step's amax is recorded
  and enters the history at `DelayedScaling.update`, once per optimizer step. Weights, cast once per
  step anyway, use current scaling.
"""

from __future__ import annotations

from typing import Optional

import torch

from engine.precision.fp8_rules import E4M3, E5M2

RECIPES = ("tensorwise", "rowwise", "delayed")
_EPS = 1e-12  # amax floor: an all-zero tensor gets a finite scale


def fp8_max(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).max)


def grad_dtype(recipe: str) -> torch.dtype:
    """The fp8 format of gradients under `recipe` (e5m2, except rowwise: e4m3, see the module docstring)."""
    return E4M3 if recipe == "rowwise" else E5M2


def amax_to_scale(amax: torch.Tensor, dtype: torch.dtype, margin: int = 0, power_of_two: bool = False) -> torch.Tensor:
    """Quantisation factor s (fp32, same shape as amax) so that amax * s * 2^margin == fp8_max."""
    s = fp8_max(dtype) / (amax.float().clamp(min=_EPS) * (2.0 ** margin))
    if power_of_two:
        s = torch.exp2(torch.floor(torch.log2(s)))
    return s


def cast(t: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp8(clamp(t * scale)): values beyond the format's range saturate instead of becoming inf/nan."""
    m = fp8_max(dtype)
    return (t.float() * scale).clamp(-m, m).to(dtype)


def quantize_tensorwise(t: torch.Tensor, dtype: torch.dtype,
                        scale: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 t, dequantisation scale []) with one scale for the whole tensor; `scale` None = current scaling."""
    if scale is None:
        scale = amax_to_scale(t.detach().abs().amax(), dtype)
    return cast(t, scale, dtype), scale.reciprocal()


def quantize_rowwise(t: torch.Tensor, dtype: torch.dtype, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """t [R, C] -> (fp8 t, dequantisation scales), one power-of-two scale per slice along `dim`'s other axis:
    dim=1 -> scales [R, 1] (one per row), dim=0 -> scales [1, C] (one per column)."""
    amax = t.detach().abs().amax(dim=dim, keepdim=True)
    scale = amax_to_scale(amax, dtype, power_of_two=True)
    return cast(t, scale, dtype), scale.reciprocal().contiguous()


class DelayedScaling:
    """Delayed-scaling state of one tensor role (the input or the output gradient) of one linear.

    history [L] fp32: the amaxes of the last L optimizer steps, newest first; scale [] fp32: the factor the
    next casts use; pending [] fp32: the max amax seen in this step's micro-batches (local to this rank
    until `update` reduces it). Until the first update (`steps` == 0) casts use current scaling.
    """

    def __init__(self, dtype: torch.dtype, history_len: int, margin: int, device: torch.device) -> None:
        self.dtype, self.margin = dtype, margin
        self.history = torch.zeros(history_len, dtype=torch.float32, device=device)
        self.scale = torch.ones((), dtype=torch.float32, device=device)
        self.pending = torch.zeros((), dtype=torch.float32, device=device)
        self.steps = 0  # updates so far (python int: deciding current vs delayed needs no device sync)

    def quantize(self, t: torch.Tensor, record: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(fp8 t, dequantisation scale []); records amax(t) for the next update when `record`."""
        amax = t.detach().abs().amax().float()
        if record:
            torch.maximum(self.pending, amax, out=self.pending)
        scale = amax_to_scale(amax, self.dtype, self.margin) if self.steps == 0 else self.scale
        return cast(t, scale, self.dtype), scale.reciprocal()

    def update(self, amax: torch.Tensor) -> None:
        """End of an optimizer step: `amax` (this step's, already reduced over the ranks sharing the layer)
        enters the history (oldest dropped), and the scale follows the history's max."""
        self.history.copy_(torch.roll(self.history, 1))
        self.history[0] = amax
        ref = self.history.max()
        new = amax_to_scale(ref, self.dtype, self.margin)
        self.scale.copy_(torch.where(ref > 0, new, self.scale))  # nothing seen yet: keep the old scale
        self.pending.zero_()
        self.steps += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"amax_history": self.history.clone(), "scale": self.scale.clone(),
                "steps": torch.tensor(self.steps, dtype=torch.int64)}

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        hist = sd["amax_history"]
        if tuple(hist.shape) != tuple(self.history.shape):
            raise ValueError(f"fp8 amax history: expected length {self.history.numel()} "
                             f"(precision.fp8.amax_history_len), found {hist.numel()}")
        self.history.copy_(hist)
        self.scale.copy_(sd["scale"])
        self.steps = int(sd["steps"])
        self.pending.zero_()


__all__ = ["DelayedScaling", "RECIPES", "amax_to_scale", "cast", "fp8_max", "grad_dtype", "quantize_rowwise",
           "quantize_tensorwise"]
