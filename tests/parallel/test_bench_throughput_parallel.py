"""`tessera bench throughput` in a 2-process gloo job, tp=2 and pp=2 (one spawn for every case): every rank's
breakdown has communication time (tp collectives moved out of forward/backward; stage-to-stage transfers),
the phases add up to the step, the training it measures is the single-process run's (losses within 1e-5
relative, fp32: the collectives change the summation order only), and a sweep that would need other
process groups is refused before anything runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.dist_utils import run_distributed

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "examples" / "tiny.yaml")
SMALL = ["model.n_layers=2", "model.d_model=32", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_hidden=64",
         "data.seq_len=32", "train.micro_batch_size=2", "train.global_batch_size=4"]
STEPS = ["--warmup", "1", "--iters", "2", "--breakdown-iters", "2"]


def _worker(rank: int, world_size: int, out: str) -> str:
    from engine.bench.throughput import main
    from engine.config import ConfigError

    for name in ("tp", "pp"):
        assert main([TINY, *SMALL, f"parallel.{name}=2", *STEPS, "--json", f"{out}/{name}.json"]) == 0
    try:
        main([TINY, *SMALL, "parallel.tp=2", "--sweep", "parallel.sequence_parallel=false,true", *STEPS])
    except ConfigError as e:
        return str(e)
    return "no error"


@pytest.mark.slow  # ~45 s on 2 cores: a spawn, three single/tp/pp benchmarks
def test_bench_throughput_tp2_and_pp2(tmp_path):
    from engine.bench.throughput import main

    assert main([TINY, *SMALL, *STEPS, "--json", str(tmp_path / "one.json")]) == 0
    single = json.loads((tmp_path / "one.json").read_text())["points"][0]["losses"]
    errors = run_distributed(_worker, 2, str(tmp_path), timeout=240)
    for e in errors:
        assert "the points need different parallel layouts" in e and "run one benchmark per layout" in e
    for name in ("tp", "pp"):
        res = json.loads((tmp_path / f"{name}.json").read_text())
        assert res["world_size"] == 2 and res["layout"][name] == 2
        (p,) = res["points"]
        assert p["losses"] == pytest.approx(single, rel=1e-5)
        per_rank = p["breakdown_s_per_rank"]
        assert len(per_rank) == 2 and per_rank[0] == p["breakdown_s"]
        assert all(b["communication"] > 0 and b["forward"] > 0 and b["backward"] > 0 for b in per_rank)
        assert sum(p["breakdown_s"].values()) == pytest.approx(p["timed_step_s"], rel=0.02, abs=1e-3)
        assert p["tokens_per_s"] == pytest.approx(p["tokens_per_step"] / p["step_s"], rel=1e-12)
