"""A per-rank watchdog: when a phase of the step (a collective among them) makes no progress in time,
report which rank, which step and which operation, and exit non-zero.

The process-group timeout (parallel.timeout_minutes) already makes a collective that waits for a dead or
hung peer fail with an error on the waiting ranks; the watchdog covers what that does not: the hung rank
itself (stuck in its own computation, a data read, or a collective whose backend does not time out), so the
job ends with one line per rank saying where each was, instead of waiting for the scheduler to kill it.

The trainer marks progress with `beat(step, phase)` inside each training step, where every phase is bounded
by collectives and the process-group timeout; `idle(phase)` disarms it for phases whose length is the
user's (start-up with dataset preprocessing, a whole evaluation, writing the final weights), which a beat
re-arms. A daemon thread checks every `poll_s`. It is stopped (and joined) when the run ends, so no Python
thread of ours outlives `train()`.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Optional

from engine.errors import PeerFailure

__all__ = ["Watchdog"]


class Watchdog:
    def __init__(self, timeout_s: float, rank: int, world_size: int, poll_s: float = 1.0) -> None:
        self.timeout_s, self.rank, self.world_size, self.poll_s = timeout_s, rank, world_size, poll_s
        self._step, self._phase, self._since = 0, "start-up", time.monotonic()
        self._armed = False  # until the first beat: start-up (dataset preprocessing) may take hours
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def beat(self, step: int, phase: str) -> None:
        self._step, self._phase, self._since, self._armed = step, phase, time.monotonic(), True

    def idle(self, phase: str) -> None:
        """Disarm until the next beat (a phase of user-chosen length)."""
        self._phase, self._armed = phase, False

    @property
    def step(self) -> int:
        return self._step

    @property
    def phase(self) -> str:
        return self._phase

    def start(self) -> "Watchdog":
        self._thread = threading.Thread(target=self._run, name="tessera-watchdog", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            idle = time.monotonic() - self._since
            if self._armed and idle > self.timeout_s:
                sys.stderr.write(
                    f"tessera: error (rank {self.rank}/{self.world_size}): no progress for {idle:.0f} s in "
                    f"'{self._phase}' of step {self._step} (limit {self.timeout_s:.0f} s, from "
                    f"parallel.timeout_minutes): this rank or a peer is hung, or a collective is stuck\n")
                sys.stderr.flush()
                os._exit(PeerFailure.exit_code)  # a hung main thread cannot be unwound: leave at once
