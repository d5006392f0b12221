"""`tessera bench plan`: the memory planner (engine/plan) against the measured peak of real training steps.

    tessera bench plan CFG [a.b=c ...] [--steps 1] [--json out.json]
    torchrun --nproc-per-node 2 -m engine bench plan CFG parallel.pp=2 parallel.schedule=zb

Each rank builds the real Trainer for CFG, trains one warm-up step (the optimizer's moments exist from then
on, as in every later step), then measures the peak memory of `--steps` more steps:

- CUDA: `torch.cuda.max_memory_allocated` (everything the caching allocator handed out, from the start);
- CPU: `PeakTracker`, a TorchDispatchMode that counts every tensor storage alive -- those that existed before
  the step (parameters, buffers, grad buffers, optimizer state: registered up front) and every one an op
  creates during it (freed when its last reference goes) -- the same bookkeeping as torch's
  `torch.distributed._tools.mem_tracker.MemTracker`, which itself refuses a module called twice in one
  tracked region (every gradient-accumulation step calls it once per micro-batch).

The prediction for the rank's pipeline stage (`engine.plan.estimate_memory`) is printed beside it, with the
error. The test tests/test_plan_memory.py runs this on a grid of layouts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import weakref
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from engine.bench import device_name

__all__ = ["PeakTracker", "measure_peak", "main"]


def _storages(t: torch.Tensor) -> list[torch.UntypedStorage]:
    """The storages behind a tensor (the local tensor of a DTensor, the inner tensors of other wrappers)."""
    if hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        inner = (getattr(t, n) for n in names)
        return [s for x in inner if isinstance(x, torch.Tensor) for s in _storages(x)]
    try:
        return [t.untyped_storage()]
    except (RuntimeError, NotImplementedError):  # a tensor without storage (meta, some wrappers)
        return []


class PeakTracker(TorchDispatchMode):
    """Bytes of tensor storage alive, and the most at any moment, while the mode is active (CPU tensors).

    `track(obj)` registers what exists already (a module's parameters and buffers, an optimizer's state, a
    tensor); every tensor an op returns inside the mode is added once per storage and subtracted when the
    storage is freed. `UntypedStorage.resize_` (FSDP2 frees and re-allocates its gathered parameters so) is
    followed while the mode is active."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._sizes: dict[int, list[int]] = {}  # id(storage) -> [nbytes] (a list: the finalizer updates it)
        self._refs: dict[int, Any] = {}
        self._resize = None

    def _add(self, st: torch.UntypedStorage) -> None:
        key = id(st)
        n = st.nbytes()
        if key in self._sizes:
            old = self._sizes[key]
            if old[0] != n:  # resized outside our patched resize_
                self.live += n - old[0]
                old[0] = n
            return
        size = [n]
        self._sizes[key] = size

        def freed(_ref: Any, key: int = key, size: list[int] = size) -> None:
            self.live -= size[0]
            self._sizes.pop(key, None)
            self._refs.pop(key, None)

        self._refs[key] = weakref.ref(st, freed)
        self.live += n
        self.peak = max(self.peak, self.live)

    def track(self, *objs: Any) -> "PeakTracker":
        """Register tensors that exist already: modules (parameters, buffers), torch optimizers (state) and
        tensors, in any nesting of lists/tuples/dicts."""
        for obj in tree_flatten(list(objs))[0]:
            if isinstance(obj, torch.nn.Module):
                for t in list(obj.parameters()) + list(obj.buffers()):
                    for st in _storages(t):
                        self._add(st)
            elif isinstance(obj, torch.optim.Optimizer):
                for state in obj.state.values():
                    for t in state.values():
                        if torch.is_tensor(t):
                            for st in _storages(t):
                                self._add(st)
            elif torch.is_tensor(obj):
                for st in _storages(obj):
                    self._add(st)
        return self

    def __enter__(self) -> "PeakTracker":
        self.peak = self.live
        orig = torch.UntypedStorage.resize_
        tracker = self

        def resize_(st: torch.UntypedStorage, size: int) -> Any:
            out = orig(st, size)
            key = id(st)
            if key in tracker._sizes:
                tracker.live += st.nbytes() - tracker._sizes[key][0]
                tracker._sizes[key][0] = st.nbytes()
                tracker.peak = max(tracker.peak, tracker.live)
            else:
                tracker._add(st)
            return out

        self._resize = orig
        torch.UntypedStorage.resize_ = resize_  # type: ignore[method-assign]
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        if self._resize is not None:
            torch.UntypedStorage.resize_ = self._resize  # type: ignore[method-assign]
            self._resize = None
        super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch protocol
        if any(hasattr(t, "__tensor_flatten__") and t is not torch.Tensor for t in types):
            return NotImplemented  # a tensor subclass (DTensor): let it run as local ops first
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                for st in _storages(t):
                    self._add(st)
        return out


