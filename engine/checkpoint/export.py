"""Consolidated weights from a sharded checkpoint, in one process: `tessera checkpoint export` and
`tessera generate CHECKPOINT`.

A checkpoint holds the canonical model tensors as DCP chunks cut by whatever layout saved it
(`model/<canonical name>`, global shapes with the real vocabulary). `ModelCheckpoint` opens one, checks
that its tensors are exactly those of the model its own config describes (names and shapes, before
anything is read), and yields the full canonical tensors in the model's parameter order, a batch of at
most ~1 GiB (or one larger tensor) at a time: DCP reads each chunk straight into its place, so memory
stays bounded by the largest tensor, whatever the model's size, and no process group is needed.

`export_checkpoint` streams them into `OUT/model.safetensors` (the same format and order as the
`model.safetensors` a run writes at its end, engine/checkpoint/weights.py) next to the checkpoint's
resolved `config.yaml`, so OUT is what `tessera generate` and `load_weights` read. The file is written
under a temporary name, fsynced and renamed, so a crash never leaves a half-written model.safetensors.
OUT must be new, empty, or an earlier export (it holds `.tessera-export`): a directory holding anything
else is refused, and nothing that is not ours is ever overwritten.
"""

from __future__ import annotations

import datetime
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from engine import __version__
from engine.checkpoint.dcp_io import Pieces, TensorInfo, check_files, read_metadata, read_pieces, tensor_infos
from engine.checkpoint.files import LATEST, META, StepDir, fsync_dir, resolve_checkpoint, write_atomic
from engine.checkpoint.weights import ST_DTYPES, canonical_specs, remove_stale_temporaries, safetensors_header
from engine.config import Config, config_from_dict
from engine.errors import CheckpointError, ConfigError, RunDirError
from engine.parallel.state import ParallelState
from engine.checkpoint.meta import read_meta

__all__ = ["DTYPES", "EXPORT_MARKER", "Exported", "ModelCheckpoint", "batches", "check_export_dir",
           "export_checkpoint", "is_checkpoint_path"]

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
EXPORT_MARKER = ".tessera-export"
_FILES = ("model.safetensors", "config.yaml")
_TMP_RE = re.compile(r"^\.(model\.safetensors|config\.yaml|\.tessera-export)\.tmp\d+$")  # ours, mid-write
_BATCH_BYTES = 1 << 30


def is_checkpoint_path(path: str | os.PathLike) -> bool:
    """Whether a user's path means a checkpoint rather than a run directory: a step directory (tessera.json,
    a DCP index or a step-NNNNNNN name) or a checkpoint root (`latest`, or step-NNNNNNN/ directories)."""
    p = Path(path)
    if not p.is_dir():
        return False
    if (p / META).exists() or (p / ".metadata").exists() or StepDir(p).step >= 0:
        return True
    return (p / LATEST).exists() or (p / ".tessera-checkpoints").exists() or any(
        StepDir(c).step >= 0 and c.is_dir() for c in p.iterdir())


def batches(items: list, nbytes: Callable[[object], int], limit: int) -> Iterator[list]:
    """Consecutive items in lists of at most `limit` bytes (one larger item alone)."""
    batch: list = []
    size = 0
    for n in items:
        if batch and size + nbytes(n) > limit:
            yield batch
            batch, size = [], 0
        batch.append(n)
        size += nbytes(n)
    if batch:
        yield batch


