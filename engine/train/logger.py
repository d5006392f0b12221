"""Metrics sinks: metrics.jsonl, TensorBoard, and a rank-0 progress bar with ETA."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any, Optional

from tqdm import tqdm


class MetricsLogger:
    """Writes one JSON object per logged step / evaluation; only rank 0 writes anything."""

    def __init__(self, out_dir: Path, enabled: bool, total_iters: int, start_iter: int = 0,
                 tensorboard: bool = True, progress: bool = True):
        self.enabled = enabled
        self._jsonl = None
        self._tb = None
        self._bar: Optional[tqdm] = None
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(out_dir / "metrics.jsonl", "a", buffering=1)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(out_dir / "tensorboard"))
            except ImportError as e:  # tensorboard is a dependency; say so once if it is broken
                print(f"tessera: TensorBoard logging disabled ({e})", file=sys.stderr)
        if progress:
            self._bar = tqdm(total=total_iters, initial=start_iter, desc="train", unit="it", dynamic_ncols=True,
                             mininterval=1.0, file=sys.stderr)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        # JSON has no NaN/Infinity: a non-finite number is written as null (a skipped step's grad norm)
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._jsonl.write(json.dumps(clean, allow_nan=False) + "\n")
        if self._tb is not None:
            step = record["step"]
            for k, v in clean.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(k if "/" in k else f"train/{k}" if not k.startswith("val") else k, v, step)

    def console(self, line: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(line)
        else:
            print(line, flush=True)

    def advance(self, n: int = 1, postfix: Optional[dict] = None) -> None:
        if self._bar is not None:
            self._bar.update(n)
            if postfix:
                self._bar.set_postfix(postfix, refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._jsonl is not None:
            self._jsonl.close()
