"""Where a run starts: a resume (checkpoint.load), prior weights (checkpoint.init_from: one of our checkpoints
in any layout, or hf:DIR) with the continued-pretraining switches, or scratch.

Planned before the Trainer exists (`plan_start`, reading only tessera.json or config.json): the iteration
and the data position the run starts at decide how many samples its datasets are built for, an hf:DIR
source sets the model's architecture, and the tokenizer the weights were trained with is compared with the
run's before anything is built or written. Carried out once the Trainer exists (`start_run`): every rank
reads its own cut.

The switches (checkpoint.reset_optimizer / reset_schedule / reset_data, start_iteration; defaults: weights
only, everything else fresh):
The model's architecture fields (sizes, norm, activation, position encoding and RoPE, biases, tying,
max_seq_len) come from the source -- its tessera.json, or config.json for hf:DIR; dropout, the attention
backend, fused ops and the vocabulary padding stay the run's.

- reset_optimizer=false: the optimizer moments and masters come from the checkpoint too (resharded to this
  layout like a resume); Adam's step counts with them.
- reset_schedule=false: the iteration counter, and with it the LR schedule, continues from the
  checkpoint's iteration; otherwise it starts at start_iteration (default 0).
- reset_data=false: the training data continues at the checkpoint's data position (consumed samples);
  the datasets must be the same, by name.
The RNG streams and the loss scaler always start fresh: only a resume restores them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Optional

from engine.checkpoint.files import StepDir, latest_step, resolve_checkpoint
from engine.checkpoint.meta import read_meta
from engine.config import Config, validate
from engine.convert.from_hf import HF_PREFIX, HFSource, hf_record
from engine.data.special_tokens import tokenizer_for_objective
from engine.data.tokenizers import build_tokenizer, tokenizer_record
from engine.data.tokenizer_extend import vocabulary_prefix_matches
from engine.errors import CheckpointError, ConfigError, TokenizerProblem
from engine.train.checkpointing import ARCH_FIELDS, check_tokenizer, load_checkpoint, load_hf_weights

__all__ = ["Origin", "StartPlan", "plan_start", "start_run"]


# model fields a start from prior weights takes from them (config.json for hf:DIR): what the tensors mean
ARCH_SOURCE_FIELDS = ARCH_FIELDS + ("norm_eps", "max_seq_len", "rope_theta", "rope_scaling", "rope_scaling_factor",
                                    "rope_low_freq_factor", "rope_high_freq_factor", "rope_original_max_seq_len")


@dataclass
class Origin:
    """What a run's checkpoints carry about where it started."""

    lineage: list[dict] = field(default_factory=list)
    hf: Optional[dict] = None  # the Hugging Face source of the weights (hf_record), for exports
    val_start: Optional[dict[str, float]] = None  # validation losses before the first update (val_delta)
    resumed: bool = False
    from_prior_weights: bool = False  # init_from (ours or hf:DIR), or a converted checkpoint


@dataclass
class StartPlan:
    kind: Literal["scratch", "resume", "init", "hf"]
    path: Optional[Path] = None  # the step directory of a resume or an init_from checkpoint
    meta: Optional[dict] = None  # its tessera.json
    hf: Optional[HFSource] = None
    iteration: int = 0  # where the run's iteration counter (and LR schedule) starts
    consumed_samples: int = 0  # where its training data starts
    old_vocab: Optional[int] = None  # the weights' vocabulary when the run's tokenizer grew it

    @property
    def start(self) -> tuple[int, int]:
        return self.iteration, self.consumed_samples


def _layout_text(layout: dict) -> str:
    return f"tp {layout.get('tp')}, pp {layout.get('pp')}, vpp {layout.get('vpp')}, dp {layout.get('dp')}, " \
           f"zero {layout.get('zero')}"


