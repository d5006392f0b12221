"""Benchmark Tessera's Triton kernels against torch (SDPA / eager / torch.compile).

    tessera bench kernels --json out.json
    tessera bench kernels --only attention --batch 32 --heads 16 --seq 4096 --head-dim 128
    tessera bench kernels --check        # bf16 correctness at realistic shapes first

Attention is reported in TFLOP/s (forward 4*B*H*N^2*D, half of it when causal;
backward 2.5x the forward), the other kernels in GB/s of the fewest bytes they
must move (each input read once, each output written once). The same run also
measures the two ceilings: a device-to-device copy (GB/s, read + write) and a
bf16 matrix product (TFLOP/s). CUDA timings are ``triton.testing.do_bench``
medians. On a machine without CUDA the kernels run in the triton interpreter
on tiny shapes: the numbers only show that the code runs.

Passes per kernel: ``fwd``; ``bwd`` alone (backward of one kept forward, retain_graph);
``fwd+bwd`` as a training step runs it; on CUDA ``fwd+bwd graph``, the same replayed
from a CUDA graph (GPU time only). ``host us`` is the host time per eager call when the
GPU is not waited for: where it exceeds the GPU time, the eager figure measures Python
and launch overhead rather than the kernels.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

CUDA = torch.cuda.is_available()
ALL = ("copy", "matmul", "attention", "rmsnorm", "layernorm", "rope", "swiglu", "cross_entropy")


# --------------------------------------------------------------------------- timing
def _time_ms(fn: Callable[[], object]) -> float:
    """Median milliseconds of fn()."""
    if CUDA:
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()  # warm-up (compile/trace)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _forward_once(fn: Callable[[], torch.Tensor | tuple]) -> tuple[tuple, list[torch.Tensor]]:
    """One forward's outputs and a fixed random upstream gradient for each."""
    out = fn()
    outs = out if isinstance(out, tuple) else (out,)
    return outs, [torch.randn_like(o) for o in outs]


def _fwd_bwd(fn: Callable[[], torch.Tensor | tuple], inputs: list[torch.Tensor]) -> Callable[[], None]:
    """A closure running forward + backward with a fixed random upstream gradient."""
    _, grads = _forward_once(fn)

    def run():
        for t in inputs:
            t.grad = None
        o = fn()
        torch.autograd.backward(o if isinstance(o, tuple) else (o,), grads)

    return run


def _bwd_only(fn: Callable[[], torch.Tensor | tuple], inputs: list[torch.Tensor]) -> Callable[[], None]:
    """A closure running only the backward of one kept forward (retain_graph), so the backward
    kernels are timed without the forward."""
    outs, grads = _forward_once(fn)

    def run():
        for t in inputs:
            t.grad = None
        torch.autograd.backward(outs, grads, retain_graph=True)

    return run


