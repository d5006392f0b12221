"""Where the time goes: inside one training step (StepTimer) and over a whole run (RunClock).

StepTimer splits a step into PHASES by laps: `begin()` at the start of the step, `lap(phase)` at the end of
each piece of work, which adds the time since the previous lap to that phase, `end()` closes the step (the
rest is "other"). It is off unless a benchmark calls `enable()`; while off, `lap` returns at once, so normal
training pays one attribute test per lap and never a device synchronisation. While on, every lap
synchronises the CUDA device first (kernels are asynchronous: without it a phase would be charged for the
kernels of the phase before), which removes the overlap of host and device work: the breakdown is a
measurement, its step time slightly above the untimed one (`tessera bench throughput` reports both).

What each phase holds (engine/train/trainer.py train_step, engine/train/step.py forward_backward and the
pipeline executor call `lap`):
  data           `Trainer._next_batches`: reading, stacking and copying this step's micro-batches
  forward        the micro-batches' forward passes and losses (FP8 weight casts happen in the step's setup: other)
  backward       their backward passes, including launching the data-parallel bucket reductions that overlap
                 backward (the launch, not the transfer), and the deferred weight gradients of zero-bubble
  communication  waiting for the data-parallel reduction (`finish_grad_sync`), the tied-embedding and
                 tensor-parallel gradient sums, FP8 delayed scaling's amax reduction, the loss mean over dp
                 (and the masked-LM metrics' sums); at pp > 1 the stage-to-stage receives and sends, which
                 include waiting for the neighbouring stage (the pipeline bubble); at tp > 1 the time inside
                 the tp collectives of forward and backward (moved out of those phases by the CommTimer hook,
                 engine/parallel/collectives.py). NOT separated: the three small all-reduces of the
                 vocab-parallel cross entropy (counted as forward/backward), the all-reduces inside the
                 optimizer phase, and, under train.compile, tp collectives that the compiled graph runs
                 without the Python hook
  optimizer      loss fault check, fp16 unscale/overflow check (an all-reduce), gradient norm (with its
                 all-reduce over tp/pp/dp) and clipping, the AdamW step, ZeRO-1's parameter all-gather
  other          LR, zero_grad, FP8 weight casts (once per step), fault bookkeeping, the final device sync

RunClock splits a run's wall time into RUN_PARTS (engine/train/loop.py): start-up (imports when launched
from the CLI, process group, checks, tokenizer, logger, checkpoint loading), model build, dataset building,
the steps, evaluation, saving (checkpoints and the final weights; an async save counts only the time the
run was blocked) and other (logging, sampling, everything in between), so fixed costs show next to the
per-step time.
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from engine.parallel.collectives import CommTimer

__all__ = ["PHASES", "RUN_PARTS", "RunClock", "StepTimer", "format_run_split", "peak_memory_gb",
           "process_start", "reset_peak_memory"]

PHASES = ("data", "forward", "backward", "communication", "optimizer", "other")
RUN_PARTS = ("startup", "model_build", "data_build", "steps", "eval", "save", "other")
_LABELS = {"startup": "start-up", "model_build": "model build", "data_build": "datasets", "steps": "steps",
           "eval": "evaluation", "save": "saving", "other": "other"}


class StepTimer:
    """Seconds per phase of each timed training step (see the module docstring). Off until `enable()`."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.enabled = False
        self.steps: list[dict[str, float]] = []  # one {phase: seconds, "total": seconds} per timed step
        self._current: Optional[dict[str, float]] = None
        self._last = 0.0
        self._comm: Optional[CommTimer] = None
        self._comm_seen = 0.0
        self._pstate: Any = None

    def enable(self, pstate: Any = None) -> None:
        """Time the following steps. With a ParallelState of tp > 1, time inside the tp collectives is
        measured (pstate.comm_timer, which also synchronises CUDA around each one) and counted as
        communication instead of forward/backward."""
        if pstate is not None and pstate.tp > 1:
            self._comm = CommTimer()
            self._pstate = pstate
            pstate.comm_timer = self._comm
        self.enabled = True

    def disable(self) -> None:
        if self._pstate is not None:
            self._pstate.comm_timer = None
        self._pstate, self._comm, self._current = None, None, None
        self.enabled = False

    def take(self) -> list[dict[str, float]]:
        """The timed steps so far (and forget them)."""
        out, self.steps = self.steps, []
        return out

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def begin(self) -> None:
        if not self.enabled:
            return
        self._current = dict.fromkeys(PHASES, 0.0)
        self._last = self._now()
        self._comm_seen = self._comm.seconds if self._comm is not None else 0.0

    def lap(self, phase: str) -> None:
        """Charge the time since the previous lap to `phase` (minus time inside tp collectives, if measured)."""
        if not self.enabled or self._current is None:
            return
        if phase not in self._current:
            raise ValueError(f"StepTimer.lap: unknown phase {phase!r}; expected one of {', '.join(PHASES)}")
        now = self._now()
        elapsed = now - self._last
        comm = 0.0
        if self._comm is not None:
            comm = min(self._comm.seconds - self._comm_seen, elapsed)
            self._comm_seen = self._comm.seconds
        self._current[phase] += elapsed - comm
        self._current["communication"] += comm
        self._last = now

    def end(self) -> Optional[dict[str, float]]:
        """Close the step: the time since the last lap is "other". Returns the step's record (None when off)."""
        if not self.enabled or self._current is None:
            return None
        self.lap("other")
        rec = self._current
        rec["total"] = sum(rec[p] for p in PHASES)
        self.steps.append(rec)
        self._current = None
        return rec


