"""Pipeline parallelism: stage partitioning, schedules as data, a schedule simulator, p2p and the executor.

    actions.py      Action, Schedule, ScheduleError: the schedule data model (imports nothing)
    schedules.py    build_schedule(name, pp, m, vpp) -> Schedule (per-rank F/B/W action lists)
    simulator.py    simulate(schedule, Costs) -> makespan, bubble fractions, peak in-flight activations
    timeline.py     write_timeline(results, "out.svg")
    partition.py    layers_for_stage(n_layers, pp, vpp, pp_rank, chunk, layout)
    p2p.py          StageP2P: tagged batch_isend_irecv between neighbouring stages
    weight_grad.py  deferred F.linear weight gradients (zero-bubble B/W split), any module
    tied.py         tied input/output embeddings across the first and last stage
    executor.py     forward_backward_pipeline(...) / forward_only_pipeline(...): the pp > 1 step / eval

This rank's model chunks are built by engine/train/build.py (`build_chunks`); the executor takes the
micro-batches and the loss function from its caller, so nothing here imports the model or the training loop.
"""

from engine.parallel.pipeline.partition import PartitionError, layers_for_stage, stage_sizes
from engine.parallel.pipeline.schedules import SCHEDULES, Action, Schedule, ScheduleError, build_schedule
from engine.parallel.pipeline.simulator import Costs, SimResult, bubble_formula, peak_in_flight, simulate

__all__ = ["SCHEDULES", "Action", "Costs", "PartitionError", "Schedule", "ScheduleError", "SimResult",
           "bubble_formula", "build_schedule", "layers_for_stage", "peak_in_flight", "simulate", "stage_sizes"]
