"""`tessera bench throughput`: steady-state training speed of a config, and where a step's time goes.

    tessera bench throughput examples/tiny.yaml --json docs/results/bench_throughput_cpu.json
    tessera bench throughput CFG --sweep model.d_model=64,128 --sweep train.micro_batch_size=4,8   # the grid
    torchrun --nproc-per-node 8 -m engine bench throughput CFG parallel.tp=2 --json tp2.json

Each point (one without --sweep; with several --sweep, every combination of their values, applied as
`section.key=value` overrides after the config's own) gets a fresh Trainer: the real training step (data
pipeline, micro-batches, parallel layout, optimizer, precision). `--warmup` steps are dropped (compilation,
allocator, caches), then `--iters` steps are timed exactly as the training loop times them (no extra
synchronisation): tokens/s = global_batch_size * seq_len / mean step time; TFLOP/s per device and MFU by
engine/train/flops.py (docs/metrics.md); peak memory over those steps (CUDA: torch's peak allocation; CPU:
the process's peak resident memory). Then `--breakdown-iters` more steps run with the step timer on
(engine/train/timing.py): mean seconds per step in data wait, forward, backward, communication, optimizer
and other. The timer synchronises the device at every phase boundary, so its steps are a little slower:
their mean ("timed s/step", which the phases sum to) is reported beside the untimed one.

Output: a table on stdout, --json, and an SVG (stacked bars of the breakdown per point) beside the JSON.
Under torchrun every rank trains and rank 0 writes; the JSON holds every rank's breakdown (at pp > 1 the
stages differ). The process groups are made once per launch, so a sweep cannot change the parallel layout.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import html
import itertools
import json
import math
import shlex
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist

from engine.bench import device_name
from engine.config import Config, ConfigError, load_config
from engine.train.timing import PHASES, peak_memory_gb, reset_peak_memory

# Fields the benchmark sets itself for every point: a sweep over them would measure nothing.
BENCH_SET = ("train.iters", "train.eval_interval", "train.out_dir", "train.progress", "train.tensorboard")
LAYOUT = ("tp", "pp", "vpp", "dp", "sequence_parallel")  # cfg.parallel fields that fix the process groups
COLORS = {"data": "#8c8c8c", "forward": "#4878d0", "backward": "#ee854a", "communication": "#d65f5f",
          "optimizer": "#6acc64", "other": "#c4ad66"}


# ------------------------------------------------------------------ sweeps

def _split_values(raw: str) -> list[str]:
    """'64,128' -> ['64', '128']; commas inside [...] or {...} (a YAML list value) do not split."""
    out, depth, cur = [], 0, ""
    for ch in raw:
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    out.append(cur.strip())
    return out


def parse_sweeps(specs: list[str]) -> list[tuple[str, list[str]]]:
    """['model.d_model=64,128', ...] -> [('model.d_model', ['64', '128']), ...] (one entry per --sweep)."""
    out: list[tuple[str, list[str]]] = []
    for spec in specs:
        key, sep, raw = spec.partition("=")
        key = key.strip()
        values = _split_values(raw) if sep else []
        if not sep or not key or "." not in key or not values or any(v == "" for v in values):
            raise ConfigError(f"--sweep {spec!r}: expected section.key=v1,v2,... (e.g. model.d_model=64,128), "
                              f"found {'no =' if not sep else 'an empty key or value'}")
        if key in BENCH_SET:
            raise ConfigError(f"--sweep {key}: the benchmark sets {key} itself for every point; sweep another field")
        if key in (k for k, _ in out):
            raise ConfigError(f"--sweep {key}: given twice; put all its values in one --sweep {key}=v1,v2")
        out.append((key, values))
    return out


def sweep_points(sweeps: list[tuple[str, list[str]]]) -> list[dict[str, str]]:
    """The grid: one {key: value} per combination, in the order the values were given ([{}] without sweeps)."""
    keys = [k for k, _ in sweeps]
    return [dict(zip(keys, combo)) for combo in itertools.product(*(v for _, v in sweeps))]


def _label(point: dict[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in point.items()) or "base"


# ------------------------------------------------------------------ one point

def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def measure_point(cfg: Config, pstate: Any, warmup: int, iters: int, breakdown_iters: int) -> dict:
    """Train `warmup + iters + breakdown_iters` steps of `cfg` on a fresh Trainer (collective under a process
    group). Returns this rank's raw numbers (see `summarize`)."""
    from engine.train.trainer import Trainer

    device = pstate.device
    torch.manual_seed(cfg.train.seed)
    trainer = Trainer(cfg, pstate)
    try:
        for _ in range(warmup):
            trainer.train_step()
        reset_peak_memory(device)
        plain = [trainer.train_step() for _ in range(iters)]
        mem = peak_memory_gb(device)
        trainer.timer.enable(pstate)
        try:
            timed = [trainer.train_step() for _ in range(breakdown_iters)]
        finally:
            trainer.timer.disable()
        phases = trainer.timer.take()
        n_params = trainer.count_parameters()
        padded_vocab = trainer.model.padded_vocab
    finally:
        trainer.close()
    return {"rank": pstate.rank, "step_s": [r.seconds for r in plain], "timed_step_s": [r.seconds for r in timed],
            "phases": phases, "peak_mem_gb": mem, "losses": [r.loss for r in plain + timed],
            "skipped": sum(int(r.skipped) for r in plain + timed), "params": n_params, "padded_vocab": padded_vocab}


