"""RoPE and SwiGLU kernels vs. torch references, forward and backward."""
import pytest
import torch

kernels = pytest.importorskip("engine.kernels")
if not kernels.TRITON_AVAILABLE:
    pytest.skip("triton not installed", allow_module_level=True)

from engine.kernels.rope import apply_rope, apply_rope_ref, rope_cos_sin  # noqa: E402
from engine.kernels.swiglu import swiglu, swiglu_ref  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# Bounds on |a - r| <= tol * (|r| + rms(r)) vs the fp64 reference (rtol = tol, atol = tol * rms(r)),
# from the unit roundoff u and the errors measured on CPU over every case below (outputs and grads):
# - fp32 (u = 2^-24 = 6e-8): RoPE measured max 1.1e-7 (2 products and a sum), SwiGLU 2.9e-7 (its
#   backward recomputes the sigmoid: ~5u). Bound 2^-20 = 9.5e-7 (16u): room for the GPU's
#   approximate exp in the sigmoid.
# - fp16 (u = 2^-11 = 4.9e-4): fp32 math then one rounding to fp16; measured max 3.5e-4 (RoPE) and
#   4.0e-4 (SwiGLU), under 1u. Bound 2^-10 = 9.8e-4 (2u).
TOL = {torch.float32: 2.0**-20, torch.float16: 2.0**-10}


def _close(a, r, dtype):
    r = r.double()
    scale = r.pow(2).mean().sqrt().item()
    torch.testing.assert_close(a.double(), r, rtol=TOL[dtype], atol=TOL[dtype] * scale)


def _grads_match(out, ref, inputs, inputs64, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    douts = [torch.randn(o.shape, generator=g).to(DEV, dtype) for o in out]
    grads = torch.autograd.grad(out, inputs, douts)
    grads64 = torch.autograd.grad(ref, inputs64, [d.double() for d in douts])
    for o, r in zip(out, ref):
        assert r.dtype == torch.float64
        _close(o, r, dtype)
    for a, r in zip(grads, grads64):
        _close(a, r, dtype)


@pytest.mark.parametrize("n", [1, 17, 130])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("with_pos", [False, True])
def test_rope(n, dtype, with_pos):
    g = torch.Generator().manual_seed(0)
    b, hq, hk, d = 3, 6, 2, 32
    cos, sin = rope_cos_sin(200, d, device=DEV)
    q = torch.randn(b, hq, n, d, generator=g).to(DEV, dtype).requires_grad_()
    k = torch.randn(b, hk, n, d, generator=g).to(DEV, dtype).requires_grad_()
    pos = torch.randint(0, 200, (b, n), generator=g).to(DEV) if with_pos else None
    out = apply_rope(q, k, cos, sin, position_ids=pos)
    q64, k64 = q.detach().double().requires_grad_(), k.detach().double().requires_grad_()
    ref = apply_rope_ref(q64, k64, cos.double(), sin.double(), position_ids=pos)
    _grads_match(out, ref, (q, k), (q64, k64), dtype)


def test_rope_bnhd_layout_and_half_tables():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 9, 4, 16, generator=g).to(DEV)  # (B, N, H, D)
    k = torch.randn(2, 9, 1, 16, generator=g).to(DEV)
    cos, sin = rope_cos_sin(9, 16, device=DEV)
    qo, ko = apply_rope(q, k, cos[:, :8], sin[:, :8], layout="bnhd")
    qr, kr = apply_rope_ref(q.transpose(1, 2).double(), k.transpose(1, 2).double(), cos, sin)
    _close(qo, qr.transpose(1, 2), torch.float32)
    _close(ko, kr.transpose(1, 2), torch.float32)


@pytest.mark.parametrize("with_pos", [False, True])
def test_rope_per_batch_tables(with_pos):
    # (B, S, D) tables, as a model gathers them by position_ids; S longer than the sequence.
    g = torch.Generator().manual_seed(2)
    cos, sin = rope_cos_sin(40, 16, device=DEV)
    idx = torch.randint(0, 40, (3, 30), generator=g).to(DEV)
    cos3, sin3 = cos[idx], sin[idx]  # (3, 30, 16)
    q = torch.randn(3, 4, 13, 16, generator=g).to(DEV)
    k = torch.randn(3, 2, 13, 16, generator=g).to(DEV)
    pos = torch.randint(0, 30, (13,), generator=g).to(DEV) if with_pos else None
    qo, ko = apply_rope(q, k, cos3, sin3, position_ids=pos)
    rows = idx[:, :13] if pos is None else idx[:, pos]  # (3, 13) rows of the base table
    qr, kr = apply_rope_ref(q.double(), k.double(), cos, sin, position_ids=rows)
    _close(qo, qr, torch.float32)
    _close(ko, kr, torch.float32)


@pytest.mark.parametrize("shape", [(1,), (3, 17, 33), (130, 70)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_swiglu(shape, dtype):
    g = torch.Generator().manual_seed(0)
    gate = (2 * torch.randn(*shape, generator=g)).to(DEV, dtype).requires_grad_()
    up = torch.randn(*shape, generator=g).to(DEV, dtype).requires_grad_()
    out = swiglu(gate, up)
    g64, u64 = gate.detach().double().requires_grad_(), up.detach().double().requires_grad_()
    ref = swiglu_ref(g64, u64)
    _grads_match((out,), (ref,), (gate, up), (g64, u64), dtype)
