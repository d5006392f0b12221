"""`tessera bench throughput` on the tiny config (CPU): table, JSON and SVG with self-consistent numbers; sweeps
give one row per grid point; the step timer's phases add up to the step."""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from engine.bench.throughput import BENCH_SET, _split_values, parse_sweeps, sweep_points
from engine.config import ConfigError, load_config
from engine.train.flops import training_flops_per_token
from engine.train.timing import PHASES

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "examples" / "tiny.yaml")
SMALL = ["model.n_layers=1", "model.d_model=32", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_hidden=64",
         "data.seq_len=32", "train.micro_batch_size=2", "train.global_batch_size=4"]


def _check_point(p: dict) -> None:
    """The numbers of one point agree with each other and with the FLOPs formula."""
    tokens = p["global_batch_size"] * p["seq_len"]
    assert p["tokens_per_step"] == tokens
    assert p["step_s"] == pytest.approx(sum(p["step_times_s"]) / len(p["step_times_s"]), rel=1e-12)
    assert p["tokens_per_s"] == pytest.approx(tokens / p["step_s"], rel=1e-12)
    over = [f"{k}={v}" for k, v in p["overrides"].items()]
    cfg = load_config(TINY, [*SMALL, *over, "model.vocab_size=257"])
    assert p["tflops_per_device"] == pytest.approx(
        training_flops_per_token(cfg.model, cfg.seq_len) * p["tokens_per_s"] / 1e12, rel=1e-12)
    assert p["mfu"] is None  # CPU: no peak figure
    assert 0.05 < p["peak_mem_gb"] < 64  # the process holds torch at least: ~0.3 GiB resident
    b = p["breakdown_s"]
    assert set(b) == set(PHASES) and all(v >= 0 for v in b.values())
    assert b["forward"] > 0 and b["backward"] > 0 and b["optimizer"] > 0 and b["data"] > 0
    # the phases cover the step from its first to its last line: they add up to the measured step time
    timed = p["timed_step_s"]
    assert timed == pytest.approx(sum(p["timed_step_times_s"]) / len(p["timed_step_times_s"]), rel=1e-12)
    assert sum(b.values()) == pytest.approx(timed, rel=0.02, abs=1e-3)
    assert all(math.isfinite(x) for x in p["losses"]) and p["skipped_steps"] == 0


def test_bench_throughput_tiny_writes_table_json_and_svg(tmp_path, capsys):
    from engine.cli import BENCHES, main

    assert BENCHES["throughput"][0] == "engine.bench.throughput"
    out = tmp_path / "res" / "tp.json"
    assert main(["bench", "throughput", TINY, *SMALL, "--warmup", "1", "--iters", "3", "--breakdown-iters", "2",
                 "--json", str(out)]) == 0
    text = capsys.readouterr().out
    res = json.loads(out.read_text())
    assert res["command"].startswith("tessera bench throughput ") and "--breakdown-iters 2" in res["command"]
    assert res["world_size"] == 1 and res["phases"] == list(PHASES) and res["sweep"] == {}
    assert "CPU" in res["device"] and "say nothing about GPU speed" in res["note"]
    (p,) = res["points"]
    assert p["label"] == "base" and len(p["step_times_s"]) == 3 and len(p["timed_step_times_s"]) == 2
    assert len(p["losses"]) == 5
    _check_point(p)
    # the table: header, separator, one row per point
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| point | s/step (min) | tokens/s | TFLOP/s/device | MFU | peak mem GiB | data |")
    assert len(rows) == 2 and rows[1].startswith("| base | ") and "| n/a |" in rows[1]
    # the SVG beside the JSON: one bar segment per non-empty phase, a legend entry per phase
    svg = ET.parse(out.with_suffix(".svg")).getroot()
    ns = "{http://www.w3.org/2000/svg}"
    titled = [r for r in svg.iter(f"{ns}rect") if r.find(f"{ns}title") is not None]
    assert {r.find(f"{ns}title").text.split(":")[0] for r in titled} == {ph for ph in PHASES if p["breakdown_s"][ph] > 0}
    assert {t.text for t in svg.iter(f"{ns}text")} >= set(PHASES)