@dataclass
class ModelCheckpoint:
    """The model part of one complete checkpoint, checked against its own config (see the module docstring)."""

    step: StepDir
    meta: dict
    config: Config
    names: list[str]  # canonical names in the model's parameter order
    infos: dict[str, TensorInfo]  # by canonical name (no `model/` prefix)

    @classmethod
    def open(cls, path: str | os.PathLike, what: str = "checkpoint") -> "ModelCheckpoint":
        """A step directory, or a checkpoint root (the one `latest` names). Refuses an incomplete one."""
        step = resolve_checkpoint(path, what)
        meta = read_meta(step)
        try:
            cfg = config_from_dict(meta.get("config"))
        except ConfigError as e:
            raise CheckpointError(f"{what} {str(step.path)!r}: the config in its {META} is not valid for tessera "
                                  f"{__version__} ({e})") from None
        md = read_metadata(step.path)
        saved = {n[len("model/"):]: i for n, i in tensor_infos(md).items() if n.startswith("model/")}
        specs = canonical_specs(cfg.model, ParallelState.single())
        want = {n: s.global_shape for n, s in specs.items()}
        _check_tensors(step, what, saved, want)
        check_files(step.path, md)
        return cls(step, meta, cfg, list(want), {n: saved[n] for n in want})

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Full CPU tensors (as saved) of these canonical names, in one DCP read."""
        pieces, out = Pieces(), {}
        for n in names:
            info = self.infos[n]
            out[n] = torch.empty(info.shape, dtype=info.dtype)
            pieces.add(f"model/{n}", info.shape, ((0,) * len(info.shape), info.shape), out[n])
        read_pieces(self.step.path, pieces, {})
        return out

    def tensors(self, batch_bytes: int = _BATCH_BYTES) -> Iterator[tuple[str, torch.Tensor]]:
        """(canonical name, full CPU tensor as saved) in parameter order, read `batch_bytes` at a time."""
        for batch in batches(self.names, lambda n: self.infos[n].nbytes, batch_bytes):
            out = self.read(batch)
            for n in batch:  # only the caller holds a tensor once it has been yielded
                yield n, out.pop(n)

    @torch.no_grad()
    def load_into(self, model: torch.nn.Module) -> None:
        """Fill a one-process model built from this checkpoint's config, as `load_weights` does from a file:
        vocabulary padding rows get zeros, a tied copy reads its canonical tensor."""
        specs = model.shard_specs()
        targets: dict[str, list] = {}
        for pname, p in model.named_parameters():
            spec = specs[pname]
            targets.setdefault(spec.tied_to or spec.name, []).append((p, spec))
        missing = sorted(set(targets) - set(self.names))
        if missing:
            raise CheckpointError(f"checkpoint {str(self.step.path)!r} does not match this model: missing "
                                  f"{', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
        tp_rank = model.pstate.tp_rank
        for name, canon in self.tensors():
            for p, spec in targets.get(name, ()):
                p.copy_(spec.shard_canonical(canon.to(p.dtype), tp_rank).to(p.device))


def _check_tensors(step: StepDir, what: str, saved: dict[str, TensorInfo], want: dict[str, tuple]) -> None:
    missing = [n for n in want if n not in saved]
    unexpected = sorted(n for n in saved if n not in want)
    wrong = [f"{n} {saved[n].shape} (expected {want[n]})" for n in want if n in saved and saved[n].shape != want[n]]
    odd = [f"{n} {saved[n].dtype}" for n in want if n in saved and saved[n].dtype not in ST_DTYPES]
    parts = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("other shapes:", wrong),
                         ("unsupported dtypes:", odd)):
        if items:
            parts.append(f"{label} {', '.join(items[:5])}" + (" ..." if len(items) > 5 else ""))
    if parts:
        raise CheckpointError(f"{what} {str(step.path)!r}: its model/ tensors do not match the model its config "
                              f"describes ({'; '.join(parts)})")


def _header(ck: ModelCheckpoint, dtypes: dict[str, torch.dtype]) -> tuple[bytes, int]:
    """The safetensors header (8-byte length + JSON, padded to 8 bytes) and the data size that follows."""
    metadata = {"format": "pt", "producer": "tessera", "vocab_size": str(ck.config.model.vocab_size),
                "checkpoint": str(ck.step.path), "iteration": str(ck.meta.get("iteration"))}
    return safetensors_header([(n, dtypes[n], ck.infos[n].shape) for n in ck.names], metadata)


def _parse_dtype(dtype: Optional[str | torch.dtype]) -> Optional[torch.dtype]:
    if dtype is None or (isinstance(dtype, torch.dtype) and dtype in DTYPES.values()):
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ConfigError(f"export dtype: expected one of {', '.join(DTYPES)}, found {dtype!r}")


def check_export_dir(out: Path, step: StepDir, owned: Callable[[str], bool],
                     mid_write: Callable[[str], bool] = lambda name: False) -> bool:
    """Raise RunDirError if an export of `step` may not write into `out`: it must be new, empty, or an earlier
    export (it holds EXPORT_MARKER and only files `owned` by that kind of export; `mid_write` names are an
    export's own temporaries, ignored), outside the checkpoint root, and writable. True if it holds an earlier
    export's files. Reads only."""
    if out.exists() and not out.is_dir():
        raise RunDirError(f"export directory {str(out)!r}: expected a directory, found a file")
    root = step.path.parent
    if (root / LATEST).exists() or (root / ".tessera-checkpoints").exists():
        inside = out.resolve()
        if inside == root.resolve() or root.resolve() in inside.parents:
            raise RunDirError(f"export directory {str(out)!r} is inside the checkpoint root {str(root)!r} (a run "
                              f"saving there refuses other files); choose a directory outside it")
    if not out.is_dir():
        return False
    entries = {p.name for p in out.iterdir() if not mid_write(p.name)}
    ours = EXPORT_MARKER in entries
    foreign = sorted(e for e in entries if not (ours and (e == EXPORT_MARKER or owned(e))))
    if foreign:
        shown = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
        kind = "an export directory that also holds other files" if ours else "a directory with other files"
        raise RunDirError(f"export directory {str(out)!r}: expected a new, empty or Tessera export directory, found "
                          f"{kind} ({shown}); choose another directory")
    if not os.access(out, os.W_OK | os.X_OK):
        raise RunDirError(f"export directory {str(out)!r}: the directory is not writable")
    return ours and any(owned(e) for e in entries)


@dataclass(frozen=True)
class Exported:
    """What `export_checkpoint` wrote."""

    weights: Path
    config: Path
    source: Path  # the step directory
    iteration: int
    tensors: int
    nbytes: int  # of tensor data in the file
    replaced: bool  # an earlier export in the directory was replaced


def export_checkpoint(path: str | os.PathLike, out_dir: str | os.PathLike,
                      dtype: Optional[str | torch.dtype] = None) -> Exported:
    """Write `out_dir/model.safetensors` (the checkpoint's canonical model tensors, optionally cast to
    bf16 / fp16 / fp32) and `out_dir/config.yaml` (its resolved config). Everything is checked before
    anything is written; see the module docstring."""
    want = _parse_dtype(dtype)
    ck = ModelCheckpoint.open(path, "checkpoint")
    out = Path(out_dir)
    replaced = check_export_dir(out, ck.step, owned=lambda name: name in _FILES,
                                mid_write=lambda name: bool(_TMP_RE.match(name)))
    out.mkdir(parents=True, exist_ok=True)
    if not (out / EXPORT_MARKER).is_file():  # first: a crash leaves a directory we recognise as ours
        write_atomic(out / EXPORT_MARKER, json.dumps({"engine": __version__, "created": datetime.datetime.now(
            datetime.timezone.utc).isoformat(timespec="seconds")}).encode())
    target = out / "model.safetensors"
    remove_stale_temporaries(target)
    dtypes = {n: want or ck.infos[n].dtype for n in ck.names}
    header, size = _header(ck, dtypes)
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(header)
            for n, t in ck.tensors():
                f.write(t.to(dtypes[n]).contiguous().reshape(-1).view(torch.uint8).numpy().data)
            if f.tell() != len(header) + size:
                raise CheckpointError(f"export of {str(ck.step.path)!r}: wrote {f.tell() - len(header)} bytes of "
                                      f"tensor data, the header promised {size}")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    remove_stale_temporaries(out / "config.yaml")
    write_atomic(out / "config.yaml", ck.config.to_yaml().encode())
    fsync_dir(out)
    return Exported(target, out / "config.yaml", ck.step.path, int(ck.meta.get("iteration", -1)), len(ck.names),
                    size, replaced)
