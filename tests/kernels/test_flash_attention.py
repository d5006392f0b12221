"""Flash attention vs. the torch reference, forward and backward, on odd shapes."""
import pytest
import torch

kernels = pytest.importorskip("engine.kernels")
if not kernels.TRITON_AVAILABLE:
    pytest.skip("triton not installed", allow_module_level=True)

from engine.kernels.flash_attention import attention_ref, doc_ids_from_cu_seqlens, flash_attention  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# Relative L2 error bound vs the fp64 reference, from the format's unit roundoff u and the error
# measured on CPU (interpreter) over every case below, forward and dq/dk/dv:
# - fp32 (u = 2^-24 = 6e-8): measured max 5.6e-7 (~9u; fp32 accumulation over N keys and D), and
#   1.6e-6 for the exactly-zero dq/dk of n=1 (see _rel's floor). Bound 2^-18 = 3.8e-6 (64u): 2.4x
#   the worst case, room for the GPU's approximate exp2 (ex2.approx, ~2^-22 relative).
# - fp16 (u = 2^-11 = 4.9e-4): the output, P and dS are each rounded to fp16 once; measured max
#   3.6e-4 (0.7u). Bound 2^-10 = 9.8e-4 (2 roundings): an output off by 1.5% fails it 15 times over.
TOL = {torch.float32: 2.0**-18, torch.float16: 2.0**-10}


def _rel(a, b):
    # Floor on the denominator: with one key per row (n=1) dq and dk are exactly zero. Inputs are
    # unit normal and every nonzero reference here has an rms >= 0.14, so a floor at rms 0.1 only
    # engages there, and then measures the error against that 0.1 scale.
    floor = 0.1 * b.numel() ** 0.5
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(floor)).item()


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
    assert ref.dtype == torch.float64
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


def _loop_allowed(ids: list[int], causal: bool) -> torch.Tensor:
    """Written here, apart from kernel and reference: i may attend j iff (j <= i when causal and)
    every id in positions min(i,j)..max(i,j) is equal, i.e. a document is a maximal run of equal ids."""
    n = len(ids)
    out = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        for j in range(n):
            if not (causal and j > i):
                out[i, j] = all(ids[t] == ids[i] for t in range(min(i, j), max(i, j) + 1))
    return out


@pytest.mark.parametrize("causal", [True, False])
def test_documents_reused_ids_non_monotonic(causal):
    # Row 0 repeats [0,0,1,1,0,0,2,1] (ids come back after others: each return is a new document);
    # row 1 reuses id 3 after id 5 across the interpreter's 32/64 block boundaries.
    n = 70
    row0 = ([0, 0, 1, 1, 0, 0, 2, 1] * 9)[:n]
    row1 = [3] * 20 + [5] * 25 + [3] * 25
    ids = torch.tensor([row0, row1], dtype=torch.int32)
    allowed = torch.stack([_loop_allowed(r, causal) for r in (row0, row1)])[:, None]  # (B, 1, N, N)
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, n, 16, generator=g)
    k, v = torch.randn(2, 2, n, 16, generator=g), torch.randn(2, 2, n, 16, generator=g)
    do = torch.randn(2, 4, n, 16, generator=g)
    leaves = [t.to(DEV).requires_grad_() for t in (q, k, v)]
    out = flash_attention(*leaves, causal=causal, doc_ids=ids.to(DEV))
    grads = torch.autograd.grad(out, leaves, do.to(DEV))
    # fp64 softmax attention with the loop's mask (GQA: query head h reads kv head h // 2).
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    s = q64 @ k64.repeat_interleave(2, dim=1).transpose(-1, -2) / 16 ** 0.5
    ref = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1) @ v64.repeat_interleave(2, dim=1)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), do.double())
    for name, a, r in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *ref_grads)):
        assert _rel(a.cpu(), r) < TOL[torch.float32], (name, _rel(a.cpu(), r))
    # The library reference follows the same rule.
    lib = attention_ref(q64.detach(), k64.detach(), v64.detach(), causal=causal, doc_ids=ids)
    torch.testing.assert_close(lib, ref.detach(), atol=1e-12, rtol=1e-12)  # fp64 vs fp64: same math
