"""Every kernel, forward and all gradients, against its fp32 torch reference (kernels/checks.py).

Small shapes run everywhere (CPU: the Triton interpreter, bf16 included); the realistic bf16
shapes (GQA 16/4 heads at N=1999, head dims 64/128/256, 8191x4096 norms,
8191x14336 SwiGLU, 4097x128256 cross entropy) need a CUDA GPU and are marked `gpu`.
"""
import pytest
import torch

kernels = pytest.importorskip("engine.kernels")
if not kernels.TRITON_AVAILABLE:
    pytest.skip("triton not installed", allow_module_level=True)

from engine.kernels.checks import build_case, case_names, run_case  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("name", case_names("small"))
def test_small(name, dtype):
    res = run_case(build_case(name, DEV, dtype, "small"))
    assert res["ok"], res


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", case_names("realistic"))
def test_realistic_bf16_gpu(name):
    res = run_case(build_case(name, "cuda", torch.bfloat16, "realistic"))
    assert res["ok"], res


def test_unknown_case_is_named():
    with pytest.raises(KeyError, match="unknown kernel check 'nope'"):
        build_case("nope", DEV, torch.float32, "small")
    with pytest.raises(ValueError, match="size must be"):
        case_names("huge")


def test_a_wrong_kernel_fails_the_check():
    # The harness must be able to fail: a kernel off by 3% in its output is caught.
    case = build_case("swiglu", DEV, torch.float32, "small")
    fn = case.fn
    case.fn = lambda g, u: fn(g, u) * 1.03
    assert not run_case(case)["ok"]


def test_references_compute_in_fp64_for_fp64_inputs():
    # The per-kernel tests call the *_ref functions with fp64 inputs as their ground truth: each must
    # then compute in fp64, not round through fp32. Compared with the formula written out here, in
    # fp64: the same math differs by a few fp64 roundings (~1e-16), an fp32 computation by ~1e-7.
    # Bound 1e-12 (absolute and relative) separates the two.
    from engine.kernels.cross_entropy import cross_entropy_ref
    from engine.kernels.flash_attention import attention_ref
    from engine.kernels.norms import layer_norm_ref, rms_norm_ref
    from engine.kernels.rope import apply_rope_ref
    from engine.kernels.swiglu import swiglu_ref

    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    close = lambda a, b: torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)  # noqa: E731
    x, w, b = r(5, 16), 1 + 0.1 * r(16), r(16)
    close(rms_norm_ref(x, w, 1e-6), x / (x.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt() * w)
    mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    close(layer_norm_ref(x, w, b, 1e-5), (x - mu) / (var + 1e-5).sqrt() * w + b)
    gate, up = r(5, 16), r(5, 16)
    close(swiglu_ref(gate, up), gate * torch.sigmoid(gate) * up)
    q, k = r(1, 2, 6, 8), r(1, 1, 6, 8)
    ang = r(6, 4)
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    rot = lambda t: torch.cat([-t[..., 4:], t[..., :4]], -1)  # noqa: E731
    qo, ko = apply_rope_ref(q, k, cos, sin)
    close(qo, q * cos + rot(q) * sin)
    close(ko, k * cos + rot(k) * sin)
    logits, t = r(4, 10), torch.tensor([1, 0, 9, 3])
    close(cross_entropy_ref(logits, t, reduction="none"), logits.logsumexp(-1) - logits[torch.arange(4), t])
    v = r(1, 1, 6, 8)
    s = (q @ k.transpose(-1, -2) / 8 ** 0.5).masked_fill(~torch.ones(6, 6, dtype=torch.bool).tril(), float("-inf"))
    close(attention_ref(q, k, v, causal=True), torch.softmax(s, -1) @ v)
