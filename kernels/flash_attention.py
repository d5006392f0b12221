"""Flash attention (forward + backward) in Triton.

Layout is torch SDPA's: q (B, H, N, D), k/v (B, Hkv, N, D) with H % Hkv == 0.
GQA/MQA: query head h reads kv head h // (H // Hkv) through pointer arithmetic,
so repeated K/V are never materialised; the dK/dV kernel loops over the query
heads of a group and so writes each kv head's gradient once, without atomics.

Online softmax: each query block keeps a running max ``m`` and sum ``l`` in
base-2 units (scores pre-multiplied by scale*log2(e), so ``exp2`` is used); the
backward pass re-computes P from the saved log-sum-exp (``lse2 = m + log2 l``),
so nothing of size N^2 is stored.

Document masking: ``doc_ids`` (B, N) int marks packed samples; token i attends
token j only when both lie in the same *run* of equal ids (a document is a
maximal run: ids need not be sorted or unique across runs). Per token we
precompute the first and one-past-last index of its document, so every block
only visits the key (or query) range its documents cover. ``cu_seqlens``
(varlen style) converts with :func:`doc_ids_from_cu_seqlens`.

Causal work skips fully-masked blocks: the key loop stops at the diagonal and
only the diagonal block pays for the mask.
"""
from __future__ import annotations

import inspect
import math

import torch
import triton
import triton.language as tl

from ._utils import check_device, interpreting

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


# --------------------------------------------------------------------------- configs
def _configs(pairs: list[tuple[int, int, int, int]], names: tuple[str, str]) -> list[triton.Config]:
    """(block_a, block_b, num_warps, num_stages) tuples -> triton configs.

    The interpreter cannot autotune over several configs, so it gets one small one.
    """
    if interpreting():
        # Larger tiles are cheaper under the interpreter (fewer numpy calls).
        return [triton.Config({names[0]: 64, names[1]: 32}, num_warps=4, num_stages=1)]
    return [
        triton.Config({names[0]: a, names[1]: b}, num_warps=w, num_stages=s) for a, b, w, s in pairs
    ]


# Candidates per kernel. Register counts from ptxas for sm_90a (`python -m engine.kernels.aot
# --all-configs --head-dim D`, triton 3.9) shaped the lists: at D=128 every earlier dK/dV
# config spilled (280-2612 bytes per thread: the fp32 dK and dV accumulators plus the k and v
# tiles live in registers), so (16, 128, 8 warps) (no spill) and (32, 64, 8 warps) (4 bytes)
# were added; at D=256 the 8-warp 128x32 / 64x32 tiles are the ones that do not spill.
# Deeper pipelines (4-5 stages) are for Hopper; configs that do not fit in shared memory are
# skipped by the autotuner (OutOfResources), so the lists are safe on smaller GPUs.
_FWD_CONFIGS = _configs(
    [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 8, 4), (128, 64, 4, 3), (64, 64, 4, 3), (128, 32, 4, 2),
     (128, 32, 8, 3)],
    ("BLOCK_M", "BLOCK_N"),
)
# dK/dV: a kv tile of BLOCK_N1 keys, looping over query tiles of BLOCK_M1 (BLOCK_N1 % BLOCK_M1 == 0).
_DKDV_CONFIGS = _configs(
    [(32, 128, 4, 3), (64, 128, 8, 3), (32, 64, 4, 3), (64, 64, 4, 2), (16, 128, 8, 3), (32, 64, 8, 3)],
    ("BLOCK_M1", "BLOCK_N1"),
)
# dQ: a query tile of BLOCK_M2 rows, looping over key tiles of BLOCK_N2.
_DQ_CONFIGS = _configs(
    [(128, 32, 4, 3), (128, 32, 4, 5), (128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 2), (128, 32, 8, 3),
     (64, 32, 8, 3)],
    ("BLOCK_M2", "BLOCK_N2"),
)
_TUNE_KEY = ["N_BUCKET", "HEAD_DIM", "CAUSAL", "HAS_DOCS"]  # tensor dtypes are added by triton
# Keep the tuning results on disk (triton >= 3.2), so a restarted job does not tune again.
_TUNE_OPTS = {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}
if interpreting():
    # dK/dV needs BLOCK_N1 % BLOCK_M1 == 0 (its diagonal loop steps by BLOCK_M1).
    _DKDV_CONFIGS = [triton.Config({"BLOCK_M1": 32, "BLOCK_N1": 64}, num_warps=4, num_stages=1)]


