"""The documented call sequence on the real Transformer: tp=2 (sequence parallel, GQA) x dp=2, ZeRO-1,
gradient accumulation, clipping -- losses and grad norms equal to one process (1e-5 relative, 3 steps).

It checks the integration contract in docs/parallelism.md: `sync_tp_grads` on the main grads after
`finish_grad_sync` (also under ZeRO-1), tp-aware grad norm over sharded buffers.
"""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # repo root, so `tests.dist_utils` imports
from engine.config import ModelConfig  # noqa: E402
from engine.model.loss import lm_loss  # noqa: E402
from engine.model.transformer import build_model  # noqa: E402
from engine.optim.optimizer import Optimizer  # noqa: E402
from engine.parallel.data_parallel import DataParallel  # noqa: E402
from engine.parallel.grad_sync import sync_tp_grads  # noqa: E402
from engine.parallel.state import ParallelState  # noqa: E402
from tests.dist_utils import run_distributed  # noqa: E402

VOCAB, SEQ, GLOBAL_BATCH, ACCUM, STEPS = 64, 8, 8, 2, 3


def _cfg() -> ModelConfig:
    return ModelConfig(vocab_size=VOCAB, vocab_pad_multiple=8, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                       ffn_hidden=64, max_seq_len=SEQ, norm="rmsnorm", activation="swiglu", position="rope")


def _train(state: ParallelState, zero: int) -> tuple[list[float], list[float]]:
    model = build_model(_cfg(), state if state.is_distributed else None, seed=7)
    ddp = DataParallel(model, state, bucket_size=2000, shard_grads=zero == 1)
    specs = model.shard_specs()
    opt = Optimizer(ddp.segments(), specs, state, lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1,
                    grads_sharded=zero == 1 and state.dp > 1, after_step=ddp.sync_params, zero_grad=ddp.zero_grad)
    g = torch.Generator().manual_seed(2)
    per_rank = GLOBAL_BATCH // state.dp
    mb = per_rank // ACCUM
    losses, norms = [], []
    kw = {"pstate": state} if state.tp > 1 else {}
    for _ in range(STEPS):
        tokens = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=g)
        mine = tokens[state.dp_rank * per_rank:(state.dp_rank + 1) * per_rank]
        opt.zero_grad()
        total = 0.0
        for i in range(ACCUM):
            t = mine[i * mb:(i + 1) * mb]
            with ddp.no_sync(enabled=i < ACCUM - 1):
                loss = lm_loss(model(t[:, :-1]), t[:, 1:], VOCAB, **kw)
                (loss / ACCUM).backward()
            total += float(loss.detach()) / ACCUM
        ddp.finish_grad_sync()
        sync_tp_grads(((ddp.main_grad(p), specs[n]) for n, p in model.named_parameters()), state)
        norms.append(opt.clip_grad_norm(0.3))
        opt.step()
        losses.append(total)
    return losses, norms


def _tp_dp(rank: int, world: int) -> dict:
    state = ParallelState.initialize(tp=2, dp=2, sequence_parallel=True, device="cpu")
    out = {zero: _train(state, zero) for zero in (0, 1)}
    if state.dp > 1:  # local losses differ per dp rank: average them as the loop does
        for zero, (losses, norms) in out.items():
            t = torch.tensor(losses)
            torch.distributed.all_reduce(t, group=state.dp_group)
            out[zero] = ((t / state.dp).tolist(), norms)
    return out


def test_tp2_sp_dp2_zero1_matches_single_process():
    ref_losses, ref_norms = _train(ParallelState.single(), 0)
    assert all(n > 0.3 for n in ref_norms)  # clipping is active
    for r in run_distributed(_tp_dp, 4, timeout=180):
        for zero in (0, 1):
            losses, norms = r[zero]
            assert losses == pytest.approx(ref_losses, rel=1e-5), zero
            assert norms == pytest.approx(ref_norms, rel=1e-5), zero
