"""AdamW with decoupled weight decay on matrices only (no decay on norms, biases)."""

from __future__ import annotations

import inspect
from typing import Iterable

import torch

from engine.config import OptimConfig


def param_groups(named_params: Iterable[tuple[str, torch.nn.Parameter]], weight_decay: float) -> list[dict]:
    """Two groups: 2-D+ weights (matrices, embeddings) decay; 1-D (norm weights, biases) do not.
    A parameter shared by several modules (tied embeddings) is listed once."""
    decay, no_decay, seen = [], [], set()
    for _, p in named_params:
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_adamw(named_params: Iterable[tuple[str, torch.nn.Parameter]], cfg: OptimConfig,
                device: torch.device) -> torch.optim.AdamW:
    """torch AdamW, fused on CUDA (one kernel for all params) and foreach elsewhere."""
    groups = param_groups(named_params, cfg.weight_decay)
    kwargs: dict = {"lr": cfg.lr, "betas": tuple(cfg.betas), "eps": cfg.eps}
    sig = inspect.signature(torch.optim.AdamW).parameters
    if device.type == "cuda" and "fused" in sig:
        kwargs["fused"] = True
    elif "foreach" in sig:
        kwargs["foreach"] = True
    return torch.optim.AdamW(groups, **kwargs)
