"""Data parallel: grad buffers + bucketed overlapped reduction, ZeRO-1, grad-norm/clipping across layouts.

Reference = one process, the same global batch, torch.optim.AdamW and torch.nn.utils.clip_grad_norm_.
Tolerance: 1e-6 relative (max |a-b| / max |b| per tensor) after 3 AdamW steps with clipping; grads differ
from the reference only by summation order. Spawned jobs run several cases each (start-up dominates).
"""

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # repo root, so `tests.dist_utils` imports
from engine.optim.adamw import param_groups  # noqa: E402
from engine.optim.clip import clip_grad_norm, grad_norm, grad_norm_squared, reduce_norm_squared  # noqa: E402
from engine.optim.optimizer import Optimizer  # noqa: E402
from engine.parallel.data_parallel import DataParallel  # noqa: E402
from engine.parallel.pipeline.tied import allreduce_tied_embedding_grad, sync_tied_embedding  # noqa: E402
from engine.parallel.sharding import ShardSpec, collect_specs, replicated  # noqa: E402
from engine.parallel.state import ParallelState  # noqa: E402
from engine.train.build import wrap_data_parallel  # noqa: E402
from tests.dist_utils import run_distributed  # noqa: E402

V, D, H, T = 16, 8, 16, 4  # vocab, width, mlp width, sequence length
GLOBAL_BATCH, STEPS, LR, MAX_NORM, TOL = 8, 3, 1e-2, 0.5, 1e-6


class TinyLM(nn.Module):
    """Transformer-like: embedding tied to the head, norms, biases, and a layer that never gets a grad."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.norm1 = nn.LayerNorm(D)
        self.fc1 = nn.Linear(D, H)
        self.fc2 = nn.Linear(H, D)
        self.norm2 = nn.LayerNorm(D)
        self.unused = nn.Linear(D, D)
        self.head = nn.Linear(D, V, bias=False)
        self.head.weight = self.emb.weight  # tied

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T) token ids
        h = self.emb(x)  # (B, T, D)
        h = h + self.fc2(F.gelu(self.fc1(self.norm1(h))))
        return self.head(self.norm2(h))  # (B, T, V)


def optimizer_for(ddp: DataParallel, model: nn.Module, lr: float = LR, weight_decay: float = 0.0) -> Optimizer:
    """The engine's one optimizer over a DataParallel's segments (plain torch modules: replicated specs)."""
    return Optimizer(ddp.segments(), collect_specs(model, default_replicated=True), ddp.pstate, lr=lr,
                     weight_decay=weight_decay, grads_sharded=ddp.shard_grads and ddp.dp > 1,
                     after_step=ddp.sync_params, zero_grad=ddp.zero_grad)


def make_model() -> TinyLM:
    torch.manual_seed(0)
    return TinyLM()


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randint(0, V, (GLOBAL_BATCH, T), generator=g), torch.randint(0, V, (GLOBAL_BATCH, T), generator=g))
            for _ in range(STEPS)]


def loss_fn(model, x, y) -> torch.Tensor:
    return F.cross_entropy(model(x).reshape(-1, V), y.reshape(-1))


def reference_run() -> tuple[list[float], dict[str, torch.Tensor]]:
    model = make_model()
    opt = torch.optim.AdamW(param_groups(model.named_parameters(), 0.1), lr=LR, foreach=False)
    norms = []
    for x, y in batches():
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        for p in model.parameters():  # DataParallel semantics: a param without grad has a zero grad
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)))
        opt.step()
    return norms, {k: v.detach().clone() for k, v in model.state_dict().items()}


def dp_run(state: ParallelState, zero: int, accum: int, overlap: bool, bucket_size: int):
    """Train STEPS steps on this dp rank's part of each global batch; returns (norms, params, ddp, opt)."""
    model = make_model()
    cfg = SimpleNamespace(parallel=SimpleNamespace(zero=zero),
                          optim=SimpleNamespace(lr=LR, betas=[0.9, 0.999], eps=1e-8, weight_decay=0.1))
    specs = collect_specs(model, default_replicated=True)
    ddp, opt = wrap_data_parallel([model], specs, cfg, state, bucket_size=bucket_size, overlap=overlap)
    per_rank = GLOBAL_BATCH // state.dp
    mb = per_rank // accum
    norms = []
    for x, y in batches():
        x = x[state.dp_rank * per_rank:(state.dp_rank + 1) * per_rank]
        y = y[state.dp_rank * per_rank:(state.dp_rank + 1) * per_rank]
        opt.zero_grad()
        for i in range(accum):
            with ddp.no_sync(enabled=i < accum - 1):
                (loss_fn(ddp, x[i * mb:(i + 1) * mb], y[i * mb:(i + 1) * mb]) / accum).backward()
        ddp.finish_grad_sync()
        norms.append(opt.clip_grad_norm(MAX_NORM))
        opt.step()
    return norms, full_state(model), ddp, opt


