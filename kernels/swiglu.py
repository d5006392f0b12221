"""SwiGLU activation: out = silu(gate) * up, fused forward and backward in Triton.

Elementwise over flattened tensors; fp32 math, outputs in the input dtype. The
backward recomputes sigmoid(gate) instead of saving it (one read of gate beats
storing and re-reading an extra activation).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import check_device

_BLOCK = 2048


@triton.jit
def _swiglu_fwd(G, U, O, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    out = g * tl.sigmoid(g) * u
    tl.store(O + offs, out.to(O.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd(G, U, DO, DG, DU, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + offs, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = g * sig
    # d silu / dg = sig * (1 + g * (1 - sig))
    dg = do * u * sig * (1.0 + g * (1.0 - sig))
    tl.store(DG + offs, dg.to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + offs, (do * silu).to(DU.dtype.element_ty), mask=mask)


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        gate, up = gate.contiguous(), up.contiguous()
        out = torch.empty_like(gate)
        n = gate.numel()
        _swiglu_fwd[(triton.cdiv(n, _BLOCK),)](gate, up, out, n, BLOCK=_BLOCK, num_warps=8)
        ctx.save_for_backward(gate, up)
        return out

    @staticmethod
    def backward(ctx, dout):
        gate, up = ctx.saved_tensors
        dout = dout.contiguous()
        dg, du = torch.empty_like(gate), torch.empty_like(up)
        n = gate.numel()
        _swiglu_bwd[(triton.cdiv(n, _BLOCK),)](gate, up, dout, dg, du, n, BLOCK=_BLOCK, num_warps=8)
        return dg, du


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for two same-shaped tensors (..., F)."""
    check_device(gate, up)
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"gate {tuple(gate.shape)} {gate.dtype} vs up {tuple(up.shape)} {up.dtype}")
    return _SwiGLU.apply(gate, up)


def swiglu_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    # At least fp32 math: 16-bit inputs in fp32, fp64 inputs in fp64.
    ct = torch.promote_types(torch.promote_types(gate.dtype, up.dtype), torch.float32)
    return (torch.nn.functional.silu(gate.to(ct)) * up.to(ct)).to(gate.dtype)
