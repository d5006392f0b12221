"""`tessera bench build`: wall time and peak memory of building a model preset, per tensor-parallel rank.

    tessera bench build --preset llama3.2-1b --tp 1 2 --json docs/results/bench_build_cpu.json

For each tp, `tp` processes (gloo, one intra-op thread each unless --threads) build this rank's shard of the
whole model with `engine.model.build_model(cfg, pstate, seed)` on the CPU in fp32, as the training loop's
build step does at pp = 1 (meta-device construction, then the one initialiser fills it shard by shard).
Reported per layout, as the maximum over its ranks: seconds inside build_model, the process's resident
memory before it (imports, the interpreter), and its peak resident memory (ru_maxrss) after it, next to
the fp32 size of one rank's shard. The script uses only `build_model(cfg, pstate, seed)` and
`ParallelState.initialize`, so it can be pointed at an older tree (PYTHONPATH) to measure it the same way.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any, Optional


def _rss_gb() -> float:
    """Current resident memory of this process (GiB)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**30


def _rank(rank: int, tp: int, port: int, preset: str, overrides: list[str], threads: int, q: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(tp),
                      LOCAL_RANK=str(rank))
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    from engine.config import config_from_dict, parse_override
    from engine.model import build_model
    from engine.parallel.state import ParallelState

    try:
        if tp > 1:
            store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=datetime.timedelta(minutes=10))
            dist.init_process_group("gloo", store=store, rank=rank, world_size=tp,
                                    timeout=datetime.timedelta(minutes=10))
        tree: dict = {"model": {"preset": preset}, "parallel": {"tp": tp}}
        for text in overrides:  # section.key=value, e.g. model.d_model=256
            keys, value = parse_override(text)
            node = tree
            for k in keys[:-1]:
                node = node.setdefault(k, {})
            node[keys[-1]] = value
        cfg = config_from_dict(tree, world_size=tp).model
        pstate = ParallelState.initialize(tp=tp, device="cpu") if tp > 1 else ParallelState.single()
        before = _rss_gb()
        t0 = time.perf_counter()
        model = build_model(cfg, pstate, seed=1234)
        seconds = time.perf_counter() - t0
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
        shard_gb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
        q.put((rank, {"seconds": seconds, "rss_before_gb": before, "peak_rss_gb": peak, "shard_gb": shard_gb}))
        if tp > 1:
            dist.destroy_process_group()
    except BaseException as e:  # noqa: BLE001 - the parent reports it
        q.put((rank, {"error": f"{type(e).__name__}: {e}"}))


def measure(preset: str, tp: int, threads: int, overrides: Optional[list[str]] = None) -> dict:
    import torch.distributed as dist
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    # The parent serves the rendezvous store on a port the OS picks, held for the whole job (no port race).
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(minutes=10)) if tp > 1 else None
    port = store.port if store is not None else 0
    procs = [ctx.Process(target=_rank, args=(r, tp, port, preset, list(overrides or []), threads, q))
             for r in range(tp)]
    for p in procs:
        p.start()
    got = dict(q.get(timeout=3600) for _ in range(tp))
    for p in procs:
        p.join()
    errors = [v["error"] for v in got.values() if "error" in v]
    if errors:
        raise RuntimeError(f"bench build, tp={tp}: {errors[0]}")
    keys = ("seconds", "rss_before_gb", "peak_rss_gb", "shard_gb")
    return {"tp": tp, **{k: max(v[k] for v in got.values()) for k in keys}}


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="tessera bench build", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="llama3.2-1b", help="model preset (default llama3.2-1b)")
    ap.add_argument("overrides", nargs="*", help="model.key=value overrides of the preset")
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2], help="tensor-parallel sizes (default 1 2)")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads per rank (default 1)")
    ap.add_argument("--json", type=Path, default=None, help="write the results here as JSON")
    args = ap.parse_args(argv)
    import torch

    rows = [measure(args.preset, tp, args.threads, args.overrides) for tp in args.tp]
    print("| tp | build s (max over ranks) | RSS before GiB | peak RSS GiB | fp32 shard GiB |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['tp']} | {r['seconds']:.1f} | {r['rss_before_gb']:.2f} | {r['peak_rss_gb']:.2f} | {r['shard_gb']:.2f} |")
    if args.json:
        res = {"command": "tessera bench build " + " ".join(argv if argv is not None else sys.argv[1:]),
               "preset": args.preset, "overrides": args.overrides, "torch": torch.__version__, "threads_per_rank": args.threads, "rows": rows}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