def full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    # FSDP2 (zero=3) parameters are DTensors: gather them to compare with the reference.
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
            for k, v in model.state_dict().items()}


def max_rel_err(ours: dict, ref: dict) -> float:
    return max(float((ours[k] - ref[k]).abs().max() / ref[k].abs().max().clamp_min(1e-12)) for k in ref)


CASES = [  # (zero, accum, overlap, bucket_size in elements)
    (0, 1, True, 100),
    (0, 2, True, 100),
    (1, 2, True, 100),
    (1, 1, False, 10 ** 6),
    (3, 2, True, 100),  # FSDP2 fully_shard behind the same interface
]


def _dp_cases(rank: int, world: int) -> dict:
    state = ParallelState.initialize(dp=world, device="cpu")
    out = {}
    for case in CASES:
        norms, params, ddp, opt = dp_run(state, *case)
        out[case] = {"norms": norms, "params": params, "state_bytes": opt.state_bytes(),
                     "buckets": len(getattr(ddp, "buckets", [])) if case[0] != 3 else -1}
    # Sharded checkpoint round trip: save after 3 steps, load into a fresh optimizer, both take step 4.
    _, _, ddp, opt = dp_run(state, 1, 1, True, 100)
    sd = opt.state_dict()
    model2 = make_model()
    model2.load_state_dict(ddp.modules[0].state_dict())
    ddp2 = DataParallel(model2, state, bucket_size=100, shard_grads=True)
    opt2 = optimizer_for(ddp2, model2, weight_decay=0.1)
    opt2.load_state_dict(sd)
    x, y = batches()[0]
    for d, o in ((ddp, opt), (ddp2, opt2)):
        o.zero_grad()
        per = GLOBAL_BATCH // world
        loss_fn(d, x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]).backward()
        d.finish_grad_sync()
        o.step()
    out["resume_diff"] = max_rel_err(model2.state_dict(), ddp.modules[0].state_dict())
    out["ckpt_bytes_equal"] = opt2.state_bytes() == opt.state_bytes()
    if world == 4:
        out["tp_pp_norm"] = _tp_pp_norm_case(rank)
        out["pp_tied"] = {zero: _pp_tied_case(zero) for zero in (0, 1)}
    return out


class _Holder(nn.Module):
    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.clone())


