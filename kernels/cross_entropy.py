"""Cross entropy fused with the softmax, chunked over the vocabulary, in Triton.

Forward: one program per row walks the vocab in chunks of BLOCK_V, keeping an
online max ``m`` and rescaled sum-exp ``s`` in fp32, and picks up the target
logit and the sum of logits (label smoothing) on the way. Only these four
per-row numbers are written; fp32 logits for the whole batch never exist.
Backward: re-reads the logits chunk by chunk and writes
    dlogits = dloss * (softmax * (1 + 2 z lse) - (1 - eps) onehot - eps / V)
in the logits' dtype.

Per-row loss (lse = m + log s, V = full vocab size):
    lse - (1 - eps) * x_target - (eps / V) * sum_j x_j + z * lse^2
which equals torch's cross_entropy(label_smoothing=eps) plus a z-loss.

Vocab parallel: each rank holds logits[:, vocab_start : vocab_start + V_local].
:func:`cross_entropy_stats` returns the per-row pieces (max, sum-exp relative to
that max, target logit or 0 if the target is on another rank, sum of logits) for
a shard; :func:`combine_stats` merges shard pieces
    m = max_r m_r;  s = sum_r s_r * exp(m_r - m);  x_t = sum_r x_t,r;  sum_x = sum_r sum_x,r
(all-reduce MAX then SUM). Passing ``process_group`` (and ``vocab_start``) to
:func:`cross_entropy` does exactly this with torch.distributed; the backward then
needs no communication: each rank writes the gradient of its own shard.

Padded vocabulary: with ``vocab_size`` (the real global vocabulary) smaller than the
logits' width, global ids >= vocab_size are padding. Each shard runs the kernels on
its first ``clamp(vocab_size - vocab_start, 0, V_local)`` columns only (a view: the
kernels take a row stride), so padding never enters the softmax, the smoothing sum
or the z-loss, V in eps / V is vocab_size, and the padded gradient columns are 0.
A shard of padding only launches nothing and contributes neutral stats.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import check_device, interpreting


@triton.jit
def _ce_stats(
    X, T, M_OUT, S_OUT, XT_OUT, SUM_OUT, stride_x, V, vocab_start, ignore_index,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    t = tl.load(T + row).to(tl.int64)
    # Finite start: lanes that only see padding (-inf) keep s = 0 without inf - inf.
    m = tl.full((BLOCK_V,), -1.0e30, tl.float32)
    s = tl.zeros((BLOCK_V,), tl.float32)
    sum_x = tl.zeros((BLOCK_V,), tl.float32)
    # Per-lane online softmax over the chunks; lanes are combined once at the end.
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(x_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, x)
        s = s * tl.exp(m - m_new) + tl.exp(x - m_new)
        m = m_new
        sum_x += tl.where(cols < V, x, 0.0)
    m_row = tl.max(m, 0)
    s_row = tl.sum(s * tl.exp(m - m_row), 0)
    local = t - vocab_start
    in_shard = (local >= 0) & (local < V) & (t != ignore_index)
    xt = tl.load(x_row + local, mask=in_shard, other=0.0).to(tl.float32)
    tl.store(M_OUT + row, m_row)
    tl.store(S_OUT + row, s_row)
    tl.store(XT_OUT + row, tl.where(in_shard, xt, 0.0))
    tl.store(SUM_OUT + row, tl.sum(sum_x, 0))


@triton.jit
def _ce_bwd(
    X, T, DX, LSE, COEF, stride_x, stride_dx, V, vocab_start, ignore_index,
    smooth, z2, smooth_over_v,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    t = tl.load(T + row).to(tl.int64)
    coef = tl.load(COEF + row)  # dloss/drow_loss; 0 for ignored rows
    lse = tl.load(LSE + row)
    zf = 1.0 + z2 * lse  # d(lse + z lse^2)/d lse
    local = t - vocab_start
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < V
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        g = tl.exp(x - lse) * zf - smooth_over_v - tl.where(cols == local, 1.0 - smooth, 0.0)
        tl.store(DX + row * stride_dx + cols, (g * coef).to(DX.dtype.element_ty), mask=mask)


def _block_v(v: int) -> int:
    # next_power_of_2(0) is 0, not a valid tl.arange size; 16 keeps tiny vocabularies sane.
    cap = 1024 if interpreting() else 4096
    return min(cap, max(16, triton.next_power_of_2(v)))


_NO_MAX = -1.0e30  # the kernels' finite "no column seen" max: exp(_NO_MAX - m) == 0 for any real m


def cross_entropy_stats(
    logits: torch.Tensor, targets: torch.Tensor, vocab_start: int = 0, ignore_index: int = -100
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row pieces of a (possibly vocab-sharded) softmax, each (M,) fp32.

    logits (M, V_local) holds vocab ids [vocab_start, vocab_start + V_local).
    Returns (max, sum exp(x - max), target logit or 0 when not in this shard, sum x).
    """
    check_device(logits)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    m_rows, v = logits.shape
    if v == 0 or m_rows == 0:  # nothing to read (a shard of padding only): the neutral pieces
        m = torch.full((m_rows,), _NO_MAX, device=logits.device, dtype=torch.float32)
        return m, torch.zeros_like(m), torch.zeros_like(m), torch.zeros_like(m)
    outs = [torch.empty(m_rows, device=logits.device, dtype=torch.float32) for _ in range(4)]
    _ce_stats[(m_rows,)](logits, targets.contiguous(), *outs, logits.stride(0), v, vocab_start,
                         ignore_index, BLOCK_V=_block_v(v), num_warps=8)
    return tuple(outs)  # type: ignore[return-value]


