import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.train.loop import train

REPO = Path(__file__).resolve().parents[1]


def test_same_seed_identical_losses(make_tiny_config, tmp_path):
    a = train(make_tiny_config(train={"iters": 4, "out_dir": str(tmp_path / "a")}))
    b = train(make_tiny_config(train={"iters": 4, "out_dir": str(tmp_path / "b")}))
    c = train(make_tiny_config(train={"iters": 4, "seed": 7, "out_dir": str(tmp_path / "c")}))
    assert a.losses == b.losses
    assert a.losses != c.losses


def test_loss_falls_and_eval_runs(make_tiny_config):
    cfg = make_tiny_config(train={"iters": 30, "eval_interval": 15, "eval_iters": 2, "log_interval": 5},
                           optim={"lr": 3e-3, "warmup_iters": 3})
    r = train(cfg)
    assert sum(r.losses[-5:]) / 5 < r.losses[0] - 1.0
    assert sorted(r.val_losses) == [15, 30]
    # Deterministic run (fixed seed and data): measured 4.48 -> 4.24; a model that stops learning after
    # step 15 (or an evaluation on other batches each time) does not fall by 0.1.
    assert r.val_losses[30]["pydoc"] < r.val_losses[15]["pydoc"] - 0.1


def test_bf16_autocast_runs(make_tiny_config, monkeypatch):
    import engine.train.trainer as trainer_module

    seen = []  # (logits dtype, autocast on?) of every micro-batch loss
    real = trainer_module.lm_loss

    def spy(logits, *args, **kwargs):
        seen.append((logits.dtype, torch.is_autocast_enabled("cpu")))
        return real(logits, *args, **kwargs)

    monkeypatch.setattr(trainer_module, "lm_loss", spy)  # the trainer's loss function (train.objective causal)
    r = train(make_tiny_config(precision={"dtype": "bf16"}, train={"iters": 3}))
    assert seen and all(dtype == torch.bfloat16 and on for dtype, on in seen), seen[:3]
    assert all(math.isfinite(l) for l in r.losses), r.losses  # nan and inf alike
    assert r.losses[-1] < r.losses[0]


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_end_to_end_cli_train_and_generate(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "engine", "train", str(REPO / "examples" / "tiny.yaml"), "train.iters=6",
           "train.log_interval=3", "train.eval_interval=3", "train.eval_iters=2", f"train.out_dir={out}",
           "train.sample_tokens=20", "model.n_layers=1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--- sample ---" in proc.stdout
    assert (out / "config.yaml").is_file() and (out / "model.safetensors").is_file()
    assert any((out / "tensorboard").iterdir())
    records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in steps] == [3, 6] and [r["step"] for r in evals] == [3, 6]
    for key in ("step", "loss", "lr", "grad_norm", "loss_scale", "tokens_per_s", "tflops", "mfu", "mem_gb"):
        assert key in steps[0], key
    assert steps[0]["mfu"] is None  # CPU: no peak figure, MFU n/a
    # TFLOP/s is the model FLOPs per token (docs/metrics.md) times the measured tokens/s, on one device.
    from engine.config import load_config
    from engine.train.flops import training_flops_per_token

    resolved = load_config(out / "config.yaml")
    per_token = training_flops_per_token(resolved.model, resolved.seq_len)
    for r in steps:
        assert r["tokens_per_s"] > 0
        assert r["tflops"] == pytest.approx(per_token * r["tokens_per_s"] / 1e12, rel=1e-9)
    assert "val_loss/pydoc" in evals[0]
    # the resolved config holds the tokenizer's vocabulary size
    assert "vocab_size: 257" in (out / "config.yaml").read_text()

    gen = subprocess.run([sys.executable, "-m", "engine", "generate", str(out), "--prompt", "The ",
                          "--max-tokens", "10", "--seed", "1"], capture_output=True, text=True, env=_env(), timeout=120)
    assert gen.returncode == 0, gen.stderr[-2000:]
    assert gen.stdout.startswith("The ")

    # a second run in the same directory archives the first instead of mixing metrics
    proc = subprocess.run(cmd[:5] + ["train.iters=1", f"train.out_dir={out}", "train.sample_prompt=null",
                                     "model.n_layers=1", "train.eval_interval=0"],
                          capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list((out / "archive").iterdir())) == 1
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1] and "wall_s/total" in records[-1]  # + the run's split


def test_cli_config_error_is_one_clear_message(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "engine", "train", str(REPO / "examples" / "tiny.yaml"),
                           "train.itres=5"], capture_output=True, text=True, env=_env(), timeout=60)
    assert proc.returncode == 2
    assert "unknown key 'train.itres'" in proc.stderr and "Traceback" not in proc.stderr


def test_generate_missing_run_dir(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "engine", "generate", str(tmp_path / "nope")],
                          capture_output=True, text=True, env=_env(), timeout=60)
    assert proc.returncode == 6 and "expected config.yaml" in proc.stderr  # a run-directory error (engine/errors.py)


@pytest.mark.parametrize("args", [["--help"], ["train", "--help"], ["config", "show", "--help"],
                                  ["generate", "--help"], ["bench", "--help"], ["tokenizer", "--help"]])
def test_cli_help(args):
    from engine.cli import main

    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 0


def test_cli_version_and_config_show(capsys):
    from engine import __version__
    from engine.cli import main

    with pytest.raises(SystemExit):
        main(["--version"])
    assert __version__ in capsys.readouterr().out
    assert main(["config", "show", str(REPO / "examples" / "tiny.yaml"), "train.iters=3"]) == 0
    out = capsys.readouterr().out
    assert "iters: 3" in out and "preset: tiny" in out


@pytest.mark.parametrize("fails", [False, True])
def test_train_destroys_the_process_group_it_created(make_tiny_config, monkeypatch, fails):
    # A gloo group left alive until interpreter exit can SIGABRT the process at teardown (seen in CI on the
    # two-agent torchrun test), so train() must destroy the group it created, also when training raises.
    import engine.train.loop as loop
    from engine.parallel.state import ParallelState

    destroyed = []

    class _State(ParallelState):
        def destroy(self) -> None:
            destroyed.append(True)

    def _fake_train(cfg, pstate, clock):
        if fails:
            raise RuntimeError("boom")
        return "ran"

    monkeypatch.setattr(loop.ParallelState, "initialize", classmethod(lambda cls, **kw: _State()))
    monkeypatch.setattr(loop, "_train", _fake_train)
    cfg = make_tiny_config()
    if fails:
        with pytest.raises(RuntimeError, match="boom"):
            train(cfg)
    else:
        assert train(cfg) == "ran"
    assert destroyed == [True]
    # A state the caller passes in (with its own group) is left alone.
    destroyed.clear()
    if not fails:
        assert train(cfg, _State()) == "ran"
        assert destroyed == []
