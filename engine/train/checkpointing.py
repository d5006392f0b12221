"""A Trainer's state in a checkpoint, and back, at any layout.

What is saved (engine/checkpoint/ writes it; see docs/checkpointing.md):
- DCP tensors by canonical name, each rank writing the boxes it holds (engine/checkpoint/dcp_io.py):
  `model/<name>` (the parameters), `optim/exp_avg/<name>`, `optim/exp_avg_sq/<name>`, `optim/master/<name>`
  (only where the fp32 master is a separate copy), `optim/step/<name>` (a 0-d count);
- per-rank keys (DCP merges equal keys of different ranks silently): `rng/rank00005/torch`, `.../cuda<i>`,
  `.../tracker/<stream>`, `.../state` (numpy and python generator states as JSON bytes);
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
from typing import Any

import numpy as np
import torch

from engine import __version__
from engine.checkpoint.dcp_io import Pieces, check_files, read_metadata, read_pieces, tensor_infos
from engine.checkpoint.files import StepDir, resolve_checkpoint
from engine.checkpoint.meta import FORMAT, read_meta
from engine.errors import CheckpointError

__all__ = ["FORMAT", "ARCH_FIELDS", "checkpoint_meta", "load_checkpoint", "read_meta", "trainer_checkpoint_state"]

# model fields that change what the tensors mean: a checkpoint must agree on them (shapes are checked too)
ARCH_FIELDS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_hidden", "norm",
               "activation", "position", "tie_embeddings", "bias", "qkv_bias")
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
    return pieces, tensors


def checkpoint_meta(trainer, lineage: list[dict]) -> dict:
    """tessera.json of a save of the Trainer now (rank 0)."""
    cfg = trainer.cfg
    return {
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


def _check_model(step: StepDir, meta: dict, model_cfg) -> None:
    saved = meta.get("config", {}).get("model", {})
    here = {k: getattr(model_cfg, k) for k in ARCH_FIELDS}
    diff = [f"{k}: checkpoint {saved.get(k)!r}, here {v!r}" for k, v in here.items()
            if k in saved and saved[k] != v and not (k == "qkv_bias" and saved[k] is None)]
    if diff:
        raise CheckpointError(f"checkpoint {str(step.path)!r} holds another model ({'; '.join(diff[:6])})")


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
def load_checkpoint(trainer, path: str | Path, weights_only: bool = False, what: str = "checkpoint.load") -> dict:
    """Load a checkpoint into `trainer` (collective: every rank). `weights_only`: the model only (fresh
    optimizer, schedule and data position: `init_from`). Returns the checkpoint's tessera.json.
    Validates before it changes anything."""
    step = resolve_checkpoint(path, what)
    meta = read_meta(step, what)
    _check_model(step, meta, trainer.cfg.model)
    md = read_metadata(step.path)
    infos = tensor_infos(md)
    shapes = trainer.canonical_shapes
    want = {f"model/{n}": s for n, s in shapes.items()}
    if not weights_only:
        want.update({f"optim/{k}/{n}": s for n, s in shapes.items() for k in ("exp_avg", "exp_avg_sq")})
    _check_tensors(step, infos, want, "model" if weights_only else "model/optimizer")
    extra = _unexpected(infos, want)
    if extra:
        raise CheckpointError(f"checkpoint {str(step.path)!r} does not match this model: unexpected tensor(s) "
                              f"{', '.join(extra[:5])}" + (" ..." if len(extra) > 5 else ""))
    check_files(step.path, md)

    opt = trainer.optimizer
    opt.init_state()
    keys = ("param",) if weights_only else ("param", "exp_avg", "exp_avg_sq", "master")
    pieces = Pieces()
    masters = False
    for sp in opt.state_views(keys=keys, holders_only=False):
        fqn = f"{_KEYS[sp.key]}/{sp.name}"
        if sp.key == "master":
            if fqn not in infos:  # saved where params were fp32: the parameter is the master
                continue
            masters = True
        pieces.add(fqn, shapes[sp.name], sp.box, sp.value)
    tensors: dict[str, torch.Tensor] = {}
    steps_t: dict[str, torch.Tensor] = {}
    if not weights_only:
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
    read_pieces(step.path, pieces, tensors)  # tied copies read their canonical tensor (state_views)
    opt.finish_load({n: float(t) for n, t in steps_t.items()}, params_loaded=True, masters_loaded=masters)
    if weights_only:
        return meta
    trainer.restore_progress(meta["iteration"], meta["consumed_samples"], meta.get("scaler"), meta["faults"],
                             _rng_state(trainer.pstate.rank, rng) if rng else None)
    return meta
