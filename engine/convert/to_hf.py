"""Tessera checkpoint -> Hugging Face directory: `tessera convert to-hf`.

From a checkpoint of any layout (DCP reads each canonical tensor whole, whatever cut saved it), in one
process and tensor by tensor: the Hugging Face tensors are planned from the checkpoint's index first
(names, shapes, shards of at most --shard-size), then each is assembled from its canonical tensors (GPT-2's
c_attn from q, k, v; Conv1D transposed), cast and appended to its shard. Memory stays at one read batch
(at most 256 MiB, or one larger tensor) plus one tensor.

Written next to the weights: config.json (the Hugging Face source's own, recorded in the checkpoint, when
the model still is that model; else a fresh one, engine/convert/hf_config.py), generation_config.json (for
an encoder only the source's, if it had one), and the tokenizer files the checkpoint carries. The real vocabulary only (padding is never saved); a
tied head is not written (transformers ties it back).
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from engine import __version__
from engine.checkpoint.export import DTYPES, EXPORT_MARKER, ModelCheckpoint, batches, check_export_dir
from engine.convert.hf_config import ARCHITECTURES, arch_of_model, hf_config_from_model
from engine.convert.hf_files import INDEX, SINGLE, TOKENIZER_FILES, parse_size, tokenizer_files, write_json, \
    write_shards
from engine.convert.hf_names import Group, groups, hf_shape, ours_to_hf
from engine.errors import ConversionError

__all__ = ["Converted", "convert_to_hf"]

_HF_DTYPE = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
_READ_BATCH = 256 * 2 ** 20
_OURS = {SINGLE, INDEX, "config.json", "generation_config.json", EXPORT_MARKER, *TOKENIZER_FILES}


@dataclass(frozen=True)
class Converted:
    out: Path
    architecture: str
    files: list[str]
    tensors: int
    nbytes: int
    dtype: torch.dtype


def _ours(name: str) -> bool:
    """The files an earlier Hugging Face export of ours holds (replaced), its shards' temporaries included."""
    return name in _OURS or name.startswith(("model-", ".model"))


def _dtype(name: Optional[str], hf: Optional[dict]) -> torch.dtype:
    if name is not None:
        if name not in DTYPES:
            raise ConversionError(f"--dtype: expected one of {', '.join(DTYPES)}, found {name!r}")
        return DTYPES[name]
    src = (hf or {}).get("config", {})
    recorded = src.get("torch_dtype") or src.get("dtype")
    return {v: k for k, v in _HF_DTYPE.items()}.get(recorded, torch.bfloat16)


def _produce(ck: ModelCheckpoint, gs: list[Group], dtype: torch.dtype) -> Callable[[], Iterator]:
    def run() -> Iterator[tuple[str, torch.Tensor]]:
        size = lambda g: sum(ck.infos[n].nbytes for n in g.ours)  # noqa: E731
        for batch in batches(gs, size, _READ_BATCH):
            names = list(dict.fromkeys(n for g in batch for n in g.ours))  # an alias group repeats a name
            last = {n: i for i, g in enumerate(batch) for n in g.ours}
            parts = ck.read(names)
            for i, g in enumerate(batch):
                yield g.hf, ours_to_hf(g, {n: parts[n].to(dtype) for n in g.ours})
                for n in g.ours:  # each part is dropped after its last use
                    if last[n] == i:
                        del parts[n]
    return run


