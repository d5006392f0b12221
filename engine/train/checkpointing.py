"""A Trainer's state in a checkpoint, and back, at any layout.

What is saved (engine/checkpoint/ writes it; see docs/checkpointing.md):
- DCP tensors by canonical name, each rank writing the boxes it holds (engine/checkpoint/dcp_io.py):
  `model/<name>` (the parameters), `optim/exp_avg/<name>`, `optim/exp_avg_sq/<name>`, `optim/master/<name>`
  (only where the fp32 master is a separate copy), `optim/step/<name>` (a 0-d count);
- per-rank keys (DCP merges equal keys of different ranks silently): `rng/rank00005/torch`, `.../cuda<i>`,
  `.../tracker/<stream>`, `.../state` (numpy and python generator states as JSON bytes);
- FP8 scaling state by canonical module name (precision.fp8 with the delayed recipe):
  `fp8/<module>/<input|grad_output>/<amax_history|scale|steps>`. Every rank holding a layer holds the same
  values (amaxes are reduced over tp and dp), so one key per layer is right at any layout;
- tessera.json (rank 0): iteration, consumed samples in total and per dataset, LR schedule position,
  loss scaler, fault monitor, the layout it was saved with, the resolved config, the engine version and
  the lineage (the checkpoints this run started from).

Loading validates everything first (format, engine, model, every tensor's presence and shape, the shard
files), then reads into this rank's own cut, whatever layout saved it. RNG streams are restored when the
layout is the same (an exact resume); at another layout there is no matching stream to restore, so
dropout masks differ from the uninterrupted run (documented).
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from engine import __version__
from engine.checkpoint.dcp_io import Pieces, check_files, read_metadata, read_pieces, tensor_infos
from engine.checkpoint.files import StepDir, resolve_checkpoint
from engine.checkpoint.meta import FORMAT, read_meta
from engine.convert.hf_files import tokenizer_files
from engine.data.tokenizers import tokenizer_record
from engine.errors import CheckpointError, TokenizerProblem
from engine.parallel.sharding import box_view
from engine.train.vocab_extension import VOCAB_TENSORS, extend_rows

__all__ = ["FORMAT", "ARCH_FIELDS", "check_tokenizer", "checkpoint_files", "checkpoint_meta", "load_checkpoint",
           "load_hf_weights", "read_meta", "trainer_checkpoint_state"]

# model fields that change what the tensors mean: a checkpoint must agree on them (shapes are checked too)
ARCH_FIELDS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_hidden", "norm",
               "activation", "position", "tie_embeddings", "bias", "qkv_bias", "encoder", "type_vocab_size",
               "norm_position", "embed_norm", "binary_head")
_KEYS = {"param": "model", "exp_avg": "optim/exp_avg", "exp_avg_sq": "optim/exp_avg_sq", "master": "optim/master"}


def _rank_prefix(rank: int) -> str:
    return f"rng/rank{rank:05d}"


def _json_tensor(obj: Any) -> torch.Tensor:
    return torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8).clone()


def _rng_tensors(trainer) -> dict[str, torch.Tensor]:
    """This rank's generator states (`Trainer.rng_state`) under per-rank keys: tensors as they are, the numpy
    and python states as JSON bytes."""
    p = _rank_prefix(trainer.pstate.rank)
    st = trainer.rng_state()
    np_state, py_state = st["numpy"], st["python"]
    small = {"numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
             "python": [py_state[0], list(py_state[1]), py_state[2]]}
    out = {f"{p}/torch": st["torch"], f"{p}/state": _json_tensor(small)}
    out.update({f"{p}/tracker/{k}": v.cpu() for k, v in st["tracker"].items()})
    out.update({f"{p}/cuda{i}": v for i, v in enumerate(st.get("cuda", ()))})
    return out


def _rng_state(rank: int, rng: dict[str, torch.Tensor]) -> dict:
    """`_rng_tensors` read back -> the dict `Trainer.set_rng_state` takes."""
    p = _rank_prefix(rank)
    small = json.loads(bytes(rng[f"{p}/state"].tolist()).decode())
    n, py = small["numpy"], small["python"]
    st = {"torch": rng[f"{p}/torch"], "numpy": (n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]),
          "python": (py[0], tuple(py[1]), py[2]),
          "tracker": {k.split("/tracker/", 1)[1]: v for k, v in rng.items() if "/tracker/" in k}}
    cuda = sorted((k for k in rng if k.startswith(f"{p}/cuda")), key=lambda k: int(k.rsplit("cuda", 1)[1]))
    if cuda:
        st["cuda"] = [rng[k] for k in cuda]
    return st


def _layout(trainer) -> dict:
    ps, p = trainer.pstate, trainer.cfg.parallel
    return {"tp": ps.tp, "pp": ps.pp, "vpp": ps.vpp, "dp": ps.dp, "zero": p.zero, "world_size": ps.world_size,
            "sequence_parallel": p.sequence_parallel, "pp_layout": p.pp_layout}


def trainer_checkpoint_state(trainer) -> tuple[Pieces, dict[str, torch.Tensor]]:
    """(the canonical pieces this rank writes, its plain tensors) for a save of the whole Trainer."""
    opt = trainer.optimizer
    opt.init_state()  # a checkpoint before the first step still holds (zero) moments
    pieces = Pieces()
    for sp in opt.state_views(holders_only=True):
        spec_shape = trainer.canonical_shapes[sp.name]
        pieces.add(f"{_KEYS[sp.key]}/{sp.name}", spec_shape, sp.box, sp.value)
    tensors = {f"optim/step/{n}": torch.tensor(s, dtype=torch.float64) for n, s in opt.steps().items()}
    tensors.update(_rng_tensors(trainer))
    tensors.update(_fp8_tensors(trainer))
    return pieces, tensors


_FP8 = "fp8/"


def _fp8_tensors(trainer) -> dict[str, torch.Tensor]:
    fp8 = trainer.built.fp8
    return {} if fp8 is None else {_FP8 + k: v.cpu() for k, v in fp8.state_dict().items()}


def _fp8_to_read(trainer, step: StepDir, infos: dict) -> dict[str, torch.Tensor]:
    """Buffers for this rank's FP8 state in the checkpoint ({} when FP8 is off or keeps no state here). A
    checkpoint saved without it (FP8 was off, or another recipe) starts the scales fresh, as a new run would."""
    fp8 = trainer.built.fp8
    if fp8 is None:
        return {}
    want = {_FP8 + k: v for k, v in fp8.state_shapes().items()}
    if not want or not any(k in infos for k in want):
        return {}
    missing = sorted(k for k in want if k not in infos)
    wrong = [f"{k} {infos[k].shape} (expected {s})" for k, (s, _) in sorted(want.items())
             if k in infos and tuple(infos[k].shape) != s]
    if missing or wrong:
        found = (["missing " + ", ".join(missing[:3])] if missing else []) + wrong[:3]
        raise CheckpointError(f"checkpoint {str(step.path)!r}: its FP8 state does not match this run's "
                              f"precision.fp8 ({'; '.join(found)})")
    return {k: torch.zeros(s, dtype=dt) for k, (s, dt) in want.items()}


def checkpoint_meta(trainer, lineage: list[dict], hf: Optional[dict] = None,
                    val_start: Optional[dict] = None) -> dict:
    """tessera.json of a save of the Trainer now (rank 0). `hf`: the Hugging Face source the weights came
    from (engine/convert/from_hf.py: hf_record), carried so that an export writes its config back;
    `val_start`: the run's validation losses before its first update (the baseline of val_delta)."""
    cfg = trainer.cfg
    return {
        "tokenizer": tokenizer_record(trainer.tokenizer), "hf": hf, "val_start": val_start,
        "format": FORMAT, "engine": __version__,
        "saved_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "iteration": trainer.iteration, "consumed_samples": trainer.consumed_samples,
        "consumed_per_dataset": trainer.train_set.samples_drawn(trainer.consumed_samples),
        "train_samples": trainer.total_samples,
        "schedule": {"iteration": trainer.iteration, "total_iters": cfg.train.iters},
        "scaler": trainer.scaler.state_dict() if trainer.scaler is not None else None,
        "faults": trainer.faults.state_dict(),
        "layout": _layout(trainer),
        "config": cfg.to_dict(),
        "has_optimizer": True,
        "lineage": lineage,
    }


