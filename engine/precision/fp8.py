"""The FP8 linear: `F.linear`'s contract on `torch._scaled_mm`, forward and backward.

    y  [M, N] = x  [M, K] @ W^T        x: e4m3, W: e4m3                 (forward)
    dX [M, K] = dY [M, N] @ W          dY: e5m2 (rowwise: e4m3), W: e4m3  (input gradient, "dgrad")
    dW [N, K] = dY^T [N, M] @ x        dY^T and x re-laid out, M padded to 16   (weight gradient, "wgrad")

M is the token count (batch x sequence), K = in_features and N = out_features of this rank's weight shard.
`Fp8Linear` is what a Column/RowParallelLinear calls instead of F.linear (its `linear_fn`): the layer's
collectives (all-gather / reduce-scatter of sequence parallelism, tp all-reduce) run around it unchanged, so
FP8 works at any tp and with sequence parallelism. Weights are cast once per optimizer step (`StepClock`)
and the cast is reused by every micro-batch; gradients accumulate in fp32 through autograd as usual.

Zero-bubble pipelines defer weight gradients: `fp8_linear` takes part in torch-function dispatch, and the
deferring mode of engine/parallel/pipeline/weight_grad.py hands it its `weight_grad_store` (the protocol:
a function with `accepts_weight_grad_store = True`); backward then records the wgrad matmul instead of
running it, and the W pass runs it later.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch.overrides import handle_torch_function, has_torch_function

from engine.precision.fp8_recipes import (
    DelayedScaling,
    grad_dtype,
    quantize_rowwise,
    quantize_tensorwise,
)
from engine.precision.fp8_rules import ALIGN, E4M3, scaled_mm


class StepClock:
    """A counter shared by the FP8 layers of a model: bumped once per optimizer step (and before an
    evaluation), it tells each layer that its cached fp8 weight is stale."""

    def __init__(self) -> None:
        self.generation = 0

    def tick(self) -> None:
        self.generation += 1


@dataclass
class _WeightOperands:
    """The fp8 weight as both matmuls that read it need it (views of cached casts).
    fwd: [K, N] column-major (= W^T), scale [] or [1, N]; dgrad: [N, K] column-major, scale [] or [1, K]."""

    fwd: torch.Tensor
    fwd_scale: torch.Tensor
    dgrad: torch.Tensor
    dgrad_scale: torch.Tensor


def _col_major(q: torch.Tensor) -> torch.Tensor:
    """The same [R, C] matrix laid out column-major (what _scaled_mm's second operand must be)."""
    return q.t().contiguous().t()


def _pad_rows(q: torch.Tensor, multiple: int = ALIGN) -> torch.Tensor:
    """fp8 [R, C] -> [ceil(R/16)*16, C] with zero rows (fp8 zero is all-zero bits in both formats), so a
    contraction over R meets the alignment rule without changing the product."""
    extra = -q.shape[0] % multiple
    if extra == 0:
        return q
    return F.pad(q.view(torch.uint8), (0, 0, 0, extra)).view(q.dtype)


class Fp8Linear:
    """The FP8 matmul of one linear layer: recipe, delayed-scaling state and the cached fp8 weight.

    Not an nn.Module: it owns no parameters (the layer keeps its fp32 weight), and its state is read by
    canonical name through `Fp8Manager` (engine/precision/fp8_swap.py), not through the model's state dict.
    """

    def __init__(self, name: str, recipe: str, clock: StepClock, history_len: int = 16, margin: int = 0,
                 device: Optional[torch.device] = None) -> None:
        self.name, self.recipe, self.clock = name, recipe, clock
        self.rowwise = recipe == "rowwise"
        self.grad_dtype = grad_dtype(recipe)
        device = device or torch.device("cpu")
        self.x_state = DelayedScaling(E4M3, history_len, margin, device) if recipe == "delayed" else None
        self.gy_state = DelayedScaling(self.grad_dtype, history_len, margin, device) if recipe == "delayed" else None
        self._cache: Optional[tuple[tuple[int, int, int], _WeightOperands]] = None
        self.weight_casts = 0  # how often the weight was cast (tests: once per optimizer step)

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        return fp8_linear(x, weight, bias, self)

    def __repr__(self) -> str:
        return f"Fp8Linear({self.name!r}, recipe={self.recipe!r})"

    # ------------------------------------------------------------ operands
    @torch.no_grad()
    def weight_operands(self, weight: torch.Tensor) -> _WeightOperands:
        """The fp8 weight, cast at most once per clock tick (and again if the tensor changed in place)."""
        key = (self.clock.generation, weight._version, weight.data_ptr())
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        w = weight.detach()  # [N, K]
        if self.rowwise:
            q, s = quantize_rowwise(w, E4M3, dim=1)  # one scale per output feature: s [N, 1]
            qd, sd = quantize_rowwise(w, E4M3, dim=0)  # one per input feature (dgrad's N axis): sd [1, K]
            ops = _WeightOperands(q.t(), s.reshape(1, -1), _col_major(qd), sd)
        else:
            q, s = quantize_tensorwise(w, E4M3)
            ops = _WeightOperands(q.t(), s, _col_major(q), s)
        self.weight_casts += 1
        self._cache = (key, ops)
        return ops

    def quantize_input(self, x2: torch.Tensor, record: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """x [M, K] -> (e4m3, scale [] or [M, 1])."""
        if self.rowwise:
            return quantize_rowwise(x2, E4M3, dim=1)
        if self.x_state is not None:
            return self.x_state.quantize(x2, record)
        return quantize_tensorwise(x2, E4M3)

    def quantize_grad(self, gy2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """dY [M, N] -> (fp8 grad format, scale [] or [M, 1])."""
        if self.rowwise:
            return quantize_rowwise(gy2, self.grad_dtype, dim=1)
        if self.gy_state is not None:
            return self.gy_state.quantize(gy2)
        return quantize_tensorwise(gy2, self.grad_dtype)

    def delayed_states(self) -> dict[str, DelayedScaling]:
        """{role: state} of the delayed recipe ("input", "grad_output"); empty for the others."""
        if self.x_state is None:
            return {}
        return {"input": self.x_state, "grad_output": self.gy_state}


def _wgrad(layer: Fp8Linear, gy2: torch.Tensor, gq: Optional[torch.Tensor], gs: Optional[torch.Tensor],
           saved: tuple[torch.Tensor, ...], dtype: torch.dtype) -> torch.Tensor:
    """dW [N, K] = dY^T [N, M] @ x [M, K] in FP8; the token axis M is padded to a multiple of 16."""
    if layer.rowwise:
        (x2,) = saved  # the high-precision input: wgrad scales x per input feature, not per token
        gq_c, gs_c = quantize_rowwise(gy2, layer.grad_dtype, dim=0)  # [M, N], scales [1, N]
        xq_c, xs_c = quantize_rowwise(x2, E4M3, dim=0)  # [M, K], scales [1, K]
        a = _pad_rows(gq_c).t().contiguous()  # [N, M16] row-major
        # dW [N, K] (bf16: the row-wise kernel's output); scales: dY^T per row [N, 1], x per column [1, K]
        gw = scaled_mm(a, _col_major(_pad_rows(xq_c)), gs_c.reshape(-1, 1), xs_c, torch.bfloat16)
        return gw.to(dtype)
    xq, xs = saved
    a = _pad_rows(gq).t().contiguous()  # [N, M16]
    return scaled_mm(a, _col_major(_pad_rows(xq)), gs, xs, torch.float32).to(dtype)


class _Fp8LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], layer: Fp8Linear,
                store: Any, record: bool) -> torch.Tensor:
        dev = x.device.type
        out_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        mm_dtype = torch.bfloat16 if layer.rowwise else out_dtype  # CUDA's row-wise kernel writes bf16 only
        x2 = x.reshape(-1, x.shape[-1])  # [M, K]
        w = layer.weight_operands(weight)
        xq, xs = layer.quantize_input(x2, record)
        y = scaled_mm(xq, w.fwd, xs, w.fwd_scale, mm_dtype).to(out_dtype)  # [M, N]
        if bias is not None:
            y = y + bias.to(out_dtype)
        if layer.rowwise:
            ctx.save_for_backward(x2)
        else:
            ctx.save_for_backward(xq, xs)
        ctx.layer, ctx.w, ctx.store, ctx.param = layer, w, store, weight
        ctx.x_dtype, ctx.has_bias, ctx.x_shape = x.dtype, bias is not None, x.shape
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor):  # type: ignore[override]
        layer, w = ctx.layer, ctx.w
        gy2 = gy.reshape(-1, gy.shape[-1])  # [M, N]
        gq, gs = layer.quantize_grad(gy2)  # once: dgrad and (tensorwise, delayed) wgrad share it
        gx = gb = gw = None
        if ctx.needs_input_grad[0]:
            mm_dtype = torch.bfloat16 if layer.rowwise else gy.dtype
            gx = scaled_mm(gq, w.dgrad, gs, w.dgrad_scale, mm_dtype).to(ctx.x_dtype).view(ctx.x_shape)  # [.., K]
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = gy2.float().sum(0).to(ctx.bias_dtype)  # [N], high precision
        if ctx.needs_input_grad[1]:
            compute = functools.partial(_wgrad, layer, gy2, gq, gs, ctx.saved_tensors, ctx.param.dtype)
            store = ctx.store
            if store is not None and store.capturing:
                store.add_deferred(ctx.param, compute)  # the W pass of a zero-bubble schedule runs it
            else:
                gw = compute()
        return gx, gw, gb, None, None, None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], layer: Fp8Linear,
               weight_grad_store: Any = None) -> torch.Tensor:
    """F.linear(x, weight, bias) with its matmuls in FP8 by `layer`'s recipe. x [..., K], weight [N, K]."""
    if has_torch_function((x, weight)):  # a torch-function mode is active (e.g. zero-bubble's deferral)
        return handle_torch_function(fp8_linear, (x, weight), x, weight, bias, layer,
                                     weight_grad_store=weight_grad_store)
    return _Fp8LinearFn.apply(x, weight, bias, layer, weight_grad_store, torch.is_grad_enabled())


fp8_linear.accepts_weight_grad_store = True  # type: ignore[attr-defined]  # protocol of weight_grad.py

__all__ = ["Fp8Linear", "StepClock", "fp8_linear"]
