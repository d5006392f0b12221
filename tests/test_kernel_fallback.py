"""The torch path behind `model.attention=triton` / `model.fused_ops`, tested without the kernels.

Runs whether or not triton is installed (nothing here skips at module level, unlike tests/kernels/):

- with triton "not importable" (simulated), both features fall back to the torch path with one
  RuntimeWarning each, naming the reason, never call a kernel, and give the torch path's losses exactly;
- the SDPA path follows the kernel's document rule: a document is a maximal run of equal consecutive
  ids, so a reused id starts a new document. Checked against a plain double loop written here.
"""
import warnings

import pytest
import torch

from engine import kernels  # never fails: without triton, kernels.TRITON_AVAILABLE is False
from engine.config import config_from_dict
from engine.model import build_model, ops
from engine.model.attention import _doc_mask, attention
from engine.model.loss import lm_loss

FUSED_KERNELS = ("flash_attention", "rms_norm", "apply_rope", "swiglu", "cross_entropy")


def _train(triton_path: bool, steps: int = 2) -> list[float]:
    model_cfg = {"preset": "llama", "vocab_size": 50, "d_model": 32, "n_layers": 1, "n_heads": 4,
                 "n_kv_heads": 2, "ffn_hidden": 48, "max_seq_len": 24}
    if triton_path:
        model_cfg.update(attention="triton", fused_ops=True)
    cfg = config_from_dict({"model": model_cfg}).model
    model = build_model(cfg, seed=7, device="cpu")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    doc = torch.tensor([[0] * 7 + [1] * 12, [0] * 18 + [1]])
    pos = torch.cat([torch.arange(7), torch.arange(12), torch.arange(18), torch.arange(1)]).view(2, 19)
    losses = []
    for _ in range(steps):
        x = torch.randint(0, 50, (2, 19), generator=g)
        y = torch.randint(0, 50, (2, 19), generator=g)
        loss = lm_loss(model(x, position_ids=pos, doc_ids=doc), y, cfg.vocab_size, fused=cfg.fused_ops)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_without_triton_both_features_fall_back_once_each(monkeypatch):
    monkeypatch.setattr(kernels, "TRITON_AVAILABLE", False)
    monkeypatch.setattr(ops, "_WARNED", set())
    def must_not_run(name):
        def kernel(*args, **kwargs):
            raise AssertionError(f"kernels.{name} was called although triton is 'not importable'")
        return kernel

    for name in FUSED_KERNELS:  # without triton these names do not exist: raising=False adds them
        monkeypatch.setattr(kernels, name, must_not_run(name), raising=False)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")  # so a second warning for a feature would be seen, not swallowed
        tri = _train(triton_path=True)
    msgs = [str(w.message) for w in rec if issubclass(w.category, RuntimeWarning)]
    assert sorted(m.split(":")[0] for m in msgs) == ["model.attention=triton", "model.fused_ops"], msgs
    assert all("the triton package is not importable" in m for m in msgs), msgs
    assert tri == _train(triton_path=False)  # the torch path's numbers, bit for bit


def _loop_allowed(ids: list[int], causal: bool) -> torch.Tensor:
    """i may attend j iff (j <= i when causal and) every id in positions min(i,j)..max(i,j) is equal."""
    n = len(ids)
    out = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        for j in range(n):
            if causal and j > i:
                continue
            lo, hi = min(i, j), max(i, j)
            out[i, j] = all(ids[t] == ids[i] for t in range(lo, hi + 1))
    return out


# Non-monotonic ids: 0 comes back after 1 (row 0) and 5 after 3 (row 1); each return is a new document.
REUSED_IDS = [[0, 0, 1, 1, 0, 0, 2, 1, 1], [5, 5, 5, 3, 3, 5, 5, 3, 3]]


@pytest.mark.parametrize("causal", [True, False])
def test_sdpa_documents_are_runs_of_equal_ids(causal):
    ids = torch.tensor(REUSED_IDS)
    expect = torch.stack([_loop_allowed(row, causal) for row in REUSED_IDS])[:, None]  # [B, 1, S, S]
    assert torch.equal(_doc_mask(ids, causal), expect)

    g = torch.Generator().manual_seed(0)
    b, s, d = ids.shape[0], ids.shape[1], 8
    q = torch.randn(b, 4, s, d, generator=g)
    k, v = torch.randn(b, 2, s, d, generator=g), torch.randn(b, 2, s, d, generator=g)  # GQA 4/2
    out = attention(q, k, v, causal=causal, doc_ids=ids, backend="sdpa")
    # fp64 softmax attention with the loop's mask; GQA: query head h reads kv head h // 2.
    k64, v64 = k.double().repeat_interleave(2, dim=1), v.double().repeat_interleave(2, dim=1)
    scores = (q.double() @ k64.transpose(-1, -2)) / d ** 0.5
    ref = torch.softmax(scores.masked_fill(~expect, float("-inf")), dim=-1) @ v64
    # fp32 SDPA vs fp64: a few fp32 roundings (u = 2^-24 = 6e-8) per term over D=8 and S=9 terms;
    # measured max abs error 2.6e-7 on outputs up to 3.1. Bound 2^-20 = 9.5e-7 (16u), abs and rel.
    torch.testing.assert_close(out.double(), ref, atol=2.0**-20, rtol=2.0**-20)
