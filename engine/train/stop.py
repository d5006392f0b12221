"""Stopping a run cleanly: SIGTERM, SIGUSR1 (Slurm `--signal=USR1@120`), a first SIGINT, or the time limit.

A signal only sets a flag; the training loop looks at it after each step, and every rank agrees on the
stop through one small all-reduce (a signal reaches the ranks of a job at slightly different moments), so
all of them save the same step and exit together with EXIT_STOPPED (75: "stopped early, a checkpoint was
written, resume with checkpoint.load=auto"). A second SIGINT exits at once (KeyboardInterrupt, 130).

The time limit (checkpoint.time_limit, minutes from the start of `train()`) stops the run when the time
left would not cover two more of the slowest steps seen plus two saves as long as the last one (the
periodic save that may be due at this step, which comes after this decision, and the stop's own).
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from typing import Optional

from engine.parallel.state import ParallelState, all_reduce_max

__all__ = ["REASONS", "StopRequest"]

REASONS = {1: "SIGTERM", 2: "SIGUSR1", 3: "SIGINT", 4: "time limit"}
_CODES = {signal.SIGTERM: 1, signal.SIGUSR1: 2, signal.SIGINT: 3}


class StopRequest:
    """Signal handlers (installed by `install`, restored by `uninstall`) and the per-step stop decision."""

    def __init__(self, time_limit_minutes: Optional[float] = None) -> None:
        self.code = 0
        self.started = time.monotonic()
        self.limit = 60.0 * time_limit_minutes if time_limit_minutes else None
        self._previous: dict[int, object] = {}
        self._slowest_step = 0.0
        self.last_save_seconds = 0.0

    def _handler(self, signum: int, frame) -> None:  # noqa: ANN001 - signal handler protocol
        if signum == signal.SIGINT and self.code == _CODES[signal.SIGINT]:
            raise KeyboardInterrupt  # the second Ctrl-C: exit now
        if not self.code:
            self.code = _CODES[signum]
            print(f"tessera: {REASONS[self.code]} received: saving a checkpoint after this step, then stopping"
                  + (" (Ctrl-C again to exit at once)" if signum == signal.SIGINT else ""), file=sys.stderr,
                  flush=True)

    def install(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in _CODES:
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def uninstall(self) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        self._previous = {}

    def check(self, pstate: ParallelState, step_seconds: float) -> Optional[str]:
        """After a step (collective when distributed): why to stop now, or None."""
        self._slowest_step = max(self._slowest_step, step_seconds)
        code = self.code
        if not code and self.limit is not None:
            left = self.limit - (time.monotonic() - self.started)
            if left < 2 * (self._slowest_step + self.last_save_seconds):
                code = 4
        code = int(all_reduce_max(float(code), pstate))
        return REASONS[code] if code else None
