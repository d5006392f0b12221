"""Every Triton kernel compiles for an H100 (sm_90a) and an A100 (sm_80) on this GPU-less machine.

The CPU interpreter accepts code the real compiler rejects (and the reverse), so this catches a
GPU-only compile error before a GPU session does. It runs `python -m engine.kernels.aot` in a
subprocess because the interpreter flag is fixed when triton is first imported. Where the bundled
ptxas accepts the PTX, the memory-bound kernels (tile sizes chosen from these register counts)
must not spill registers.
"""
import json
import os
import subprocess
import sys

import pytest

kernels = pytest.importorskip("engine.kernels")
if not kernels.TRITON_AVAILABLE:
    pytest.skip("triton not installed", allow_module_level=True)
pytest.importorskip("triton.backends.nvidia", reason="triton without its NVIDIA backend")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("arch", [90, 80])
def test_all_kernels_compile_for_gpu(tmp_path, arch):
    out = tmp_path / "aot.json"
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    proc = subprocess.run([sys.executable, "-m", "engine.kernels.aot", "--arch", str(arch), "--json", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    failed = [(r["name"], r.get("error")) for r in results if not r["ok"]]
    assert not failed, failed
    names = {r["name"].split()[0] for r in results}
    assert {"_attn_fwd", "_attn_bwd_dkdv", "_attn_bwd_dq", "_norm_fwd", "_norm_bwd", "_rope_kernel",
            "_swiglu_fwd", "_ce_stats", "_ce_bwd"} <= names
    spilled = [(r["name"], r["spill_bytes"]) for r in results
               if not r["name"].startswith(("_attn", "_bwd_pre")) and r.get("spill_bytes", 0) > 0]
    assert not spilled, spilled
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_refuses_to_run_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "engine.kernels.aot"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "TRITON_INTERPRET=0" in proc.stderr
