"""The training loop: config -> ParallelState -> model -> data -> steps -> metrics -> final weights.

Reads top to bottom like one training step (see DESIGN.md, "Data flow"). Everything the loop
needs is passed explicitly; the only process-wide state is torch's RNG and the process group.
"""

from __future__ import annotations

import math
import os
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from engine.config import Config, ConfigError
from engine.data import PretrainingSampler, Tokenizer, build_datasets, build_tokenizer
from engine.model.transformer import Transformer, build_model
from engine.optim import build_adamw, lr_at
from engine.optim.clip import clip_grad_norm, counts_toward_norm
from engine.parallel.data_parallel import wrap_data_parallel
from engine.parallel.pipeline.executor import forward_backward_pipeline, forward_only_pipeline
from engine.parallel.pipeline.stages import build_stage_chunks
from engine.parallel.random import seed_parallel_rng
from engine.parallel.state import ParallelState, all_reduce_max
from engine.parallel.tensor_parallel import allreduce_sequence_parallel_grads
from engine.precision import DynamicLossScaler, autocast, unscale_and_check
from engine.train.flops import peak_tflops, training_flops_per_token
from engine.train.logger import MetricsLogger
from engine.train.run_dir import prepare_run_dir, save_final_weights
from engine.train.step import forward_backward, forward_only


@dataclass
class TrainResult:
    out_dir: Path
    losses: list[float] = field(default_factory=list)  # one per optimizer step
    val_losses: dict[int, dict[str, float]] = field(default_factory=dict)  # step -> {name: loss}
    skipped_steps: int = 0
    step_times: list[float] = field(default_factory=list)  # seconds per optimizer step
    sample: Optional[str] = None