def summarize(cfg: Config, point: dict[str, str], ranks: list[dict], world_size: int, device: torch.device) -> dict:
    """The reported numbers of one point from every rank's raw numbers (rank 0's times; the step is
    synchronous, so every rank's step time is the same up to noise)."""
    from engine.train.flops import peak_dtype, peak_tflops, training_flops_per_token

    r0 = ranks[0]
    tokens = cfg.train.global_batch_size * cfg.seq_len
    step_s = _mean(r0["step_s"])
    tokens_per_s = tokens / step_s
    tflops = training_flops_per_token(cfg.model, cfg.seq_len) * tokens_per_s / world_size / 1e12  # per device
    peak_of = peak_dtype(cfg.precision.dtype, cfg.precision.fp8 is not None)
    peak = peak_tflops(device, peak_of)

    def breakdown(rank: dict) -> dict[str, float]:
        return {p: _mean([s[p] for s in rank["phases"]]) for p in PHASES}

    out = {
        "label": _label(point), "overrides": point,
        "model_params": r0["params"], "padded_vocab": r0["padded_vocab"], "dtype": cfg.precision.dtype,
        "fp8": cfg.precision.fp8.recipe if cfg.precision.fp8 is not None else None,
        "seq_len": cfg.seq_len, "global_batch_size": cfg.train.global_batch_size,
        "micro_batch_size": cfg.train.micro_batch_size, "tokens_per_step": tokens,
        "step_s": step_s, "step_s_median": statistics.median(r0["step_s"]), "step_s_min": min(r0["step_s"]),
        "step_times_s": r0["step_s"], "timed_step_times_s": r0["timed_step_s"],
        "tokens_per_s": tokens_per_s, "tflops_per_device": tflops,
        "mfu": tflops / peak if peak else None, "mfu_peak": peak_of,
        "peak_mem_gb": r0["peak_mem_gb"], "peak_mem_gb_max_rank": max(r["peak_mem_gb"] for r in ranks),
        "timed_step_s": _mean(r0["timed_step_s"]) if r0["timed_step_s"] else None,
        "breakdown_s": breakdown(r0) if r0["phases"] else None,
        "losses": r0["losses"], "skipped_steps": r0["skipped"],
    }
    if len(ranks) > 1 and r0["phases"]:
        out["breakdown_s_per_rank"] = [breakdown(r) for r in ranks]
    return out


# ------------------------------------------------------------------ output

def _ms(seconds: Optional[float]) -> str:
    return "-" if seconds is None else f"{1e3 * seconds:.1f}"


