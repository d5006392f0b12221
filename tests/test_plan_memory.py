"""The memory planner against measured peaks of real training steps, within 10% on every rank.

Each case builds the real Trainer on CPU (fp32 unless it says otherwise; d_model 128, 4 layers, sequence 256,
micro-batch 4, so that activations dominate the step), trains one step, and measures the next one with
engine.bench.plan.PeakTracker (every tensor storage alive; see its docstring). The prediction is
engine.plan.estimate_memory for the rank's pipeline stage with device_type "cpu". One process covers ZeRO 0
(no data parallelism), bf16 autocast, GQA and the three recompute modes; one spawned 2-process gloo group covers
data parallelism with ZeRO 0 and ZeRO-1 and pipelines with 1F1B and zero-bubble; a slow group adds tensor and
sequence parallelism, the interleaved and GPipe schedules, FSDP2, zero-bubble with full recompute and a bf16
pipeline.
"""

from __future__ import annotations

import pytest
import torch.distributed as dist

from tests.dist_utils import run_distributed

TOLERANCE = 0.10


def _tree(tmp: str, name: str, extra: dict) -> dict:
    model = {"preset": "tiny", "vocab_size": 0, "d_model": 128, "n_layers": 4, "n_heads": 4, "n_kv_heads": 4,
             "ffn_hidden": 384, "max_seq_len": 256}
    train = {"micro_batch_size": 4, "global_batch_size": 8, "iters": 4, "eval_interval": 0, "log_interval": 1,
             "out_dir": f"{tmp}/{name}", "device": "cpu", "tensorboard": False, "progress": False}
    model.update(extra.get("model", {}))
    train.update(extra.get("train", {}))
    return {"model": model, "train": train, "parallel": extra.get("parallel", {}),
            "data": {"tokenizer": "byte", "train": [{"path": "builtin:pydoc"}], "split": "90,10,0",
                     "cache_dir": f"{tmp}/data_cache"},
            "optim": {"lr": 1e-3, "warmup_iters": 1}, "precision": extra.get("precision", {"dtype": "fp32"})}


def _measure(rank: int, world: int, cases: dict, tmp: str) -> dict:
    """Every case on this rank of an already-initialised group (or one process): {case: [rows of all ranks]}."""
    from engine.bench.plan import measure_config
    from engine.config import config_from_dict
    from engine.parallel.state import ParallelState

    out = {}
    for name, extra in cases.items():
        cfg = config_from_dict(_tree(tmp, name, extra), world_size=world)
        p = cfg.parallel
        if world == 1:
            pstate = ParallelState.single()
        else:
            pstate = ParallelState.initialize(tp=p.tp, pp=p.pp, vpp=p.vpp, sequence_parallel=p.sequence_parallel,
                                              device="cpu")
        row = measure_config(cfg, pstate)
        rows = [row]
        if world > 1:
            rows = [None] * world
            dist.all_gather_object(rows, row)
            dist.barrier()
        out[name] = rows
    return out


def _check(tmp: str, cases: dict, results: dict, world: int) -> list[str]:
    from engine.bench.plan import compare
    from engine.config import config_from_dict

    bad, lines = [], []
    for name, rows in results.items():
        cfg = config_from_dict(_tree(tmp, name, cases[name]), world_size=world)
        for r in compare(cfg, world, rows, "cpu"):
            line = (f"{name} rank {r['rank']} (stage {r['pp_rank']}): measured {r['peak'] / 2 ** 20:.2f} MiB, "
                    f"predicted {r['predicted'] / 2 ** 20:.2f} MiB ({r['error']:+.1%})")
            lines.append(line)
            if abs(r["error"]) > TOLERANCE:
                bad.append(line)
    print("\n".join(lines))
    return bad


ONE_PROCESS = {
    "zero0_fp32": {},
    "bf16": {"precision": {"dtype": "bf16"}, "train": {"global_batch_size": 4}},
    "gqa_selective": {"model": {"n_kv_heads": 2}, "train": {"recompute": "selective"}},
    "full_recompute": {"train": {"recompute": "full"}},
    "full_every_2nd": {"train": {"recompute": "full", "recompute_every": 2}},
    "gelu_layernorm_dropout": {"model": {"norm": "layernorm", "activation": "gelu", "bias": True,
                                         "position": "learned", "dropout": 0.1}},
}

TWO_PROCESSES = {
    "dp2_zero0": {"parallel": {"zero": 0}},
    "dp2_zero1": {"parallel": {"zero": 1}},
    "pp2_1f1b": {"parallel": {"pp": 2, "schedule": "1f1b"}, "train": {"global_batch_size": 16}},
    "pp2_zb": {"parallel": {"pp": 2, "schedule": "zb"}, "train": {"global_batch_size": 16}},
}

TWO_PROCESSES_SLOW = {
    "tp2_sp": {"parallel": {"tp": 2, "sequence_parallel": True}},
    "pp2_interleaved": {"parallel": {"pp": 2, "vpp": 2, "schedule": "interleaved"},
                        "train": {"global_batch_size": 16}},
    "pp2_gpipe": {"parallel": {"pp": 2, "schedule": "gpipe"}, "train": {"global_batch_size": 16}},
    "dp2_zero3": {"parallel": {"zero": 3}},
    "pp2_zb_full_recompute": {"parallel": {"pp": 2, "schedule": "zb"},
                              "train": {"global_batch_size": 16, "recompute": "full"}},
    "pp2_bf16": {"parallel": {"pp": 2}, "precision": {"dtype": "bf16"}, "train": {"global_batch_size": 8}},
}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("plan_memory"))  # one data cache for every case


@pytest.mark.parametrize("case", list(ONE_PROCESS))
def test_one_process_peaks_match_the_plan(workdir, case):
    cases = {case: ONE_PROCESS[case]}
    assert not _check(workdir, cases, _measure(0, 1, cases, workdir), 1)


def test_two_process_peaks_match_the_plan(tmp_path):
    results = run_distributed(_measure, 2, TWO_PROCESSES, str(tmp_path), timeout=300)[0]
    assert not _check(str(tmp_path), TWO_PROCESSES, results, 2)


@pytest.mark.slow
def test_more_layouts_match_the_plan(tmp_path):
    results = run_distributed(_measure, 2, TWO_PROCESSES_SLOW, str(tmp_path), timeout=600)[0]
    assert not _check(str(tmp_path), TWO_PROCESSES_SLOW, results, 2)