def _peak_memory_gb(device: torch.device) -> float:
    """Peak allocated GPU memory, or peak resident memory of the process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kb / 2**20


def resolve_vocab(cfg: Config) -> Tokenizer:
    """Build the configured tokenizer and fill model.vocab_size from it (0 = take the tokenizer's), or fail
    if the model's vocabulary is smaller than the tokenizer's."""
    tokenizer = build_tokenizer(cfg.data.tokenizer)
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = tokenizer.vocab_size
    elif tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's vocabulary "
                          f"({tokenizer.vocab_size}, data.tokenizer={cfg.data.tokenizer!r})")
    return tokenizer


def _count_params(chunks: list[Transformer], pstate: ParallelState) -> int:
    """Parameters of the whole model: this rank's count summed over tp and pp (each shard once)."""
    n = sum(q.numel() for c in chunks for q in c.parameters() if counts_toward_norm(q, pstate))
    if pstate.is_distributed:
        t = torch.tensor([n], dtype=torch.float64, device=pstate.device)
        dist.all_reduce(t, group=pstate.mp_group)
        n = int(t.item())
    return n


def _loader(dataset, sampler: PretrainingSampler) -> Iterator[dict]:
    # Samples are memory-mapped windows: a worker-less DataLoader only stacks them.
    return iter(DataLoader(dataset, batch_sampler=sampler, num_workers=0))


def _sync_mean(values: list[float], group, device: torch.device) -> float:
    """Mean of `values` over this rank and the ranks of `group` (e.g. data-parallel replicas)."""
    t = torch.tensor([sum(values), len(values)], dtype=torch.float64, device=device)
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(t, group=group)
    return float(t[0] / t[1])


def evaluate(chunks: list[Transformer], valid_sets: dict, cfg: Config, pstate: ParallelState, ac) -> dict[str, float]:
    """Mean loss over the first `eval_iters` global batches of each validation set (same batches every time)."""
    for c in chunks:
        c.eval()
    out = {}
    # Megatron's convention: eval_iters global batches, so the value does not depend on the dp size.
    t = cfg.train
    n_micro = t.global_batch_size // (t.micro_batch_size * pstate.dp)
    for name, ds in valid_sets.items():
        n = min(t.eval_iters, len(ds) // t.global_batch_size) * n_micro  # micro-batches on this rank
        if n == 0:
            continue
        total = n // n_micro * t.global_batch_size
        sampler = PretrainingSampler(total, 0, t.micro_batch_size, pstate.dp_rank, pstate.dp,
                                     global_batch_size=t.global_batch_size)
        batches = _loader(ds, sampler)
        if pstate.pp > 1:
            losses = forward_only_pipeline(chunks, batches, n, pstate, seq_len=cfg.seq_len,
                                           micro_batch_size=cfg.train.micro_batch_size, d_model=cfg.model.d_model,
                                           vocab_size=cfg.model.vocab_size, autocast=ac, fused=cfg.model.fused_ops)
        else:
            losses = forward_only(chunks[0], batches, n, pstate.device, cfg.model.vocab_size, ac,
                                  fused=cfg.model.fused_ops, pstate=pstate)
        out[name] = _sync_mean(losses, pstate.dp_group, pstate.device)
    for c in chunks:
        c.train()
    return out


def train(cfg: Config, pstate: Optional[ParallelState] = None) -> TrainResult:
    """Run the training described by `cfg` (already validated). Returns what happened, for tests and benches.

    Without `pstate`, a process group this call creates is destroyed on the way out, also on errors: a gloo
    group left alive until interpreter exit can abort the process (SIGABRT, "terminate called without an active
    exception") while its worker threads are torn down, which turns a finished run into a failed torchrun job.
    """
    if pstate is not None:
        return _train(cfg, pstate)
    p = cfg.parallel
    owns_group = not dist.is_initialized()  # a caller's own group stays the caller's to destroy
    pstate = ParallelState.initialize(tp=p.tp, pp=p.pp, dp=None if p.dp == "auto" else p.dp, vpp=p.vpp,
                                      sequence_parallel=p.sequence_parallel, device=cfg.train.device,
                                      timeout_minutes=p.timeout_minutes)
    try:
        return _train(cfg, pstate)
    finally:
        if owns_group:
            pstate.destroy()


def _train(cfg: Config, pstate: ParallelState) -> TrainResult:
    p, t = cfg.parallel, cfg.train
    device = pstate.device
    seed_parallel_rng(t.seed, pstate)  # default stream per pp stage + a per-tp-rank stream for dropout

    # Tokenizer first: it fixes the vocabulary the model is built for.
    tokenizer = resolve_vocab(cfg)
    out_dir = Path(t.out_dir)
    if pstate.is_rank0:
        prepare_run_dir(out_dir, cfg)

    # This rank's model chunks: the whole model at pp=1, its virtual stages otherwise (same init either way).
    if pstate.pp > 1:
        chunks = build_stage_chunks(cfg.model, pstate, seed=t.seed, layout=p.pp_layout, device=device)
    else:
        chunks = [build_model(cfg.model, pstate, seed=t.seed, device=device)]
    model = chunks[0]
    ddp = None
    if pstate.is_distributed:  # contiguous grad buffers, bucketed reduction, ZeRO-1 / FSDP2 by parallel.zero
        ddp, optimizer = wrap_data_parallel(chunks, None, cfg, pstate)
    else:
        optimizer = build_adamw(model.named_parameters(), cfg.optim, device)
    fwd_model = torch.compile(model) if t.compile else model  # config rejects compile with pp > 1
    scaler = DynamicLossScaler(cfg.precision.initial_loss_scale, cfg.precision.loss_scale_window,
                               cfg.precision.hysteresis, cfg.precision.min_loss_scale) \
        if cfg.precision.dtype == "fp16" else None

    n_micro = t.global_batch_size // (t.micro_batch_size * pstate.dp)
    seq_len = cfg.seq_len
    train_samples = t.iters * t.global_batch_size
    eval_runs = (t.iters // t.eval_interval + 1) if t.eval_interval else 0
    valid_samples = t.eval_iters * t.global_batch_size if eval_runs else 0
    cache_dir = Path(cfg.data.cache_dir) if cfg.data.cache_dir else out_dir / "data_cache"
    barrier = (lambda: dist.barrier()) if pstate.is_distributed else (lambda: None)
    train_set, valid_sets = build_datasets(cfg, tokenizer, max(train_samples, 1), valid_samples, cache_dir,
                                           is_builder=pstate.is_rank0, barrier=barrier)
    sampler = PretrainingSampler(max(train_samples, t.global_batch_size), 0, t.micro_batch_size, pstate.dp_rank,
                                 pstate.dp, global_batch_size=t.global_batch_size)
    train_iter = _loader(train_set, sampler)

    flops_per_token = training_flops_per_token(cfg.model, seq_len)
    peak = peak_tflops(device, cfg.precision.dtype)
    logger = MetricsLogger(out_dir, pstate.is_rank0, t.iters, tensorboard=t.tensorboard,
                           progress=t.progress and sys.stderr.isatty())
    ac = lambda: autocast(cfg.precision.dtype, device)  # noqa: E731
    result = TrainResult(out_dir=out_dir)
    n_params = _count_params(chunks, pstate)  # collective: every rank
    if pstate.is_rank0:
        logger.console(f"tessera: {n_params:,} parameters ({cfg.model.vocab_size} vocab, padded to "
                       f"{model.padded_vocab}), {pstate.describe()}, {n_micro} micro-batches/step, "
                       f"{cfg.precision.dtype}, {len(train_set):,} train samples")
    params = [q for c in chunks for q in c.parameters() if q.requires_grad]
    window_tokens, window_time = 0, 0.0
    for step in range(t.iters):
        t0 = time.perf_counter()
        lr = lr_at(step, cfg.optim, t.iters)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        scale = scaler.scale if scaler else 1.0
        if pstate.pp > 1:
            losses = forward_backward_pipeline(
                chunks, train_iter, n_micro, pstate, schedule=p.schedule, seq_len=seq_len,
                micro_batch_size=t.micro_batch_size, d_model=cfg.model.d_model, vocab_size=cfg.model.vocab_size,
                device=device, autocast=ac, loss_scale=scale, fused=cfg.model.fused_ops, ddp=ddp)
        else:
            losses = forward_backward(fwd_model, train_iter, n_micro, device, cfg.model.vocab_size, ac,
                                      loss_scale=scale, no_sync=ddp.no_sync if ddp else None,
                                      fused=cfg.model.fused_ops, pstate=pstate)
        if ddp is not None:
            ddp.finish_grad_sync()  # mean over dp ranks (ZeRO-1: this rank's shard)
        for c in chunks:  # sequence-parallel norm grads and replicated K/V shards: sum over tp
            allreduce_sequence_parallel_grads(c, pstate)
        found_inf = False
        if scaler is not None:
            grads = optimizer.local_grads() if ddp is not None else [q.grad for q in params]
            found_inf = all_reduce_max(float(unscale_and_check(grads, scale)), pstate) > 0
            scaler.update(found_inf)
        if found_inf:
            grad_norm = float("nan")
            result.skipped_steps += 1
        else:
            if ddp is not None:  # norm over tp, pp and dp shards without double counting
                grad_norm = optimizer.clip_grad_norm(cfg.optim.grad_clip)
            else:
                grad_norm = clip_grad_norm(params, cfg.optim.grad_clip, pstate)
            optimizer.step()
        loss = _sync_mean(losses, pstate.dp_group, device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t0
        result.losses.append(loss)
        result.step_times.append(dt)
        window_tokens += t.global_batch_size * seq_len
        window_time += dt
        done = step + 1
        logger.advance(1, {"loss": f"{loss:.4f}", "lr": f"{lr:.2e}"})
        if done % t.log_interval == 0 or done == t.iters:
            tok_s = window_tokens / window_time
            tflops = flops_per_token * tok_s / pstate.world_size / 1e12  # per device
            record = {"step": done, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                      "loss_scale": scaler.scale if scaler else None, "tokens_per_s": tok_s, "tflops": tflops,
                      "mfu": tflops / peak if peak else None, "mem_gb": _peak_memory_gb(device),
                      "skipped_steps": result.skipped_steps}
            logger.log(record)
            mfu = f"{100 * tflops / peak:.1f}%" if peak else "n/a (no peak figure for this device)"
            logger.console(f"step {done:>6}/{t.iters} | loss {loss:.4f} | lr {lr:.3e} | grad norm {grad_norm:.3f} | "
                           f"{tok_s:,.0f} tok/s | {tflops:.3f} TFLOP/s/device | MFU {mfu} | "
                           f"mem {record['mem_gb']:.2f} GB" + (f" | scale {scaler.scale:g}" if scaler else ""))
            window_tokens, window_time = 0, 0.0
        if t.eval_interval and valid_sets and (done % t.eval_interval == 0 or done == t.iters):
            vals = evaluate(chunks, valid_sets, cfg, pstate, ac)
            if vals:
                result.val_losses[done] = vals
                rec = {"step": done, "val_loss": sum(vals.values()) / len(vals),
                       **{f"val_loss/{k}": v for k, v in vals.items()}}
                logger.log(rec)
                logger.console(f"step {done:>6}/{t.iters} | val loss " +
                               ", ".join(f"{k} {v:.4f}" for k, v in vals.items()))
        if not math.isfinite(loss) and scaler is None:
            logger.close()
            raise FloatingPointError(f"loss became {loss} at step {done}; lower optim.lr or check the data")

    logger.close()
    if pstate.is_rank0 and pstate.is_distributed:
        logger.console("tessera: final weights are written by single-process runs only for now; gathering a "
                       "parallel layout into one file arrives with sharded checkpoints")
    elif pstate.is_rank0:
        save_final_weights(out_dir, model)
        if t.sample_prompt is not None:
            from engine.generate import generate_text

            result.sample = generate_text(model, tokenizer, t.sample_prompt, max_new_tokens=t.sample_tokens,
                                          temperature=0.8, top_k=40, seed=t.seed, device=device)
            print(f"\n--- sample ---\n{result.sample}\n--------------", flush=True)
    return result
