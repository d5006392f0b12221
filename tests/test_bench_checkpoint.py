"""`tessera bench checkpoint` runs end to end on a tiny model and writes what it measured (no timing
assertions: the numbers only have to be consistent with each other)."""

import json

from engine.bench.checkpoint import main


def test_bench_checkpoint_smoke(tmp_path, capsys):
    out = tmp_path / "checkpoint.json"
    work = tmp_path / "work"
    assert main(["--preset", "tiny", "--d-model", "32", "--layers", "2", "--heads", "4", "--ffn", "64",
                 "--vocab", "257", "--seq-len", "16", "--reps", "2", "--steps", "1", "--device", "cpu",
                 "--dir", str(work), "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["command"].startswith("tessera bench checkpoint --preset tiny")
    assert res["params"] > 0 and res["model"]["d_model"] == 32 and res["model"]["n_layers"] == 2
    # fp32 parameters + two AdamW moments, all of it on disk (plus DCP's index and tessera.json)
    assert res["state_bytes"] >= 12 * res["params"]
    assert res["disk_bytes"] >= res["state_bytes"] and res["files"] >= 3
    assert res["load_restored"] is True
    for key in ("sync_save_s", "async_blocked_s", "async_blocked_saver_s", "async_total_s", "load_warm_s",
                "load_cold_s", "step_idle_s", "async_total_training_s"):
        s = res[key]
        assert len(s["all"]) >= 2 and 0 < s["min"] <= s["median"] <= s["max"], key
    for blocked, total in zip(res["async_blocked_saver_s"]["all"], res["async_total_s"]["all"]):
        assert blocked <= total  # the write's clock starts where the staging's does
    for saver, loop in zip(res["async_blocked_saver_s"]["all"], res["async_blocked_s"]["all"]):
        assert saver <= loop  # the loop's call also builds the state's views and tessera.json
    assert res["first_sync_save_s"] > 0 and res["first_async_total_s"] >= res["first_async_blocked_s"] > 0
    assert res["blocked_pct_of_sync"] > 0 and isinstance(res["target_met"], bool)
    assert len(res["steps_during_write"]) == len(res["async_cost_to_training_s"]["all"]) == 2
    assert not list(work.iterdir())  # the checkpoints were deleted on exit
    printed = capsys.readouterr().out
    assert "| sync save (training blocked) |" in printed and "target <= 10%" in printed
