"""The planner: memory and step time of a config's own layout, and every layout of a cluster that fits its
device memory, ranked by predicted throughput."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional, Sequence

from engine.config import Config
from engine.errors import ConfigError
from engine.plan.devices import Device
from engine.plan.layouts import Layout, check_layout, enumerate_layouts
from engine.plan.memory import RankMemory, estimate_memory
from engine.plan.performance import EngineProfile, StepPrediction, estimate_step

__all__ = ["Candidate", "PlanResult", "evaluate", "plan"]


@dataclass
class Candidate:
    layout: Layout
    memory: list[RankMemory]  # one per pipeline stage
    step: StepPrediction

    @property
    def peak(self) -> float:
        """The largest per-rank peak over the pipeline stages (bytes)."""
        return max(m.peak for m in self.memory)

    def fits(self, capacity: float) -> bool:
        return self.peak <= capacity

    def as_dict(self) -> dict:
        return {"layout": self.layout.describe(), "overrides": self.layout.overrides(), "peak_bytes": self.peak,
                "stages": [m.as_dict() for m in self.memory], **self.step.as_dict()}


@dataclass
class PlanResult:
    world_size: int
    device: Device
    capacity: float  # bytes per device
    current: Optional[Candidate]  # the config's own layout (None when it cannot run on this world size)
    current_error: Optional[str]
    ranked: list[Candidate] = field(default_factory=list)  # fitting layouts, best first
    considered: int = 0


def evaluate(cfg: Config, lay: Layout, dev: Device, profile: Optional[EngineProfile] = None,
             device_type: Optional[str] = None) -> Candidate:
    """Memory and step time of one layout."""
    device_type = device_type or ("cpu" if dev.peak_row == "" else "cuda")
    return Candidate(lay, estimate_memory(cfg, lay, device_type), estimate_step(cfg, lay, dev, profile))


def plan(cfg: Config, world_size: int, dev: Device, capacity: float, *, current: Optional[Layout] = None,
         profile: Optional[EngineProfile] = None, max_tp: Optional[int] = None,
         schedules: Sequence[str] = ("1f1b", "interleaved", "zb"), top: Optional[int] = None) -> PlanResult:
    """Score the config's layout and every layout of `world_size` devices; keep those whose every rank fits
    in `capacity` bytes, fastest first (ties: less memory first)."""
    if cfg.model.vocab_size <= 0:
        raise ConfigError("model.vocab_size: the planner needs the vocabulary size (0 = from the tokenizer was not "
                          "resolved); set model.vocab_size")
    err = check_layout(cfg, current) if current is not None else "no layout given"
    cur = evaluate(cfg, current, dev, profile) if current is not None and err is None else None
    cands = [evaluate(cfg, lay, dev, profile) for lay in
             enumerate_layouts(cfg, world_size, schedules=schedules,
                               max_tp=max_tp if max_tp is not None else dev.gpus_per_node)]
    fitting = [c for c in cands if c.fits(capacity)]
    fitting.sort(key=lambda c: (-c.step.tokens_per_s, c.peak))
    return PlanResult(world_size, dev, capacity, cur, err, fitting[:top] if top else fitting, len(cands))


def resolve_vocab_size(cfg: Config) -> Config:
    """A copy with model.vocab_size filled from the tokenizer when it is 0 (as the training run does)."""
    if cfg.model.vocab_size > 0:
        return cfg
    from engine.data.tokenizers import build_tokenizer  # reads a tokenizer file at most; builds no model

    size = build_tokenizer(cfg.data.tokenizer).vocab_size
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=size))
