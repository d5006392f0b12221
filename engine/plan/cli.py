"""`tessera plan CFG [a.b=c ...] [--gpus N] [--gpu-memory 80GiB] [--device h100]`: per-rank peak memory of the
config's layout by category and its predicted step time, then the layouts of N devices that fit, ranked by
predicted throughput. Builds no model and allocates nothing (engine/plan)."""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
from pathlib import Path
from typing import Optional

from engine.errors import ConfigError
from engine.plan.devices import DEVICES, get_device
from engine.plan.layouts import layout_of
from engine.plan.memory import CATEGORIES
from engine.plan.planner import Candidate, PlanResult, plan, resolve_vocab_size

__all__ = ["main", "parse_memory"]

_UNITS = {"": 2 ** 30, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2 ** 10, "mib": 2 ** 20,
          "gib": 2 ** 30, "tib": 2 ** 40, "k": 2 ** 10, "m": 2 ** 20, "g": 2 ** 30, "t": 2 ** 40}


def parse_memory(text: str) -> float:
    """'80GiB', '80GB', '141G', '80' (GiB) -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    unit = m[2].lower() if m else ""
    if m is None or unit not in _UNITS or float(m[1]) <= 0:
        raise ConfigError(f"--gpu-memory: expected a positive size like 80GiB, 80GB or 141G, found {text!r}")
    return float(m[1]) * _UNITS[unit]


def _gib(x: float) -> str:
    return f"{x / 2 ** 30:.2f}"


def _memory_table(c: Candidate) -> str:
    head = f"{'stage':>5} " + " ".join(f"{k:>12}" for k in CATEGORIES) + f" {'peak GiB':>9}  in-flight  peak during"
    rows = [head]
    for m in c.memory:
        rows.append(f"{m.pp_rank:>5} " + " ".join(f"{_gib(getattr(m, k)):>12}" for k in CATEGORIES) +
                    f" {_gib(m.peak):>9}  {m.in_flight:>9}  {m.phase}")
    notes = sorted({n for m in c.memory for n in m.notes})
    return "\n".join(rows + [f"note: {n}" for n in notes])


def _step_line(c: Candidate) -> str:
    s = c.step
    mfu = f", MFU {s.mfu:.1%}" if s.mfu is not None else ""
    parts = ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in s.breakdown.items() if v > 0)
    return (f"step {s.step_s:.3f} s, {s.tokens_per_s:,.0f} tokens/s, {s.tflops_per_gpu:.1f} TFLOP/s per device"
            f"{mfu}\n  ({parts})")


def render(res: PlanResult, top: int) -> str:
    out = [f"device: {res.device.name} x {res.world_size}, {_gib(res.capacity)} GiB each "
           f"(figures: {res.device.sources})"]
    if res.current is not None:
        c = res.current
        verdict = "fits" if c.fits(res.capacity) else f"does NOT fit ({_gib(c.peak)} > {_gib(res.capacity)} GiB)"
        out += ["", f"this config: {c.layout.describe()} -- {verdict}", _memory_table(c), _step_line(c)]
    else:
        out += ["", f"this config's layout cannot run on {res.world_size} devices: {res.current_error}"]
    out += ["", f"layouts of {res.world_size} devices that fit: {len(res.ranked)} of {res.considered} considered"]
    if res.ranked:
        out.append(f"{'#':>3} {'layout':<58} {'peak GiB':>9} {'step s':>8} {'tokens/s':>12} {'TFLOP/s':>8} {'MFU':>6}")
        for i, c in enumerate(res.ranked[:top], 1):
            mfu = f"{c.step.mfu:.1%}" if c.step.mfu is not None else "n/a"
            out.append(f"{i:>3} {c.layout.describe():<58} {_gib(c.peak):>9} {c.step.step_s:>8.3f} "
                       f"{c.step.tokens_per_s:>12,.0f} {c.step.tflops_per_gpu:>8.1f} {mfu:>6}")
        out.append("best: " + " ".join(res.ranked[0].layout.overrides()))
    return "\n".join(out)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="tessera plan", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="example: tessera plan examples/llama_1b.yaml --gpus 16 --gpu-memory 80GiB")
    ap.add_argument("config", help="YAML config")
    ap.add_argument("overrides", nargs="*", help="section.key=value overrides")
    ap.add_argument("--gpus", type=int, default=None,
                    help="devices of the cluster (default: the config's tp*pp*dp, dp=auto counting 1)")
    ap.add_argument("--gpu-memory", default=None, help="memory per device, e.g. 80GiB (default: the device's)")
    ap.add_argument("--device", default="h100", help=f"device figures: {', '.join(DEVICES)} (default h100)")
    ap.add_argument("--top", type=int, default=10, help="fitting layouts to list (default 10)")
    ap.add_argument("--json", type=Path, default=None, help="also write everything as JSON here")
    return ap


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    from engine.config import load_config

    dev = get_device(args.device)
    capacity = parse_memory(args.gpu_memory) if args.gpu_memory is not None else dev.memory_gib * 2 ** 30
    if args.top < 1:
        raise ConfigError(f"--top: expected a positive number of layouts, found {args.top}")
    cfg = resolve_vocab_size(load_config(args.config, args.overrides))
    p = cfg.parallel
    world = args.gpus if args.gpus is not None else p.tp * p.pp * (p.dp if p.dp != "auto" else 1)
    if world < 1:
        raise ConfigError(f"--gpus: expected a positive number of devices, found {world}")
    try:
        current = layout_of(cfg, world)
    except ConfigError as e:
        current, reason = None, str(e)
    res = plan(cfg, world, dev, capacity, current=current)
    if current is None:
        res.current_error = reason
    print(render(res, args.top))
    if args.json is not None:
        doc = {"command": shlex.join(["tessera", "plan", *argv]), "device": dev.name, "world_size": world,
               "capacity_bytes": capacity, "current": res.current.as_dict() if res.current else None,
               "current_error": res.current_error if res.current is None else None,
               "ranked": [c.as_dict() for c in res.ranked[:args.top]], "considered": res.considered}
        args.json.write_text(json.dumps(doc, indent=1) + "\n")
    return 0
