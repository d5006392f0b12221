"""Hugging Face model files: safetensors read one tensor at a time, and written as streamed shards.

Reading parses each file's header once and then reads exactly one tensor's bytes into a fresh tensor
(no memory map: a mapped file's touched pages count in the process's memory and would add up to the whole
model during a conversion). Files are either one `model.safetensors` or shards listed by
`model.safetensors.index.json`; a shard the index names but the directory lacks is an error naming it.

Writing plans the shards from the tensors' sizes first (each at most `shard_bytes`, one larger tensor alone),
writes each shard's header before its data, and streams the data tensor by tensor from the producer in
order: memory stays at one tensor. Shards are written under temporary names and renamed once complete, the
index last, so a directory with an index is whole.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from engine.checkpoint.files import write_atomic
from engine.checkpoint.weights import ST_DTYPES, safetensors_header
from engine.errors import ConversionError

__all__ = ["HFTensor", "HFWeights", "ShardPlan", "TOKENIZER_FILES", "parse_size", "plan_shards", "tokenizer_files",
           "write_json", "write_shards"]

_FROM_ST = {v: k for k, v in ST_DTYPES.items()}
_FROM_ST.update({"I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                 "BOOL": torch.bool})
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# tokenizer files carried from a Hugging Face directory into checkpoints and exports
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "vocab.txt", "added_tokens.json", "chat_template.jinja")


@dataclass(frozen=True)
class HFTensor:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int


def _header(path: Path) -> tuple[dict, int]:
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise ValueError("shorter than a safetensors header")
            (n,) = struct.unpack("<Q", head)
            if n > 100 * 2 ** 20 or n > path.stat().st_size - 8:
                raise ValueError(f"header length {n} does not fit the file")
            return json.loads(f.read(n)), 8 + n
    except FileNotFoundError:
        raise
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise ConversionError(f"{str(path)!r}: not a readable safetensors file ({e})") from None


class HFWeights:
    """The tensors of a Hugging Face model directory: names, dtypes, shapes; `read(name)` one at a time."""

    def __init__(self, hf_dir: str | Path) -> None:
        self.dir = Path(hf_dir)
        index, single = self.dir / INDEX, self.dir / SINGLE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise ConversionError(f"{str(index)!r}: expected a JSON object with a weight_map ({e})") from None
            files = sorted(set(weight_map.values()))
        elif single.is_file():
            files, weight_map = [SINGLE], None
        else:
            found = sorted(p.name for p in self.dir.iterdir())[:8] if self.dir.is_dir() else []
            bins = [f for f in found if f.endswith((".bin", ".pt", ".pth"))]
            hint = (" (pickled .bin weights are not read: save them as safetensors with transformers' "
                    "save_pretrained)" if bins else "")
            raise ConversionError(f"Hugging Face directory {str(self.dir)!r}: expected {SINGLE} or {INDEX}, found "
                                  f"{', '.join(found) or 'nothing'}{hint}")
        self.tensors: dict[str, HFTensor] = {}
        for name in files:
            path = self.dir / name
            if not path.is_file():
                raise ConversionError(f"Hugging Face directory {str(self.dir)!r}: shard {name!r} named by {INDEX} "
                                      f"is missing")
            header, base = _header(path)
            size = path.stat().st_size
            for tname, e in header.items():
                if tname == "__metadata__":
                    continue
                if e.get("dtype") not in _FROM_ST:
                    raise ConversionError(f"{str(path)!r}: tensor {tname!r} has dtype {e.get('dtype')!r} (expected "
                                          f"one of {', '.join(_FROM_ST)})")
                lo, hi = (base + int(x) for x in e["data_offsets"])
                shape = tuple(int(x) for x in e["shape"])
                dt = _FROM_ST[e["dtype"]]
                if hi > size or hi - lo != math.prod(shape) * torch.empty((), dtype=dt).element_size():
                    raise ConversionError(f"{str(path)!r}: tensor {tname!r} ({e['dtype']} {list(shape)}) does not fit "
                                          f"its byte range {e['data_offsets']} (file of {size} bytes: truncated?)")
                self.tensors[tname] = HFTensor(path, dt, shape, lo, hi)
        if weight_map is not None:
            lost = sorted(n for n, f in weight_map.items() if n not in self.tensors)
            if lost:
                raise ConversionError(f"{str(index)!r} lists {len(lost)} tensor(s) its shards do not hold: "
                                      f"{', '.join(lost[:5])}")

    def read(self, name: str) -> torch.Tensor:
        t = self.tensors[name]
        buf = torch.empty(t.end - t.start, dtype=torch.uint8)
        with open(t.file, "rb") as f:
            f.seek(t.start)
            got = f.readinto(memoryview(buf.numpy()))
        if got != t.end - t.start:
            raise ConversionError(f"{str(t.file)!r}: tensor {name!r} ends early (read {got} of {t.end - t.start} "
                                  f"bytes)")
        return buf.view(t.dtype).reshape(t.shape)

    def dtype(self) -> torch.dtype:
        """The dtype most of the weights have (the model's)."""
        counts: dict[torch.dtype, int] = {}
        for t in self.tensors.values():
            counts[t.dtype] = counts.get(t.dtype, 0) + (t.end - t.start)
        return max(counts, key=counts.get) if counts else torch.float32


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "tb": 10 ** 12,
          "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}


def parse_size(text: str | int) -> int:
    """"5GB" -> 5e9 bytes (decimal, as Hugging Face's max_shard_size), "500MiB" -> 500 * 2**20."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(str(text))
    if not m or float(m.group(1)) <= 0:
        raise ConversionError(f"--shard-size: expected a size like 5GB, 500MB or 2GiB, found {text!r}")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "B").lower()])


@dataclass(frozen=True)
class ShardPlan:
    files: list[str]
    names: list[list[str]]  # per file, in write order


def plan_shards(sizes: list[tuple[str, int]], shard_bytes: int) -> ShardPlan:
    """Consecutive tensors into files of at most shard_bytes (a larger tensor alone), named as transformers
    names them (model.safetensors when one file is enough)."""
    groups: list[list[str]] = [[]]
    used = 0
    for name, n in sizes:
        if groups[-1] and used + n > shard_bytes:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += n
    k = len(groups)
    files = [SINGLE] if k == 1 else [f"model-{i + 1:05d}-of-{k:05d}.safetensors" for i in range(k)]
    return ShardPlan(files, groups)


def write_shards(out: Path, specs: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 produce: Callable[[], Iterator[tuple[str, torch.Tensor]]], shard_bytes: int,
                 metadata: Optional[dict] = None) -> tuple[ShardPlan, int]:
    """Write tensors `specs` (name, dtype, shape; in this order) as safetensors shards in `out`, with their
    data from `produce()` (yielding the same names in the same order). Returns (plan, total bytes)."""
    nbytes = {n: math.prod(s) * torch.empty((), dtype=d).element_size() for n, d, s in specs}
    plan = plan_shards([(n, nbytes[n]) for n, _, _ in specs], shard_bytes)
    by_name = {n: (d, s) for n, d, s in specs}
    stream = produce()
    tmps: list[Path] = []
    total = 0
    try:
        for fname, names in zip(plan.files, plan.names):
            header, size = safetensors_header([(n, *by_name[n]) for n in names], metadata or {"format": "pt"})
            tmp = out / f".{fname}.tmp{os.getpid()}"
            tmps.append(tmp)
            with open(tmp, "wb") as f:
                f.write(header)
                for want in names:
                    name, t = next(stream)
                    if name != want or tuple(t.shape) != tuple(by_name[want][1]):
                        raise ConversionError(f"export: produced {name} {tuple(t.shape)}, planned {want} "
                                              f"{by_name[want][1]}")
                    f.write(t.to(by_name[want][0]).contiguous().reshape(-1).view(torch.uint8).numpy().data)
                if f.tell() != len(header) + size:
                    raise ConversionError(f"export: {fname} has {f.tell() - len(header)} data bytes, planned {size}")
                f.flush()
                os.fsync(f.fileno())
            total += size
        for tmp, fname in zip(tmps, plan.files):
            os.replace(tmp, out / fname)
        if len(plan.files) > 1:
            index = {"metadata": {"total_size": total},
                     "weight_map": {n: f for f, names in zip(plan.files, plan.names) for n in names}}
            write_json(out / INDEX, index)
    except BaseException:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)
        raise
    return plan, total


def write_json(path: Path, obj: dict) -> None:
    """A JSON file written atomically (temporary name, fsync, rename)."""
    write_atomic(path, (json.dumps(obj, indent=2) + "\n").encode())


def tokenizer_files(src: Path) -> list[Path]:
    """The tokenizer files present in a Hugging Face directory (or next to a tokenizer.json)."""
    d = src if src.is_dir() else src.parent
    return [d / n for n in TOKENIZER_FILES if (d / n).is_file()]