# ------------------------------------------------------------------ peak memory of a measured stretch

def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak: torch's allocator statistics on CUDA; on Linux CPU the process's resident-set high
    water mark (writing 5 to /proc/self/clear_refs resets VmHWM), elsewhere nothing (the peak since start)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_memory_gb(device: torch.device) -> float:
    """GiB: peak memory allocated by torch on CUDA; on CPU the process's peak resident memory since the last
    `reset_peak_memory` (VmHWM), or since the start where /proc is missing (ru_maxrss)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        m = re.search(r"^VmHWM:\s+(\d+)\s+kB", Path("/proc/self/status").read_text(), re.M)
        if m:
            return int(m.group(1)) / 2**20
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


# ------------------------------------------------------------------ whole-run accounting

def process_start() -> float:
    """When this process started, on time.perf_counter()'s clock (so start-up includes the interpreter and
    the imports), from Linux's /proc; elsewhere: now."""
    now = time.perf_counter()
    try:
        # /proc/self/stat field 22 = start time in clock ticks after boot; the command name (field 2) may
        # hold spaces, so count from its closing parenthesis
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return now
    age = uptime - started
    return now - age if 0.0 <= age < 7 * 86400 else now


class RunClock:
    """A run's wall time by RUN_PARTS. `started` is on time.perf_counter()'s clock (default: now)."""

    def __init__(self, started: Optional[float] = None) -> None:
        self.started = time.perf_counter() if started is None else started
        self.parts = dict.fromkeys(RUN_PARTS[:-1], 0.0)  # "other" is what is left of the total
        self.steps = 0

    def add(self, part: str, seconds: float) -> None:
        if part not in self.parts:
            raise ValueError(f"RunClock.add: unknown part {part!r}; expected one of {', '.join(self.parts)}")
        self.parts[part] += seconds

    @contextlib.contextmanager
    def part(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - t0)

    def end_startup(self) -> None:
        """Call right before the first step: the time since the start not claimed by another part is start-up."""
        claimed = sum(v for k, v in self.parts.items() if k != "startup")
        self.parts["startup"] = max(0.0, time.perf_counter() - self.started - claimed)

    def split(self) -> dict[str, float]:
        """{part: seconds} for every RUN_PARTS entry plus "total" (now - started); the parts sum to the total."""
        total = time.perf_counter() - self.started
        out = dict(self.parts)
        out["other"] = total - sum(out.values())
        out["total"] = total
        return out


def format_run_split(split: dict[str, float], steps: int) -> str:
    """One console line: total wall time and its parts, with shares and the mean step."""
    total = split["total"]

    def share(k: str) -> str:
        return f"{_LABELS[k]} {split[k]:.2f} s ({100 * split[k] / total:.0f}%)" if total > 0 else f"{_LABELS[k]} 0 s"

    per_step = f", {split['steps'] / steps:.3f} s/step" if steps else ""
    parts = [share(k) + (f" [{steps} steps{per_step}]" if k == "steps" else "") for k in RUN_PARTS]
    return f"tessera: run time {total:.2f} s = " + " + ".join(parts)
