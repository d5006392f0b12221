"""FP8 training in one process: convergence against the bf16 run, the FP8 state in checkpoints, exact resume.

Multi-process FP8 (tp = 2 with sequence parallel, amax reduction): tests/parallel/test_fp8_tp.py.
"""

from __future__ import annotations

import json

import pytest
import torch

from engine.errors import CheckpointError
from engine.parallel.state import ParallelState
from engine.train.trainer import Trainer
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("fp8_data_cache"))  # the tokenized corpus, built once for the module


@pytest.fixture(autouse=True)
def _shared_cache(data_cache, monkeypatch):
    monkeypatch.setitem(_CACHE, "dir", data_cache)


_CACHE: dict[str, str] = {}


def _cfg(tmp_path, fp8, iters, **extra):
    sections = {"train": {"iters": iters, "micro_batch_size": 4, "global_batch_size": 8},
                "data": {"cache_dir": _CACHE.get("dir")},
                "optim": {"lr": 3e-3, "warmup_iters": 5, "min_lr": 3e-4},
                "precision": {"dtype": "bf16", "fp8": fp8}}
    for k, v in extra.items():
        sections.setdefault(k, {}).update(v)
    return tiny_config(tmp_path, **sections)


def _final_loss(cfg, last: int = 10) -> tuple[float, float]:
    """(mean loss of the first `last` steps, mean loss of the last `last` steps)."""
    t = Trainer(cfg, ParallelState.single())
    losses = [t.train_step().loss for _ in range(cfg.train.iters)]
    t.close()
    return sum(losses[:last]) / last, sum(losses[-last:]) / last


_BF16: dict[int, float] = {}  # iters -> final loss of the bf16 run (the same for every recipe: run it once)


def _check_converges_like_bf16(tmp_path, recipe, iters):
    if iters not in _BF16:
        _BF16[iters] = _final_loss(_cfg(tmp_path / "bf16", None, iters))[1]
    ref = _BF16[iters]
    start, got = _final_loss(_cfg(tmp_path / recipe, {"recipe": recipe}, iters))
    assert got < start - 0.3, f"{recipe}: the FP8 run did not learn ({start:.3f} -> {got:.3f})"
    assert abs(got - ref) <= 0.02 * ref, f"{recipe}: final loss {got:.4f} vs bf16 {ref:.4f} (more than 2% apart)"


@pytest.mark.parametrize("recipe", ["tensorwise", "delayed"])
def test_short_fp8_run_tracks_bf16(tmp_path, recipe):
    _check_converges_like_bf16(tmp_path, recipe, iters=30)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise", "delayed"])
def test_fp8_200_steps_end_within_2_percent_of_bf16(tmp_path, recipe):
    _check_converges_like_bf16(tmp_path, recipe, iters=200)


def test_train_reports_fp8_layers_and_labels_mfu(tmp_path, capsys):
    from engine.train.loop import train

    cfg = _cfg(tmp_path, {"recipe": "tensorwise", "keep_high_precision": ["last_block"]}, 2,
               train={"log_interval": 1})
    train(cfg)
    out = capsys.readouterr().out
    assert "tessera: fp8 (tensorwise): 7 of 15 linears run in FP8; 8 stay high precision:" in out
    assert "tessera: fp8:   layers.1.mlp.down_proj: last block (keep_high_precision: last_block)" in out
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["mfu_peak"] for r in records if "loss" in r] == ["fp8", "fp8"]


def _save(trainer, root):
    from engine.checkpoint.manager import CheckpointSaver
    from engine.train.checkpointing import checkpoint_meta, trainer_checkpoint_state

    saver = CheckpointSaver(root, keep=0, log=lambda s: None)
    pieces, tensors = trainer_checkpoint_state(trainer)
    meta = json.dumps(checkpoint_meta(trainer, [])).encode()
    out = saver.save(trainer.iteration, pieces, tensors, lambda: meta)
    saver.close()
    saver.raise_if_failed(out)


