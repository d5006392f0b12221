"""The training loop: config -> ParallelState -> Trainer -> steps -> metrics -> final weights.

Everything a step does lives in the Trainer (engine/train/trainer.py); the loop only decides when to log,
evaluate and stop. Everything it needs is passed explicitly; the only process-wide state is torch's RNG
and the process group.
"""

from __future__ import annotations

import gc
import json
import resource
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist

from engine import __version__
from engine.config import Config
from engine.data.build import check_data_sources
from engine.checkpoint.files import check_checkpoint_dir
from engine.checkpoint.manager import CheckpointSaver
from engine.errors import NumericalFault, PeerFailure, RunStopped, TesseraError
from engine.parallel.state import ParallelState
from engine.train.flops import peak_dtype, peak_tflops, training_flops_per_token
from engine.train.logger import MetricsLogger
from engine.train.run_dir import RunLock, check_run_dir, prepare_run_dir
from engine.train.checkpointing import checkpoint_files, checkpoint_meta, trainer_checkpoint_state
from engine.train.start import Origin, StartPlan, plan_start, start_run
from engine.train.stop import StopRequest
from engine.train.timing import RunClock, format_run_split
from engine.train.trainer import Trainer, resolve_vocab
from engine.train.watchdog import Watchdog

__all__ = ["TrainResult", "resolve_vocab", "train"]


@dataclass
class TrainResult:
    out_dir: Path
    losses: list[float] = field(default_factory=list)  # one per optimizer step
    val_losses: dict[int, dict[str, float]] = field(default_factory=dict)  # step -> {name: loss}
    skipped_steps: int = 0
    step_times: list[float] = field(default_factory=list)  # seconds per optimizer step
    sample: Optional[str] = None
    # the run's wall time by part (engine/train/timing.py RUN_PARTS) and "total", seconds; docs/metrics.md
    wall: dict[str, float] = field(default_factory=dict)


