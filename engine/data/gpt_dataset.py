"""GPT pretraining samples over an indexed dataset: document, sample and shuffle indices; blending.

A GPTDataset covers a contiguous range of sequences ("documents") of one .bin/.idx. Over E epochs:
  doc_idx     int32 [E * n_docs]       document order: epochs shuffled together (the final epoch on its own
                                       when it is used for less than 80% of its samples, as Megatron does)
  sample_idx  int64 [n_samples + 1, 2] (position in doc_idx, token offset) where each sample starts; a sample
                                       is the seq_len+1 tokens up to the next start (inclusive), spanning docs
  shuffle_idx int64 [n_samples]        sample order (final partial epoch shuffled separately)
The three arrays are cached as .npy under cache_dir, named by a hash of everything that determines them,
built by the builder rank only (others wait at the barrier, then read).

Several datasets are blended exactly per global batch (BlendedDataset, blending_counts): every global
batch of G samples holds floor or ceil of w_k * G samples of dataset k, in a seeded order.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from engine.data import index_builders as ib
from engine.data.indexed import IndexedDataset, inside, remove_stale_temporaries, safe_stem, tmp_path
from engine.data.masking import document_features
from engine.errors import DataError

INDEX_VERSION = 1  # bump when the index semantics change, so old caches are not reused
BLEND_VERSION = 2  # the blending index: 1 = Megatron's greedy order, 2 = exact per global batch
SEPARATE_FINAL_EPOCH_THRESHOLD = 0.80


class DatasetBuildError(DataError):
    """A dataset cannot provide what the run needs, or its cache is missing/corrupt."""


@dataclass(frozen=True)
class IndexSpec:
    """Everything that determines the indices of one GPTDataset (hashed into the cache file names)."""

    name: str
    prefix: str
    seq_begin: int       # sequence range [seq_begin, seq_end) of the indexed dataset
    seq_end: int
    seq_len: int
    num_samples: int     # at least this many samples (more when the last epoch has more)
    seed: int


def _sizes_digest(sizes: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(sizes, dtype=np.int32).tobytes(), digest_size=16).hexdigest()


def _subseed(seed: int, tag: str) -> int:
    """Independent 63-bit seeds for the doc and shuffle orders from one user seed."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{tag}".encode()).digest()[:8], "little") >> 1


