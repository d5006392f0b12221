"""`tessera bench fp8` runs end to end on the CPU (tiny sizes; its numbers mean nothing there and say so)."""

from __future__ import annotations

import json

import pytest

from engine.bench.fp8 import main


def test_bench_fp8_matmul_writes_every_recipe(tmp_path, capsys):
    out = tmp_path / "mm.json"
    assert main(["matmul", "--m", "32", "--k", "32", "--n", "48", "--iters", "1", "--warmup", "0",
                 "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert [r["kernel"] for r in res["results"]] == ["bf16 F.linear", "fp8 tensorwise", "fp8 rowwise", "fp8 delayed"]
    assert res["shape"] == [32, 32, 48] and all(r["fwd_s"] > 0 and r["fwd_bwd_s"] > 0 for r in res["results"])
    assert "NOT GPU performance figures" in capsys.readouterr().out


@pytest.mark.slow
def test_bench_fp8_train_runs_both_precisions(tmp_path):
    out = tmp_path / "train.json"
    assert main(["train", "--steps", "3", "--warmup", "1", "--json", str(out), "model.n_layers=1"]) == 0
    res = json.loads(out.read_text())
    assert set(res["runs"]) == {"bf16", "fp8 tensorwise"}
    assert res["runs"]["fp8 tensorwise"]["fp8_linears"] == 7  # q, k, v, o, gate, up, down of the one block
    assert all(len(r["losses"]) == 3 for r in res["runs"].values())
