"""Flash attention vs. the torch reference, forward and backward, on odd shapes."""
import pytest
import torch

kernels = pytest.importorskip("kernels")
if not kernels.TRITON_AVAILABLE:
    pytest.skip("triton not installed", allow_module_level=True)

from kernels.flash_attention import attention_ref, doc_ids_from_cu_seqlens, flash_attention  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# fp32 under the interpreter is exact-ish; fp16 rounds P and dS to 16 bits before the dots.
TOL = {torch.float32: 2e-4, torch.float16: 2e-2}


def _rel(a, b):
    # Floor on the denominator: some gradients are exactly zero (one key per row).
    floor = 1e-3 * b.numel() ** 0.5
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(floor)).item()


def _check(b, h, hkv, n, d, causal, dtype, doc_ids=None, scale=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g).to(DEV, dtype).requires_grad_()  # noqa: E731
    q, k, v = mk(b, h, n, d), mk(b, hkv, n, d), mk(b, hkv, n, d)
    do = torch.randn(b, h, n, d, generator=g).to(DEV, dtype)
    out = flash_attention(q, k, v, causal=causal, softmax_scale=scale, doc_ids=doc_ids)
    grads = torch.autograd.grad(out, (q, k, v), do)
    # Reference in fp64 from the same (rounded) inputs.
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = attention_ref(q64, k64, v64, causal=causal, softmax_scale=scale, doc_ids=doc_ids)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), do.double())
    tol = TOL[dtype]
    assert _rel(out, ref) < tol, ("out", _rel(out, ref))
    for name, a, r in zip("qkv", grads, ref_grads):
        assert torch.isfinite(a).all()
        assert _rel(a, r) < tol, (f"d{name}", _rel(a, r))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("n", [1, 17, 130])
def test_odd_lengths_gqa(n, causal):
    # batch 3, 6 query heads over 2 kv heads
    _check(3, 6, 2, n, 16, causal, torch.float32)


@pytest.mark.parametrize("causal", [True, False])
def test_fp16_mqa(causal):
    _check(2, 4, 1, 45, 32, causal, torch.float16)


def test_head_dim_64_and_scale():
    _check(1, 2, 2, 40, 64, True, torch.float32, scale=0.3)


def test_head_dim_not_power_of_two():
    _check(1, 2, 1, 33, 24, True, torch.float32)


@pytest.mark.parametrize("causal", [True, False])
def test_documents(causal):
    # Document boundaries at odd places; row 1 repeats an id in a later run (a new doc).
    n = 70
    ids = torch.zeros(2, n, dtype=torch.int32)
    ids[0, 5:], ids[0, 38:], ids[0, 39:] = 1, 2, 3
    ids[1, 20:], ids[1, 50:] = 7, 0
    _check(2, 4, 2, n, 16, causal, torch.float32, doc_ids=ids.to(DEV))


def test_cu_seqlens_matches_separate_sequences():
    cu = torch.tensor([0, 13, 14, 40])
    ids = doc_ids_from_cu_seqlens(cu)
    assert ids.tolist()[0] == [0] * 13 + [1] + [2] * 26
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 40, 16, generator=g).to(DEV) for _ in range(3))
    packed = flash_attention(q, k, v, causal=True, doc_ids=ids.to(DEV))
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        sep = flash_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], causal=True)
        torch.testing.assert_close(packed[:, :, a:b], sep, atol=1e-5, rtol=1e-5)
