"""Triton kernels for Tessera: flash attention, norms, RoPE, SwiGLU, cross entropy.

Each kernel module holds its Triton forward/backward kernels, a
``torch.autograd.Function`` and a plain torch reference (``*_ref``) used by tests.

Importing this package never fails: when triton is missing ``TRITON_AVAILABLE`` is
False and callers must use the torch path. Without CUDA we default
``TRITON_INTERPRET=1`` *before* triton is imported (the interpreter reads the
variable at import time), so the kernels run, slowly, on the CPU.
"""
from __future__ import annotations

import os

import torch

# Whether the user asked for the interpreter (before our default below): the model uses the
# Triton path on CPU tensors only then (engine/model/ops.py); direct calls work either way.
INTERPRET_REQUESTED = os.environ.get("TRITON_INTERPRET", "0") == "1"
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

try:
    import triton  # noqa: F401
    import triton.language  # noqa: F401

    TRITON_AVAILABLE = True
except Exception:  # ImportError, or a broken install: the torch path still works
    TRITON_AVAILABLE = False

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

if TRITON_AVAILABLE:
    from .cross_entropy import (
        combine_stats,
        cross_entropy,
        cross_entropy_ref,
        cross_entropy_stats,
    )
    from .flash_attention import (
        attention_ref,
        doc_ids_from_cu_seqlens,
        flash_attention,
    )
    from .norms import layer_norm, layer_norm_ref, rms_norm, rms_norm_ref
    from .rope import apply_rope, apply_rope_ref, rope_cos_sin
    from .swiglu import swiglu, swiglu_ref

__all__ = ["TRITON_AVAILABLE", "INTERPRET", "INTERPRET_REQUESTED"]
if TRITON_AVAILABLE:  # only names that exist here, so `from engine.kernels import *` works without triton
    __all__ += [
        "flash_attention",
        "attention_ref",
        "doc_ids_from_cu_seqlens",
        "rms_norm",
        "rms_norm_ref",
        "layer_norm",
        "layer_norm_ref",
        "apply_rope",
        "apply_rope_ref",
        "rope_cos_sin",
        "swiglu",
        "swiglu_ref",
        "cross_entropy",
        "cross_entropy_ref",
        "cross_entropy_stats",
        "combine_stats",
    ]