def _check_model(step: StepDir, meta: dict, model_cfg, old_vocab: Optional[int] = None) -> None:
    saved = meta.get("config", {}).get("model", {})
    here = {k: getattr(model_cfg, k) for k in ARCH_FIELDS}
    if old_vocab is not None:  # a grown vocabulary: the checkpoint has the old one
        here["vocab_size"] = old_vocab
    diff = [f"{k}: checkpoint {saved.get(k)!r}, here {v!r}" for k, v in here.items()
            if k in saved and saved[k] != v and not (k == "qkv_bias" and saved[k] is None)]
    if diff:
        hint = ("; a grown tokenizer needs checkpoint.new_token_init" if any(d.startswith("vocab_size") for d in diff)
                and saved.get("vocab_size", 0) < model_cfg.vocab_size else "")
        raise CheckpointError(f"checkpoint {str(step.path)!r} holds another model ({'; '.join(diff[:6])}){hint}")


def _check_tensors(step: StepDir, infos: dict, want: dict[str, tuple[int, ...]], what: str) -> None:
    missing = sorted(n for n in want if n not in infos)
    wrong = [f"{n} {infos[n].shape} (expected {want[n]})" for n in sorted(want)
             if n in infos and infos[n].shape != tuple(want[n])]
    if missing or wrong:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} {what} tensor(s): {', '.join(missing[:5])}"
                         + (" ..." if len(missing) > 5 else ""))
        if wrong:
            parts.append(f"other shapes: {'; '.join(wrong[:5])}" + (" ..." if len(wrong) > 5 else ""))
        raise CheckpointError(f"checkpoint {str(step.path)!r} does not match this model: {'; '.join(parts)}")


