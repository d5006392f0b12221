"""`tessera bench pipeline`: simulate pipeline schedules (bubble, memory, timeline) and optionally time them.

    tessera bench pipeline --pp 4 --vpp 2 --micro-batches 8 --schedule all --svg out.svg
    tessera bench pipeline --pp 2 --micro-batches 8 --schedule all --measure   # + real CPU processes

The simulator's cost unit is one forward of one whole stage (F=1); --b-cost is the full backward
(default 2) and --w-cost the weight-gradient part that zero-bubble defers (default 1). With
--measure, a tiny model runs on `pp` gloo processes per schedule and the measured seconds per step
are printed next to the simulator's prediction made from per-action times measured in one process.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Optional

from engine.parallel.pipeline.schedules import SCHEDULES, ScheduleError, build_schedule
from engine.parallel.pipeline.simulator import Costs, SimResult, bubble_formula, simulate


def _parse(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tessera bench pipeline", description=__doc__.split("\n\n")[0])
    p.add_argument("--pp", type=int, default=4, help="pipeline stages (ranks)")
    p.add_argument("--vpp", type=int, default=2, help="virtual chunks per rank (interleaved only)")
    p.add_argument("--micro-batches", type=int, default=8, help="micro-batches per step")
    p.add_argument("--schedule", default="all", choices=("all",) + SCHEDULES)
    p.add_argument("--f-cost", type=float, default=1.0, help="forward of one stage")
    p.add_argument("--b-cost", type=float, default=2.0, help="full backward of one stage")
    p.add_argument("--w-cost", type=float, default=1.0, help="weight-grad part of the backward (zb's W)")
    p.add_argument("--comm", type=float, default=0.0, help="time of one p2p transfer")
    p.add_argument("--svg", default=None, help="write a timeline picture of the simulated schedules")
    p.add_argument("--json", default=None, help="write the results as JSON")
    p.add_argument("--measure", action="store_true", help="also time real steps on pp CPU processes")
    p.add_argument("--steps", type=int, default=5, help="--measure: timed steps per schedule (after 1 warm-up)")
    p.add_argument("--d-model", type=int, default=64, help="--measure: model width")
    p.add_argument("--layers", type=int, default=8, help="--measure: transformer blocks")
    p.add_argument("--seq", type=int, default=16, help="--measure: sequence length")
    p.add_argument("--micro-batch-size", type=int, default=4, help="--measure: samples per micro-batch")
    return p.parse_args(argv)


def simulate_all(pp: int, vpp: int, m: int, names: list[str], costs: Costs) -> list[SimResult]:
    out = []
    for name in names:
        v = vpp if name == "interleaved" else 1
        zb = {"cost_f": costs.f, "cost_b": costs.b - costs.w, "cost_w": costs.w} if name == "zb" else {}
        out.append(simulate(build_schedule(name, pp, m, vpp=v, **zb), costs))
    return out


def _row(r: SimResult) -> dict:
    s = r.schedule
    try:
        formula: Optional[float] = bubble_formula(s.name, s.pp, s.num_micro, s.vpp)
    except ValueError:
        formula = None
    return {"schedule": s.name, "pp": s.pp, "vpp": s.vpp, "micro_batches": s.num_micro,
            "makespan": r.makespan, "bubble": r.bubble_total, "bubble_formula": formula,
            "bubble_per_rank": r.bubble, "peak_in_flight": r.peak_in_flight,
            "peak_in_flight_stage_units": r.peak_in_flight_stages}


def _print_table(rows: list[dict], costs: Costs) -> None:
    print(f"costs: F={costs.f:g} B={costs.b:g} (zb: B={costs.b - costs.w:g} + W={costs.w:g}) comm={costs.comm:g}; "
          f"bubble = idle / (pp * makespan)")
    print(f"{'schedule':<12}{'vpp':>4}{'makespan':>10}{'bubble':>9}{'formula':>9}  {'bubble per rank':<28}"
          f"peak in-flight (mb x chunk) per rank")
    for r in rows:
        f = f"{r['bubble_formula']:.4f}" if r["bubble_formula"] is not None else "-"
        per = " ".join(f"{b:.3f}" for b in r["bubble_per_rank"])
        print(f"{r['schedule']:<12}{r['vpp']:>4}{r['makespan']:>10.3f}{r['bubble']:>9.4f}{f:>9}  {per:<28}"
              f"{r['peak_in_flight']}")


def main(argv: Optional[list[str]] = None) -> int:
    a = _parse(argv)
    names = list(SCHEDULES) if a.schedule == "all" else [a.schedule]
    costs = Costs(a.f_cost, a.b_cost, a.w_cost, a.comm)
    if not 0 <= a.w_cost < a.b_cost:
        print("error: --w-cost must be >= 0 and smaller than --b-cost (B = b - w must stay positive)", file=sys.stderr)
        return 2
    try:
        results = simulate_all(a.pp, a.vpp, a.micro_batches, names, costs)
    except ScheduleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows = [_row(r) for r in results]
    _print_table(rows, costs)
    if a.svg:
        from engine.parallel.pipeline.timeline import write_timeline

        print(f"timeline: {write_timeline(results, a.svg)}")
    report: dict = {"simulated": rows, "costs": vars(costs)}
    if a.measure:
        report["measured"] = measure_schedules(a, names)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"json: {a.json}")
    return 0


# ----------------------------------------------------------------------------- --measure


def _bench_model_cfg(a: argparse.Namespace):
    from engine.config import ModelConfig

    return ModelConfig(vocab_size=256, vocab_pad_multiple=8, d_model=a.d_model, n_layers=a.layers,
                       n_heads=4, ffn_hidden=4 * a.d_model, max_seq_len=a.seq)


def calibrate(a: argparse.Namespace, reps: int = 20) -> Costs:
    """Seconds of F, full B and W for one middle stage (n_layers/pp blocks) in this process, 1 thread."""
    import torch

    from engine.model.transformer import Transformer
    from engine.parallel.pipeline.weight_grad import WeightGradStore, defer_weight_grads

    torch.set_num_threads(1)
    cfg = _bench_model_cfg(a)
    stage = Transformer(cfg, layer_range=(0, cfg.n_layers // a.pp), pre_process=False, post_process=False)
    x = torch.randn(a.micro_batch_size, a.seq, a.d_model, requires_grad=True)
    gy = torch.randn_like(x)

    def timed(fn) -> float:
        fn()  # warm-up
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return sorted(ts)[len(ts) // 2]  # median: the machine is shared, means catch other jobs' spikes

    t_f = timed(lambda: stage(x))
    t_fb = timed(lambda: stage(x).backward(gy))
    store = WeightGradStore()
    with defer_weight_grads(store):
        out = stage(x)
    with store.capture(0):
        out.backward(gy)
    saved = list(store._pending[0])

    def w_only() -> None:
        store._pending[0] = list(saved)
        store.flush(0)

    t_w = timed(w_only)
    t_b = t_fb - t_f
    return Costs(f=t_f, b=t_b, w=min(t_w, 0.9 * t_b))  # W is part of B; keep B - W positive


def _measure_worker(rank: int, a: argparse.Namespace, names: list[str], port: int, q) -> None:
    """One rank of the timing job. Schedules take turns step by step (round robin), so load from other
    processes on a shared machine hits all of them alike; the median step time per schedule is reported."""
    import datetime
    import os

    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(a.pp),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=a.pp, timeout=datetime.timedelta(seconds=300))
    from engine.model.loss import lm_loss
    from engine.parallel.pipeline.executor import forward_backward_pipeline
    from engine.parallel.state import ParallelState
    from engine.train.build import build_chunks
    from engine.train.step import split_batch

    ps = ParallelState.initialize(tp=1, pp=a.pp, dp=1, device="cpu")
    cfg = _bench_model_cfg(a)
    chunks = {v: build_chunks(cfg, ps, seed=1, vpp=v) for v in {a.vpp if n == "interleaved" else 1 for n in names}}
    g = torch.Generator().manual_seed(0)
    batches = [split_batch({"tokens": torch.randint(0, 256, (a.micro_batch_size, a.seq + 1), generator=g)},
                           torch.device("cpu")) for _ in range(a.micro_batches)]

    def loss_fn(logits, batch):
        return lm_loss(logits, batch["targets"], cfg.vocab_size)
    times: dict[str, list[float]] = {n: [] for n in names}
    for step in range(a.steps + 1):
        for name in names:
            dist.barrier()
            t0 = time.perf_counter()
            forward_backward_pipeline(chunks[a.vpp if name == "interleaved" else 1], batches, ps, schedule=name,
                                      loss_fn=loss_fn, seq_len=a.seq, micro_batch_size=a.micro_batch_size,
                                      d_model=cfg.d_model)
            dist.barrier()
            if step:  # step 0 is the warm-up
                times[name].append(time.perf_counter() - t0)
    if rank == 0:
        q.put({n: sorted(t)[len(t) // 2] for n, t in times.items()})
    dist.destroy_process_group()


def measure_schedules(a: argparse.Namespace, names: list[str]) -> list[dict]:
    """Median seconds per step of each schedule on pp gloo CPU processes, next to the simulator's prediction."""
    import os
    import socket

    import torch.multiprocessing as mp

    cores = os.cpu_count() or 1
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"machine: {cores} CPU cores, load average {load:.2f} before measuring; torch threads per rank: 1")
    costs = calibrate(a)
    print(f"calibrated one-stage costs (s): F={costs.f:.5f} B={costs.b:.5f} W={costs.w:.5f} "
          f"(d_model={a.d_model}, {a.layers} layers, seq={a.seq}, micro-batch={a.micro_batch_size}, 1 thread)")
    ctx = mp.get_context("spawn")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    q = ctx.Queue()
    procs = [ctx.Process(target=_measure_worker, args=(r, a, names, port, q)) for r in range(a.pp)]
    for p in procs:
        p.start()
    measured = q.get(timeout=1200)
    for p in procs:
        p.join()
    rows = []
    for name in names:
        pred = simulate_all(a.pp, a.vpp, a.micro_batches, [name], costs)[0]
        # With fewer cores than stages the ranks time-share: no step can beat total compute / cores.
        floor = max(pred.makespan, sum(pred.busy) / min(a.pp, cores))
        rows.append({"schedule": name, "measured_s": measured[name], "predicted_s": pred.makespan,
                     "predicted_core_limited_s": floor, "predicted_bubble": pred.bubble_total})
    print(f"{'schedule':<12}{'measured s/step':>16}{'predicted':>11}{'ratio':>8}{'core-limited':>14}")
    for r in rows:
        print(f"{r['schedule']:<12}{r['measured_s']:>16.4f}{r['predicted_s']:>11.4f}"
              f"{r['measured_s'] / r['predicted_s']:>8.2f}{r['predicted_core_limited_s']:>14.4f}")
    return rows


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