class _Stage(nn.Module):
    """One of two 'pipeline stages' that both use the tied table E (D x D here) and their own layer.

    E sits where the real model keeps a tied embedding (`embed.weight` on the first stage, a `head.weight`
    copy on the last, whose spec says `tied_to="embed.weight"`), and the test drives the pipeline's own
    functions on it (sync_tied_embedding, allreduce_tied_embedding_grad), not a copy of them."""

    def __init__(self, stage: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        e, a, b = torch.randn(D, D), torch.randn(D, D), torch.randn(D)
        if stage == 0:
            self.embed = _Holder(e)
        else:
            self.head = _Holder(e)
        self.own = nn.Parameter((a if stage == 0 else b).clone())
        self.stage = stage
        if stage == 1:  # as Transformer.shard_specs() marks a last stage's tied head
            self.param_specs = {"head.weight": ShardSpec("head.weight", (D, D), tied_to="embed.weight")}

    @property
    def tied(self) -> nn.Parameter:
        return self.embed.weight if self.stage == 0 else self.head.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, D) -> this stage's term of the loss
        if self.stage == 0:
            return torch.tanh(x @ self.tied @ self.own).square().mean()
        return torch.sin(x @ self.tied.t() + self.own).square().mean()


def _pp_tied_run(stages: list, x_parts: list, ddp, opt, state=None) -> None:
    for step in range(STEPS):
        opt.zero_grad()
        with ddp.no_sync():  # as the pipeline executor: hold the dp reduction for the whole schedule
            loss = sum(st(x) for st, x in zip(stages, x_parts[step]))
            loss.backward()
            if state is not None:  # the trainer's call: sum the tied copies' main grads over the two stages
                allreduce_tied_embedding_grad(ddp.main_grad(stages[0].tied), state)
        ddp.finish_grad_sync()
        opt.clip_grad_norm(0.05)
        opt.step()


def _pp_tied_case(zero: int) -> float:
    """pp=2 x dp=2: the tied table's grad is the sum over both stages and the mean over dp; compared with
    one process holding both stages and one table."""
    state = ParallelState.initialize(pp=2, dp=2, device="cpu")
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(8, D, generator=g) for _ in range(STEPS)]  # global batch per step
    # reference: one table, both terms, full batch
    s0, s1 = _Stage(0), _Stage(1)
    s1.head.weight = s0.embed.weight
    ref_model = nn.ModuleList([s0, s1])
    ref_ddp = DataParallel(ref_model, ParallelState.single(), bucket_size=10)
    ref_opt = optimizer_for(ref_ddp, ref_model, weight_decay=0.1)
    _pp_tied_run([s0, s1], [[x, x] for x in xs], ref_ddp, ref_opt)
    # this rank: its stage only, its half of the batch; the pipeline's own set-up makes the copies equal,
    # and the copy's spec (tied_to) keeps it out of the grad norm
    st = _Stage(state.pp_rank)
    with torch.no_grad():
        st.tied.mul_(1.0 + state.pp_rank)  # a different start on stage 1: sync_tied_embedding must fix it
    sync_tied_embedding(st.tied, state)
    ddp = DataParallel(st, state, bucket_size=10, shard_grads=zero == 1)
    opt = optimizer_for(ddp, st, weight_decay=0.1)
    half = [x[state.dp_rank * 4:(state.dp_rank + 1) * 4] for x in xs]
    _pp_tied_run([st], [[x] for x in half], ddp, opt, state)
    ref = {"tied": s0.tied, "own": (s0 if state.pp_rank == 0 else s1).own}
    return max(float((getattr(st, k).detach() - v.detach()).abs().max() / v.detach().abs().max())
               for k, v in ref.items())


def _tp_pp_norm_case(rank: int) -> tuple[float, float]:
    """pp=2 x tp=2: tp-sharded weights, tp-replicated norms, an embedding tied across the two stages; the
    norm code the optimizer uses (grad_norm_squared + reduce_norm_squared), driven by the specs."""
    state = ParallelState.initialize(tp=2, pp=2, dp=1, device="cpu")
    g = torch.Generator().manual_seed(5)
    W = [torch.randn(8, 6, generator=g) for _ in range(2)]  # per stage, split over tp along dim 0
    n = [torch.randn(6, generator=g) for _ in range(2)]  # per stage, replicated over tp
    E = torch.randn(D, D, generator=g)  # on the first and last stage (tied), replicated over tp
    expected = (sum(w.square().sum() for w in W) + sum(v.square().sum() for v in n) + E.square().sum()).sqrt()
    s, t = state.pp_rank, state.tp_rank
    pieces = [(W[s].chunk(2, 0)[t].clone(), ShardSpec(f"w{s}", (8, 6), split_dim=0, split_sizes=(8,), tp=2)),
              (n[s].clone(), replicated(f"n{s}", (6,), tp=2)),
              (E.clone(), ShardSpec("embed.weight", (D, D), tp=2, tied_to=None if s == 0 else "embed.weight"))]
    sq = reduce_norm_squared(grad_norm_squared(pieces, state), state)
    return float(sq.sqrt()), float(expected)


