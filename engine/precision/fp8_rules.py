"""CUDA's rules for `torch._scaled_mm`, enforced on every device, and the one call site of the op.

The CPU kernel accepts layouts, shapes and dtype pairs that the CUDA kernel rejects (measured on torch 2.13:
a row-major mat2, odd sizes and e5m2 x e5m2 all run on CPU). Code tested only on CPU would then fail on the
first GPU run, so every FP8 matmul of Tessera goes through `scaled_mm`, which checks what CUDA checks:

    a      [M, K] fp8, row-major (stride (K, 1))           K % 16 == 0
    b      [K, N] fp8, column-major (stride (1, K))        K % 16 == 0 and N % 16 == 0
    dtypes e4m3 x e4m3, e4m3 x e5m2 or e5m2 x e4m3 (never e5m2 x e5m2)
    scales fp32; tensorwise: one element each; rowwise: scale_a [M, 1] and scale_b [1, N], contiguous,
           and the output bf16 (the only output type of CUDA's row-wise kernel)

`scaled_mm` returns scale_a * scale_b * (a @ b) in `out_dtype`: the scales are DEQUANTISATION factors
(1 / the factor the operand was multiplied by before the cast).
"""

from __future__ import annotations

import torch

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
FP8_DTYPES = (E4M3, E5M2)
ALIGN = 16  # every matrix dimension _scaled_mm contracts or writes on CUDA (except a's rows) is a multiple of this


class Fp8LayoutError(ValueError):
    """An FP8 matmul that CUDA's _scaled_mm would reject (a bug in the caller: it keeps its traceback)."""


def _row_major(t: torch.Tensor) -> bool:
    return t.stride(1) == 1 and (t.stride(0) >= t.size(1) or t.size(0) == 1)


def _col_major(t: torch.Tensor) -> bool:
    return t.stride(0) == 1 and (t.stride(1) >= t.size(0) or t.size(1) == 1)


def check_scaled_mm(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor,
                    out_dtype: torch.dtype) -> None:
    """Raise Fp8LayoutError naming the operand and the rule when CUDA's _scaled_mm would reject the call."""
    def fail(what: str, expected: str, found: str) -> None:
        raise Fp8LayoutError(f"FP8 matmul (torch._scaled_mm, CUDA rules): {what}: expected {expected}, found {found}")

    if a.dim() != 2 or b.dim() != 2:
        fail("operands", "2-D matrices", f"a {tuple(a.shape)}, b {tuple(b.shape)}")
    for name, t in (("a", a), ("b", b)):
        if t.dtype not in FP8_DTYPES:
            fail(f"{name}.dtype", "float8_e4m3fn or float8_e5m2", str(t.dtype))
    if a.dtype == E5M2 and b.dtype == E5M2:
        fail("dtypes", "at most one e5m2 operand (CUDA has no e5m2 x e5m2 kernel)", "e5m2 x e5m2")
    m, k = a.shape
    if b.size(0) != k:
        fail("shapes", f"b with {k} rows (a is {tuple(a.shape)})", f"b {tuple(b.shape)}")
    n = b.size(1)
    if not _row_major(a):
        fail("a (first operand) layout", "row-major (stride (K, 1))", f"stride {a.stride()}")
    if not _col_major(b):
        fail("b (second operand) layout", "column-major (stride (1, K)): pass w.t() of a row-major [N, K] w",
             f"stride {b.stride()}")
    if k % ALIGN or n % ALIGN:
        fail("dimensions", f"K and N multiples of {ALIGN}", f"a {tuple(a.shape)} @ b {tuple(b.shape)}")
    for name, s in (("scale_a", scale_a), ("scale_b", scale_b)):
        if s.dtype != torch.float32:
            fail(f"{name}.dtype", "torch.float32", str(s.dtype))
    if scale_a.numel() == 1 and scale_b.numel() == 1:
        return
    rowwise = (tuple(scale_a.shape) == (m, 1) and tuple(scale_b.shape) == (1, n))
    if not rowwise:
        fail("scales", f"one element each (tensorwise) or scale_a ({m}, 1) and scale_b (1, {n}) (rowwise)",
             f"scale_a {tuple(scale_a.shape)}, scale_b {tuple(scale_b.shape)}")
    if not (scale_a.is_contiguous() and scale_b.is_contiguous()):
        fail("rowwise scales", "contiguous tensors", "a strided view")
    if out_dtype != torch.bfloat16:
        fail("rowwise output dtype", "torch.bfloat16", str(out_dtype))


def scaled_mm(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor,
              out_dtype: torch.dtype) -> torch.Tensor:
    """a [M, K] fp8 row-major @ b [K, N] fp8 column-major -> [M, N] `out_dtype`, dequantised by the scales."""
    check_scaled_mm(a, b, scale_a, scale_b, out_dtype)
    return torch._scaled_mm(a, b, scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype)


def shape_problem(in_features: int, out_features: int) -> str:
    """Why a linear with this LOCAL weight [out, in] cannot run every FP8 matmul of training, or '' if it can.

    forward x [M, in] @ W^T, dgrad dY [M, out] @ W and wgrad dY^T @ x contract or write both `in` and `out`,
    so both must be multiples of 16 (the token count M is padded where it is contracted)."""
    bad = [f"{name} {v}" for name, v in (("in_features", in_features), ("out_features", out_features)) if v % ALIGN]
    if not bad:
        return ""
    return f"local weight [{out_features}, {in_features}]: {' and '.join(bad)} not a multiple of {ALIGN}"


__all__ = ["ALIGN", "E4M3", "E5M2", "FP8_DTYPES", "Fp8LayoutError", "check_scaled_mm", "scaled_mm",
           "shape_problem"]
