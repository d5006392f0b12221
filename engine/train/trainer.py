"""The Trainer: everything one training run holds, and the one training step.

    trainer = Trainer(cfg, pstate)        # tokenizer, model chunks, data-parallel wrapper, optimizer, data
    for _ in range(cfg.train.iters):
        out = trainer.train_step()         # forward/backward over the micro-batches, reduce, clip, update
    trainer.evaluate()                     # {validation set: mean loss}
    sd = trainer.state_dict()              # what a resume needs (this rank's part)

The step dispatches on pipeline parallelism in exactly one place (`_forward_backward`, `_forward_only`).
Everything else is the same for every layout: data-parallel main grads, tp gradient sums driven by the
sharding specs, the one optimizer. `state_dict()` holds the iteration, the consumed samples (in total and
per dataset), the LR schedule position, the loss scaler, this rank's RNG streams (torch, CUDA, numpy,
python, the tp tracker), the model (this rank's parameters by canonical name), the optimizer and the
FP8 scaling state (amax histories and scales by canonical module name, precision.fp8);
`load_state_dict` restores them so that training continues exactly as if it had not stopped.
"""

from __future__ import annotations

import functools
import random
import time
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from engine.config import Config, ConfigError
from engine.data import PretrainingSampler, Tokenizer, build_datasets
from engine.data.special_tokens import tokenizer_for_objective
from engine.model.loss import PRETRAIN_STATS, lm_loss, pretraining_loss, pretraining_metrics
from engine.optim import lr_at
from engine.parallel.collectives import all_gather_flat
from engine.parallel.pipeline.executor import forward_backward_pipeline, forward_only_pipeline
from engine.parallel.random import seed_parallel_rng
from engine.parallel.state import ParallelState, all_reduce_max
from engine.precision import DynamicLossScaler, autocast, unscale_and_check
from engine.train.build import Built, build
from engine.train.faults import FaultMonitor
from engine.train.step import complete_grads, forward_backward, forward_only, split_batch
from engine.train.timing import StepTimer
from engine.train.watchdog import Watchdog
from engine.checkpoint.weights import canonical_specs, save_weights

__all__ = ["StepResult", "Trainer", "resolve_vocab"]

STATE_FORMAT = "tessera.trainer.v1"


def resolve_vocab(cfg: Config) -> Tokenizer:
    """Build the configured tokenizer and fill model.vocab_size from it (0 = take the tokenizer's), or fail
    if the model's vocabulary is smaller than the tokenizer's. The masked-LM objectives add [CLS], [SEP], [MASK]
    and [PAD] where the tokenizer has none (engine/data/special_tokens.py)."""
    tokenizer = tokenizer_for_objective(cfg.data.tokenizer, cfg.train.objective)
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = tokenizer.vocab_size
    elif tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's vocabulary "
                          f"({tokenizer.vocab_size}, data.tokenizer={cfg.data.tokenizer!r})")
    return tokenizer


@dataclass
class StepResult:
    loss: float  # mean over the global batch
    lr: float
    grad_norm: float  # nan for an fp16 overflow (the norm is not computed) or a non-finite gradient
    skipped: bool  # no update: fp16 overflow, or a fault
    seconds: float
    fault: Optional[str] = None  # why the step was skipped as a fault (engine/train/faults.py)
    busy_seconds: float = 0.0  # data + forward/backward on this rank, before it waits for the others
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)  # mlm objectives: mlm_acc, nsp_loss ...


def _loader(dataset, sampler: PretrainingSampler) -> Iterator[dict]:
    # Samples are memory-mapped windows: a worker-less DataLoader only stacks them.
    return iter(DataLoader(dataset, batch_sampler=sampler, num_workers=0))


def _sync_mean(values: list[float], group, device: torch.device) -> float:
    """Mean of `values` over this rank and the ranks of `group` (e.g. data-parallel replicas)."""
    t = torch.tensor([sum(values), len(values)], dtype=torch.float64, device=device)
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(t, group=group)
    return float(t[0] / t[1])


