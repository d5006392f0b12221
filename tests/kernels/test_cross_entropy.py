"""Fused cross entropy vs. torch, including z-loss, label smoothing and vocab shards."""
import pytest
import torch

kernels = pytest.importorskip("engine.kernels")
if not kernels.TRITON_AVAILABLE:
    pytest.skip("triton not installed", allow_module_level=True)

from engine.kernels.cross_entropy import (  # noqa: E402
    combine_stats,
    cross_entropy,
    cross_entropy_ref,
    cross_entropy_stats,
)

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# Bounds vs the fp64 reference, from the unit roundoff u and the errors measured on CPU over every
# case of test_cross_entropy and test_padded_vocab_equals_sliced_reference:
# - the loss is fp32 for either logits dtype (fp32 math on exact inputs): relative error measured max
#   7.3e-8 (~1u of fp32, u = 2^-24 = 6e-8). Bound 2^-21 = 4.8e-7 (8u).
# - the gradient is in the logits' dtype; checked as |a - r| <= tol * (|r| + rms(r)). fp32: measured
#   max 7.5e-7 (~12u: an error d in the log-sum-exp, ~u * |lse|, is a relative error d in every
#   softmax entry). Bound 2^-18 = 3.8e-6 (64u), room for the GPU's approximate exp. fp16 (u = 2^-11 =
#   4.9e-4): one rounding of the fp32 gradient, measured max 4.6e-4. Bound 2^-10 = 9.8e-4 (2u).
LOSS_TOL = 2.0**-21
GRAD_TOL = {torch.float32: 2.0**-18, torch.float16: 2.0**-10}


def _close_grad(a, r, dtype):
    scale = r.pow(2).mean().sqrt().item()
    torch.testing.assert_close(a.double(), r, rtol=GRAD_TOL[dtype], atol=GRAD_TOL[dtype] * scale)


def _inputs(m, v, dtype, seed=0, ignore_frac=0.2):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(m, v, generator=g)).to(DEV, dtype).requires_grad_()
    targets = torch.randint(0, v, (m,), generator=g)
    targets[torch.rand(m, generator=g) < ignore_frac] = -100
    return logits, targets.to(DEV)


