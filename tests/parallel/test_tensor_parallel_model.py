"""The Transformer built from tensor-parallel layers equals the single-process model.

One 4-rank gloo job trains GPT-2-style and Llama-style (GQA 4/2: at tp=4 each KV head is replicated
on 2 ranks) tiny models for 5 AdamW steps at tp=4 and tp=2 (x dp=2), each with and without sequence
parallelism; rank 0 returns its losses and the gathered gradients of every parameter after the first
backward, compared here with the same training in this process (tp=1).
Tolerances (fp32): losses 1e-5 relative; gradients max|g - g_ref| <= 1e-5 * max|g_ref| + 1e-8 per
parameter (the absolute term covers gradients that are exactly zero in exact arithmetic, like the
k-projection bias, where both sides are rounding noise ~1e-11).
"""

import dataclasses
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # repo root, so `tests.dist_utils` imports
from engine.config import ModelConfig  # noqa: E402
from engine.model.loss import IGNORE_INDEX, lm_loss  # noqa: E402
from engine.model.transformer import Transformer, build_model  # noqa: E402
from engine.parallel import tensor_parallel as tpl  # noqa: E402
from engine.parallel.state import ParallelState  # noqa: E402
from tests.dist_utils import run_distributed  # noqa: E402

STEPS, BATCH, SEQ, VOCAB = 5, 2, 16, 50
LOSS_RTOL, GRAD_RTOL, GRAD_ATOL = 1e-5, 1e-5, 1e-8

COMMON = dict(vocab_size=VOCAB, vocab_pad_multiple=8, d_model=64, n_layers=2, n_heads=4, max_seq_len=SEQ,
              dropout=0.0)
CONFIGS = {
    "gpt2": ModelConfig(**COMMON, norm="layernorm", position="learned", activation="gelu", bias=True,
                        tie_embeddings=True),
    "llama": ModelConfig(**COMMON, n_kv_heads=2, norm="rmsnorm", position="rope", activation="swiglu",
                         ffn_hidden=128, bias=False, tie_embeddings=False),
}
LAYOUTS = [(4, False), (4, True), (2, False), (2, True)]


def _train(cfg: ModelConfig, pstate: ParallelState) -> tuple[list[float], dict[str, torch.Tensor]]:
    """5 AdamW steps on fixed random batches; the step-0 gradients gathered to full (real-vocab) shape."""
    torch.manual_seed(0)
    model = build_model(cfg, pstate, seed=1234)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    gen = torch.Generator().manual_seed(7)
    losses, grads = [], {}
    for step in range(STEPS):
        tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=gen)
        inputs, targets = tokens[:, :-1], tokens[:, 1:].clone()
        targets[0, :3] = IGNORE_INDEX
        loss = lm_loss(model(inputs), targets, VOCAB, pstate=pstate)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        tpl.allreduce_sequence_parallel_grads(model, pstate)  # the tp gradient sums the training loop does
        if step == 0:
            specs = model.shard_specs()
            for name, p in model.named_parameters():
                grads[name] = tpl.gather_tensor(p.grad, specs[name], pstate)  # canonical: real vocabulary
        opt.step()
        losses.append(loss.item())
    return losses, grads


def _model_worker(rank: int, world_size: int) -> dict:
    out = {}
    for tp, sp in LAYOUTS:
        pstate = ParallelState.initialize(tp=tp, sequence_parallel=sp, device="cpu")
        for name, cfg in CONFIGS.items():
            res = _train(cfg, pstate)
            if rank == 0:
                out[(name, tp, sp)] = res
    # dropout runs (independent masks per tp rank under sequence parallel): only check it trains
    pstate = ParallelState.initialize(tp=2, sequence_parallel=True, device="cpu")
    from engine.parallel.random import seed_parallel_rng

    seed_parallel_rng(1, pstate)
    losses, _ = _train(dataclasses.replace(CONFIGS["llama"], dropout=0.1), pstate)
    out["dropout"] = losses
    return out


@pytest.fixture(scope="module")
def tp_results():
    return run_distributed(_model_worker, 4, timeout=200)[0]


@pytest.fixture(scope="module")
def reference():
    return {name: _train(cfg, ParallelState.single()) for name, cfg in CONFIGS.items()}


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("tp,sp", LAYOUTS)
def test_tp_training_matches_single_process(tp_results, reference, name, tp, sp):
    losses, grads = tp_results[(name, tp, sp)]
    ref_losses, ref_grads = reference[name]
    for i, (a, b) in enumerate(zip(losses, ref_losses)):
        assert abs(a - b) <= LOSS_RTOL * abs(b), f"step {i}: loss {a} at tp={tp} sp={sp}, {b} at tp=1"
    assert set(grads) == set(ref_grads)
    for pname, g in grads.items():
        ref = ref_grads[pname]
        assert g.shape == ref.shape, pname
        err = (g - ref).abs().max().item()
        assert err <= GRAD_RTOL * ref.abs().max().item() + GRAD_ATOL, f"{pname}: max grad error {err:.3g}"


def test_dropout_with_sequence_parallel_trains(tp_results):
    losses = tp_results["dropout"]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


def test_tp1_model_has_plain_parameter_names():
    model = Transformer(CONFIGS["llama"], ParallelState.single())
    names = dict(model.named_parameters())
    assert names["layers.0.attn.q_proj.weight"].shape == (64, 64)
    assert names["layers.0.attn.k_proj.weight"].shape == (32, 64)
    assert names["layers.1.mlp.down_proj.weight"].shape == (64, 128)
    assert names["embed.weight"].shape == (56, 64) and names["head.weight"].shape == (56, 64)  # padded at run time
    specs = model.shard_specs()
    assert specs["embed.weight"].global_shape == (VOCAB, 64) and specs["head.weight"].global_shape == (VOCAB, 64)


def test_invalid_tp_splits_are_clear():
    fake = lambda tp: ParallelState(tp=tp, tp_rank=0, world_size=tp)  # noqa: E731 - constructors never communicate
    with pytest.raises(ValueError, match=r"n_heads=4 is not divisible by parallel.tp=8"):
        Transformer(CONFIGS["gpt2"], fake(8))
    odd = dataclasses.replace(CONFIGS["llama"], n_heads=6, n_kv_heads=3, d_model=48)
    with pytest.raises(ValueError, match=r"n_kv_heads=3 and parallel.tp=2: one must divide the other"):
        Transformer(odd, fake(2))
    with pytest.raises(ValueError, match=r"MLP hidden size 102 .* not divisible by parallel.tp=4"):
        Transformer(dataclasses.replace(CONFIGS["llama"], ffn_hidden=102), fake(4))
