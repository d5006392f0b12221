"""Pipeline schedules as pure data: for every pipeline rank, the ordered list of compute actions.

An action is F (forward), B (backward) or W (weight-gradient, zero-bubble only) of one
micro-batch on one model chunk. For every schedule except zero-bubble, B is the full backward
(input and weight gradients); for zero-bubble, B computes only the input gradient and W the
weight gradient later.

Communication is not listed: it is implied by dependencies. Virtual stage `s = chunk*pp + rank`
(Megatron's interleaved layout: rank r holds chunks r, r+pp, r+2pp, ...). The output of F on
stage s goes to stage s+1; the input gradient of B on stage s goes to stage s-1. The same action
lists drive the simulator (simulator.py) and the executor (executor.py), so what the simulator
says is what the processes run.

The types live in actions.py (re-exported here); this module imports the simulator, never the
other way round: the zero-bubble builder simulates its candidates and keeps the shortest.
"""

from __future__ import annotations

from typing import Optional, Sequence

from engine.parallel.pipeline.actions import Action, Kind, Schedule, ScheduleError
from engine.parallel.pipeline.simulator import Costs, simulate

__all__ = ["SCHEDULES", "Action", "Kind", "Schedule", "ScheduleError", "build_schedule", "gpipe", "interleaved",
           "one_f_one_b", "zero_bubble", "zero_bubble_deferred_w", "zero_bubble_greedy"]

SCHEDULES = ("gpipe", "1f1b", "interleaved", "zb")


# --------------------------------------------------------------------------- builders


def gpipe(pp: int, num_micro: int) -> Schedule:
    """All forwards, then all backwards (in the same micro-batch order). Holds m activations."""
    acts = [tuple(Action("F", i) for i in range(num_micro)) + tuple(Action("B", i) for i in range(num_micro))
            for _ in range(pp)]
    return Schedule("gpipe", pp, 1, num_micro, tuple(acts))


def one_f_one_b(pp: int, num_micro: int) -> Schedule:
    """PipeDream-flush 1F1B: pp-rank-1 warm-up forwards, then alternate F/B, then drain the backwards.

    Same bubble as GPipe, but rank r holds at most pp-r micro-batches' activations instead of m.
    """
    acts = []
    for r in range(pp):
        warm = min(pp - r - 1, num_micro)
        seq = [Action("F", i) for i in range(warm)]
        for i in range(num_micro - warm):
            seq += [Action("F", warm + i), Action("B", i)]
        seq += [Action("B", i) for i in range(num_micro - warm, num_micro)]
        acts.append(tuple(seq))
    return Schedule("1f1b", pp, 1, num_micro, tuple(acts))