def combine_stats(
    stats: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge per-shard (max, sumexp, target logit, sum x) into full-vocab pieces."""
    m = torch.stack([st[0] for st in stats]).amax(0)
    s = sum(st[1] * torch.exp(st[0] - m) for st in stats)
    xt = sum(st[2] for st in stats)
    sx = sum(st[3] for st in stats)
    return m, s, xt, sx


def _all_reduce_stats(stats, group):
    import torch.distributed as dist

    m, s, xt, sx = stats
    m_glob = m.clone()
    dist.all_reduce(m_glob, op=dist.ReduceOp.MAX, group=group)
    rest = torch.stack([s * torch.exp(m - m_glob), xt, sx])  # one SUM all-reduce for three
    dist.all_reduce(rest, op=dist.ReduceOp.SUM, group=group)
    return m_glob, rest[0], rest[1], rest[2]


def _valid_columns(vocab_size: int, vocab_start: int, v_local: int) -> int:
    """How many leading columns of a shard are real vocabulary (the rest is padding)."""
    return max(0, min(vocab_size - vocab_start, v_local))


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, ignore_index, smooth, z_loss, reduction, group, vocab_start, vocab_size):
        logits = logits if logits.stride(-1) == 1 else logits.contiguous()
        targets = targets.contiguous()
        n_cols = _valid_columns(vocab_size, vocab_start, logits.shape[1])
        stats = cross_entropy_stats(logits[:, :n_cols], targets, vocab_start, ignore_index)
        if group is not None:
            stats = _all_reduce_stats(stats, group)
        m, s, xt, sx = stats
        lse = m + torch.log(s)
        loss = lse - (1.0 - smooth) * xt - (smooth / vocab_size) * sx + z_loss * lse * lse
        valid = targets != ignore_index
        loss = torch.where(valid, loss, torch.zeros_like(loss))
        # A target outside [0, vocab_size) (tokenizer/vocab mismatch) has no logit: make its loss NaN so
        # the step is visibly bad (torch raises there; raising here would cost a device sync).
        out_of_range = valid & ((targets < 0) | (targets >= vocab_size))
        loss = torch.where(out_of_range, torch.full_like(loss, float("nan")), loss)
        n_valid = valid.sum()
        if reduction == "mean":
            out = loss.sum() / n_valid.clamp_min(1)
        elif reduction == "sum":
            out = loss.sum()
        else:
            out = loss
        ctx.save_for_backward(logits, targets, lse, valid, n_valid)
        ctx.args = (ignore_index, smooth, z_loss, reduction, vocab_start, vocab_size, n_cols)
        return out  # fp32 (also for 16-bit logits)

    @staticmethod
    def backward(ctx, dout):
        logits, targets, lse, valid, n_valid = ctx.saved_tensors
        ignore_index, smooth, z_loss, reduction, vocab_start, vocab_size, n_cols = ctx.args
        coef = dout.float() * valid
        if reduction == "mean":
            coef = coef / n_valid.clamp_min(1).float()
        coef = coef.expand_as(lse).contiguous()
        dx = torch.empty_like(logits)
        m_rows, v = logits.shape
        if n_cols < v:  # padding columns are outside the loss: exactly zero gradient
            dx[:, n_cols:].zero_()
        if n_cols > 0 and m_rows > 0:
            # The kernel walks only the first n_cols columns of each row (row strides of the full tensors).
            _ce_bwd[(m_rows,)](logits, targets, dx, lse.contiguous(), coef, logits.stride(0), dx.stride(0),
                               n_cols, vocab_start, ignore_index, smooth, 2.0 * z_loss, smooth / vocab_size,
                               BLOCK_V=_block_v(n_cols), num_warps=8)
        return dx, None, None, None, None, None, None, None, None


def _resolve_vocab_size(
    logits: torch.Tensor, targets: torch.Tensor, reduction: str, process_group, vocab_start: int,
    vocab_size: int | None,
) -> int:
    """Validate the arguments of :func:`cross_entropy`; return the real global vocabulary size."""
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be mean|sum|none, got {reduction!r}")
    if logits.dim() < 1 or tuple(logits.shape[:-1]) != tuple(targets.shape):
        raise ValueError(f"logits {tuple(logits.shape)} must be targets {tuple(targets.shape)} + (V,)")
    v_local = logits.shape[-1]
    if v_local == 0:
        raise ValueError("logits have an empty vocabulary dimension")
    world = 1
    if process_group is not None:
        import torch.distributed as dist

        world = dist.get_world_size(process_group)
    v_total = v_local * world
    if process_group is None and vocab_start != 0:
        # Without a group the shard is the whole vocabulary; an offset would mis-scale eps / V.
        raise ValueError(f"vocab_start={vocab_start} needs process_group (the logits are the full vocabulary)")
    if not (0 <= vocab_start <= v_total - v_local and vocab_start % v_local == 0):
        raise ValueError(f"vocab_start={vocab_start} is not a shard start: expected a multiple of the local "
                         f"vocab {v_local} in [0, {v_total - v_local}] (world size {world})")
    vocab_size = v_total if vocab_size is None else vocab_size
    if not 0 < vocab_size <= v_total:
        raise ValueError(f"vocab_size={vocab_size} must be in (0, {v_total}] (world size {world} x local "
                         f"vocab {v_local})")
    return vocab_size


def cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    reduction: str = "mean",
    process_group=None,
    vocab_start: int = 0,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """Fused softmax cross entropy. logits (..., V[_local]), targets (...) int.

    reduction: "mean" (over non-ignored targets, as torch), "sum" or "none".
    z_loss adds z_loss * lse^2 per row. With process_group, logits is this rank's
    vocab shard starting at vocab_start (all ranks' shards equal-sized).
    vocab_size: the real (unpadded) global vocabulary, default V_local * world size;
    columns with global id >= vocab_size are padding: outside the loss, zero gradient.
    Targets must lie in [0, vocab_size) or equal ignore_index; others get a NaN loss (checking would cost a sync).
    """
    vocab_size = _resolve_vocab_size(logits, targets, reduction, process_group, vocab_start, vocab_size)
    shape = targets.shape
    v_local = logits.shape[-1]
    out = _CrossEntropy.apply(
        logits.reshape(-1, v_local), targets.reshape(-1), ignore_index, float(label_smoothing),
        float(z_loss), reduction, process_group, vocab_start, vocab_size)
    return out.view(shape) if reduction == "none" else out


def cross_entropy_ref(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """torch reference: F.cross_entropy (fp32) plus z_loss * logsumexp^2 on valid rows."""
    x = logits.reshape(-1, logits.shape[-1])
    x = x.to(torch.promote_types(x.dtype, torch.float32))  # fp32 math, fp64 stays fp64
    t = targets.reshape(-1)
    loss = torch.nn.functional.cross_entropy(
        x, t, ignore_index=ignore_index, label_smoothing=label_smoothing, reduction="none")
    valid = t != ignore_index
    if z_loss:
        loss = loss + z_loss * torch.logsumexp(x, -1).pow(2) * valid
    if reduction == "mean":
        return loss.sum() / valid.sum().clamp_min(1)
    if reduction == "sum":
        return loss.sum()
    return loss.view(targets.shape)
