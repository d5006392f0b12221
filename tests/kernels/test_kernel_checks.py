"""Every kernel, forward and all gradients, against its fp32 torch reference (kernels/checks.py).

Small shapes run everywhere (CPU: the Triton interpreter, bf16 included); the realistic bf16
shapes of the issue (GQA 16/4 heads at N=1999, head dims 64/128/256, 8191x4096 norms,
8191x14336 SwiGLU, 4097x128256 cross entropy) need a CUDA GPU and are marked `gpu`.
"""
import pytest
import torch

kernels = pytest.importorskip("kernels")
if not kernels.TRITON_AVAILABLE:
    pytest.skip("triton not installed", allow_module_level=True)

from kernels.checks import build_case, case_names, run_case  # noqa: E402

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
