"""`tessera plan`: the performance model against Megatron-LM's published H100 table, the planner's layouts and
memory categories, and the command line. Pure arithmetic: nothing here builds a model (one test checks that
the planner allocates nothing). The measured-peak validation is tests/test_plan_memory.py."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from engine.bench.plan import PeakTracker
from engine.config import config_from_dict
from engine.errors import ConfigError
from engine.model.transformer import count_parameters
from engine.parallel.pipeline.simulator import bubble_formula, peak_in_flight
from engine.plan import Layout, enumerate_layouts, estimate_memory, layout_of
from engine.plan.cli import main as plan_main, parse_memory
from engine.plan.devices import DEVICES
from engine.plan.layouts import with_layout
from engine.plan.memory import schedule_for
from engine.plan.performance import MEGATRON_PROFILE, estimate_step
from engine.plan.planner import plan
from engine.train.flops import PEAK_TFLOPS

# Megatron-LM's README, "Performance Benchmarking" (images/model_table.png, added in commit f2e5db402c,
# "New scaling figures on H100 GPUs", 2024-07-15; Megatron-Core r0.8.0): GPT models, vocabulary 131,072,
# sequence length 4,096, H100 80GB GPUs. Columns: model size, attention heads, hidden size, layers, tensor MP,
# pipeline MP, data-parallel size, number of GPUs, (global) batch size, per-GPU teraFLOP/s, MFU (%).
MEGATRON_TABLE = [
    ("1.7B", 16, 2048, 24, 1, 1, 48, 48, 192, 408.8, 41),
    ("7.1B", 32, 4096, 30, 2, 1, 48, 96, 192, 465.9, 47),
    ("16B", 48, 6144, 32, 4, 1, 48, 192, 192, 489.1, 49),
    ("32B", 56, 7168, 48, 8, 1, 48, 384, 192, 459.6, 46),
    ("70B", 64, 8192, 84, 8, 2, 48, 768, 384, 419.7, 42),
    ("119B", 80, 10240, 92, 8, 4, 48, 1536, 768, 420.5, 43),
    ("177B", 96, 12288, 96, 8, 6, 48, 2304, 1152, 432.8, 44),
    ("314B", 128, 16384, 96, 8, 8, 48, 3072, 1536, 474.4, 48),
    ("462B", 144, 18432, 112, 8, 16, 48, 6144, 3072, 459.9, 47),
]


def megatron_config(heads: int, hidden: int, layers: int, gbs: int):
    """Megatron's GPT: LayerNorm, GeLU MLP of 4h, biases, untied embeddings (the table's sizes count both),
    rotary positions (no position table: the 1.7B row's size leaves no room for one)."""
    return config_from_dict({
        "model": {"preset": "gpt2", "vocab_size": 131072, "d_model": hidden, "n_heads": heads, "n_layers": layers,
                  "max_seq_len": 4096, "tie_embeddings": False, "position": "rope"},
        "data": {"seq_len": 4096},
        "train": {"global_batch_size": gbs, "micro_batch_size": 1},
        "precision": {"dtype": "bf16"}})


def megatron_layout(tp: int, pp: int, dp: int, gbs: int) -> Layout:
    """The table's tp/pp/dp and batch; not published: micro-batch size (1 assumed) and schedule (Megatron's
    default when no virtual pipeline size is given: 1F1B). Distributed optimizer (ZeRO-1), sequence parallel
    with tensor parallelism."""
    return Layout(tp=tp, pp=pp, dp=dp, sequence_parallel=tp > 1, zero=1, schedule="1f1b", micro_batch_size=1,
                  global_batch_size=gbs)


@pytest.mark.parametrize("row", MEGATRON_TABLE, ids=[r[0] for r in MEGATRON_TABLE])
def test_megatron_published_throughput_within_15_percent(row):
    size, heads, hidden, layers, tp, pp, dp, gpus, gbs, published, mfu = row
    assert tp * pp * dp == gpus
    cfg = megatron_config(heads, hidden, layers, gbs)
    # the transcription: the table's sizes are these models' parameter counts, and its TFLOP/s are model FLOPs
    # against the same 989.4 TFLOP/s bf16 peak the MFU column uses
    assert count_parameters(cfg.model) / 1e9 == pytest.approx(float(size[:-1]), rel=0.03)
    assert abs(100 * published / PEAK_TFLOPS["H100 SXM"]["bf16"] - mfu) < 0.6
    pred = estimate_step(cfg, megatron_layout(tp, pp, dp, gbs), DEVICES["h100"], MEGATRON_PROFILE)
    assert pred.tflops_per_gpu == pytest.approx(published, rel=0.15), (size, pred.tflops_per_gpu, pred.breakdown)


def test_model_parts_behave():
    """The terms the table exercises move as they must: no bubble without pipeline, the bubble of uniform 1F1B
    stages is the textbook (p-1)/(m+p-1), data-parallel time grows with dp, interleaving shrinks the bubble."""
    cfg = megatron_config(64, 8192, 84, 384)
    dev = DEVICES["h100"]
    flat = estimate_step(cfg, megatron_layout(8, 1, 48, 384), dev, MEGATRON_PROFILE)
    assert flat.breakdown["bubble"] == 0.0 and flat.breakdown["tp_comm"] >= 0.0
    lay = megatron_layout(8, 4, 12, 384)
    pipe = estimate_step(cfg, lay, dev, MEGATRON_PROFILE)
    f, b = max(pipe.stage_times)[0], max(pipe.stage_times)[1]
    fb = lay.num_micro * (f + b)
    expected = bubble_formula("1f1b", 4, lay.num_micro)
    assert pipe.breakdown["bubble"] / (pipe.breakdown["bubble"] + fb) == pytest.approx(expected, rel=0.05)
    inter = estimate_step(cfg, dataclasses.replace(lay, schedule="interleaved", vpp=3), dev, MEGATRON_PROFILE)
    assert inter.breakdown["bubble"] < pipe.breakdown["bubble"] / 2
    small_dp = estimate_step(cfg, megatron_layout(8, 1, 2, 384), dev, MEGATRON_PROFILE)
    assert small_dp.breakdown["dp_comm"] < flat.breakdown["dp_comm"]


# ------------------------------------------------------------------ memory categories

def _llama(**over):
    tree = {"model": {"preset": "llama", "vocab_size": 32000, "d_model": 1024, "n_layers": 8, "n_heads": 16,
                      "n_kv_heads": 4, "ffn_hidden": 2816, "max_seq_len": 2048},
            "train": {"micro_batch_size": 2, "global_batch_size": 64}, "precision": {"dtype": "bf16"}}
    for k, v in over.items():
        tree.setdefault(k, {}).update(v)
    return config_from_dict(tree)


def test_memory_categories_follow_the_layout():
    cfg = _llama()
    z0, z1 = (estimate_memory(cfg, Layout(dp=8, zero=z, micro_batch_size=2, global_batch_size=64))[0]
              for z in (0, 1))
    assert z1.optimizer == pytest.approx(z0.optimizer / 8)  # ZeRO-1: moments on 1/dp
    assert z1.parameters == z0.parameters and z1.gradients == z0.gradients  # full main-grad buffer either way
    z3 = estimate_memory(cfg, Layout(dp=8, zero=3, micro_batch_size=2, global_batch_size=64))[0]
    assert z3.parameters < z0.parameters / 4
    acts = {}
    for mode in ("none", "selective", "full"):
        acts[mode] = estimate_memory(cfg, Layout(recompute=mode, micro_batch_size=2, global_batch_size=64))[0]
    assert acts["full"].activations < acts["selective"].activations <= acts["none"].activations
    fp32 = estimate_memory(dataclasses.replace(cfg, precision=dataclasses.replace(cfg.precision, dtype="fp32")),
                           Layout(micro_batch_size=2, global_batch_size=64))[0]
    assert fp32.activations > acts["none"].activations  # compute-dtype activations halve most tensors
    tp = estimate_memory(cfg, Layout(tp=4, sequence_parallel=True, micro_batch_size=2, global_batch_size=64))[0]
    # heads, hidden units, vocabulary and (sequence parallel) the stream split 4 ways; the gathered inputs of
    # the linears are whole sequences
    assert tp.activations < acts["none"].activations / 2


@pytest.mark.parametrize("schedule,vpp", [("gpipe", 1), ("1f1b", 1), ("interleaved", 2), ("zb", 1)])
def test_in_flight_micro_batches_come_from_the_schedule(schedule, vpp):
    cfg = _llama()
    lay = Layout(pp=4, vpp=vpp, schedule=schedule, micro_batch_size=2, global_batch_size=64)  # 32 micro-batches
    mem = estimate_memory(cfg, lay)
    peaks = peak_in_flight(schedule_for(schedule, 4, lay.num_micro, vpp))
    for m, p in zip(mem, peaks):
        assert m.in_flight <= p
    assert mem[0].in_flight == peaks[0]  # the first stage peaks with its most micro-batches in flight
    if schedule == "gpipe":
        assert mem[0].in_flight == lay.num_micro


# ------------------------------------------------------------------ layouts

def test_enumerated_layouts_are_accepted_by_config_validation():
    cfg = _llama(parallel={"tp": 2})
    layouts = list(enumerate_layouts(cfg, 8))
    assert layout_of(cfg, 8) in [dataclasses.replace(x, sequence_parallel=False) for x in layouts]
    seen = set()
    for lay in layouts:
        key = (lay.tp, lay.pp, lay.vpp, lay.schedule, lay.zero)
        if key in seen:
            continue  # one per parallel shape is enough (the micro batch and recompute fields are plain)
        seen.add(key)
        tree = dataclasses.asdict(with_layout(cfg, lay))
        config_from_dict(tree, world_size=8)  # raises ConfigError for a layout that cannot run
    assert {x.tp for x in layouts} == {1, 2, 4, 8} and {x.pp for x in layouts} == {1, 2, 4, 8}
    assert all(x.world_size == 8 for x in layouts)


def test_plan_ranks_fitting_layouts_and_allocates_nothing():
    cfg = _llama()
    dev = DEVICES["h100"]
    with PeakTracker() as tracker:
        res = plan(cfg, 8, dev, 24 * 2 ** 30, current=layout_of(cfg, 8))
        big = megatron_config(144, 18432, 112, 3072)
        estimate_memory(big, megatron_layout(8, 16, 48, 3072))
    assert tracker.peak < 2 ** 20  # no model, no activations: at most a few small tensors
    assert res.ranked and all(c.peak <= 24 * 2 ** 30 for c in res.ranked)
    speeds = [c.step.tokens_per_s for c in res.ranked]
    assert speeds == sorted(speeds, reverse=True)
    assert res.considered > len(res.ranked)  # some layouts do not fit in 24 GiB


# ------------------------------------------------------------------ the command line

def test_cli_prints_the_memory_table_and_the_ranking(tmp_path, capsys):
    out_json = tmp_path / "plan.json"
    assert plan_main(["examples/llama_1b.yaml", "--gpus", "8", "--gpu-memory", "80GiB", "--top", "3",
                      "--json", str(out_json)]) == 0
    text = capsys.readouterr().out
    assert "this config: tp1 pp1 dp8 zero1 mb2" in text and "peak GiB" in text
    assert "layouts of 8 devices that fit" in text and "best: parallel.tp=" in text
    doc = json.loads(out_json.read_text())
    assert doc["world_size"] == 8 and len(doc["ranked"]) == 3
    stage = doc["current"]["stages"][0]
    assert math.isclose(sum(stage[k] for k in ("parameters", "gradients", "optimizer", "activations",
                                               "logits_loss", "pipeline_buffers", "transient", "data")),
                        stage["peak"])


def test_cli_errors_name_the_flag(tmp_path, capsys):
    from engine.cli import main as tessera

    assert tessera(["plan", "examples/tiny.yaml", "--gpu-memory", "lots"]) == 2
    assert "--gpu-memory: expected a positive size like 80GiB" in capsys.readouterr().err
    assert tessera(["plan", "examples/tiny.yaml", "--device", "tpu"]) == 2
    assert "--device: expected one of h100, h200, a100, cpu" in capsys.readouterr().err
    assert parse_memory("80GiB") == 80 * 2 ** 30 and parse_memory("80GB") == 80e9 and parse_memory("141") == 141 * 2 ** 30
    with pytest.raises(ConfigError, match="--gpu-memory"):
        parse_memory("-3GB")
