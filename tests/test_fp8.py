"""FP8 matmuls (engine/precision/fp8*.py) in one process.

Error bounds come from the formats, not from measurements: a cast to a format with m mantissa bits rounds
each element to within u = 2^-(m+1) of its value (e4m3: 2^-4, e5m2: 2^-3), plus at most half the subnormal
spacing (e4m3: 2^-10, e5m2: 2^-17) in scaled units near zero. For a product A B of operands with elementwise
relative errors ua, ub:  ||ÂB̂ - AB||_F <= ||ΔA||_F ||B||_2 + (||A||_2 + ||ΔA||_F) ||ΔB||_F,
plus the rounding of a bf16 output (2^-8 relative) where the kernel writes bf16, and fp32 accumulation.
Multi-process (tp = 2, sequence parallel, amax reduction): tests/parallel/test_fp8_tp.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from engine.errors import ConfigError
from engine.parallel.layers import ColumnParallelLinear, RowParallelLinear
from engine.parallel.pipeline.weight_grad import WeightGradStore, defer_weight_grads
from engine.parallel.state import ParallelState
from engine.precision.fp8 import Fp8Linear, StepClock
from engine.precision.fp8_recipes import DelayedScaling, amax_to_scale, quantize_rowwise
from engine.precision.fp8_rules import E4M3, E5M2, Fp8LayoutError, check_scaled_mm, scaled_mm
from engine.precision.fp8_swap import apply_fp8

U = {E4M3: 2.0 ** -4, E5M2: 2.0 ** -3}  # unit roundoff (round to nearest)
HALF_SUB = {E4M3: 2.0 ** -10, E5M2: 2.0 ** -17}  # half the smallest subnormal spacing, in scaled units
FMAX = {E4M3: 448.0, E5M2: 57344.0}


def _delta(a: torch.Tensor, dtype: torch.dtype) -> float:
    """Upper bound of ||fp8(a) - a||_F (scale computed from amax: at most 2x coarser with power-of-two scales)."""
    a = a.detach()
    sub = HALF_SUB[dtype] * 2 * float(a.abs().max()) / FMAX[dtype]
    return U[dtype] * float(a.norm()) + sub * math.sqrt(a.numel())


def _product_bound(a: torch.Tensor, b: torch.Tensor, da: torch.dtype, db: torch.dtype, bf16_out: bool) -> float:
    d_a, d_b = _delta(a, da), _delta(b, db)
    spec = lambda m: float(torch.linalg.matrix_norm(m, 2))  # noqa: E731
    bound = d_a * spec(b) + (spec(a) + d_a) * d_b
    out = float((a @ b).norm())
    bound += (2.0 ** -8 if bf16_out else 0.0) * (out + bound) + 1e-5 * float(a.norm()) * float(b.norm())
    return bound


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise", "delayed"])
def test_forward_and_backward_within_the_formats_bounds(recipe):
    torch.manual_seed(0)
    m, k, n = 40, 64, 48  # 40 tokens: the weight-gradient matmul pads the token axis to 48
    x = torch.randn(2, m // 2, k, requires_grad=True)
    w = torch.nn.Parameter(torch.randn(n, k) * 0.2)
    b = torch.nn.Parameter(torch.randn(n))
    layer = Fp8Linear("l", recipe, StepClock())
    y = layer(x, w, b)
    g = torch.randn_like(y)
    y.backward(g)

    x2, g2 = x.detach().reshape(m, k), g.reshape(m, n)
    gfmt = E4M3 if recipe == "rowwise" else E5M2
    bf16 = recipe == "rowwise"  # CUDA's row-wise kernel writes bf16
    cases = {
        "forward": (y.detach().reshape(m, n) - b.detach(), x2 @ w.detach().t(),
                    _product_bound(x2, w.detach().t(), E4M3, E4M3, bf16)),
        "dgrad": (x.grad.reshape(m, k), g2 @ w.detach(), _product_bound(g2, w.detach(), gfmt, E4M3, bf16)),
        "wgrad": (w.grad, g2.t() @ x2, _product_bound(g2.t(), x2, gfmt, E4M3, bf16)),
    }
    for what, (got, ref, bound) in cases.items():
        err = float((got - ref).norm())
        assert err <= bound, f"{recipe} {what}: error {err:.4g} > bound {bound:.4g}"
        assert bound < 0.5 * float(ref.norm()), f"{what}: the bound says nothing"
    assert torch.allclose(b.grad, g2.sum(0), rtol=1e-5, atol=1e-5)  # the bias gradient is high precision


def test_cuda_rules_are_enforced_on_cpu():
    a = torch.randn(32, 64).to(E4M3)
    w = torch.randn(48, 64).to(E4M3)
    one = torch.ones((), dtype=torch.float32)
    check_scaled_mm(a, w.t(), one, one, torch.float32)  # the correct call passes
    torch._scaled_mm(a, w.t().contiguous(), one, one, out_dtype=torch.float32)  # CPU runs a row-major mat2 ...
    bad = {
        "column-major": (a, w.t().contiguous(), one, one, torch.float32),  # ... which CUDA rejects
        "row-major": (a.t().contiguous().t(), w.t(), one, one, torch.float32),
        "multiples of 16": (torch.randn(32, 40).to(E4M3), torch.randn(48, 40).to(E4M3).t(), one, one, torch.float32),
        "e5m2 x e5m2": (a.to(torch.float32).to(E5M2), w.to(torch.float32).to(E5M2).t(), one, one, torch.float32),
        "torch.float32": (a, w.t(), one.to(torch.bfloat16), one, torch.float32),
        "rowwise": (a, w.t(), torch.ones(32, 2), torch.ones(1, 48), torch.bfloat16),
        "rowwise output dtype": (a, w.t(), torch.ones(32, 1), torch.ones(1, 48), torch.float32),
        "float8_e4m3fn or float8_e5m2": (a.float(), w.t(), one, one, torch.float32),
    }
    for expected, args in bad.items():
        with pytest.raises(Fp8LayoutError, match=expected):
            scaled_mm(*args)
    scaled_mm(a.float().to(E5M2), w.t(), one, one, torch.float32)  # one e5m2 operand is allowed


def test_delayed_scaling_history_margin_and_update():
    st = DelayedScaling(E4M3, history_len=3, margin=1, device=torch.device("cpu"))
    x = torch.tensor([[1.0, -4.0]])
    _, inv = st.quantize(x)
    assert float(inv) == pytest.approx(4.0 / (448.0 / 2))  # before any update: current scaling, with the margin
    st.quantize(x * 0.5)
    assert float(st.pending) == 4.0  # the max over the step's micro-batches
    for amax in (4.0, 2.0, 1.0, 0.5):
        st.update(torch.tensor(amax))
    assert st.history.tolist() == [0.5, 1.0, 2.0]  # newest first, the oldest (4.0) rolled out
    assert float(st.scale) == pytest.approx(448.0 / (2.0 * 2))  # from the history's max, with 2^margin
    assert float(st.pending) == 0.0 and st.steps == 4
    q, inv = st.quantize(torch.tensor([[8.0, 1.0]]))  # a value above the history: saturates, does not overflow
    assert float(q.float().max()) == 448.0 and torch.isfinite(q.float()).all()
    assert float(inv) == pytest.approx(1 / float(st.scale))
    sd = st.state_dict()
    other = DelayedScaling(E4M3, 3, 1, torch.device("cpu"))
    other.load_state_dict(sd)
    assert torch.equal(other.history, st.history) and torch.equal(other.scale, st.scale) and other.steps == 4
    with pytest.raises(ValueError, match="expected length 5"):
        DelayedScaling(E4M3, 5, 1, torch.device("cpu")).load_state_dict(sd)
    assert float(amax_to_scale(torch.tensor(0.0), E4M3)) > 0  # an all-zero tensor still has a finite scale


def test_rowwise_scales_are_powers_of_two():
    t = torch.randn(8, 32) * torch.logspace(-3, 3, 8)[:, None]
    q, inv = quantize_rowwise(t, E4M3, dim=1)
    assert inv.shape == (8, 1)
    assert torch.equal(torch.log2(inv), torch.round(torch.log2(inv)))
    assert (q.float().abs().amax(1) <= 448).all() and (q.float().abs().amax(1) > 448 / 2).all()


def test_weights_are_cast_once_per_step_and_gradients_accumulate():
    torch.manual_seed(1)
    clock = StepClock()
    layer = Fp8Linear("l", "tensorwise", clock)
    w = torch.nn.Parameter(torch.randn(32, 64))
    xs = [torch.randn(4, 64) for _ in range(3)]
    for x in xs:  # three micro-batches of one step
        layer(x, w).square().sum().backward()
    assert layer.weight_casts == 1
    acc = w.grad.clone()
    parts = []
    for x in xs:
        w.grad = None
        layer(x, w).square().sum().backward()
        parts.append(w.grad)
    assert layer.weight_casts == 1  # same step, weight unchanged
    assert torch.allclose(acc, sum(parts), rtol=1e-6, atol=1e-5)
    clock.tick()  # the next optimizer step
    layer(xs[0], w)
    assert layer.weight_casts == 2
    with torch.no_grad():
        w.mul_(2.0)  # an in-place change within a step (torch optimizers, loads) is noticed too
    layer(xs[0], w)
    assert layer.weight_casts == 3


def test_zero_bubble_split_defers_the_fp8_weight_gradient():
    torch.manual_seed(2)
    single = ParallelState.single()
    layers = [ColumnParallelLinear(64, 32, single), RowParallelLinear(32, 64, single)]
    mgr = apply_fp8([torch.nn.ModuleList(layers)], single, recipe="tensorwise", n_layers=1)
    assert mgr.report.fp8 == [] and len(mgr.report.high_precision) == 2  # not inside `layers.<i>`: kept
    for i, layer in enumerate(layers):  # swap by hand: this test is about the split, not the selection
        layer.linear_fn = Fp8Linear(f"l{i}", "tensorwise", StepClock())
    x = torch.randn(2, 8, 64, requires_grad=True)

    def run(deferred: bool) -> list[torch.Tensor]:
        for q in (p for layer in layers for p in layer.parameters()):
            q.grad = None
        store = WeightGradStore()
        with defer_weight_grads(store):
            y = layers[1](layers[0](x))
        with store.capture("mb0") if deferred else torch.enable_grad():
            y.square().sum().backward()
        if deferred:
            assert store.n_deferred_layers == 2 and layers[0].weight.grad is None  # dW waits for the W pass
            assert layers[0].bias.grad is not None  # everything else is computed in B
            store.flush("mb0")
        return [layers[0].weight.grad.clone(), layers[1].weight.grad.clone()]

    for a, b in zip(run(False), run(True)):
        assert torch.equal(a, b)


def _tiny_model(**kw):
    from engine.config import ModelConfig
    from engine.model.transformer import build_model

    base = dict(vocab_size=64, vocab_pad_multiple=8, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2,
                ffn_hidden=64, max_seq_len=16)
    base.update(kw)
    return build_model(ModelConfig(**base), seed=3)


def test_module_report_lists_exactly_the_expected_layers():
    model = _tiny_model()
    logged: list[str] = []
    mgr = apply_fp8([model], ParallelState.single(), recipe="delayed", n_layers=3,
                    keep_high_precision=["first_block", "layers.*.mlp.down_proj"], log=logged.append)
    per_block = ["attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "mlp.gate_proj", "mlp.up_proj"]
    assert sorted(mgr.report.fp8) == sorted(f"layers.{i}.{s}" for i in (1, 2) for s in per_block)
    hp = mgr.report.high_precision
    assert set(hp) == ({f"layers.0.{s}" for s in per_block + ["mlp.down_proj"]} | {"layers.1.mlp.down_proj",
                       "layers.2.mlp.down_proj", "head"})
    assert "always" in hp["head"] and "first_block" in hp["layers.0.attn.q_proj"]
    assert logged[0] == "tessera: fp8 (delayed): 12 of 22 linears run in FP8; 10 stay high precision:"
    assert len(logged) == 11
    assert isinstance(model.layers["1"].attn.q_proj.linear_fn, Fp8Linear)
    assert model.layers["0"].attn.q_proj.linear_fn is None and model.head.linear_fn is None
    assert set(mgr.layers) == set(mgr.report.fp8)


def test_unaligned_layers_stay_high_precision_with_one_line_each():
    model = _tiny_model(d_model=32, n_heads=4, n_kv_heads=1, n_layers=1)  # k/v_proj: [8, 32], not aligned
    logged: list[str] = []
    mgr = apply_fp8([model], ParallelState.single(), recipe="tensorwise", n_layers=1, log=logged.append)
    assert set(mgr.report.high_precision) == {"layers.0.attn.k_proj", "layers.0.attn.v_proj", "head"}
    shape_lines = [line for line in logged if "shape:" in line]
    assert len(shape_lines) == 2 and "out_features 8 not a multiple of 16" in shape_lines[0]


def test_bad_fp8_settings_name_the_setting():
    with pytest.raises(ConfigError, match=r"keep_high_precision\[1\]: 'layers\.\*\.mlp\.down' matches no linear"):
        apply_fp8([_tiny_model()], ParallelState.single(), recipe="tensorwise", n_layers=3,
                  keep_high_precision=["last_block", "layers.*.mlp.down"])
    with pytest.raises(ConfigError, match="Transformer Engine is not importable.*backend=native"):
        apply_fp8([_tiny_model()], ParallelState.single(), recipe="tensorwise", backend="te", n_layers=3)
    from engine.config import load_config

    with pytest.raises(ConfigError, match="unknown key 'precision.fp8.recpe'"):
        load_config(None, ["precision.fp8={recpe: delayed}"])
    with pytest.raises(ConfigError, match="precision.fp8.amax_history_len: expected a positive integer"):
        load_config(None, ["precision.fp8.amax_history_len=0"])
    with pytest.raises(ConfigError, match="precision.fp8 with parallel.zero=3"):
        load_config(None, ["precision.fp8.recipe=rowwise", "parallel.zero=3"])
    with pytest.raises(ConfigError, match="precision.fp8 with train.compile=true is not supported"):
        load_config(None, ["precision.fp8.recipe=rowwise", "train.compile=true"])
    assert load_config(None, ["precision.fp8.recipe=rowwise"]).precision.fp8.recipe == "rowwise"


def test_fp8_mfu_is_against_the_fp8_peak(monkeypatch):
    from engine.train.flops import PEAK_TFLOPS, peak_dtype, peak_tflops

    assert peak_dtype("bf16", fp8=True) == "fp8" and peak_dtype("bf16", fp8=False) == "bf16"
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    cuda = torch.device("cuda")
    assert peak_tflops(cuda, peak_dtype("bf16", fp8=True)) == PEAK_TFLOPS["H100 SXM"]["fp8"]
    assert peak_tflops(cuda, peak_dtype("bf16", fp8=False)) == PEAK_TFLOPS["H100 SXM"]["bf16"]
    assert peak_tflops(cuda, peak_dtype("bf16", fp8=True)) > peak_tflops(cuda, "bf16")
