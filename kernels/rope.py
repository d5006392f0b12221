"""Rotary position embedding for q and k in one fused Triton launch.

Convention: rotate-half (Llama / Hugging Face). With x = [x1, x2] split in two
halves of the head dim,
    out = x * cos + rotate_half(x) * sin,   rotate_half(x) = [-x2, x1]
i.e. out1 = x1*c - x2*s, out2 = x2*c + x1*s with c, s the first half of the
(duplicated-halves) HF tables. The backward is the inverse rotation (sin -> -sin),
so forward and backward share one kernel.

Tables: cos/sin (S, D) as HF builds them (halves duplicated) or (S, D/2). The row
of token (b, n) is position_ids[b, n] when given, else n.
Each program rotates a tile of (token, head) rows of q or of k; q and k share
one launch. Table rows are gathered per row and stay in L1/L2.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import check_device


@triton.jit
def _rope_rows(
    X, XO, COS, SIN, POS, tile, total, stride_b, stride_h, stride_n, stride_ob, stride_oh, stride_on,
    stride_cos, stride_pos, batch_rows, N, H, HALF,
    SIGN: tl.constexpr, HAS_POS: tl.constexpr, ROWS: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    # One tile of ROWS (token, head) rows; row r -> token r // H (= b * N + n), head r % H.
    rows = tile * ROWS + tl.arange(0, ROWS)
    row_ok = rows < total
    tok = rows // H
    h = (rows % H).to(tl.int64)
    b = (tok // N).to(tl.int64)
    n = (tok % N).to(tl.int64)
    offs = tl.arange(0, BLOCK_HALF)
    mask = row_ok[:, None] & (offs < HALF)[None, :]
    # Table row: position (n, or position_ids[b, n]) plus b * batch_rows for per-batch tables.
    if HAS_POS:
        pos = tl.load(POS + b * stride_pos + n, mask=row_ok, other=0).to(tl.int64)
    else:
        pos = n
    pos = pos + b * batch_rows
    c = tl.load(COS + pos[:, None] * stride_cos + offs[None, :], mask=mask, other=0.0).to(tl.float32)
    s = tl.load(SIN + pos[:, None] * stride_cos + offs[None, :], mask=mask, other=0.0).to(tl.float32) * SIGN
    x_ptr = X + (b * stride_b + h * stride_h + n * stride_n)[:, None] + offs[None, :]
    x1 = tl.load(x_ptr, mask=mask, other=0.0).to(tl.float32)  # (ROWS, BLOCK_HALF)
    x2 = tl.load(x_ptr + HALF, mask=mask, other=0.0).to(tl.float32)
    o_ptr = XO + (b * stride_ob + h * stride_oh + n * stride_on)[:, None] + offs[None, :]
    tl.store(o_ptr, (x1 * c - x2 * s).to(XO.dtype.element_ty), mask=mask)
    tl.store(o_ptr + HALF, (x2 * c + x1 * s).to(XO.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(
    Q, K, QO, KO, COS, SIN, POS,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_qob, stride_qoh, stride_qon, stride_kob, stride_koh, stride_kon,
    stride_cos, stride_pos, batch_rows, N, HQ, HK, HALF, total_q, total_k, q_tiles,
    SIGN: tl.constexpr, HAS_POS: tl.constexpr, ROWS: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    # q and k share one launch: the first q_tiles programs rotate q, the rest k.
    pid = tl.program_id(0)
    if pid < q_tiles:
        _rope_rows(Q, QO, COS, SIN, POS, pid, total_q, stride_qb, stride_qh, stride_qn,
                   stride_qob, stride_qoh, stride_qon, stride_cos, stride_pos, batch_rows, N, HQ, HALF,
                   SIGN, HAS_POS, ROWS, BLOCK_HALF)
    else:
        _rope_rows(K, KO, COS, SIN, POS, pid - q_tiles, total_k, stride_kb, stride_kh, stride_kn,
                   stride_kob, stride_koh, stride_kon, stride_cos, stride_pos, batch_rows, N, HK, HALF,
                   SIGN, HAS_POS, ROWS, BLOCK_HALF)


def _half_table(t: torch.Tensor, head_dim: int) -> torch.Tensor:
    """(S, D) duplicated-halves or (S, D/2) table -> (S, D/2) with unit last stride."""
    if t.shape[-1] == head_dim:
        t = t[..., : head_dim // 2]
    if t.shape[-1] != head_dim // 2:
        raise ValueError(f"cos/sin last dim {t.shape[-1]} fits neither D={head_dim} nor D/2")
    return t if t.stride(-1) == 1 else t.contiguous()


def _positions(position_ids: torch.Tensor | None, b: int, n: int) -> torch.Tensor | None:
    """position_ids (B, N) or (N,) -> (B or 1, N) int with unit last stride; None stays None
    (the kernel then uses n itself and launches no extra index kernels)."""
    if position_ids is None:
        return None
    pos = position_ids.reshape(-1, n)
    if pos.shape[0] not in (1, b):
        raise ValueError(f"position_ids {tuple(position_ids.shape)} do not fit batch {b} x seq {n}")
    return pos if pos.stride(-1) == 1 else pos.contiguous()


def _tile(head_dim: int) -> tuple[int, int, int]:
    """(ROWS, BLOCK_HALF, num_warps): a 2K-element tile of (token, head) rows over 8 warps, 8
    elements per thread. The earlier 64x64 tile on 4 warps took 255 registers per thread on
    sm_90a (8 warps per SM); this one takes 64 for head dims 64-256 (32 warps per SM), per
    `python -m engine.kernels.aot`."""
    block_half = triton.next_power_of_2(head_dim // 2)
    return max(1, min(64, 2048 // block_half)), block_half, 8


def _launch(q, k, cos_h, sin_h, pos, sign: float):
    # cos_h/sin_h: (S, D/2) shared tables, or (B, S, D/2) per-batch tables (row b*S + position).
    b, hq, n, d = q.shape
    batch_rows = cos_h.shape[1] if cos_h.dim() == 3 and cos_h.shape[0] > 1 else 0
    stride_pos = 0 if pos is None or pos.shape[0] == 1 else pos.stride(0)
    hk = k.shape[1]
    qo = torch.empty_like(q)  # keeps q's layout (BHND or a BNHD view)
    ko = torch.empty_like(k)
    cos2 = cos_h.reshape(-1, d // 2)
    sin2 = sin_h.reshape(-1, d // 2)
    if cos2.stride(0) != sin2.stride(0):
        sin2 = sin2.contiguous()
        cos2 = cos2.contiguous()
    rows, block_half, num_warps = _tile(d)
    total_q, total_k = b * n * hq, b * n * hk
    q_tiles = triton.cdiv(total_q, rows)
    _rope_kernel[(q_tiles + triton.cdiv(total_k, rows),)](
        q, k, qo, ko, cos2, sin2, cos2 if pos is None else pos,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        qo.stride(0), qo.stride(1), qo.stride(2), ko.stride(0), ko.stride(1), ko.stride(2),
        cos2.stride(0), stride_pos, batch_rows, n, hq, hk, d // 2, total_q, total_k, q_tiles,
        SIGN=sign, HAS_POS=pos is not None, ROWS=rows, BLOCK_HALF=block_half, num_warps=num_warps)
    return qo, ko


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos_h, sin_h, pos):
        qo, ko = _launch(_unit_last(q), _unit_last(k), cos_h, sin_h, pos, 1.0)
        ctx.save_for_backward(cos_h, sin_h, pos)
        return qo, ko

    @staticmethod
    def backward(ctx, dqo, dko):
        cos_h, sin_h, pos = ctx.saved_tensors
        dq, dk = _launch(_unit_last(dqo), _unit_last(dko), cos_h, sin_h, pos, -1.0)
        return dq, dk, None, None, None


def apply_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    layout: str = "bhnd",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q (B, Hq, N, D) and k (B, Hk, N, D) by RoPE; returns new (q, k).

    layout "bnhd" accepts (B, N, H, D) tensors instead. cos/sin: (S, D) or (S, D/2),
    or per-batch (B, S, D|D/2); position_ids: optional (B, N) or (N,) rows of the table.
    """
    check_device(q, k, cos, sin)
    if layout == "bnhd":
        qo, ko = apply_rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin, position_ids)
        return qo.transpose(1, 2), ko.transpose(1, 2)
    if layout != "bhnd":
        raise ValueError(f"layout must be 'bhnd' or 'bnhd', got {layout!r}")
    b, _, n, d = q.shape
    if d % 2 or k.shape[0] != b or k.shape[2:] != q.shape[2:]:
        raise ValueError(f"bad shapes q={tuple(q.shape)} k={tuple(k.shape)}")
    cos_h, sin_h = _half_table(cos, d), _half_table(sin, d)
    pos = _positions(position_ids, b, n)
    return _Rope.apply(q, k, cos_h, sin_h, pos)


def rope_cos_sin(
    seq_len: int, head_dim: int, theta: float = 10000.0, device=None, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """HF-style tables (seq_len, head_dim): angles duplicated over the two halves."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float64) / head_dim)
    ang = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float64), inv_freq)
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos().to(dtype), ang.sin().to(dtype)


def apply_rope_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    position_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain torch rotate-half RoPE on (B, H, N, D) tensors with (S, D) tables."""
    n = q.shape[2]
    if position_ids is None:
        c, s = cos[:n], sin[:n]  # (N, D)
        c, s = c[None, None], s[None, None]
    else:
        c, s = cos[position_ids], sin[position_ids]  # (B, N, D)
        if c.dim() == 2:
            c, s = c[None], s[None]
        c, s = c[:, None], s[:, None]

    def rot(x):
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([-x2, x1], dim=-1)

    # At least fp32 math: fp64 inputs (and tables) stay fp64.
    ct = torch.promote_types(torch.promote_types(q.dtype, torch.float32), cos.dtype)
    qf, kf, c, s = q.to(ct), k.to(ct), c.to(ct), s.to(ct)
    return (qf * c + rot(qf) * s).to(q.dtype), (kf * c + rot(kf) * s).to(k.dtype)
