"""Small helpers shared by the kernel modules (no triton import here)."""
from __future__ import annotations

import os

import torch


def interpreting() -> bool:
    """True when triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_device(*tensors: torch.Tensor) -> None:
    """Triton needs CUDA tensors unless the interpreter runs on the CPU."""
    for t in tensors:
        if t.device.type != "cuda" and not interpreting():
            raise RuntimeError(
                f"triton kernel got a {t.device.type} tensor; use CUDA or set TRITON_INTERPRET=1"
            )