def format_table(res: dict) -> str:
    """Markdown table: one row per point (s/step: the mean, which tokens/s is computed from, and the fastest
    step); the breakdown in ms per step and its share of the timed step."""
    head = ["point", "s/step (min)", "tokens/s", "TFLOP/s/device", "MFU", "peak mem GiB", *PHASES, "timed s/step"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in res["points"]:
        b, total = p["breakdown_s"], p["timed_step_s"]
        cells = [f"{_ms(b[ph])} ms ({100 * b[ph] / total:.0f}%)" if b and total else "-" for ph in PHASES]
        mfu = "n/a" if p["mfu"] is None else f"{100 * p['mfu']:.1f}%"
        lines.append("| " + " | ".join([p["label"], f"{p['step_s']:.4f} ({p['step_s_min']:.4f})",
                                        f"{p['tokens_per_s']:,.0f}",
                                        f"{p['tflops_per_device']:.4f}", mfu, f"{p['peak_mem_gb']:.2f}", *cells,
                                        "-" if total is None else f"{total:.4f}"]) + " |")
    lines.append(f"device: {res['device']}, world size {res['world_size']}, torch {res['torch']}; "
                 f"{res['iters']} steps timed after {res['warmup']} warm-up, breakdown over {res['breakdown_iters']}")
    if res.get("note"):
        lines.append(res["note"])
    return "\n".join(lines)


def breakdown_svg(res: dict) -> str:
    """Stacked horizontal bars: each point's mean timed step split into PHASES, on one ms scale."""
    points = [p for p in res["points"] if p["breakdown_s"]]
    left, bar_w, right, row, top = 260, 440, 190, 26, 34
    width = left + bar_w + right
    height = top + row * max(len(points), 1) + 50
    scale = bar_w / max((sum(p["breakdown_s"].values()) for p in points), default=1.0) if points else 1.0
    parts = [f'<text x="10" y="20" font-size="13" font-weight="bold">Step time breakdown (ms per step, mean of '
             f'{res["breakdown_iters"]} timed steps) - {html.escape(res["device"])}</text>']
    for i, p in enumerate(points):
        y = top + i * row
        parts.append(f'<text x="{left - 8}" y="{y + 15}" font-size="11" text-anchor="end">'
                     f'{html.escape(p["label"])}</text>')
        x = float(left)
        for ph in PHASES:
            w = p["breakdown_s"][ph] * scale
            if w > 0:
                parts.append(f'<rect x="{x:.2f}" y="{y}" width="{w:.2f}" height="{row - 6}" fill="{COLORS[ph]}">'
                             f'<title>{ph}: {_ms(p["breakdown_s"][ph])} ms</title></rect>')
            x += w
        parts.append(f'<text x="{x + 6:.2f}" y="{y + 15}" font-size="11">{_ms(p["timed_step_s"])} ms, '
                     f'{p["tokens_per_s"]:,.0f} tok/s</text>')
    ly = top + row * max(len(points), 1) + 16
    for i, ph in enumerate(PHASES):
        lx = left + i * 110
        parts.append(f'<rect x="{lx}" y="{ly}" width="12" height="12" fill="{COLORS[ph]}"/>'
                     f'<text x="{lx + 16}" y="{ly + 11}" font-size="11">{ph}</text>')
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} '
            f'{height}" font-family="sans-serif"><rect width="100%" height="100%" fill="white"/>'
            + "".join(parts) + "</svg>\n")


