"""Schedule simulator: run per-rank action lists against per-action costs and cross-stage dependencies.

Semantics (the same the executor relies on): each rank runs its actions strictly in list order;
an action starts when the rank is free and its input from another stage has arrived (sends are
asynchronous, communication costs `comm` time units, default 0). Dependencies:
  F(mb, s)  after F(mb, s-1)               (activation from the previous virtual stage)
  B(mb, s)  after B(mb, s+1), or F(mb, s) on the last stage (its loss)
  W(mb, s)  after B(mb, s)                 (same rank; zero-bubble only)
A list that can never finish (a cycle through the dependencies) raises ScheduleError.

Costs are per *whole pipeline stage* (all vpp chunks of a rank together); an action on one of vpp
chunks costs cost/vpp, so schedules with different vpp are compared on the same model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.parallel.pipeline.actions import Action, Schedule, ScheduleError


@dataclass(frozen=True)
class Costs:
    """Time of one action on one whole stage. B is the full backward unless the schedule splits it."""

    f: float = 1.0
    b: float = 2.0  # full backward (input + weight grad) for gpipe/1f1b/interleaved
    w: float = 1.0  # zero-bubble: W costs w and B costs b - w, so the total work is the same
    comm: float = 0.0

    def of(self, kind: str, split_backward: bool) -> float:
        if kind == "F":
            return self.f
        if kind == "B":
            return self.b - self.w if split_backward else self.b
        return self.w


@dataclass
class Event:
    rank: int
    action: Action
    start: float
    end: float


@dataclass
class SimResult:
    schedule: Schedule
    costs: Costs
    makespan: float
    busy: list[float]  # compute time per rank
    bubble: list[float]  # idle fraction of the makespan, per rank
    bubble_total: float  # idle time of all ranks / (pp * makespan)
    peak_in_flight: list[int]  # max (micro-batch, chunk) activation sets held at once, per rank
    events: list[Event] = field(default_factory=list)

    @property
    def peak_in_flight_stages(self) -> list[float]:
        """Peak activation memory per rank in units of one micro-batch through a whole stage."""
        return [p / self.schedule.vpp for p in self.peak_in_flight]


def peak_in_flight(schedule: Schedule) -> list[int]:
    """Per rank, the most (micro-batch, chunk) pairs whose forward ran and whose backward has not finished.

    For split-backward schedules "finished" means W ran: W still needs the saved layer inputs.
    Only the order matters, not timing, because a rank runs its list sequentially.
    """
    release = "W" if schedule.split_backward else "B"
    peaks = []
    for acts in schedule.actions:
        live = peak = 0
        for a in acts:
            if a.kind == "F":
                live += 1
                peak = max(peak, live)
            elif a.kind == release:
                live -= 1
        peaks.append(peak)
    return peaks


def validate(schedule: Schedule) -> None:
    """Every rank runs each required action exactly once, F before B before W."""
    kinds = ("F", "B", "W") if schedule.split_backward else ("F", "B")
    want = {(k, mb, c) for k in kinds for mb in range(schedule.num_micro) for c in range(schedule.vpp)}
    for r, acts in enumerate(schedule.actions):
        got = [(a.kind, a.mb, a.chunk) for a in acts]
        if len(got) != len(set(got)) or set(got) != want:
            missing = sorted(want - set(got))[:4]
            raise ScheduleError(f"rank {r}: action list is not one of each F/B{'/W' if len(kinds) == 3 else ''} "
                                f"per (micro-batch, chunk); missing e.g. {missing}")
        pos = {x: i for i, x in enumerate(got)}
        for mb in range(schedule.num_micro):
            for c in range(schedule.vpp):
                order = [pos[(k, mb, c)] for k in kinds]
                if order != sorted(order):
                    raise ScheduleError(f"rank {r}: micro-batch {mb} chunk {c} runs {kinds} out of order")


def simulate(schedule: Schedule, costs: Costs = Costs()) -> SimResult:
    """As-soon-as-possible execution of the action lists; see the module docstring for the rules."""
    validate(schedule)
    pp, vpp, S = schedule.pp, schedule.vpp, schedule.num_stages
    split = schedule.split_backward
    done: dict[tuple[str, int, int], float] = {}  # (kind, mb, virtual stage) -> finish time
    pos = [0] * pp
    free = [0.0] * pp
    events: list[Event] = []
    remaining = sum(len(a) for a in schedule.actions)

    def dep(a: Action, s: int) -> tuple[tuple[str, int, int], bool] | None:
        """(the action this one waits for, whether it lives on another rank)."""
        if a.kind == "F":
            return (("F", a.mb, s - 1), True) if s > 0 else None
        if a.kind == "B":
            return (("B", a.mb, s + 1), True) if s < S - 1 else (("F", a.mb, s), False)
        return ("B", a.mb, s), False

    while remaining:
        progressed = False
        for r in range(pp):
            while pos[r] < len(schedule.actions[r]):
                a = schedule.actions[r][pos[r]]
                s = schedule.stage(r, a.chunk)
                d = dep(a, s)
                ready = 0.0
                if d is not None:
                    key, remote = d
                    if key not in done:
                        break  # blocked on a stage that has not run it yet
                    ready = done[key] + (costs.comm if remote else 0.0)
                start = max(free[r], ready)
                end = start + costs.of(a.kind, split) / vpp
                done[(a.kind, a.mb, s)] = end
                free[r] = end
                events.append(Event(r, a, start, end))
                pos[r] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            stuck = {r: schedule.actions[r][pos[r]] for r in range(pp) if pos[r] < len(schedule.actions[r])}
            raise ScheduleError(f"schedule {schedule.name!r} deadlocks: ranks blocked at {stuck}")

    makespan = max(free)
    busy = [sum(e.end - e.start for e in events if e.rank == r) for r in range(pp)]
    bubble = [(makespan - b) / makespan for b in busy]
    total = (pp * makespan - sum(busy)) / (pp * makespan)
    return SimResult(schedule, costs, makespan, busy, bubble, total, peak_in_flight(schedule), events)


# ----------------------------------------------------------------------------- closed forms


def bubble_formula(name: str, pp: int, num_micro: int, vpp: int = 1) -> float:
    """Textbook bubble fraction of the makespan for uniform stages and zero communication.

    gpipe / 1f1b:  (p-1) / (m+p-1)         -- any F and B costs
    interleaved:   (p-1) / (v*m + p-1)     -- i.e. bubble/ideal = (p-1)/(v*m) (Megatron), F = B cost
    """
    if name in ("gpipe", "1f1b"):
        return (pp - 1) / (num_micro + pp - 1)
    if name == "interleaved":
        return (pp - 1) / (vpp * num_micro + pp - 1)
    raise ValueError(f"no closed form for schedule {name!r}")