def _unexpected(infos: dict, want: dict) -> list[str]:
    return sorted(n for n in infos if n.startswith("model/") and n not in want)


@torch.no_grad()
def load_checkpoint(trainer, path: str | Path, weights_only: bool = False, what: str = "checkpoint.load",
                    optimizer: Optional[bool] = None, old_vocab: Optional[int] = None) -> dict:
    """Load a checkpoint into `trainer` (collective: every rank). `weights_only`: the model only, nothing of
    the run's progress (`init_from`); `optimizer` (default: not weights_only) also reads the optimizer state
    (`init_from` with reset_optimizer=false). `old_vocab`: the checkpoint's vocabulary when this model's was
    grown (weights only; engine/train/vocab_extension.py). Returns the checkpoint's tessera.json. Validates
    before it changes anything."""
    step = resolve_checkpoint(path, what)
    meta = read_meta(step, what)
    _check_model(step, meta, trainer.cfg.model, old_vocab)
    if old_vocab is None:  # a grown tokenizer was checked against the old one when the run was planned
        check_tokenizer(meta.get("tokenizer"), trainer.tokenizer, f"{what} {str(step.path)!r}")
    optimizer = (not weights_only) if optimizer is None else optimizer
    if meta.get("has_optimizer") is False:  # converted weights (convert from-hf): a fresh start from them
        if optimizer and weights_only:
            raise CheckpointError(f"{what} {str(step.path)!r} holds weights only (written by `convert from-hf`): "
                                  f"no optimizer state to take; expected checkpoint.reset_optimizer=true")
        weights_only, optimizer = True, False
    md = read_metadata(step.path)
    infos = tensor_infos(md)
    shapes = dict(trainer.canonical_shapes)
    grown = {n: s for n, s in shapes.items() if n in VOCAB_TENSORS} if old_vocab is not None else {}
    if grown and optimizer:
        raise CheckpointError(f"{what} {str(step.path)!r}: a grown vocabulary starts with fresh optimizer state; "
                              f"expected checkpoint.reset_optimizer=true")
    shapes.update({n: (old_vocab,) + tuple(s[1:]) for n, s in grown.items()})  # as saved
    want = {f"model/{n}": s for n, s in shapes.items()}
    if optimizer:
        want.update({f"optim/{k}/{n}": s for n, s in shapes.items() for k in ("exp_avg", "exp_avg_sq")})
    _check_tensors(step, infos, want, "model/optimizer" if optimizer else "model")
    extra = _unexpected(infos, want)
    if extra:
        raise CheckpointError(f"checkpoint {str(step.path)!r} does not match this model: unexpected tensor(s) "
                              f"{', '.join(extra[:5])}" + (" ..." if len(extra) > 5 else ""))
    check_files(step.path, md)

    opt = trainer.optimizer
    opt.init_state()
    keys = ("param", "exp_avg", "exp_avg_sq", "master") if optimizer else ("param",)
    pieces = Pieces()
    masters = False
    views = opt.state_views(keys=keys, holders_only=False)
    for sp in views:
        fqn = f"{_KEYS[sp.key]}/{sp.name}"
        if sp.name in grown:  # read whole below, then grown
            continue
        if sp.key == "master":
            if fqn not in infos:  # saved where params were fp32: the parameter is the master
                continue
            masters = True
        pieces.add(fqn, shapes[sp.name], sp.box, sp.value)
    tensors: dict[str, torch.Tensor] = {}
    steps_t: dict[str, torch.Tensor] = {}
    if optimizer:
        for n in opt.steps(holders_only=False):
            key = f"optim/step/{n}"
            if key in infos:
                steps_t[n] = tensors[key] = torch.zeros((), dtype=torch.float64)
    same_layout = meta.get("layout") == _layout(trainer)
    rng: dict[str, torch.Tensor] = {}
    if not weights_only and same_layout:
        prefix = _rank_prefix(trainer.pstate.rank) + "/"
        for n, info in infos.items():
            if n.startswith(prefix):
                rng[n] = tensors[n] = torch.zeros(info.shape, dtype=info.dtype)
    fp8 = {} if weights_only else _fp8_to_read(trainer, step, infos)
    tensors.update(fp8)
    old_rows = {}
    for n in grown:  # every rank reads the whole old tensor: the new rows are drawn from all of it
        old_rows[n] = torch.empty(shapes[n], dtype=infos[f"model/{n}"].dtype)
        pieces.add(f"model/{n}", shapes[n], ((0,) * len(shapes[n]), shapes[n]), old_rows[n])
    read_pieces(step.path, pieces, tensors)  # tied copies read their canonical tensor (state_views)
    _fill_grown(trainer, views, old_rows, grown)
    opt.finish_load({n: float(t) for n, t in steps_t.items()}, params_loaded=True, masters_loaded=masters)
    if weights_only:
        return meta
    if fp8:
        trainer.built.fp8.load_state_dict({k[len(_FP8):]: v for k, v in fp8.items()})
    trainer.restore_progress(meta["iteration"], meta["consumed_samples"], meta.get("scaler"), meta["faults"],
                             _rng_state(trainer.pstate.rank, rng) if rng else None)
    return meta


