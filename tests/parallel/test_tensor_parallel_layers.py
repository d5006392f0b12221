"""Tensor-parallel layers and collectives against their single-process torch counterparts.

Single-process tests check tp=1 == torch exactly and the error messages. One 4-rank gloo job (about
15 s on 2 cores) checks every layer at tp=4 and at tp=2 (x dp=2), with and without sequence parallel:
outputs, input gradients and gathered weight gradients match the full computation to 1e-5 (fp32).
"""

import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # repo root, so `tests.dist_utils` imports
from engine.parallel import tensor_parallel as tpl  # noqa: E402
from engine.parallel.random import RNGStatesTracker, model_parallel_rng, seed_parallel_rng  # noqa: E402
from engine.parallel.state import ParallelState  # noqa: E402
from tests.dist_utils import run_distributed  # noqa: E402

TOL = 1e-5


# ----------------------------------------------------------------------------- tp = 1 is plain torch

def test_tp1_linear_equals_nn_linear():
    single = ParallelState.single()
    for cls in (tpl.ColumnParallelLinear, tpl.RowParallelLinear):
        torch.manual_seed(0)
        ref = nn.Linear(12, 8)
        torch.manual_seed(0)
        layer = cls(12, 8, single)  # default init consumes the global RNG exactly like nn.Linear
        assert [n for n, _ in layer.named_parameters()] == ["weight", "bias"]
        assert torch.equal(layer.weight, ref.weight) and torch.equal(layer.bias, ref.bias)
        x = torch.randn(2, 5, 12, requires_grad=True)
        x2 = x.detach().clone().requires_grad_()
        layer(x).square().sum().backward()
        ref(x2).square().sum().backward()
        assert torch.equal(x.grad, x2.grad) and torch.equal(layer.weight.grad, ref.weight.grad)
    assert tpl.ColumnParallelLinear(4, 6, single, bias=False).bias is None


def test_tp1_embedding_and_cross_entropy_equal_torch():
    single = ParallelState.single()
    torch.manual_seed(1)
    ref = nn.Embedding(10, 4)
    torch.manual_seed(1)
    emb = tpl.VocabParallelEmbedding(10, 4, single)
    assert [n for n, _ in emb.named_parameters()] == ["weight"] and torch.equal(emb.weight, ref.weight)
    ids = torch.randint(0, 10, (3, 7))
    assert torch.equal(emb(ids), ref(ids))

    logits = torch.randn(3, 7, 12, requires_grad=True)
    targets = torch.randint(0, 10, (3, 7))
    targets[0, :3] = -100
    for reduction in ("none", "mean", "sum"):
        got = tpl.vocab_parallel_cross_entropy(logits, targets, single, vocab_size=10, reduction=reduction)
        want = F.cross_entropy(logits[..., :10].reshape(-1, 10), targets.reshape(-1), reduction=reduction)
        assert torch.equal(got.reshape(-1) if reduction == "none" else got, want)


def test_seeded_init_is_reproducible_and_custom_init():
    single = ParallelState.single()
    init = lambda w, g: nn.init.normal_(w, 0.0, 0.02, generator=g)  # noqa: E731
    a = tpl.ColumnParallelLinear(8, 6, single, init_method=init, seed=7)
    b = tpl.ColumnParallelLinear(8, 6, single, init_method=init, seed=7)
    assert torch.equal(a.weight, b.weight) and torch.all(a.bias == 0)  # explicit init -> zero bias
    assert abs(a.weight.std().item() - 0.02) < 0.01


def test_invalid_splits_are_clear():
    fake = ParallelState(tp=4, tp_rank=1, world_size=4)  # constructors never communicate
    with pytest.raises(ValueError, match="ColumnParallelLinear output block size=6 is not divisible by .*tp=4"):
        tpl.ColumnParallelLinear(8, 6, fake)
    with pytest.raises(ValueError, match="RowParallelLinear in_features=6 is not divisible"):
        tpl.RowParallelLinear(6, 8, fake)
    with pytest.raises(ValueError, match="num_embeddings .*=10 is not divisible"):
        tpl.VocabParallelEmbedding(10, 8, fake)
    with pytest.raises(ValueError, match="partition_sizes"):
        tpl.ColumnParallelLinear(8, 16, fake, partition_sizes=[4, 4])
    with pytest.raises(ValueError, match="vocab_size=99"):
        tpl.vocab_parallel_cross_entropy(torch.zeros(2, 4), torch.zeros(2, dtype=torch.long), fake, vocab_size=99)


def test_rng_tracker_fork_is_separate_stream():
    tracker = RNGStatesTracker("cpu")
    tracker.add("mp", 123)
    with pytest.raises(ValueError):
        tracker.add("other", 123)
    torch.manual_seed(5)
    a = torch.rand(3)
    with tracker.fork("mp"):
        m1 = torch.rand(3)
    b = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(torch.rand(3), a) and torch.equal(torch.rand(3), b)  # default stream untouched
    with tracker.fork("mp"):
        m2 = torch.rand(3)  # the fork's own stream advanced
    assert torch.equal(m1, torch.rand(3, generator=torch.Generator().manual_seed(123)))
    assert not torch.equal(m1, m2)
    saved = tracker.get_states()
    with tracker.fork("mp"):
        m3 = torch.rand(3)
    tracker.set_states(saved)
    with tracker.fork("mp"):
        assert torch.equal(torch.rand(3), m3)  # states round-trip (checkpointing)


