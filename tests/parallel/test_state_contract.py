"""The training-state contract: canonical names, global shapes and shards are layout-independent.

For every layout (tp in {1, 2, 4} x pp in {1, 2}, pp 2 with vpp 2, with dp filling the world), a GPT-2-style
model (tied embedding, biases, LayerNorm, learned positions) and a Llama-style one with GQA where tp > n_kv_heads
(K/V shards replicated on 2 ranks at tp 4), and a vocabulary that is padded at every tp:
- the union over ranks of the non-tied sharding specs has exactly the single-process names and global shapes
  (the real vocabulary), and
- assembling every rank's canonical pieces reproduces the single-process initial tensors BIT FOR BIT, each
  element covered exactly once.

Optimizer state after 3 real training steps (the Trainer, fp32), assembled from every rank's canonical
state pieces at dp 2 (zero 0, 1 and 3) and tp 2 x dp 2 (zero 0 and 1), equals the single-process state:
max |a - b| <= 1e-5 * max |b| per tensor (collectives change summation order only; the layout tests use the
same bound). A state assembled at tp 2 x dp 2 and loaded into pp 2 x dp 2 comes back out exactly.

Resume: at dp 2 (zero 1) and tp 2 + sp x dp 2 (zero 1) with dropout, 1 step + state_dict + a fresh Trainer
loading it + 2 steps gives the losses and parameters of 3 steps straight, bit for bit, on every rank.

Final weights: a tp2 x pp2 x dp2 run and the same run in one process write model.safetensors files that are
bit-identical before any update (iters = 0) and, after 3 steps, within the bound above; `tessera generate`
on the bit-identical files prints the same text.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tests.dist_utils import run_distributed

REPO = Path(__file__).resolve().parents[2]
RTOL = 1e-5


def _model_cfgs():
    from engine.config import ModelConfig

    common = dict(vocab_size=61, vocab_pad_multiple=8, d_model=32, n_layers=4, n_heads=4, max_seq_len=16)
    return {
        "gpt2": ModelConfig(**common, norm="layernorm", position="learned", activation="gelu", bias=True,
                            tie_embeddings=True),
        "llama": ModelConfig(**common, n_kv_heads=2, ffn_hidden=64, norm="rmsnorm", position="rope",
                             activation="swiglu", qkv_bias=True),
    }


# ----------------------------------------------------------------------------- parameters


def _shards(pstate, cfg, vpp: int) -> dict:
    """This rank's specs and canonical pieces (data-parallel rank 0 only: the other replicas are copies; one
    tp rank per distinct shard, as the spec says)."""
    from engine.train.build import build_chunks, chunk_specs

    chunks = build_chunks(cfg, pstate, seed=7, vpp=vpp)
    specs = chunk_specs(chunks)
    pieces = []
    if pstate.dp_rank == 0:
        for c in chunks:
            for n, p in c.named_parameters():
                s = specs[n]
                if s.counts_once(pstate.tp_rank):  # one holder per distinct shard; tied copies never
                    pieces += [(s.name, box, v.clone()) for box, v in s.canonical_pieces(p.detach(), pstate.tp_rank)]
    names = {s.name: s.global_shape for s in specs.values() if s.tied_to is None}
    tied = {s.tied_to for s in specs.values() if s.tied_to is not None}
    return {"names": names, "tied": tied, "pieces": pieces}


def _assemble(per_rank_pieces: list, shapes: dict) -> tuple[dict, dict]:
    """Canonical tensors from pieces, with a count of how often each element was written."""
    from engine.parallel.sharding import box_view

    full = {n: torch.zeros(s) for n, s in shapes.items()}
    count = {n: torch.zeros(s, dtype=torch.int32) for n, s in shapes.items()}
    for pieces in per_rank_pieces:
        for name, box, value in pieces:
            box_view(full[name], box).copy_(value)
            box_view(count[name], box).add_(1)
    return full, count


def _reference_params(cfg) -> dict[str, torch.Tensor]:
    from engine.model.transformer import build_model
    from engine.parallel.grad_sync import gather_tensor
    from engine.parallel.state import ParallelState

    model = build_model(cfg, seed=7)
    specs = model.shard_specs()
    return {specs[n].name: gather_tensor(p, specs[n], ParallelState.single()) for n, p in model.named_parameters()}


LAYOUTS_4 = [(4, 1, 1), (2, 2, 1), (1, 2, 1), (1, 2, 2), (2, 1, 1), (1, 1, 1)]  # (tp, pp, vpp); dp = 4 / (tp * pp)
LAYOUTS_8 = [(4, 2, 1), (2, 2, 1)]


def _layout_worker(layouts, rank: int):
    from engine.parallel.state import ParallelState

    out = {}
    for tp, pp, vpp in layouts:
        pstate = ParallelState.initialize(tp=tp, pp=pp, vpp=vpp, device="cpu")
        for name, cfg in _model_cfgs().items():
            out[(name, tp, pp, vpp)] = _shards(pstate, cfg, vpp)
    return out


# ----------------------------------------------------------------------------- optimizer state


def _trainer_tree(out_dir: str, **parallel) -> dict:
    return {
        "model": {"preset": "llama", "vocab_size": 0, "d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
                  "ffn_hidden": 64, "max_seq_len": 16},
        "data": {"tokenizer": "byte", "train": [{"path": "builtin:pydoc"}], "split": "90,10,0",
                 "cache_dir": str(Path(out_dir).parent / "data_cache")},
        "parallel": {"zero": 1, **parallel},
        "train": {"micro_batch_size": 2, "global_batch_size": 8, "iters": 3, "eval_interval": 0,
                  "log_interval": 1, "out_dir": out_dir, "device": "cpu", "tensorboard": False,
                  "progress": False, "sample_prompt": None},
        "optim": {"lr": 3e-3, "warmup_iters": 1, "grad_clip": 0.5},
        "precision": {"dtype": "fp32"},
    }


def _train_state(tree: dict, world: int, pstate=None) -> dict:
    """3 steps with the Trainer; this rank's canonical optimizer-state pieces (dp rank 0 only for zero 0,
    where every dp replica holds the whole state) and the per-tensor steps."""
    from engine.config import config_from_dict
    from engine.parallel.state import ParallelState
    from engine.train.trainer import Trainer

    cfg = config_from_dict(tree, world_size=world)
    p = cfg.parallel
    pstate = pstate or ParallelState.initialize(tp=p.tp, pp=p.pp, vpp=p.vpp, device="cpu")
    trainer = Trainer(cfg, pstate)
    for _ in range(cfg.train.iters):
        trainer.train_step()
    pieces, steps = trainer.optimizer.canonical_state()
    keep = p.zero != 0 or pstate.dp_rank == 0 or not pstate.is_distributed
    return {"pieces": [(x.name, x.key, x.box, x.value.clone()) for x in pieces] if keep else [], "steps": steps,
            "trainer": trainer}


def _assemble_state(per_rank: list[list], shapes: dict) -> tuple[dict, dict]:
    from engine.parallel.sharding import box_view

    full = {(n, k): torch.zeros(s) for n, s in shapes.items() for k in ("exp_avg", "exp_avg_sq", "master")}
    count = {key: torch.zeros(t.shape, dtype=torch.int32) for key, t in full.items()}
    for pieces in per_rank:
        for name, key, box, value in pieces:
            box_view(full[(name, key)], box).copy_(value)
            box_view(count[(name, key)], box).add_(1)
    return full, count


def _resume_case(tree: dict, world: int) -> dict:
    """3 steps straight vs 1 step, state_dict, a fresh Trainer loading it, 2 steps (dropout on)."""
    from engine.config import config_from_dict
    from engine.parallel.state import ParallelState
    from engine.train.trainer import Trainer

    tree["model"]["dropout"] = 0.1
    cfg = config_from_dict(tree, world_size=world)
    p = cfg.parallel

    def trainer() -> Trainer:
        return Trainer(cfg, ParallelState.initialize(tp=p.tp, pp=p.pp, sequence_parallel=p.sequence_parallel,
                                                     device="cpu"))

    straight = trainer()
    ref = [straight.train_step().loss for _ in range(3)]
    first = trainer()
    first.train_step()
    sd = first.state_dict()
    torch.manual_seed(1000 + dist.get_rank())  # a new process would start from other RNG states
    resumed = trainer()
    resumed.load_state_dict(sd)
    got = [resumed.train_step().loss for _ in range(2)]
    same = all(torch.equal(a, b) for a, b in zip(straight.model.parameters(), resumed.model.parameters()))
    return {"ref": ref[1:], "got": got, "params_equal": same}


def _opt_worker(rank: int, world: int, base: str) -> dict:
    out = {}
    if world == 2:
        for zero in (0, 1, 3):
            r = _train_state(_trainer_tree(f"{base}/dp2_z{zero}", zero=zero), world)
            out[f"dp2_zero{zero}"] = (r["pieces"], r["steps"])
        out["resume"] = _resume_case(_trainer_tree(f"{base}/dp2_resume", zero=1), world)
        return out
    out["resume"] = _resume_case(_trainer_tree(f"{base}/tp2dp2_resume", tp=2, sequence_parallel=True, zero=1), world)
    # world 4: tp2 x dp2, zero 0 and 1; then cut the zero-1 state for pp2 x dp2 and read it back
    for zero in (0, 1):
        r = _train_state(_trainer_tree(f"{base}/tp2dp2_z{zero}", tp=2, zero=zero), world)
        out[f"tp2dp2_zero{zero}"] = (r["pieces"], r["steps"])
    gathered = [None] * world
    dist.all_gather_object(gathered, out["tp2dp2_zero1"][0])
    shapes = {n: tuple(s) for n, s in _shapes_from(r["trainer"]).items()}
    full, _ = _assemble_state(gathered, shapes)
    other = _train_state(_trainer_tree(f"{base}/pp2dp2", pp=2, zero=1), world)["trainer"]
    other.optimizer.load_canonical_state(lambda n, k: full[(n, k)], out["tp2dp2_zero1"][1])
    pieces, _ = other.optimizer.canonical_state()
    out["resharded"] = [(x.name, x.key, x.box, x.value.clone()) for x in pieces]
    return out


def _shapes_from(trainer) -> dict:
    return {s.name: s.global_shape for s in trainer.built.specs.values() if s.tied_to is None}


# ----------------------------------------------------------------------------- final weights


def _weights_worker(rank: int, world: int, base: str) -> dict:
    from engine.config import config_from_dict
    from engine.parallel.state import ParallelState
    from engine.train.loop import train

    out = {"layouts": _layout_worker(LAYOUTS_8, rank)}
    for iters in (0, 3):
        tree = _trainer_tree(f"{base}/par_{iters}", tp=2, pp=2, sequence_parallel=True)
        tree["train"]["iters"] = iters
        cfg = config_from_dict(tree, world_size=world)
        pstate = ParallelState.initialize(tp=2, pp=2, sequence_parallel=True, device="cpu")
        train(cfg, pstate)
        dist.barrier()
    return out


# ----------------------------------------------------------------------------- jobs


def _job4(rank: int, world: int, base: str) -> dict:
    return {"layouts": _layout_worker(LAYOUTS_4, rank), "opt": _opt_worker(rank, world, base)}


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    base = tmp_path_factory.mktemp("contract")
    out = {"4": run_distributed(_job4, 4, str(base), timeout=600),
           "2": run_distributed(_opt_worker, 2, str(base), timeout=300),
           "8": run_distributed(_weights_worker, 8, str(base), timeout=600)}
    return base, out


@pytest.mark.parametrize("model", ["gpt2", "llama"])
def test_names_shapes_and_shards_are_layout_independent(jobs, model):
    _, out = jobs
    cfg = _model_cfgs()[model]
    ref = _reference_params(cfg)
    shapes = {n: tuple(t.shape) for n, t in ref.items()}
    assert shapes["embed.weight"] == (61, 32)  # the real vocabulary, not the padded one
    results = [(k, [r["layouts"] for r in out["4"]]) for k in LAYOUTS_4] + \
              [(k, [r["layouts"] for r in out["8"]]) for k in LAYOUTS_8]
    for (tp, pp, vpp), per_rank in results:
        key = (model, tp, pp, vpp)
        names: dict = {}
        for r in per_rank:
            names.update(r[key]["names"])
            assert r[key]["tied"] <= set(shapes), key  # a tied copy points at a canonical tensor
        assert names == shapes, (key, set(names) ^ set(shapes))
        full, count = _assemble([r[key]["pieces"] for r in per_rank], shapes)
        for n, want in ref.items():
            assert torch.equal(count[n], torch.ones_like(count[n])), (key, n, "each element exactly once")
            assert torch.equal(full[n], want), (key, n)


def _single_state(base: Path) -> tuple[dict, dict, dict]:
    r = _train_state(_trainer_tree(str(base / "single")), 1)
    shapes = _shapes_from(r["trainer"])
    full, count = _assemble_state([r["pieces"]], shapes)
    return full, r["steps"], shapes


@pytest.fixture(scope="module")
def single_state(jobs):
    base, _ = jobs
    return _single_state(base)


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return float((a - b).abs().max()) <= RTOL * float(b.abs().max()) + 1e-12


@pytest.mark.parametrize("case", ["dp2_zero0", "dp2_zero1", "dp2_zero3", "tp2dp2_zero0", "tp2dp2_zero1"])
def test_optimizer_state_is_the_single_process_state(jobs, single_state, case):
    _, out = jobs
    ref, ref_steps, shapes = single_state
    per_rank = [r["opt"][case] if "opt" in r else r[case] for r in out["4" if case.startswith("tp") else "2"]]
    full, count = _assemble_state([p for p, _ in per_rank], shapes)
    for key, want in ref.items():
        assert torch.equal(count[key], torch.ones_like(count[key])), (case, key, "each element exactly once")
        assert _close(full[key], want), (case, key, float((full[key] - want).abs().max()))
    for _, steps in per_rank:
        assert all(steps[n] == ref_steps[n] == 3.0 for n in steps), (case, steps)


def test_optimizer_state_cut_for_another_layout(jobs, single_state):
    _, out = jobs
    _, _, shapes = single_state
    a, _ = _assemble_state([r["opt"]["tp2dp2_zero1"][0] for r in out["4"]], shapes)
    b, count = _assemble_state([r["opt"]["resharded"] for r in out["4"]], shapes)
    for key in a:
        assert torch.equal(count[key], torch.ones_like(count[key])), (key, "each element exactly once")
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("job", ["2", "4"], ids=["dp2_zero1", "tp2_sp_dp2_zero1"])
def test_trainer_resumes_bit_for_bit_in_parallel(jobs, job):
    _, out = jobs
    for r in out[job]:
        res = (r["opt"] if "opt" in r else r)["resume"]
        assert res["got"] == res["ref"] and res["params_equal"], res


def _load(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _single_run(base: Path, iters: int) -> Path:
    from engine.config import config_from_dict
    from engine.train.loop import train

    tree = _trainer_tree(str(base / f"one_{iters}"))
    tree["train"]["iters"] = iters
    train(config_from_dict(tree, world_size=1))
    return base / f"one_{iters}"


def _generate(run: Path, *extra: str) -> str:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "engine", "generate", str(run), "--prompt", "The ", "--max-tokens",
                           "24", "--seed", "3", *extra], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_parallel_run_writes_the_single_process_weights(jobs):
    base, _ = jobs
    for iters in (0, 3):
        par, one = _load(base / f"par_{iters}" / "model.safetensors"), _load(_single_run(base, iters) / "model.safetensors")
        assert par.keys() == one.keys() and par["embed.weight"].shape == (257, 32)
        for n, want in one.items():
            if iters == 0:
                assert torch.equal(par[n], want), n
            else:
                assert _close(par[n], want), (n, float((par[n] - want).abs().max()))
    assert _generate(base / "par_0") == _generate(base / "one_0")
    greedy = ("--temperature", "0")
    text = _generate(base / "par_3", *greedy)
    assert text == _generate(base / "one_3", *greedy) and len(text) > len("The ")
