"""BERT-style pretraining through the real training loop: train.objective mlm / mlm+nsp.

A tiny encoder learns on the embedded corpus (masked-LM loss falls, accuracy rises); metrics.jsonl carries
mlm_acc / nsp_loss / nsp_acc beside loss; a resumed run sees the same masks (bit-identical losses); and the
multi-process layouts (tp2 with sequence parallel, dp2, pp2) equal the single process on the MLM+NSP loss and
its metrics (gloo), also after resharding a tp2 x dp2 checkpoint into one process.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch.distributed as dist

from tests.dist_utils import run_distributed

METRICS = ("mlm_loss", "mlm_acc", "nsp_loss", "nsp_acc")


def _tree(out_dir: str, objective: str = "mlm+nsp", iters: int = 4, **over) -> dict:
    tree = {
        "model": {"preset": "bert-tiny", "vocab_size": 0, "d_model": 32, "n_layers": 2, "n_heads": 4,
                  "ffn_hidden": 64, "max_seq_len": 32, "binary_head": objective == "mlm+nsp", "dropout": 0.0},
        "data": {"tokenizer": "byte", "train": [{"path": "builtin:pydoc"}], "split": "90,10,0"},
        "parallel": {"zero": 1},
        "train": {"objective": objective, "micro_batch_size": 2, "global_batch_size": 8, "iters": iters,
                  "eval_interval": iters, "eval_iters": 2, "log_interval": 1, "out_dir": out_dir, "device": "cpu",
                  "tensorboard": False, "progress": False},
        "optim": {"lr": 3e-3, "warmup_iters": 1, "grad_clip": 1.0},
        "precision": {"dtype": "fp32"},
    }
    for section, values in over.items():
        tree.setdefault(section, {}).update(values)
    return tree


def _records(out_dir: str) -> list[dict]:
    with open(Path(out_dir) / "metrics.jsonl") as f:
        return [r for r in map(json.loads, f) if "loss" in r and "step" in r]


def _run(tree: dict, world_size: int = 1):
    from engine.config import config_from_dict
    from engine.parallel.state import ParallelState
    from engine.train.loop import train

    cfg = config_from_dict(tree, world_size=world_size)
    p = cfg.parallel
    pstate = ParallelState.initialize(tp=p.tp, pp=p.pp, vpp=p.vpp, sequence_parallel=p.sequence_parallel,
                                      device="cpu") if world_size > 1 else ParallelState.single()
    r = train(cfg, pstate)
    recs = _records(cfg.train.out_dir) if pstate.is_rank0 else []
    return r.losses, [{k: rec.get(k) for k in METRICS} for rec in recs], r.val_losses


def _close(a, b, rel=1e-5) -> bool:
    return len(a) == len(b) and all(math.isclose(x, y, rel_tol=rel, abs_tol=1e-7) for x, y in zip(a, b))


def test_metrics_beside_loss_in_metrics_jsonl_and_console(tmp_path, capsys):
    losses, metrics, val = _run(_tree(str(tmp_path / "run"), iters=2))
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    for m in metrics:
        assert set(m) == set(METRICS) and all(v is not None for v in m.values()), m
        assert 0 <= m["mlm_acc"] <= 1 and 0 <= m["nsp_acc"] <= 1
        assert m["nsp_loss"] > 0 and m["mlm_loss"] > 0
    out = capsys.readouterr().out + capsys.readouterr().err
    assert "mlm acc" in out and "nsp acc" in out
    evals = [r for r in map(json.loads, open(tmp_path / "run" / "metrics.jsonl")) if "val_loss" in r]
    assert evals and any(k.startswith("val_mlm_acc/") for k in evals[-1]), evals


def test_resume_sees_the_same_masks(tmp_path):
    """6 steps straight (saving at step 3) vs a resume from step 3: the same masked positions and replacements
    give bit-identical losses and metrics."""
    ck = tmp_path / "ck"
    full, full_m, _ = _run(_tree(str(tmp_path / "full"), iters=6, checkpoint={"dir": str(ck), "interval": 3}))
    second, second_m, _ = _run(_tree(str(tmp_path / "b"), iters=6,
                                     checkpoint={"load": str(ck / "step-0000003")}))
    assert second == full[3:]
    assert second_m == full_m[3:]


def test_mlm_only_objective_has_no_nsp_metrics(tmp_path):
    losses, metrics, _ = _run(_tree(str(tmp_path / "mlm"), objective="mlm", iters=2))
    assert all(m["nsp_loss"] is None and m["mlm_acc"] is not None for m in metrics)


UNIGRAM_NATS = 3.26  # entropy of the embedded corpus's byte frequencies; the most frequent byte is 18.4%


def test_tiny_encoder_learns_on_the_embedded_corpus(tmp_path):
    """bert-tiny on masked bytes: the validation masked-LM loss falls from ln(261) to below what byte frequencies
    alone give (so it reads the context around a masked position) and the accuracy rises above the share of the
    most frequent byte. Measured with the validation set at step 0 and at the end (fixed batches)."""
    tree = _tree(str(tmp_path / "learn"), objective="mlm", iters=150,
                 model={"d_model": 128, "n_layers": 2, "n_heads": 2, "ffn_hidden": 512, "max_seq_len": 64},
                 train={"micro_batch_size": 16, "global_batch_size": 16, "log_interval": 50, "eval_interval": 150,
                        "eval_iters": 6, "eval_at_start": True})
    tree["optim"] = {"lr": 2e-3, "warmup_iters": 15, "min_lr": 2e-4, "grad_clip": 1.0, "weight_decay": 0.01}
    _run(tree)
    evals = [r for r in map(json.loads, open(tmp_path / "learn" / "metrics.jsonl")) if "val_loss" in r]
    (start, end) = [(r["val_mlm_loss/pydoc"], r["val_mlm_acc/pydoc"]) for r in (evals[0], evals[-1])]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 150
    assert start[0] > 5.0 and start[1] < 0.05, start  # ln(261) = 5.56: nothing known yet
    assert end[0] < UNIGRAM_NATS - 0.15, (start, end)
    assert end[1] > 0.22, (start, end)


# --------------------------------------------------------------------------- gloo layouts


def _worker(rank: int, world_size: int, cases: list[tuple[str, dict]]):
    out = {}
    for name, tree in cases:
        out[name] = _run(tree, world_size)
        dist.barrier()
    return out


def test_layouts_equal_the_single_process_on_mlm_nsp(tmp_path):
    ref_losses, ref_metrics, ref_val = _run(_tree(str(tmp_path / "single")))
    cases = [
        ("tp2_sp_dp2", _tree(str(tmp_path / "a"), parallel={"tp": 2, "sequence_parallel": True},
                             checkpoint={"dir": str(tmp_path / "ck"), "interval": 2})),
        ("tp2_pp2", _tree(str(tmp_path / "b"), parallel={"tp": 2, "pp": 2, "zero": 0})),
        ("dp4", _tree(str(tmp_path / "c"))),
    ]
    results = run_distributed(_worker, 4, cases)[0]
    for name, (losses, metrics, val) in results.items():
        assert _close(losses, ref_losses), (name, losses, ref_losses)
        for m, r in zip(metrics, ref_metrics):
            assert _close([m[k] for k in METRICS], [r[k] for k in METRICS], rel=1e-4), (name, m, r)
        for step, vals in ref_val.items():
            assert _close(list(val[step].values()), list(vals.values())), (name, val, ref_val)
    # the tp2 x dp2 checkpoint of step 2, resharded into one process, continues as the one-process run
    resumed, resumed_m, _ = _run(_tree(str(tmp_path / "resharded"), checkpoint={"load": str(tmp_path / "ck" /
                                                                                           "step-0000002")}))
    assert _close(resumed, ref_losses[2:]), (resumed, ref_losses)
    for m, r in zip(resumed_m, ref_metrics[2:]):
        assert _close([m[k] for k in METRICS], [r[k] for k in METRICS], rel=1e-4), (m, r)


def test_the_example_config_trains(tmp_path):
    """examples/bert_tiny.yaml through the command line, two steps."""
    from engine.cli import main

    example = Path(__file__).resolve().parents[1] / "examples" / "bert_tiny.yaml"
    assert main(["train", str(example), "train.iters=2", "train.eval_interval=2", "train.eval_iters=1",
                 f"train.out_dir={tmp_path / 'ex'}", "train.tensorboard=false", "train.progress=false"]) == 0
    recs = _records(str(tmp_path / "ex"))
    assert recs and all(k in recs[-1] for k in METRICS)


def test_generate_refuses_an_encoder_run(tmp_path, capsys):
    """`tessera generate` on a masked-LM run: one error (exit 2) before any weight is read."""
    from engine.cli import main

    _run(_tree(str(tmp_path / "enc"), objective="mlm", iters=1, train={"eval_interval": 0},
               checkpoint={"dir": str(tmp_path / "ck")}))
    for target in (tmp_path / "enc", tmp_path / "ck"):  # a run directory and a checkpoint root
        capsys.readouterr()
        assert main(["generate", str(target), "--prompt", "The "]) == 2
        err = capsys.readouterr().err
        assert "holds an encoder" in err and "expected a decoder" in err, err


def test_prior_weights_fix_the_architecture_and_the_objective_must_fit(tmp_path):
    """init_from takes model.encoder / model.binary_head from the weights: an objective that does not fit them is
    one error naming the checkpoint and what to set, before anything is built."""
    from engine.errors import ConfigError

    ck = tmp_path / "ck"
    _run(_tree(str(tmp_path / "bert"), iters=1, checkpoint={"dir": str(ck)}, train={"eval_interval": 0}))
    step = str(ck / "step-0000001")
    with pytest.raises(ConfigError, match="next-sentence head .*expected train.objective=mlm\\+nsp"):
        _run(_tree(str(tmp_path / "mlm"), objective="mlm", iters=2, checkpoint={"init_from": step}))
    # a decoder's weights cannot start a masked-LM run
    dec = {"model": {"preset": "tiny", "vocab_size": 0, "d_model": 32, "n_layers": 2, "n_heads": 4,
                     "max_seq_len": 32},
           "data": {"tokenizer": "byte", "train": [{"path": "builtin:pydoc"}], "split": "90,10,0"},
           "train": {"iters": 1, "eval_interval": 0, "micro_batch_size": 2, "global_batch_size": 2, "device": "cpu",
                     "out_dir": str(tmp_path / "dec"), "tensorboard": False, "progress": False},
           "checkpoint": {"dir": str(tmp_path / "dck")}, "precision": {"dtype": "fp32"}}
    _run(dec)
    with pytest.raises(ConfigError, match="holds a decoder .*expected train.objective causal"):
        _run(_tree(str(tmp_path / "m2"), objective="mlm", iters=2,
                   checkpoint={"init_from": str(tmp_path / "dck" / "step-0000001")}))
