"""Step time of a layout: compute from FLOPs and the device's sustained rates, communication from message sizes
and link bandwidths, pipeline bubbles from the schedule simulator.

Per micro-batch and pipeline stage (one tp rank; T = micro_batch_size * seq_len tokens):
- GEMMs: the matmul FLOPs of engine/train/flops.py (2 per multiply-add; backward twice the forward), split by
  layer (a 1-layer config minus a 0-layer one) and divided by tp, at `matmul_tflops`;
- attention core: executed FLOPs of causal flash attention (forward 2*S*H*hd per token, half the full S x S;
  backward 2.5x the forward, as measured in docs/kernels.md), at the kernel's measured fwd+bwd rate;
- memory-bound work (norms, RoPE, activations, residual adds, casts, the loss's softmax): bytes moved per
  token, counted op by op for the eager torch path or for fused kernels (`elementwise_bytes`), at the HBM
  bandwidth; backward twice the forward;
- tensor parallelism: per block 2 all-reduces of [T, D] forward and 2 backward (sequence parallel: the same
  volume as all-gathers + reduce-scatters), ring cost 2(t-1)/t * bytes / link bandwidth + latency, hidden
  behind the block's GEMMs where the engine overlaps them;
- recompute: full = the block's forward again in its backward; selective = the attention core's forward;
- autocast (Tessera keeps fp32 weights): every micro-batch casts the weights to the compute dtype and turns
  their compute-dtype gradients back into fp32 main-grad additions.

The pipeline (pp > 1): the schedule's real action lists (engine/parallel/pipeline/schedules.py) run in the
simulator with the slowest stage's F, B (and zero-bubble W) times and the point-to-point transfer as the
dependency delay: its makespan is the step's forward/backward time, bubbles included. pp = 1: the sum.

Data parallelism: gradient all-reduce (zero 0) or reduce-scatter + parameter all-gather (ZeRO-1), FSDP2's two
all-gathers + reduce-scatter (zero 3), exposed as the engine overlaps them (`EngineProfile`). Optimizer:
the bytes AdamW reads and writes per stepped parameter, at the HBM bandwidth.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Optional

from engine.config import Config
from engine.parallel.pipeline.simulator import Costs, simulate
from engine.plan.devices import Device
from engine.plan.layouts import Layout
from engine.plan.memory import Shapes, block_params, block_weights, chunk_params, chunks_of, schedule_for
from engine.train.flops import matmul_params_per_token, training_flops_per_token

__all__ = ["EngineProfile", "StepPrediction", "tessera_profile", "MEGATRON_PROFILE", "estimate_step"]


@dataclass(frozen=True)
class EngineProfile:
    """What an implementation overlaps and fuses, and the dtypes it communicates in."""

    name: str
    attention_kernel: str  # key of Device.attention_tflops
    fused_elementwise: bool  # norms, RoPE, activation, loss in fused kernels (else eager torch ops)
    weight_casts: bool  # fp32 weights cast to the compute dtype every micro-batch (autocast)
    grad_bytes: int  # main-grad dtype of the data-parallel reduction
    param_gather_bytes: int  # ZeRO-1 parameter all-gather dtype
    overlap_grad_reduce: bool  # buckets reduced during the last micro-batch's backward (pp = 1)
    overlap_grad_reduce_pp: bool  # ... also with pipeline parallelism
    overlap_param_gather: bool  # ZeRO-1 gather overlapped with the next step's first forward
    overlap_tp: bool  # tensor-parallel collectives hidden behind the GEMMs
    bucket_elements: int  # data-parallel bucket size
    optimizer_bytes: float  # bytes AdamW moves per stepped parameter
    zero_grad_bytes: float  # bytes per local parameter to clear the grad buffer each step


def tessera_profile(cfg: Config) -> EngineProfile:
    """This engine as it runs (engine/train/build.py, engine/parallel/data_parallel.py, the executor)."""
    attn = "triton" if cfg.model.attention == "triton" else "sdpa"
    return EngineProfile(
        name="tessera", attention_kernel=attn, fused_elementwise=cfg.model.fused_ops,
        weight_casts=cfg.precision.dtype != "fp32", grad_bytes=4, param_gather_bytes=4,
        overlap_grad_reduce=True, overlap_grad_reduce_pp=False, overlap_param_gather=False, overlap_tp=False,
        bucket_elements=2 ** 22,
        # fused AdamW on fp32 masters that are the parameters: read p, g, m, v; write p, m, v
        optimizer_bytes=28.0, zero_grad_bytes=4.0)


# Megatron-Core r0.8 as its README's H100 table ran it: bf16 parameters with fp32 main grads reduced in fp32
# (megatron/training/arguments.py forces accumulate_allreduce_grads_in_fp32 with bf16), the distributed
# optimizer gathering bf16 parameters, --overlap-grad-reduce --overlap-param-gather --tp-comm-overlap,
# Transformer Engine's fused kernels and cuDNN attention; distributed optimizer: read fp32 grad, master, m, v,
# write master, m, v and the bf16 parameter; 40M-parameter buckets (its default).
MEGATRON_PROFILE = EngineProfile(
    name="megatron-core", attention_kernel="cudnn", fused_elementwise=True, weight_casts=False, grad_bytes=4,
    param_gather_bytes=2, overlap_grad_reduce=True, overlap_grad_reduce_pp=True, overlap_param_gather=True,
    overlap_tp=True, bucket_elements=40_000_000, optimizer_bytes=30.0, zero_grad_bytes=4.0)


@dataclass
class StepPrediction:
    layout: Layout
    step_s: float
    tokens_per_s: float
    tflops_per_gpu: float  # model FLOPs (engine/train/flops.py) per second per device
    mfu: Optional[float]
    breakdown: dict[str, float]  # seconds per step: compute, tp_comm, bubble, dp_comm, optimizer, ...
    stage_times: list[tuple[float, float]]  # per pp stage: (forward, backward) seconds of one micro-batch

    def as_dict(self) -> dict:
        return {"layout": self.layout.describe(), "step_s": self.step_s, "tokens_per_s": self.tokens_per_s,
                "tflops_per_gpu": self.tflops_per_gpu, "mfu": self.mfu, "breakdown": dict(self.breakdown)}


# ------------------------------------------------------------------ FLOPs split by part (from flops.py)

def _flops_parts(cfg: Config) -> tuple[float, float, float]:
    """(matmul parameters per layer, matmul parameters of the head, attention-core training FLOPs per token
    per layer), all from engine/train/flops.py: a 1-layer and a 0-layer model differ by one layer."""
    m1 = dataclasses.replace(cfg.model, n_layers=1)
    m0 = dataclasses.replace(cfg.model, n_layers=0)
    per_layer = matmul_params_per_token(m1) - matmul_params_per_token(m0)
    head = matmul_params_per_token(m0)
    attn = (training_flops_per_token(m1, cfg.seq_len) - 6.0 * matmul_params_per_token(m1)) - \
        (training_flops_per_token(m0, cfg.seq_len) - 6.0 * matmul_params_per_token(m0))
    return float(per_layer), float(head), float(attn)


def elementwise_bytes(sh: Shapes, fused: bool) -> float:
    """Bytes the forward of one block moves outside GEMMs and the attention kernel, per token on one tp rank.

    Fused (Transformer Engine, model.fused_ops): each norm reads and writes [D] once, RoPE reads and writes q and
    k, the activation reads its inputs and writes its output once, the two residual adds read two [D] and
    write one. Eager torch (Tessera's default): RMSNorm in fp32 is five passes (pow, mean, two products, cast),
    RoPE six per tensor (float copy, two products, rotate = negate + concatenate, sum, cast), each linear casts
    its fp32 input, GQA repeats K/V, SwiGLU is silu then a product."""
    a, d, f = sh.a, sh.d, sh.f
    q, kv = sh.heads * sh.hd, sh.kv_local * sh.hd
    stream = 4 * sh.s_r  # the fp32 residual stream, sequence-sharded with sp
    n_mlp_in = 2 if sh.m.activation == "swiglu" else 1
    act_in = 2 if sh.m.activation == "swiglu" else 1
    rope = sh.m.position == "rope"
    if fused:
        norms = 2 * d * (stream + a)
        rope_b = 2 * (q + kv) * a if rope else 0.0
        act = (act_in + 1) * f * a
        adds = 2 * d * 3 * stream
        return norms + rope_b + act + adds
    if sh.m.norm == "rmsnorm":
        norm = d * stream * 8.5  # pow (r+w), mean (r), x*r (r+w), *w (r+w), cast (r + w/2)
    else:
        norm = d * stream * 2.5
    norms = 2 * norm
    casts = (3 + n_mlp_in) * d * (4 + a) if a != 4 else 0.0  # each linear casts its fp32 input
    rope_b = (q + kv) * (a + 4 + 8 + 8 + 4 + 8 + 12 + 4 + a) if rope else 0.0
    gqa = 2 * q * a if sh.gqa_expanded else 0.0
    act = {"swiglu": 2 * f * a + 3 * f * a, "gelu": 2 * f * a, "relu": 2 * f * a}[sh.m.activation]
    adds = 2 * d * (stream + a + stream)
    return norms + casts + rope_b + gqa + act + adds


def _loss_bytes(sh: Shapes, fused: bool) -> float:
    """Bytes per token of the loss outside the head GEMM (forward + backward): fused cross entropy reads the
    logits twice and writes their gradient; the fp32 torch path copies, normalises, exponentiates and
    differentiates [V/tp] in several passes."""
    v = sh.vocab_local
    return v * (3 * sh.a if fused else (2 + 4) + 4 * 8 + 4 * 2 + sh.a)


# ------------------------------------------------------------------ collectives

def _ring(bytes_: float, n: int, gbps: float, latency_s: float, kind: str) -> float:
    """Seconds of a ring collective over n ranks: all-reduce moves 2(n-1)/n of the data per rank,
    all-gather / reduce-scatter (n-1)/n (bytes = the full, gathered size)."""
    if n <= 1 or bytes_ <= 0:
        return 0.0
    factor = 2.0 if kind == "all_reduce" else 1.0
    return factor * (n - 1) / n * bytes_ / (gbps * 1e9) + latency_s


def _group_bw(dev: Device, span: int) -> float:
    """Per-direction bandwidth of a group whose ranks lie `span` apart in rank order: within a node when the
    group's extent fits in one (tp innermost, then dp, then pp; Tessera's and Megatron's order)."""
    return dev.intra_node_gbps if span <= dev.gpus_per_node else dev.inter_node_gbps


# ------------------------------------------------------------------ the model

@dataclass
class _StageTime:
    fwd: float
    bwd: float
    wgrad: float  # the weight-gradient GEMMs inside bwd (zero-bubble moves them to W)
    compute: float  # GEMM + attention + memory-bound seconds (fwd + bwd)
    tp: float  # exposed tensor-parallel seconds (fwd + bwd)
    casts: float


def _stage_time(cfg: Config, lay: Layout, dev: Device, prof: EngineProfile, sh: Shapes, pp_rank: int,
                parts: tuple[float, float, float]) -> _StageTime:
    per_layer, head, attn = parts
    T = lay.micro_batch_size * cfg.seq_len
    tp = lay.tp
    rate = (dev.matmul_tflops if cfg.precision.dtype != "fp32" else dev.matmul_tflops_fp32) * 1e12
    attn_rate = (dev.attention_tflops[prof.attention_kernel] if cfg.precision.dtype != "fp32"
                 else dev.matmul_tflops_fp32) * 1e12
    bw = dev.hbm_gbps * 1e9
    # attention: the model counts 12*H*hd*S per token (full S x S, fwd + bwd); causal executes half of the
    # forward's 4*S*H*hd and 2.5x that in the backward
    causal = 0.5 if not getattr(cfg.model, "encoder", False) else 1.0
    a_fwd = attn / 3.0 * causal * T / tp
    a_bwd = 2.5 * a_fwd
    ew = elementwise_bytes(sh, prof.fused_elementwise) * T
    tp_bytes = T * sh.d * sh.a
    tp_span = tp
    tp_bw = _group_bw(dev, tp_span)
    one_ar = _ring(tp_bytes, tp, tp_bw, dev.latency_us * 1e-6, "all_reduce")
    fwd = bwd = wgrad = compute = tpc = 0.0
    chunks = chunks_of(sh, pp_rank)
    n_blocks = sum(len(c.layers) for c in chunks)
    for c in chunks:
        for layer in c.layers:
            g_f = 2 * per_layer * T / tp / rate
            e_f = ew / bw
            t_f = g_f + a_fwd / attn_rate + e_f
            t_b = 2 * g_f + a_bwd / attn_rate + 2 * e_f
            mode = lay.recompute
            if mode == "full" and layer % lay.recompute_every != 0:
                mode = "none"
            recompute = t_f if mode == "full" else (a_fwd / attn_rate if mode == "selective" else 0.0)
            comm_f = comm_b = 2 * one_ar
            if mode == "full":
                comm_b += comm_f
            if prof.overlap_tp:
                comm_f, comm_b = max(0.0, comm_f - g_f), max(0.0, comm_b - 2 * g_f)
            fwd += t_f + comm_f
            bwd += t_b + recompute + comm_b
            wgrad += g_f
            compute += t_f + t_b + recompute
            tpc += comm_f + comm_b
        if c.last:
            g = 2 * head * T / tp / rate
            loss = _loss_bytes(sh, prof.fused_elementwise) * T / bw
            fwd += g + loss / 3
            bwd += 2 * g + 2 * loss / 3
            wgrad += g
            compute += 3 * g + loss
    casts = 0.0
    if prof.weight_casts and n_blocks:
        w = n_blocks * block_weights(sh) + sum(chunk_params(sh, c) - len(c.layers) * block_params(sh)
                                               for c in chunks)
        casts = w * (6 + 14) / bw  # fwd: read fp32, write bf16; bwd: bf16 grad -> fp32, add into the main grad
        fwd += w * 6 / bw
        bwd += w * 14 / bw
    return _StageTime(fwd, bwd, wgrad, compute, tpc, casts)


@functools.lru_cache(maxsize=4096)
def _makespan(name: str, pp: int, num_micro: int, vpp: int, f: float, b: float, w: float, comm: float) -> float:
    """The simulated forward/backward time of one step (memoised: layouts that differ only in their ZeRO level
    share it)."""
    sched = schedule_for(name, pp, num_micro, vpp)
    costs = Costs(f=f, b=b, w=min(w, b) if sched.split_backward else 0.0, comm=comm)
    return simulate(sched, costs).makespan


def estimate_step(cfg: Config, lay: Layout, dev: Device, prof: Optional[EngineProfile] = None) -> StepPrediction:
    """Predicted step time and throughput of `cfg` under `lay` on devices `dev`, run by `prof` (default:
    this engine)."""
    prof = prof or tessera_profile(cfg)
    sh = Shapes(cfg, lay, "cuda")
    parts = _flops_parts(cfg)
    stages = [_stage_time(cfg, lay, dev, prof, sh, r, parts) for r in range(lay.pp)]
    m = lay.num_micro
    f = max(s.fwd for s in stages)
    b = max(s.bwd for s in stages)
    w = max(s.wgrad for s in stages)
    # point-to-point: one [T (/tp with sp), D] activation per micro-batch and boundary, between nodes once a
    # stage's tp x dp ranks fill a node
    p2p_bytes = lay.micro_batch_size * cfg.seq_len * sh.s_r * cfg.model.d_model * sh.a
    p2p = 0.0
    if lay.pp > 1:
        bw_p2p = _group_bw(dev, lay.tp * lay.dp + 1)
        p2p = p2p_bytes / (bw_p2p * 1e9) + dev.latency_us * 1e-6
        makespan = _makespan(lay.schedule, lay.pp, m, lay.vpp, f, b, w, p2p)
    else:
        makespan = m * (f + b)
    busy = m * (f + b)
    # data parallelism
    p_local = max(sum(chunk_params(sh, c) for c in chunks_of(sh, r)) for r in range(lay.pp))
    dp = lay.dp
    dp_bw = _group_bw(dev, lay.tp * lay.dp)
    lat = dev.latency_us * 1e-6
    n_buckets = max(1, math.ceil(p_local / prof.bucket_elements))
    last_b = b  # the last micro-batch's backward on the slowest stage
    first_f = f
    dp_exposed = 0.0
    if dp > 1:
        if lay.zero == 3:
            vol = p_local * 4
            t = 2 * _ring(vol, dp, dp_bw, lat, "all_gather") + _ring(vol, dp, dp_bw, lat, "reduce_scatter")
            dp_exposed = max(t - busy, t / max(1, cfg.model.n_layers))  # prefetched per block (FSDP2)
        else:
            kind = "all_reduce" if lay.zero == 0 else "reduce_scatter"
            t_red = _ring(p_local * prof.grad_bytes, dp, dp_bw, lat * n_buckets, kind)
            overlapped = prof.overlap_grad_reduce and (lay.pp == 1 or prof.overlap_grad_reduce_pp)
            dp_exposed = max(t_red - last_b, t_red / n_buckets) if overlapped else t_red
            if lay.zero == 1:
                t_ag = _ring(p_local * prof.param_gather_bytes, dp, dp_bw, lat * n_buckets, "all_gather")
                dp_exposed += max(t_ag - first_f, t_ag / n_buckets) if prof.overlap_param_gather else t_ag
    stepped = p_local / dp if (lay.zero in (1, 3) and dp > 1) else p_local
    bw = dev.hbm_gbps * 1e9
    optimizer = (stepped * prof.optimizer_bytes + p_local * (prof.zero_grad_bytes + 4)) / bw  # + the norm's read
    step = makespan + dp_exposed + optimizer
    tokens = lay.global_batch_size * cfg.seq_len
    flops = training_flops_per_token(cfg.model, cfg.seq_len) * tokens
    tflops = flops / step / lay.world_size / 1e12
    peak = dev.peak_tflops(cfg.precision.dtype if cfg.precision.dtype != "fp32" else "fp32")
    # the slowest stage sets the pace: its work, and the rest of the makespan as bubble (which includes the
    # other stages' waiting on it and the transfers on the critical path); the parts sum to the step
    slow = max(stages, key=lambda s: s.fwd + s.bwd)
    breakdown = {
        "compute": m * slow.compute, "tp_comm": m * slow.tp, "casts": m * slow.casts,
        "bubble": max(0.0, makespan - busy), "dp_comm": dp_exposed, "optimizer": optimizer}
    return StepPrediction(lay, step, tokens / step, tflops, (tflops / peak) if peak else None, breakdown,
                          [(s.fwd, s.bwd) for s in stages])

