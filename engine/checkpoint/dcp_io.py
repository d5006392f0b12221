"""Canonical tensors in torch.distributed.checkpoint (DCP), written and read as boxes.

A rank holds parts of canonical tensors that are not expressible as DTensor placements: tp blocks of a
fused weight ([q; k; v] cut per rank), a ZeRO-1 flat range that starts mid-row, vocabulary padding that is
never saved. So the save planner lists each part as a DCP chunk of the canonical tensor at its offsets
(`Pieces`: canonical name -> global shape + [(box, values)]), and the load planner asks DCP for the boxes a
rank needs, wherever they were saved. DCP then does the resharding: any saved cut can be read into any
other. Each rank writes only what it holds; nobody gathers a model.

Plain tensors (per-rank RNG streams under per-rank keys, replicated scalars) go through DCP's default
path. Nothing is unpickled as code: there are no byte items (the load planner refuses them outright),
tensors are read with `weights_only=True` by DCP, and DCP's pickled index (.metadata) is read by a
restricted unpickler that rebuilds only its record types (`SafeReader`).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import math
import os
import pickle
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, Metadata, MetadataIndex,
                                                   TensorProperties, TensorStorageMetadata)
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from engine.errors import CheckpointError
from engine.parallel.sharding import Box

__all__ = ["Deferred", "Pieces", "SafeReader", "TensorInfo", "check_files", "read_metadata", "read_pieces", "tensor_infos",
           "write_pieces"]


@dataclass(frozen=True)
class Deferred:
    """A piece whose values are produced only when DCP writes it (`make()`), so that a conversion holds one
    tensor at a time instead of the model: shape and dtype are known up front, for the plan."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    make: Callable[[], torch.Tensor]


@dataclass
class Pieces:
    """Parts of canonical tensors held by this rank: name -> (global shape, [(box, values shaped like the box)])."""

    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    boxes: dict[str, list[tuple[Box, torch.Tensor]]] = field(default_factory=dict)

    def add(self, name: str, global_shape: tuple[int, ...], box: Box, value: torch.Tensor) -> None:
        if tuple(value.shape) != tuple(box[1]):
            raise ValueError(f"{name}: a piece of shape {tuple(value.shape)} for box {box}")
        self.shapes[name] = tuple(global_shape)
        self.boxes.setdefault(name, []).append((box, value))

    def nbytes(self) -> int:
        return sum(math.prod(v.shape) * torch.empty((), dtype=v.dtype).element_size()
                   for bs in self.boxes.values() for _, v in bs)

    def to_host(self, cache: Optional[dict] = None) -> "Pieces":
        """A copy of every value in host memory (pinned when it comes from a GPU): an async save writes
        from this copy while training changes the originals. `cache` keeps the host buffers between saves
        (the next save reuses them once the previous write is done): allocating and first touching
        gigabytes of (pinned) memory costs more than the copy itself."""
        out = Pieces(dict(self.shapes), {})
        cuda = False
        for name, bs in self.boxes.items():
            staged = []
            for box, v in bs:
                key = (name, tuple(box[0]), tuple(box[1]), v.dtype)
                h = cache.get(key) if cache is not None else None
                if h is None:
                    h = torch.empty(v.shape, dtype=v.dtype, pin_memory=v.is_cuda)
                    if cache is not None:
                        cache[key] = h
                h.copy_(v, non_blocking=v.is_cuda)
                cuda = cuda or v.is_cuda
                staged.append((box, h))
            out.boxes[name] = staged
        if cuda:
            torch.cuda.synchronize()
        return out


class _SafeUnpickler(pickle.Unpickler):
    """DCP pickles its index (.metadata). Opening a checkpoint must not run code from it, so only the plain
    record types of that index may be rebuilt: DCP's metadata classes, torch.Size, dtypes, layouts, paths."""

    _MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem",
                "torch.distributed.checkpoint.planner")
    _OTHER = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
              ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath"),
              ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"),
              ("builtins", "slice"), ("torch", "strided"), ("torch", "contiguous_format")}

    def find_class(self, module: str, name: str) -> Any:
        obj = None
        if module in self._MODULES:
            mod = sys.modules.get(module) or importlib.import_module(module)
            cand = getattr(mod, name, None)
            if isinstance(cand, type) and cand.__module__ == module:  # a record/enum class defined there
                obj = cand
        elif module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout,
                                                                          torch.memory_format)):
            obj = getattr(torch, name)
        elif (module, name) in self._OTHER:
            obj = super().find_class(module, name)
        if obj is None:
            raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint index")
        return obj


