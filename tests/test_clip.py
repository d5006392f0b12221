"""engine.optim.clip in one process equals torch.nn.utils.clip_grad_norm_ (the loop uses ours everywhere)."""
import pytest
import torch

from engine.optim.clip import clip_grad_norm, grad_norm


def _params(seed: int, scale: float):
    g = torch.Generator().manual_seed(seed)
    shapes = [(7, 5), (5,), (3, 4, 2), (1,)]
    ps = [torch.nn.Parameter(torch.randn(*s, generator=g)) for s in shapes]
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g) * scale
    ps[1].grad = ps[1].grad.bfloat16().float()  # values exactly representable: both paths see the same
    return ps


@pytest.mark.parametrize("max_norm,scale", [(1.0, 3.0), (100.0, 0.1), (0.0, 5.0)])
def test_matches_torch(max_norm, scale):
    ours, ref = _params(0, scale), _params(0, scale)
    n_ours = clip_grad_norm(ours, max_norm)
    n_ref = float(torch.nn.utils.clip_grad_norm_(ref, max_norm if max_norm > 0 else float("inf")))
    assert n_ours == pytest.approx(n_ref, rel=1e-6)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=0)
    if max_norm > 0 and n_ref > max_norm:  # clipping happened and the result has the asked norm
        assert grad_norm(ours) == pytest.approx(max_norm, rel=1e-5)


def test_mixed_dtypes_and_missing_grads():
    ps = _params(1, 1.0)
    g0 = ps[0].grad.to(torch.bfloat16)
    ps[0] = torch.nn.Parameter(ps[0].detach().to(torch.bfloat16))  # a 16-bit grad is reduced in fp32
    ps[0].grad = g0
    ps[2].grad = None
    expect = sum(float(p.grad.float().pow(2).sum()) for p in ps if p.grad is not None) ** 0.5
    assert grad_norm(ps) == pytest.approx(expect, rel=1e-6)


def test_non_finite_norm_leaves_grads_alone():
    ps = _params(2, 1.0)
    ps[0].grad[0, 0] = float("inf")
    before = [p.grad.clone() for p in ps]
    assert clip_grad_norm(ps, 1.0) == float("inf")
    for p, b in zip(ps, before):
        torch.testing.assert_close(p.grad, b)
