"""The schedule data model: an Action (F, B or W of one micro-batch on one model chunk), a Schedule
(per-rank ordered action lists plus the sizes needed to read them) and ScheduleError.

The bottom of the schedule modules' import graph, so the dependency runs one way:
schedules.py -> simulator.py -> actions.py (the zero-bubble builder picks its candidate by
simulating, and the simulator only needs these types). This module imports nothing of the
project. schedules.py re-exports every name, so `from engine.parallel.pipeline.schedules
import Action, Schedule, ScheduleError` (the executor, the bench, tests) keeps working.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Kind = Literal["F", "B", "W"]


class ScheduleError(ValueError):
    """An impossible schedule request (sizes) or an action list that cannot run (deadlock)."""


@dataclass(frozen=True)
class Action:
    kind: Kind
    mb: int  # micro-batch index, 0..num_micro-1
    chunk: int = 0  # model chunk on this rank (interleaved); 0 otherwise

    def __repr__(self) -> str:
        return f"{self.kind}{self.mb}" + (f".{self.chunk}" if self.chunk else "")


@dataclass(frozen=True)
class Schedule:
    """Per-rank action lists plus the sizes needed to interpret them."""

    name: str
    pp: int
    vpp: int
    num_micro: int
    actions: tuple[tuple[Action, ...], ...]  # actions[rank] = ordered actions of that rank

    @property
    def num_stages(self) -> int:
        return self.pp * self.vpp

    @property
    def split_backward(self) -> bool:
        """True when B is input-grad only and W runs the weight gradient (zero-bubble)."""
        return any(a.kind == "W" for acts in self.actions for a in acts)

    def stage(self, rank: int, chunk: int) -> int:
        return chunk * self.pp + rank

    def rank_chunk(self, stage: int) -> tuple[int, int]:
        return stage % self.pp, stage // self.pp
