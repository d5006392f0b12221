"""The run directory: resolved config (final weights: engine/checkpoint/weights.py). Files users keep are written
atomically."""

from __future__ import annotations

import datetime
import os
import shutil
from pathlib import Path

from engine.config import Config

RUN_FILES = ("config.yaml", "metrics.jsonl", "tensorboard", "model.safetensors")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def prepare_run_dir(out_dir: Path, cfg: Config) -> None:
    """Create the run directory and write config.yaml. A previous run's files there are moved to
    archive/<UTC time>/ rather than overwritten or mixed with this run's metrics."""
    out_dir.mkdir(parents=True, exist_ok=True)
    old = [out_dir / n for n in RUN_FILES if (out_dir / n).exists()]
    if old:
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        dest = out_dir / "archive" / stamp
        dest.mkdir(parents=True)
        for path in old:
            shutil.move(str(path), dest / path.name)
        print(f"tessera: {out_dir} held an earlier run; its files were moved to {dest}", flush=True)
    atomic_write_bytes(out_dir / "config.yaml", cfg.to_yaml().encode())
