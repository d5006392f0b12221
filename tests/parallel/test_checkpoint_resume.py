"""Checkpoints through torch.distributed.checkpoint: exact resume and resharding (gloo, CPU).

Exact resume (bit for bit): a tp2 x pp2 x dp2 zero-1 run with dropout 0.1 and fp16 loss scaling saves at step
2 (async: the run goes on training while the write runs), and a fresh Trainer that loads the checkpoint
gives the losses and the final parameters of the run that never stopped, exactly. The same in one process.

A tp2 x pp2 GPT-2 whose head is tied to the embedding across stages resumes exactly too, and its checkpoint
(one embedding tensor) continues in one process.

Resharding: a tp2 x pp2 x dp2 zero-1 checkpoint (fp32, no dropout) continues at tp1 x pp1 x dp1 (one
process), tp1 x pp4, dp4 zero 1, dp4 zero 3 (FSDP2) and pp2 x vpp2 x dp2 zero 0; a tp4 checkpoint with GQA
(tp > n_kv_heads: K/V shards replicated on 2 ranks) continues at tp2 x dp2. The next 5 losses match the
uninterrupted run within 1e-5 relative: the layouts differ only in the order of summations (the bound of
the layout-equivalence tests), and a wrong optimizer state, LR position or data position would be far off
(the losses move by ~1e-2 per step here).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tests.dist_utils import run_distributed

RTOL = 1e-5
SAVE_AT, AFTER = 2, 5


GPT2 = {"norm": "layernorm", "position": "learned", "activation": "gelu", "bias": True, "tie_embeddings": True,
        "n_kv_heads": None, "ffn_hidden": 128}


def _tree(out_dir: str, dropout: float = 0.0, dtype: str = "fp32", model: dict | None = None, **parallel) -> dict:
    return {
        "model": {"preset": "tiny", "vocab_size": 300, "vocab_pad_multiple": 8, "d_model": 32, "n_layers": 4,
                  "n_heads": 4, "n_kv_heads": 2, "ffn_hidden": 64, "max_seq_len": 16, "dropout": dropout,
                  **(model or {})},
        "data": {"tokenizer": "byte", "train": [{"path": "builtin:pydoc"}], "split": "90,10,0",
                 "cache_dir": str(Path(out_dir).parent / "data_cache")},
        "parallel": {"zero": 1, **parallel},
        "train": {"micro_batch_size": 2, "global_batch_size": 8, "iters": SAVE_AT + AFTER, "eval_interval": 0,
                  "log_interval": 1, "out_dir": out_dir, "device": "cpu", "tensorboard": False,
                  "progress": False},
        "optim": {"lr": 3e-3, "warmup_iters": 1, "grad_clip": 0.5},
        "precision": {"dtype": dtype, "initial_loss_scale": 2.0 ** 12, "loss_scale_window": 2},
    }


def _trainer(tree: dict, world: int):
    from engine.config import config_from_dict
    from engine.parallel.state import ParallelState
    from engine.train.trainer import Trainer

    cfg = config_from_dict(tree, world_size=world)
    p = cfg.parallel
    pstate = ParallelState.initialize(tp=p.tp, pp=p.pp, vpp=p.vpp, sequence_parallel=p.sequence_parallel,
                                      device="cpu") if world > 1 else ParallelState.single("cpu")
    return Trainer(cfg, pstate)


def _save(trainer, root: str, async_save: bool = False):
    from engine.checkpoint.manager import CheckpointSaver
    from engine.train.checkpointing import checkpoint_meta, trainer_checkpoint_state
    import json

    saver = CheckpointSaver(Path(root), keep=0, async_save=async_save, log=lambda s: None)
    pieces, tensors = trainer_checkpoint_state(trainer)
    meta = json.dumps(checkpoint_meta(trainer, [])).encode()
    saver.save(trainer.iteration, pieces, tensors, lambda: meta)
    return saver


def _params(trainer) -> dict:
    """This rank's parameters without the vocabulary padding rows (a runtime detail no checkpoint holds)."""
    specs, r = trainer.built.specs, trainer.pstate.tp_rank
    return {n: torch.cat([v.flatten() for _, v in specs[n].canonical_pieces(p.detach(), r)])
            for c in trainer.chunks for n, p in c.named_parameters()}