def _peak_memory_gb(device: torch.device) -> float:
    """Peak allocated GPU memory, or peak resident memory of the process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kb / 2**20


def train(cfg: Config, pstate: Optional[ParallelState] = None, started_at: Optional[float] = None) -> TrainResult:
    """Run the training described by `cfg` (already validated). Returns what happened, for tests and benches.

    started_at: when the run's start-up began, on time.perf_counter()'s clock (the CLI passes the process's
    start, so start-up includes the imports); default: now. The run's wall time is split from there
    (TrainResult.wall, the last record of metrics.jsonl).

    Without `pstate`, a process group this call creates is destroyed on the way out, also on errors: a gloo
    group left alive until interpreter exit can abort the process (SIGABRT, "terminate called without an active
    exception") when one of its worker threads frees a finished collective's tensors during interpreter
    shutdown, which turns a finished run into a failed torchrun job. So nothing may still hold a group when
    this returns (tests/parallel/test_clean_exit.py counts the threads left).
    """
    clock = RunClock(started_at)
    if pstate is not None:
        return _train(cfg, pstate, clock)
    p = cfg.parallel
    owns_group = not dist.is_initialized()  # a caller's own group stays the caller's to destroy
    pstate = ParallelState.initialize(tp=p.tp, pp=p.pp, dp=None if p.dp == "auto" else p.dp, vpp=p.vpp,
                                      sequence_parallel=p.sequence_parallel, device=cfg.train.device,
                                      timeout_minutes=p.timeout_minutes)
    try:
        return _train(cfg, pstate, clock)
    finally:
        if owns_group:
            gc.collect()  # FSDP2's hook cycles hold the model and its mesh: free them before the groups
            pstate.destroy()


_PEER_FAILURE = ("Connection reset by peer", "Connection closed by peer", "Timed out waiting", "timed out",
                 "NCCL communicator was aborted", "Broken pipe")


def _agree(pstate: ParallelState, check: Callable[[], None]) -> None:
    """Run a read-only check on rank 0 and make every rank raise what it raised (or nothing), so a bad input
    stops the whole job with one message instead of leaving the other ranks waiting for rank 0."""
    if not pstate.is_distributed:
        check()
        return
    err: list[Optional[BaseException]] = [None]
    failure: Optional[BaseException] = None
    if pstate.is_rank0:
        try:
            check()
        except Exception as e:  # noqa: BLE001 - every rank must learn that rank 0 stopped, whatever the cause
            failure = e
            err[0] = e if isinstance(e, (TesseraError, OSError)) else PeerFailure(
                f"rank 0 stopped in its start-up checks ({type(e).__name__}: {e})")
    dist.broadcast_object_list(err, src=0)
    if failure is not None:
        raise failure
    if err[0] is not None:
        raise err[0]


def _straggler_note(times: list[float], factor: float) -> tuple[dict, str]:
    """Per-rank mean busy times (data + forward/backward) of the last log window -> metrics fields and a
    console note."""
    ordered = sorted(times)
    median = statistics.median(ordered)
    slow = [r for r, x in enumerate(times) if median > 0 and x > factor * median]
    fields = {"busy_time_median": median, "busy_time_max": ordered[-1], "slow_ranks": slow}
    note = f" | slow ranks {slow} (> {factor:g}x the median {median * 1e3:.0f} ms)" if slow else ""
    return fields, note


def _train(cfg: Config, pstate: ParallelState, clock: RunClock) -> TrainResult:
    t = cfg.train
    out_dir = Path(t.out_dir)
    # Everything is checked before anything is written: the config (already), the tokenizer, the run
    # directory, the data. Only then is the directory locked and, once the datasets are built, prepared.
    # where the run starts (resume, init_from, scratch): an hf:DIR source sets the architecture first, and the
    # weights' tokenizer is compared with the run's before the vocabulary is filled
    plan = plan_start(cfg, (lambda s: print(s, flush=True)) if pstate.is_rank0 else (lambda s: None))
    tokenizer = resolve_vocab(cfg)  # config.yaml holds the resolved vocabulary
    _agree(pstate, lambda: check_run_dir(out_dir, t.allow_foreign_dir))
    if cfg.checkpoint.dir is not None:
        _agree(pstate, lambda: check_checkpoint_dir(Path(cfg.checkpoint.dir)))
    _agree(pstate, lambda: check_data_sources(cfg, tokenizer, cfg.data.verify_token_ids))
    lock: list[Optional[RunLock]] = [None]
    _agree(pstate, lambda: lock.__setitem__(0, RunLock(out_dir)))
    watchdog = Watchdog(60.0 * cfg.parallel.timeout_minutes + 10.0, pstate.rank, pstate.world_size).start() \
        if pstate.is_distributed else None
    try:
        return _run(cfg, pstate, tokenizer, out_dir, watchdog, plan, clock)
    except RuntimeError as e:
        if watchdog is None or not any(m in str(e) for m in _PEER_FAILURE):
            raise
        first = str(e).strip().splitlines()[-1][:300]
        raise PeerFailure(f"a peer rank died or a collective did not finish within parallel.timeout_minutes="
                          f"{cfg.parallel.timeout_minutes:g} during '{watchdog.phase}' of step {watchdog.step} "
                          f"({first})") from e
    finally:
        if watchdog is not None:
            watchdog.stop()
        if lock[0] is not None:
            lock[0].release()


def _run(cfg: Config, pstate: ParallelState, tokenizer, out_dir: Path, watchdog: Optional[Watchdog],
         plan: StartPlan, clock: RunClock) -> TrainResult:
    ck = cfg.checkpoint
    stop = StopRequest(ck.time_limit)
    if ck.dir is not None:  # from here on a signal means: stop after the next step, with a checkpoint
        stop.install()
    try:
        return _start_and_loop(cfg, pstate, tokenizer, out_dir, watchdog, stop, plan, clock)
    finally:
        stop.uninstall()


def _start_and_loop(cfg: Config, pstate: ParallelState, tokenizer, out_dir: Path, watchdog: Optional[Watchdog],
                    stop: StopRequest, plan: StartPlan, clock: RunClock) -> TrainResult:
    ck = cfg.checkpoint
    trainer = Trainer(cfg, pstate, tokenizer, watchdog, start=plan.start)  # builds the datasets (caches) too
    clock.add("model_build", trainer.build_seconds)
    clock.add("data_build", trainer.data_build_seconds)
    log = (lambda s: print(s, flush=True)) if pstate.is_rank0 else (lambda s: None)
    # validated and read before anything is written; every rank reads its own cut
    origin = start_run(trainer, plan, log)
    resumed = origin.resumed
    saver = CheckpointSaver(Path(ck.dir), keep=ck.keep, keep_every=ck.keep_every, async_save=ck.async_save,
                            log=lambda s: print(s, file=sys.stderr, flush=True) if pstate.is_rank0 else None) \
        if ck.dir is not None else None
    if saver is not None and ck.async_save:
        saver.prepare(trainer_checkpoint_state(trainer)[0])  # the staging buffers, before training starts
    if pstate.is_rank0:
        # archive a previous run's files (not when resuming it: its metrics are appended to), write config.yaml
        prepare_run_dir(out_dir, cfg, __version__, resume=resumed)
    try:
        return _loop(cfg, pstate, trainer, out_dir, saver, stop, origin, clock)
    finally:
        if saver is not None:
            saver.close()


def _loop(cfg: Config, pstate: ParallelState, trainer: Trainer, out_dir: Path, saver: Optional[CheckpointSaver],
          stop: StopRequest, origin: Origin, clock: RunClock) -> TrainResult:
    t = cfg.train
    device = pstate.device
    tokenizer = trainer.tokenizer

    def save(step: int):
        pieces, tensors = trainer_checkpoint_state(trainer)
        meta = json.dumps(checkpoint_meta(trainer, origin.lineage, origin.hf, origin.val_start),
                          indent=1).encode() if pstate.is_rank0 else b""
        out = saver.save(step, pieces, tensors, lambda: meta, files=checkpoint_files(tokenizer))
        finished = saver.last.write_seconds if saver.last is not None else 0.0
        stop.last_save_seconds = max(out.blocked_seconds, finished)  # what the next save may cost
        return out

    flops_per_token = training_flops_per_token(cfg.model, cfg.seq_len)
    peak_of = peak_dtype(cfg.precision.dtype, cfg.precision.fp8 is not None)  # FP8 runs: against the FP8 peak
    peak = peak_tflops(device, peak_of)
    logger = MetricsLogger(out_dir, pstate.is_rank0, t.iters, tensorboard=t.tensorboard,
                           progress=t.progress and sys.stderr.isatty())
    result = TrainResult(out_dir=out_dir)
    n_params = trainer.count_parameters()  # collective: every rank
    if pstate.is_rank0:
        logger.console(f"tessera: {n_params:,} parameters ({cfg.model.vocab_size} vocab, padded to "
                       f"{trainer.model.padded_vocab} at run time), {pstate.describe()}, {trainer.n_micro} "
                       f"micro-batches/step, {cfg.precision.dtype}, {len(trainer.train_set):,} train samples")
    if trainer.built.fp8 is not None:
        for line in trainer.built.fp8.report_lines(pstate):  # collective over the pipeline group
            logger.console(line)
    window_tokens, window_time, window_busy, window_steps = 0, 0.0, 0.0, 0
    stopped: Optional[str] = None
    last_saved = trainer.iteration if saver is not None and trainer.iteration > 0 else -1

    def evaluate(step: int, baseline: bool = False) -> None:
        with clock.part("eval"):
            vals = trainer.evaluate()
        if not vals:
            return
        result.val_losses[step] = vals
        if baseline:  # before the first update: val_delta is measured from here, also after a resume
            origin.val_start = dict(vals)
        delta = {k: v - origin.val_start[k] for k, v in vals.items() if k in (origin.val_start or {})}
        logger.log({"step": step, "val_loss": sum(vals.values()) / len(vals),
                    **{f"val_loss/{k}": v for k, v in vals.items()},
                    **{f"val_delta/{k}": v for k, v in delta.items()},
                    **{f"val_{m}/{k}": v for k, mv in trainer.eval_metrics.items() for m, v in mv.items()}})
        logger.console(f"step {step:>6}/{t.iters} | val loss " + ", ".join(
            f"{k} {v:.4f}" + (f" ({delta[k]:+.4f})" if k in delta and step != start_step else "")
            + "".join(f", {m.replace('_', ' ')} {x:.4f}" for m, x in trainer.eval_metrics.get(k, {}).items())
            for k, v in vals.items()))

    start_step = trainer.iteration
    window_start = trainer.consumed_samples  # samples/<name>: each dataset's samples since the last log line
    eval_first = t.eval_at_start if t.eval_at_start is not None else origin.from_prior_weights
    if eval_first and not origin.resumed and trainer.valid_sets and t.eval_iters:
        evaluate(start_step, baseline=True)  # before any update: what the prior weights know
    clock.end_startup()  # what came before the first step and no other part claimed
    try:
        for _ in range(trainer.iteration, t.iters):
            try:
                out = trainer.train_step()
            except NumericalFault as e:  # the stopping step is in metrics.jsonl too
                logger.log({"step": trainer.iteration, "fault": str(e)})
                raise
            done = trainer.iteration
            clock.add("steps", out.seconds)
            clock.steps += 1
            result.losses.append(out.loss)
            result.step_times.append(out.seconds)
            result.skipped_steps += int(out.skipped)
            if out.fault is not None:
                logger.console(f"step {done:>6}/{t.iters} | skipped: {out.fault}")
            window_tokens += t.global_batch_size * cfg.seq_len
            window_time += out.seconds
            window_busy += out.busy_seconds
            window_steps += 1
            logger.advance(1, {"loss": f"{out.loss:.4f}", "lr": f"{out.lr:.2e}"})
            if done % t.log_interval == 0 or done == t.iters:
                tok_s = window_tokens / window_time
                tflops = flops_per_token * tok_s / pstate.world_size / 1e12  # per device
                scale = trainer.scaler.scale if trainer.scaler else None
                mix = trainer.train_set.samples_in(window_start, trainer.consumed_samples)  # per dataset
                window_start = trainer.consumed_samples
                record = {"step": done, "loss": out.loss, "lr": out.lr, "grad_norm": out.grad_norm,
                          "loss_scale": scale, "tokens_per_s": tok_s, "tflops": tflops,
                          "mfu": tflops / peak if peak else None, "mfu_peak": peak_of,
                          "mem_gb": _peak_memory_gb(device),
                          "skipped_steps": result.skipped_steps, **out.metrics,
                          **{f"samples/{k}": v for k, v in mix.items()}}
                note = ""
                if pstate.is_distributed:  # one small collective per log interval: every rank's step time
                    fields, note = _straggler_note(trainer.rank_step_times(window_busy / window_steps),
                                                   t.straggler_factor)
                    record.update(fields)
                logger.log(record)
                mfu = f"{100 * tflops / peak:.1f}%" if peak else "n/a (no peak figure for this device)"
                mfu += f" of the {peak_of} peak" if peak and peak_of == "fp8" else ""
                logger.console(f"step {done:>6}/{t.iters} | loss {out.loss:.4f} | lr {out.lr:.3e} | grad norm "
                               f"{out.grad_norm:.3f} | {tok_s:,.0f} tok/s | {tflops:.3f} TFLOP/s/device | MFU {mfu} | "
                               f"mem {record['mem_gb']:.2f} GB" + (f" | scale {scale:g}" if scale else "")
                               + "".join(f" | {k.replace('_', ' ')} {v:.4f}" for k, v in out.metrics.items()) + note
                               + (" | samples " + ", ".join(f"{k} {v}" for k, v in mix.items()) if len(mix) > 1 else ""))
                window_tokens, window_time, window_busy, window_steps = 0, 0.0, 0.0, 0
            if t.eval_interval and trainer.valid_sets and (done % t.eval_interval == 0 or done == t.iters):
                evaluate(done)
            if saver is None:
                continue
            stopped = stop.check(pstate, out.seconds)  # collective: every rank stops at the same step
            if done < t.iters and (stopped or (cfg.checkpoint.interval and done % cfg.checkpoint.interval == 0)):
                with clock.part("save"):
                    save(done)
                last_saved = done
            if stopped:
                if done == t.iters:  # the request came during the last step: the run is complete anyway
                    stopped = None
                break
        if saver is not None:
            with clock.part("save"):
                if last_saved != trainer.iteration:  # the end of training is always saved
                    save(trainer.iteration)
                saver.raise_if_failed(saver.wait() or saver.last)
    except BaseException:
        logger.close()
        raise

    try:
        if stopped is not None:
            trainer.close()
            _account(clock, result, logger, trainer.iteration)
            where = saver.last.published.path if saver.last and saver.last.published else cfg.checkpoint.dir
            raise RunStopped(f"{stopped} at step {trainer.iteration}/{t.iters}; checkpoint {where}; continue with "
                             f"checkpoint.load=auto")
        with clock.part("save"):
            trainer.save_weights(out_dir / "model.safetensors")  # collective: every layout writes canonical weights
        trainer.close()  # the data-parallel grad hooks would keep the process groups alive (see train())
        if pstate.is_rank0 and t.sample_prompt is not None:
            from engine.generate import generate_text, load_run

            # The sample comes from the file just written, so what it shows is what `tessera generate` gets.
            _, model, _ = load_run(out_dir, device=str(device))
            result.sample = generate_text(model, tokenizer, t.sample_prompt, max_new_tokens=t.sample_tokens,
                                          temperature=0.8, top_k=40, seed=t.seed, device=device)
            print(f"\n--- sample ---\n{result.sample}\n--------------", flush=True)
        _account(clock, result, logger, trainer.iteration)
    finally:
        logger.close()
    return result


def _account(clock: RunClock, result: TrainResult, logger: MetricsLogger, step: int) -> None:
    """The end-of-run summary: the wall time by part as the last record of metrics.jsonl and one console line."""
    result.wall = clock.split()
    logger.log({"step": step, **{f"wall_s/{k}": v for k, v in result.wall.items()}, "steps_this_run": clock.steps})
    logger.console(format_run_split(result.wall, clock.steps))
