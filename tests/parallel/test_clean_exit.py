"""A finished data-parallel `tessera train` under torchrun exits 0, every time.

The bug this guards against: a rank aborted AFTER the last step and the final validation line (SIGABRT,
"terminate called without an active exception"), so torchrun reported a finished job as failed. Cause: the
gloo process groups outlived the run. `destroy_process_group()` only drops torch's own references, and other
references kept every group alive: DataParallel's grad hooks (a cycle through the parameters' C++ side that
gc cannot free: ddp -> pstate -> all groups), `torch.distributed.nn`'s `group=group.WORLD` default arguments
(bound to the default group when torch._dynamo imports that module after init_process_group), and, under
FSDP2, DTensor caches holding the device mesh. So each group's gloo worker threads ran on into interpreter
shutdown. A worker that drops the last reference to a finished collective then has to decref that collective's
tensors; it asks for the GIL, Python is finalizing and ends the thread with pthread_exit, and the forced unwind
through the noexcept ~AsyncWork destructor calls std::terminate (core dump: ProcessGroupGloo::runLoop ->
~AsyncAllreduceWork -> TensorImpl::decref_pyobject -> take_gil -> PyThread_exit_thread -> std::terminate).
Whether it happens depends on the worker getting a CPU before the main thread starts finalizing, so it is
more frequent on a busy machine.

Before the fix, on the shared 2-core machine, with the reported command (`torchrun --nproc-per-node 2 -m
engine train examples/tiny.yaml train.iters=8 parallel.zero=0 train.global_batch_size=8
train.micro_batch_size=2`): 2/23 jobs failed, and 2/20 with a busy loop on one core (the issue
reported 3/6). With the fix: 0/30 with the busy loop; this file's thread check saw 13 threads per rank.

Two checks: repeated launches of the real CLI must all exit 0 (timing-dependent, as the bug was), and, as a
deterministic check of the cause, no thread (gloo workers, TensorBoard writer, ...) may still be running in a
rank once the CLI's main() has returned, i.e. before interpreter shutdown begins.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LAUNCHES = 5

# Small enough that a launch costs little more than torchrun's start-up; the final validation still runs.
OVERRIDES = ["train.iters=4", "train.log_interval=4", "train.eval_interval=4", "train.eval_iters=1",
             "train.global_batch_size=8", "train.micro_batch_size=2", "train.sample_prompt=null",
             "model.n_layers=1", "model.d_model=32", "model.ffn_hidden=64", "model.max_seq_len=32",
             "parallel.zero=0", "parallel.timeout_minutes=2"]

# The CLI exactly as `python -m engine` runs it, plus a report of the threads left when main() returns.
DRIVER = textwrap.dedent("""
    import os, sys, threading
    from engine.cli import main

    rc = main(sys.argv[1:])
    names = [t.name for t in threading.enumerate()]
    n = len(os.listdir("/proc/self/task"))  # OS threads: gloo's are invisible to threading.enumerate()
    with open(f"threads{os.environ['RANK']}", "w") as f:
        f.write(f"{n} {names}")
    sys.exit(rc)
""")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data_cache")  # shared: only the first launch tokenizes


def _torchrun(cwd: Path, target: list[str], out_dir: Path, cache: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "--max-restarts", "0", *target, "train", str(ROOT / "examples" / "tiny.yaml"), *OVERRIDES,
           f"train.out_dir={out_dir}", f"data.cache_dir={cache}"]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_finished_job_exits_zero_every_time(tmp_path, cache_dir):
    for i in range(LAUNCHES):
        proc = _torchrun(tmp_path, ["-m", "engine"], tmp_path / f"run{i}", cache_dir)
        out = proc.stdout + proc.stderr
        assert "val loss" in out, out[-3000:]  # the run got to its final validation
        assert "terminate called" not in out, f"launch {i + 1}/{LAUNCHES}:\n{out[-3000:]}"
        assert proc.returncode == 0, f"launch {i + 1}/{LAUNCHES} exited {proc.returncode}:\n{out[-3000:]}"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts threads through /proc")
def test_no_thread_outlives_the_run(tmp_path, cache_dir):
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    proc = _torchrun(tmp_path, [str(script)], tmp_path / "run", cache_dir)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    for rank in (0, 1):
        n, names = (tmp_path / f"threads{rank}").read_text().split(" ", 1)
        # Before the fix: 13 threads (4 gloo groups x [1 transport loop + 2 workers] + main) on each rank.
        assert int(n) == 1, f"rank {rank}: {n} threads still running after main() returned ({names})"
