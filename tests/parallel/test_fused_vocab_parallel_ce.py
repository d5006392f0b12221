"""The fused Triton cross entropy over tp=2 vocab shards of a padded vocabulary vs. the single-process loss.

One 2-rank gloo job (CPU, Triton interpreter) runs every case; the tests below compare its results with a
single-process fp64 reference on logits[..., :vocab_size]: loss and the gathered logits gradient to 1e-5
(relative), padded gradient columns exactly 0. Vocabularies: 100 padded to 256 (rank 1 holds only
padding), 200 padded to 256 (rank 1 partly padding) and 256 (no padding). Also lm_loss(fused=True) vs.
lm_loss(fused=False) (the torch vocab-parallel path) at tp=2, and the shard argument checks.
"""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # repo root, so `tests.dist_utils` imports
# Importing kernels sets TRITON_INTERPRET=1 here (no CUDA); the spawned ranks inherit it, so lm_loss(fused=True)
# takes the Triton path there too (engine/model/ops.py kernels_for); _lm_loss_cases asserts that it did.
kernels = pytest.importorskip("engine.kernels")
if not kernels.TRITON_AVAILABLE:
    pytest.skip("triton not installed", allow_module_level=True)
if torch.cuda.is_available():
    pytest.skip("gloo ranks on CPU tensors need the Triton interpreter", allow_module_level=True)

from engine.kernels.cross_entropy import cross_entropy_ref  # noqa: E402
from tests.dist_utils import run_distributed  # noqa: E402

TP = 2
ROWS = 13
VOCABS = [(100, 256), (200, 256), (256, 256)]  # (real vocab, padded vocab): padded / TP columns per rank
OPTS = [({}, "mean"), ({"label_smoothing": 0.1, "z_loss": 1e-3}, "none"), ({"label_smoothing": 0.1}, "sum")]


