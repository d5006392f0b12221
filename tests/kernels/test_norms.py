"""RMSNorm / LayerNorm kernels vs. torch references (forward and all gradients)."""
import pytest
import torch

kernels = pytest.importorskip("kernels")
if not kernels.TRITON_AVAILABLE:
    pytest.skip("triton not installed", allow_module_level=True)

from kernels.norms import layer_norm, layer_norm_ref, rms_norm, rms_norm_ref  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3)}


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
    grads64 = torch.autograd.grad(y64, [t for t in (x64, w64, b64) if t is not None], dy.double())
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(y.double(), y64, atol=atol, rtol=rtol)
    for a, r in zip(grads, grads64):
        # weight grads sum over rows: scale the tolerance with the row count
        rows = x.numel() // d
        torch.testing.assert_close(a.double(), r, atol=atol * rows ** 0.5, rtol=rtol * 4)


@pytest.mark.parametrize("shape", [(1, 1, 8), (3, 17, 33), (130, 64), (5, 1000)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rms_norm(shape, dtype):
    _run(rms_norm, rms_norm_ref, shape, dtype, bias=False)


@pytest.mark.parametrize("shape", [(1, 1, 8), (3, 17, 33), (130, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bias", [True, False])
def test_layer_norm(shape, dtype, bias):
    _run(layer_norm, layer_norm_ref, shape, dtype, bias=bias)
