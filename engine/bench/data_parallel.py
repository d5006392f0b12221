"""Data-parallel benchmark: optimizer-state bytes per rank and step time vs dp, ZeRO level and overlap.

    tessera bench dp --dp 1 2 4 --layers 8 --width 256 --steps 10

Spawns `dp` CPU processes (gloo) per dp size; each trains a stack of Linear+LayerNorm+GELU layers on
random data with the same global batch. Prints a markdown table and writes JSON with `--json PATH`.
Step time = forward + backward + finish_grad_sync (also reported alone) + clip + step, median over
`--steps` after 2 warm-up steps.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn


def _model(layers: int, width: int) -> nn.Module:
    torch.manual_seed(0)
    blocks = []
    for _ in range(layers):
        blocks += [nn.Linear(width, width), nn.LayerNorm(width), nn.GELU()]
    return nn.Sequential(*blocks)


def _run_rank(rank: int, world: int, port: int, args: argparse.Namespace, out: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(args.threads)
    from engine.optim.optimizer import Optimizer
    from engine.parallel.data_parallel import DataParallel
    from engine.parallel.sharding import collect_specs
    from engine.parallel.state import ParallelState

    if world > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(minutes=5))
    state = ParallelState.initialize(dp=world, device="cpu") if world > 1 else ParallelState.single()
    per_rank = args.global_batch // world
    rows = []
    for zero in (0, 1):
        for overlap in ((True, False) if world > 1 else (True,)):
            model = _model(args.layers, args.width)
            ddp = DataParallel(model, state, bucket_size=args.bucket_size, overlap=overlap, shard_grads=zero == 1)
            opt = Optimizer(ddp.segments(), collect_specs(model, default_replicated=True), state, lr=1e-4,
                            weight_decay=0.1, grads_sharded=zero == 1 and world > 1, after_step=ddp.sync_params,
                            zero_grad=ddp.zero_grad)
            x = torch.randn(per_rank, args.width)  # (B/dp, W)
            times, grad_times = [], []
            for step in range(args.steps + 2):
                if world > 1:
                    dist.barrier()  # start together: the time then includes waiting for the slowest rank
                t0 = time.perf_counter()
                opt.zero_grad()
                model(x).square().mean().backward()
                ddp.finish_grad_sync()
                t1 = time.perf_counter()
                opt.clip_grad_norm(1.0)
                opt.step()
                if step >= 2:
                    times.append(time.perf_counter() - t0)
                    grad_times.append(t1 - t0)
            # median: robust to other load on the machine; max over ranks: a step is as slow as its slowest rank
            t = torch.tensor([sorted(times)[len(times) // 2], sorted(grad_times)[len(grad_times) // 2]])
            if world > 1:
                dist.all_reduce(t, op=dist.ReduceOp.MAX)
            rows.append({"dp": world, "zero": zero, "overlap": overlap if world > 1 else None,
                         "params": sum(p.numel() for p in ddp.params), "buckets": len(ddp.buckets),
                         "state_bytes_per_rank": opt.state_bytes(), "step_ms": 1000 * float(t[0]),
                         "fwd_bwd_sync_ms": 1000 * float(t[1])})
            ddp.remove_hooks()
    if rank == 0:
        out.put(rows)
    if world > 1:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args: argparse.Namespace) -> list[dict]:
    ctx = mp.get_context("spawn")
    rows: list[dict] = []
    for world in args.dp:
        q = ctx.Queue()
        port = _free_port()
        procs = [ctx.Process(target=_run_rank, args=(r, world, port, args, q)) for r in range(world)]
        for p in procs:
            p.start()
        rows += q.get(timeout=1800)
        for p in procs:
            p.join()
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="tessera bench dp", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dp", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--global-batch", type=int, default=64)
    ap.add_argument("--bucket-size", type=int, default=2 ** 16, help="elements per bucket")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads per process")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    rows = run(args)
    print("| dp | zero | overlap | params | buckets | optimizer state / rank (KiB) "
          "| fwd+bwd+grad sync (ms) | step (ms) |")
    print("|---:|---:|:---:|---:|---:|---:|---:|---:|")
    for r in rows:
        ov = "-" if r["overlap"] is None else ("yes" if r["overlap"] else "no")
        print(f"| {r['dp']} | {r['zero']} | {ov} | {r['params']} | {r['buckets']} | "
              f"{r['state_bytes_per_rank'] / 1024:.1f} | {r['fwd_bwd_sync_ms']:.1f} | {r['step_ms']:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