class SafeReader(dcp.FileSystemReader):
    """DCP's file-system reader, with its index read by `_SafeUnpickler` instead of plain pickle."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        with open(Path(self.path) / ".metadata", "rb") as f:
            metadata = _SafeUnpickler(f).load()
        if not isinstance(metadata, Metadata):
            raise pickle.UnpicklingError(f"the index holds a {type(metadata).__name__}, not DCP metadata")
        if hasattr(self, "load_id"):
            from torch.distributed.checkpoint.metadata import StorageMeta

            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
        return metadata


def _index(name: str, box: Box) -> MetadataIndex:
    return MetadataIndex(name, torch.Size(box[0]))


class _PieceSavePlanner(DefaultSavePlanner):
    """DCP's default planner plus one SHARD write item per piece (chunk = the piece's box)."""

    def __init__(self, pieces: Pieces) -> None:
        super().__init__()
        self._pieces = pieces
        self._by_index = {(n, tuple(b[0])): v for n, bs in pieces.boxes.items() for b, v in bs}
        self._last_made: Optional[torch.Tensor] = None

    def create_local_plan(self):
        plan = super().create_local_plan()
        items = []
        for name, bs in self._pieces.boxes.items():
            size = torch.Size(self._pieces.shapes[name])
            for box, v in bs:
                chunk = ChunkStorageMetadata(offsets=torch.Size(box[0]), sizes=torch.Size(box[1]))
                props = TensorProperties(dtype=v.dtype) if isinstance(v, Deferred) else \
                    TensorProperties.create_from_tensor(v)
                items.append(WriteItem(index=_index(name, box), type=WriteItemType.SHARD,
                                       tensor_data=TensorWriteData(chunk=chunk, properties=props, size=size)))
        plan = dataclasses.replace(plan, items=list(plan.items) + items)
        self.plan = plan
        return plan

    def lookup_object(self, index: MetadataIndex) -> Any:
        key = (index.fqn, tuple(index.offset) if index.offset is not None else None)
        if key in self._by_index:
            v = self._by_index[key]
            if isinstance(v, Deferred):
                # DCP's serial loader (write_pieces forces it for deferred pieces) writes each item before it
                # asks for the next, but keeps a reference to every tensor until the file is closed: free the
                # previous piece's memory here, or a conversion would hold the whole model by its end.
                if self._last_made is not None:
                    self._last_made.untyped_storage().resize_(0)
                t = v.make()
                self._last_made = t
                if tuple(t.shape) != tuple(v.shape) or t.dtype != v.dtype:
                    raise CheckpointError(f"{index.fqn}: produced {t.dtype} {tuple(t.shape)} for a piece planned "
                                          f"as {v.dtype} {tuple(v.shape)}")
                return t
            return v
        return super().lookup_object(index)


class _PieceLoadPlanner(DefaultLoadPlanner):
    """DCP's default planner plus read items for the boxes each rank asks for."""

    def __init__(self, pieces: Pieces) -> None:
        super().__init__(allow_partial_load=False)
        self._pieces = pieces

    def create_local_plan(self):
        plan = super().create_local_plan()
        md = self.metadata.state_dict_metadata
        items = []
        for name, bs in self._pieces.boxes.items():
            chunks = [ChunkStorageMetadata(offsets=torch.Size(b[0]), sizes=torch.Size(b[1])) for b, _ in bs]
            items += create_read_items_for_chunk_list(name, md[name], chunks)
        plan = dataclasses.replace(plan, items=list(plan.items) + items)
        self.plan = plan
        return plan

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        bs = self._pieces.boxes.get(index.fqn)
        if bs is not None:
            return bs[index.index][1]  # the destination chunk (read items number them in list order)
        return super().lookup_tensor(index)

    def load_bytes(self, read_item, value) -> None:  # noqa: ANN001 - planner protocol
        raise CheckpointError(f"checkpoint entry {read_item.dest_index.fqn!r} is a pickled object; Tessera "
                              f"checkpoints hold tensors only and never unpickle")