def plan_start(cfg: Config, log: Callable[[str], None] = lambda s: None) -> StartPlan:
    """Decide where the run starts (see the module docstring); may set cfg.model from an hf:DIR source.
    Reads, never writes."""
    ck = cfg.checkpoint
    path = None
    if ck.load == "auto":
        found = latest_step(Path(ck.dir))
        path = found.path if found is not None else None
        if path is None:
            log(f"tessera: checkpoint.load=auto: no checkpoint in {ck.dir} yet, starting "
                + ("from checkpoint.init_from" if ck.init_from else "from scratch"))
    elif ck.load is not None:
        path = resolve_checkpoint(ck.load, "checkpoint.load").path
    if path is not None:
        meta = read_meta(StepDir(path), "checkpoint.load")
        if meta.get("has_optimizer") is False:  # converted weights: a start from them, at step 0
            plan = StartPlan("resume", path, meta)
        else:
            plan = StartPlan("resume", path, meta, iteration=int(meta["iteration"]),
                             consumed_samples=int(meta["consumed_samples"]))
    elif ck.init_from is None:
        return StartPlan("scratch")
    elif ck.init_from.startswith(HF_PREFIX):
        src = HFSource.open(Path(ck.init_from[len(HF_PREFIX):]).expanduser(), "checkpoint.init_from")
        cfg.model = src.model_config(cfg.model)  # its config.json sets the architecture
        plan = StartPlan("hf", hf=src, iteration=ck.start_iteration or 0)
        if ck.new_token_init is not None:
            grown = tokenizer_for_objective(cfg.data.tokenizer, cfg.train.objective).vocab_size
            if grown > cfg.model.vocab_size:
                plan.old_vocab, cfg.model.vocab_size = cfg.model.vocab_size, grown
        _check_objective_fits(cfg)
        validate(cfg)
    else:
        step = resolve_checkpoint(ck.init_from, "checkpoint.init_from")
        meta = read_meta(step, "checkpoint.init_from")
        where = f"checkpoint.init_from {str(step.path)!r}"
        converted = meta.get("has_optimizer") is False
        if converted and not ck.reset_optimizer:
            raise ConfigError(f"checkpoint.reset_optimizer=false: {where} holds weights only (written by `convert "
                              f"from-hf`), no optimizer state; expected reset_optimizer=true")
        if converted and not ck.reset_data:
            raise ConfigError(f"checkpoint.reset_data=false: {where} holds weights only, no data position; "
                              f"expected reset_data=true")
        it = int(meta["iteration"]) if not ck.reset_schedule else (ck.start_iteration or 0)
        if not ck.reset_schedule and it >= cfg.train.iters:
            raise ConfigError(f"checkpoint.reset_schedule=false: {where} is at iteration {it}, expected "
                              f"train.iters above it (found {cfg.train.iters}): the run would have nothing to train")
        consumed = int(meta.get("consumed_samples") or 0) if not ck.reset_data else 0
        plan = StartPlan("init", step.path, meta, iteration=it, consumed_samples=consumed)
        saved_model = meta.get("config", {}).get("model", {})
        # as for hf:DIR, the source's architecture is the run's (the weights only fit that model)
        arch = {k: saved_model[k] for k in ARCH_SOURCE_FIELDS if k in saved_model}
        cfg.model = dataclasses.replace(cfg.model, preset=None, **arch)
        saved_vocab = int(saved_model.get("vocab_size") or 0)
        vocab = tokenizer_for_objective(cfg.data.tokenizer, cfg.train.objective).vocab_size
        if ck.new_token_init is not None and vocab > saved_vocab > 0:
            plan.old_vocab, cfg.model.vocab_size = saved_vocab, vocab
            if not ck.reset_optimizer:
                raise ConfigError(f"checkpoint.new_token_init with reset_optimizer=false: a grown vocabulary "
                                  f"({saved_vocab} -> {vocab}) starts with fresh optimizer state; expected "
                                  f"reset_optimizer=true")
        _check_objective_fits(cfg)
        validate(cfg)
    if plan.old_vocab is not None:
        _check_grown_tokenizer(plan, cfg)
    else:
        _check_tokenizer_early(plan, cfg)
    return plan


def _check_grown_tokenizer(plan: StartPlan, cfg: Config) -> None:
    """A grown vocabulary: the run's tokenizer must keep every id of the one the weights were trained with."""
    if plan.hf is not None:
        old_spec = HF_PREFIX + str(plan.hf.dir) if plan.hf.tokenizer_files() else None
    else:
        carried = plan.path / "tokenizer"
        rec = (plan.meta or {}).get("tokenizer") or {}
        kind = str(rec.get("spec", "")).partition(":")[0]
        old_spec = None
        if carried.is_dir() and kind == "hf":
            old_spec = HF_PREFIX + str(carried)
        elif carried.is_dir() and kind == "sentencepiece":
            models = sorted(carried.glob("*.model"))
            old_spec = f"sentencepiece:{models[0]}" if models else None
        elif kind == "byte":
            raise ConfigError("checkpoint.new_token_init: the weights were trained with the byte tokenizer, whose "
                              "vocabulary cannot grow; expected an hf: or sentencepiece: tokenizer")
    where = cfg.checkpoint.init_from
    if old_spec is None:
        raise ConfigError(f"checkpoint.new_token_init: {where!r} carries no tokenizer to check the grown one against "
                          f"(expected its tokenizer files); without it, ids could mean other tokens")
    old, new = build_tokenizer(old_spec), build_tokenizer(cfg.data.tokenizer)
    if not vocabulary_prefix_matches(old, new):
        raise TokenizerProblem(f"checkpoint.new_token_init: data.tokenizer={cfg.data.tokenizer!r} does not keep the ids "
                               f"of the tokenizer {where!r} was trained with ({old.vocab_size} tokens, end-of-document "
                               f"{old.eod_id}); grow it with `tessera tokenizer extend`, which appends new ids")


def _check_objective_fits(cfg: Config) -> None:
    """The prior weights fixed the architecture (model.encoder, model.binary_head): say so when the objective
    does not fit it, instead of asking for a model field the run cannot change."""
    m, objective, src = cfg.model, cfg.train.objective, cfg.checkpoint.init_from
    if m.encoder and m.binary_head and objective == "mlm":
        raise ConfigError(f"train.objective=mlm: checkpoint.init_from {src!r} has a next-sentence head "
                          f"(model.binary_head=true, taken from it) that masked-LM alone would leave untrained; "
                          f"expected train.objective=mlm+nsp (train.nsp_weight weighs it)")
    if m.encoder != (objective != "causal"):
        raise ConfigError(f"train.objective={objective}: checkpoint.init_from {src!r} holds "
                          f"{'an encoder' if m.encoder else 'a decoder'} (model.encoder={str(m.encoder).lower()}, "
                          f"taken from it); expected train.objective "
                          f"{'mlm or mlm+nsp' if m.encoder else 'causal'}")


