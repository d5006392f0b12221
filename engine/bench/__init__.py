"""Benchmarks behind `tessera bench NAME` (each module has `main(argv) -> int`)."""

from __future__ import annotations

import json
import platform
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Optional


def cpu_name() -> str:
    """The CPU model as /proc/cpuinfo names it (benchmark tables name the machine)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def device_name(device) -> str:
    """GPU name for a CUDA device, else the CPU model and torch's thread count."""
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({cpu_name()}, {torch.get_num_threads()} threads)"


def measure_in_temp_dir(measure: Callable[[Path], dict], prefix: str, parent: Optional[Path], out: Path,
                        table: Callable[[dict], str]) -> dict:
    """Run `measure(workdir)` in a fresh directory under `parent` (default: the system's temp dir), deleted
    afterwards whatever happens; print its table and write its results as JSON to `out`."""
    if parent is not None:
        parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        res = measure(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(table(res))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    return res