@pytest.fixture(scope="module")
def reference():
    return reference_run()


@pytest.fixture(scope="module")
def single_runs():
    """Every case in one process (dp=1): case -> (norms, params, optimizer-state bytes)."""
    out = {}
    for case in CASES:
        norms, params, _, opt = dp_run(ParallelState.single(), *case)
        out[case] = (norms, params, opt.state_bytes())
    return out


@pytest.mark.parametrize("world", [2, 4])
def test_data_parallel_matches_single_process(world, reference, single_runs):
    ref_norms, ref_params = reference
    results = run_distributed(_dp_cases, world, timeout=180)
    for case in CASES:
        per_rank = [r[case] for r in results]
        for r in per_rank:
            assert max_rel_err(r["params"], ref_params) < TOL, case
            assert r["norms"] == pytest.approx(ref_norms, rel=TOL), case
        assert per_rank[0]["buckets"] != 1 or case[3] > 1000, "small bucket_size must give several buckets"
        zero = case[0]
        ratio = max(r["state_bytes"] for r in per_rank) / single_runs[case][2]
        if zero in (1, 3):  # 1/dp of the moments, plus padding and per-segment step counters
            assert ratio < 1.0 / world * 1.25, (case, ratio)
        else:
            assert ratio == 1.0
    for r in results:
        assert r["resume_diff"] == 0.0 and r["ckpt_bytes_equal"]
    if world == 4:
        for got, want in (r["tp_pp_norm"] for r in results):
            assert got == pytest.approx(want, rel=1e-6)
        for r in results:
            assert max(r["pp_tied"].values()) < TOL, r["pp_tied"]


# ----------------------------------------------------------------------------- one process


def test_single_process_matches_torch(reference, single_runs):
    ref_norms, ref_params = reference
    for case in CASES:
        norms, params, _ = single_runs[case]
        assert max_rel_err(params, ref_params) < TOL, case
        assert norms == pytest.approx(ref_norms, rel=TOL)


