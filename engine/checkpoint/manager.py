"""Saving checkpoints during a run: sync or async, atomic publication, retention.

    saver = CheckpointSaver(root, keep=3, keep_every=0, async_save=True)   # collective: every rank
    saver.save(step, pieces, tensors, meta)    # blocks only while the state is copied to host memory (async)
    saver.wait()                               # the save in flight has finished (and was published)
    saver.close()

One save at a time: `save` first waits for the previous one. The write runs on a process group of its own
(gloo, created here by every rank), so its collectives (DCP's plan exchange and completion) never
interleave with the training step's on the other groups. When every rank's shards are written and
fsynced, rank 0 publishes the directory (engine/checkpoint/files.py: metadata, marker, rename, `latest`)
and applies the retention rule. A failed write (any rank) is reported on the console, its temporary
directory is removed, and it never becomes `latest`; training goes on, and the next save tries again.
"""

from __future__ import annotations

import os
import secrets
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from engine.checkpoint.dcp_io import Pieces, write_pieces
from engine.checkpoint.files import StepDir, ensure_checkpoint_dir, fsync_file, publish, remove_stale, retain, temp_dir
from engine.errors import CheckpointError

__all__ = ["CheckpointSaver", "SaveOutcome"]


class SaveOutcome:
    """What became of one save: the published directory, or the error that stopped it."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.published: Optional[StepDir] = None
        self.error: Optional[BaseException] = None
        self.blocked_seconds = 0.0  # training was blocked: staging (async) or the whole save (sync)
        self.write_seconds = 0.0  # the DCP write and publication


def _cause(e: BaseException) -> BaseException:
    """The exception behind DCP's CheckpointException (which wraps each failed rank's exception and prints
    its traceback), so that a report reads `OSError: [Errno 28] No space left on device: '.../__0_0.distcp'`."""
    if isinstance(e, CheckpointException) and e.failures:
        return e.failures[min(e.failures)][0]
    return e


def _describe(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:500]}"


class CheckpointSaver:
    """Writes checkpoints under `root` (see the module docstring). Collective: every rank constructs it and
    calls `save` with the same steps."""

    def __init__(self, root: Path, *, keep: int = 3, keep_every: int = 0, async_save: bool = False,
                 log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)) -> None:
        self.root = Path(root)
        self.keep, self.keep_every, self.async_save = keep, keep_every, async_save
        self.log = log
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0
        # a group of our own: the background write's collectives must not interleave with training's
        self.group = dist.new_group(backend="gloo") if self.distributed else None
        ident = [f"{os.getpid()}", secrets.token_hex(4)]  # rank 0's pid names the temporaries
        if self.distributed:
            dist.broadcast_object_list(ident, src=0, group=self.group)
        self._pid, self._token = int(ident[0]), ident[1]
        if self.rank == 0:
            ensure_checkpoint_dir(self.root)
            removed = remove_stale(self.root)
            if removed:
                self.log(f"tessera: removed {len(removed)} unfinished checkpoint(s) of an earlier run under "
                         f"{self.root}")
        self._staging: dict = {}  # host buffers of async saves, reused (the previous write is done by then)
        self._thread: Optional[threading.Thread] = None
        self._inflight: Optional[SaveOutcome] = None
        self.last: Optional[SaveOutcome] = None  # the newest finished save
        self.failures = 0

    # ------------------------------------------------------------ saving
    def prepare(self, pieces: Pieces) -> None:
        """Async only: allocate (and touch) the host buffers the saves will stage into now, at the start of
        the run, rather than in the first save, where first-touching gigabytes of (pinned) memory would
        block training several times longer than the copy itself. They hold one copy of this rank's
        checkpoint state in host memory for the rest of the run."""
        if self.async_save:
            pieces.to_host(self._staging)

    def save(self, step: int, pieces: Pieces, tensors: dict[str, torch.Tensor],
             meta: Callable[[], bytes], files: Optional[dict[str, Path]] = None) -> SaveOutcome:
        """Save step `step` (collective). `meta()` is called on rank 0 once the shards are written and gives
        tessera.json. `files` (name in the checkpoint -> source; small files such as the tokenizer's) are
        copied in by rank 0 before publication. Returns at once after staging when async; after publication
        when sync."""
        self.wait()
        out = SaveOutcome(step)
        t0 = time.perf_counter()
        tmp = temp_dir(self.root, step, self._pid, self._token)
        if self.async_save:
            staged = pieces.to_host(self._staging)  # the only part training waits for
            staged_tensors = {k: v.detach().to("cpu", copy=True) for k, v in tensors.items()}
            out.blocked_seconds = time.perf_counter() - t0
            self._inflight = out
            self._thread = threading.Thread(target=self._write, args=(out, tmp, staged, staged_tensors, meta, t0,
                                                                      files),
                                            name=f"tessera-checkpoint-{step}", daemon=True)
            self._thread.start()
            return out
        self._write(out, tmp, pieces, tensors, meta, t0, files)
        out.blocked_seconds = time.perf_counter() - t0
        self._report(out)
        return out

    def _write(self, out: SaveOutcome, tmp: Path, pieces: Pieces, tensors: dict[str, torch.Tensor],
               meta: Callable[[], bytes], t0: float, files: Optional[dict[str, Path]] = None) -> None:
        try:
            write_pieces(tmp, pieces, tensors, self.group)
            if self.rank == 0:
                for name, src in (files or {}).items():
                    (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(src, tmp / name)
                    fsync_file(tmp / name)
                out.published = publish(tmp, self.root, out.step, meta())
                retain(self.root, self.keep, self.keep_every)
        except BaseException as e:  # noqa: BLE001 - DCP's CheckpointException is a BaseException
            out.error = _cause(e)
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            if not isinstance(out.error, Exception) and threading.current_thread() is threading.main_thread():
                raise out.error from None  # a second Ctrl-C during a sync save: an interrupt, not a failed save
        out.write_seconds = time.perf_counter() - t0

    def _report(self, out: SaveOutcome) -> None:
        self.last = out
        if out.error is not None:
            self.failures += 1
            if self.rank == 0 or not isinstance(out.error, Exception):
                self.log(f"tessera: checkpoint of step {out.step} FAILED and was discarded (the previous "
                         f"checkpoint stays `latest`): {_describe(out.error)}")
        elif out.published is not None:
            how = f"async, training blocked {out.blocked_seconds:.2f} s" if self.async_save else "sync"
            self.log(f"tessera: checkpoint {out.published.path} ({how}, {out.write_seconds:.2f} s)")

    def wait(self) -> Optional[SaveOutcome]:
        """Wait for the save in flight; report it. Returns it (None if there was none)."""
        if self._thread is None:
            return None
        self._thread.join()
        out = self._inflight
        self._thread, self._inflight = None, None
        self._report(out)
        return out

    def close(self) -> None:
        self.wait()
        if self.group is not None:
            dist.destroy_process_group(self.group)
            self.group = None

    def raise_if_failed(self, out: Optional[SaveOutcome]) -> None:
        """For the final save of a run: a failure there is an error of the run (one line, the path named)."""
        if out is not None and out.error is not None:
            e = out.error
            if isinstance(e, OSError):
                raise CheckpointError(f"checkpoint of step {out.step} under {self.root} could not be written: "
                                      f"{e.filename or ''} {e.strerror or e}".strip()) from e
            raise CheckpointError(f"checkpoint of step {out.step} under {self.root} could not be written: "
                                  f"{_describe(e)}") from None