def _case_inputs(vocab: int, v_pad: int, seed: int, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(ROWS, v_pad, generator=g)
    logits[:, vocab:] = 30.0  # would dominate the softmax if padding leaked in
    targets = torch.randint(0, vocab, (ROWS,), generator=g)
    targets[:4] = torch.tensor([-100, vocab - 1, 0, -100])  # ignored rows, first and last real columns
    weight = torch.rand(ROWS, generator=g)  # d loss / d per-row loss for reduction="none"
    return logits.to(dtype), targets, weight


def _cases() -> list[tuple]:
    cases = []
    for i, (vocab, v_pad) in enumerate(VOCABS):
        for j, (opts, reduction) in enumerate(OPTS):
            inputs = _case_inputs(vocab, v_pad, 10 * i + j)
            cases.append((f"v{vocab}/{v_pad}-{reduction}", vocab, opts, reduction, *inputs))
    vocab, v_pad = VOCABS[0]
    cases.append((f"v{vocab}/{v_pad}-fp16", vocab, {"z_loss": 1e-3}, "mean",
                  *_case_inputs(vocab, v_pad, 99, torch.float16)))
    return cases


def _shard(x: torch.Tensor, rank: int) -> torch.Tensor:
    return x.chunk(TP, dim=-1)[rank].clone().requires_grad_()


def _kernel_cases(rank: int) -> dict:
    import torch.distributed as dist

    from engine.kernels.cross_entropy import cross_entropy

    out = {}
    for name, vocab, opts, reduction, logits, targets, weight in _cases():
        shard = _shard(logits, rank)
        v_local = shard.shape[-1]
        loss = cross_entropy(shard, targets, process_group=dist.group.WORLD, vocab_start=rank * v_local,
                             vocab_size=vocab, reduction=reduction, **opts)
        (loss * weight if reduction == "none" else loss).sum().backward()
        out[name] = (loss.detach(), shard.grad)
    return out


def _shard_errors(rank: int) -> dict:
    """The ValueError message of each bad shard argument (None if it was accepted)."""
    import torch.distributed as dist

    from engine.kernels.cross_entropy import cross_entropy

    logits, targets = torch.zeros(3, 8), torch.zeros(3, dtype=torch.long)
    bad = {"vocab_size": {"vocab_start": 8 * rank, "vocab_size": 17},
           "unaligned_start": {"vocab_start": 3},
           "start_out_of_range": {"vocab_start": 16}}
    errs = {}
    for name, kw in bad.items():
        try:
            cross_entropy(logits, targets, process_group=dist.group.WORLD, **kw)
            errs[name] = None
        except ValueError as e:
            errs[name] = str(e)
    return errs


def _lm_loss_inputs(vocab: int, v_pad: int):
    g = torch.Generator().manual_seed(vocab)
    logits = 3 * torch.randn(2, 7, v_pad, generator=g)
    logits[..., vocab:] = 30.0
    targets = torch.randint(0, vocab, (2, 7), generator=g)
    targets[0, :2] = -100
    targets[1, 0] = vocab - 1
    loss_mask = (torch.rand(2, 7, generator=g) > 0.2).float()
    return logits, targets, loss_mask


def _lm_loss_cases(rank: int) -> dict:
    import engine.kernels as kernels_pkg

    from engine.model.loss import lm_loss
    from engine.parallel.state import ParallelState

    state = ParallelState.initialize(tp=TP, device="cpu")
    calls = []
    real = kernels_pkg.cross_entropy

    def counting(*args, **kwargs):  # proves lm_loss took the kernel path at tp > 1
        calls.append((kwargs["vocab_start"], kwargs["vocab_size"]))
        return real(*args, **kwargs)

    kernels_pkg.cross_entropy = counting
    out = {}
    for vocab, v_pad in VOCABS:
        logits, targets, loss_mask = _lm_loss_inputs(vocab, v_pad)
        res = []
        for fused in (True, False):
            shard = _shard(logits, rank)
            loss = lm_loss(shard, targets, vocab, loss_mask, fused=fused, pstate=state)
            loss.backward()
            res.append((loss.detach(), shard.grad))
        out[vocab] = res
    kernels_pkg.cross_entropy = real
    return {"results": out, "calls": calls}


def _worker(rank: int, world_size: int) -> dict:
    return {"kernel": _kernel_cases(rank), "errors": _shard_errors(rank), "lm_loss": _lm_loss_cases(rank)}


@pytest.fixture(scope="module")
def results():
    return run_distributed(_worker, TP, timeout=120)


def _reference(logits, targets, vocab, opts, reduction, weight):
    """fp64 loss on the real columns and the full-width gradient (zeros on padding)."""
    x64 = logits[:, :vocab].double().requires_grad_()
    ref = cross_entropy_ref(x64, targets, reduction=reduction, **opts)
    (ref * weight.double() if reduction == "none" else ref).sum().backward()
    grad = torch.zeros(logits.shape, dtype=torch.float64)
    grad[:, :vocab] = x64.grad
    return ref.detach(), grad


@pytest.mark.parametrize("case", _cases(), ids=lambda c: c[0])
def test_kernel_matches_single_process(results, case):
    name, vocab, opts, reduction, logits, targets, weight = case
    ref, ref_grad = _reference(logits, targets, vocab, opts, reduction, weight)
    fp16 = logits.dtype == torch.float16
    tol = 2e-3 if fp16 else 1e-5
    for rank_out in results:  # every rank, the padding-only one too, gets the full loss
        loss, _ = rank_out["kernel"][name]
        torch.testing.assert_close(loss.double(), ref, rtol=tol, atol=tol)
    grad = torch.cat([r["kernel"][name][1] for r in results], dim=-1)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=tol, atol=1e-4 if fp16 else 1e-6)
    assert not grad[:, vocab:].any()  # padded columns: exactly zero
    if vocab <= grad.shape[-1] // TP:
        assert not results[1]["kernel"][name][1].any()  # the padding-only rank


def test_lm_loss_fused_matches_torch_path_and_single_process(results):
    from engine.model.loss import lm_loss

    v_local = [v_pad // TP for _, v_pad in VOCABS]
    for rank, rank_out in enumerate(results):
        assert rank_out["lm_loss"]["calls"] == [(rank * vl, vocab) for vl, (vocab, _) in zip(v_local, VOCABS)]
    for vocab, v_pad in VOCABS:
        logits, targets, loss_mask = _lm_loss_inputs(vocab, v_pad)
        full = logits.clone().requires_grad_()
        ref = lm_loss(full, targets, vocab, loss_mask)  # single process, torch path
        ref.backward()
        for k, which in enumerate(("fused", "torch")):
            losses = [r["lm_loss"]["results"][vocab][k][0] for r in results]
            grad = torch.cat([r["lm_loss"]["results"][vocab][k][1] for r in results], dim=-1)
            for loss in losses:
                torch.testing.assert_close(loss, ref.detach(), rtol=1e-5, atol=1e-6, msg=f"{which} v{vocab}")
            torch.testing.assert_close(grad, full.grad, rtol=1e-5, atol=1e-7, msg=f"{which} v{vocab}")
            assert not grad[..., vocab:].any()


def test_shard_argument_errors(results):
    for rank_out in results:
        errs = rank_out["errors"]
        assert "vocab_size=17 must be in (0, 16]" in errs["vocab_size"]
        assert "vocab_start=3 is not a shard start" in errs["unaligned_start"]
        assert "vocab_start=16 is not a shard start" in errs["start_out_of_range"]
