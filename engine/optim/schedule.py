"""Learning-rate schedules: linear warmup, then cosine / linear / WSD / constant (+ cooldown) decay to min_lr.

`lr_at` is a pure function of (step, config, total_iters): no state, nothing remembered between calls. A run
resumed from a checkpoint at step k therefore continues its schedule exactly (the trainer calls it with the
restored iteration counter), and a second phase of training (continued pretraining) is just another config:
warmup from `warmup_init_lr` (e.g. the first phase's min_lr) to a new peak `lr`, then a new decay.
"""

from __future__ import annotations

import math

from engine.config import OptimConfig

#: Shapes of the WSD decay (and of the cooldown of `constant`): progress q goes 0 -> 1 over the decay.
DECAY_SHAPES = ("linear", "cosine", "1-sqrt")


def decay_shape(shape: str, q: float, peak: float, low: float) -> float:
    """The learning rate at progress `q` in [0, 1] of a decay from `peak` (q = 0) to `low` (q = 1).

    linear: peak - (peak - low) * q
    cosine: low + (peak - low) * (1 + cos(pi * q)) / 2
    1-sqrt: low + (peak - low) * (1 - sqrt(q))      (Hagele et al. 2024, "Scaling Laws and Compute-Optimal
            Training Beyond Fixed Training Durations": drops fast at first, then slowly)
    """
    if shape == "linear":
        return peak - (peak - low) * q
    if shape == "cosine":
        return low + 0.5 * (peak - low) * (1.0 + math.cos(math.pi * q))
    if shape == "1-sqrt":
        return low + (peak - low) * (1.0 - math.sqrt(q))
    raise ValueError(f"optim.wsd_decay_shape: expected one of {', '.join(DECAY_SHAPES)}, found {shape!r}")


def decay_end(cfg: OptimConfig, total_iters: int) -> int:
    """The step at which the decay (or the cooldown) reaches min_lr: decay_iters, or the run's total iters."""
    return cfg.decay_iters if cfg.decay_iters is not None else total_iters


def lr_at(step: int, cfg: OptimConfig, total_iters: int) -> float:
    """Learning rate for the optimizer update number `step` (0-based).

    Warmup: warmup_init_lr -> lr linearly over warmup_iters updates (update `warmup_iters-1` uses lr).
    Decay: from lr at the end of warmup to min_lr at decay_iters (default: the run's total iters);
    constant at min_lr afterwards. WSD holds lr until the last `wsd_decay_fraction` of the decay span
    (or the last `cooldown_iters` steps before decay_iters when that is set), then decays to min_lr in
    `wsd_decay_shape`. `constant` holds lr for ever, or, with `cooldown_iters`, until the last
    `cooldown_iters` steps before decay_iters (default: total iters, so the cooldown moves when the run is
    extended), which decay to min_lr in `wsd_decay_shape`.
    """
    warmup = cfg.warmup_iters
    if step < warmup:
        return cfg.warmup_init_lr + (cfg.lr - cfg.warmup_init_lr) * (step + 1) / warmup
    cooldown = cfg.cooldown_iters if cfg.decay in ("wsd", "constant") else None
    if cfg.decay == "constant" and cooldown is None:
        return cfg.lr
    decay_iters = decay_end(cfg, total_iters)
    if step >= decay_iters:
        return cfg.min_lr
    if cooldown is not None:  # stable at lr, then the last `cooldown` steps before decay_iters decay to min_lr
        start = decay_iters - cooldown
        if step < start:
            return cfg.lr
        return decay_shape(cfg.wsd_decay_shape, (step - start) / cooldown, cfg.lr, cfg.min_lr)
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
        if cfg.wsd_decay_shape == "linear":  # this exact expression: the values of existing runs, bit for bit
            return cfg.lr - (cfg.lr - cfg.min_lr) * (progress - decay_start) / cfg.wsd_decay_fraction
        q = min((progress - decay_start) / cfg.wsd_decay_fraction, 1.0)
        return decay_shape(cfg.wsd_decay_shape, q, cfg.lr, cfg.min_lr)
    raise ValueError(f"optim.decay: unknown schedule {cfg.decay!r}")
