"""`tessera bench parallel`: training-step time across tensor-parallel layouts on CPU processes (gloo).

    python -m engine.bench.parallel --layouts 1 2 2sp --steps 10 --json tp.json

Each layout runs in its own group of spawned processes (world size = tp) on a fixed Llama-style model and
reports the median (and minimum) time of a full step (forward, vocab-parallel loss, backward, sequence-parallel grad
all-reduce, AdamW) and the share of it spent inside tensor-parallel collectives. The communication time
is wall time inside the collectives, so it includes waiting for the slower rank (load imbalance).
Intra-op threads per process default to cores // tp, so every layout uses the same cores.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import time
from pathlib import Path
from typing import Optional

from engine.bench import cpu_name


def _parse_layout(text: str) -> tuple[int, bool]:
    """'2' -> (2, False); '2sp' -> (2, True)."""
    sp = text.endswith("sp")
    tp = int(text[:-2] if sp else text)
    if tp < 1 or (sp and tp == 1):
        raise argparse.ArgumentTypeError(f"layout {text!r}: expected N or Nsp with N >= 1 (sp needs N > 1)")
    return tp, sp


def _run_layout(rank: int, world: int, port: int, tp: int, sp: bool, args: dict, threads: int, results) -> None:
    """One rank of one layout: build, warm up, time `steps` steps; rank 0 reports."""
    import torch
    import torch.distributed as dist

    from engine.config import ModelConfig
    from engine.model.loss import lm_loss
    from engine.model.transformer import build_model
    from engine.parallel.state import ParallelState
    from engine.parallel.collectives import CommTimer
    from engine.parallel.tensor_parallel import allreduce_sequence_parallel_grads

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(threads)
    try:
        if world > 1:
            dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(minutes=5))
        pstate = ParallelState.initialize(tp=tp, sequence_parallel=sp, device="cpu")
        cfg = ModelConfig(vocab_size=args["vocab"], vocab_pad_multiple=128, d_model=args["d_model"],
                          n_layers=args["layers"], n_heads=args["heads"], n_kv_heads=args["heads"],
                          ffn_hidden=args["ffn"], max_seq_len=args["seq"], norm="rmsnorm", activation="swiglu",
                          position="rope", tie_embeddings=False, bias=False, dropout=0.0)
        model = build_model(cfg, pstate, seed=1234)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        gen = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, cfg.vocab_size, (args["batch"], args["seq"] + 1), generator=gen)
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        step_s, comm_s = [], []
        for i in range(args["warmup"] + args["steps"]):
            pstate.comm_timer = timer = CommTimer()  # this benchmark's hook: time inside the tp collectives
            t0 = time.perf_counter()
            loss = lm_loss(model(inputs), targets, cfg.vocab_size, pstate=pstate)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            allreduce_sequence_parallel_grads(model, pstate)
            opt.step()
            dt = time.perf_counter() - t0
            pstate.comm_timer = None
            if i >= args["warmup"]:
                step_s.append(dt)
                comm_s.append(timer.seconds)
        out = {"step_s": step_s, "comm_s": comm_s, "loss": loss.item(),
               "params_per_rank": sum(p.numel() for p in model.parameters())}
        results.put((rank, out))
        if world > 1:
            dist.destroy_process_group()
    except BaseException as e:  # noqa: BLE001 - report, do not hang the parent
        import traceback

        results.put((rank, {"error": f"{type(e).__name__}: {e}\n{traceback.format_exc()}"}))


def bench_layout(tp: int, sp: bool, args: dict, threads: int) -> dict:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=_run_layout, args=(r, tp, port, tp, sp, args, threads, results), daemon=True)
             for r in range(tp)]
    for p in procs:
        p.start()
    got = dict(results.get(timeout=900) for _ in range(tp))
    for p in procs:
        p.join(timeout=30)
    errors = [v["error"] for v in got.values() if "error" in v]
    if errors:
        raise RuntimeError(f"layout tp={tp} sp={sp} failed:\n{errors[0]}")
    r0 = got[0]
    step = statistics.median(r0["step_s"])
    # the slowest rank's communication is the honest share (the others wait inside their collectives too)
    comm = max(statistics.median(v["comm_s"]) for v in got.values())
    tokens = args["batch"] * args["seq"]
    return {"tp": tp, "sequence_parallel": sp, "threads_per_rank": threads, "step_ms": round(step * 1e3, 1),
            "step_min_ms": round(min(r0["step_s"]) * 1e3, 1),
            "comm_ms": round(comm * 1e3, 1), "comm_share": round(comm / step, 3),
            "tokens_per_s": round(tokens / step), "params_per_rank": r0["params_per_rank"],
            "final_loss": round(r0["loss"], 4)}


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="tessera bench parallel", description=__doc__.split("\n\n")[0])
    ap.add_argument("--layouts", nargs="+", type=_parse_layout, default=[(1, False), (2, False), (2, True)],
                    help="tensor-parallel sizes, 'sp' suffix for sequence parallel (default: 1 2 2sp)")
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--ffn", type=int, default=688)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="intra-op threads per rank (0 = cores // tp)")
    ap.add_argument("--json", type=str, default=None, help="also write the results here")
    a = ap.parse_args(argv)
    args = {"d_model": a.d_model, "layers": a.layers, "heads": a.heads, "ffn": a.ffn, "vocab": a.vocab,
            "seq": a.seq, "batch": a.batch, "steps": a.steps, "warmup": a.warmup}
    cores = os.cpu_count() or 1
    rows = []
    for tp, sp in a.layouts:
        threads = a.threads or max(1, cores // tp)
        rows.append(bench_layout(tp, sp, args, threads))
        r = rows[-1]
        print(f"tp={r['tp']}{' +sp' if sp else '    '} threads/rank={threads}  step {r['step_ms']:8.1f} ms "
              f"(min {r['step_min_ms']:7.1f})  "
              f"comm {r['comm_ms']:7.1f} ms ({100 * r['comm_share']:4.1f}%)  {r['tokens_per_s']:7d} tok/s  "
              f"loss {r['final_loss']}", flush=True)
    # the load average tells readers how busy a shared machine was while measuring
    machine = {"cpu": cpu_name(), "cores": cores, "torch": __import__("torch").__version__, "backend": "gloo",
               "loadavg_1min_after": round(os.getloadavg()[0], 2)}
    if a.json:
        Path(a.json).write_text(json.dumps({"machine": machine, "model": args, "results": rows}, indent=2))
    print(f"machine: {machine['cpu']}, {cores} cores, torch {machine['torch']}, gloo, "
          f"load average {machine['loadavg_1min_after']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
