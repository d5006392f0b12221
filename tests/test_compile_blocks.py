"""train.compile: torch.compile of every Transformer block (engine/train/build.wrap_blocks), alone and with
activation recompute, at pp=1 and pp=2 (gloo), against the eager model.

Compiled (inductor, fp32, CPU) and eager kernels sum in other orders: losses and gradients agree to ~1e-7
relative here; the bound is 1e-5 relative per tensor (as the pipeline tests). Compiled dropout draws its masks
from inductor's own generator (seeded from torch's), so compiled-vs-eager comparisons run with dropout 0, and
recompute under compile is checked with dropout ON against the compiled run without recompute (equal bit for
bit when the graphs are the same). Compiling costs ~20-60 s per graph on the 2-core CPU machine, so
everything that compiles is marked slow; the structural checks (nothing compiled) run by default.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repo root, so `tests.dist_utils` imports
from tests.dist_utils import run_distributed  # noqa: E402

from engine.config import ConfigError, ModelConfig, config_from_dict  # noqa: E402
from engine.parallel.recompute import is_checkpointed  # noqa: E402
from engine.parallel.state import ParallelState  # noqa: E402

RTOL = 1e-5
MB, SEQ, VOCAB = 2, 16, 61


def _cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=VOCAB, vocab_pad_multiple=8, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                ffn_hidden=64, max_seq_len=32, dropout=0.0)
    base.update(kw)
    return ModelConfig(**base)


def _batches(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    from engine.train.step import split_batch

    g = torch.Generator().manual_seed(seed)
    return [split_batch({"tokens": torch.randint(0, VOCAB, (MB, SEQ + 1), generator=g)}, torch.device("cpu"))
            for _ in range(n)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _grads(modules) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for m in modules for n, p in m.named_parameters() if p.grad is not None}


def _errors(a: dict, b: dict) -> dict[str, float]:
    assert a["grads"].keys() == b["grads"].keys()
    return {"loss": max(abs(x - y) / abs(y) for x, y in zip(a["losses"], b["losses"])),
            "grad": max(_rel(a["grads"][n], b["grads"][n]) for n in a["grads"]),
            "eval": max(abs(x - y) / abs(y) for x, y in zip(a["eval"], b["eval"]))}


def _single(mode: str, compile: bool, cfg: ModelConfig, seed: int = 11, disable_core: bool = False) -> dict:
    """One accumulated step and an evaluation (eval mode, no_grad) of the whole model in one process.
    disable_core: put the attention core behind torch.compiler.disable without recompute (the graph break
    selective recompute makes under compile), the reference for selective + compile with dropout."""
    from engine.model.transformer import build_model
    from engine.parallel.random import seed_parallel_rng
    from engine.train.build import wrap_blocks
    from engine.train.step import forward_backward, forward_only

    ps = ParallelState.single()
    model = build_model(cfg, ps, seed=3)
    if disable_core:
        for block in model.layers.values():
            block.attn.core = torch.compiler.disable(block.attn.core)
    wrap_blocks([model], ps, recompute=mode, compile=compile)
    seed_parallel_rng(seed, ps)
    losses = forward_backward(model, _batches(2), cfg.vocab_size, contextlib.nullcontext)
    model.eval()
    ev = forward_only(model, _batches(1, seed=5), cfg.vocab_size, contextlib.nullcontext)
    model.train()
    return {"losses": losses, "grads": _grads([model]), "eval": ev}


# --------------------------------------------------------------------------- structure (nothing compiled)


def test_compile_wraps_each_block_in_place():
    """Blocks get a compiled forward of their own; names, state and the chunk's forward stay; in eval mode the
    blocks run eagerly, so an evaluation compiles nothing."""
    from torch._dynamo.utils import counters

    from engine.model.transformer import Transformer, build_model
    from engine.train.build import wrap_blocks

    model = build_model(_cfg())
    names = list(model.state_dict())
    wrap_blocks([model], ParallelState.single(), compile=True)
    assert list(model.state_dict()) == names
    assert all("forward" in vars(b) for b in model.layers.values())  # per block, on the instance
    assert "forward" not in vars(model) and type(model).forward is Transformer.forward  # not the whole chunk
    before = sum(counters["stats"].values())
    model.eval()
    with torch.no_grad():
        out = model(_batches(1)[0]["inputs"])
    assert out.shape[:2] == (MB, SEQ) and sum(counters["stats"].values()) == before


def test_compile_with_recompute_order():
    """full: the checkpoint wraps the compiled forward; selective: the recomputed core sits behind
    torch.compiler.disable inside the compiled block."""
    from engine.model.transformer import build_model
    from engine.train.build import wrap_blocks

    model = build_model(_cfg())
    wrap_blocks([model], ParallelState.single(), recompute="full", compile=True)
    for b in model.layers.values():
        assert is_checkpointed(b.forward)
    model = build_model(_cfg())
    wrap_blocks([model], ParallelState.single(), recompute="selective", compile=True)
    for b in model.layers.values():
        assert is_checkpointed(b.attn.core) and not is_checkpointed(b.forward)
        assert getattr(b.attn.core, "_torchdynamo_disable", False)  # a graph break, not traced


def test_config_compile_with_pipeline_parallel():
    tree = {"model": {"n_layers": 4}, "train": {"compile": True}}
    for schedule in ("1f1b", "gpipe"):
        cfg = config_from_dict({**tree, "parallel": {"pp": 2, "schedule": schedule}})
        assert cfg.train.compile and cfg.parallel.pp == 2
    cfg = config_from_dict({**tree, "parallel": {"pp": 2, "vpp": 2, "schedule": "interleaved"}})
    assert cfg.parallel.vpp == 2
    with pytest.raises(ConfigError, match="train.compile=true with parallel.schedule=zb: .*expected parallel.schedule "
                                          "1f1b, gpipe or interleaved"):
        config_from_dict({**tree, "parallel": {"pp": 2, "schedule": "zb"}})
    assert config_from_dict({**tree, "train": {"compile": True, "recompute": "full"}}).train.recompute == "full"


# --------------------------------------------------------------------------- compiled (slow)


@pytest.mark.slow
def test_compiled_blocks_match_eager_one_process():
    from torch._dynamo.utils import counters

    cfg = _cfg(n_layers=3)
    ref = _single("none", False, cfg)
    graphs = counters["stats"]["unique_graphs"]
    for mode in ("none", "full", "selective"):
        err = _errors(_single(mode, True, cfg), ref)
        assert err["loss"] <= RTOL and err["grad"] <= RTOL and err["eval"] <= RTOL, (mode, err)
    # one set of graphs serves all 3 blocks (no recompile per block): none 1 graph, full +1 (the checkpoint's
    # no_grad forward), selective +4 (the block and the attention, each cut in two by the core's graph break)
    assert counters["stats"]["unique_graphs"] - graphs <= 6


@pytest.mark.slow
def test_recompute_under_compile_with_dropout():
    """Dropout ON: the recompute replays inductor's masks too (they are seeded from torch's generator, which
    the checkpoint restores)."""
    cfg = _cfg(dropout=0.2)
    ref = _single("none", True, cfg)
    full = _single("full", True, cfg)
    assert full["losses"] == ref["losses"] and all(torch.equal(full["grads"][n], ref["grads"][n]) for n in ref["grads"])
    # selective adds a graph break around the core (other graphs, other draws): same breaks without recompute
    ref_sel = _single("none", True, cfg, disable_core=True)
    sel = _single("selective", True, cfg)
    assert sel["losses"] == ref_sel["losses"]
    assert max(_rel(sel["grads"][n], ref_sel["grads"][n]) for n in sel["grads"]) <= RTOL


def _pp_run(ps, cfg, mode: str, compile: bool, schedule: str) -> dict:
    from engine.model.loss import lm_loss
    from engine.parallel.pipeline.executor import forward_backward_pipeline, forward_only_pipeline
    from engine.train.build import build_chunks, wrap_blocks

    chunks = build_chunks(cfg, ps, seed=3)
    wrap_blocks(chunks, ps, recompute=mode, compile=compile)
    loss_fn = lambda logits, b: lm_loss(logits, b["targets"], cfg.vocab_size, pstate=ps)  # noqa: E731
    kw = dict(loss_fn=loss_fn, seq_len=SEQ, micro_batch_size=MB, d_model=cfg.d_model)
    losses = forward_backward_pipeline(chunks, _batches(4), ps, schedule=schedule, **kw)
    for c in chunks:
        c.eval()
    ev = forward_only_pipeline(chunks, _batches(2, seed=5), ps, **kw)
    return {"losses": losses, "grads": _grads(chunks), "eval": ev}


def _pp_job(rank: int, world: int) -> dict:
    cfg = _cfg()
    ps = ParallelState.initialize(tp=1, pp=2, dp=1, device="cpu")
    ref = _pp_run(ps, cfg, "none", False, "1f1b")
    return {mode: _errors(_pp_run(ps, cfg, mode, True, "1f1b"), ref) for mode in ("none", "full")}


@pytest.mark.slow
def test_compiled_blocks_match_eager_pp2():
    for rank, res in enumerate(run_distributed(_pp_job, 2, timeout=900)):
        for mode, err in res.items():
            assert err["loss"] <= RTOL and err["grad"] <= RTOL and err["eval"] <= RTOL, (rank, mode, err)
