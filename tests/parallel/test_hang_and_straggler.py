"""A rank that hangs in a step, and a rank that is merely slow, under a real torchrun launch of the CLI.

Hang: rank 1 sleeps in the forward/backward of step 2. Rank 0's collective fails after the configured
process-group timeout (parallel.timeout_minutes = 0.1, i.e. 6 s, not the 30-minute default), and the job
ends non-zero with one line from rank 0 naming the operation and the step (exit code 8); no traceback.
Straggler: rank 1 sleeps 0.3 s in every step; the log records it in `slow_ranks`.
No wall-clock bounds: what is checked is what the output says.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

DRIVER = textwrap.dedent("""
    import os, sys, time
    import engine.train.trainer as tm

    real = tm.Trainer._forward_backward

    def forward_backward(self, batches, scale):
        if self.pstate.rank == 1:
            if self.iteration + 1 == int(os.environ.get("HANG_AT_STEP", "0")):
                time.sleep(300)
            time.sleep(float(os.environ.get("SLOW_S", "0")))
        return real(self, batches, scale)

    tm.Trainer._forward_backward = forward_backward
    from engine.cli import main
    sys.exit(main(sys.argv[1:]))
""")

ARGS = ["train", str(REPO / "examples" / "tiny.yaml"), "model.n_layers=1", "model.d_model=32", "model.ffn_hidden=64",
        "model.max_seq_len=32", "train.global_batch_size=4", "train.micro_batch_size=2", "train.eval_interval=0",
        "train.sample_prompt=null", "train.tensorboard=false", "train.progress=false", "parallel.zero=1"]


def _launch(tmp_path: Path, extra: list[str], env_extra: dict) -> subprocess.CompletedProcess:
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **env_extra)
    env.pop("TESSERA_DEBUG", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
           *ARGS, f"data.cache_dir={tmp_path / 'cache'}", *extra]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


def test_a_hung_rank_is_reported_with_the_operation(tmp_path):
    proc = _launch(tmp_path, ["train.iters=4", "parallel.timeout_minutes=0.1", f"train.out_dir={tmp_path / 'run'}"],
                   {"HANG_AT_STEP": "2"})
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    lines = [line for line in out.splitlines() if "tessera: error (rank 0/2)" in line]
    assert len(lines) == 1, out[-4000:]
    assert "within parallel.timeout_minutes=0.1" in lines[0] and "of step 2" in lines[0], lines[0]
    assert "'forward/backward'" in lines[0] or "'gradient reduction'" in lines[0], lines[0]
    assert "exitcode  : 8" in out, out[-3000:]  # torchrun reports rank 0's documented code
    # no traceback through our code from either rank (torchrun's agent prints its own ChildFailedError)
    assert f"{REPO / 'engine'}" not in out and "[rank0]: Traceback" not in out, out[-4000:]


def test_a_slow_rank_is_flagged_in_the_log(tmp_path):
    run = tmp_path / "run"
    proc = _launch(tmp_path, ["train.iters=4", "train.log_interval=2", "train.straggler_factor=1.5",
                              f"train.out_dir={run}"], {"SLOW_S": "0.3"})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["slow_ranks"] for r in steps] == [[1], [1]], steps
    assert all(r["busy_time_max"] > 1.5 * r["busy_time_median"] for r in steps)
    assert "slow ranks [1]" in proc.stdout
