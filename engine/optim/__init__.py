"""Optimizers, learning-rate schedules and gradient clipping."""

from engine.optim.adamw import build_adamw, param_groups
from engine.optim.schedule import lr_at

__all__ = ["build_adamw", "param_groups", "lr_at"]