def _check_tokenizer_early(plan: StartPlan, cfg: Config) -> None:
    """The weights' tokenizer against the run's, before the tokenizer fills the vocabulary or data is built."""
    if plan.hf is not None:
        if not plan.hf.tokenizer_files():
            return
        recorded = tokenizer_record(tokenizer_for_objective(HF_PREFIX + str(plan.hf.dir), cfg.train.objective))
        where = f"checkpoint.init_from {cfg.checkpoint.init_from!r}"
    else:
        recorded = (plan.meta or {}).get("tokenizer")
        where = f"{'checkpoint.load' if plan.kind == 'resume' else 'checkpoint.init_from'} {str(plan.path)!r}"
    if recorded:
        check_tokenizer(recorded, tokenizer_for_objective(cfg.data.tokenizer, cfg.train.objective), where)


def start_run(trainer, plan: StartPlan, log: Callable[[str], None]) -> Origin:
    """Load what the plan says into the Trainer (collective). Returns what the run's checkpoints carry about
    where it started."""
    ck = trainer.cfg.checkpoint
    if plan.kind == "scratch":
        return Origin()
    if plan.kind == "resume":
        meta = load_checkpoint(trainer, plan.path)
        log(f"tessera: resumed from {plan.path} at step {trainer.iteration} (saved at "
            f"{_layout_text(meta['layout'])})")
        if meta.get("train_samples") not in (None, trainer.total_samples):
            log(f"tessera: note: the saved run was built for {meta['train_samples']:,} training samples, this one for "
                f"{trainer.total_samples:,} (train.iters or the batch size changed): the sample order from here on may "
                f"differ from the one the saved run would have seen")
        lineage = list(meta.get("lineage", [])) + [{"kind": "resume", "path": str(plan.path),
                                                     "iteration": trainer.iteration}]
        converted = meta.get("has_optimizer") is False  # a start from converted weights, not a resume
        return Origin(lineage, meta.get("hf"), meta.get("val_start"), resumed=not converted,
                      from_prior_weights=converted)
    if plan.kind == "hf":
        load_hf_weights(trainer, plan.hf, old_vocab=plan.old_vocab)
        log(f"tessera: weights from the Hugging Face model {plan.hf.dir} ({plan.hf.arch}); fresh optimizer and data "
            f"position, schedule from step {plan.iteration}")
        return Origin([{"kind": "init_from", "path": ck.init_from, "iteration": 0}], hf_record(plan.hf),
                      from_prior_weights=True)
    meta = plan.meta
    if not ck.reset_data:
        _check_same_data(trainer, meta, plan.path)
    load_checkpoint(trainer, plan.path, weights_only=True, what="checkpoint.init_from",
                    optimizer=not ck.reset_optimizer, old_vocab=plan.old_vocab)
    if plan.old_vocab is not None:
        log(f"tessera: vocabulary grown from {plan.old_vocab} to {trainer.cfg.model.vocab_size} tokens (new rows: "
            f"{ck.new_token_init})")
    kept = [name for name, keep in (("optimizer state", not ck.reset_optimizer), ("schedule", not ck.reset_schedule),
                                    ("data position", not ck.reset_data)) if keep]
    fresh = [name for name, keep in (("optimizer", ck.reset_optimizer), ("schedule", ck.reset_schedule),
                                     ("data position", ck.reset_data)) if keep]
    log(f"tessera: weights from {plan.path} (step {meta['iteration']})"
        + (f", its {', '.join(kept)}" if kept else "") + (f"; fresh {', '.join(fresh)}" if fresh else "")
        + f"; starting at step {plan.iteration}")
    entry = {"kind": "init_from", "path": str(plan.path), "iteration": int(meta["iteration"])}
    # what was taken besides the weights, when anything was (the defaults keep the entry short)
    entry.update({k: False for k in ("reset_optimizer", "reset_schedule", "reset_data") if not getattr(ck, k)})
    entry.update({k: v for k, v in (("start_iteration", plan.iteration),
                                    ("start_consumed_samples", plan.consumed_samples)) if v})
    lineage = list(meta.get("lineage", [])) + [entry]
    return Origin(lineage, meta.get("hf"), from_prior_weights=True)


def _check_same_data(trainer, meta: dict, path: Path) -> None:
    saved = sorted((meta.get("consumed_per_dataset") or {}).keys())
    here = sorted(trainer.train_set.samples_drawn(0).keys())
    if saved != here:
        raise CheckpointError(f"checkpoint.reset_data=false: the data position of {str(path)!r} is one in the datasets "
                              f"{saved}, this run trains on {here}; expected the same datasets (by name), or "
                              f"reset_data=true")