def plan_epochs(tokens_per_epoch: int, seq_len: int, num_samples: int) -> tuple[int, bool]:
    """-> (epochs E, whether the final epoch is shuffled on its own) for at least num_samples samples."""
    num_samples = max(num_samples, 1)
    # smallest E with (E*T - 1) // seq_len >= N, i.e. E*T >= N*seq_len + 1
    epochs = -(-(num_samples * seq_len + 1) // tokens_per_epoch)
    if epochs == 1:
        return 1, False
    samples_sans_final = ((epochs - 1) * tokens_per_epoch - 1) // seq_len
    per_epoch = (tokens_per_epoch - 1) // seq_len
    # a nearly unused final epoch shuffled with the others would be over-represented in random order
    return epochs, (num_samples - samples_sans_final) < SEPARATE_FINAL_EPOCH_THRESHOLD * max(per_epoch, 1)


def build_indices(sizes: np.ndarray, seq_len: int, num_samples: int, seed: int
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """sizes int32 [n_docs] -> (doc_idx, sample_idx, shuffle_idx) covering at least num_samples samples."""
    tokens_per_epoch = int(sizes.astype(np.int64).sum())
    if tokens_per_epoch < 2:
        raise DatasetBuildError(f"expected at least 2 tokens to make a sample, found {tokens_per_epoch}")
    epochs, separate = plan_epochs(tokens_per_epoch, seq_len, num_samples)
    samples_sans_final = ((epochs - 1) * tokens_per_epoch - 1) // seq_len if separate else 0
    doc_idx = ib.build_doc_idx(len(sizes), epochs, _subseed(seed, "doc"), separate)
    total = (epochs * tokens_per_epoch - 1) // seq_len
    sample_idx = ib.build_sample_idx(sizes, doc_idx, seq_len, total)
    shuffle_idx = ib.build_shuffle_idx(samples_sans_final if separate else total, total, _subseed(seed, "shuffle"))
    return doc_idx, sample_idx, shuffle_idx


def _save_atomic(path: Path, arr: np.ndarray) -> None:
    """Write PATH.tmpPID-HOST, then rename it to PATH; a temporary left by a killed writer is removed by the
    next write of the same file (remove_stale_temporaries)."""
    remove_stale_temporaries([path])
    tmp = tmp_path(path)
    try:
        with open(tmp, "wb") as f:  # a file object: np.save appends no ".npy" to the name
            np.save(f, arr, allow_pickle=False)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class RemappedWhenPickled:
    """Pickled for spawn/forkserver DataLoader workers: send file names, re-map there (not the arrays).
    A dataset lists its memory-mapped array attributes in MAPPED and re-opens them in `_map()`."""

    MAPPED: tuple[str, ...] = ()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        for k in self.MAPPED:
            state.pop(k, None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._map()


class GPTDataset(RemappedWhenPickled, Dataset):
    def __init__(self, indexed: IndexedDataset, spec: IndexSpec, eod_id: int, document_masking: bool,
                 cache_dir: Path, build: bool, source: Optional[str] = None):
        self.indexed = indexed
        self.spec = spec
        self.source = source or spec.name  # the dataset's name in the config (keys of samples_in)
        self.eod_id = eod_id
        self.document_masking = document_masking
        sizes = indexed.sizes[spec.seq_begin:spec.seq_end]
        # Keyed by the epoch plan, not the sample count: a longer run that needs no extra epoch reuses the
        # same indices, so its data order up to the old end is unchanged.
        tokens = int(sizes.astype(np.int64).sum())
        plan = plan_epochs(tokens, spec.seq_len, spec.num_samples) if tokens >= 2 else None
        ident = {k: v for k, v in asdict(spec).items() if k != "num_samples"}
        key = hashlib.sha256(json.dumps({**ident, "plan": plan, "v": INDEX_VERSION, "sizes": _sizes_digest(sizes),
                                         "prefix": os.path.abspath(spec.prefix)}, sort_keys=True).encode())
        # the name comes from the config: only its sanitized form goes into a file name (never "../")
        stem = f"{safe_stem(spec.name)}-{key.hexdigest()[:20]}"
        cache_dir = Path(cache_dir)
        files = {k: inside(cache_dir, cache_dir / f"{stem}-{k}_idx.npy") for k in ("doc", "sample", "shuffle")}
        desc = inside(cache_dir, cache_dir / f"{stem}.json")
        if build and not desc.is_file():
            cache_dir.mkdir(parents=True, exist_ok=True)
            arrays = build_indices(sizes, spec.seq_len, spec.num_samples, spec.seed)
            for (k, path), arr in zip(files.items(), arrays):
                _save_atomic(path, arr)
            # written last: its presence means the three arrays are complete
            remove_stale_temporaries([desc])
            tmp = tmp_path(desc)
            tmp.write_text(json.dumps({**asdict(spec), "num_samples_built": len(arrays[2]),
                                       "files": {k: p.name for k, p in files.items()}}, indent=1))
            os.replace(tmp, desc)
        if not desc.is_file():
            raise DatasetBuildError(f"dataset {spec.name!r}: index cache {str(desc)!r} does not exist; expected the "
                                    f"builder rank to have written it before the barrier (is cache_dir on a "
                                    f"filesystem all ranks share?)")
        self._files = files
        self._map()
        if len(self.sample_idx) != len(self.shuffle_idx) + 1 or len(self.shuffle_idx) < spec.num_samples:
            raise DatasetBuildError(f"dataset {spec.name!r}: index cache {stem}* is inconsistent: expected "
                                    f">= {spec.num_samples} samples, found sample_idx {len(self.sample_idx)} / "
                                    f"shuffle_idx {len(self.shuffle_idx)}; delete it to rebuild")

    def _map(self) -> None:
        files = self._files
        try:
            self.doc_idx = np.load(files["doc"], mmap_mode="r")          # [E * n_docs]
            self.sample_idx = np.load(files["sample"], mmap_mode="r")    # [n + 1, 2]
            self.shuffle_idx = np.load(files["shuffle"], mmap_mode="r")  # [n]
        except (OSError, ValueError) as e:
            raise DatasetBuildError(f"dataset {self.spec.name!r}: index cache {str(files['doc'])!r} (and its "
                                    f"sample/shuffle files) is unreadable ({e}); delete them to rebuild") from None

    MAPPED = ("doc_idx", "sample_idx", "shuffle_idx")

    def __len__(self) -> int:
        return len(self.shuffle_idx)

    def tokens(self, i: int) -> np.ndarray:
        """Tokens of sample i -> int64 [seq_len + 1]."""
        j = int(self.shuffle_idx[i])
        k0, o0 = (int(x) for x in self.sample_idx[j])
        k1, o1 = (int(x) for x in self.sample_idx[j + 1])
        base = self.spec.seq_begin
        if k0 == k1:
            out = self.indexed.get(base + int(self.doc_idx[k0]), o0, o1 - o0 + 1)
        else:
            parts = [self.indexed.get(base + int(self.doc_idx[k0]), o0)]
            parts += [self.indexed[base + int(self.doc_idx[k])] for k in range(k0 + 1, k1)]
            parts.append(self.indexed.get(base + int(self.doc_idx[k1]), 0, o1 + 1))
            out = np.concatenate(parts)
        return out.astype(np.int64)

    def samples_drawn(self, consumed: int) -> dict[str, int]:
        """{dataset name: samples of it among the first `consumed` samples} (the data position of a run)."""
        return {self.spec.name: int(consumed)}

    def samples_in(self, start: int, stop: int) -> dict[str, int]:
        """{config name: samples of it at stream positions [start, stop)}: all of them (one dataset)."""
        return {self.source: max(int(stop) - int(start), 0)}

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"dataset {self.spec.name!r}: sample {i} out of range for {n} samples")
        tokens = torch.from_numpy(self.tokens(i % n))  # [S+1]
        out = {"tokens": tokens}
        if self.document_masking:
            out["position_ids"], out["doc_ids"] = document_features(tokens, self.eod_id)
        return out


class BlendedDataset(Dataset):
    """Datasets mixed by weight, exact per global batch (blending_counts): global batch b, the positions
    [b*G, (b+1)*G), holds floor or ceil of w_k * G samples of dataset k, and every batch boundary is within
    one sample of w_k * n for each dataset. `names`: the datasets' config names (keys of samples_in)."""

    def __init__(self, datasets: Sequence[Dataset], dataset_index: np.ndarray, dataset_sample_index: np.ndarray,
                 names: Optional[Sequence[str]] = None):
        self.datasets = list(datasets)
        self.dataset_index = dataset_index                # int16 [size]
        self.dataset_sample_index = dataset_sample_index  # int64 [size]
        self.names = list(names) if names is not None else [
            getattr(ds, "source", None) or getattr(getattr(ds, "spec", None), "name", f"dataset{k}")
            for k, ds in enumerate(self.datasets)]
        if len(self.names) != len(self.datasets):
            raise DatasetBuildError(f"blended dataset: {len(self.names)} names for {len(self.datasets)} datasets")
        for k, ds in enumerate(self.datasets):
            need = int(dataset_sample_index[dataset_index == k].max(initial=-1)) + 1
            if len(ds) < need:
                raise DatasetBuildError(f"blended dataset {k}: expected >= {need} samples, found {len(ds)}")

    def __getstate__(self) -> dict:
        # cached (memory-mapped .npy) indices travel as file names, like GPTDataset's
        state = dict(self.__dict__)
        for k in ("dataset_index", "dataset_sample_index"):
            arr = state[k]
            if isinstance(arr, np.memmap) and arr.filename:
                state[k] = ("npy", arr.filename)
        return state

    def __setstate__(self, state: dict) -> None:
        for k in ("dataset_index", "dataset_sample_index"):
            if isinstance(state[k], tuple):
                state[k] = np.load(state[k][1], mmap_mode="r")
        self.__dict__.update(state)

    def __len__(self) -> int:
        return len(self.dataset_index)

    def samples_drawn(self, consumed: int) -> dict[str, int]:
        """{dataset name: samples of it among the first `consumed` blended samples}."""
        head = np.asarray(self.dataset_index[:min(consumed, len(self))])
        counts = np.bincount(head.astype(np.int64), minlength=len(self.datasets))
        names = [getattr(getattr(ds, "spec", None), "name", f"dataset{k}") for k, ds in enumerate(self.datasets)]
        return {name: int(c) for name, c in zip(names, counts)}

    def _counts_before(self, pos: int) -> np.ndarray:
        """Samples of each dataset at stream positions [0, pos) -> int64 [K] (positions wrap like __getitem__)."""
        n, K = len(self), len(self.datasets)
        if pos <= 0 or n == 0:
            return np.zeros(K, dtype=np.int64)
        laps, rest = divmod(int(pos), n)
        out = np.bincount(np.asarray(self.dataset_index[:rest]).astype(np.int64), minlength=K)
        if laps:
            out = out + laps * np.bincount(np.asarray(self.dataset_index).astype(np.int64), minlength=K)
        return out

    def samples_in(self, start: int, stop: int) -> dict[str, int]:
        """{config name: samples of it at stream positions [start, stop)}; for the steps from consumed_samples
        s0 to s1 (global batches), samples_in(s0, s1). Every dataset is a key, also with a count of 0."""
        n, K = len(self), len(self.datasets)
        start, stop = int(start), int(stop)
        if stop <= start:
            return {name: 0 for name in self.names}
        if n and stop - start <= n and start // n == (stop - 1) // n:  # the common case: one slice
            a = start % n
            counts = np.bincount(np.asarray(self.dataset_index[a:a + stop - start]).astype(np.int64), minlength=K)
        else:
            counts = self._counts_before(stop) - self._counts_before(start)
        return {name: int(c) for name, c in zip(self.names, counts)}

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"blended dataset: sample {i} out of range for {n} samples")
        i %= n
        return self.datasets[int(self.dataset_index[i])][int(self.dataset_sample_index[i])]


def blending_counts(weights: Sequence[float], size: int, cache_dir: Optional[Path] = None, build: bool = True, *,
                    global_batch_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Blending indices for `size` samples, exact per global batch of `global_batch_size` (G) samples
    (ib.build_batch_blending_indices), the order inside each batch shuffled from the data `seed`; cached
    like the dataset indices. A pure function of (weights, G, seed): the same at any dp and after a resume;
    another G gives another stream."""
    w = np.asarray(weights, dtype=np.float64)
    G, bseed = int(global_batch_size), _subseed(int(seed), "blend")
    if cache_dir is None:
        return ib.build_batch_blending_indices(w, size, G, bseed)
    key = hashlib.sha256(json.dumps({"w": [float(x) for x in weights], "n": size, "v": INDEX_VERSION,
                                     "blend": BLEND_VERSION, "G": G, "seed": int(seed), "q": ib.BLEND_Q}).encode())
    stem = Path(cache_dir) / f"blend-{key.hexdigest()[:20]}"
    a, b = Path(f"{stem}-dataset_idx.npy"), Path(f"{stem}-sample_idx.npy")
    if build and not b.is_file():
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        ds, ds_sample = ib.build_batch_blending_indices(w, size, G, bseed)
        _save_atomic(a, ds)
        _save_atomic(b, ds_sample)
    if not b.is_file():
        raise DatasetBuildError(f"blending index {str(b)!r} does not exist; expected the builder rank to write it")
    return np.load(a, mmap_mode="r"), np.load(b, mmap_mode="r")
