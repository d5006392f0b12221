"""Numerical faults of a run: non-finite losses or gradient norms, and loss spikes.

Decided from numbers every rank already has the same copy of (the global-batch loss, reduced over dp and
broadcast over pp, and the global gradient norm the clipping computes), so every rank skips the same steps
without any extra collective or per-parameter device sync. A bad step is skipped (no optimizer update) and
counted; `max_bad_steps` bad steps within the last `window` steps stop the run with a NumericalFault (with
checkpoints, the run will roll back to the last one instead; that arrives with the checkpoint work).

A loss spike is a loss more than `zscore` standard deviations above the mean of the last `spike_window`
good steps (only once that window is full; 0 turns the detection off).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Optional

from engine.errors import NumericalFault

__all__ = ["FaultMonitor", "Verdict"]


@dataclass(frozen=True)
class Verdict:
    bad: bool
    reason: Optional[str] = None  # "non-finite loss" | "non-finite gradient norm" | "loss spike (z=...)"


class FaultMonitor:
    def __init__(self, max_bad_steps: int = 5, window: int = 100, zscore: float = 0.0, spike_window: int = 50):
        self.max_bad_steps, self.window = max_bad_steps, window
        self.zscore, self.spike_window = zscore, spike_window
        self._good_losses: deque[float] = deque(maxlen=max(spike_window, 1))
        self._bad_steps: deque[int] = deque()  # step numbers of recent bad steps
        self.total_bad = 0

    def check_loss(self, loss: float) -> Verdict:
        """Before the update: is this step's loss acceptable?"""
        if not math.isfinite(loss):
            return Verdict(True, f"non-finite loss ({loss})")
        if self.zscore > 0 and len(self._good_losses) == self._good_losses.maxlen:
            n = len(self._good_losses)
            mean = sum(self._good_losses) / n
            std = math.sqrt(sum((x - mean) ** 2 for x in self._good_losses) / max(n - 1, 1))
            if std > 0 and (loss - mean) / std > self.zscore:
                return Verdict(True, f"loss spike ({loss:.4f}, z = {(loss - mean) / std:.1f} over the last {n} steps)")
        return Verdict(False)

    @staticmethod
    def check_grad_norm(norm: float) -> Verdict:
        if not math.isfinite(norm):
            return Verdict(True, f"non-finite gradient norm ({norm})")
        return Verdict(False)

    def record(self, step: int, loss: float, verdict: Verdict) -> None:
        """After the step: count it; raise NumericalFault when too many bad steps fall in the window."""
        if not verdict.bad:
            self._good_losses.append(loss)
            return
        self.total_bad += 1
        self._bad_steps.append(step)
        while self._bad_steps and self._bad_steps[0] <= step - self.window:
            self._bad_steps.popleft()
        if self.max_bad_steps and len(self._bad_steps) >= self.max_bad_steps:
            raise NumericalFault(
                f"step {step}: {len(self._bad_steps)} skipped steps within the last {self.window} "
                f"(train.max_bad_steps={self.max_bad_steps}, train.bad_step_window={self.window}); the last one: "
                f"{verdict.reason}. Lower optim.lr, raise optim.warmup_iters or check the data around this step")

    def state_dict(self) -> dict:
        return {"good_losses": list(self._good_losses), "bad_steps": list(self._bad_steps),
                "total_bad": self.total_bad}

    def load_state_dict(self, sd: dict) -> None:
        self._good_losses.clear()
        self._good_losses.extend(sd["good_losses"])
        self._bad_steps = deque(sd["bad_steps"])
        self.total_bad = int(sd["total_bad"])
