"""The run directory: resolved config, metrics, final weights (engine/checkpoint/weights.py).

Rules, so that nothing a user keeps is lost:
- checked before anything is written (`check_run_dir`, read-only): a new or empty directory, or a Tessera run
  directory (it holds `.tessera-run`, or an older run's config.yaml and metrics.jsonl), is fine; a directory
  with other files is refused unless `train.allow_foreign_dir`, and then its files are left alone (a file
  Tessera would write there, such as config.yaml, is refused rather than overwritten);
- one run at a time: `RunLock` holds an exclusive lock on `.tessera.lock` for the whole run (released by the
  OS if the process dies), and a second run on the same directory stops with a message;
- prepared only after the config, the tokenizer and the data were checked and the datasets built
  (`prepare_run_dir`): a previous Tessera run's files move to archive/<UTC time>/, never anything else.
Files users keep are written atomically.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import shutil
from pathlib import Path
from typing import Optional

from engine.checkpoint.weights import remove_stale_temporaries
from engine.config import Config
from engine.errors import RunDirError

RUN_FILES = ("config.yaml", "metrics.jsonl", "tensorboard", "model.safetensors")
MARKER = ".tessera-run"
LOCK = ".tessera.lock"

__all__ = ["RUN_FILES", "RunLock", "atomic_write_bytes", "check_run_dir", "is_tessera_run", "prepare_run_dir"]


def atomic_write_bytes(path: Path, data: bytes) -> None:
    remove_stale_temporaries(path)  # of a process that died while writing this file
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def is_tessera_run(out_dir: Path) -> bool:
    """Written by Tessera: the marker, or (runs from before the marker) a config.yaml next to metrics.jsonl."""
    return (out_dir / MARKER).is_file() or ((out_dir / "config.yaml").is_file()
                                             and (out_dir / "metrics.jsonl").is_file())


def check_run_dir(out_dir: Path, allow_foreign: bool = False) -> None:
    """Raise RunDirError if a run may not use `out_dir` (see the module docstring). Reads only."""
    if out_dir.exists() and not out_dir.is_dir():
        raise RunDirError(f"train.out_dir {str(out_dir)!r}: expected a directory, found a file")
    if out_dir.is_dir():
        if not os.access(out_dir, os.W_OK | os.X_OK):
            raise RunDirError(f"train.out_dir {str(out_dir)!r}: the directory is not writable")
        entries = {p.name for p in out_dir.iterdir()}
        if not is_tessera_run(out_dir) and entries - {"data_cache", LOCK}:
            if not allow_foreign:
                shown = ", ".join(sorted(entries)[:5]) + (" ..." if len(entries) > 5 else "")
                raise RunDirError(f"train.out_dir {str(out_dir)!r}: expected a new, empty or Tessera run directory, "
                                  f"found other files ({shown}); choose another directory, or set "
                                  f"train.allow_foreign_dir=true to train there (its files are left alone)")
            clash = sorted(entries & set(RUN_FILES))
            if clash:
                raise RunDirError(f"train.out_dir {str(out_dir)!r} is not a Tessera run directory but holds "
                                  f"{', '.join(clash)}, which a run would overwrite; move them or choose another "
                                  f"directory")
    else:
        parent = next((p for p in out_dir.absolute().parents if p.exists()), None)
        if parent is None or not os.access(parent, os.W_OK | os.X_OK):
            raise RunDirError(f"train.out_dir {str(out_dir)!r}: cannot create it ({parent} is not writable)")


class RunLock:
    """An exclusive lock on <out_dir>/.tessera.lock for as long as the run holds it (rank 0)."""

    def __init__(self, out_dir: Path) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        self.path = out_dir / LOCK
        self._f = open(self.path, "a+")
        try:
            fcntl.flock(self._f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._f.seek(0)
            holder = self._f.read().strip() or "another process"
            self._f.close()
            raise RunDirError(f"train.out_dir {str(out_dir)!r} is in use by another run ({holder}); wait for it "
                              f"to finish or choose another directory") from None
        self._f.seek(0)
        self._f.truncate()
        self._f.write(f"pid {os.getpid()} on {os.uname().nodename}, since "
                      f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M:%S} UTC")
        self._f.flush()

    def release(self) -> None:
        if not self._f.closed:
            fcntl.flock(self._f, fcntl.LOCK_UN)
            self._f.close()


def prepare_run_dir(out_dir: Path, cfg: Config, engine_version: Optional[str] = None, resume: bool = False) -> None:
    """Archive a previous Tessera run's files (only those) and write this run's marker and config.yaml.
    `resume`: this run continues the previous one from a checkpoint, so its metrics are appended to."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if is_tessera_run(out_dir) and not resume:
        old = [out_dir / n for n in RUN_FILES if (out_dir / n).exists()]
        if old:
            stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
            dest = out_dir / "archive" / stamp
            dest.mkdir(parents=True)
            for path in old:
                shutil.move(str(path), dest / path.name)
            print(f"tessera: {out_dir} held an earlier run; its files were moved to {dest}", flush=True)
    atomic_write_bytes(out_dir / MARKER, json.dumps({"engine": engine_version or "", "created": datetime.datetime.now(
        datetime.timezone.utc).isoformat()}).encode())
    atomic_write_bytes(out_dir / "config.yaml", cfg.to_yaml().encode())
