"""Index builders: numpy reference (the specification) and dispatch to the optional C++ extension.

The C++ module `engine.data._helpers` (csrc/helpers.cpp) returns identical arrays, faster. If it is not
built, one warning is given and everything runs on numpy. `backend="numpy"|"cpp"` forces one (tests).
"""

from __future__ import annotations

import warnings
from typing import Literal, Optional

import numpy as np

Backend = Literal["auto", "cpp", "numpy"]
_MASK64 = (1 << 64) - 1
FEISTEL_ROUNDS = 8  # 4 leave a measurable position bias when n < 256 (halves of 1-4 bits); 8 do not

try:  # optional: built by setup.py, or by hand (see docs/data.md)
    from engine.data import _helpers as _cpp  # type: ignore[attr-defined]
except ImportError as _e:  # pragma: no cover - depends on the install
    _cpp = None
    _import_error: Optional[str] = str(_e)
else:
    _import_error = None
_warned = False


def have_cpp() -> bool:
    return _cpp is not None


def _use_cpp(backend: Backend) -> bool:
    global _warned
    if backend == "numpy":
        return False
    if _cpp is None:
        if backend == "cpp":
            raise RuntimeError(f"the C++ data helpers (engine.data._helpers) are not built: {_import_error}")
        if not _warned:
            warnings.warn("Tessera: C++ data helpers (engine.data._helpers) not available; using the numpy "
                          "implementation (same results, slower index building). Build them with "
                          "`pip install -e .` or see docs/data.md.", RuntimeWarning, stacklevel=3)
            _warned = True
        return False
    return True


