"""Compile the Triton kernels ahead of time for a GPU target, on a machine without a GPU.

    TRITON_INTERPRET=0 python -m engine.kernels.aot                 # sm_90a (H100): registers, spills, smem
    TRITON_INTERPRET=0 python -m engine.kernels.aot --arch 80 --all-configs --json out.json

Two uses: a GPU-only compile error (a construct the CPU interpreter accepts but the compiler
does not) shows up on CPU CI (tests/kernels/test_compile_gpu.py), and register counts and
spills per thread can be read without a GPU: they decide how many warps fit on an SM, which
is how the norm and RoPE tile sizes were chosen.

Kernels are compiled as the launcher specialises them at run time: pointers 16-byte aligned and
strides divisible by 16 (`tt.divisibility`), bf16 data, fp32 statistics. ptxas (bundled with
triton) reports registers/spills; the PTX alone is produced when no ptxas accepts it.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Callable, Optional

_BF16 = {"X", "Y", "DY", "DX", "W", "B", "Q", "K", "V", "O", "QO", "KO", "G", "U", "DO", "DG", "DU", "DQ", "DK", "DV"}
_FP32 = {"MEAN", "RSTD", "DW_PART", "DB_PART", "COS", "SIN", "LSE", "DELTA", "COEF", "M_OUT", "S_OUT", "XT_OUT",
         "SUM_OUT"}
_I64 = {"T", "POS"}
_I32 = {"DOC", "DOC_START", "DOC_END"}
_FLOATS = {"eps", "smooth", "z2", "smooth_over_v", "qk_scale", "sm_scale"}


@dataclass
class Build:
    name: str
    kernel: Callable[[], object]  # returns the JITFunction or Autotuner (imported lazily)
    constexprs: dict
    num_warps: int
    num_stages: int = 3
    types: Optional[dict] = None  # per-kernel overrides of the name-based argument types


def _signature(params: list[str], constexprs: dict, overrides: Optional[dict] = None) -> dict[str, str]:
    def ty(p: str) -> str:
        if p in constexprs:
            return "constexpr"
        if overrides and p in overrides:
            return overrides[p]
        if p in _BF16:
            return "*bf16"
        if p in _FP32:
            return "*fp32"
        if p in _I64:
            return "*i64"
        if p in _I32:
            return "*i32"
        return "fp32" if p in _FLOATS else "i32"

    return {p: ty(p) for p in params}


def _ptxas_info(ptx: str, arch: str) -> dict:
    """Registers and spill bytes from the first bundled ptxas that accepts this PTX version."""
    import triton

    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        for exe in ("ptxas-blackwell", "ptxas"):
            exe_path = os.path.join(bin_dir, exe)
            if not os.path.exists(exe_path):
                continue
            out = subprocess.run([exe_path, f"-arch={arch}", "-v", path, "-o", os.devnull],
                                 capture_output=True, text=True)
            text = out.stdout + out.stderr
            regs = re.search(r"Used (\d+) registers", text)
            if out.returncode == 0 and regs:
                spills = re.search(r"(\d+) bytes spill stores", text)
                return dict(registers=int(regs.group(1)), spill_bytes=int(spills.group(1)) if spills else 0,
                            ptxas=exe)
    return {}


def compile_one(b: Build, arch: int = 90) -> dict:
    """Compile one kernel for sm_<arch>; returns {name, ok, shared_kib, registers, ...} or the error."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kern = b.kernel()
    jit = kern.fn if hasattr(kern, "configs") else kern  # Autotuner wraps the JITFunction
    params = list(inspect.signature(jit.fn).parameters)
    sig = _signature(params, b.constexprs, b.types)
    attrs = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(params)
             if sig[p].startswith("*") or p.startswith("stride")}
    res: dict = dict(name=b.name, num_warps=b.num_warps, num_stages=b.num_stages,
                     constexprs={k: v for k, v in b.constexprs.items() if k.startswith("BLOCK") or k == "ROWS"})
    try:
        src = ASTSource(fn=jit, signature=sig, constexprs={(params.index(k),): v for k, v in b.constexprs.items()},
                        attrs=attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                  options=dict(num_warps=b.num_warps, num_stages=b.num_stages))
    except Exception as e:  # noqa: BLE001 - the report says which kernel failed and why
        return dict(res, ok=False, error=f"{type(e).__name__}: {str(e)[:500]}")
    res.update(ok=True, shared_kib=round(compiled.metadata.shared / 1024, 1))
    res.update(_ptxas_info(compiled.asm["ptx"], f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"))
    return res


def builds(all_configs: bool = False, head_dim: int = 128, hidden: int = 4096) -> list[Build]:
    """What the host code launches for a Llama-like layer (head dim, hidden width as given)."""
    # the submodules, not the package's functions of the same names (flash_attention, swiglu, ...)
    fa, norms, rope, swiglu, ce = (importlib.import_module(f"{__package__}.{m}") for m in
                                   ("flash_attention", "norms", "rope", "swiglu", "cross_entropy"))
    import triton

    out: list[Build] = []
    block_d = max(16, triton.next_power_of_2(head_dim))
    attn = dict(HEAD_DIM=head_dim, BLOCK_D=block_d, INPUT_PREC="tf32")
    for kname, configs in (("_attn_fwd", fa._FWD_CONFIGS), ("_attn_bwd_dkdv", fa._DKDV_CONFIGS),
                           ("_attn_bwd_dq", fa._DQ_CONFIGS)):
        for cfg in configs if all_configs else configs[:1]:
            for causal, docs in ((True, False), (False, True)):
                out.append(Build(f"{kname} causal={causal} docs={docs}", lambda k=kname: getattr(fa, k),
                                 dict(attn, CAUSAL=causal, HAS_DOCS=docs, **cfg.kwargs), cfg.num_warps,
                                 cfg.num_stages))
    out.append(Build("_bwd_preprocess", lambda: fa._bwd_preprocess,
                     dict(HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK=64), 4))
    for rms in (True, False):
        tag = "rms" if rms else "layer"
        bm, bd, w = norms._block_sizes(hidden)
        out.append(Build(f"_norm_fwd {tag} D={hidden}", lambda: norms._norm_fwd,
                         dict(IS_RMS=rms, HAS_BIAS=not rms, BLOCK_M=bm, BLOCK_D=bd), w))
        bm, bd, w = norms._bwd_block_sizes(hidden, rms)
        out.append(Build(f"_norm_bwd {tag} D={hidden}", lambda: norms._norm_bwd,
                         dict(IS_RMS=rms, HAS_BIAS=not rms, BLOCK_M=bm, BLOCK_D=bd), w))
    rows, block_half, warps = rope._tile(head_dim)
    for sign, has_pos in ((1.0, False), (-1.0, True)):
        out.append(Build(f"_rope_kernel sign={sign:+.0f} pos={has_pos}", lambda: rope._rope_kernel,
                         dict(SIGN=sign, HAS_POS=has_pos, ROWS=rows, BLOCK_HALF=block_half), warps))
    out.append(Build("_swiglu_fwd", lambda: swiglu._swiglu_fwd, dict(BLOCK=swiglu._BLOCK), 8))
    out.append(Build("_swiglu_bwd", lambda: swiglu._swiglu_bwd, dict(BLOCK=swiglu._BLOCK), 8))
    ce_types = {"X": "*bf16", "DX": "*bf16", "V": "i32"}  # V is the vocab width here, not a tensor
    out.append(Build("_ce_stats", lambda: ce._ce_stats, dict(BLOCK_V=4096), 8, types=ce_types))
    out.append(Build("_ce_bwd", lambda: ce._ce_bwd, dict(BLOCK_V=4096), 8, types=ce_types))
    return out


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m engine.kernels.aot", description=__doc__.split("\n")[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: H100/H200, 80: A100)")
    p.add_argument("--all-configs", action="store_true", help="every attention autotune config, not the first")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--json", default=None, help="also write the results here")
    a = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("engine.kernels.aot compiles real GPU code: run it with TRITON_INTERPRET=0 "
              "(the interpreter flag is read when triton is imported)", file=sys.stderr)
        return 2
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns when unset; 1 is the default
    from . import TRITON_AVAILABLE

    if not TRITON_AVAILABLE:
        print("triton is not installed", file=sys.stderr)
        return 1
    results = []
    for b in builds(a.all_configs, a.head_dim, a.hidden):
        r = compile_one(b, a.arch)
        results.append(r)
        if r["ok"]:
            regs = f"{r['registers']:3d} regs, {r['spill_bytes']:4d} B spilled" if "registers" in r else "no ptxas"
            print(f"  {r['name']:44s} warps {r['num_warps']:2d} stages {r['num_stages']} "
                  f"smem {r['shared_kib']:6.1f} KiB  {regs}  {r['constexprs']}", flush=True)
        else:
            print(f"  {r['name']:44s} FAILED {r['error']}", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(arch=a.arch, results=results), f, indent=1)
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
