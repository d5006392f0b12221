"""A tiny model trained with the Triton path (flash attention + fused ops) tracks the torch path.

fp32 under the interpreter on CPU: both paths start from the same weights and data,
and after 20 AdamW steps their losses agree within 1e-4 (relative) at every step. Spies on the
`kernels` functions show that every fused kernel ran on the Triton path (a silent fallback to torch
would match the losses too) and none on the torch path. The fallback without triton installed is
tested in tests/test_kernel_fallback.py, which does not skip when triton is missing.
"""
import pytest
import torch

kernels = pytest.importorskip("engine.kernels")
if not kernels.TRITON_AVAILABLE:
    pytest.skip("triton not installed", allow_module_level=True)

from engine.config import config_from_dict  # noqa: E402
from engine.model import build_model  # noqa: E402
from engine.model.loss import lm_loss  # noqa: E402

# Every kernel the model reaches through engine/model/ops.py and attention.py (LayerNorm: test_norms.py).
FUSED_KERNELS = ("flash_attention", "rms_norm", "apply_rope", "swiglu", "cross_entropy")


def _spy(monkeypatch) -> dict[str, list[torch.dtype]]:
    """Wrap each kernel so its calls are recorded (dtype of the first argument) and still run."""
    seen: dict[str, list[torch.dtype]] = {name: [] for name in FUSED_KERNELS}

    def wrap(name, real):
        return lambda x, *a, **kw: seen[name].append(x.dtype) or real(x, *a, **kw)

    for name in FUSED_KERNELS:
        monkeypatch.setattr(kernels, name, wrap(name, getattr(kernels, name)))
    return seen


def _called(seen) -> set[str]:
    return {name for name, calls in seen.items() if calls}


def _train(preset_overrides, triton_path: bool, steps: int = 20, dtype=None):
    model_cfg = {"preset": "llama", "vocab_size": 50, "d_model": 32, "n_layers": 1, "n_heads": 4,
                 "n_kv_heads": 2, "ffn_hidden": 48, "max_seq_len": 24, **preset_overrides}
    if triton_path:
        model_cfg.update(attention="triton", fused_ops=True)
    cfg = config_from_dict({"model": model_cfg}).model
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = build_model(cfg, seed=7, device=dev)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(steps):
        x = torch.randint(0, 50, (2, 19), generator=g).to(dev)  # 19: not a block multiple
        y = torch.randint(0, 50, (2, 19), generator=g).to(dev)
        y[0, 3] = -100
        # packed documents with boundaries at odd places, positions reset per document
        doc = torch.tensor([[0] * 7 + [1] * 12, [0] * 18 + [1]]).to(dev)
        pos = torch.cat([torch.arange(7), torch.arange(12), torch.arange(18), torch.arange(1)]).view(2, 19).to(dev)
        with torch.autocast(torch.device(dev).type, dtype=dtype, enabled=dtype is not None):
            logits = model(x, position_ids=pos, doc_ids=doc)
            loss = lm_loss(logits, y, cfg.vocab_size, fused=cfg.fused_ops)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_triton_path_matches_torch_path(monkeypatch):
    # LayerNorm is covered by test_norms.py; one Llama-style run keeps the interpreter time small.
    seen = _spy(monkeypatch)
    ref = _train({}, triton_path=False)
    assert _called(seen) == set()
    tri = _train({}, triton_path=True)
    assert _called(seen) == set(FUSED_KERNELS)
    assert ref[-1] < ref[0]  # it learns something
    for a, b in zip(tri, ref):
        assert abs(a - b) <= 1e-4 * abs(b), (tri, ref)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the fallback is for machines without CUDA")
def test_cpu_without_interpreter_falls_back_to_torch(monkeypatch):
    # Without TRITON_INTERPRET asked for, CPU tensors take the torch path (one warning per feature)
    # and give the torch path's numbers exactly.
    from engine.model import ops

    monkeypatch.setattr(kernels, "INTERPRET_REQUESTED", False)
    monkeypatch.setattr(ops, "_WARNED", set())
    seen = _spy(monkeypatch)
    with pytest.warns(RuntimeWarning, match="Triton needs a CUDA device") as rec:  # records every warning
        tri = _train({}, triton_path=True, steps=2)
    msgs = [str(w.message) for w in rec if issubclass(w.category, RuntimeWarning)]
    assert sorted(m.split(":")[0] for m in msgs) == ["model.attention=triton", "model.fused_ops"], msgs
    assert _called(seen) == set()
    assert tri == _train({}, triton_path=False, steps=2)


def test_triton_path_matches_torch_path_in_bf16(monkeypatch):
    # bf16 autocast: the kernels get bf16 q/k/v (on CPU the interpreter emulates the bf16 dots).
    # Both paths round differently, so the bound is bf16-sized (2e-3 relative); measured: at most
    # 3.4e-4, about the torch path's own bf16-vs-fp32 difference on this run (3.7e-4).
    seen = _spy(monkeypatch)
    ref = _train({}, triton_path=False, steps=10, dtype=torch.bfloat16)
    assert _called(seen) == set()
    tri = _train({}, triton_path=True, steps=10, dtype=torch.bfloat16)
    assert _called(seen) == set(FUSED_KERNELS)
    assert set(seen["flash_attention"]) == {torch.bfloat16}
    for a, b in zip(tri, ref):
        assert abs(a - b) <= 2e-3 * abs(b), (tri, ref)
