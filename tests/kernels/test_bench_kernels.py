"""`tessera bench kernels` runs end to end (CPU: interpreter, tiny shapes) and writes its JSON."""
import json

import pytest

kernels = pytest.importorskip("engine.kernels")
if not kernels.TRITON_AVAILABLE:
    pytest.skip("triton not installed", allow_module_level=True)

from engine.bench.kernels import main  # noqa: E402


def test_bench_kernels_json(tmp_path):
    out = tmp_path / "k.json"
    assert main(["--only", "copy", "swiglu", "--no-compile", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    rows = {(r["kernel"], r["impl"], r["pass_"]): r for r in data["results"]}
    for impl in ("triton", "eager"):
        for pass_ in ("fwd", "bwd", "fwd+bwd"):
            r = rows[("swiglu", impl, pass_)]
            assert r["unit"] == "GB/s" and r["ms"] > 0 and r["value"] > 0
    assert ("copy", "torch", "fwd") in rows
    assert data["env"]["torch"] and data["checks"] == []
