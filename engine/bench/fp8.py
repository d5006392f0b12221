"""`tessera bench fp8`: FP8 (torch._scaled_mm) against bf16, for one linear and for a training step.

    tessera bench fp8 matmul --m 8192 --k 8192 --n 8192 --json docs/results/bench_fp8_matmul_h100.json
    tessera bench fp8 train --preset llama3.2-1b --steps 60 --json docs/results/bench_fp8_train_h100.json \
        --plot docs/results/fp8_loss_h100.png

matmul: y = x W^T with x [M, K], W [N, K]: the bf16 `F.linear` vs Tessera's FP8 linear (engine/precision/fp8.py)
per recipe, forward alone and forward + backward. The FP8 times include casting the activations (and, in
backward, the gradients); the weight is cast once per optimizer step in training, so it is cast once before
timing here too. Timed with CUDA events after warm-up; the median of `--iters` runs is reported.

train: the same config trained `--steps` steps twice in one process, bf16 and bf16 + precision.fp8 (same seed,
same data), through the Trainer; tokens/s from the median step time after `--warmup` steps, and both loss
curves (JSON, and a PNG overlay when matplotlib is installed).

Without a CUDA GPU both run (small default sizes) so that the script itself is tested, but the numbers say
nothing about GPU speed: the output says so.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from engine.bench import device_name

CUDA = torch.cuda.is_available()
RECIPES = ("tensorwise", "rowwise", "delayed")


def _timer(device: torch.device) -> Callable[[Callable[[], object], int, int], float]:
    """fn, warmup, iters -> median seconds per call."""
    def run(fn: Callable[[], object], warmup: int, iters: int) -> float:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(iters):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize(device)
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        return statistics.median(times)
    return run


def bench_matmul(m: int, k: int, n: int, recipes: list[str], iters: int, warmup: int) -> list[dict]:
    from engine.precision.fp8 import Fp8Linear, StepClock

    device = torch.device("cuda" if CUDA else "cpu")
    timed = _timer(device)
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(m, k, generator=g).to(device, torch.bfloat16).requires_grad_()
    w32 = torch.nn.Parameter((torch.randn(n, k, generator=g) * k ** -0.5).to(device))
    w16 = torch.nn.Parameter(w32.detach().to(torch.bfloat16))
    gy = torch.randn(m, n, generator=g).to(device, torch.bfloat16)
    flops = 2.0 * m * k * n
    rows = []

    def add(name: str, fwd: Callable[[], torch.Tensor]) -> None:
        def step() -> None:
            x.grad = None
            fwd().backward(gy)
        f, fb = timed(lambda: fwd(), warmup, iters), timed(step, warmup, iters)
        rows.append({"kernel": name, "fwd_s": f, "fwd_tflops": flops / f / 1e12,
                     "fwd_bwd_s": fb, "fwd_bwd_tflops": 3 * flops / fb / 1e12})

    add("bf16 F.linear", lambda: F.linear(x, w16))
    for recipe in recipes:
        layer = Fp8Linear("bench", recipe, StepClock(), device=device)
        layer.weight_operands(w32)  # the once-per-step weight cast, outside the timing
        add(f"fp8 {recipe}", lambda layer=layer: layer(x, w32))
    base = rows[0]
    for r in rows:
        r["fwd_speedup"] = base["fwd_s"] / r["fwd_s"]
        r["fwd_bwd_speedup"] = base["fwd_bwd_s"] / r["fwd_bwd_s"]
    return rows


def bench_train(preset: str, steps: int, warmup: int, seq: int, micro: int, overrides: list[str],
                recipe: str) -> dict:
    from engine.config import load_config
    from engine.parallel.state import ParallelState
    from engine.train.flops import peak_dtype, peak_tflops, training_flops_per_token
    from engine.train.trainer import Trainer

    out: dict = {"runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for label, fp8 in (("bf16", []), (f"fp8 {recipe}", [f"precision.fp8.recipe={recipe}"])):
            cfg = load_config(None, [f"model.preset={preset}", f"data.seq_len={seq}", "data.train=builtin:pydoc",
                                     f"train.micro_batch_size={micro}", f"train.global_batch_size={micro}",
                                     f"train.iters={steps}", f"train.out_dir={tmp}/{label.replace(' ', '_')}",
                                     f"data.cache_dir={tmp}/cache", "train.eval_interval=0",
                                     "precision.dtype=bf16", "optim.warmup_iters=10", *overrides, *fp8])
            pstate = ParallelState.single("cuda" if CUDA else "cpu")
            torch.manual_seed(cfg.train.seed)
            t = Trainer(cfg, pstate)
            res = [t.train_step() for _ in range(steps)]
            t.close()
            sec = statistics.median(r.seconds for r in res[warmup:]) if steps > warmup else float("nan")
            tokens = cfg.train.global_batch_size * cfg.seq_len
            tflops = training_flops_per_token(cfg.model, cfg.seq_len) * tokens / sec / 1e12
            peak = peak_tflops(pstate.device, peak_dtype("bf16", bool(fp8)))
            out["runs"][label] = {"step_s": sec, "tokens_per_s": tokens / sec, "tflops": tflops,
                                  "mfu": tflops / peak if peak else None, "mfu_peak": peak_dtype("bf16", bool(fp8)),
                                  "losses": [r.loss for r in res],
                                  "fp8_linears": len(t.built.fp8.layers) if t.built.fp8 else 0}
            del t
            if CUDA:
                torch.cuda.empty_cache()
    runs = list(out["runs"].values())
    out["speedup_tokens_per_s"] = runs[1]["tokens_per_s"] / runs[0]["tokens_per_s"]
    return out


def _plot(result: dict, path: Path) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot (the loss curves are in the JSON)"
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, run in result["runs"].items():
        ax.plot(range(1, len(run["losses"]) + 1), run["losses"], label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return f"plot: {path}"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tessera bench fp8", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    mm = sub.add_parser("matmul", help="one linear: bf16 vs FP8 per recipe (forward, forward+backward)")
    for d in ("m", "k", "n"):
        mm.add_argument(f"--{d}", type=int, default=None, help="size (default 8192 on a GPU, 256 on CPU)")
    mm.add_argument("--recipes", nargs="+", choices=RECIPES, default=list(RECIPES))
    mm.add_argument("--iters", type=int, default=20)
    mm.add_argument("--warmup", type=int, default=5)
    tr = sub.add_parser("train", help="a training step: bf16 vs bf16 + FP8, tokens/s and loss curves")
    tr.add_argument("--preset", default=None, help="model preset (default llama3.2-1b on a GPU, tiny on CPU)")
    tr.add_argument("--recipe", choices=RECIPES, default="tensorwise")
    tr.add_argument("--steps", type=int, default=None, help="steps per run (default 60 on a GPU, 6 on CPU)")
    tr.add_argument("--warmup", type=int, default=None, help="steps left out of the timing (default 10 / 2)")
    tr.add_argument("--seq", type=int, default=None, help="sequence length (default 2048 / 64)")
    tr.add_argument("--micro-batch", type=int, default=None, help="micro-batch size = global batch (default 4 / 2)")
    tr.add_argument("--plot", type=Path, default=None, help="PNG with both loss curves (needs matplotlib)")
    tr.add_argument("overrides", nargs="*", help="more config overrides, e.g. model.n_layers=4")
    for s in (mm, tr):
        s.add_argument("--json", type=Path, default=None, help="write the results here")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    a = _parser().parse_args(argv)
    device = torch.device("cuda" if CUDA else "cpu")
    env = {"device": device_name(device), "torch": torch.__version__, "python": platform.python_version(),
           "command": "tessera bench fp8 " + " ".join(sys.argv[1:] if argv is None else argv)}
    print(f"# {env}")
    if not CUDA:
        print("# NOTE: no CUDA GPU: this runs on the CPU at small sizes to exercise the script; the numbers "
              "below are NOT GPU performance figures.")
    if a.what == "matmul":
        m, k, n = (v if v is not None else (8192 if CUDA else 256) for v in (a.m, a.k, a.n))
        rows = bench_matmul(m, k, n, a.recipes, a.iters, a.warmup)
        print(f"# y = x W^T, x [{m}, {k}] bf16, W [{n}, {k}]; median of {a.iters}")
        print("| kernel | fwd ms | fwd TFLOP/s | x bf16 | fwd+bwd ms | fwd+bwd TFLOP/s | x bf16 |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['kernel']} | {1e3 * r['fwd_s']:.3f} | {r['fwd_tflops']:.3g} | {r['fwd_speedup']:.2f} | "
                  f"{1e3 * r['fwd_bwd_s']:.3f} | {r['fwd_bwd_tflops']:.3g} | {r['fwd_bwd_speedup']:.2f} |")
        result = {"env": env, "shape": [m, k, n], "results": rows}
    else:
        preset = a.preset or ("llama3.2-1b" if CUDA else "tiny")
        steps = a.steps or (60 if CUDA else 6)
        warmup = a.warmup if a.warmup is not None else (10 if CUDA else 2)
        seq = a.seq or (2048 if CUDA else 64)
        micro = a.micro_batch or (4 if CUDA else 2)
        overrides = list(a.overrides) + ([] if CUDA else ["train.device=cpu", "model.max_seq_len=64"])
        result = {"env": env, "preset": preset, "seq": seq, "micro_batch": micro, "steps": steps,
                  **bench_train(preset, steps, warmup, seq, micro, overrides, a.recipe)}
        print(f"# {preset}, seq {seq}, batch {micro}, {steps} steps (median step time after {warmup})")
        print("| run | step s | tokens/s | TFLOP/s | MFU | final loss |\n|---|---|---|---|---|---|")
        for label, r in result["runs"].items():
            mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}% ({r['mfu_peak']} peak)"
            print(f"| {label} | {r['step_s']:.3f} | {r['tokens_per_s']:,.0f} | {r['tflops']:.3g} | {mfu} | "
                  f"{r['losses'][-1]:.4f} |")
        print(f"# FP8 / bf16 tokens/s: {result['speedup_tokens_per_s']:.2f}x")
        if a.plot is not None:
            print(f"# {_plot(result, a.plot)}")
    if a.json is not None:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(result, indent=1))
        print(f"# wrote {a.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
