"""bf16/fp16 autocast and the dynamic loss scaler for fp16.

Weights and optimizer state stay fp32; matmuls run in the compute dtype under autocast.
fp16 needs loss scaling: the loss is multiplied by `scale` before backward, gradients are
divided by it before clipping, and a step whose gradients hold inf/nan is skipped and counted.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterable

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(dtype: str, device: torch.device) -> contextlib.AbstractContextManager:
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[dtype])


class DynamicLossScaler:
    """Megatron-style dynamic loss scale.

    On overflow: skip the step, and after `hysteresis` consecutive overflowing steps halve the scale
    (never below min_scale). After `growth_interval` clean steps in a row: double it.
    """

    def __init__(self, initial_scale: float = 2.0 ** 16, growth_interval: int = 1000, hysteresis: int = 2,
                 min_scale: float = 1.0, backoff: float = 0.5, growth: float = 2.0):
        self.scale = float(initial_scale)
        self.growth_interval, self.hysteresis = growth_interval, hysteresis
        self.min_scale, self.backoff, self.growth = min_scale, backoff, growth
        self._clean_steps = 0
        self._hysteresis_left = hysteresis
        self.skipped_steps = 0

    def update(self, found_inf: bool) -> None:
        if found_inf:
            self.skipped_steps += 1
            self._clean_steps = 0
            self._hysteresis_left -= 1
            if self._hysteresis_left <= 0:
                self.scale = max(self.scale * self.backoff, self.min_scale)
                self._hysteresis_left = self.hysteresis
            return
        self._clean_steps += 1
        self._hysteresis_left = self.hysteresis
        if self._clean_steps % self.growth_interval == 0:
            self.scale *= self.growth

    def state_dict(self) -> dict:
        return {"scale": self.scale, "clean_steps": self._clean_steps, "hysteresis_left": self._hysteresis_left,
                "skipped_steps": self.skipped_steps}

    def load_state_dict(self, sd: dict) -> None:
        self.scale, self._clean_steps = sd["scale"], sd["clean_steps"]
        self._hysteresis_left, self.skipped_steps = sd["hysteresis_left"], sd["skipped_steps"]


def unscale_and_check(grads: Iterable[torch.Tensor], scale: float) -> bool:
    """Divide gradients by `scale` in place; return True if any is inf/nan (local to this rank)."""
    grads = [g for g in grads if g is not None]
    if not grads:
        return False
    inv = 1.0 / scale
    if inv != 1.0:
        torch._foreach_mul_(grads, inv)
    norms = torch._foreach_norm(grads)
    total = torch.stack([n.float() for n in norms]).sum()
    return not math.isfinite(float(total))