# --------------------------------------------------------------------------- dots
# The CPU interpreter computes bf16 dots wrongly (numpy has no bf16). There the wrappers
# get INPUT_PREC="bf16-emulated": operands are widened to fp32 right before the dot, after
# every rounding the GPU path does (P and dS still go through bf16), so the bf16 code path
# is tested on CPU. On a GPU INPUT_PREC is "ieee"/"tf32" and the helpers are plain tl.dot.
@triton.jit
def _dot(a, b, INPUT_PREC: tl.constexpr):
    if INPUT_PREC == "bf16-emulated":
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        out = tl.dot(a, b, input_precision=INPUT_PREC)
    return out


@triton.jit
def _dot_acc(a, b, acc, INPUT_PREC: tl.constexpr):
    if INPUT_PREC == "bf16-emulated":
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc, input_precision=INPUT_PREC)
    return out


# --------------------------------------------------------------------------- forward
@triton.jit
def _query_program(N, H, GROUP, BLOCK: tl.constexpr, CAUSAL: tl.constexpr):
    """This program's query tile, (batch*head) index, batch, head and kv head (GQA: shared by
    GROUP query heads), for the kernels launched on a (query tiles, B*H) grid. Causal: the last
    query tiles have the most work, so they are launched first."""
    start_m = tl.program_id(0)
    if CAUSAL:
        start_m = tl.cdiv(N, BLOCK) - 1 - start_m
    off_bh = tl.program_id(1)
    off_h = off_bh % H
    return start_m, off_bh, off_bh // H, off_h, off_h // GROUP


@triton.jit
def _fwd_inner(
    acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn,
    offs_m, offs_n, offs_d, doc_q, doc_base, start, end, N, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL_MASK: tl.constexpr, KEY_MASK: tl.constexpr, HAS_DOCS: tl.constexpr,
    INPUT_PREC: tl.constexpr,
):
    # Walk key blocks [start, end): start is a multiple of BLOCK_N.
    d_ok = offs_d < HEAD_DIM  # (BLOCK_D,) all-true unless head_dim is not a power of 2
    for start_n in range(start, end, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n  # (BLOCK_N,)
        col_ok = cols < N
        # K loaded transposed: (BLOCK_D, BLOCK_N)
        kT = tl.load(k_base + cols[None, :] * stride_kn + offs_d[:, None],
                     mask=col_ok[None, :] & d_ok[:, None], other=0.0)
        qk = _dot(q, kT, INPUT_PREC) * qk_scale  # (BLOCK_M, BLOCK_N) fp32
        if CAUSAL_MASK:
            qk = tl.where(offs_m[:, None] >= cols[None, :], qk, -1.0e30)
        if KEY_MASK:
            qk = tl.where(col_ok[None, :], qk, -1.0e30)
        if HAS_DOCS:
            doc_k = tl.load(doc_base + cols, mask=col_ok, other=-2)
            qk = tl.where(doc_q[:, None] == doc_k[None, :], qk, -1.0e30)
        # Finite mask value: a fully masked block gives p=1 but alpha=0 erases it once a
        # real score arrives (every valid row sees at least its own key).
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :],
                    mask=col_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_N, BLOCK_D)
        acc = acc * alpha[:, None]
        acc = _dot_acc(p.to(v.dtype), v, acc, INPUT_PREC)
        m_i = m_new
    return acc, m_i, l_i


