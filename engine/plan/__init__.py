"""Memory planner and performance model (`tessera plan`): per-rank peak memory by category and step time of
a config under any parallel layout, and the layouts that fit a cluster ranked by predicted throughput.
Pure arithmetic on the config (engine/model's size formulas, engine/train/flops.py, the pipeline schedules
and their simulator): nothing is built or allocated. See docs/planner.md.
"""

from engine.plan.devices import DEVICES, Device, get_device
from engine.plan.layouts import Layout, enumerate_layouts, layout_of
from engine.plan.memory import CATEGORIES, RankMemory, estimate_memory
from engine.plan.performance import MEGATRON_PROFILE, EngineProfile, StepPrediction, estimate_step, tessera_profile
from engine.plan.planner import Candidate, PlanResult, evaluate, plan

__all__ = ["CATEGORIES", "DEVICES", "MEGATRON_PROFILE", "Candidate", "Device", "EngineProfile", "Layout",
           "PlanResult", "RankMemory", "StepPrediction", "enumerate_layouts", "estimate_memory", "estimate_step",
           "evaluate", "get_device", "layout_of", "plan", "tessera_profile"]
