"""`tessera bench train`: per-iteration time of Tessera's loop vs a minimal hand-written PyTorch loop.

Both run in one process on the same model (same config, same init), batch shape, optimizer
settings, precision and gradient accumulation. The minimal loop is what a person would write:
random token batches already on the device, forward, loss, backward, clip, AdamW step. Ours adds
the data pipeline, LR schedule, metrics and logging. Rounds alternate (minimal, ours, minimal,
ours ...) so drift in machine speed hits both; the first `--warmup` steps of every round are
dropped; we report medians.

Beside the per-step overhead, the fixed costs of our runs: each round's wall time split into start-up,
model build, dataset building, steps, evaluation, saving and other (engine/train/timing.py RunClock, the
split the end-of-run summary prints), reported as the median over rounds. The runs are in-process, so their
start-up has no imports or interpreter start (the CLI's has).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

from engine.bench import device_name
from engine.config import Config, load_config
from engine.model.loss import lm_loss
from engine.model.transformer import build_model, count_parameters
from engine.optim import build_adamw
from engine.precision import autocast
from engine.train.flops import peak_tflops, training_flops_per_token
from engine.train.timing import format_run_split


def minimal_loop_times(cfg: Config, iters: int, device: torch.device) -> list[float]:
    """The hand-written baseline: seconds per optimizer step."""
    t = cfg.train
    model = build_model(cfg.model, seed=t.seed, device=device)
    opt = build_adamw(model.named_parameters(), cfg.optim, device)
    n_micro = t.global_batch_size // t.micro_batch_size
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, cfg.model.vocab_size, (t.micro_batch_size, cfg.seq_len + 1), generator=gen).to(device)
               for _ in range(n_micro)]
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        for tokens in batches:
            with autocast(cfg.precision.dtype, device):
                loss = lm_loss(model(tokens[:, :-1]), tokens[:, 1:], cfg.model.vocab_size)
            (loss / n_micro).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip or float("inf"))
        opt.step()
        loss.item()  # the user's loop prints the loss: one host sync per step, as ours
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return times


def tessera_loop_times(cfg: Config, iters: int, out_dir: Path) -> tuple[list[float], dict[str, float]]:
    """Our loop: seconds per optimizer step, and the run's wall time by part (TrainResult.wall)."""
    from engine.train.loop import train

    c = copy.deepcopy(cfg)
    c.train.iters, c.train.eval_interval, c.train.sample_prompt = iters, 0, None
    c.train.out_dir, c.train.progress = str(out_dir), False
    r = train(c)
    return r.step_times, r.wall


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="tessera bench train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", help="YAML config (e.g. examples/tiny.yaml)")
    ap.add_argument("overrides", nargs="*", help="section.key=value overrides")
    ap.add_argument("--iters", type=int, default=30, help="steps per round (default 30)")
    ap.add_argument("--warmup", type=int, default=5, help="steps dropped at the start of each round (default 5)")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds of each loop (default 2)")
    ap.add_argument("--json", type=Path, default=None, help="write the results here as JSON")
    args = ap.parse_args(argv)
    if args.iters <= args.warmup:
        ap.error("--iters must be larger than --warmup")

    cfg = load_config(args.config, args.overrides, world_size=1)
    from engine.parallel.state import pick_device
    from engine.train.loop import resolve_vocab

    resolve_vocab(cfg)  # the minimal loop needs the model's vocabulary before our loop runs

    device = pick_device(cfg.train.device, 0)
    ours, minimal, walls = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            minimal += minimal_loop_times(cfg, args.iters, device)[args.warmup:]
            times, wall = tessera_loop_times(cfg, args.iters, Path(tmp) / f"round{r}")
            ours += times[args.warmup:]
            walls.append(wall)
    run_wall = {k: statistics.median(w[k] for w in walls) for k in walls[0]}  # seconds, median over rounds
    med_ours, med_min = statistics.median(ours), statistics.median(minimal)
    tokens = cfg.train.global_batch_size * cfg.seq_len
    fpt = training_flops_per_token(cfg.model, cfg.seq_len)
    peak = peak_tflops(device, cfg.precision.dtype)
    res = {
        "command": "tessera bench train " + " ".join([args.config, *args.overrides, "--iters", str(args.iters),
                                                     "--warmup", str(args.warmup), "--rounds", str(args.rounds)]),
        "device": device_name(device), "torch": torch.__version__, "dtype": cfg.precision.dtype,
        "model_params": count_parameters(cfg.model, padded=True),
        "seq_len": cfg.seq_len, "global_batch_size": cfg.train.global_batch_size,
        "micro_batch_size": cfg.train.micro_batch_size, "steps_timed_each": len(ours),
        "tessera_s_per_step": med_ours, "minimal_s_per_step": med_min,
        "overhead_pct": 100.0 * (med_ours - med_min) / med_min,
        "tessera_tokens_per_s": tokens / med_ours, "minimal_tokens_per_s": tokens / med_min,
        "tessera_tflops": fpt * tokens / med_ours / 1e12,
        "mfu": (fpt * tokens / med_ours / 1e12) / peak if peak else None,
        "tessera_run_wall_s": run_wall, "tessera_run_steps": args.iters,
    }
    mfu = "n/a" if res["mfu"] is None else f"{100 * res['mfu']:.1f}%"
    print(f"| loop | s/step (median) | tokens/s | TFLOP/s |\n|---|---|---|---|\n"
          f"| minimal PyTorch | {med_min:.4f} | {tokens / med_min:,.0f} | {fpt * tokens / med_min / 1e12:.3f} |\n"
          f"| tessera | {med_ours:.4f} | {tokens / med_ours:,.0f} | {res['tessera_tflops']:.3f} |\n"
          f"overhead: {res['overhead_pct']:+.2f}%  device: {res['device']}  "
          f"MFU: {mfu}")
    print("tessera run (median of the rounds, in-process: no imports): "
          + format_run_split(run_wall, args.iters).removeprefix("tessera: "))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=2) + "\n")
    return 0