def _fp8_state(t: Trainer) -> dict[str, torch.Tensor]:
    return t.built.fp8.state_dict()


@pytest.mark.parametrize("recipe", ["delayed", "tensorwise"])
def test_checkpoint_round_trip_and_exact_resume(tmp_path, recipe):
    from engine.checkpoint.dcp_io import read_metadata, tensor_infos
    from engine.checkpoint.files import resolve_checkpoint
    from engine.train.checkpointing import load_checkpoint

    fp8 = {"recipe": recipe, "amax_history_len": 4, "margin": 1}
    cfg = _cfg(tmp_path, fp8, 4)
    single = ParallelState.single()
    straight = Trainer(cfg, single)
    ref = [straight.train_step() for _ in range(4)]

    first = Trainer(cfg, single)
    for _ in range(2):
        first.train_step()
    _save(first, tmp_path / "ck")
    step = resolve_checkpoint(tmp_path / "ck")
    keys = {k for k in tensor_infos(read_metadata(step.path)) if k.startswith("fp8/")}
    if recipe == "delayed":
        assert "fp8/layers.0.attn.q_proj/input/amax_history" in keys
        assert "fp8/layers.1.mlp.down_proj/grad_output/scale" in keys
        assert len(keys) == 14 * 2 * 3  # 14 FP8 linears x (input, grad_output) x (history, scale, steps)
        from engine.checkpoint.inspect import describe

        assert describe(step.path)["bytes"]["fp8"] > 0  # `tessera checkpoint inspect` shows the group
    else:
        assert keys == set()  # current scaling keeps no state

    torch.manual_seed(999)  # what a new process would have
    resumed = Trainer(cfg, single)
    load_checkpoint(resumed, step.path)
    if recipe == "delayed":
        for k, v in _fp8_state(first).items():
            assert torch.equal(_fp8_state(resumed)[k], v), k
    got = [resumed.train_step() for _ in range(2)]
    assert [r.loss for r in got] == [r.loss for r in ref[2:]]
    assert [r.grad_norm for r in got] == [r.grad_norm for r in ref[2:]]
    vocab = cfg.model.vocab_size  # rows past it are run-time vocabulary padding, which checkpoints do not hold
    for (n, a), b in zip(straight.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a[:vocab], b[:vocab]), n
    for k, v in _fp8_state(straight).items():
        assert torch.equal(_fp8_state(resumed)[k], v), k

    # The in-memory state dict carries the FP8 state too.
    again = Trainer(cfg, single)
    again.load_state_dict(first.state_dict())
    assert [again.train_step().loss for _ in range(2)] == [r.loss for r in ref[2:]]


def test_fp8_state_that_does_not_fit_is_refused_and_missing_state_starts_fresh(tmp_path):
    from engine.train.checkpointing import load_checkpoint

    single = ParallelState.single()
    src = Trainer(_cfg(tmp_path, {"recipe": "delayed", "amax_history_len": 4}, 2), single)
    src.train_step()
    _save(src, tmp_path / "ck")
    other = Trainer(_cfg(tmp_path, {"recipe": "delayed", "amax_history_len": 8}, 2), single)
    with pytest.raises(CheckpointError, match="FP8 state does not match this run's precision.fp8"):
        load_checkpoint(other, tmp_path / "ck")

    plain = Trainer(_cfg(tmp_path, None, 2), single)
    plain.train_step()
    _save(plain, tmp_path / "ck_plain")
    fresh = Trainer(_cfg(tmp_path, {"recipe": "delayed", "amax_history_len": 4}, 2), single)
    load_checkpoint(fresh, tmp_path / "ck_plain")  # FP8 switched on at a resume: scales start fresh
    assert fresh.iteration == 1
    assert all(not v.any() for k, v in _fp8_state(fresh).items() if k.endswith("amax_history"))