def check_tokenizer(recorded: Optional[dict], tokenizer, where: str) -> None:
    """The weights were trained with `recorded` (a tokenizer_record): a run tokenizing its data differently
    would train garbage, so a different tokenizer is an error (none recorded: nothing to check)."""
    if not recorded:
        return
    here = tokenizer_record(tokenizer)
    if recorded.get("fingerprint") == here["fingerprint"]:
        return
    raise TokenizerProblem(
        f"{where}: its tokenizer ({recorded.get('spec')!r}, vocabulary {recorded.get('vocab_size')}, fingerprint "
        f"{recorded.get('fingerprint')}) is not this run's data.tokenizer ({here['spec']!r}, vocabulary "
        f"{here['vocab_size']}, fingerprint {here['fingerprint']}); train with the tokenizer the weights were trained "
        f"with (a checkpoint from `convert from-hf` carries it in its tokenizer/ folder)"
        + ("; for a tokenizer grown by `tessera tokenizer extend`, set checkpoint.new_token_init"
           if here["vocab_size"] > int(recorded.get("vocab_size") or 0) else ""))


def checkpoint_files(tokenizer) -> dict[str, Path]:
    """Files every checkpoint carries besides its tensors: the tokenizer's, under tokenizer/."""
    path = getattr(tokenizer, "path", None)
    if path is None:
        return {}
    if tokenizer.spec.startswith("hf:"):
        return {f"tokenizer/{p.name}": p for p in tokenizer_files(Path(path))}
    return {f"tokenizer/{Path(path).name}": Path(path)}


def _fill_grown(trainer, views, old_rows: dict[str, torch.Tensor], grown: dict[str, tuple]) -> None:
    """Copy each rank's box of the grown vocabulary tensors (old rows + new ones, the same on every rank)."""
    ck, seed = trainer.cfg.checkpoint, trainer.cfg.train.seed
    for i, (n, shape) in enumerate(sorted(grown.items())):
        full = extend_rows(old_rows[n], shape[0], ck.new_token_init, seed + i)
        for sp in views:
            if sp.name == n:
                sp.value.copy_(box_view(full, sp.box))


@torch.no_grad()
def load_hf_weights(trainer, src, old_vocab: Optional[int] = None) -> None:
    """Fill the Trainer's parameters (every rank its own cut, any layout) from a Hugging Face source
    (engine/convert/from_hf.py: HFSource), one canonical tensor at a time; fresh optimizer state.
    `old_vocab`: the source's vocabulary when this model's was grown."""
    shapes = dict(trainer.canonical_shapes)
    grown = {n: s for n, s in shapes.items() if n in VOCAB_TENSORS} if old_vocab is not None else {}
    shapes.update({n: (old_vocab,) + tuple(s[1:]) for n, s in grown.items()})
    wrong = [f"{n} {src.shapes.get(n)} (model {s})" for n, s in shapes.items() if src.shapes.get(n) != tuple(s)]
    if wrong:
        raise CheckpointError(f"checkpoint.init_from hf:{src.dir}: does not match this model: {'; '.join(wrong[:5])}")
    opt = trainer.optimizer
    opt.init_state()
    views = opt.state_views(keys=("param",), holders_only=False)
    for sp in views:
        if sp.name not in grown:
            sp.value.copy_(box_view(src.canonical(sp.name), sp.box))
    _fill_grown(trainer, views, {n: src.canonical(n).clone() for n in grown}, grown)
    opt.finish_load({}, params_loaded=True, masters_loaded=False)