def _straight_with_save(tree: dict, world: int, root: str, async_save: bool = False) -> dict:
    """Train SAVE_AT steps, save, train AFTER more (the uninterrupted run, which saved on the way)."""
    t = _trainer(tree, world)
    losses = [t.train_step().loss for _ in range(SAVE_AT)]
    saver = _save(t, root, async_save)
    losses += [t.train_step().loss for _ in range(AFTER)]  # async: while the write runs
    saver.close()
    out = {"losses": losses, "params": _params(t), "failed": saver.last.error is not None}
    t.close()
    return out


def _resumed(tree: dict, world: int, root: str) -> dict:
    from engine.train.checkpointing import load_checkpoint

    torch.manual_seed(1000 + (dist.get_rank() if dist.is_initialized() else 0))  # a new process: other RNG states
    t = _trainer(tree, world)
    load_checkpoint(t, root)
    losses = [t.train_step().loss for _ in range(AFTER)]
    out = {"losses": losses, "params": _params(t), "iteration": t.iteration}
    t.close()
    return out


def _job8(rank: int, world: int, base: str) -> dict:
    exact = _tree(f"{base}/exact", dropout=0.1, dtype="fp16", tp=2, pp=2)
    out = {"exact_ref": _straight_with_save(exact, world, f"{base}/ck_exact", async_save=True)}
    out["exact_got"] = _resumed(exact, world, f"{base}/ck_exact")
    out["reshard_ref"] = _straight_with_save(_tree(f"{base}/src", tp=2, pp=2), world, f"{base}/ck_src")
    out["reshard_ref"].pop("params")
    return out


def _job4(rank: int, world: int, base: str) -> dict:
    out = {}
    for name, par in {"tp1_pp4": {"pp": 4}, "dp4_zero1": {}, "dp4_zero3": {"zero": 3},
                      "pp2_vpp2_dp2_zero0": {"pp": 2, "vpp": 2, "schedule": "interleaved", "zero": 0}}.items():
        out[name] = _resumed(_tree(f"{base}/{name}", **par), world, f"{base}/ck_src")["losses"]
    out["tp4_ref"] = _straight_with_save(_tree(f"{base}/tp4", tp=4), world, f"{base}/ck_tp4")["losses"]
    out["tp2_dp2_from_tp4"] = _resumed(_tree(f"{base}/tp2dp2", tp=2), world, f"{base}/ck_tp4")["losses"]
    # GPT-2 with the embedding tied to the head across pipeline stages (the last stage holds a copy)
    gpt = _tree(f"{base}/gpt", model=GPT2, tp=2, pp=2)
    out["gpt_ref"] = _straight_with_save(gpt, world, f"{base}/ck_gpt")
    out["gpt_got"] = _resumed(gpt, world, f"{base}/ck_gpt")
    return out


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    base = tmp_path_factory.mktemp("ckpt")
    out = {"8": run_distributed(_job8, 8, str(base), timeout=600)}
    out["4"] = run_distributed(_job4, 4, str(base), timeout=600)
    # one process, no process group: the exact resume, and the tp2 x pp2 x dp2 checkpoint read whole
    one = _tree(str(base / "one"), dropout=0.1, dtype="fp16")
    out["1_ref"] = _straight_with_save(one, 1, str(base / "ck_one"))
    out["1_got"] = _resumed(one, 1, str(base / "ck_one"))
    out["1_from_8"] = _resumed(_tree(str(base / "one_from_8")), 1, str(base / "ck_src"))["losses"]
    out["1_from_gpt"] = _resumed(_tree(str(base / "one_from_gpt"), model=GPT2), 1, str(base / "ck_gpt"))["losses"]
    out["base"] = base
    return out


