"""`tessera bench build` runs end to end on a tiny model at tp 1 and 2 and writes what it measured."""

import json

from engine.bench.build import main


def test_bench_build_smoke(tmp_path, capsys):
    out = tmp_path / "build.json"
    assert main(["--preset", "tiny", "model.vocab_size=257", "model.d_model=64", "model.n_layers=2",
                 "--tp", "1", "2", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    one, two = res["rows"]
    assert (one["tp"], two["tp"]) == (1, 2)
    # a tp-2 rank holds half of every split matrix (the replicated norms are tiny): well under 0.6 of tp 1
    assert 0.4 < two["shard_gb"] / one["shard_gb"] < 0.6
    for r in res["rows"]:
        assert r["seconds"] > 0 and r["peak_rss_gb"] >= r["shard_gb"] and r["rss_before_gb"] > 0
    assert "| 2 |" in capsys.readouterr().out
