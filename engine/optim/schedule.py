"""Learning-rate schedules: linear warmup, then cosine / linear / WSD / constant decay to min_lr."""

from __future__ import annotations

import math

from engine.config import OptimConfig


def lr_at(step: int, cfg: OptimConfig, total_iters: int) -> float:
    """Learning rate for the optimizer update number `step` (0-based).

    Warmup: warmup_init_lr -> lr linearly over warmup_iters updates (update `warmup_iters-1` uses lr).
    Decay: from lr at the end of warmup to min_lr at decay_iters (default: the run's total iters);
    constant at min_lr afterwards. WSD holds lr until the last `wsd_decay_fraction` of the decay span,
    then decays linearly to min_lr.
    """
    warmup = cfg.warmup_iters
    if step < warmup:
        return cfg.warmup_init_lr + (cfg.lr - cfg.warmup_init_lr) * (step + 1) / warmup
    if cfg.decay == "constant":
        return cfg.lr
    decay_iters = cfg.decay_iters if cfg.decay_iters is not None else total_iters
    if step >= decay_iters:
        return cfg.min_lr
    span = max(decay_iters - warmup, 1)
    progress = (step - warmup) / span  # in [0, 1)
    if cfg.decay == "cosine":
        return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))
    if cfg.decay == "linear":
        return cfg.lr - (cfg.lr - cfg.min_lr) * progress
    if cfg.decay == "wsd":
        decay_start = 1.0 - cfg.wsd_decay_fraction
        if progress < decay_start:
            return cfg.lr
        return cfg.lr - (cfg.lr - cfg.min_lr) * (progress - decay_start) / cfg.wsd_decay_fraction
    raise ValueError(f"optim.decay: unknown schedule {cfg.decay!r}")