def test_sweep_gives_one_row_per_grid_point(tmp_path, capsys):
    from engine.bench.throughput import main

    out = tmp_path / "sweep.json"
    assert main([TINY, *SMALL, "--sweep", "model.d_model=32,64", "--sweep", "train.micro_batch_size=1,2",
                 "--warmup", "0", "--iters", "1", "--breakdown-iters", "1", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["sweep"] == {"model.d_model": ["32", "64"], "train.micro_batch_size": ["1", "2"]}
    labels = [p["label"] for p in res["points"]]
    assert labels == ["model.d_model=32, train.micro_batch_size=1", "model.d_model=32, train.micro_batch_size=2",
                      "model.d_model=64, train.micro_batch_size=1", "model.d_model=64, train.micro_batch_size=2"]
    assert [p["micro_batch_size"] for p in res["points"]] == [1, 2, 1, 2]
    params = [p["model_params"] for p in res["points"]]
    assert params[0] == params[1] < params[2] == params[3]  # d_model changes the model, micro-batch does not
    for p in res["points"]:
        _check_point(p)
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| model.d_model=")]
    assert len(rows) == 4


def test_sweep_parsing():
    assert _split_values("64,128") == ["64", "128"]
    assert _split_values("[0.9,0.95],[0.9,0.99]") == ["[0.9,0.95]", "[0.9,0.99]"]  # list values keep their commas
    sweeps = parse_sweeps(["model.d_model=64,128", "train.recompute=none,selective"])
    assert sweeps == [("model.d_model", ["64", "128"]), ("train.recompute", ["none", "selective"])]
    assert sweep_points(sweeps) == [{"model.d_model": "64", "train.recompute": "none"},
                                    {"model.d_model": "64", "train.recompute": "selective"},
                                    {"model.d_model": "128", "train.recompute": "none"},
                                    {"model.d_model": "128", "train.recompute": "selective"}]
    assert sweep_points([]) == [{}]
    with pytest.raises(ConfigError, match=r"--sweep 'model.d_model': expected section.key=v1,v2"):
        parse_sweeps(["model.d_model"])
    with pytest.raises(ConfigError, match="empty key or value"):
        parse_sweeps(["model.d_model=64,"])
    with pytest.raises(ConfigError, match="the benchmark sets train.iters itself"):
        parse_sweeps(["train.iters=10,20"])
    with pytest.raises(ConfigError, match="given twice"):
        parse_sweeps(["model.d_model=64", "model.d_model=128"])
    assert "train.out_dir" in BENCH_SET


def test_bad_sweep_point_fails_before_anything_runs(tmp_path, capsys):
    from engine.bench.throughput import main

    with pytest.raises(ConfigError, match="model.d_model"):
        main([TINY, *SMALL, "--sweep", "model.d_model=32,-5", "--json", str(tmp_path / "x.json")])
    assert not (tmp_path / "x.json").exists() and "| point |" not in capsys.readouterr().out


def test_step_timer_is_off_by_default_and_moves_tp_collective_time_to_communication():
    import time

    import torch

    from engine.train.timing import StepTimer

    t = StepTimer(torch.device("cpu"))
    t.begin()
    t.lap("forward")
    assert t.end() is None and t.steps == []  # off: nothing recorded, nothing synchronised

    class _State:  # what enable() reads and writes of a ParallelState
        tp, comm_timer = 2, None

    st = _State()
    t.enable(st)
    assert st.comm_timer is not None
    t.begin()
    time.sleep(0.002)
    st.comm_timer.seconds += 0.001  # as the CommTimer hook does inside a tp collective of the forward
    t.lap("forward")
    with pytest.raises(ValueError, match="unknown phase 'fwd'"):
        t.lap("fwd")
    rec = t.end()
    assert rec["communication"] == pytest.approx(0.001) and rec["forward"] > 0
    assert rec["total"] == pytest.approx(sum(rec[p] for p in PHASES), rel=1e-12)
    assert t.take() == [rec] and t.steps == []
    t.disable()
    assert st.comm_timer is None and not t.enabled