def _existing_tensors(trainer: Any) -> list[Any]:
    """What a Trainer holds across steps: model chunks, optimizer state, the data-parallel buffers."""
    b = trainer.built
    objs: list[Any] = list(b.chunks) + [b.optimizer.inner]
    for buf in getattr(b.ddp, "buffers", []):
        objs += [buf.grad] + ([buf.param] if buf.param is not None else [])
    return objs


def measure_peak(trainer: Any, steps: int = 1) -> int:
    """Peak bytes of this rank over `steps` training steps of `trainer` (collective under a process group).
    Train at least one step before, so the optimizer state exists as in every later step."""
    device = trainer.pstate.device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        for _ in range(steps):
            trainer.train_step()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device))
    tracker = PeakTracker().track(_existing_tensors(trainer))
    with tracker:
        for _ in range(steps):
            trainer.train_step()
    return tracker.peak


def measure_config(cfg: Any, pstate: Any, steps: int = 1) -> dict:
    """Build the Trainer for `cfg`, train one step, measure `steps` more: {"rank", "pp_rank", "peak"}."""
    from engine.train.trainer import Trainer

    trainer = Trainer(cfg, pstate)
    try:
        trainer.train_step()
        peak = measure_peak(trainer, steps)
    finally:
        trainer.close()
    return {"rank": pstate.rank, "pp_rank": pstate.pp_rank, "peak": peak, "vocab_size": cfg.model.vocab_size}


def compare(cfg: Any, world_size: int, measured: list[dict], device_type: str) -> list[dict]:
    """One row per rank: measured peak, the planner's prediction for its stage, relative error."""
    from engine.plan import estimate_memory, layout_of

    if measured and cfg.model.vocab_size == 0:  # the Trainer took it from the tokenizer
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=measured[0]["vocab_size"]))
    predicted = estimate_memory(cfg, layout_of(cfg, world_size), device_type)
    rows = []
    for m in measured:
        p = predicted[m["pp_rank"]]
        rows.append({**m, "predicted": p.peak, "error": p.peak / m["peak"] - 1.0, "breakdown": p.as_dict()})
    return rows


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="tessera bench plan", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", help="YAML config")
    ap.add_argument("overrides", nargs="*", help="section.key=value overrides")
    ap.add_argument("--steps", type=int, default=1, help="measured steps after one warm-up step (default 1)")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    return ap


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    from engine.config import load_config
    from engine.parallel.state import LaunchEnv, ParallelState

    env = LaunchEnv.from_env()
    cfg = load_config(args.config, [*args.overrides, "train.progress=false", "train.tensorboard=false",
                                    "train.eval_interval=0"], world_size=env.world_size)
    p = cfg.parallel
    owns_group = not dist.is_initialized()
    pstate = ParallelState.initialize(tp=p.tp, pp=p.pp, dp=None if p.dp == "auto" else p.dp, vpp=p.vpp,
                                      sequence_parallel=p.sequence_parallel, device=cfg.train.device,
                                      timeout_minutes=p.timeout_minutes)
    try:
        raw = measure_config(cfg, pstate, args.steps)
        ranks = [raw]
        if pstate.is_distributed:
            ranks = [None] * pstate.world_size
            dist.all_gather_object(ranks, raw)
    finally:
        if owns_group and pstate.is_distributed:
            pstate.destroy()
    if not pstate.is_rank0:
        return 0
    rows = compare(cfg, pstate.world_size, ranks, pstate.device.type)
    print(f"device: {device_name(pstate.device)}; {'max_memory_allocated' if pstate.device.type == 'cuda' else 'tensor storages alive (PeakTracker)'}")
    print(f"{'rank':>4} {'stage':>5} {'measured MiB':>13} {'predicted MiB':>14} {'error':>7}")
    for r in rows:
        print(f"{r['rank']:>4} {r['pp_rank']:>5} {r['peak'] / 2**20:>13.1f} {r['predicted'] / 2**20:>14.1f} "
              f"{r['error']:>+7.1%}")
    if args.json is not None:
        args.json.write_text(json.dumps({"command": shlex.join(["tessera", "bench", "plan", *argv]),
                                         "device": device_name(pstate.device), "rows": rows}, indent=1) + "\n")
    return 0
