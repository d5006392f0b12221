"""BERT samples (masked-LM, optionally with next-sentence prediction) over the documents of an indexed dataset.

A BertDataset covers the documents [doc_begin, doc_end) of one .bin/.idx. Every document (its trailing EOD
dropped) is cut into segments of at most seq_len - 2 tokens (mlm: [CLS] A [SEP]) or seq_len - 3 tokens
(mlm+nsp: [CLS] A [SEP] B [SEP]); a longer document gives ceil(len / max) segments of nearly equal length, a
shorter one a single, padded segment. Cached as .npy under cache_dir, by the builder rank only:
  docs     int64 [n_docs, 2]      (token offset in the .bin, tokens without the trailing EOD)
  segments int64 [n_seg, 3]       (document index, offset in the document, length)
  shuffle  int64 [epochs * n_seg] the segment of each sample: every epoch its own seeded permutation, taken
                                  from one random stream, so a longer run (more epochs) keeps the order of the
                                  shorter one and rewrites the file in place
Sample i is segment shuffle[i]; for mlm+nsp it is split at a random point into A and the true next segment B
(nsp_label 0), and half the time B is replaced by as many tokens from a random place of another document
(nsp_label 1). The split, the label, the random document and the masking come from one generator,
np.random.default_rng([seed, i, tag]) (seed: the data seed and the dataset's name): sample i is the same after a
resume and at any dp.
For mlm+nsp, documents of one token are skipped (no pair); documents too short for a sample or a seq_len too
small for the layout are errors naming the dataset.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from engine.data.gpt_dataset import DatasetBuildError, RemappedWhenPickled, _save_atomic, _sizes_digest, _subseed
from engine.data.indexed import IndexedDataset, bin_path, inside, remove_stale_temporaries, safe_stem, tmp_path
from engine.data.mlm_masking import MaskingSpec, mask_tokens
from engine.data.word_starts import WordStarts

__all__ = ["BertIndexSpec", "BertDataset", "document_table", "segment_map", "shuffle_order", "min_seq_len"]

BERT_INDEX_VERSION = 1  # bump when the cached arrays change meaning
SAMPLE_TAG = 0  # third word of the per-sample seed [seed, i, tag] (the pair split, next-sentence choice, masking)
_SHUFFLE_BLOCK = 1 << 22  # random keys drawn per block while building the shuffle (memory stays bounded)


@dataclass(frozen=True)
class BertIndexSpec:
    """Everything that determines the cached arrays of one BertDataset (hashed into the cache file names,
    except num_samples: a longer run reuses the files and extends the shuffle)."""

    name: str
    prefix: str
    doc_begin: int       # document range [doc_begin, doc_end) of the indexed dataset
    doc_end: int
    seq_len: int         # tokens per sample, [CLS] [SEP] and padding included
    num_samples: int     # at least this many samples (whole epochs of segments)
    seed: int
    nsp: bool            # mlm+nsp: sentence pairs; else mlm: one segment per sample


def min_seq_len(nsp: bool) -> int:
    """[CLS] a [SEP] (3), or [CLS] a [SEP] b [SEP] (5) with one token each."""
    return 5 if nsp else 3


def _flat_tokens(indexed: IndexedDataset) -> np.ndarray:
    """Every token of the .bin, concatenated (a read-only memory map) -> [num_tokens]."""
    path = bin_path(indexed.prefix)
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=indexed.dtype)
    return np.memmap(path, dtype=indexed.dtype, mode="r").view(np.ndarray)


def document_table(indexed: IndexedDataset, doc_begin: int, doc_end: int, eod_id: int) -> np.ndarray:
    """-> int64 [doc_end - doc_begin, 2]: (offset of the document's first token in the .bin, its token count
    without a trailing EOD). A document's sequences are contiguous in the .bin."""
    di = np.asarray(indexed.document_indices[doc_begin:doc_end + 1], dtype=np.int64)  # [n + 1] sequence ids
    s0, s1 = int(di[0]), int(di[-1])
    sizes = np.asarray(indexed.sizes[s0:s1], dtype=np.int64)
    local = np.concatenate([[0], np.cumsum(sizes)])                                 # [s1 - s0 + 1]
    base = int(indexed.pointers[s0]) // indexed.dtype.itemsize if s0 < len(indexed.sizes) else indexed.num_tokens
    starts = base + local[di[:-1] - s0]                                             # [n]
    lengths = local[di[1:] - s0] - local[di[:-1] - s0]                              # [n]
    nonempty = np.flatnonzero(lengths > 0)
    if nonempty.size:
        last = np.asarray(_flat_tokens(indexed)[starts[nonempty] + lengths[nonempty] - 1])
        lengths[nonempty[last == eod_id]] -= 1
    return np.stack([starts, lengths], axis=1)