def test_buffer_layout_tied_unused_and_accumulation():
    model = make_model()
    ddp = DataParallel(model, ParallelState.single(), bucket_size=100)
    params = list(model.parameters())  # the tied weight appears once
    assert len(ddp.params) == len(params) == len({id(p) for p in params})
    assert sum(b.numel for b in ddp.buckets) == ddp.buffers[0].numel >= sum(p.numel() for p in params)
    for p in params:
        assert ddp.main_grad(p).data_ptr() >= ddp.buffers[0].grad.data_ptr()
    x, y = batches()[0]
    ref = make_model()
    loss_fn(ref, x[:4], y[:4]).backward()
    loss_fn(ref, x[4:], y[4:]).backward()
    ddp.zero_grad()
    with ddp.no_sync():
        loss_fn(ddp, x[:4], y[:4]).backward()
    loss_fn(ddp, x[4:], y[4:]).backward()
    ddp.finish_grad_sync()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert p.grad is None  # moved into the buffer by the hook
        if q.grad is None:
            assert name.startswith("unused") and ddp.main_grad(p).abs().sum() == 0
        else:
            torch.testing.assert_close(ddp.main_grad(p), q.grad, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("overlap, sync, launched_early", [(True, True, True), (False, True, False),
                                                          (True, False, False)])
def test_buckets_launch_during_backward(overlap, sync, launched_early):
    """With overlap, later layers' buckets are launched before backward reaches the embedding."""
    model = make_model()
    # A never-used parameter holds back its bucket and, since buckets launch in order, all later ones
    # until finish_grad_sync (documented limitation): leave it out of the buffers here.
    model.unused.requires_grad_(False)
    ddp = DataParallel(model, ParallelState.single(), bucket_size=50, overlap=overlap)
    seen = []
    x, y = batches()[0]
    h = model.emb(x)  # (B, T, D): its grad hook runs before the embedding's own grad is accumulated
    h.register_hook(lambda g: seen.append(ddp._next_launch))
    logits = model.head(model.norm2(h + model.fc2(F.gelu(model.fc1(model.norm1(h))))))
    ddp.zero_grad()
    with ddp.no_sync(enabled=not sync):
        F.cross_entropy(logits.reshape(-1, V), y.reshape(-1)).backward()
    assert len(ddp.buckets) > 2 and (seen[0] > 0) == launched_early
    if sync:
        ddp.finish_grad_sync()


def test_clip_grad_norm_equals_torch():
    a, b = make_model(), make_model()
    x, y = batches()[0]
    for m in (a, b):
        (loss_fn(m, x, y) * 10).backward()
    params_a = [p for p in a.parameters() if p.grad is not None]
    params_b = [p for p in b.parameters() if p.grad is not None]
    want = float(torch.nn.utils.clip_grad_norm_(params_a, 0.1))
    got = clip_grad_norm(params_b, 0.1)
    assert got == pytest.approx(want, rel=1e-6) and got > 0.1
    for p, q in zip(params_a, params_b):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-6, atol=1e-8)
    assert clip_grad_norm(params_b, 0.0) == pytest.approx(grad_norm(params_b))  # 0 = measure only


def test_bf16_params_get_fp32_main_grads_and_masters():
    model = make_model().to(torch.bfloat16)
    state = ParallelState.single()
    ddp = DataParallel(model, state, bucket_size=100, shard_grads=True)
    opt = optimizer_for(ddp, model)
    assert all(ddp.main_grad(p).dtype == torch.float32 for p in model.parameters())
    x, y = batches()[0]
    before = model.fc1.weight.detach().clone()
    opt.zero_grad()
    loss_fn(ddp, x, y).float().backward()
    ddp.finish_grad_sync()
    opt.step()
    assert not torch.equal(before, model.fc1.weight)
    # fp32 masters: 4 bytes/element on top of the two fp32 moments
    n = sum(p.numel() for p in ddp.params)
    assert opt.state_bytes() >= 12 * n
    sd = opt.state_dict()
    assert len(sd["slots"]) == len(opt.slots) and all(x["master"].dtype == torch.float32 for x in sd["slots"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_zero1_single_process():
    """Buffers on the parameters' device, fp32 main grads/masters for bf16 params, close to an fp32 run."""
    ref_norms, ref_params = reference_run()
    model = make_model().cuda().to(torch.bfloat16)
    ddp = DataParallel(model, ParallelState.single("cuda"), bucket_size=100, shard_grads=True)
    opt = optimizer_for(ddp, model, weight_decay=0.1)
    assert ddp.buffers[0].grad.is_cuda and ddp.buffers[0].grad.dtype == torch.float32
    norms = []
    for x, y in batches():
        opt.zero_grad()
        loss_fn(ddp, x.cuda(), y.cuda()).float().backward()
        ddp.finish_grad_sync()
        norms.append(opt.clip_grad_norm(MAX_NORM))
        opt.step()
    assert norms == pytest.approx(ref_norms, rel=5e-2)  # bf16 forward/backward
    got = {k: v.float().cpu() for k, v in model.state_dict().items()}
    assert max_rel_err(got, ref_params) < 5e-2