@pytest.mark.parametrize("m,v", [(1, 7), (17, 1000), (33, 2500), (130, 300)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("opts", [{}, {"label_smoothing": 0.1, "z_loss": 1e-3}])
def test_cross_entropy(m, v, dtype, opts):
    logits, targets = _inputs(m, v, dtype, ignore_frac=0.0 if m == 1 else 0.2)
    loss = cross_entropy(logits, targets, **opts)
    (grad,) = torch.autograd.grad(loss, logits)
    x64 = logits.detach().double().requires_grad_()
    ref = cross_entropy_ref(x64, targets, **opts)
    (ref_grad,) = torch.autograd.grad(ref, x64)
    assert ref.dtype == torch.float64 and loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref, atol=0, rtol=LOSS_TOL)
    _close_grad(grad, ref_grad, dtype)


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_reductions_and_3d(reduction):
    logits, targets = _inputs(24, 50, torch.float32)
    logits3, targets3 = logits.view(2, 12, 50), targets.view(2, 12)
    out = cross_entropy(logits3, targets3, reduction=reduction)
    ref = cross_entropy_ref(logits3.double(), targets3, reduction=reduction)
    torch.testing.assert_close(out.double(), ref)
    w = torch.randn(out.shape, dtype=torch.float64).to(DEV)
    (g,) = torch.autograd.grad((out.double() * w).sum(), logits)
    x64 = logits.detach().double().requires_grad_()
    (rg,) = torch.autograd.grad((cross_entropy_ref(x64.view(2, 12, 50), targets3, reduction=reduction) * w).sum(), x64)
    torch.testing.assert_close(g.double(), rg, atol=1e-6, rtol=1e-5)


def test_vocab_shards_combine():
    # Two "ranks" each holding half the vocab: combined pieces give the full loss.
    logits, targets = _inputs(9, 101, torch.float32, ignore_frac=0.3)
    shards = [(logits[:, :60], 0), (logits[:, 60:], 60)]
    m, s, xt, sx = combine_stats([cross_entropy_stats(x.detach(), targets, start) for x, start in shards])
    lse = m + torch.log(s)
    valid = targets != -100
    loss = ((lse - xt) * valid).sum() / valid.sum()
    ref = cross_entropy_ref(logits.detach(), targets)
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    full = cross_entropy_stats(logits.detach(), targets)
    torch.testing.assert_close(sx, full[3], atol=1e-4, rtol=1e-5)


def _vocab_parallel_worker(rank: int, world_size: int, logits: torch.Tensor, targets: torch.Tensor, opts: dict):
    import torch.distributed as dist

    v_local = logits.shape[1] // world_size
    shard = logits[:, rank * v_local:(rank + 1) * v_local].clone().requires_grad_()
    loss = cross_entropy(shard, targets, process_group=dist.group.WORLD, vocab_start=rank * v_local, **opts)
    loss.backward()
    return loss.item(), shard.grad


@pytest.mark.skipif(torch.cuda.is_available(), reason="gloo ranks on CPU tensors need the interpreter")
def test_vocab_parallel_two_ranks():
    # Two gloo ranks each own half the vocab; loss and the stitched gradient equal the full-vocab ones.
    from tests.dist_utils import run_distributed

    logits, targets = _inputs(11, 64, torch.float32, ignore_frac=0.3)
    logits, targets = logits.detach().cpu(), targets.cpu()
    opts = {"label_smoothing": 0.1, "z_loss": 1e-3}
    out = run_distributed(_vocab_parallel_worker, 2, logits, targets, opts)
    x64 = logits.double().requires_grad_()
    ref = cross_entropy_ref(x64, targets, **opts)
    (ref_grad,) = torch.autograd.grad(ref, x64)
    for loss, _ in out:
        assert abs(loss - ref.item()) < 1e-5
    grad = torch.cat([g for _, g in out], dim=1)
    torch.testing.assert_close(grad.double(), ref_grad, atol=1e-6, rtol=1e-5)


def _padded_inputs(m, v_pad, vocab, dtype, seed=0):
    # Padded columns hold large logits: any leak into the softmax, smoothing or z-loss shows at once.
    logits, targets = _inputs(m, v_pad, dtype, seed=seed)
    targets = torch.where(targets == -100, targets, targets % vocab)
    with torch.no_grad():
        logits[:, vocab:] = 30.0
    return logits, targets


@pytest.mark.parametrize("m,v_pad,vocab", [(7, 128, 100), (9, 2048, 1500)])  # 2048: several chunks per row
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("opts", [{}, {"label_smoothing": 0.1, "z_loss": 1e-3}])
def test_padded_vocab_equals_sliced_reference(m, v_pad, vocab, dtype, opts):
    logits, targets = _padded_inputs(m, v_pad, vocab, dtype)
    targets[0] = vocab - 1  # the last real column
    loss = cross_entropy(logits, targets, vocab_size=vocab, **opts)
    (grad,) = torch.autograd.grad(loss, logits)
    x64 = logits.detach()[:, :vocab].double().requires_grad_()
    ref = cross_entropy_ref(x64, targets, **opts)
    (ref_grad,) = torch.autograd.grad(ref, x64)
    torch.testing.assert_close(loss.double(), ref, atol=0, rtol=LOSS_TOL)
    _close_grad(grad[:, :vocab], ref_grad, dtype)
    assert torch.equal(grad[:, vocab:], torch.zeros_like(grad[:, vocab:]))  # exactly zero, not just small


def test_padded_vocab_3d_none_reduction():
    logits, targets = _padded_inputs(24, 64, 50, torch.float32)
    logits3, targets3 = logits.view(2, 12, 64), targets.view(2, 12)
    out = cross_entropy(logits3, targets3, reduction="none", vocab_size=50, z_loss=1e-3)
    ref = cross_entropy_ref(logits3.detach()[..., :50].double(), targets3, reduction="none", z_loss=1e-3)
    torch.testing.assert_close(out.double(), ref)
    w = torch.randn(out.shape, dtype=torch.float64).to(DEV)
    (g,) = torch.autograd.grad((out.double() * w).sum(), logits3)
    x64 = logits3.detach()[..., :50].double().requires_grad_()
    (rg,) = torch.autograd.grad((cross_entropy_ref(x64, targets3, reduction="none", z_loss=1e-3) * w).sum(), x64)
    torch.testing.assert_close(g[..., :50].double(), rg, atol=1e-6, rtol=1e-5)
    assert not g[..., 50:].any()


def test_ops_cross_entropy_padded_fused_equals_torch():
    from engine.model import ops

    logits, targets = _padded_inputs(10, 64, 37, torch.float32)
    fused = ops.cross_entropy(logits, targets, fused=True, vocab_size=37)
    plain = ops.cross_entropy(logits, targets, fused=False, vocab_size=37)
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-5)
    (gf,) = torch.autograd.grad(fused.sum(), logits)
    (gp,) = torch.autograd.grad(plain.sum(), logits)
    torch.testing.assert_close(gf, gp, atol=1e-6, rtol=1e-5)