def segment_map(docs: np.ndarray, doc_begin: int, max_len: int, min_len: int) -> np.ndarray:
    """docs [n, 2] (document_table) -> int64 [n_seg, 3] (document index, offset, length): each document with
    at least min_len tokens cut into ceil(len / max_len) nearly equal segments, in document order."""
    lengths = docs[:, 1].astype(np.int64)
    n_chunks = np.where(lengths >= min_len, -(-lengths // max_len), 0)           # [n]
    doc = np.repeat(np.arange(len(docs), dtype=np.int64), n_chunks)              # [n_seg]
    j = np.arange(doc.size, dtype=np.int64) - np.repeat(np.cumsum(n_chunks) - n_chunks, n_chunks)
    L, n = lengths[doc], n_chunks[doc]
    begin, end = (j * L) // n, ((j + 1) * L) // n
    seg = np.stack([doc + doc_begin, begin, end - begin], axis=1)
    return seg[seg[:, 2] >= min_len]  # only a tiny max_len can cut a piece shorter than min_len


def shuffle_order(n_seg: int, epochs: int, seed: int) -> np.ndarray:
    """-> int64 [epochs * n_seg]: epoch e is a permutation of [0, n_seg) (argsort of uniform keys, row e of
    one seeded stream, so the first epochs do not depend on how many there are)."""
    rng = np.random.default_rng(_subseed(seed, "bert-shuffle"))
    rows = max(1, _SHUFFLE_BLOCK // max(n_seg, 1))
    out = []
    for e in range(0, epochs, rows):
        keys = rng.random((min(rows, epochs - e), n_seg))
        out.append(np.argsort(keys, axis=1, kind="stable").astype(np.int64).ravel())
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def _randint(rng: np.random.Generator, low: int, high: int) -> int:
    """A uniform integer in [low, high) (high > low), as floor(u * n): rng.integers costs far more per call."""
    return low + min(int(rng.random() * (high - low)), high - low - 1)


class BertDataset(RemappedWhenPickled, Dataset):
    """[CLS] A [SEP] (B [SEP]) [PAD]... samples of seq_len tokens, masked per sample (engine/data/mlm_masking.py).

    __getitem__(i) -> {"inputs", "targets", "token_types", "doc_ids": LongTensor [seq_len]} and, for mlm+nsp,
    "nsp_label": LongTensor [] (0 = B follows A in its document, 1 = B from another document). doc_ids: 0 for
    real tokens, 1 for padding; token_types: 1 for B and its [SEP], else 0. word_starts: whole-word masking.
    """

    def __init__(self, indexed: IndexedDataset, spec: BertIndexSpec, masking: MaskingSpec, eod_id: int,
                 cache_dir: Path, build: bool, source: Optional[str] = None,
                 word_starts: Optional[WordStarts] = None) -> None:
        self.indexed = indexed
        self.spec = spec
        self.source = source or spec.name  # the dataset's name in the config (keys of samples_in)
        self.masking = masking
        self.special = masking.special
        self.eod_id = int(eod_id)
        self.word_starts = word_starts
        what = "mlm+nsp" if spec.nsp else "mlm"
        need = min_seq_len(spec.nsp)
        if spec.seq_len < need:
            raise DatasetBuildError(f"dataset {spec.name!r}: seq_len={spec.seq_len} is too small for {what}: expected "
                                    f"at least {need} ([CLS] A [SEP]{' B [SEP]' if spec.nsp else ''}, one token each)")
        if not 0 <= spec.doc_begin <= spec.doc_end <= indexed.num_documents:
            raise DatasetBuildError(f"dataset {spec.name!r}: document range [{spec.doc_begin}, {spec.doc_end}) is not "
                                    f"within the {indexed.num_documents} documents of {indexed.prefix!r}")
        di = indexed.document_indices[spec.doc_begin:spec.doc_end + 1]
        seqs = indexed.sizes[int(di[0]):int(di[-1])]
        ident = {k: v for k, v in asdict(spec).items() if k != "num_samples"}
        key = hashlib.sha256(json.dumps({**ident, "v": BERT_INDEX_VERSION, "eod": self.eod_id,
                                         "sizes": _sizes_digest(seqs), "docs": _sizes_digest(np.diff(di)),
                                         "prefix": os.path.abspath(spec.prefix)}, sort_keys=True).encode())
        stem = f"{safe_stem(spec.name)}-bert-{key.hexdigest()[:20]}"
        cache_dir = Path(cache_dir)
        self._files = {k: inside(cache_dir, cache_dir / f"{stem}-{k}.npy") for k in ("docs", "segments", "shuffle")}
        self._desc = inside(cache_dir, cache_dir / f"{stem}.json")
        built = self._read_desc()
        if build and (built is None or int(built.get("num_samples_built", -1)) < spec.num_samples):
            self._build(cache_dir)
            built = self._read_desc()
        if built is None:
            raise DatasetBuildError(f"dataset {spec.name!r}: index cache {str(self._desc)!r} does not exist; expected "
                                    f"the builder rank to have written it before the barrier (is cache_dir on a "
                                    f"filesystem all ranks share?)")
        self._map()
        self._check(built, stem)
        # documents a random B may come from (mlm+nsp): every non-empty one, sorted
        self._other_docs = spec.doc_begin + np.flatnonzero(np.asarray(self.docs[:, 1]) >= 1)
        self._seed = _subseed(spec.seed, f"bert:{spec.name}")

    # ------------------------------------------------------------ cache
    def _read_desc(self) -> Optional[dict]:
        try:
            return json.loads(self._desc.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise DatasetBuildError(f"dataset {self.spec.name!r}: index cache {str(self._desc)!r} is unreadable "
                                    f"({e}); delete it to rebuild") from None

    def _build(self, cache_dir: Path) -> None:
        spec = self.spec
        docs = document_table(self.indexed, spec.doc_begin, spec.doc_end, self.eod_id)
        max_len = spec.seq_len - (3 if spec.nsp else 2)
        segments = segment_map(docs, spec.doc_begin, max_len, 2 if spec.nsp else 1)
        self._check_enough(docs, segments)
        epochs = -(-max(spec.num_samples, 1) // len(segments))
        shuffle = shuffle_order(len(segments), epochs, spec.seed)
        cache_dir.mkdir(parents=True, exist_ok=True)
        for k, arr in (("docs", docs), ("segments", segments), ("shuffle", shuffle)):
            _save_atomic(self._files[k], arr)
        # written last: its presence means the arrays are complete
        remove_stale_temporaries([self._desc])
        tmp = tmp_path(self._desc)
        tmp.write_text(json.dumps({**asdict(spec), "num_samples_built": int(len(shuffle)), "epochs": int(epochs),
                                   "segments": int(len(segments)), "documents": int(len(docs)),
                                   "files": {k: p.name for k, p in self._files.items()}}, indent=1))
        os.replace(tmp, self._desc)

    def _check_enough(self, docs: np.ndarray, segments: np.ndarray) -> None:
        spec = self.spec
        where = f"dataset {spec.name!r}, documents [{spec.doc_begin}, {spec.doc_end}) of {spec.prefix!r}"
        if len(segments) == 0:
            longest = int(docs[:, 1].max(initial=0))
            raise DatasetBuildError(f"{where}: no document long enough for {'mlm+nsp' if spec.nsp else 'mlm'}: "
                                    f"expected at least one with {2 if spec.nsp else 1} token(s) besides EOD "
                                    f"({'A and B' if spec.nsp else 'a segment'}), found {len(docs)} documents, the "
                                    f"longest with {longest}")
        if spec.nsp and int((docs[:, 1] >= 1).sum()) < 2:
            raise DatasetBuildError(f"{where}: mlm+nsp needs at least 2 non-empty documents (a random B comes from "
                                    f"another document), found {int((docs[:, 1] >= 1).sum())}")

    def _map(self) -> None:
        # plain ndarray views of the memory maps: np.memmap's Python-level __getitem__ costs more than the read
        try:
            self.docs = np.load(self._files["docs"], mmap_mode="r").view(np.ndarray)          # [n_docs, 2]
            self.segments = np.load(self._files["segments"], mmap_mode="r").view(np.ndarray)  # [n_seg, 3]
            self.shuffle = np.load(self._files["shuffle"], mmap_mode="r").view(np.ndarray)    # [epochs * n_seg]
        except (OSError, ValueError) as e:
            raise DatasetBuildError(f"dataset {self.spec.name!r}: index cache {str(self._files['segments'])!r} (and "
                                    f"its docs/shuffle files) is unreadable ({e}); delete them to rebuild") from None
        self._flat = _flat_tokens(self.indexed)

    def _check(self, built: dict, stem: str) -> None:
        """The cached arrays agree with their description and with this dataset (a cache of another build, a
        partial write or an edited file is refused, not read)."""
        spec, problems = self.spec, []
        for k in ("name", "doc_begin", "doc_end", "seq_len", "seed", "nsp"):
            if built.get(k) != getattr(spec, k):
                problems.append(f"{k}: recorded {built.get(k)!r}, expected {getattr(spec, k)!r}")
        n_docs, n_seg = spec.doc_end - spec.doc_begin, len(self.segments)
        if self.docs.shape != (n_docs, 2) or built.get("documents") != n_docs:
            problems.append(f"docs: expected shape ({n_docs}, 2), found {self.docs.shape} "
                            f"(recorded {built.get('documents')})")
        if self.segments.ndim != 2 or self.segments.shape[1] != 3 or built.get("segments") != n_seg:
            problems.append(f"segments: expected [{built.get('segments')}, 3], found {self.segments.shape}")
        elif n_seg and not (spec.doc_begin <= int(self.segments[:, 0].min())
                            and int(self.segments[:, 0].max()) < spec.doc_end):
            problems.append(f"segments: documents outside [{spec.doc_begin}, {spec.doc_end})")
        n = len(self.shuffle)
        if n != built.get("num_samples_built") or n != int(built.get("epochs", -1)) * n_seg:
            problems.append(f"shuffle: expected {built.get('epochs')} epochs x {n_seg} segments = "
                            f"{built.get('num_samples_built')} samples, found {n}")
        if n < spec.num_samples:
            problems.append(f"shuffle: expected >= {spec.num_samples} samples, found {n} (the builder rank extends it)")
        if problems:
            raise DatasetBuildError(f"dataset {spec.name!r}: index cache {stem}* is inconsistent "
                                    f"({'; '.join(problems)}); delete it to rebuild")
        self._check_enough(np.asarray(self.docs), np.asarray(self.segments))

    MAPPED = ("docs", "segments", "shuffle", "_flat")  # re-mapped when unpickled (RemappedWhenPickled)

    # ------------------------------------------------------------ samples
    def __len__(self) -> int:
        return len(self.shuffle)

    def samples_drawn(self, consumed: int) -> dict[str, int]:
        """{dataset name: samples of it among the first `consumed` samples} (the data position of a run)."""
        return {self.spec.name: int(consumed)}

    def samples_in(self, start: int, stop: int) -> dict[str, int]:
        """{config name: samples of it at stream positions [start, stop)}: all of them (one dataset)."""
        return {self.source: max(int(stop) - int(start), 0)}

    def _tokens(self, doc: int, offset: int, length: int) -> np.ndarray:
        start = int(self.docs[doc - self.spec.doc_begin, 0]) + offset
        return np.asarray(self._flat[start:start + length], dtype=np.int64)

    def segment(self, i: int) -> tuple[int, int, int]:
        """(document, offset, length) of sample i's segment (A, or A and its true next B)."""
        doc, off, length = (int(x) for x in self.segments[int(self.shuffle[i])])
        return doc, off, length

    def _rng(self, i: int) -> np.random.Generator:
        """Sample i's random stream: everything random about it comes from (seed, dataset, i) alone."""
        return np.random.default_rng([self._seed, i, SAMPLE_TAG])

    def pair(self, i: int, rng: Optional[np.random.Generator] = None
             ) -> tuple[np.ndarray, Optional[np.ndarray], int, Optional[tuple[int, int]]]:
        """Sample i before masking -> (A int64 [a], B int64 [b] or None (mlm), nsp_label (-1 for mlm),
        (document, offset) B was taken from). rng: sample i's stream (_rng(i)), drawn from first."""
        doc, off, length = self.segment(i)
        seg = self._tokens(doc, off, length)
        if not self.spec.nsp:
            return seg, None, -1, None
        rng = self._rng(i) if rng is None else rng
        a_len = _randint(rng, 1, length)  # A = seg[:a_len], 1 <= a_len < length
        if rng.random() < 0.5:
            return seg[:a_len], seg[a_len:], 0, (doc, off + a_len)
        others = self._other_docs
        k = _randint(rng, 0, len(others) - 1)
        if k >= int(np.searchsorted(others, doc)):  # skip A's own document
            k += 1
        other = int(others[k])
        avail = int(self.docs[other - self.spec.doc_begin, 1])
        want = min(length - a_len, avail)  # as long as the true B would be, when the document has enough
        o = _randint(rng, 0, avail - want + 1)
        return seg[:a_len], self._tokens(other, o, want), 1, (other, o)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"dataset {self.spec.name!r}: sample {i} out of range for {n} samples")
        i %= n
        sp, S = self.special, self.spec.seq_len
        rng = self._rng(i)
        a, b, label, _ = self.pair(i, rng)
        tokens = np.full(S, sp.pad, dtype=np.int64)       # [S]
        token_types = np.zeros(S, dtype=np.int64)         # [S]
        doc_ids = np.ones(S, dtype=np.int64)              # [S] 1 = padding
        na = len(a) + 2
        tokens[0], tokens[1:na - 1], tokens[na - 1] = sp.cls, a, sp.sep
        n_real = na
        if b is not None:
            n_real = na + len(b) + 1
            tokens[na:n_real - 1], tokens[n_real - 1] = b, sp.sep
            token_types[na:n_real] = 1
        doc_ids[:n_real] = 0
        ws = self.word_starts(tokens) if self.word_starts is not None else None
        inputs, targets = mask_tokens(tokens, rng, self.masking, ws)
        out = {"inputs": torch.from_numpy(inputs), "targets": torch.from_numpy(targets),
               "token_types": torch.from_numpy(token_types), "doc_ids": torch.from_numpy(doc_ids)}
        if self.spec.nsp:
            out["nsp_label"] = torch.tensor(label, dtype=torch.long)
        return out