def _close(got: list[float], ref: list[float]) -> bool:
    return len(got) == len(ref) and all(math.isfinite(a) and abs(a - b) <= RTOL * abs(b) for a, b in zip(got, ref))


def test_exact_resume_in_one_process(jobs):
    ref, got = jobs["1_ref"], jobs["1_got"]
    assert got["iteration"] == SAVE_AT + AFTER
    assert got["losses"] == ref["losses"][SAVE_AT:]  # bit for bit (dropout on, fp16 loss scaling)
    assert all(torch.equal(ref["params"][n], got["params"][n]) for n in ref["params"])


def test_exact_resume_tp2_pp2_dp2_zero1(jobs):
    for rank, r in enumerate(jobs["8"]):
        ref, got = r["exact_ref"], r["exact_got"]
        assert not ref["failed"], f"rank {rank}: the async save failed"
        assert got["losses"] == ref["losses"][SAVE_AT:], f"rank {rank}"
        assert all(torch.equal(ref["params"][n], got["params"][n]) for n in ref["params"]), f"rank {rank}"


@pytest.mark.parametrize("layout", ["tp1_pp4", "dp4_zero1", "dp4_zero3", "pp2_vpp2_dp2_zero0"])
def test_reshard_from_tp2_pp2_dp2(jobs, layout):
    ref = jobs["8"][0]["reshard_ref"]["losses"][SAVE_AT:]
    for rank, r in enumerate(jobs["4"]):
        assert _close(r[layout], ref), f"rank {rank}: {r[layout]} vs {ref}"


def test_reshard_to_one_process(jobs):
    ref = jobs["8"][0]["reshard_ref"]["losses"][SAVE_AT:]
    assert _close(jobs["1_from_8"], ref), f"{jobs['1_from_8']} vs {ref}"


def test_reshard_tp4_gqa_to_tp2_dp2(jobs):
    for rank, r in enumerate(jobs["4"]):
        assert _close(r["tp2_dp2_from_tp4"], r["tp4_ref"][SAVE_AT:]), f"rank {rank}"


def test_tied_embedding_across_stages_resumes_and_reshards(jobs):
    """tp2 x pp2 GPT-2 with a tied head: exact resume, and the checkpoint (one embedding tensor, no head
    copy) continues in one process."""
    for rank, r in enumerate(jobs["4"]):
        ref, got = r["gpt_ref"], r["gpt_got"]
        assert got["losses"] == ref["losses"][SAVE_AT:], f"rank {rank}"
        assert all(torch.equal(ref["params"][n], got["params"][n]) for n in ref["params"]), f"rank {rank}"
    assert _close(jobs["1_from_gpt"], jobs["4"][0]["gpt_ref"]["losses"][SAVE_AT:])


def test_checkpoint_holds_canonical_tensors_once(jobs):
    """The tp2 x pp2 x dp2 checkpoint lists every canonical tensor with its global (real-vocabulary) shape,
    the per-rank RNG streams of all 8 ranks, and nothing twice."""
    from engine.checkpoint.dcp_io import read_metadata, tensor_infos
    from engine.checkpoint.files import resolve_checkpoint

    step = resolve_checkpoint(jobs["base"] / "ck_src")
    assert step.step == SAVE_AT
    infos = tensor_infos(read_metadata(step.path))
    assert infos["model/embed.weight"].shape == (300, 32)
    assert infos["model/head.weight"].shape == (300, 32)
    assert infos["optim/exp_avg/layers.3.attn.q_proj.weight"].shape == (32, 32)
    assert {n.split("/")[1] for n in infos if n.startswith("rng/")} == {f"rank{r:05d}" for r in range(8)}
    assert not any(n.startswith("optim/master/") for n in infos)  # fp32 parameters are their own masters
    gpt = tensor_infos(read_metadata(resolve_checkpoint(jobs["base"] / "ck_gpt").path))
    assert "model/embed.weight" in gpt and "model/head.weight" not in gpt  # a tied head is not a tensor of its own
