"""Megatron-LM `.bin`/`.idx` indexed datasets: writer, memory-mapped reader, merge. Byte-for-byte compatible.

PREFIX.bin: the token ids of every sequence, concatenated, in the dataset dtype.
PREFIX.idx (all little-endian):
    magic            9 bytes  b"MMIDIDX\\x00\\x00"
    version          u64      1
    dtype code       u8       1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64, 7 float32, 8 uint16
    sequence count   u64      N
    document count   u64      D + 1
    sequence lengths int32[N] tokens per sequence
    pointers         int64[N] byte offset of each sequence in .bin
    document indices int64[D+1] index of each document's first sequence, then N
We write one sequence per document, so document indices are 0..N.
"""

from __future__ import annotations

import os
import struct
from array import array
from pathlib import Path
from typing import Iterable, Sequence, Union

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
DTYPES: dict[int, type] = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64,
                           7: np.float32, 8: np.uint16}
CODES: dict[np.dtype, int] = {np.dtype(t): c for c, t in DTYPES.items()}
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequence count, document count (34 bytes)

PathLike = Union[str, os.PathLike]


class IndexedDatasetError(ValueError):
    """A .bin/.idx pair is missing, truncated, corrupt or inconsistent; the message names the file."""


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab <= 65536), else int32 (as Megatron does)."""
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.int32)


def bin_path(prefix: PathLike) -> Path:
    return Path(f"{os.fspath(prefix)}.bin")


def idx_path(prefix: PathLike) -> Path:
    return Path(f"{os.fspath(prefix)}.idx")


class IndexedDatasetWriter:
    """Streams documents to PREFIX.bin; PREFIX.idx is written by finalize(). Files appear atomically.

    Memory is flat in the data size except for 12 bytes of index per sequence.
        with IndexedDatasetWriter(prefix, np.uint16) as w:
            w.add_document(ids)
    """

    def __init__(self, prefix: PathLike, dtype: Union[np.dtype, type] = np.uint16):
        self.prefix = os.fspath(prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in CODES:
            raise IndexedDatasetError(f"{self.prefix}: dtype {self.dtype} is not one of the Megatron dtypes "
                                      f"{sorted(str(np.dtype(t)) for t in DTYPES.values())}")
        Path(self.prefix).parent.mkdir(parents=True, exist_ok=True)
        self._tmp_bin = Path(f"{self.prefix}.bin.tmp{os.getpid()}")
        self._bin = open(self._tmp_bin, "wb")
        self._sizes = array("i")          # int32 per sequence
        self._doc_idx = array("q", [0])   # int64 per document + 1
        self._finalized = False

    def add_document(self, ids: Union[Sequence[int], np.ndarray]) -> None:
        """Append one document (one sequence). Ids must fit the dtype (checked for integer dtypes)."""
        arr = np.asarray(ids)
        if arr.ndim != 1:
            raise IndexedDatasetError(f"{self.prefix}: expected a 1-D sequence of token ids, found shape {arr.shape}")
        if arr.size and self.dtype.kind in "ui" and arr.dtype != self.dtype:
            info = np.iinfo(self.dtype)
            lo, hi = int(arr.min()), int(arr.max())
            if lo < info.min or hi > info.max:
                raise IndexedDatasetError(f"{self.prefix}: token id range [{lo}, {hi}] does not fit dtype "
                                          f"{self.dtype} (expected [{info.min}, {info.max}])")
        self._bin.write(arr.astype(self.dtype, copy=False).tobytes())
        self._sizes.append(int(arr.size))
        self._doc_idx.append(len(self._sizes))

    def add_raw(self, data: bytes, n_tokens: int) -> None:
        """Append one document already encoded as n_tokens little-endian values of the dtype (trusted caller)."""
        if len(data) != n_tokens * self.dtype.itemsize:
            raise IndexedDatasetError(f"{self.prefix}: expected {n_tokens * self.dtype.itemsize} bytes for "
                                      f"{n_tokens} tokens of {self.dtype}, found {len(data)}")
        self._bin.write(data)
        self._sizes.append(n_tokens)
        self._doc_idx.append(len(self._sizes))

    def add_index(self, other_prefix: PathLike) -> None:
        """Append every sequence and document of another dataset with the same dtype (used by merge)."""
        other = IndexedDataset(other_prefix)
        if other.dtype != self.dtype:
            raise IndexedDatasetError(f"{other_prefix}: dtype {other.dtype} differs from the merge target's "
                                      f"{self.dtype}")
        base = len(self._sizes)
        self._sizes.extend(other.sizes.astype(np.int32).tolist())
        self._doc_idx.extend((other.document_indices[1:] + base).tolist())
        with open(bin_path(other_prefix), "rb") as f:
            while chunk := f.read(1 << 24):
                self._bin.write(chunk)

    def finalize(self) -> None:
        """Write PREFIX.idx and move both files into place (.bin first, so a reader never sees a half pair)."""
        if self._finalized:
            return
        self._bin.close()
        sizes = np.frombuffer(self._sizes, dtype=np.int32) if len(self._sizes) else np.zeros(0, np.int32)
        pointers = np.zeros(len(sizes), dtype=np.int64)
        if len(sizes) > 1:
            np.cumsum(sizes[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        doc_idx = np.frombuffer(self._doc_idx, dtype=np.int64)
        tmp_idx = Path(f"{self.prefix}.idx.tmp{os.getpid()}")
        with open(tmp_idx, "wb") as f:
            f.write(_HEADER.pack(MAGIC, VERSION, CODES[self.dtype], len(sizes), len(doc_idx)))
            f.write(sizes.astype("<i4").tobytes())
            f.write(pointers.astype("<i8").tobytes())
            f.write(doc_idx.astype("<i8").tobytes())
        os.replace(self._tmp_bin, bin_path(self.prefix))
        os.replace(tmp_idx, idx_path(self.prefix))
        self._finalized = True

    def abort(self) -> None:
        self._bin.close()
        self._tmp_bin.unlink(missing_ok=True)
        self._finalized = True

    def __enter__(self) -> "IndexedDatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finalize()
        else:
            self.abort()


class IndexedDataset:
    """Memory-mapped reader. ds[i] -> np.ndarray of sequence i (a view into the mmap); len(ds) = N sequences.

    Everything is validated on open (sizes vs pointers vs .bin length), so a truncated or corrupt pair fails
    here with the file, the expected and the found value, not later inside numpy.
    """

    def __init__(self, prefix: PathLike):
        self.prefix = os.fspath(prefix)
        ip, bp = idx_path(prefix), bin_path(prefix)
        for p in (ip, bp):
            if not p.is_file():
                raise IndexedDatasetError(f"indexed dataset {self.prefix!r}: file {str(p)!r} does not exist "
                                          f"(expected PREFIX.bin and PREFIX.idx)")
        idx_size = ip.stat().st_size
        if idx_size < _HEADER.size:
            raise IndexedDatasetError(f"{ip}: truncated header: expected at least {_HEADER.size} bytes, found "
                                      f"{idx_size}")
        with open(ip, "rb") as f:
            magic, version, code, n_seq, n_doc = _HEADER.unpack(f.read(_HEADER.size))
        if magic != MAGIC:
            raise IndexedDatasetError(f"{ip}: not a Megatron index: expected magic {MAGIC!r}, found {magic!r}")
        if version != VERSION:
            raise IndexedDatasetError(f"{ip}: unsupported version: expected {VERSION}, found {version}")
        if code not in DTYPES:
            raise IndexedDatasetError(f"{ip}: unknown dtype code: expected one of {sorted(DTYPES)}, found {code}")
        self.dtype = np.dtype(DTYPES[code])
        expected = _HEADER.size + n_seq * 4 + n_seq * 8 + n_doc * 8
        if idx_size != expected:
            raise IndexedDatasetError(f"{ip}: size does not match its header ({n_seq} sequences, {n_doc} document "
                                      f"indices): expected {expected} bytes, found {idx_size}")
        if n_doc < 1:
            raise IndexedDatasetError(f"{ip}: expected at least 1 document index, found {n_doc}")
        self._idx_mmap = np.memmap(ip, dtype=np.uint8, mode="r") if idx_size else None
        off = _HEADER.size
        self.sizes = np.frombuffer(self._idx_mmap, dtype="<i4", count=n_seq, offset=off)          # [N]
        self.pointers = np.frombuffer(self._idx_mmap, dtype="<i8", count=n_seq, offset=off + 4 * n_seq)  # [N]
        self.document_indices = np.frombuffer(self._idx_mmap, dtype="<i8", count=n_doc,
                                              offset=off + 12 * n_seq)                          # [D+1]
        self._validate(ip, bp, n_seq)
        bin_size = bp.stat().st_size
        # np.memmap cannot map an empty file; an empty dataset has nothing to read anyway.
        self._bin = (np.memmap(bp, dtype=self.dtype, mode="r") if bin_size
                     else np.zeros(0, dtype=self.dtype))

    def _validate(self, ip: Path, bp: Path, n_seq: int) -> None:
        item = self.dtype.itemsize
        if n_seq and int(self.sizes.min()) < 0:
            raise IndexedDatasetError(f"{ip}: corrupt sequence lengths: expected >= 0, found {int(self.sizes.min())}")
        expected_ptr = np.zeros(n_seq, dtype=np.int64)
        if n_seq > 1:
            np.cumsum(self.sizes[:-1].astype(np.int64) * item, out=expected_ptr[1:])
        if not np.array_equal(expected_ptr, self.pointers):
            bad = int(np.flatnonzero(expected_ptr != self.pointers)[0])
            raise IndexedDatasetError(f"{ip}: corrupt pointers: sequence {bad} expected byte offset "
                                      f"{int(expected_ptr[bad])}, found {int(self.pointers[bad])}")
        di = self.document_indices
        if di[0] != 0 or di[-1] != n_seq or (len(di) > 1 and np.any(np.diff(di) < 0)):
            raise IndexedDatasetError(f"{ip}: corrupt document indices: expected non-decreasing from 0 to {n_seq}, "
                                      f"found first {int(di[0])}, last {int(di[-1])}")
        total = int(self.sizes.astype(np.int64).sum()) * item
        found = bp.stat().st_size
        if found != total:
            raise IndexedDatasetError(f"{bp}: expected {total} bytes ({total // item} tokens of {self.dtype}, as its "
                                      f".idx says), found {found} bytes" + (" (truncated)" if found < total else ""))

    # DataLoader workers started with spawn/forkserver receive datasets by pickle: send the prefix and
    # re-map the files there, instead of numpy's default of copying the whole mapped array into the pickle.
    def __getstate__(self) -> dict:
        return {"prefix": self.prefix}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["prefix"])  # type: ignore[misc]

    def __len__(self) -> int:
        return len(self.sizes)

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.sizes.astype(np.int64).sum())

    def __getitem__(self, i: int) -> np.ndarray:
        n = len(self.sizes)
        if not -n <= i < n:
            raise IndexError(f"{self.prefix}: sequence {i} out of range for {n} sequences")
        i %= n
        start = int(self.pointers[i]) // self.dtype.itemsize
        return self._bin[start:start + int(self.sizes[i])]

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens [offset, offset+length) of sequence i (to the end when length is None)."""
        seq = self[i]
        return seq[offset:] if length is None else seq[offset:offset + length]

    def document(self, d: int) -> np.ndarray:
        """All tokens of document d (its sequences concatenated)."""
        a, b = int(self.document_indices[d]), int(self.document_indices[d + 1])
        if b - a == 1:
            return self[a]
        return np.concatenate([self[i] for i in range(a, b)]) if b > a else np.zeros(0, self.dtype)


def merge_datasets(prefixes: Iterable[PathLike], out_prefix: PathLike) -> None:
    """Concatenate several .bin/.idx datasets (same dtype) into OUT_PREFIX, in the given order."""
    prefixes = list(prefixes)
    if not prefixes:
        raise IndexedDatasetError(f"merge into {os.fspath(out_prefix)!r}: expected at least one input, found none")
    dtype = IndexedDataset(prefixes[0]).dtype
    with IndexedDatasetWriter(out_prefix, dtype) as w:
        for p in prefixes:
            w.add_index(p)
