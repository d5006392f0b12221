"""Faults a user meets, each tried the way a user would meet it (docs/reliability.md lists them):

- one line per error from the CLI, with the documented exit code, the traceback only with --debug;
- interrupts (SIGINT, SIGTERM) print one line and exit 130 / 143;
- the run directory: a run that fails on its data leaves the previous run's files where they were; a
  directory that is not a Tessera run is refused unless asked, and then nothing of the user's is moved
  or overwritten; two runs on one directory: the second stops with a message (a lock);
- numerical faults: a NaN loss or gradient norm at step k is skipped (no update) and the run continues;
  too many in a window stop it (exit 7); a loss spike is skipped; metrics.jsonl stays valid JSON;
- a temporary file left by a process killed while writing the final weights is removed by the next run.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from engine.errors import NumericalFault, RunDirError
from engine.train.loop import train
from engine.train.run_dir import RunLock

REPO = Path(__file__).resolve().parents[1]


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engine", *args], capture_output=True, text=True, env=_env(),
                          timeout=timeout)


TINY = ["model.n_layers=1", "model.d_model=32", "model.ffn_hidden=64", "model.max_seq_len=32",
        "train.global_batch_size=4", "train.micro_batch_size=2", "train.log_interval=1", "train.eval_interval=0",
        "train.sample_prompt=null", "train.tensorboard=false", "train.progress=false"]


def _one_error_line(proc: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("tessera: ")]
    assert len(lines) == 1, proc.stderr[-2000:]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


# ----------------------------------------------------------------------------- the CLI's one error path


def test_data_tokenizer_and_run_dir_errors_are_one_line_with_their_codes(tmp_path):
    base = [str(REPO / "examples" / "tiny.yaml"), *TINY, "train.iters=1"]
    missing = tmp_path / "nope.txt"
    _one_error_line(_cli("train", *base, f"train.out_dir={tmp_path / 'a'}", f"data.train=[{{path: {missing}}}]"),
                    3, str(missing))
    _one_error_line(_cli("train", *base, f"train.out_dir={tmp_path / 'b'}",
                         f"data.tokenizer=sentencepiece:{tmp_path / 'tok.model'}"), 4, "tok.model")
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("my notes")
    _one_error_line(_cli("train", *base, f"train.out_dir={foreign}"), 6, "not", "allow_foreign_dir")
    assert (foreign / "notes.txt").read_text() == "my notes"
    # --debug adds the traceback to the same line
    proc = _cli("--debug", "train", *base, f"train.out_dir={foreign}")
    assert proc.returncode == 6 and "Traceback" in proc.stderr and "RunDirError" in proc.stderr


@pytest.mark.parametrize("sig, code, word", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_interrupts_print_one_line(tmp_path, sig, code, word):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "engine", "train", str(REPO / "examples" / "tiny.yaml"), *TINY,
                             "train.iters=100000", f"train.out_dir={out}"], env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not (out / "metrics.jsonl").is_file() or not (out / "metrics.jsonl").read_text():  # training has started
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.2)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-2000:]
    assert "Traceback" not in err and sum(line.startswith("tessera: ") for line in err.splitlines()) == 1, err
    assert word in err
    assert not (out / ".tessera.lock").exists() or _lock_is_free(out)


def _lock_is_free(out: Path) -> bool:
    try:
        RunLock(out).release()
    except RunDirError:
        return False
    return True


# ----------------------------------------------------------------------------- the run directory


def test_a_run_that_fails_on_its_data_leaves_the_previous_run_alone(make_tiny_config, tmp_path):
    out = tmp_path / "run"
    train(make_tiny_config(train={"iters": 2, "out_dir": str(out)}))
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert "model.safetensors" in before and "config.yaml" in before
    binary = tmp_path / "weights.bin"
    binary.write_bytes(bytes(range(256)) * 64)  # not text: refused before anything is written
    from engine.errors import DataError

    with pytest.raises(DataError):
        train(make_tiny_config(train={"iters": 2, "out_dir": str(out)}, data={"train": [{"path": str(binary)}]}))
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert after == before and not (out / "archive").exists()
    gen = _cli("generate", str(out), "--prompt", "The ", "--max-tokens", "5", "--seed", "1", timeout=120)
    assert gen.returncode == 0, gen.stderr[-2000:]


def test_foreign_directory_is_used_only_when_asked_and_left_alone(make_tiny_config, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(RunDirError, match="allow_foreign_dir"):
        train(make_tiny_config(train={"iters": 1, "out_dir": str(out)}))
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]  # nothing written, nothing moved
    train(make_tiny_config(train={"iters": 1, "out_dir": str(out), "allow_foreign_dir": True}))
    assert (out / "notes.txt").read_text() == "keep me" and (out / "model.safetensors").is_file()
    # a second run there archives only Tessera's own files
    train(make_tiny_config(train={"iters": 1, "out_dir": str(out)}))
    assert (out / "notes.txt").read_text() == "keep me"
    archived = {p.name for d in (out / "archive").iterdir() for p in d.iterdir()}
    assert "notes.txt" not in archived and "model.safetensors" in archived
    # a user's own config.yaml in a foreign directory is never overwritten
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.yaml").write_text("my: own\n")
    with pytest.raises(RunDirError, match="config.yaml"):
        train(make_tiny_config(train={"iters": 1, "out_dir": str(other), "allow_foreign_dir": True}))
    assert (other / "config.yaml").read_text() == "my: own\n"


def test_two_runs_on_one_directory(make_tiny_config, tmp_path):
    out = tmp_path / "run"
    lock = RunLock(out)  # another run holds the directory
    try:
        with pytest.raises(RunDirError, match="in use by another run"):
            train(make_tiny_config(train={"iters": 1, "out_dir": str(out)}))
    finally:
        lock.release()
    assert train(make_tiny_config(train={"iters": 1, "out_dir": str(out)})).losses


def test_stale_temporary_weights_are_removed(make_tiny_config, tmp_path):
    out = tmp_path / "run"
    train(make_tiny_config(train={"iters": 1, "out_dir": str(out)}))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = out / f".model.safetensors.tmp{int(dead.stdout)}"  # that process has exited
    stale.write_bytes(b"half a file")
    train(make_tiny_config(train={"iters": 1, "out_dir": str(out)}))
    assert not stale.exists()


# ----------------------------------------------------------------------------- numerical faults


def _poison(monkeypatch, steps: set[int], value: float = float("nan")):
    """Make the loss (and so the gradients) of the given 1-based steps non-finite, as a bad batch would."""
    import engine.train.trainer as trainer_mod

    real = trainer_mod.Trainer._forward_backward
    count = {"n": 0}

    def fb(self, batches, scale):
        count["n"] += 1
        losses = real(self, batches, scale)
        if count["n"] in steps:
            for p in self.model.parameters():  # what a NaN in the loss does to the gradients
                g = self.built.ddp.main_grad(p)
                g.fill_(value)
            losses = [value] * len(losses)
        return losses

    monkeypatch.setattr(trainer_mod.Trainer, "_forward_backward", fb)


def test_a_nan_step_is_skipped_and_the_run_continues(make_tiny_config, monkeypatch):
    _poison(monkeypatch, {2})
    seen = []
    import engine.train.trainer as trainer_mod

    real_step = trainer_mod.Trainer.train_step

    def step(self):
        before = [p.detach().clone() for p in self.model.parameters()]
        out = real_step(self)
        seen.append((out, all(torch.equal(a, b) for a, b in zip(before, self.model.parameters()))))
        return out

    monkeypatch.setattr(trainer_mod.Trainer, "train_step", step)
    r = train(make_tiny_config(train={"iters": 4}))
    assert r.skipped_steps == 1 and len(r.losses) == 4
    assert [unchanged for _, unchanged in seen] == [False, True, False, False]
    assert seen[1][0].fault.startswith("non-finite loss") and math.isfinite(r.losses[-1])
    # metrics.jsonl is valid JSON: the NaN became null
    for line in (r.out_dir / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c} in metrics.jsonl"))


def test_too_many_bad_steps_stop_the_run(make_tiny_config, monkeypatch):
    _poison(monkeypatch, {2, 3, 4, 5})
    with pytest.raises(NumericalFault, match=r"step 3: 2 skipped steps within the last 10 .*max_bad_steps=2"):
        train(make_tiny_config(train={"iters": 6, "max_bad_steps": 2, "bad_step_window": 10}))


def test_a_loss_spike_is_skipped(make_tiny_config, monkeypatch):
    _poison(monkeypatch, {7}, value=1e4)  # a finite loss far above the last steps'
    r = train(make_tiny_config(train={"iters": 8, "loss_spike_zscore": 4.0, "loss_spike_window": 5},
                               optim={"lr": 1e-4}))
    assert r.skipped_steps == 1


def test_the_watchdog_reports_a_stuck_rank_and_exits():
    """The per-rank watchdog (engine/train/watchdog.py), in a process of its own: no progress for longer than
    its limit -> one line naming the rank, the step and the operation, and exit code 8."""
    code = ("import time\nfrom engine.train.watchdog import Watchdog\n"
            "w = Watchdog(0.5, rank=1, world_size=2, poll_s=0.05).start()\n"
            "w.beat(3, 'forward/backward')\ntime.sleep(30)\nprint('not stopped')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=60)
    assert proc.returncode == 8 and "not stopped" not in proc.stdout, proc.stderr
    assert "rank 1/2" in proc.stderr and "'forward/backward' of step 3" in proc.stderr, proc.stderr
    # and a stopped watchdog never fires
    code = ("import time\nfrom engine.train.watchdog import Watchdog\n"
            "w = Watchdog(0.3, rank=0, world_size=2, poll_s=0.05).start()\nw.stop()\ntime.sleep(1)\nprint('ok')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
