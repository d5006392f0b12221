"""RMSNorm / LayerNorm kernels vs. torch references (forward and all gradients)."""
import pytest
import torch

kernels = pytest.importorskip("engine.kernels")
if not kernels.TRITON_AVAILABLE:
    pytest.skip("triton not installed", allow_module_level=True)

from engine.kernels.norms import layer_norm, layer_norm_ref, rms_norm, rms_norm_ref  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# Bounds on |a - r| <= tol * (|r| + rms(r)) vs the fp64 reference (rtol = tol, atol = tol * rms(r):
# scale-free, and elements near zero are judged on the tensor's own scale), from the unit roundoff u
# and the errors measured on CPU over every case below.
# y and dx are in x.dtype:
# - fp32 (u = 2^-24 = 6e-8): measured max 1.5e-7 (y) and 1.8e-7 (dx), ~3u. Bound 2^-20 = 9.5e-7
#   (16u): room for the GPU's approximate rsqrt (~2u).
# - fp16 (u = 2^-11 = 4.9e-4): fp32 math then one rounding to fp16; measured max 3.4e-4 (y) and
#   3.6e-4 (dx), 0.7u. Bound 2^-10 = 9.8e-4 (2u).
# dw and db are fp32 (the weights are fp32 for either x dtype), sums over rows of exact products:
# measured max 2.3e-7 (~4u, 130 rows). Bound 2^-19 = 1.9e-6 (32u) for both x dtypes.
TOL_X = {torch.float32: 2.0**-20, torch.float16: 2.0**-10}
TOL_W = 2.0**-19


def _close(a, r, tol, what):
    scale = r.pow(2).mean().sqrt().item()
    torch.testing.assert_close(a.double(), r, rtol=tol, atol=tol * scale, msg=lambda m: f"{what}: {m}")


def _run(fn, ref, shape, dtype, bias):
    g = torch.Generator().manual_seed(0)
    d = shape[-1]
    x = (torch.randn(*shape, generator=g) * 3 + 1).to(DEV, dtype).requires_grad_()
    w = (1 + 0.1 * torch.randn(d, generator=g)).to(DEV).requires_grad_()
    b = (0.1 * torch.randn(d, generator=g)).to(DEV).requires_grad_() if bias else None
    dy = torch.randn(*shape, generator=g).to(DEV, dtype)
    args = (x, w) + ((b,) if fn is layer_norm else ())
    params = [t for t in (x, w, b) if t is not None]
    y = fn(*args)
    grads = torch.autograd.grad(y, params, dy)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    b64 = b.detach().double().requires_grad_() if b is not None else None
    args64 = (x64, w64) + ((b64,) if fn is layer_norm else ())
    y64 = ref(*args64)
    assert y64.dtype == torch.float64
    grads64 = torch.autograd.grad(y64, [t for t in (x64, w64, b64) if t is not None], dy.double())
    _close(y, y64, TOL_X[dtype], "y")
    _close(grads[0], grads64[0], TOL_X[dtype], "dx")
    for name, a, r in zip(("dw", "db"), grads[1:], grads64[1:]):
        _close(a, r, TOL_W, name)


@pytest.mark.parametrize("shape", [(1, 1, 8), (3, 17, 33), (130, 64), (5, 1000)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rms_norm(shape, dtype):
    _run(rms_norm, rms_norm_ref, shape, dtype, bias=False)


@pytest.mark.parametrize("shape", [(1, 1, 8), (3, 17, 33), (130, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bias", [True, False])
def test_layer_norm(shape, dtype, bias):
    _run(layer_norm, layer_norm_ref, shape, dtype, bias=bias)