def _graphed(run: Callable[[], None]) -> Callable[[], None]:
    """run() captured in a CUDA graph: replaying it costs one launch, so its time is GPU time only.

    The gap between this and the eager time is host overhead (Python autograd, launches,
    allocations) that the GPU waited for."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (autotuning, allocator) outside the capture
        for _ in range(3):
            run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    return graph.replay


def _host_us(run: Callable[[], object], n: int = 20) -> float:
    """Host microseconds per call when the GPU is not waited for (launch + Python overhead);
    nan without CUDA or when run() fails (its timing row then reports the failure)."""
    if not CUDA:
        return float("nan")
    try:
        run()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            run()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
    except Exception:  # noqa: BLE001
        return float("nan")
    return (t1 - t0) / n * 1e6


def _time_passes(t: "Table", kernel: str, name: str, shape: str, fn: Callable, inputs: list[torch.Tensor],
                 unit: str, fwd_amount: float, bwd_amount: float) -> None:
    """Rows for fwd, bwd (alone), fwd+bwd and, on CUDA, fwd+bwd replayed from a CUDA graph."""
    f_ms = _safe(t, kernel, name, shape, "fwd", fn, unit, fwd_amount, host_us=_host_us(fn))
    if f_ms is None:
        return
    for pass_, make, amount in (("bwd", _bwd_only, bwd_amount), ("fwd+bwd", _fwd_bwd, fwd_amount + bwd_amount)):
        try:
            run = make(fn, inputs)
        except Exception as e:  # noqa: BLE001 - report and go on with the other passes
            print(f"  {kernel} {name} {pass_}: failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
            continue
        _safe(t, kernel, name, shape, pass_, run, unit, amount, host_us=_host_us(run))
        if pass_ == "fwd+bwd" and CUDA:
            try:
                replay = _graphed(run)
            except Exception as e:  # noqa: BLE001 - some baselines cannot be captured
                print(f"  {kernel} {name} fwd+bwd graph: failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
                continue
            _safe(t, kernel, name, shape, "fwd+bwd graph", replay, unit, amount)


def _maybe_compile(fn, enabled: bool):
    if not enabled:
        return None
    try:
        return torch.compile(fn)
    except Exception as e:  # noqa: BLE001 - report and go on without the baseline
        print(f"# torch.compile unavailable: {e}", file=sys.stderr)
        return None


class Table:
    def __init__(self) -> None:
        self.rows: list[dict] = []

    def add(self, kernel: str, impl: str, shape: str, pass_: str, ms: float, unit: str, value: float,
            note: str = "", host_us: float = float("nan")) -> None:
        host = None if math.isnan(host_us) else round(host_us, 1)
        self.rows.append(dict(kernel=kernel, impl=impl, shape=shape, pass_=pass_, ms=round(ms, 4),
                              unit=unit, value=round(value, 2), host_us=host, note=note))
        print(f"  {kernel:14s} {impl:16s} {pass_:13s} {ms:10.3f} ms {value:10.1f} {unit:7s} "
              f"{'' if host is None else f'host {host:7.1f} us'} {shape} {note}", flush=True)

    def render(self) -> str:
        head = f"{'kernel':14s} {'impl':16s} {'pass':13s} {'ms':>10s} {'value':>10s} {'unit':7s} {'host us':>8s}"
        lines = [head, "-" * len(head)]
        for r in self.rows:
            host = "" if r["host_us"] is None else f"{r['host_us']:8.1f}"
            lines.append(f"{r['kernel']:14s} {r['impl']:16s} {r['pass_']:13s} {r['ms']:10.3f} "
                         f"{r['value']:10.1f} {r['unit']:7s} {host}")
        return "\n".join(lines)


def _safe(table: Table, kernel: str, impl: str, shape: str, pass_: str, fn, unit: str, amount: float,
          host_us: float = float("nan")):
    """Time fn and add a row; amount is FLOPs (TFLOP/s) or bytes (GB/s)."""
    try:
        ms = _time_ms(fn)
    except Exception as e:  # noqa: BLE001 - a baseline that cannot run here is reported, not fatal
        print(f"  {kernel} {impl} {pass_}: failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
        return None
    scale = 1e-12 if unit == "TFLOP/s" else 1e-9
    table.add(kernel, impl, shape, pass_, ms, unit, amount / (ms * 1e-3) * scale, host_us=host_us)
    return ms


# --------------------------------------------------------------------------- ceilings
def bench_copy(t: Table, a) -> None:
    n = (1 << 29) if CUDA else (1 << 20)  # 1 GiB of bf16 on CUDA
    x = torch.randn(n, device=a.device, dtype=torch.bfloat16)
    y = torch.empty_like(x)
    _safe(t, "copy", "torch", f"{n}", "fwd", lambda: y.copy_(x), "GB/s", 2 * x.numel() * 2)


def bench_matmul(t: Table, a) -> None:
    n = 8192 if CUDA else 256
    x = torch.randn(n, n, device=a.device, dtype=torch.bfloat16 if CUDA else torch.float32)
    y = torch.randn_like(x)
    _safe(t, "matmul", "torch", f"{n}^3", "fwd", lambda: x @ y, "TFLOP/s", 2 * n**3)


# --------------------------------------------------------------------------- attention
def bench_attention(t: Table, a) -> None:
    from engine.kernels.flash_attention import flash_attention
    from torch.nn.attention import SDPBackend, sdpa_kernel

    b, h, hkv, n, d = a.batch, a.heads, a.kv_heads or a.heads, a.seq, a.head_dim
    dt = a.dtype
    shape = f"B{b} H{h}/{hkv} N{n} D{d} {str(dt).split('.')[-1]}"
    q = torch.randn(b, h, n, d, device=a.device, dtype=dt, requires_grad=True)
    k = torch.randn(b, hkv, n, d, device=a.device, dtype=dt, requires_grad=True)
    v = torch.randn(b, hkv, n, d, device=a.device, dtype=dt, requires_grad=True)
    for causal in (True, False):
        flops = 4 * b * h * n * n * d * (0.5 if causal else 1.0)
        tag = "causal" if causal else "full"
        impls: list[tuple[str, Callable, list]] = [
            ("triton", lambda: flash_attention(q, k, v, causal=causal), [q, k, v]),
        ]
        if CUDA:
            # GQA: SDPA gets the kv heads repeated (outside the timed region).
            kr = k.detach().repeat_interleave(h // hkv, 1).requires_grad_()
            vr = v.detach().repeat_interleave(h // hkv, 1).requires_grad_()
            for name, backend in (("sdpa-flash", SDPBackend.FLASH_ATTENTION),
                                  ("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION)):
                def run_sdpa(backend=backend):
                    with sdpa_kernel([backend]):
                        return F.scaled_dot_product_attention(q, kr, vr, is_causal=causal)
                impls.append((name, run_sdpa, [q, kr, vr]))
        for name, fn, inputs in impls:
            _time_passes(t, f"attn-{tag}", name, shape, fn, inputs, "TFLOP/s", flops, 2.5 * flops)


# --------------------------------------------------------------------------- memory-bound kernels
def _bench_mem(t: Table, a, kernel: str, impls: dict[str, Callable], inputs: list[torch.Tensor], shape: str,
               fwd_bytes: float, bwd_bytes: float) -> None:
    for name, fn in impls.items():
        if fn is not None:
            _time_passes(t, kernel, name, shape, fn, inputs, "GB/s", fwd_bytes, bwd_bytes)


def bench_norms(t: Table, a, kind: str) -> None:
    from engine.kernels.norms import layer_norm, layer_norm_ref, rms_norm, rms_norm_ref

    m, d = a.tokens, a.hidden
    x = torch.randn(m, d, device=a.device, dtype=a.dtype, requires_grad=True)
    w = torch.randn(d, device=a.device, dtype=a.dtype, requires_grad=True)
    b = torch.randn(d, device=a.device, dtype=a.dtype, requires_grad=True)
    es = x.element_size()
    if kind == "rmsnorm":
        impls = {"triton": lambda: rms_norm(x, w), "eager-fp32": lambda: rms_norm_ref(x, w),
                 "torch-F": (lambda: F.rms_norm(x, (d,), w, 1e-6)) if hasattr(F, "rms_norm") else None}
        ref, args = rms_norm_ref, (x, w)
        inputs = [x, w]
    else:
        impls = {"triton": lambda: layer_norm(x, w, b), "torch-F": lambda: F.layer_norm(x, (d,), w, b)}
        ref, args = layer_norm_ref, (x, w, b)
        inputs = [x, w, b]
    comp = _maybe_compile(ref, a.compile)
    if comp is not None:
        impls["compile"] = lambda: comp(*args)
    # fwd: read x, write y; bwd: read x, dy, write dx (weights are negligible)
    _bench_mem(t, a, kind, impls, inputs, f"{m}x{d}", 2 * m * d * es, 3 * m * d * es)


def bench_rope(t: Table, a) -> None:
    from engine.kernels.rope import apply_rope, apply_rope_ref, rope_cos_sin

    b, h, hkv, n, d = a.rope_batch, a.heads, a.kv_heads or a.heads, a.seq, a.head_dim
    q = torch.randn(b, h, n, d, device=a.device, dtype=a.dtype, requires_grad=True)
    k = torch.randn(b, hkv, n, d, device=a.device, dtype=a.dtype, requires_grad=True)
    cos, sin = rope_cos_sin(n, d, device=a.device)
    impls = {"triton": lambda: apply_rope(q, k, cos, sin), "eager": lambda: apply_rope_ref(q, k, cos, sin)}
    comp = _maybe_compile(apply_rope_ref, a.compile)
    if comp is not None:
        impls["compile"] = lambda: comp(q, k, cos, sin)
    nbytes = (q.numel() + k.numel()) * q.element_size()
    _bench_mem(t, a, "rope", impls, [q, k], f"q{tuple(q.shape)} k{tuple(k.shape)}", 2 * nbytes, 2 * nbytes)


def bench_swiglu(t: Table, a) -> None:
    from engine.kernels.swiglu import swiglu, swiglu_ref

    m, f = a.tokens, a.ffn
    g = torch.randn(m, f, device=a.device, dtype=a.dtype, requires_grad=True)
    u = torch.randn(m, f, device=a.device, dtype=a.dtype, requires_grad=True)
    impls = {"triton": lambda: swiglu(g, u), "eager": lambda: F.silu(g) * u}
    comp = _maybe_compile(swiglu_ref, a.compile)
    if comp is not None:
        impls["compile"] = lambda: comp(g, u)
    es = g.element_size()
    # fwd: read g, u, write out; bwd: read g, u, dout, write dg, du
    _bench_mem(t, a, "swiglu", impls, [g, u], f"{m}x{f}", 3 * m * f * es, 5 * m * f * es)


def bench_cross_entropy(t: Table, a) -> None:
    from engine.kernels.cross_entropy import cross_entropy, cross_entropy_ref

    m, v = a.ce_tokens, a.vocab
    x = torch.randn(m, v, device=a.device, dtype=a.dtype, requires_grad=True)
    y = torch.randint(0, v, (m,), device=a.device)
    impls = {"triton": lambda: cross_entropy(x, y), "eager-fp32": lambda: F.cross_entropy(x.float(), y)}
    comp = _maybe_compile(cross_entropy_ref, a.compile)
    if comp is not None:
        impls["compile"] = lambda: comp(x, y)
    es = x.element_size()
    # fwd: read logits; bwd: read logits, write dlogits
    _bench_mem(t, a, "cross_entropy", impls, [x], f"{m}x{v}", m * v * es, 2 * m * v * es)


# --------------------------------------------------------------------------- main
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tessera bench kernels", description=__doc__.split("\n")[0])
    p.add_argument("--only", nargs="+", choices=ALL, default=list(ALL), help="kernels to run")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None,
                   help="default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--batch", type=int, default=None, help="attention batch (default 32 on CUDA)")
    p.add_argument("--heads", type=int, default=None, help="query heads (default 16 on CUDA)")
    p.add_argument("--kv-heads", type=int, default=None, help="kv heads (default = heads)")
    p.add_argument("--seq", type=int, default=None, help="sequence length (default 4096 on CUDA)")
    p.add_argument("--head-dim", type=int, default=None, help="head dim (default 128 on CUDA)")
    p.add_argument("--tokens", type=int, default=None, help="rows for norms/swiglu (default 16384)")
    p.add_argument("--hidden", type=int, default=None, help="norm width (default 4096)")
    p.add_argument("--ffn", type=int, default=None, help="swiglu width (default 14336)")
    p.add_argument("--vocab", type=int, default=None, help="cross-entropy vocab (default 128256)")
    p.add_argument("--ce-tokens", type=int, default=None, help="cross-entropy rows (default 4096)")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="skip torch.compile baselines")
    p.add_argument("--check", action="store_true",
                   help="first check every kernel's forward and gradients against an fp32 reference "
                        "(realistic bf16 shapes on CUDA, small shapes on CPU)")
    p.add_argument("--json", default=None, help="also write all results here")
    return p


def _defaults(a) -> None:
    big = dict(batch=32, heads=16, seq=4096, head_dim=128, tokens=16384, hidden=4096, ffn=14336,
               vocab=128256, ce_tokens=4096, dtype="bf16")
    tiny = dict(batch=1, heads=2, seq=64, head_dim=32, tokens=64, hidden=128, ffn=256, vocab=500,
                ce_tokens=16, dtype="fp32")
    for key, val in (big if CUDA else tiny).items():
        if getattr(a, key) is None:
            setattr(a, key, val)
    a.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[a.dtype]
    a.device = "cuda" if CUDA else "cpu"
    a.check_dtype = a.dtype if a.dtype != torch.float32 or not CUDA else torch.bfloat16
    a.rope_batch = max(1, a.batch // 4) if CUDA else a.batch
    if not CUDA:
        a.compile = False  # compiling on CPU costs minutes and says nothing about GPU speed


def main(argv: Optional[list[str]] = None) -> int:
    a = _parser().parse_args(argv)
    _defaults(a)
    from engine import kernels

    if not kernels.TRITON_AVAILABLE:
        print("triton is not installed: nothing to benchmark", file=sys.stderr)
        return 1
    import triton

    env = dict(torch=torch.__version__, triton=triton.__version__, python=platform.python_version(),
               device=torch.cuda.get_device_name() if CUDA else "cpu (triton interpreter)")
    print(f"# {env}")
    if not CUDA:
        print("# NOTE: no CUDA GPU: kernels run in the triton interpreter on tiny shapes; "
              "the numbers below are NOT meaningful performance figures.")
    out: dict = dict(env=env, args={k: str(v) for k, v in vars(a).items()}, checks=[], results=[])
    if a.check:
        from engine.kernels.checks import run_checks

        size = "realistic" if CUDA else "small"
        print(f"# correctness ({size} shapes, {a.check_dtype} vs an fp32 reference, relative L2 error)")
        out["checks"] = run_checks(a.device, a.check_dtype, size)
    table = Table()
    print("# timings")
    runners = dict(copy=bench_copy, matmul=bench_matmul, attention=bench_attention,
                   rmsnorm=lambda t, a: bench_norms(t, a, "rmsnorm"),
                   layernorm=lambda t, a: bench_norms(t, a, "layernorm"),
                   rope=bench_rope, swiglu=bench_swiglu, cross_entropy=bench_cross_entropy)
    for name in a.only:
        try:
            runners[name](table, a)
        except Exception as e:  # noqa: BLE001 - one broken kernel must not hide the others
            print(f"  {name}: failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
        if CUDA:
            torch.cuda.empty_cache()
    out["results"] = table.rows
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    print()
    print(table.render())
    if out["checks"]:
        bad = [c["check"] for c in out["checks"] if not c["ok"]]
        print(f"checks: {len(out['checks']) - len(bad)}/{len(out['checks'])} ok" + (f"; FAILED: {bad}" if bad else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