class Trainer:
    """One run's state and step. `cfg` must be validated; `pstate` describes this rank."""

    def __init__(self, cfg: Config, pstate: ParallelState, tokenizer: Optional[Tokenizer] = None,
                 watchdog: Optional[Watchdog] = None, start: tuple[int, int] = (0, 0)) -> None:
        """start: (iteration, consumed samples) the run starts at (engine/train/start.py): the datasets are
        built for the samples it draws from there to train.iters."""
        self.cfg, self.pstate = cfg, pstate
        self.watchdog = watchdog
        t = cfg.train
        self.faults = FaultMonitor(t.max_bad_steps, t.bad_step_window, t.loss_spike_zscore, t.loss_spike_window)
        seed_parallel_rng(t.seed, pstate)  # default stream per pp stage + a per-tp-rank stream for dropout
        self.tokenizer = tokenizer or resolve_vocab(cfg)  # it fixes the vocabulary the model is built for
        self.out_dir = Path(t.out_dir)
        t_build = time.perf_counter()
        self.built: Built = build(cfg, pstate)
        self.build_seconds = time.perf_counter() - t_build  # model + optimizer: the run's accounting (loop.py)
        self.scaler = DynamicLossScaler(cfg.precision.initial_loss_scale, cfg.precision.loss_scale_window,
                                        cfg.precision.hysteresis, cfg.precision.min_loss_scale) \
            if cfg.precision.dtype == "fp16" else None
        self.n_micro = t.global_batch_size // (t.micro_batch_size * pstate.dp)
        self.iteration, self.consumed_samples = int(start[0]), int(start[1])
        t_data = time.perf_counter()
        self._build_data()
        self.data_build_seconds = time.perf_counter() - t_data
        self.timer = StepTimer(pstate.device)  # off; `tessera bench throughput` enables it (engine/train/timing.py)
        self._fused = cfg.model.fused_ops
        self._stats: list[torch.Tensor] = []  # per-micro-batch objective statistics of the running step
        self.eval_metrics: dict[str, dict[str, float]] = {}  # the last evaluation's, per validation set

    # ------------------------------------------------------------ data
    def _build_data(self) -> None:
        cfg, pstate, t = self.cfg, self.pstate, self.cfg.train
        # = iters * G for a run from scratch or its resume; a continued run with its data position kept
        # (checkpoint.reset_data=false) draws on from where its source stopped
        train_samples = self.consumed_samples + (t.iters - self.iteration) * t.global_batch_size
        eval_runs = (t.iters // t.eval_interval + 1) if t.eval_interval else 0
        valid_samples = t.eval_iters * t.global_batch_size if eval_runs else 0
        cache_dir = Path(cfg.data.cache_dir) if cfg.data.cache_dir else self.out_dir / "data_cache"
        barrier = (lambda: dist.barrier()) if pstate.is_distributed else (lambda: None)
        self.train_set, self.valid_sets = build_datasets(cfg, self.tokenizer, max(train_samples, 1), valid_samples,
                                                         cache_dir, is_builder=pstate.is_rank0, barrier=barrier,
                                                         verify_token_ids=cfg.data.verify_token_ids)
        self.total_samples = max(train_samples, t.global_batch_size)  # the datasets' length follows from it
        self.reopen_data()

    def reopen_data(self) -> None:
        """(Re)start the training data at `consumed_samples` (after a resume)."""
        t = self.cfg.train
        sampler = PretrainingSampler(self.total_samples, self.consumed_samples, t.micro_batch_size,
                                     self.pstate.dp_rank, self.pstate.dp, global_batch_size=t.global_batch_size)
        self._train_iter = _loader(self.train_set, sampler)

    def _next_batches(self) -> list[dict[str, torch.Tensor]]:
        return [split_batch(next(self._train_iter), self.pstate.device) for _ in range(self.n_micro)]

    # ------------------------------------------------------------ helpers
    @property
    def chunks(self):
        return self.built.chunks

    @property
    def model(self):
        """The first model chunk (the whole model at pp = 1)."""
        return self.built.chunks[0]

    @property
    def optimizer(self):
        return self.built.optimizer

    @functools.cached_property
    def canonical_shapes(self) -> dict[str, tuple[int, ...]]:
        """{canonical name: global shape} of the WHOLE model (every stage), in parameter order."""
        return {n: s.global_shape for n, s in canonical_specs(self.cfg.model, self.pstate).items()}

    def _autocast(self) -> Any:
        return autocast(self.cfg.precision.dtype, self.pstate.device)

    def _loss_fn(self, out: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The objective's loss of one micro-batch from the last stage's output (train.objective)."""
        if self.cfg.train.objective == "causal":
            return lm_loss(out, batch["targets"], self.cfg.model.vocab_size, batch.get("loss_mask"),
                           fused=self._fused, pstate=self.pstate)
        loss, stats = pretraining_loss(out, batch, self.cfg.model.vocab_size, self.cfg.train.nsp_weight,
                                       fused=self._fused, pstate=self.pstate)
        self._stats.append(stats)  # summed per step by _objective_metrics
        return loss

    def _objective_metrics(self) -> dict[str, float]:
        """The masked-LM / next-sentence metrics of the micro-batches since the last call, over the global batch
        (summed over data-parallel ranks; only the last pipeline stage computes them: summed over pp too)."""
        stats, self._stats = self._stats, []
        if self.cfg.train.objective == "causal":
            return {}
        total = torch.stack(stats).sum(0) if stats else torch.zeros(len(PRETRAIN_STATS), dtype=torch.float64,
                                                                      device=self.pstate.device)
        for group, size in ((self.pstate.dp_group, self.pstate.dp), (self.pstate.pp_group, self.pstate.pp)):
            if size > 1:
                dist.all_reduce(total, group=group)
        return pretraining_metrics(total)

    def count_parameters(self) -> int:
        """Parameters of the whole canonical model (collective: every rank calls it)."""
        r = self.pstate.tp_rank
        n = sum(s.canonical_numel_held(r) for s in self.built.specs.values() if s.counts_once(r))
        if self.pstate.is_distributed:
            t = torch.tensor([n], dtype=torch.float64, device=self.pstate.device)
            dist.all_reduce(t, group=self.pstate.mp_group)
            n = int(t.item())
        return n

    # ------------------------------------------------------------ the step
    def _forward_backward(self, batches: list[dict[str, torch.Tensor]], scale: float) -> list[float]:
        """The ONE place that dispatches on pipeline parallelism for training."""
        b, p, t = self.built, self.cfg.parallel, self.cfg.train
        if self.pstate.pp > 1:
            return forward_backward_pipeline(
                b.chunks, batches, self.pstate, schedule=p.schedule, loss_fn=self._loss_fn, seq_len=self.cfg.seq_len,
                micro_batch_size=t.micro_batch_size, d_model=self.cfg.model.d_model, autocast=self._autocast,
                loss_scale=scale, ddp=b.ddp, lap=self.timer.lap)
        return forward_backward(b.forward, batches, self.cfg.model.vocab_size, self._autocast, loss_scale=scale,
                                no_sync=b.ddp.no_sync, fused=self._fused, pstate=self.pstate, loss_fn=self._loss_fn,
                                lap=self.timer.lap)

    def _beat(self, step: int, phase: str) -> None:
        if self.watchdog is not None:
            self.watchdog.beat(step, phase)

    def _idle(self, phase: str) -> None:
        if self.watchdog is not None:
            self.watchdog.idle(phase)

    def train_step(self) -> StepResult:
        """One optimizer step over one global batch. A step whose loss or gradient norm is not finite, or
        whose loss spikes, is skipped (no update) and counted (engine/train/faults.py): every rank decides
        alike, from the global loss and norm, with no extra device sync."""
        t0 = time.perf_counter()
        self.timer.begin()  # the phase breakdown: no-ops unless a benchmark enabled it
        b, o = self.built, self.cfg.optim
        step = self.iteration + 1
        lr = lr_at(self.iteration, o, self.cfg.train.iters)
        b.optimizer.set_lr(lr)
        b.ddp.zero_grad()
        if b.fp8 is not None:
            b.fp8.begin_step()  # weights changed in the last step: cast them once for this step's micro-batches
        scale = self.scaler.scale if self.scaler else 1.0
        self.timer.lap("other")
        self._beat(step, "data loading")
        batches = self._next_batches()
        self.timer.lap("data")
        self._beat(step, "forward/backward")
        losses = self._forward_backward(batches, scale)
        busy = time.perf_counter() - t0  # this rank's own work; waiting for slower ranks comes after
        self._beat(step, "gradient reduction")
        complete_grads(b.chunks, b.specs, self.pstate, b.ddp, b.tied)  # tied copies, dp mean, tp sums
        if b.fp8 is not None:
            b.fp8.update(self.pstate)  # delayed scaling: this step's amaxes (max over tp, dp) -> next scales
        loss = _sync_mean(losses, self.pstate.dp_group, self.pstate.device)  # the global-batch loss, every rank
        metrics = self._objective_metrics()
        self.timer.lap("communication")
        verdict = self.faults.check_loss(loss)
        overflow = False
        if self.scaler is not None:  # fp16: an overflow is the loss scaler's business, not a fault
            overflow = all_reduce_max(float(unscale_and_check(b.optimizer.local_grads(), scale)), self.pstate) > 0
            self.scaler.update(overflow)
        grad_norm = float("nan")
        if not overflow:
            self._beat(step, "gradient norm")
            grad_norm = b.optimizer.clip_grad_norm(o.grad_clip)  # norm over tp, pp and dp shards, once each
            if not verdict.bad:
                verdict = self.faults.check_grad_norm(grad_norm)
            if not verdict.bad:
                self._beat(step, "optimizer step")
                b.optimizer.step()
        self.timer.lap("optimizer")
        self.iteration += 1
        self.consumed_samples += self.cfg.train.global_batch_size
        if self.pstate.device.type == "cuda":
            torch.cuda.synchronize(self.pstate.device)
        self._idle("between steps")  # logging, evaluation and saving come next
        self.faults.record(step, loss, verdict)  # raises NumericalFault after too many bad steps
        self.timer.end()
        return StepResult(loss, lr, grad_norm, overflow or verdict.bad, time.perf_counter() - t0, verdict.reason,
                          busy, metrics)

    def rank_step_times(self, mean_seconds: float) -> list[float]:
        """Every rank's mean busy time per step (collective over the world; straggler detection at log
        intervals). Busy, not wall: in synchronous training every rank's wall time waits for the slowest."""
        t = torch.tensor([mean_seconds], dtype=torch.float64, device=self.pstate.device)
        if not self.pstate.is_distributed:
            return [mean_seconds]
        out = torch.zeros(self.pstate.world_size, dtype=torch.float64, device=self.pstate.device)
        all_gather_flat(out, t)
        return out.tolist()

    # ------------------------------------------------------------ evaluation
    def _forward_only(self, batches: list[dict[str, torch.Tensor]]) -> list[float]:
        """The ONE place that dispatches on pipeline parallelism for evaluation."""
        b, t = self.built, self.cfg.train
        if self.pstate.pp > 1:
            return forward_only_pipeline(b.chunks, batches, self.pstate, loss_fn=self._loss_fn,
                                         seq_len=self.cfg.seq_len, micro_batch_size=t.micro_batch_size,
                                         d_model=self.cfg.model.d_model, autocast=self._autocast)
        # the chunk itself: with train.compile its blocks run eagerly in eval mode (engine/train/build.py
        # wrap_blocks), so evaluation compiles nothing for its no_grad forwards
        return forward_only(b.chunks[0], batches, self.cfg.model.vocab_size, self._autocast, fused=self._fused,
                            pstate=self.pstate, loss_fn=self._loss_fn)

    def evaluate(self) -> dict[str, float]:
        """Mean loss over the first `eval_iters` global batches of each validation set (the same batches
        every time; Megatron's convention: global batches, so the value does not depend on the dp size)."""
        self._idle("evaluation")  # its length is the user's (eval_iters): not watched
        if self.built.fp8 is not None:
            self.built.fp8.begin_step()  # the weights were updated since the last cast
        for c in self.chunks:
            c.eval()
        out = {}
        self.eval_metrics = {}  # {set: mlm_acc, nsp_loss ...} (mlm objectives)
        t = self.cfg.train
        for name, ds in self.valid_sets.items():
            n = min(t.eval_iters, len(ds) // t.global_batch_size) * self.n_micro  # micro-batches on this rank
            if n == 0:
                continue
            total = n // self.n_micro * t.global_batch_size
            sampler = PretrainingSampler(total, 0, t.micro_batch_size, self.pstate.dp_rank, self.pstate.dp,
                                         global_batch_size=t.global_batch_size)
            it = _loader(ds, sampler)
            batches = [split_batch(next(it), self.pstate.device) for _ in range(n)]
            self._stats = []
            out[name] = _sync_mean(self._forward_only(batches), self.pstate.dp_group, self.pstate.device)
            self.eval_metrics[name] = self._objective_metrics()
        for c in self.chunks:
            c.train()
        return out

    def close(self) -> None:
        """Release what ties this run to its process groups: the data-parallel grad hooks are bound methods
        held by the parameters' C++ side, a cycle gc cannot free, which would keep the wrapper, the
        ParallelState and every group (and its gloo threads) alive until interpreter shutdown."""
        remove = getattr(self.built.ddp, "remove_hooks", None)
        if remove is not None:
            remove()

    # ------------------------------------------------------------ weights
    def save_weights(self, path: Path) -> Optional[Path]:
        """model.safetensors with canonical names from this layout (collective; the file is written by rank 0)."""
        return save_weights(path, self.chunks, self.cfg.model, self.pstate, layout=self.cfg.parallel.pp_layout)

    # ------------------------------------------------------------ state
    def rng_state(self) -> dict:
        """This rank's generator states: torch, CUDA, numpy, python, the tp tracker's streams."""
        st = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
              "tracker": self.pstate.rng_tracker.get_states() if self.pstate.rng_tracker is not None else {}}
        if torch.cuda.is_available():
            st["cuda"] = torch.cuda.get_rng_state_all()
        return st

    def set_rng_state(self, st: dict) -> None:
        torch.set_rng_state(st["torch"])
        np.random.set_state(st["numpy"])
        random.setstate(st["python"])
        if self.pstate.rng_tracker is not None and st.get("tracker"):
            self.pstate.rng_tracker.set_states(st["tracker"])
        if "cuda" in st and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(st["cuda"])

    def state_dict(self) -> dict:
        """This rank's part of everything a resume needs (see the module docstring). Model tensors are this
        rank's parameters under their names, with their specs alongside (canonical name, global shape,
        split), so a checkpoint writer can place them in the canonical tensors."""
        b = self.built
        return {
            "format": STATE_FORMAT,
            "iteration": self.iteration,
            "consumed_samples": self.consumed_samples,
            "consumed_per_dataset": self.train_set.samples_drawn(self.consumed_samples),
            "schedule": {"iteration": self.iteration, "total_iters": self.cfg.train.iters},
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "faults": self.faults.state_dict(),
            "rng": {"rank": self.pstate.rank, **self.rng_state()},
            "model": {n: q.detach().clone() for c in b.chunks for n, q in c.named_parameters()},
            "specs": dict(b.specs),
            "optimizer": b.optimizer.state_dict(),
            "fp8": b.fp8.state_dict() if b.fp8 is not None else {},
        }

    @torch.no_grad()
    def load_state_dict(self, sd: dict) -> None:
        """Restore a state taken by `state_dict` on the same layout and rank."""
        if sd.get("format") != STATE_FORMAT:
            raise ValueError(f"trainer state: expected format {STATE_FORMAT!r}, found {sd.get('format')!r}")
        if sd["rng"]["rank"] != self.pstate.rank:
            raise ValueError(f"trainer state of rank {sd['rng']['rank']} cannot be loaded on rank {self.pstate.rank}")
        params = {n: q for c in self.chunks for n, q in c.named_parameters()}
        if set(sd["model"]) != set(params):
            raise ValueError(f"trainer state holds other parameters: missing {sorted(set(params) - set(sd['model']))[:5]}, "
                             f"unexpected {sorted(set(sd['model']) - set(params))[:5]}")
        for n, q in params.items():
            if tuple(sd["model"][n].shape) != tuple(q.shape):
                raise ValueError(f"trainer state: {n} has shape {tuple(sd['model'][n].shape)}, expected {tuple(q.shape)}")
            q.copy_(sd["model"][n])
        self.built.optimizer.load_state_dict(sd["optimizer"])
        if self.built.fp8 is not None and sd.get("fp8"):
            self.built.fp8.load_state_dict(sd["fp8"])
        self.restore_progress(sd["iteration"], sd["consumed_samples"], sd["scaler"], sd["faults"], sd["rng"])

    def restore_progress(self, iteration: int, consumed_samples: int, scaler: Optional[dict], faults: dict,
                         rng: Optional[dict]) -> None:
        """Counters, loss scaler, fault monitor, the data position and (when given: same layout and rank)
        the RNG streams of a saved state: the part of a resume after the model and the optimizer."""
        if self.scaler is not None and scaler is not None:
            self.scaler.load_state_dict(scaler)
        self.faults.load_state_dict(faults)
        self.iteration = int(iteration)
        self.consumed_samples = int(consumed_samples)
        self.reopen_data()  # before the RNG: opening a DataLoader iterator draws from torch's generator
        if rng is not None:
            self.set_rng_state(rng)