def test_seed_parallel_rng_streams_differ_per_tp_rank():
    draws = []
    for r in range(2):
        st = ParallelState(tp=2, tp_rank=r, world_size=2)
        seed_parallel_rng(42, st)
        d = torch.rand(2)
        with model_parallel_rng(st):
            m = torch.rand(2)
        draws.append((d, m))
    assert torch.equal(draws[0][0], draws[1][0])  # default stream shared across tp
    assert not torch.equal(draws[0][1], draws[1][1])  # model-parallel stream per tp rank
    st1 = ParallelState.single()
    assert isinstance(model_parallel_rng(st1), type(__import__("contextlib").nullcontext()))


# ----------------------------------------------------------------------------- multi-process

def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().float() - b.detach().float()).abs().max().item()


def _layer_errors(state: ParallelState) -> dict:
    """Max |tp - reference| for every check on this rank; reference = the same layer at tp=1."""
    single = ParallelState.single()
    sp = state.sequence_parallel
    tp, r = state.tp, state.tp_rank
    B, S, D, H, V, VOCAB = 2, 8, 12, 16, 24, 21  # V = padded vocab (divisible by 2, 4), VOCAB = real tokens
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(B, S, D, generator=gen)
    err = {}

    def shard_seq(t):
        return t.chunk(tp, dim=1)[r] if sp else t

    # Column-parallel with two fused blocks (as SwiGLU gate|up), checked against the full layer.
    sizes = [H, 8]
    col = tpl.ColumnParallelLinear(D, H + 8, state, seed=3, partition_sizes=sizes)
    ref = tpl.ColumnParallelLinear(D, H + 8, single, seed=3)
    xin = shard_seq(x).clone().requires_grad_()
    xref = x.clone().requires_grad_()
    y, yref = col(xin), ref(xref)
    yref_local = tpl.shard_tensor(yref, 2, sizes, r, tp)
    err["col_out"] = _maxdiff(y, yref_local)
    w = torch.randn(yref.shape, generator=gen)
    (y * tpl.shard_tensor(w, 2, sizes, r, tp)).sum().backward()
    (yref * w).sum().backward()
    err["col_dx"] = _maxdiff(xin.grad, shard_seq(xref.grad))
    err["col_dw"] = _maxdiff(tpl.gather_tensor(col.weight.grad, col.param_specs["weight"], state), ref.weight.grad)
    err["col_db"] = _maxdiff(tpl.gather_tensor(col.bias.grad, col.param_specs["bias"], state), ref.bias.grad)
    err["col_w"] = _maxdiff(tpl.gather_tensor(col.weight.data, col.param_specs["weight"], state), ref.weight)

    # Column-parallel with replicated shards (K/V when tp > n_kv_heads): 2 ranks hold each shard and each
    # uses it with its own downstream weights; the replicas' partial weight gradients must be summed.
    rep = tpl.ColumnParallelLinear(D, 8, state, seed=6, replicas=2)
    rref = tpl.ColumnParallelLinear(D, 8, single, seed=6)
    xin = shard_seq(x).clone().requires_grad_()
    xref = x.clone().requires_grad_()
    y, yref = rep(xin), rref(xref)
    n_sh = tp // 2
    err["rep_out"] = _maxdiff(y, yref.chunk(n_sh, dim=-1)[r // 2])
    w_all = torch.randn(tp, *y.shape, generator=gen)
    (y * w_all[r]).sum().backward()
    sum((yref.chunk(n_sh, dim=-1)[q // 2] * w_all[q]).sum() for q in range(tp)).backward()
    tpl.allreduce_sequence_parallel_grads(rep, state)
    err["rep_dx"] = _maxdiff(xin.grad, shard_seq(xref.grad))
    err["rep_dw"] = _maxdiff(tpl.gather_tensor(rep.weight.grad, rep.param_specs["weight"], state), rref.weight.grad)
    err["rep_db"] = _maxdiff(tpl.gather_tensor(rep.bias.grad, rep.param_specs["bias"], state), rref.bias.grad)
    err["rep_shard_full"] = _maxdiff(rep.param_specs["weight"].shard_canonical(rref.weight.detach(), r), rep.weight)

    # Row-parallel: input split along features, output all-reduced (or reduce-scattered along the sequence).
    row = tpl.RowParallelLinear(H, D, state, seed=4)
    rref = tpl.RowParallelLinear(H, D, single, seed=4)
    h = torch.randn(B, S, H, generator=gen)
    hin = h.chunk(tp, dim=-1)[r].clone().requires_grad_()
    href = h.clone().requires_grad_()
    o, oref = row(hin), rref(href)
    err["row_out"] = _maxdiff(o, shard_seq(oref))
    w = torch.randn(oref.shape, generator=gen)
    (o * shard_seq(w)).sum().backward()
    (oref * w).sum().backward()
    tpl.allreduce_sequence_parallel_grads(row, state)
    err["row_dx"] = _maxdiff(hin.grad, href.grad.chunk(tp, dim=-1)[r])
    err["row_dw"] = _maxdiff(tpl.gather_tensor(row.weight.grad, row.param_specs["weight"], state), rref.weight.grad)
    err["row_db"] = _maxdiff(row.bias.grad, rref.bias.grad)
    err["row_bias_marked"] = float(row.param_specs["bias"].sequence_parallel != sp)

    # Vocab-parallel embedding.
    emb = tpl.VocabParallelEmbedding(V, D, state, seed=5)
    eref = tpl.VocabParallelEmbedding(V, D, single, seed=5)
    ids = torch.randint(0, V, (B, S), generator=gen)
    e, eref_out = emb(ids), eref(ids)
    err["emb_out"] = _maxdiff(e, shard_seq(eref_out))
    w = torch.randn(eref_out.shape, generator=gen)
    (e * shard_seq(w)).sum().backward()
    (eref_out * w).sum().backward()
    err["emb_dw"] = _maxdiff(tpl.gather_tensor(emb.weight.grad, emb.param_specs["weight"], state), eref.weight.grad)

    # Vocab-parallel cross entropy with padded vocabulary and ignore_index.
    logits = torch.randn(B, S, V, generator=gen) * 3
    targets = torch.randint(0, VOCAB, (B, S), generator=gen)
    targets[0, :3] = -100
    targets[1, 0] = VOCAB - 1
    lin = logits.chunk(tp, dim=-1)[r].clone().requires_grad_()
    lref = logits.clone().requires_grad_()
    loss = tpl.vocab_parallel_cross_entropy(lin, targets, state, vocab_size=VOCAB)
    want = F.cross_entropy(lref[..., :VOCAB].reshape(-1, VOCAB), targets.reshape(-1), reduction="none").view(B, S)
    err["ce_loss"] = _maxdiff(loss, want)
    g = torch.rand(B, S, generator=gen)
    (loss * g).sum().backward()
    (want * g).sum().backward()
    err["ce_grad"] = _maxdiff(lin.grad, lref.grad.chunk(tp, dim=-1)[r])
    mean = tpl.vocab_parallel_cross_entropy(lin, targets, state, vocab_size=VOCAB, reduction="mean")
    err["ce_mean"] = _maxdiff(mean, F.cross_entropy(logits[..., :VOCAB].reshape(-1, VOCAB), targets.reshape(-1)))
    err["ce_ignored_zero"] = loss[0, :3].abs().max().item()

    # Sequence-parallel primitives round trip: scatter -> gather is the identity, gradients included.
    t = x.clone().requires_grad_()
    back = tpl.gather_from_sequence_parallel_region(tpl.scatter_to_sequence_parallel_region(t, state), state,
                                                    grad_is_partial=False)
    err["sp_roundtrip"] = _maxdiff(back, x)
    back.sum().backward()
    err["sp_roundtrip_grad"] = _maxdiff(t.grad, torch.ones_like(x))
    err["gather_output"] = _maxdiff(
        tpl.gather_from_tp_region(tpl.scatter_to_tp_region(x, state), state), x)
    return err


def _layers_worker(rank: int, world_size: int) -> list:
    out = []
    for tp in (4, 2):
        for sp in (False, True):
            state = ParallelState.initialize(tp=tp, sequence_parallel=sp, device="cpu")
            out.append(((tp, sp), _layer_errors(state)))
    return out


@pytest.fixture(scope="module")
def layer_results():
    return run_distributed(_layers_worker, 4, timeout=120)


def test_layers_match_single_process(layer_results):
    worst = {}
    for rank_out in layer_results:
        for (tp, sp), errs in rank_out:
            for k, v in errs.items():
                worst[(tp, sp, k)] = max(worst.get((tp, sp, k), 0.0), v)
    bad = {k: v for k, v in worst.items() if not v <= TOL}
    assert not bad, f"tensor-parallel results differ from the single-process reference: {bad}"
    assert len(worst) == 4 * 24  # every check of every configuration reported


def test_counts_once_in_tp_for_norms():
    # tp=4 ranks, a K/V shard held by 2 ranks each: counted on ranks 0 and 2; replicated params on rank 0.
    counted = {"shard": [], "rep": [], "replicated": []}
    for r in range(4):
        st = ParallelState(tp=4, tp_rank=r, world_size=4)
        counted["shard"].append(tpl.ColumnParallelLinear(4, 8, st).param_specs["weight"].counts_once(r))
        counted["rep"].append(tpl.ColumnParallelLinear(4, 8, st, replicas=2).param_specs["weight"].counts_once(r))
        counted["replicated"].append(tpl.RowParallelLinear(8, 4, st).param_specs["bias"].counts_once(r))
    assert counted == {"shard": [True] * 4, "rep": [True, False, True, False],
                       "replicated": [True, False, False, False]}