def interleaved(pp: int, vpp: int, num_micro: int) -> Schedule:
    """Megatron's interleaved 1F1B: each rank holds vpp chunks; micro-batches go in groups of pp.

    Forward step k (0..m*vpp-1) on every rank runs chunk (k // pp) % vpp of micro-batch
    (k // (pp*vpp))*pp + k % pp; backward step k runs the same micro-batch on chunk vpp-1-(that).
    Rank r first runs 2*(pp-r-1) + (vpp-1)*pp forwards (all of them when m == pp), then
    alternates F/B, then drains the backwards. Bubble shrinks by vpp versus 1F1B.
    """
    if num_micro % pp != 0:
        raise ScheduleError(f"interleaved schedule: micro-batches ({num_micro}) must be a multiple of pp={pp}")
    total = num_micro * vpp

    def step(k: int, backward: bool) -> Action:
        chunk = (k // pp) % vpp
        mb = (k // (pp * vpp)) * pp + k % pp
        return Action("B" if backward else "F", mb, vpp - 1 - chunk if backward else chunk)

    acts = []
    for r in range(pp):
        warm = total if num_micro == pp else min(2 * (pp - r - 1) + (vpp - 1) * pp, total)
        seq = [step(k, False) for k in range(warm)]
        for i in range(total - warm):
            seq += [step(warm + i, False), step(i, True)]
        seq += [step(k, True) for k in range(total - warm, total)]
        acts.append(tuple(seq))
    return Schedule("interleaved", pp, vpp, num_micro, tuple(acts))


def zero_bubble_greedy(pp: int, num_micro: int, cost_f: float = 1.0, cost_b: float = 1.0, cost_w: float = 1.0,
                       max_in_flight: Optional[list[int]] = None) -> Schedule:
    """Zero-bubble candidate: greedy list scheduling on the assumed costs (cost_b = input-grad part).

    A free rank runs, in priority order,
    a ready B (it unblocks the previous stage), a ready F if fewer than `max_in_flight[r]`
    micro-batches hold activations, otherwise a pending W -- W has no consumer, so it fills the
    time 1F1B spends idle. A micro-batch stays "in flight" until its W ran (W still needs the
    saved layer inputs). Default limit pp on every rank: the peak over ranks equals 1F1B's
    (rank 0 holds pp there), which is ZB-H1's memory budget; later ranks use the slack to
    defer W's into the drain phase. With F=B=W=1 this lands within 0-2 units of ZB-H1's
    3m + (p-1) makespan (1F1B: 3(m+p-1)).
    """
    limits = list(max_in_flight) if max_in_flight is not None else [pp] * pp
    cost = {"F": cost_f, "B": cost_b, "W": cost_w}
    next_f = [0] * pp  # next micro-batch to forward on rank r
    in_flight = [0] * pp
    pending_b: list[list[int]] = [[] for _ in range(pp)]  # forwarded, waiting for their B (in order)
    pending_w: list[list[int]] = [[] for _ in range(pp)]
    f_done: dict[tuple[int, int], float] = {}  # (rank, mb) -> finish time
    b_done: dict[tuple[int, int], float] = {}
    free_at = [0.0] * pp
    acts: list[list[Action]] = [[] for _ in range(pp)]
    n_total = pp * num_micro * 3

    def ready_time(r: int, kind: str, mb: int) -> Optional[float]:
        """When the cross-stage input of this action is available; None = not yet known."""
        if kind == "F":
            return 0.0 if r == 0 else f_done.get((r - 1, mb))
        # B: needs the gradient from the next stage (or its own forward on the last stage).
        return f_done.get((r, mb)) if r == pp - 1 else b_done.get((r + 1, mb))

    done = 0
    waiting: set[int] = set()  # ranks that found nothing runnable at their current free_at
    while done < n_total:
        r = min(range(pp), key=lambda q: (free_at[q], q in waiting, q))
        t = free_at[r]
        choice: Optional[tuple[str, int]] = None
        if pending_b[r]:
            mb = pending_b[r][0]  # backwards in forward order
            rt = ready_time(r, "B", mb)
            if rt is not None and rt <= t:
                choice = ("B", mb)
        if choice is None and next_f[r] < num_micro and in_flight[r] < limits[r]:
            rt = ready_time(r, "F", next_f[r])
            if rt is not None and rt <= t:
                choice = ("F", next_f[r])
        if choice is None and pending_w[r]:
            choice = ("W", pending_w[r][0])
        if choice is None:
            if any(free_at[q] == t and q not in waiting for q in range(pp) if q != r):
                waiting.add(r)  # another rank may still start something at t: let it go first
                continue
            # Nothing runnable now: wait for the next moment anything changes anywhere.
            waiting.discard(r)
            later = [x for x in free_at if x > t]
            later += [x for x in list(f_done.values()) + list(b_done.values()) if x > t]
            if not later:
                raise ScheduleError(f"zero-bubble builder stalled on rank {r} (in-flight limit too small?)")
            free_at[r] = min(later)
            continue
        kind, mb = choice
        rt = ready_time(r, kind, mb) if kind != "W" else t
        start = max(t, rt or 0.0)
        end = start + cost[kind]
        free_at[r] = end
        acts[r].append(Action(kind, mb))
        if kind == "F":
            next_f[r] += 1
            in_flight[r] += 1
            pending_b[r].append(mb)
            f_done[(r, mb)] = end
        elif kind == "B":
            pending_b[r].pop(0)
            pending_w[r].append(mb)
            b_done[(r, mb)] = end
        else:
            pending_w[r].pop(0)
            in_flight[r] -= 1
        done += 1
        waiting.clear()
    return Schedule("zb", pp, 1, num_micro, tuple(tuple(a) for a in acts))


def zero_bubble_deferred_w(pp: int, num_micro: int, defer: Sequence[int]) -> Schedule:
    """Zero-bubble candidate: 1F1B with every B split into B then W, where rank r keeps up to defer[r]
    W's pending (run when the queue overflows, the rest after its last B). defer = 0 is exactly 1F1B's
    timing; defer[r] = r moves the W's of later ranks into their idle drain phase, so their B's -- on
    the critical path back to rank 0 -- run earlier (ZB-H1). Peak in-flight: pp - r + defer[r]."""
    base = one_f_one_b(pp, num_micro)
    acts = []
    for r, seq in enumerate(base.actions):
        out: list[Action] = []
        queue: list[int] = []
        for a in seq:
            out.append(a)
            if a.kind == "B":
                queue.append(a.mb)
                while len(queue) > defer[r]:
                    out.append(Action("W", queue.pop(0)))
        out += [Action("W", mb) for mb in queue]
        acts.append(tuple(out))
    return Schedule("zb", pp, 1, num_micro, tuple(acts))


def zero_bubble(pp: int, num_micro: int, cost_f: float = 1.0, cost_b: float = 1.0, cost_w: float = 1.0) -> Schedule:
    """Zero-bubble (ZB-H1 family): backward split into B (input grad) and W (weight grad).

    Several candidates with 1F1B's peak memory (at most pp micro-batches in flight on any rank) are
    simulated on the given costs (cost_b = the input-grad part only) and the shortest is kept:
    1F1B with W's deferred on later ranks (ZB-H1's shape; with 0 deferral it equals 1F1B, so the
    result is never slower than 1F1B under these costs) and a greedy list schedule.
    """
    costs = Costs(f=cost_f, b=cost_b + cost_w, w=cost_w)
    candidates = [zero_bubble_deferred_w(pp, num_micro, [0] * pp),
                  zero_bubble_deferred_w(pp, num_micro, list(range(pp))),
                  zero_bubble_greedy(pp, num_micro, cost_f, cost_b, cost_w)]
    return min(candidates, key=lambda c: simulate(c, costs).makespan)


def build_schedule(name: str, pp: int, num_micro: int, vpp: int = 1, **zb_costs: float) -> Schedule:
    """The action lists of schedule `name` ('gpipe' | '1f1b' | 'interleaved' | 'zb')."""
    if pp < 1 or num_micro < 1 or vpp < 1:
        raise ScheduleError(f"pp, vpp and micro-batches must be >= 1, found pp={pp}, vpp={vpp}, m={num_micro}")
    if name != "interleaved" and vpp != 1:
        raise ScheduleError(f"vpp={vpp} needs schedule 'interleaved', found {name!r}")
    if name == "gpipe":
        return gpipe(pp, num_micro)
    if name == "1f1b":
        return one_f_one_b(pp, num_micro)
    if name == "interleaved":
        return interleaved(pp, vpp, num_micro)
    if name == "zb":
        return zero_bubble(pp, num_micro, **zb_costs)
    raise ScheduleError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
