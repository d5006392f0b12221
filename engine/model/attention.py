"""Attention backends behind one function: torch SDPA (default), Triton flash attention, Transformer Engine.

Shapes: q [B, Hq, S, D], k and v [B, Hkv, S, D] with Hq a multiple of Hkv (GQA/MQA).
`doc_ids` [B, S] (optional) blocks attention across packed documents. A document is a maximal run of
equal consecutive ids: token i may attend token j only if no id change lies between them, so an id that
comes back after a different one starts a new document. Every backend follows this one rule (the Triton
kernel in kernels/flash_attention.py does too). The data pipeline (engine/data/masking.py) produces
non-decreasing ids (EODs before each token), for which this is the same as "equal ids".
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from engine.model.ops import kernels_for, warn_once

BACKENDS = ("sdpa", "triton", "te")


def _te_available() -> bool:
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not usable here"
        return False
    return True


def check_backend(backend: str) -> None:
    """Fail early (at model build) with a clear message if the backend cannot run here."""
    if backend not in BACKENDS:
        raise ValueError(f"model.attention: expected one of {BACKENDS}, found {backend!r}")
    if backend == "te" and not _te_available():
        raise RuntimeError("model.attention='te' needs NVIDIA Transformer Engine, which is not importable here; "
                           "use 'sdpa' or 'triton'")
    # 'triton' is decided per call (engine/model/ops.py `kernels_for`): without triton or a CUDA
    # device it falls back to SDPA with one warning.


def _doc_runs(doc_ids: torch.Tensor) -> torch.Tensor:
    """[B, S] ids -> [B, S] index of each token's document (run of equal consecutive ids), from 0.

    Kept here rather than imported from `kernels`: the torch path must work without the optional kernels."""
    runs = torch.zeros(doc_ids.shape, dtype=torch.int64, device=doc_ids.device)
    runs[:, 1:] = torch.cumsum((doc_ids[:, 1:] != doc_ids[:, :-1]).to(torch.int64), dim=1)
    return runs


def _doc_mask(doc_ids: torch.Tensor, causal: bool) -> torch.Tensor:
    """Boolean [B, 1, S, S]: True where attention is allowed (same run of equal ids, and causal if asked)."""
    runs = _doc_runs(doc_ids)
    same = runs[:, None, :, None] == runs[:, None, None, :]
    if causal:
        s = doc_ids.shape[1]
        same = same & torch.ones(s, s, dtype=torch.bool, device=doc_ids.device).tril()
    return same


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                   doc_ids: Optional[torch.Tensor] = None, dropout_p: float = 0.0) -> torch.Tensor:
    if k.shape[1] != q.shape[1]:
        # Expand K/V heads for GQA (SDPA's enable_gqa is not in every supported torch version).
        rep = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
    if doc_ids is not None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=_doc_mask(doc_ids, causal), dropout_p=dropout_p)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, dropout_p=dropout_p)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
              doc_ids: Optional[torch.Tensor] = None, dropout_p: float = 0.0, backend: str = "sdpa") -> torch.Tensor:
    """Returns [B, Hq, S, D]."""
    if backend == "triton":
        if dropout_p > 0:
            warn_once("model.attention=triton has no attention dropout; using SDPA while model.dropout > 0")
        elif (kern := kernels_for(q, "model.attention=triton")) is not None:
            return kern.flash_attention(q, k, v, causal=causal, doc_ids=doc_ids)
        return sdpa_attention(q, k, v, causal, doc_ids, dropout_p)
    if backend == "sdpa":
        return sdpa_attention(q, k, v, causal, doc_ids, dropout_p)
    if backend == "te":
        raise NotImplementedError("model.attention='te' is planned with the FP8 work; use 'sdpa' or 'triton'")
    raise ValueError(f"unknown attention backend {backend!r}")