@triton.autotune(configs=_FWD_CONFIGS, key=_TUNE_KEY, **_TUNE_OPTS)
@triton.jit
def _attn_fwd(
    Q, K, V, O, LSE, DOC, DOC_START, DOC_END,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    H, N, N_BUCKET, GROUP, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_DOCS: tl.constexpr, INPUT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    start_m, off_bh, off_b, off_h, off_kh = _query_program(N, H, GROUP, BLOCK_M, CAUSAL)
    q_base = Q + off_b.to(tl.int64) * stride_qb + off_h.to(tl.int64) * stride_qh
    k_base = K + off_b.to(tl.int64) * stride_kb + off_kh.to(tl.int64) * stride_kh
    v_base = V + off_b.to(tl.int64) * stride_vb + off_kh.to(tl.int64) * stride_vh
    o_base = O + off_b.to(tl.int64) * stride_ob + off_h.to(tl.int64) * stride_oh
    doc_base = DOC + off_b.to(tl.int64) * N

    m0 = start_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < N
    d_ok = offs_d < HEAD_DIM
    q = tl.load(q_base + offs_m[:, None] * stride_qn + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)

    # Key range this query block can see.
    lo = 0
    hi = N
    doc_q = offs_m  # placeholder when there are no documents
    if HAS_DOCS:
        doc_q = tl.load(doc_base + offs_m, mask=row_ok, other=-1)
        lo = tl.load(DOC_START + off_b.to(tl.int64) * N + m0)
        hi = tl.load(DOC_END + off_b.to(tl.int64) * N + tl.minimum(m0 + BLOCK_M, N) - 1)
        lo = (lo // BLOCK_N) * BLOCK_N
    if CAUSAL:
        # Off-diagonal blocks [lo, m0): every key precedes every query, no causal mask.
        acc, m_i, l_i = _fwd_inner(
            acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, offs_m, offs_n, offs_d,
            doc_q, doc_base, lo, m0, N, qk_scale,
            HEAD_DIM, BLOCK_N, False, False, HAS_DOCS, INPUT_PREC)
        # Diagonal blocks [m0, m0 + BLOCK_M): masked.
        acc, m_i, l_i = _fwd_inner(
            acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, offs_m, offs_n, offs_d,
            doc_q, doc_base, m0, tl.minimum(m0 + BLOCK_M, N), N, qk_scale,
            HEAD_DIM, BLOCK_N, True, False, HAS_DOCS, INPUT_PREC)
    else:
        # Full key blocks first (no bounds mask), then the ragged tail.
        full = lo + ((hi - lo) // BLOCK_N) * BLOCK_N
        acc, m_i, l_i = _fwd_inner(
            acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, offs_m, offs_n, offs_d,
            doc_q, doc_base, lo, full, N, qk_scale,
            HEAD_DIM, BLOCK_N, False, False, HAS_DOCS, INPUT_PREC)
        acc, m_i, l_i = _fwd_inner(
            acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, offs_m, offs_n, offs_d,
            doc_q, doc_base, full, hi, N, qk_scale,
            HEAD_DIM, BLOCK_N, False, True, HAS_DOCS, INPUT_PREC)

    acc = acc / l_i[:, None]
    lse2 = m_i + tl.math.log2(l_i)  # base-2 log-sum-exp of the scaled scores
    tl.store(LSE + off_bh.to(tl.int64) * N + offs_m, lse2, mask=row_ok)
    tl.store(o_base + offs_m[:, None] * stride_on + offs_d[None, :], acc.to(O.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])


# --------------------------------------------------------------------------- backward
@triton.jit
def _bwd_preprocess(O, DO, DELTA, stride_ob, stride_oh, stride_on, stride_db, stride_dh, stride_dn,
                    H, N, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr):
    # delta = rowsum(dO * O), (B, H, N) fp32: the softmax backward's per-row correction.
    off_bh = tl.program_id(1)
    off_b = off_bh // H
    off_h = off_bh % H
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (rows < N)[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(O + off_b.to(tl.int64) * stride_ob + off_h * stride_oh + rows[:, None] * stride_on
                + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + off_b.to(tl.int64) * stride_db + off_h * stride_dh + rows[:, None] * stride_dn
                 + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + off_bh.to(tl.int64) * N + rows, tl.sum(o * do, 1), mask=rows < N)


@triton.jit
def _dkdv_inner(
    dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qn, stride_don,
    offs_n, offs_m, offs_d, doc_k, doc_base, start, end, N, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M1: tl.constexpr,
    CAUSAL_MASK: tl.constexpr, HAS_DOCS: tl.constexpr, INPUT_PREC: tl.constexpr,
):
    # Walk query blocks [start, end) for one kv tile (BLOCK_N1 keys). Rows past N load
    # q = dO = 0 and lse = delta = 0, which makes their contribution exactly zero.
    d_ok = offs_d < HEAD_DIM
    for start_m in range(start, end, BLOCK_M1):
        start_m = tl.multiple_of(start_m, BLOCK_M1)
        rows = start_m + offs_m  # (BLOCK_M1,)
        row_ok = rows < N
        qT = tl.load(q_base + rows[None, :] * stride_qn + offs_d[:, None],
                     mask=row_ok[None, :] & d_ok[:, None], other=0.0)  # (BLOCK_D, BLOCK_M1)
        lse = tl.load(lse_base + rows, mask=row_ok, other=0.0)
        qkT = _dot(k, qT, INPUT_PREC) * qk_scale  # (BLOCK_N1, BLOCK_M1)
        pT = tl.math.exp2(qkT - lse[None, :])
        if CAUSAL_MASK:
            pT = tl.where(rows[None, :] >= offs_n[:, None], pT, 0.0)
        if HAS_DOCS:
            doc_q = tl.load(doc_base + rows, mask=row_ok, other=-1)
            pT = tl.where(doc_k[:, None] == doc_q[None, :], pT, 0.0)
        do = tl.load(do_base + rows[:, None] * stride_don + offs_d[None, :],
                     mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_M1, BLOCK_D)
        dv = _dot_acc(pT.to(do.dtype), do, dv, INPUT_PREC)
        delta = tl.load(delta_base + rows, mask=row_ok, other=0.0)
        dpT = _dot(v, tl.trans(do), INPUT_PREC)  # (BLOCK_N1, BLOCK_M1)
        dsT = pT * (dpT - delta[None, :])
        dk = _dot_acc(dsT.to(qT.dtype), tl.trans(qT), dk, INPUT_PREC)
    return dk, dv


@triton.autotune(configs=_DKDV_CONFIGS, key=_TUNE_KEY, **_TUNE_OPTS)
@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, DO, LSE, DELTA, DK, DV, DOC, DOC_START, DOC_END,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_don,
    stride_dkb, stride_dkh, stride_dkn,
    H, HKV, N, N_BUCKET, GROUP, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_DOCS: tl.constexpr, INPUT_PREC: tl.constexpr,
    BLOCK_M1: tl.constexpr, BLOCK_N1: tl.constexpr,
):
    n0 = tl.program_id(0) * BLOCK_N1
    off_bkh = tl.program_id(1)
    off_b = off_bkh // HKV
    off_kh = off_bkh % HKV
    offs_n = n0 + tl.arange(0, BLOCK_N1)
    offs_m = tl.arange(0, BLOCK_M1)
    offs_d = tl.arange(0, BLOCK_D)
    col_ok = offs_n < N
    d_ok = offs_d < HEAD_DIM
    kv_mask = col_ok[:, None] & d_ok[None, :]
    k = tl.load(K + off_b.to(tl.int64) * stride_kb + off_kh.to(tl.int64) * stride_kh
                + offs_n[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + off_b.to(tl.int64) * stride_vb + off_kh.to(tl.int64) * stride_vh
                + offs_n[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
    dk = tl.zeros((BLOCK_N1, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N1, BLOCK_D), tl.float32)

    doc_base = DOC + off_b.to(tl.int64) * N
    doc_k = offs_n
    lo = 0
    hi = N
    if HAS_DOCS:
        doc_k = tl.load(doc_base + offs_n, mask=col_ok, other=-2)
        lo = tl.load(DOC_START + off_b.to(tl.int64) * N + n0)
        hi = tl.load(DOC_END + off_b.to(tl.int64) * N + tl.minimum(n0 + BLOCK_N1, N) - 1)
        lo = (lo // BLOCK_M1) * BLOCK_M1

    # GQA: accumulate over every query head that shares this kv head.
    for g in range(GROUP):
        off_h = off_kh * GROUP + g
        off_bh = (off_b * H + off_h).to(tl.int64)
        q_base = Q + off_b.to(tl.int64) * stride_qb + off_h.to(tl.int64) * stride_qh
        do_base = DO + off_b.to(tl.int64) * stride_dob + off_h.to(tl.int64) * stride_doh
        lse_base = LSE + off_bh * N
        delta_base = DELTA + off_bh * N
        if CAUSAL:
            # Queries before n0 see none of these keys. Diagonal tiles are masked,
            # the rest (queries >= n0 + BLOCK_N1) see every key of the tile.
            dk, dv = _dkdv_inner(
                dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qn, stride_don,
                offs_n, offs_m, offs_d, doc_k, doc_base, n0, tl.minimum(n0 + BLOCK_N1, hi), N, qk_scale,
                HEAD_DIM, BLOCK_M1, True, HAS_DOCS, INPUT_PREC)
            dk, dv = _dkdv_inner(
                dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qn, stride_don,
                offs_n, offs_m, offs_d, doc_k, doc_base, n0 + BLOCK_N1, hi, N, qk_scale,
                HEAD_DIM, BLOCK_M1, False, HAS_DOCS, INPUT_PREC)
        else:
            dk, dv = _dkdv_inner(
                dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qn, stride_don,
                offs_n, offs_m, offs_d, doc_k, doc_base, lo, hi, N, qk_scale,
                HEAD_DIM, BLOCK_M1, False, HAS_DOCS, INPUT_PREC)

    dk = dk * sm_scale
    out_off = off_b.to(tl.int64) * stride_dkb + off_kh.to(tl.int64) * stride_dkh
    out_ptrs = offs_n[:, None] * stride_dkn + offs_d[None, :]
    tl.store(DK + out_off + out_ptrs, dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + out_off + out_ptrs, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_inner(
    dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_vn,
    offs_m, offs_n, offs_d, doc_q, doc_base, start, end, N, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_N2: tl.constexpr,
    CAUSAL_MASK: tl.constexpr, HAS_DOCS: tl.constexpr, INPUT_PREC: tl.constexpr,
):
    # Keys past N load k = v = 0: their ds multiplies k = 0, so dq is unaffected.
    d_ok = offs_d < HEAD_DIM
    for start_n in range(start, end, BLOCK_N2):
        start_n = tl.multiple_of(start_n, BLOCK_N2)
        cols = start_n + offs_n
        col_ok = cols < N
        kT = tl.load(k_base + cols[None, :] * stride_kn + offs_d[:, None],
                     mask=col_ok[None, :] & d_ok[:, None], other=0.0)  # (BLOCK_D, BLOCK_N2)
        vT = tl.load(v_base + cols[None, :] * stride_vn + offs_d[:, None],
                     mask=col_ok[None, :] & d_ok[:, None], other=0.0)
        qk = _dot(q, kT, INPUT_PREC) * qk_scale  # (BLOCK_M2, BLOCK_N2)
        p = tl.math.exp2(qk - lse[:, None])
        if CAUSAL_MASK:
            p = tl.where(offs_m[:, None] >= cols[None, :], p, 0.0)
        if HAS_DOCS:
            doc_k = tl.load(doc_base + cols, mask=col_ok, other=-2)
            p = tl.where(doc_q[:, None] == doc_k[None, :], p, 0.0)
        dp = _dot(do, vT, INPUT_PREC)
        ds = p * (dp - delta[:, None])
        dq = _dot_acc(ds.to(kT.dtype), tl.trans(kT), dq, INPUT_PREC)
    return dq


@triton.autotune(configs=_DQ_CONFIGS, key=_TUNE_KEY, **_TUNE_OPTS)
@triton.jit
def _attn_bwd_dq(
    Q, K, V, DO, LSE, DELTA, DQ, DOC, DOC_START, DOC_END,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_don,
    stride_dqb, stride_dqh, stride_dqn,
    H, N, N_BUCKET, GROUP, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_DOCS: tl.constexpr, INPUT_PREC: tl.constexpr,
    BLOCK_M2: tl.constexpr, BLOCK_N2: tl.constexpr,
):
    start_m, off_bh, off_b, off_h, off_kh = _query_program(N, H, GROUP, BLOCK_M2, CAUSAL)
    m0 = start_m * BLOCK_M2
    offs_m = m0 + tl.arange(0, BLOCK_M2)
    offs_n = tl.arange(0, BLOCK_N2)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < N
    mask = row_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    q = tl.load(Q + off_b.to(tl.int64) * stride_qb + off_h.to(tl.int64) * stride_qh
                + offs_m[:, None] * stride_qn + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + off_b.to(tl.int64) * stride_dob + off_h.to(tl.int64) * stride_doh
                 + offs_m[:, None] * stride_don + offs_d[None, :], mask=mask, other=0.0)
    lse = tl.load(LSE + off_bh.to(tl.int64) * N + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + off_bh.to(tl.int64) * N + offs_m, mask=row_ok, other=0.0)
    k_base = K + off_b.to(tl.int64) * stride_kb + off_kh.to(tl.int64) * stride_kh
    v_base = V + off_b.to(tl.int64) * stride_vb + off_kh.to(tl.int64) * stride_vh
    doc_base = DOC + off_b.to(tl.int64) * N
    dq = tl.zeros((BLOCK_M2, BLOCK_D), tl.float32)

    lo = 0
    hi = N
    doc_q = offs_m
    if HAS_DOCS:
        doc_q = tl.load(doc_base + offs_m, mask=row_ok, other=-1)
        lo = tl.load(DOC_START + off_b.to(tl.int64) * N + m0)
        hi = tl.load(DOC_END + off_b.to(tl.int64) * N + tl.minimum(m0 + BLOCK_M2, N) - 1)
        lo = (lo // BLOCK_N2) * BLOCK_N2
    if CAUSAL:
        dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_vn,
                       offs_m, offs_n, offs_d, doc_q, doc_base, lo, m0, N, qk_scale,
                       HEAD_DIM, BLOCK_N2, False, HAS_DOCS, INPUT_PREC)
        dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_vn,
                       offs_m, offs_n, offs_d, doc_q, doc_base, m0, tl.minimum(m0 + BLOCK_M2, N), N,
                       qk_scale, HEAD_DIM, BLOCK_N2, True, HAS_DOCS, INPUT_PREC)
    else:
        dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_vn,
                       offs_m, offs_n, offs_d, doc_q, doc_base, lo, hi, N, qk_scale,
                       HEAD_DIM, BLOCK_N2, False, HAS_DOCS, INPUT_PREC)
    dq = dq * sm_scale
    tl.store(DQ + off_b.to(tl.int64) * stride_dqb + off_h.to(tl.int64) * stride_dqh
             + offs_m[:, None] * stride_dqn + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- host side
def doc_ids_from_cu_seqlens(cu_seqlens: torch.Tensor, total: int | None = None) -> torch.Tensor:
    """cu_seqlens (n_docs + 1,) cumulative lengths -> doc ids (1, total) int32.

    Varlen callers pack documents into one row: q/k/v then have shape (1, H, total, D).
    """
    cu = cu_seqlens.to(torch.int64)
    total = int(cu[-1]) if total is None else total
    lengths = cu[1:] - cu[:-1]
    ids = torch.repeat_interleave(torch.arange(lengths.numel(), device=cu.device), lengths)
    return ids[:total].to(torch.int32).unsqueeze(0)


def _doc_runs(doc_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """doc ids (B, N) -> (run id, start, end), each (B, N) int32 contiguous.

    A document is a maximal run of equal ids; start/end are the first and
    one-past-last token of the run containing each token.
    """
    b, n = doc_ids.shape
    idx = torch.arange(n, device=doc_ids.device).expand(b, n)
    new = torch.ones_like(doc_ids, dtype=torch.bool)
    new[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    run = torch.cumsum(new.to(torch.int32), dim=1, dtype=torch.int32)
    start = torch.where(new, idx, torch.zeros_like(idx)).cummax(dim=1).values
    last = torch.ones_like(new)
    last[:, :-1] = new[:, 1:]
    end = torch.where(last, idx + 1, torch.full_like(idx, n)).flip(1).cummin(dim=1).values.flip(1)
    as32 = lambda t: t.to(torch.int32).contiguous()  # noqa: E731
    return as32(run), as32(start), as32(end)


def _bucket(n: int) -> int:
    """Autotuning key for the sequence length: its power-of-two bucket, so a run with many
    lengths (generation, evaluation, varlen) tunes once per bucket instead of once per length."""
    return triton.next_power_of_2(n)


def _prec(dtype: torch.dtype) -> str:
    # fp32 inputs: exact fp32 dots (tests, fp32 training); 16-bit inputs use the tensor cores.
    # bf16 under the CPU interpreter: emulated (see _dot).
    if dtype == torch.bfloat16 and interpreting():
        return "bf16-emulated"
    return "ieee" if dtype == torch.float32 else "tf32"


def _last_contig(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal: bool, sm_scale: float, doc_ids):
        q, k, v = _last_contig(q), _last_contig(k), _last_contig(v)
        b, h, n, d = q.shape
        hkv = k.shape[1]
        block_d = max(16, triton.next_power_of_2(d))
        o = torch.empty_like(q)
        lse = torch.empty((b, h, n), device=q.device, dtype=torch.float32)
        if doc_ids is not None:
            run, start, end = _doc_runs(doc_ids)
        else:
            run = start = end = torch.empty(1, device=q.device, dtype=torch.int32)
        qk_scale = sm_scale * LOG2E
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), b * h)  # noqa: E731
        _attn_fwd[grid](
            q, k, v, o, lse, run, start, end,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            o.stride(0), o.stride(1), o.stride(2),
            h, n, _bucket(n), h // hkv, qk_scale,
            HEAD_DIM=d, BLOCK_D=block_d, CAUSAL=causal, HAS_DOCS=doc_ids is not None,
            INPUT_PREC=_prec(q.dtype),
        )
        ctx.save_for_backward(q, k, v, o, lse, run, start, end)
        ctx.causal, ctx.sm_scale, ctx.has_docs = causal, sm_scale, doc_ids is not None
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, run, start, end = ctx.saved_tensors
        do = _last_contig(do)
        b, h, n, d = q.shape
        hkv = k.shape[1]
        block_d = max(16, triton.next_power_of_2(d))
        delta = torch.empty_like(lse)
        pre_block = 64
        _bwd_preprocess[(triton.cdiv(n, pre_block), b * h)](
            o, do, delta, o.stride(0), o.stride(1), o.stride(2), do.stride(0), do.stride(1),
            do.stride(2), h, n, HEAD_DIM=d, BLOCK_D=block_d, BLOCK=pre_block)
        dq = torch.empty_like(q)
        dk = torch.empty_like(k)
        dv = torch.empty_like(v)
        qk_scale = ctx.sm_scale * LOG2E
        common = dict(HEAD_DIM=d, BLOCK_D=block_d, CAUSAL=ctx.causal, HAS_DOCS=ctx.has_docs,
                      INPUT_PREC=_prec(q.dtype))
        grid_kv = lambda meta: (triton.cdiv(n, meta["BLOCK_N1"]), b * hkv)  # noqa: E731
        _attn_bwd_dkdv[grid_kv](
            q, k, v, do, lse, delta, dk, dv, run, start, end,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            do.stride(0), do.stride(1), do.stride(2),
            dk.stride(0), dk.stride(1), dk.stride(2),
            h, hkv, n, _bucket(n), h // hkv, qk_scale, ctx.sm_scale, **common)
        grid_q = lambda meta: (triton.cdiv(n, meta["BLOCK_M2"]), b * h)  # noqa: E731
        _attn_bwd_dq[grid_q](
            q, k, v, do, lse, delta, dq, run, start, end,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            do.stride(0), do.stride(1), do.stride(2),
            dq.stride(0), dq.stride(1), dq.stride(2),
            h, n, _bucket(n), h // hkv, qk_scale, ctx.sm_scale, **common)
        return dq, dk, dv, None, None, None


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    softmax_scale: float | None = None,
    doc_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale [+ masks]) v, memory O(N).

    q: (B, H, N, D); k, v: (B, Hkv, N, D), H % Hkv == 0; fp32, fp16 or bf16
    (fp32 accumulation). doc_ids: optional (B, N) ints; tokens attend only inside
    their own run of equal ids (packed documents). Returns (B, H, N, D).
    """
    check_device(q, k, v)
    if q.dim() != 4 or k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[2:] != q.shape[2:]:
        raise ValueError(f"bad shapes q={tuple(q.shape)} k={tuple(k.shape)} v={tuple(v.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads {q.shape[1]} not a multiple of kv heads {k.shape[1]}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"dtype mismatch {q.dtype} {k.dtype} {v.dtype}")
    if q.shape[-1] > 256:
        raise ValueError(f"head_dim {q.shape[-1]} > 256 is not supported")
    if doc_ids is not None and doc_ids.shape != (q.shape[0], q.shape[2]):
        raise ValueError(f"doc_ids must be (B, N)={(q.shape[0], q.shape[2])}, got {tuple(doc_ids.shape)}")
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    return _FlashAttention.apply(q, k, v, causal, scale, doc_ids)


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    softmax_scale: float | None = None,
    doc_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain torch reference (materialises the N x N scores).

    Computes in the input dtype promoted to at least fp32: fp16/bf16 inputs use fp32 math, fp64
    inputs fp64 math (the tests' fp64 references). The document mask is built here from the rule
    itself, not from the kernel's ``_doc_runs``, so a bug there cannot hide in the reference.
    """
    b, h, n, d = q.shape
    group = h // k.shape[1]
    ct = torch.promote_types(q.dtype, torch.float32)
    kk = k.repeat_interleave(group, dim=1).to(ct)
    vv = v.repeat_interleave(group, dim=1).to(ct)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    s = torch.matmul(q.to(ct), kk.transpose(-1, -2)) * scale  # (B, H, N, N)
    allowed = torch.ones(n, n, dtype=torch.bool, device=q.device).expand(b, 1, n, n)
    if causal:
        allowed = allowed & torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    if doc_ids is not None:
        # i and j share a document iff no id change lies between them: equal counts of changes
        # up to i and up to j. A reused id after a different one is therefore a new document.
        changes = torch.zeros(doc_ids.shape, dtype=torch.int64, device=doc_ids.device)
        changes[:, 1:] = torch.cumsum((doc_ids[:, 1:] != doc_ids[:, :-1]).to(torch.int64), dim=1)
        allowed = allowed & (changes[:, None, :, None] == changes[:, None, None, :])
    s = s.masked_fill(~allowed, float("-inf"))
    return torch.matmul(torch.softmax(s, dim=-1), vv).to(q.dtype)