# DCP warns on every single-process call that it assumes a single process: that is our intent
_SINGLE_PROCESS = r"torch\.distributed is disabled, unavailable or uninitialized"


def _group_args(fn, group: Optional[dist.ProcessGroup]) -> dict:
    if not (dist.is_available() and dist.is_initialized()):
        # older torch (< 2.5) has no `no_dist` argument and assumes one process without a group itself
        return {"no_dist": True} if "no_dist" in inspect.signature(fn).parameters else {}
    return {"process_group": group}


def write_pieces(path: Path, pieces: Pieces, tensors: dict[str, torch.Tensor],
                 group: Optional[dist.ProcessGroup] = None, thread_count: int = 1) -> None:
    """Write `pieces` and the plain `tensors` of every rank of `group` into `path` (collective over the
    group). Files are fsynced before this returns on any rank."""
    deferred = any(isinstance(v, Deferred) for bs in pieces.boxes.values() for _, v in bs)
    extra = {}
    if deferred:  # one thread, no copy-ahead: the serial loader the planner's freeing relies on
        thread_count = 1
        if "per_thread_copy_ahead" in inspect.signature(dcp.FileSystemWriter.__init__).parameters:
            extra["per_thread_copy_ahead"] = 0
    writer = dcp.FileSystemWriter(str(path), sync_files=True, thread_count=thread_count, **extra)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_SINGLE_PROCESS)
        dcp.save(dict(tensors), storage_writer=writer, planner=_PieceSavePlanner(pieces),
                 **_group_args(dcp.save, group))


def read_pieces(path: Path, pieces: Pieces, tensors: dict[str, torch.Tensor],
                group: Optional[dist.ProcessGroup] = None) -> None:
    """Fill every box of `pieces` and every plain tensor in `tensors` (in place) from `path` (collective)."""
    reader = SafeReader(str(path))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_SINGLE_PROCESS)
        dcp.load(tensors, storage_reader=reader, planner=_PieceLoadPlanner(pieces), **_group_args(dcp.load, group))


def read_metadata(path: Path) -> Metadata:
    try:
        return SafeReader(str(path)).read_metadata()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {str(path)!r}: its index (.metadata) is missing") from None
    except Exception as e:  # noqa: BLE001 - a torn or foreign file: report it, whatever the reader raised
        raise CheckpointError(f"checkpoint {str(path)!r}: its index (.metadata) cannot be read "
                              f"({type(e).__name__}: {e})") from None


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int


def tensor_infos(md: Metadata) -> dict[str, TensorInfo]:
    """Every tensor in a checkpoint with its global shape, dtype and size."""
    out = {}
    for name, m in md.state_dict_metadata.items():
        if isinstance(m, TensorStorageMetadata):
            shape = tuple(m.size)
            n = 1
            for x in shape:
                n *= x
            out[name] = TensorInfo(name, shape, m.properties.dtype, n * torch.empty((), dtype=m.properties.dtype)
                                   .element_size())
    return out


def check_files(path: Path, md: Metadata) -> None:
    """Every shard file the index refers to exists and is long enough (a missing or truncated shard is one
    clear error here, before anything is loaded)."""
    need: dict[str, int] = {}
    for info in (md.storage_data or {}).values():
        rel = getattr(info, "relative_path", None)
        if rel is None:
            continue
        end = int(info.offset) + int(info.length)
        need[rel] = max(need.get(rel, 0), end)
    for rel, end in sorted(need.items()):
        f = Path(path) / rel
        try:
            size = os.path.getsize(f)
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint {str(path)!r}: shard file {rel} is missing") from None
        if size < end:
            raise CheckpointError(f"checkpoint {str(path)!r}: shard file {rel} is truncated ({size} bytes, the "
                                  f"index needs {end})")
