"""`tessera bench checkpoint`: what a sharded checkpoint costs a run: save (sync, async), load, size.

    tessera bench checkpoint                                  # ~134M-parameter Llama-style model, CPU
    tessera bench checkpoint --preset llama3.2-1b --device cuda --dtype bf16

One process builds a Trainer (byte tokenizer, builtin:pydoc, short sequences: building the data is quick),
takes one training step so that the AdamW moments exist, then measures with the engine's own code
(engine/train/checkpointing.py for the state, engine/checkpoint/manager.py to write, `load_checkpoint` to
read), `--reps` times each, sync and async saves alternating so that drift in machine speed hits both:

- sync save: the wall time of the training loop's save call (the state's views and tessera.json, then
  `CheckpointSaver.save`, which returns once the checkpoint is written, fsynced and published);
- async save: the time training is blocked (the same call, which returns once the state is staged in host
  memory) and the time until the background write has been published, with training idle meanwhile;
- load: `load_checkpoint` into the same Trainer, with the files in the page cache (just written) and after
  asking the kernel to drop them from it (posix_fadvise DONTNEED; on a VM the host may still cache them);
- size: the bytes of the step directory on disk, next to the bytes of the state it holds;
- the first save of each kind, on its own: it pays what later saves do not (the async saver allocates and
  first touches its staging buffers, reused from then on; DCP's first call);
- interference: training steps while an async write is in flight vs steps without one (on few CPU cores
  the writer thread competes with training), and how long the write then takes.

Prints a table (median, min over the repetitions) and writes JSON (`--out`). Checkpoints go to a fresh
temporary directory (under `--dir` if given) that is deleted on exit.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from engine.bench import measure_in_temp_dir

DEFAULT_OUT = Path("docs/results/bench_checkpoint_cpu.json")
TARGET_PCT = 10.0  # the target: async blocking <= 10% of a sync save

# What the generic `llama` preset leaves to the user (and any preset lacking them gets): a ~134M model.
_SIZE_DEFAULTS = {"d_model": 768, "n_layers": 12, "ffn_hidden": 2048, "vocab_size": 32000}


def _config(args: argparse.Namespace, out_dir: Path):
    from engine.config import config_from_dict, parse_override
    from engine.model.presets import get_preset

    preset = get_preset(args.preset)
    model: dict = {"preset": args.preset}
    for key, flag in (("d_model", args.d_model), ("n_layers", args.layers), ("n_heads", args.heads),
                      ("ffn_hidden", args.ffn), ("vocab_size", args.vocab)):
        if flag is not None:
            model[key] = flag
        elif key in _SIZE_DEFAULTS and key not in preset:
            model[key] = _SIZE_DEFAULTS[key]
    if "n_heads" not in model and "n_heads" not in preset:
        model["n_heads"] = max(1, model.get("d_model", preset.get("d_model", 768)) // 64)
    if args.heads is not None and "n_kv_heads" in preset and args.heads % (preset["n_kv_heads"] or 1):
        model["n_kv_heads"] = args.heads
    if preset.get("max_seq_len", 0) < args.seq_len:  # else the preset's (a learned position table is weights)
        model["max_seq_len"] = args.seq_len
    tree = {
        "model": model,
        "data": {"tokenizer": "byte", "train": [{"path": "builtin:pydoc"}], "split": "100,0,0",
                 "seq_len": args.seq_len, "cache_dir": str(out_dir / "data_cache")},
        # enough samples for every step the benchmark takes; the LR schedule is irrelevant here
        "train": {"micro_batch_size": args.batch, "global_batch_size": args.batch, "iters": 100_000,
                  "eval_interval": 0, "out_dir": str(out_dir / "run"), "device": args.device,
                  "tensorboard": False, "progress": False},
        "optim": {"warmup_iters": 1},
        "precision": {"dtype": args.dtype},
    }
    for text in args.overrides:  # section.key=value
        keys, value = parse_override(text)
        node = tree
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    return config_from_dict(tree, world_size=1)


def _stats(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "all": xs}


def _dir_bytes(path: Path) -> tuple[int, int]:
    files = [p for p in Path(path).rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files), len(files)


def _drop_page_cache(path: Path) -> None:
    """Ask the kernel to evict the (clean, fsynced) files of `path` from the page cache."""
    for p in Path(path).rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _prune(root: Path) -> None:
    """Remove every complete checkpoint but the newest (outside the timings: retention is not measured)."""
    from engine.checkpoint.files import complete_steps

    for s in complete_steps(root)[:-1]:
        shutil.rmtree(s.path)


def _sync(trainer) -> None:
    if trainer.pstate.device.type == "cuda":
        torch.cuda.synchronize(trainer.pstate.device)


class _Bench:
    def __init__(self, trainer, root: Path) -> None:
        from engine.checkpoint.manager import CheckpointSaver
        from engine.train.checkpointing import trainer_checkpoint_state

        self.trainer, self.root = trainer, root
        quiet = lambda s: None  # noqa: E731 - the benchmark prints its own table
        self.sync = CheckpointSaver(root, keep=0, async_save=False, log=quiet)
        self.asyn = CheckpointSaver(root, keep=0, async_save=True, log=quiet)
        # as `tessera train` does at the start of an async run: allocate the staging buffers up front
        t0 = time.perf_counter()
        self.asyn.prepare(trainer_checkpoint_state(trainer)[0])
        self.prepare_s = time.perf_counter() - t0
        self.step = trainer.iteration

    def save(self, saver) -> tuple[float, object]:
        """The training loop's save (engine/train/loop.py): the state, tessera.json, `saver.save`. Returns
        (seconds until it returned = training blocked, SaveOutcome)."""
        from engine.train.checkpointing import checkpoint_meta, trainer_checkpoint_state

        self.step += 1  # a new step directory each time (the same step would replace the last one)
        _sync(self.trainer)
        t0 = time.perf_counter()
        pieces, tensors = trainer_checkpoint_state(self.trainer)
        meta = json.dumps(checkpoint_meta(self.trainer, []), indent=1).encode()
        out = saver.save(self.step, pieces, tensors, lambda: meta)
        blocked = time.perf_counter() - t0
        return blocked, out

    def finish(self, saver, out) -> None:
        saver.wait()
        if out.error is not None:
            raise RuntimeError(f"bench checkpoint: the save of step {out.step} failed: {out.error}") from out.error

    def close(self) -> None:
        self.sync.close()
        self.asyn.close()


def _state_probe(trainer) -> dict[str, torch.Tensor]:
    """Views of a few saved tensors (parameters and moments, spread over the model), to clobber before a
    load and check after it."""
    from engine.train.checkpointing import trainer_checkpoint_state

    pieces, _ = trainer_checkpoint_state(trainer)
    names = sorted(pieces.boxes)
    return {n: pieces.boxes[n][0][1] for n in names[::max(1, len(names) // 6)]}


def measure(args: argparse.Namespace, workdir: Path) -> dict:
    from engine.bench import device_name
    from engine.parallel.state import ParallelState, pick_device
    from engine.train.checkpointing import load_checkpoint, trainer_checkpoint_state
    from engine.checkpoint.files import latest_step

    cfg = _config(args, workdir)
    device = pick_device(cfg.train.device, 0)
    load_before = os.getloadavg()[0]  # other work on the machine skews every number: recorded alongside
    t0 = time.perf_counter()
    from engine.train.trainer import Trainer

    trainer = Trainer(cfg, ParallelState.single(device))
    build_s = time.perf_counter() - t0
    first = trainer.train_step()  # the optimizer state exists from here on
    n_params = trainer.count_parameters()
    pieces, _ = trainer_checkpoint_state(trainer)
    state_bytes = pieces.nbytes()
    del pieces
    root = workdir / "checkpoints"
    b = _Bench(trainer, root)
    try:
        # ---- saves: sync and async alternate, training idle. The first save of each kind is reported on
        # its own: it pays one-time costs (the async saver allocates and first touches its staging buffers,
        # which later saves reuse; DCP's first call), once per run
        first_sync, out = b.save(b.sync)
        b.finish(b.sync, out)
        _prune(root)
        first_blocked, out = b.save(b.asyn)
        b.finish(b.asyn, out)
        first_async_total = out.write_seconds
        _prune(root)
        sync_s, blocked_s, saver_blocked_s, async_total_s = [], [], [], []
        for _ in range(args.reps):
            s, out = b.save(b.sync)
            b.finish(b.sync, out)
            sync_s.append(s)
            _prune(root)
            s, out = b.save(b.asyn)
            b.finish(b.asyn, out)
            blocked_s.append(s)
            saver_blocked_s.append(out.blocked_seconds)
            async_total_s.append(out.write_seconds)
            _prune(root)
        step_dir = latest_step(root)
        disk_bytes, n_files = _dir_bytes(step_dir.path)

        # ---- load: the newest checkpoint holds the Trainer's current state; clobber it, load, compare
        probe = {k: v.detach().clone() for k, v in _state_probe(trainer).items()}
        load_warm, load_cold = [], []
        for r in range(2 * args.reps):
            cold = r % 2 == 1
            with torch.no_grad():
                for v in _state_probe(trainer).values():
                    v.fill_(7.0)
            if cold:
                _drop_page_cache(step_dir.path)
            _sync(trainer)
            t0 = time.perf_counter()
            load_checkpoint(trainer, step_dir.path)
            _sync(trainer)
            (load_cold if cold else load_warm).append(time.perf_counter() - t0)
            got = _state_probe(trainer)
            bad = [k for k, v in probe.items() if not torch.equal(got[k], v)]
            if bad:
                raise RuntimeError(f"bench checkpoint: load did not restore {bad[:3]}")
        restored = True

        # ---- interference: steps with no save vs steps while an async write is in flight, side by side in
        # each repetition (ratios per repetition: drift in machine speed cancels)
        idle_steps, busy_steps, write_busy_s, overlapped, slowdown, cost = [], [], [], [], [], []
        for _ in range(args.reps):
            idle = [trainer.train_step().seconds for _ in range(args.steps)]
            blocked, out = b.save(b.asyn)
            busy = []
            while out.write_seconds == 0.0:  # the writer thread sets it when it has finished
                busy.append(trainer.train_step().seconds)  # a step started while the write was in flight
            b.finish(b.asyn, out)
            write_busy_s.append(out.write_seconds)
            overlapped.append(len(busy))
            idle_steps += idle
            busy_steps += busy
            base = statistics.median(idle)
            if busy:
                slowdown.append(100.0 * (statistics.median(busy) - base) / base)
            # what this save cost training: the blocked time plus what the overlapped steps took beyond a step
            cost.append(blocked + sum(busy) - len(busy) * base)
            _prune(root)
    finally:
        b.close()
    trainer.close()

    sync_med, blocked_med = statistics.median(sync_s), statistics.median(blocked_s)
    pct = 100.0 * blocked_med / sync_med
    argv = args.argv if args.argv is not None else sys.argv[1:]
    return {
        "command": "tessera bench checkpoint " + " ".join(argv),
        "device": device_name(device), "cpu_count": os.cpu_count(), "torch": torch.__version__,
        "preset": args.preset, "dtype": cfg.precision.dtype, "params": n_params,
        "model": {k: getattr(cfg.model, k) for k in ("d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden",
                                                      "vocab_size", "tie_embeddings")},
        "seq_len": cfg.seq_len, "batch": args.batch, "reps": args.reps,
        "build_s": build_s, "first_step_s": first.seconds,
        "state_bytes": state_bytes, "disk_bytes": disk_bytes, "files": n_files,
        "async_prepare_s": b.prepare_s,  # staging buffers allocated at the start of the run (not blocking a save)
        "first_sync_save_s": first_sync, "first_async_blocked_s": first_blocked,
        "first_async_total_s": first_async_total,
        "sync_save_s": _stats(sync_s),
        "async_blocked_s": _stats(blocked_s),
        "async_blocked_saver_s": _stats(saver_blocked_s),  # SaveOutcome.blocked_seconds (staging only)
        "async_total_s": _stats(async_total_s),
        "load_warm_s": _stats(load_warm), "load_cold_s": _stats(load_cold), "load_restored": restored,
        "sync_write_gb_per_s": state_bytes / sync_med / 1e9,
        "blocked_pct_of_sync": pct, "target_pct": TARGET_PCT, "target_met": pct <= TARGET_PCT,
        "step_idle_s": _stats(idle_steps),
        "step_during_write_s": _stats(busy_steps) if busy_steps else None,
        "steps_during_write": overlapped,
        "step_slowdown_pct": statistics.median(slowdown) if slowdown else None,  # median over repetitions
        "async_cost_to_training_s": _stats(cost),
        "async_total_training_s": _stats(write_busy_s),
        "loadavg_1min": [load_before, os.getloadavg()[0]],  # at the start and the end
    }


def _table(res: dict) -> str:
    def row(name: str, key: str) -> str:
        s = res[key]
        if s is None:
            return f"| {name} | n/a | n/a | 0 |"
        return f"| {name} | {s['median']:.3f} | {s['min']:.3f} | {len(s['all'])} |"

    slow = res["step_slowdown_pct"]
    lines = [
        "| measure | median s | min s | n |", "|---|---|---|---|",
        row("sync save (training blocked)", "sync_save_s"),
        row("async save: training blocked", "async_blocked_s"),
        row("async save: of which staging (SaveOutcome.blocked_seconds)", "async_blocked_saver_s"),
        row("async save: until written, training idle", "async_total_s"),
        row("async save: until written, training concurrently", "async_total_training_s"),
        row("load (files in the page cache)", "load_warm_s"),
        row("load (page cache dropped)", "load_cold_s"),
        row("training step, no save in flight", "step_idle_s"),
        row("training step, async write in flight", "step_during_write_s"),
        row("async save: training time lost (blocked + slower steps)", "async_cost_to_training_s"),
        f"| first save of a run: sync | {res['first_sync_save_s']:.3f} | | 1 |",
        f"| first save of a run: async, training blocked | {res['first_async_blocked_s']:.3f} | | 1 |",
        f"| async staging buffers allocated at the start of the run | {res['async_prepare_s']:.3f} | | 1 |",
        "",
        f"model: {res['preset']}, {res['params']:,} parameters, {res['dtype']}; state "
        f"{res['state_bytes'] / 1e9:.3f} GB, on disk {res['disk_bytes'] / 1e9:.3f} GB in {res['files']} files; "
        f"device: {res['device']}, torch {res['torch']}",
        f"async blocking = {res['blocked_pct_of_sync']:.1f}% of a sync save (target <= {res['target_pct']:.0f}%: "
        f"{'met' if res['target_met'] else 'NOT met'}); training steps "
        + (f"{slow:+.0f}% slower" if slow is not None else "(none overlapped)") + " while a write is in flight; "
        f"an async save cost training {res['async_cost_to_training_s']['median']:.2f} s in all, a sync save "
        f"{res['sync_save_s']['median']:.2f} s",
    ]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="tessera bench checkpoint", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="section.key=value config overrides")
    ap.add_argument("--preset", default="llama", help="model preset (default llama: the generic Llama shape)")
    ap.add_argument("--d-model", type=int, default=None, help="hidden size (default the preset's, else 768)")
    ap.add_argument("--layers", type=int, default=None, help="transformer blocks (default the preset's, else 12)")
    ap.add_argument("--heads", type=int, default=None, help="attention heads (default the preset's, else d_model/64)")
    ap.add_argument("--ffn", type=int, default=None, help="MLP hidden size (default the preset's, else 2048)")
    ap.add_argument("--vocab", type=int, default=None, help="vocabulary size (default the preset's, else 32000)")
    ap.add_argument("--seq-len", type=int, default=64, help="tokens per sample (default 64)")
    ap.add_argument("--batch", type=int, default=2, help="samples per step (default 2)")
    ap.add_argument("--dtype", default="fp32", help="precision.dtype (default fp32)")
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    ap.add_argument("--reps", type=int, default=5, help="repetitions of each measurement (default 5)")
    ap.add_argument("--steps", type=int, default=3, help="training steps without a save per repetition (default 3)")
    ap.add_argument("--dir", type=Path, default=None,
                    help="write checkpoints into a fresh directory under this one (default the system's temp dir); "
                         "it is deleted on exit")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON results (default {DEFAULT_OUT})")
    args = ap.parse_args(argv)
    if args.reps < 1 or args.steps < 1:
        ap.error("--reps and --steps must be at least 1")
    args.argv = argv
    measure_in_temp_dir(lambda work: measure(args, work), "tessera-bench-checkpoint-", args.dir, args.out, _table)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
