"""examples/continued_pretraining: its configs are valid (also with run.py's overrides), and run.py's table,
CSV and plot code works on small synthetic metrics. No training, except in the slow end-to-end test."""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from engine.config import load_config

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "continued_pretraining"


@pytest.fixture(scope="module")
def run():
    spec = importlib.util.spec_from_file_location("continued_example_run", EXAMPLE / "run.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_configs_valid(run, tmp_path):
    pre = load_config(str(EXAMPLE / "pretrain.yaml"), [])
    assert [d.path for d in pre.data.train] == ["builtin:pydoc"]
    assert [d.name for d in pre.data.valid] == ["docs", "code"]
    assert pre.checkpoint.dir
    for replay in run.REPLAYS:
        cfg = load_config(str(EXAMPLE / "continue.yaml"), run.common_overrides(tmp_path) + [
            run.train_override(replay), f"train.out_dir={tmp_path / run.run_name(replay)}"])
        weights = {d.path: d.weight for d in cfg.data.train}
        if replay == 0:
            assert list(weights) == ["builtin:stdlib"]
        else:
            assert weights == {"builtin:stdlib": pytest.approx(1 - replay), "builtin:pydoc": pytest.approx(replay)}
        assert [d.name for d in cfg.data.valid] == ["docs", "code"]
        assert {d.name for d in cfg.data.train}.isdisjoint({"docs", "code"})  # names share one namespace
        assert cfg.data.valid[0].path == str(tmp_path / "valid" / "docs.jsonl")
        assert cfg.checkpoint.init_from and cfg.checkpoint.reset_schedule and cfg.checkpoint.reset_optimizer
        assert cfg.data.split == pre.data.split == run.SPLIT
        assert cfg.optim.warmup_init_lr == pre.optim.min_lr  # re-warm from where phase 1 ended
        assert cfg.model == pre.model and cfg.data.tokenizer == pre.data.tokenizer
    assert run.run_name(0.05) == "replay5" and run.run_name(0.25) == "replay25"


def _fake_run(path: Path, docs: list[float], code: list[float]) -> None:
    path.mkdir(parents=True)
    with open(path / "metrics.jsonl", "w") as f:
        for i, (d, c) in enumerate(zip(docs, code)):
            f.write(json.dumps({"step": 10 * i, "loss": 1.0, "lr": 1e-3}) + "\n")  # a train record: ignored
            f.write(json.dumps({"step": 10 * i, "val_loss": (d + c) / 2, "val_loss/docs": d, "val_loss/code": c,
                                "val_delta/docs": d - docs[0], "val_delta/code": c - code[0]}) + "\n")


def test_report_on_synthetic_metrics(run, tmp_path, capsys, monkeypatch):
    _fake_run(tmp_path / "replay0", [1.0, 1.2, 1.4], [2.0, 1.5, 1.0])
    _fake_run(tmp_path / "replay5", [1.0, 1.1, 1.1], [2.0, 1.5, 1.01])
    _fake_run(tmp_path / "replay25", [1.0, 1.0, 1.05], [2.0, 1.6, 1.1])
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    runs = run.report(tmp_path)
    out = capsys.readouterr().out
    assert list(runs) == ["replay0", "replay5", "replay25"]
    assert runs["replay5"]["docs"] == [(0, 1.0), (10, 1.1), (20, 1.1)]
    assert "| replay0 | 1.0000 | 1.4000 | +0.4000 | 2.0000 | 1.0000 | -1.0000 | - | - |" in out
    assert "| replay5 | 1.0000 | 1.1000 | +0.1000 | 2.0000 | 1.0100 | -0.9900 | 25% | +1.00% |" in out
    assert "new-domain loss falls in every run: yes" in out
    assert "at most half: yes" in out and "within 2%: yes" in out
    assert "matplotlib is not installed" in out
    with open(tmp_path / "val_curves.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 * 2 * 3
    assert rows[0] == {"run": "replay0", "domain": "docs", "step": "0", "val_loss": "1.000000"}


def test_target_reports_a_miss(run):
    runs = {"replay0": {"docs": [(0, 1.0), (5, 1.2)], "code": [(0, 2.0), (5, 1.0)]},
            "replay5": {"docs": [(0, 1.0), (5, 1.15)], "code": [(0, 2.0), (5, 1.05)]}}
    lines = run.target(runs)
    assert "at most half: NO" in lines[1] and "within 2%: NO" in lines[2]


def test_plot_when_matplotlib_is_installed(run, tmp_path):
    pytest.importorskip("matplotlib")
    runs = {"replay0": {"docs": [(0, 1.0), (5, 1.2)], "code": [(0, 2.0), (5, 1.0)]}}
    assert run.plot(runs, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_valid_sets_are_held_out(run, tmp_path):
    """The validation files hold exactly the documents of the validation part of data.split, so no training
    set of the example (the train part of the same split) contains them."""
    from engine.data.build import split_ranges
    from engine.data.sources import iter_pydoc

    paths = run.write_valid_sets(tmp_path)
    docs = [d for d in iter_pydoc() if d]
    (tlo, thi), (vlo, vhi), _ = split_ranges(len(docs), run.SPLIT)
    held = [json.loads(line)["text"] for line in open(paths["docs"])]
    assert held == docs[vlo:vhi] and thi == vlo
    assert not set(held) & set(docs[tlo:thi])
    assert sum(1 for _ in open(paths["code"])) > 0


@pytest.mark.slow
def test_example_end_to_end(run, tmp_path):
    """The whole example at a few steps per run (minutes on 2 cores)."""
    assert run.main(["--work-dir", str(tmp_path), "train.iters=6", "train.eval_interval=3", "train.eval_iters=1",
                     "optim.warmup_iters=2"]) == 0
    for replay in run.REPLAYS:
        curves = run.read_curves(tmp_path / run.run_name(replay) / "metrics.jsonl")
        assert [s for s, _ in curves["docs"]] == [0, 3, 6] and [s for s, _ in curves["code"]] == [0, 3, 6]
    assert (tmp_path / "val_curves.csv").is_file()
