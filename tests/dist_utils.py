"""Run a function on N CPU processes joined by a gloo process group (the shared multi-process test helper).

    from tests.dist_utils import run_distributed

    def _work(rank: int, world_size: int, scale: float) -> float:   # module level: it is pickled by name
        t = torch.tensor([float(rank)])
        dist.all_reduce(t)
        return t.item() * scale

    assert run_distributed(_work, 2, 10.0) == [10.0, 10.0]

Each rank runs in a fresh `spawn`ed interpreter with MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE/LOCAL_RANK set
(so `LaunchEnv.from_env()` and `ParallelState.initialize()` see a torchrun-like launch) and the default
gloo group already initialised with a short timeout. Return values come back in rank order. If a rank
raises, the same exception type is raised here with the rank's traceback text attached (as `__cause__`),
so `pytest.raises(ValueError, match=...)` works on errors raised inside workers.

Start-up costs seconds per job (measured on this project's 2-core machine: ~8 s for 2 ranks, ~12 s for
4): run several test cases in one call where possible. Workers use one intra-op thread each because the
test machine has 2 cores.
"""

from __future__ import annotations

import datetime
import os
import pickle
import queue as queue_mod
import time
import traceback
from typing import Any, Callable

import torch.multiprocessing as mp

__all__ = ["run_distributed", "RemoteTraceback", "DistributedTestError"]


class RemoteTraceback(Exception):
    """Carries the formatted traceback of a worker; attached as `__cause__` of the re-raised exception."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


class DistributedTestError(RuntimeError):
    """A rank failed in a way that cannot be re-raised as its own exception (died, hung, unpicklable error)."""


def _rendezvous_store(timeout: float) -> Any:
    """The job's TCPStore, served by the parent on a port the OS picks (port 0) and held for the whole job.

    Picking a free port, releasing it and letting rank 0 bind it later is a race (another process can take
    the port in between); a store the parent already listens on cannot lose its port."""
    import torch.distributed as dist

    return dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                         timeout=datetime.timedelta(seconds=timeout))


def _worker(fn: Callable[..., Any], rank: int, world_size: int, port: int, args: tuple, timeout: float,
            threads: int, results: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    try:
        store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=datetime.timedelta(seconds=timeout))
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout))
        out = fn(rank, world_size, *args)
        payload = ("ok", pickle.dumps(out))
    except BaseException as e:  # noqa: BLE001 - everything must reach the parent, KeyboardInterrupt too
        tb = traceback.format_exc()
        try:
            blob = pickle.dumps(e)
            pickle.loads(blob)  # some exceptions pickle but fail to unpickle (custom __init__ signatures)
        except Exception:
            blob = None
        payload = ("err", (blob, f"{type(e).__name__}: {e}", tb))
    results.put((rank, payload))
    if payload[0] == "ok" and dist.is_initialized():
        # Only on success: after an error the peers may be gone and a collective teardown could block.
        dist.destroy_process_group()


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 120.0,
                    threads: int = 1) -> list[Any]:
    """Run `fn(rank, world_size, *args)` on `world_size` spawned gloo processes; return results in rank order.

    `fn` and `args` must be picklable (`fn` defined at module level). `timeout` bounds both the process-group
    timeout (a rank waiting for a hung peer) and the whole job's wall clock, in seconds.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, found {world_size}")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    store = _rendezvous_store(timeout)  # kept alive (and its port bound) until every rank is done
    port = store.port
    procs = [ctx.Process(target=_worker, args=(fn, r, world_size, port, args, timeout, threads, results),
                         name=f"dist-rank{r}", daemon=True) for r in range(world_size)]
    for p in procs:
        p.start()

    got: dict[int, tuple] = {}
    first_error: tuple[int, tuple] | None = None
    deadline = time.monotonic() + timeout + 30.0  # + start-up of the interpreters
    grace_end: float | None = None  # after the first error, give peers a moment to report, then stop them
    try:
        while len(got) < world_size:
            now = time.monotonic()
            if now > deadline or (grace_end is not None and now > grace_end):
                break
            try:
                rank, payload = results.get(timeout=0.2)
            except queue_mod.Empty:
                # A process that died without reporting (segfault, os._exit) would otherwise cost the timeout.
                dead = [r for r, p in enumerate(procs) if r not in got and p.exitcode not in (None, 0)]
                if dead and grace_end is None:
                    grace_end = time.monotonic() + 5.0
                continue
            got[rank] = payload
            if payload[0] == "err" and first_error is None:
                first_error = (rank, payload[1])
                grace_end = time.monotonic() + 5.0
    finally:
        for p in procs:
            p.join(timeout=5.0 if first_error is None and len(got) == world_size else 0.5)
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(timeout=5.0)
        results.close()
        del store

    if first_error is not None:
        rank, (blob, summary, tb) = first_error
        cause = RemoteTraceback(f"\n--- traceback of rank {rank} ---\n{tb}")
        exc = pickle.loads(blob) if blob is not None else None
        if isinstance(exc, Exception):
            raise exc from cause
        raise DistributedTestError(f"rank {rank} failed: {summary}") from cause
    missing = [r for r in range(world_size) if r not in got]
    if missing:
        codes = {r: procs[r].exitcode for r in missing}
        raise DistributedTestError(f"ranks {missing} did not report a result within {timeout:.0f} s "
                                   f"(exit codes {codes}; None = hung and was terminated)")
    return [pickle.loads(got[r][1]) for r in range(world_size)]