def _finite(x: Any) -> Any:
    """JSON has no NaN/Infinity: a non-finite number (a diverged loss) is written as null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x


# ------------------------------------------------------------------ driver

@contextlib.contextmanager
def _workdir(parent: Optional[Path], pstate: Any) -> Iterator[Path]:
    """One fresh directory for every rank (the data cache is built by rank 0 and read by all, as in training),
    deleted afterwards whatever happens."""
    box: list[Optional[str]] = [None]
    if pstate.is_rank0:
        if parent is not None:
            parent.mkdir(parents=True, exist_ok=True)
        box[0] = tempfile.mkdtemp(prefix="tessera-bench-throughput-", dir=parent)
    if pstate.is_distributed:
        dist.broadcast_object_list(box, src=0)
    work = Path(box[0])
    try:
        yield work
    finally:
        if pstate.is_distributed:
            dist.barrier()
        if pstate.is_rank0:
            shutil.rmtree(work, ignore_errors=True)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="tessera bench throughput", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", help="YAML config (e.g. examples/tiny.yaml)")
    ap.add_argument("overrides", nargs="*", help="section.key=value overrides for every point")
    ap.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2",
                    help="measure each value of a config field (e.g. model.d_model=64,128); several --sweep = the grid")
    ap.add_argument("--warmup", type=int, default=5, help="steps dropped first at every point (default 5)")
    ap.add_argument("--iters", type=int, default=20, help="steps timed for tokens/s, TFLOP/s, MFU, memory (default 20)")
    ap.add_argument("--breakdown-iters", type=int, default=10,
                    help="further steps timed phase by phase (default 10; 0 = no breakdown)")
    ap.add_argument("--json", type=Path, default=None, help="write the results here as JSON")
    ap.add_argument("--svg", type=Path, default=None, help="breakdown plot (default: the --json path with .svg)")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="parent of the temporary run/cache directory (default the system's temp dir; several "
                         "nodes need a shared one); deleted on exit")
    return ap


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = _parser()
    args = ap.parse_intermixed_args(argv)  # overrides may come after the options too
    if args.warmup < 0 or args.iters < 1 or args.breakdown_iters < 0:
        ap.error("--iters must be at least 1, --warmup and --breakdown-iters at least 0")
    from engine.parallel.state import LaunchEnv, ParallelState

    env = LaunchEnv.from_env()
    points = sweep_points(parse_sweeps(args.sweep))
    total = args.warmup + args.iters + args.breakdown_iters
    fixed = [f"train.iters={total}", "train.eval_interval=0", "train.progress=false", "train.tensorboard=false"]

    def point_config(i: int, point: dict[str, str], work: Optional[Path]) -> Config:
        ov = [*args.overrides, *(f"{k}={v}" for k, v in point.items()), *fixed]
        if work is not None:
            ov.append(f"train.out_dir={work / f'point{i}'}")
        cfg = load_config(args.config, ov, world_size=env.world_size)
        if work is not None and cfg.data.cache_dir is None:  # every point reads the same datasets once built
            cfg.data.cache_dir = str(work / "data_cache")
        return cfg

    # every point is validated before anything runs (one clear error, not after an hour of the others)
    configs = [point_config(i, pt, None) for i, pt in enumerate(points)]
    layouts = {tuple(getattr(c.parallel, f) for f in LAYOUT) for c in configs}
    if len(layouts) > 1:
        raise ConfigError(f"--sweep: the points need different parallel layouts ({', '.join(LAYOUT)}: "
                          f"{sorted(layouts)}); the process groups are made once per launch: run one benchmark per "
                          f"layout")
    p = configs[0].parallel
    owns_group = not dist.is_initialized()
    pstate = ParallelState.initialize(tp=p.tp, pp=p.pp, dp=None if p.dp == "auto" else p.dp, vpp=p.vpp,
                                      sequence_parallel=p.sequence_parallel, device=configs[0].train.device,
                                      timeout_minutes=p.timeout_minutes)
    try:
        results = []
        with _workdir(args.workdir, pstate) as work:
            for i, point in enumerate(points):
                cfg = point_config(i, point, work)
                raw = measure_point(cfg, pstate, args.warmup, args.iters, args.breakdown_iters)
                ranks = [raw]
                if pstate.is_distributed:
                    gathered: list[Any] = [None] * pstate.world_size
                    dist.all_gather_object(gathered, raw)
                    ranks = gathered
                results.append(summarize(cfg, point, ranks, pstate.world_size, pstate.device))
                gc.collect()
                if pstate.device.type == "cuda":
                    torch.cuda.empty_cache()
    finally:
        if owns_group and pstate.is_distributed:
            gc.collect()
            pstate.destroy()
    if not pstate.is_rank0:
        return 0
    res = {
        "command": shlex.join(["tessera", "bench", "throughput", *argv]),
        "device": device_name(pstate.device), "torch": torch.__version__, "world_size": pstate.world_size,
        "layout": {f: getattr(p, f) for f in LAYOUT}, "warmup": args.warmup, "iters": args.iters,
        "breakdown_iters": args.breakdown_iters, "phases": list(PHASES),
        "sweep": {k: v for k, v in parse_sweeps(args.sweep)}, "points": results,
        "note": None if pstate.device.type == "cuda" else
        "CPU run: MFU is n/a and these numbers say nothing about GPU speed.",
    }
    print(format_table(res))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(_finite(res), indent=2, allow_nan=False) + "\n")
        print(f"json: {args.json}")
    svg = args.svg or (args.json.with_suffix(".svg") if args.json is not None else None)
    if svg is not None and args.breakdown_iters > 0:
        svg.parent.mkdir(parents=True, exist_ok=True)
        svg.write_text(breakdown_svg(res))
        print(f"plot: {svg}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
