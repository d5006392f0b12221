"""The training loop: config -> ParallelState -> Trainer -> steps -> metrics -> final weights.

Everything a step does lives in the Trainer (engine/train/trainer.py); the loop only decides when to log,
evaluate and stop. Everything it needs is passed explicitly; the only process-wide state is torch's RNG
and the process group.
"""

from __future__ import annotations

import gc
import math
import resource
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from engine.config import Config
from engine.parallel.state import ParallelState
from engine.train.flops import peak_tflops, training_flops_per_token
from engine.train.logger import MetricsLogger
from engine.train.run_dir import prepare_run_dir
from engine.train.trainer import Trainer, resolve_vocab

__all__ = ["TrainResult", "resolve_vocab", "train"]


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


def train(cfg: Config, pstate: Optional[ParallelState] = None) -> TrainResult:
    """Run the training described by `cfg` (already validated). Returns what happened, for tests and benches.

    Without `pstate`, a process group this call creates is destroyed on the way out, also on errors: a gloo
    group left alive until interpreter exit can abort the process (SIGABRT, "terminate called without an active
    exception") when one of its worker threads frees a finished collective's tensors during interpreter
    shutdown, which turns a finished run into a failed torchrun job. So nothing may still hold a group when
    this returns (tests/parallel/test_clean_exit.py counts the threads left).
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
            gc.collect()  # FSDP2's hook cycles hold the model and its mesh: free them before the groups
            pstate.destroy()


def _train(cfg: Config, pstate: ParallelState) -> TrainResult:
    t = cfg.train
    device = pstate.device
    tokenizer = resolve_vocab(cfg)  # before the run dir: config.yaml holds the resolved vocabulary
    out_dir = Path(t.out_dir)
    if pstate.is_rank0:
        prepare_run_dir(out_dir, cfg)
    trainer = Trainer(cfg, pstate, tokenizer)

    flops_per_token = training_flops_per_token(cfg.model, cfg.seq_len)
    peak = peak_tflops(device, cfg.precision.dtype)
    logger = MetricsLogger(out_dir, pstate.is_rank0, t.iters, tensorboard=t.tensorboard,
                           progress=t.progress and sys.stderr.isatty())
    result = TrainResult(out_dir=out_dir)
    n_params = trainer.count_parameters()  # collective: every rank
    if pstate.is_rank0:
        logger.console(f"tessera: {n_params:,} parameters ({cfg.model.vocab_size} vocab, padded to "
                       f"{trainer.model.padded_vocab} at run time), {pstate.describe()}, {trainer.n_micro} "
                       f"micro-batches/step, {cfg.precision.dtype}, {len(trainer.train_set):,} train samples")
    window_tokens, window_time = 0, 0.0
    try:
        for _ in range(t.iters):
            out = trainer.train_step()
            done = trainer.iteration
            result.losses.append(out.loss)
            result.step_times.append(out.seconds)
            result.skipped_steps += int(out.skipped)
            window_tokens += t.global_batch_size * cfg.seq_len
            window_time += out.seconds
            logger.advance(1, {"loss": f"{out.loss:.4f}", "lr": f"{out.lr:.2e}"})
            if done % t.log_interval == 0 or done == t.iters:
                tok_s = window_tokens / window_time
                tflops = flops_per_token * tok_s / pstate.world_size / 1e12  # per device
                scale = trainer.scaler.scale if trainer.scaler else None
                record = {"step": done, "loss": out.loss, "lr": out.lr, "grad_norm": out.grad_norm,
                          "loss_scale": scale, "tokens_per_s": tok_s, "tflops": tflops,
                          "mfu": tflops / peak if peak else None, "mem_gb": _peak_memory_gb(device),
                          "skipped_steps": result.skipped_steps}
                logger.log(record)
                mfu = f"{100 * tflops / peak:.1f}%" if peak else "n/a (no peak figure for this device)"
                logger.console(f"step {done:>6}/{t.iters} | loss {out.loss:.4f} | lr {out.lr:.3e} | grad norm "
                               f"{out.grad_norm:.3f} | {tok_s:,.0f} tok/s | {tflops:.3f} TFLOP/s/device | MFU {mfu} | "
                               f"mem {record['mem_gb']:.2f} GB" + (f" | scale {scale:g}" if scale else ""))
                window_tokens, window_time = 0, 0.0
            if t.eval_interval and trainer.valid_sets and (done % t.eval_interval == 0 or done == t.iters):
                vals = trainer.evaluate()
                if vals:
                    result.val_losses[done] = vals
                    logger.log({"step": done, "val_loss": sum(vals.values()) / len(vals),
                                **{f"val_loss/{k}": v for k, v in vals.items()}})
                    logger.console(f"step {done:>6}/{t.iters} | val loss " +
                                   ", ".join(f"{k} {v:.4f}" for k, v in vals.items()))
            if not math.isfinite(out.loss) and trainer.scaler is None:
                raise FloatingPointError(f"loss became {out.loss} at step {done}; lower optim.lr or check the data")
    finally:
        logger.close()

    trainer.save_weights(out_dir / "model.safetensors")  # collective: every layout writes canonical weights
    trainer.close()  # the data-parallel grad hooks would keep the process groups alive (see train())
    if pstate.is_rank0 and t.sample_prompt is not None:
        from engine.generate import generate_text, load_run

        # The sample comes from the file just written, so what it shows is what `tessera generate` gets.
        _, model, _ = load_run(out_dir, device=str(device))
        result.sample = generate_text(model, tokenizer, t.sample_prompt, max_new_tokens=t.sample_tokens,
                                      temperature=0.8, top_k=40, seed=t.seed, device=device)
        print(f"\n--- sample ---\n{result.sample}\n--------------", flush=True)
    return result