# --------------------------------------------------------------------------- numpy reference


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 over a uint64 array (wrap-around arithmetic, as in C++)."""
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _feistel_params(n: int, seed: int) -> tuple[int, np.uint64, np.ndarray]:
    bits = 2
    while bits < 64 and (1 << bits) < n:
        bits += 2
    half = bits // 2
    base = int(_splitmix64(np.array([seed & _MASK64], dtype=np.uint64))[0])
    keys = _splitmix64(np.array([(base + r) & _MASK64 for r in range(FEISTEL_ROUNDS)], dtype=np.uint64))
    return half, np.uint64((1 << half) - 1), keys


def _feistel(x: np.ndarray, half: int, mask: np.uint64, keys: np.ndarray) -> np.ndarray:
    """FEISTEL_ROUNDS-round Feistel network on `2*half`-bit values: a seeded bijection of [0, 2^(2*half))."""
    h = np.uint64(half)
    left, right = x >> h, x & mask
    for k in keys:
        left, right = right, left ^ (_splitmix64(right ^ k) & mask)
    return (left << h) | right


def permutation_numpy(n: int, seed: int) -> np.ndarray:
    """Seeded permutation of [0, n) in O(n): result[i] = the Feistel image of i, re-applied ("cycle walking")
    while it is >= n, which makes a bijection of [0, n) out of one of [0, 2^bits).

    Computed in chunks that stay in cache: the round function makes ~10 temporaries per round.
    """
    half, mask, keys = _feistel_params(n, seed)
    out = np.empty(n, dtype=np.int64)
    chunk = 1 << 16
    for start in range(0, n, chunk):
        y = _feistel(np.arange(start, min(start + chunk, n), dtype=np.uint64), half, mask, keys)  # [chunk]
        todo = np.flatnonzero(y >= np.uint64(n))
        while todo.size:
            y[todo] = _feistel(y[todo], half, mask, keys)
            todo = todo[y[todo] >= np.uint64(n)]
        out[start:start + y.size] = y
    return out


def build_sample_idx_numpy(sizes: np.ndarray, doc_idx: np.ndarray, seq_len: int, num_samples: int) -> np.ndarray:
    """-> int64 [num_samples+1, 2] of (index into doc_idx, token offset) where sample i starts.

    Sample i covers stream positions [i*seq_len, (i+1)*seq_len] (seq_len+1 tokens, the last shared with the
    next sample) of the documents concatenated in doc_idx order. Position p lies in the last document k
    whose start is <= p, which skips empty documents (Megatron's build_sample_idx, drop_last=True).
    """
    sizes = np.asarray(sizes, dtype=np.int32)
    doc_idx = np.asarray(doc_idx, dtype=np.int32)
    if seq_len <= 0 or num_samples < 0:
        raise ValueError(f"build_sample_idx: expected seq_len > 0 and num_samples >= 0, found {seq_len}, "
                         f"{num_samples}")
    if doc_idx.size and (doc_idx.min() < 0 or doc_idx.max() >= sizes.size):
        raise ValueError(f"build_sample_idx: doc_idx entries must be in [0, {sizes.size}), found "
                         f"[{doc_idx.min()}, {doc_idx.max()}]")
    starts = np.zeros(doc_idx.size + 1, dtype=np.int64)          # [L+1] stream start of each doc_idx entry
    np.cumsum(sizes[doc_idx], out=starts[1:])
    need = num_samples * seq_len + 1
    if need > starts[-1]:
        raise ValueError(f"build_sample_idx: {num_samples} samples of {seq_len}+1 tokens need {need} tokens, "
                         f"found {int(starts[-1])}")
    pos = np.arange(num_samples + 1, dtype=np.int64) * seq_len   # [S+1]
    k = np.searchsorted(starts, pos, side="right") - 1           # [S+1]
    return np.stack([k, pos - starts[k]], axis=1)                 # [S+1, 2]


def build_blending_indices_numpy(weights: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Greedy blending (Megatron): sample i goes to argmax_k w_k*max(i,1) - count_k, first maximum wins.

    A sequential loop by nature (each choice depends on all earlier ones); the C++ version is the fast path.
    """
    w = [float(x) for x in np.asarray(weights, dtype=np.float64)]
    K = len(w)
    if not 1 <= K <= 32767 or size < 0:
        raise ValueError(f"build_blending_indices: need 1..32767 weights and size >= 0, found {K}, {size}")
    ds = np.empty(size, dtype=np.int16)
    ds_sample = np.empty(size, dtype=np.int64)
    count = [0] * K
    for i in range(size):
        x = float(i) if i > 1 else 1.0
        best, best_err = 0, w[0] * x - count[0]
        for k in range(1, K):
            err = w[k] * x - count[k]
            if err > best_err:
                best, best_err = k, err
        ds[i] = best
        ds_sample[i] = count[best]
        count[best] += 1
    return ds, ds_sample


# --------------------------------------------------------------------------- dispatch


def permutation(n: int, seed: int, backend: Backend = "auto") -> np.ndarray:
    """A seeded pseudo-random permutation of [0, n) -> int64 [n]; identical on both backends."""
    if _use_cpp(backend):
        return _cpp.permutation(int(n), int(seed) & _MASK64)
    return permutation_numpy(n, seed)


def build_sample_idx(sizes: np.ndarray, doc_idx: np.ndarray, seq_len: int, num_samples: int,
                     backend: Backend = "auto") -> np.ndarray:
    if _use_cpp(backend):
        if seq_len <= 0 or num_samples < 0:
            raise ValueError(f"build_sample_idx: expected seq_len > 0 and num_samples >= 0, found {seq_len}, "
                             f"{num_samples}")
        return _cpp.build_sample_idx(np.ascontiguousarray(sizes, dtype=np.int32),
                                     np.ascontiguousarray(doc_idx, dtype=np.int32), int(seq_len), int(num_samples))
    return build_sample_idx_numpy(sizes, doc_idx, seq_len, num_samples)


def build_blending_indices(weights: np.ndarray, size: int, backend: Backend = "auto"
                           ) -> tuple[np.ndarray, np.ndarray]:
    """-> (dataset index int16 [size], sample index within that dataset int64 [size]); weights normalised."""
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or w.size == 0 or np.any(w <= 0) or not np.all(np.isfinite(w)):
        raise ValueError(f"build_blending_indices: expected positive finite weights, found {w.tolist()}")
    w = w / w.sum()
    if _use_cpp(backend):
        return tuple(_cpp.build_blending_indices(w, int(size)))  # type: ignore[return-value]
    return build_blending_indices_numpy(w, size)


def build_doc_idx(num_docs: int, num_epochs: int, seed: int, separate_final_epoch: bool,
                  backend: Backend = "auto") -> np.ndarray:
    """Document order over num_epochs epochs -> int32 [num_epochs * num_docs].

    All epochs are shuffled together, except that with separate_final_epoch the last epoch is shuffled on its
    own (Megatron: a final, partly used epoch then holds every document exactly once among its samples).
    """
    if not separate_final_epoch or num_epochs == 1:
        perm = permutation(num_epochs * num_docs, seed, backend)
        return (perm % num_docs).astype(np.int32) if num_docs else np.zeros(0, np.int32)
    first = build_doc_idx(num_docs, num_epochs - 1, seed, False, backend)
    last = build_doc_idx(num_docs, 1, seed + 1, False, backend)
    return np.concatenate([first, last])


def build_shuffle_idx(num_samples: int, total_samples: int, seed: int, backend: Backend = "auto") -> np.ndarray:
    """Shuffle [0, num_samples) and [num_samples, total_samples) separately -> int64 [total_samples]."""
    first = permutation(num_samples, seed, backend)
    rest = permutation(total_samples - num_samples, seed + 1, backend) + num_samples
    return np.concatenate([first, rest])