def test_block_v_and_empty_shard_stats():
    from engine.kernels.cross_entropy import _block_v

    for v in (0, 1, 7, 100, 5000):
        b = _block_v(v)
        assert b >= 16 and b & (b - 1) == 0  # a power of two tl.arange accepts
    # A shard of padding only (zero real columns) launches nothing and leaves the combined pieces unchanged.
    logits, targets = _inputs(6, 40, torch.float32)
    logits = logits.detach()
    m, s, xt, sx = cross_entropy_stats(logits[:, 40:], targets, vocab_start=40)
    assert torch.all(s == 0) and torch.all(xt == 0) and torch.all(sx == 0) and torch.all(m < -1e29)
    full = cross_entropy_stats(logits, targets)
    merged = combine_stats([full, (m, s, xt, sx)])
    for a, b in zip(merged, full):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kwargs,match", [
    ({"vocab_size": 0}, r"vocab_size=0 must be in \(0, 16\]"),
    ({"vocab_size": -3}, r"vocab_size=-3 must be in"),
    ({"vocab_size": 17}, r"vocab_size=17 must be in \(0, 16\]"),
    ({"vocab_start": 16}, r"vocab_start=16 needs process_group"),
    ({"reduction": "avg"}, r"reduction must be"),
])
def test_argument_errors(kwargs, match):
    logits, targets = _inputs(4, 16, torch.float32)
    with pytest.raises(ValueError, match=match):
        cross_entropy(logits, targets, **kwargs)


def test_shape_mismatch_error():
    logits, targets = _inputs(4, 16, torch.float32)
    with pytest.raises(ValueError, match=r"logits \(4, 16\) must be targets \(3,\) \+ \(V,\)"):
        cross_entropy(logits, targets[:3])


def test_out_of_range_target_gives_nan_not_a_quiet_number():
    from engine.kernels.cross_entropy import cross_entropy

    x = torch.randn(4, 40).to(DEV).requires_grad_()
    y = torch.tensor([1, 39, 40, -100]).to(DEV)  # 40 is outside vocab_size=40
    per_row = cross_entropy(x, y, reduction="none")
    assert torch.isfinite(per_row[:2]).all() and torch.isnan(per_row[2]) and per_row[3] == 0
    assert torch.isnan(cross_entropy(x, y))
    # padded logits: a target in the padding is out of range too
    assert torch.isnan(cross_entropy(x, torch.tensor([35, 1, 2, 3]).to(DEV), vocab_size=30, reduction="none")[0])
