"""Whole-run accounting: a run's wall time split into start-up, model build, datasets, steps, evaluation,
saving and other, in metrics.jsonl's last record, TrainResult.wall, the end-of-run summary and bench train."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.train.loop import train
from engine.train.timing import RUN_PARTS, RunClock, format_run_split

REPO = Path(__file__).resolve().parents[1]


def test_last_record_holds_the_split_and_it_sums_to_the_wall_time(make_tiny_config, tmp_path, capsys):
    cfg = make_tiny_config(train={"iters": 4, "log_interval": 2, "eval_interval": 2, "eval_iters": 1},
                           checkpoint={"dir": str(tmp_path / "ck"), "interval": 2})
    t0 = time.perf_counter()
    r = train(cfg)
    wall = time.perf_counter() - t0
    records = [json.loads(line) for line in (Path(cfg.train.out_dir) / "metrics.jsonl").read_text().splitlines()]
    last = records[-1]
    assert set(last) == {"step", "steps_this_run", *(f"wall_s/{k}" for k in (*RUN_PARTS, "total"))}
    assert last["step"] == 4 and last["steps_this_run"] == 4
    assert {k: last[f"wall_s/{k}"] for k in (*RUN_PARTS, "total")} == r.wall
    parts = {k: r.wall[k] for k in RUN_PARTS}
    assert sum(parts.values()) == pytest.approx(r.wall["total"], rel=1e-9)
    # every part was measured: this run built a model and datasets, evaluated twice, saved a checkpoint at
    # step 2 and the final one plus the weights
    assert all(parts[k] > 0 for k in ("startup", "model_build", "data_build", "steps", "eval", "save"))
    assert parts["other"] >= -1e-6  # what no part claimed (logging): the parts never overlap
    assert parts["steps"] == pytest.approx(sum(r.step_times), rel=1e-9)
    # from train()'s first line to the summary: all of the call but its teardown after the record (closing
    # files, train()'s gc.collect() before destroying the process group: ~0.2 s in a pytest process)
    assert 0 <= wall - r.wall["total"] < 1.0
    out = capsys.readouterr().out
    summary = [line for line in out.splitlines() if line.startswith("tessera: run time")]
    assert summary == [format_run_split(r.wall, 4)] and "start-up" in summary[0] and "[4 steps" in summary[0]


def test_run_clock_parts_and_summary_line():
    clock = RunClock(started=time.perf_counter() - 2.0)  # started 2 s ago (a process start, say)
    clock.add("model_build", 0.5)
    clock.end_startup()  # the 1.5 s no other part claimed
    assert clock.parts["startup"] == pytest.approx(1.5, abs=0.05)
    with clock.part("save"):
        pass
    with pytest.raises(ValueError, match="unknown part 'saving'"):
        clock.add("saving", 1.0)
    split = clock.split()
    assert list(split) == [*RUN_PARTS, "total"] and split["total"] >= 2.0
    assert sum(split[k] for k in RUN_PARTS) == pytest.approx(split["total"], rel=1e-12)
    line = format_run_split({**dict.fromkeys(RUN_PARTS, 1.0), "steps": 4.0, "total": 10.0}, 8)
    assert line == ("tessera: run time 10.00 s = start-up 1.00 s (10%) + model build 1.00 s (10%) + datasets "
                    "1.00 s (10%) + steps 4.00 s (40%) [8 steps, 0.500 s/step] + evaluation 1.00 s (10%) + saving "
                    "1.00 s (10%) + other 1.00 s (10%)")


def test_process_start_counts_the_interpreter_and_imports(tmp_path):
    # a process that sleeps before importing anything of ours: its start is at least that long ago
    code = ("import time; time.sleep(0.6); from engine.train.timing import process_start; "
            "print(time.perf_counter() - process_start())")
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    outer = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr
    age = float(proc.stdout.strip())
    assert 0.58 <= age <= outer + 0.02  # /proc's start time has a resolution of one clock tick (10 ms)


def test_bench_train_reports_the_run_split(tmp_path, capsys):
    from engine.bench.train import main

    out = tmp_path / "bt.json"
    assert main([str(REPO / "examples" / "tiny.yaml"), "model.n_layers=1", "model.d_model=32", "model.ffn_hidden=64",
                 "data.seq_len=32", "train.micro_batch_size=2", "train.global_batch_size=4",
                 f"data.cache_dir={tmp_path / 'cache'}", "train.tensorboard=false",
                 "--iters", "3", "--warmup", "1", "--rounds", "1", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    split = res["tessera_run_wall_s"]
    assert list(split) == [*RUN_PARTS, "total"] and res["tessera_run_steps"] == 3
    assert sum(split[k] for k in RUN_PARTS) == pytest.approx(split["total"], rel=1e-9)
    assert split["steps"] > 0 and split["model_build"] > 0 and split["eval"] == 0.0
    assert "tessera run (median of the rounds, in-process: no imports): run time" in capsys.readouterr().out


def test_a_run_stopped_with_a_checkpoint_writes_its_split_too(make_tiny_config, tmp_path, monkeypatch):
    from engine.errors import RunStopped
    from engine.train import stop

    calls = []

    def check(self, pstate, step_seconds):  # a stop request (signal, time limit) seen after step 2
        calls.append(step_seconds)
        return "signal SIGTERM" if len(calls) == 2 else None

    monkeypatch.setattr(stop.StopRequest, "check", check)
    cfg = make_tiny_config(train={"iters": 6}, checkpoint={"dir": str(tmp_path / "ck")})
    with pytest.raises(RunStopped, match="at step 2/6"):
        train(cfg)
    last = json.loads((Path(cfg.train.out_dir) / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 2 and last["steps_this_run"] == 2 and last["wall_s/save"] > 0
    assert sum(last[f"wall_s/{k}"] for k in RUN_PARTS) == pytest.approx(last["wall_s/total"], rel=1e-9)