def convert_to_hf(path: str | os.PathLike, out_dir: str | os.PathLike, dtype: Optional[str] = None,
                  shard_size: str | int = "5GB", log: Callable[[str], None] = print) -> Converted:
    """Write the checkpoint at `path` as a Hugging Face model directory `out_dir` (see the module docstring).
    dtype: bf16 | fp16 | fp32 (default: the Hugging Face source's dtype, else bf16)."""
    ck = ModelCheckpoint.open(path, "checkpoint")
    out = Path(out_dir)
    check_export_dir(out, ck.step, owned=_ours)
    shard_bytes = parse_size(shard_size)
    hf = ck.meta.get("hf")
    m = ck.config.model
    arch = arch_of_model(m)
    if hf and ARCHITECTURES.get(hf.get("architecture")) == "mistral" and arch == "llama":
        arch = "mistral"  # same tensors; keep the source's class
    dt = _dtype(dtype, hf)
    tok = ck.meta.get("tokenizer") or {}
    if m.encoder:  # BERT's config names the padding id (its embedding's padding_idx), not an end of text
        ids = {"pad_token_id": _pad_id(_tokenizer_sources(ck))}
    else:
        ids = {"eos_token_id": tok.get("eod_id")} if tok else None
    config = hf_config_from_model(m, _HF_DTYPE[dt], base=(hf or {}).get("config"), token_ids=ids)
    gs = groups(arch, m)
    shapes = {n: ck.infos[n].shape for n in ck.names}
    specs = [(g.hf, dt, hf_shape(g, shapes)) for g in gs]
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / EXPORT_MARKER, {"engine": __version__, "source": str(ck.step.path), "created":
                                     datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")})
    earlier = [p for p in [out / SINGLE, out / INDEX, *out.glob("model-*-of-*.safetensors")] if p.exists()]
    (out / INDEX).unlink(missing_ok=True)  # until the new one is written, the directory has no valid index
    plan, total = write_shards(out, specs, _produce(ck, gs, dt), shard_bytes, {"format": "pt"})
    for old in earlier:  # an earlier export's files that the new one did not replace
        if old.name not in plan.files and old.name != INDEX:
            old.unlink(missing_ok=True)
    write_json(out / "config.json", config)
    gen = (hf or {}).get("generation_config") or (None if m.encoder else _generation_config(config))
    if gen is not None:  # an encoder generates nothing: only a recorded one is written back
        write_json(out / "generation_config.json", gen)
    else:
        (out / "generation_config.json").unlink(missing_ok=True)  # an earlier export's
    for f in _tokenizer_sources(ck):
        shutil.copy2(f, out / f.name)
    log(f"tessera: {ck.step.path} -> {out} ({config['architectures'][0]}, {len(specs)} tensors in "
        f"{len(plan.files)} file(s), {total / 2 ** 30:.2f} GiB {_HF_DTYPE[dt]})")
    return Converted(out, config["architectures"][0], plan.files, len(specs), total, dt)


def _generation_config(config: dict) -> dict:
    out = {"_from_model_config": True}
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if config.get(k) is not None:
            out[k] = config[k]
    return out


def _pad_id(files: list[Path]) -> Optional[int]:
    """The [PAD] id of a BERT tokenizer among the carried files (tokenizer_config.json's pad_token, else
    "[PAD]"), or None (the config then keeps BertConfig's default, 0)."""
    tj = next((f for f in files if f.name == "tokenizer.json"), None)
    if tj is None:
        return None
    pad = "[PAD]"
    try:
        conf = json.loads((tj.parent / "tokenizer_config.json").read_text())
        named = conf.get("pad_token")
        pad = (named.get("content") if isinstance(named, dict) else named) or pad
    except (OSError, ValueError, AttributeError):
        pass
    try:
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(tj)).token_to_id(pad)
    except Exception:  # noqa: BLE001 - an unreadable tokenizer.json only loses the optional pad id
        return None


def _tokenizer_sources(ck: ModelCheckpoint) -> list[Path]:
    """The tokenizer files the checkpoint carries (tokenizer/), else those its config's hf: tokenizer names."""
    carried = ck.step.path / "tokenizer"
    if carried.is_dir():
        return tokenizer_files(carried)
    spec = ck.config.data.tokenizer
    if spec.startswith("hf:") and Path(spec[3:]).exists():
        return tokenizer_files(Path(spec[3:]))
    return []
