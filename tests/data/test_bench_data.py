"""`tessera bench data` runs end to end on a tiny setting and writes its JSON."""

import json

from engine.bench.data import main


def test_bench_data_smoke(tmp_path, capsys):
    out = tmp_path / "b.json"
    assert main(["--input", "builtin:pydoc", "--workers", "1", "--num-docs", "2000", "--seq-len", "64",
                 "--blend-size", "500", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["preprocess"][0]["tokens"] > 400_000 and res["indices"][0]["documents"] == 2000
    assert all(r.get("identical", True) for r in res["indices"])
    assert "index building" in capsys.readouterr().out
