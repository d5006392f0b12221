"""Pipeline parallelism: stage partitioning, schedules as data, a schedule simulator, p2p and the executor.

    schedules.py    build_schedule(name, pp, m, vpp) -> Schedule (per-rank F/B/W action lists)
    simulator.py    simulate(schedule, Costs) -> makespan, bubble fractions, peak in-flight activations
    timeline.py     write_timeline(results, "out.svg")
    partition.py    layers_for_stage(n_layers, pp, vpp, pp_rank, chunk, layout)
    stages.py       build_stage_chunks(model_cfg, pstate, seed, layout)
    p2p.py          StageP2P: tagged batch_isend_irecv between neighbouring stages
    weight_grad.py  deferred F.linear weight gradients (zero-bubble B/W split), any module
    tied.py         tied input/output embeddings across the first and last stage
    executor.py     forward_backward_pipeline(...) / forward_only_pipeline(...): the pp > 1 step / eval

The executor is imported lazily (it needs the model package); the rest is pure Python + torch.
"""

from engine.parallel.pipeline.partition import PartitionError, layers_for_stage, stage_sizes
from engine.parallel.pipeline.schedules import SCHEDULES, Action, Schedule, ScheduleError, build_schedule
from engine.parallel.pipeline.simulator import Costs, SimResult, bubble_formula, peak_in_flight, simulate

__all__ = ["SCHEDULES", "Action", "Costs", "PartitionError", "Schedule", "ScheduleError", "SimResult",
           "bubble_formula", "build_schedule", "layers_for_stage", "peak_in_flight", "simulate", "stage_sizes"]
