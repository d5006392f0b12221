"""The optimizer (one path for one process, DP, ZeRO-1 and FSDP2), LR schedules and gradient clipping.

`build_adamw`/`param_groups` give a plain torch AdamW for a hand-written loop (the `tessera bench train`
baseline); the engine itself steps with `engine.optim.optimizer.Optimizer`.
"""

from engine.optim.adamw import build_adamw, param_groups
from engine.optim.optimizer import Optimizer
from engine.optim.schedule import lr_at

__all__ = ["Optimizer", "build_adamw", "lr_at", "param_groups"]
