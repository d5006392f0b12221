"""Fused RMSNorm and LayerNorm (forward + backward) in Triton.

Input x (..., D) is viewed as rows (M, D). Each program normalises a tile of
BLOCK_M rows in fp32 and saves per-row rstd (and mean for LayerNorm) for the
backward. The backward uses a fixed number of programs that stride over the row
tiles; each keeps fp32 partial sums of dW (and dB) in registers and writes one
(D,) partial, so the final reduction is a small (programs, D) sum in torch
instead of an (M, D) intermediate or atomics.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._utils import check_device


@triton.jit
def _norm_fwd(
    X, W, B, Y, MEAN, RSTD, stride_x, stride_y, M, D, eps,
    IS_RMS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < M
    col_ok = cols < D
    mask = row_ok[:, None] & col_ok[None, :]
    x = tl.load(X + rows[:, None].to(tl.int64) * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if IS_RMS:
        xc = x
    else:
        mean = tl.sum(x, 1) / D
        xc = tl.where(mask, x - mean[:, None], 0.0)
        tl.store(MEAN + rows, mean, mask=row_ok)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, 1) / D + eps)
    tl.store(RSTD + rows, rstd, mask=row_ok)
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    y = xc * rstd[:, None] * w[None, :]
    if HAS_BIAS:
        y += tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rows[:, None].to(tl.int64) * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _norm_bwd(
    X, W, DY, DX, MEAN, RSTD, DW_PART, DB_PART, stride_x, stride_dy, stride_dx, M, D,
    IS_RMS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    db = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for tile in range(pid, tl.cdiv(M, BLOCK_M), nprog):
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        mask = row_ok[:, None] & col_ok[None, :]
        r64 = rows[:, None].to(tl.int64)
        x = tl.load(X + r64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + r64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
        if IS_RMS:
            xhat = x * rstd[:, None]
        else:
            mean = tl.load(MEAN + rows, mask=row_ok, other=0.0)
            xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        dxhat = dy * w[None, :]
        # dx = rstd * (dxhat - xhat * mean(dxhat * xhat) [- mean(dxhat) for LayerNorm])
        c1 = tl.sum(dxhat * xhat, 1) / D
        dx = dxhat - xhat * c1[:, None]
        if not IS_RMS:
            dx -= (tl.sum(dxhat, 1) / D)[:, None]
        dx = dx * rstd[:, None]
        tl.store(DX + r64 * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        dw += dy * xhat
        if HAS_BIAS:
            db += dy
    tl.store(DW_PART + pid * D + cols, tl.sum(dw, 0), mask=col_ok)
    if HAS_BIAS:
        tl.store(DB_PART + pid * D + cols, tl.sum(db, 0), mask=col_ok)


def _block_sizes(d: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_D, num_warps): about 4K-8K elements per tile in registers."""
    block_d = triton.next_power_of_2(d)
    block_m = max(1, min(16, 4096 // block_d))
    num_warps = 4 if block_d <= 1024 else 8 if block_d <= 4096 else 16
    return block_m, block_d, num_warps


def _bwd_block_sizes(d: int, is_rms: bool) -> tuple[int, int, int]:
    """Backward tiles (BLOCK_M, BLOCK_D, num_warps): about 1K elements per step, spread so that
    each thread holds 8 (RMSNorm) or 4 (LayerNorm, more live values) of them.

    Why: the backward keeps x, dy, x-hat, dx-hat and the dW (and dB) accumulators of its tile in
    registers. ptxas for sm_90a (triton 3.9) gave 205 / 255 registers per thread for the earlier
    2x4096 tile on 8 warps: one program, 8 warps, per SM, too few loads in flight. With this
    rule every width from 2048 to 8192 compiles to <= 64 registers without spills and reaches
    32 warps per SM (see _bwd_programs)."""
    block_d = triton.next_power_of_2(d)
    block_m = max(1, 1024 // block_d)
    per_thread = 8 if is_rms else 4
    num_warps = min(32, max(4, block_m * block_d // (32 * per_thread)))
    return block_m, block_d, num_warps


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _num_bwd_programs(x: torch.Tensor, tiles: int, num_warps: int) -> int:
    if x.device.type == "cuda":
        # One full wave at 32 warps per SM (what _bwd_block_sizes sizes registers for): every
        # program strides over row tiles and writes one fp32 (D,) partial of dW/dB.
        per_sm = max(1, 32 // num_warps)
        return max(1, min(tiles, per_sm * _sm_count(x.device.index or 0)))
    return max(1, min(tiles, 4))  # interpreter: few programs, fewer python round trips


class _Norm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps: float, is_rms: bool):
        shape = x.shape
        d = shape[-1]
        x2 = x.reshape(-1, d)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        m = x2.shape[0]
        y = torch.empty((m, d), device=x.device, dtype=x.dtype)
        rstd = torch.empty(m, device=x.device, dtype=torch.float32)
        mean = rstd if is_rms else torch.empty_like(rstd)
        weight = weight.contiguous()
        has_bias = bias is not None
        b = bias.contiguous() if has_bias else weight
        block_m, block_d, warps = _block_sizes(d)
        _norm_fwd[(triton.cdiv(m, block_m),)](
            x2, weight, b, y, mean, rstd, x2.stride(0), y.stride(0), m, d, eps,
            IS_RMS=is_rms, HAS_BIAS=has_bias, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=warps)
        ctx.save_for_backward(x2, weight, mean, rstd)
        ctx.is_rms, ctx.has_bias, ctx.shape = is_rms, has_bias, shape
        ctx.bias_dtype = bias.dtype if has_bias else None
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, mean, rstd = ctx.saved_tensors
        m, d = x2.shape
        dy2 = dy.reshape(-1, d)
        if dy2.stride(-1) != 1:
            dy2 = dy2.contiguous()
        dx = torch.empty_like(x2)
        block_m, block_d, warps = _bwd_block_sizes(d, ctx.is_rms)
        progs = _num_bwd_programs(x2, triton.cdiv(m, block_m), warps)
        dw_part = torch.empty((progs, d), device=x2.device, dtype=torch.float32)
        db_part = torch.empty_like(dw_part) if ctx.has_bias else dw_part
        _norm_bwd[(progs,)](
            x2, weight, dy2, dx, mean, rstd, dw_part, db_part, x2.stride(0), dy2.stride(0),
            dx.stride(0), m, d, IS_RMS=ctx.is_rms, HAS_BIAS=ctx.has_bias,
            BLOCK_M=block_m, BLOCK_D=block_d, num_warps=warps)
        dw = dw_part.sum(0).to(weight.dtype)
        db = db_part.sum(0).to(ctx.bias_dtype) if ctx.has_bias else None
        return dx.view(ctx.shape), dw, db, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x (..., D) * rsqrt(mean(x^2) + eps) * weight (D,); fp32 math, output in x.dtype."""
    check_device(x, weight)
    return _Norm.apply(x, weight, None, eps, True)


def layer_norm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, eps: float = 1e-5
) -> torch.Tensor:
    """LayerNorm over the last dim with weight (D,) and optional bias (D,); output in x.dtype."""
    check_device(x, weight)
    return _Norm.apply(x, weight, bias, eps, False)


def _ref_dtype(*ts: torch.Tensor) -> torch.dtype:
    # References compute in at least fp32: 16-bit inputs in fp32, fp64 inputs in fp64.
    dt = torch.float32
    for t in ts:
        dt = torch.promote_types(dt, t.dtype)
    return dt


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    ct = _ref_dtype(x, weight)
    xf = x.to(ct)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.to(ct)
    return y.to(x.dtype)


def layer_norm_ref(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, eps: float = 1e-5
) -> torch.Tensor:
    ct = _ref_dtype(x, weight)
    b = bias.to(ct) if bias is not None else None
    return torch.nn.functional.layer_norm(x.to(ct), x.shape[-1:], weight.to(ct), b, eps).to(x.dtype)

