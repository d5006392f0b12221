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


# Per-batch exact blending. Dataset k's share of a global batch of G samples, t_k = w_k * G, is quantised
# to a_k / BLEND_Q (exact rationals, largest remainder, so sum a_k = G * BLEND_Q): every batch holds
# f_k = a_k // BLEND_Q samples of k, plus one "extra" in some batches, at the rate rho_k / BLEND_Q with
# rho_k = a_k % BLEND_Q; the R = G - sum f_k extras of each batch are a Pfair schedule (PD2, below).
BLEND_Q = 1 << 30
MAX_BLEND_BATCHES = 1 << 28  # keeps every product of the PD2 arithmetic below 2^62 (int64 in C++)


def blend_quota(weights, global_batch_size: int, q: int = BLEND_Q) -> tuple[np.ndarray, np.ndarray]:
    """-> (f int64 [K], rho int64 [K]): per batch, dataset k gets f_k or f_k + 1 samples (the latter at rate
    rho_k / q), sum(f) + sum(rho) / q == global_batch_size exactly.

    Exact rational arithmetic on the float weights (normalised), rounded by largest remainder to multiples
    of 1/q (ties: lower index), so f_k and f_k + 1 are always floor and ceil of w_k * G; a share within
    1/q of an integer (0.95 * 20) is that integer.
    """
    from fractions import Fraction

    G = int(global_batch_size)
    w = [Fraction(float(x)) for x in np.asarray(weights, dtype=np.float64).ravel()]
    if not w or G <= 0 or q <= 0 or any(x <= 0 for x in w):
        raise ValueError(f"blend_quota: expected positive weights and global_batch_size, found "
                         f"{[float(x) for x in w]}, {G}")
    total = sum(w)
    exact = [x * G * q / total for x in w]          # sums to G * q exactly
    a = [int(e.numerator // e.denominator) for e in exact]
    rest = G * q - sum(a)
    order = sorted(range(len(w)), key=lambda k: (-(exact[k] - a[k]), k))
    for k in order[:rest]:
        a[k] += 1
    f = np.array([x // q for x in a], dtype=np.int64)
    rho = np.array([x % q for x in a], dtype=np.int64)
    return f, rho


def _pd2_key(e: int, rho: int, q: int, k: int) -> tuple[int, int, int, int]:
    """PD2 priority (smaller first) of subtask i = e + 1 of task k with weight rho/q (0 < rho < q):
    pseudo-deadline d = ceil(i/wt), then b-bit 1 first, then for heavy tasks (wt >= 1/2) the later group
    deadline D = ceil(ceil(d * (1 - wt)) / (1 - wt)) first, then the lower index."""
    i = e + 1
    d = -(-i * q // rho)
    bbit = 1 if (i * q) % rho else 0
    D = 0
    if bbit and 2 * rho >= q:
        x = -(-d * (q - rho) // q)
        D = -(-x * q // (q - rho))
    return d, -bbit, -D, k


def pfair_extras_numpy(rho: np.ndarray, q: int, n_batches: int) -> np.ndarray:
    """-> int8 [n_batches, K]: which datasets take their extra sample in each batch (PD2 Pfair schedule).

    Task k has weight rho_k/q < 1 and the weights sum to an integer R (the extras per batch). PD2
    (Anderson & Srinivasan) is optimal for synchronous periodic tasks on R processors: every task's lag,
    rho_k/q * b - extras_k(b), stays strictly between -1 and 1 after every batch b, and each batch has
    exactly R extras, at most one per task.
    """
    rho = [int(x) for x in np.asarray(rho, dtype=np.int64)]
    K = len(rho)
    if sum(rho) % q or any(not 0 <= r < q for r in rho):
        raise ValueError(f"pfair_extras: expected 0 <= rho < {q} summing to a multiple of it, found {rho}")
    R = sum(rho) // q
    out = np.zeros((n_batches, K), dtype=np.int8)
    if R == 0:
        return out
    tasks = [k for k in range(K) if rho[k]]
    done = [0] * K
    for t in range(n_batches):
        # eligible: the pending subtask i = done + 1 is released, r = floor((i - 1) / wt) <= t
        ready = sorted(_pd2_key(done[k], rho[k], q, k) for k in tasks if done[k] * q // rho[k] <= t)
        if len(ready) < R:  # impossible for a PD2 schedule of total weight R; guards the arithmetic
            raise RuntimeError(f"pfair_extras: {len(ready)} eligible datasets for {R} extras at batch {t}")
        for key in ready[:R]:
            k = key[3]
            out[t, k] = 1
            done[k] += 1
    return out


def _batch_permutations(n: int, seeds: np.ndarray) -> np.ndarray:
    """Row b: permutation_numpy(n, seeds[b]) -> int64 [len(seeds), n] (vectorised over the rows)."""
    seeds = np.asarray(seeds, dtype=np.uint64)
    B = seeds.size
    half, mask, _ = _feistel_params(n, 0)
    with np.errstate(over="ignore"):
        base = _splitmix64(seeds)                                                  # [B]
        keys = _splitmix64(base[None, :] + np.arange(FEISTEL_ROUNDS, dtype=np.uint64)[:, None])  # [rounds, B]
    x = np.tile(np.arange(n, dtype=np.uint64), B)                                  # [B*n]
    rows = np.repeat(np.arange(B), n)                                              # [B*n]
    y = _feistel(x, half, mask, keys[:, rows])
    todo = np.flatnonzero(y >= np.uint64(n))
    while todo.size:
        y[todo] = _feistel(y[todo], half, mask, keys[:, rows[todo]])
        todo = todo[y[todo] >= np.uint64(n)]
    return y.astype(np.int64).reshape(B, n)


def build_batch_blending_indices_numpy(floor: np.ndarray, rho: np.ndarray, q: int, global_batch_size: int,
                                       size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-batch exact blending -> (dataset index int16 [size], sample index within it int64 [size]).

    Global batch b (positions [b*G, (b+1)*G)) holds f_k + extra_k(b) samples of dataset k (extras:
    pfair_extras), laid out dataset by dataset and then put in the order of permutation(G, seed + b):
    position j of the batch takes slot perm[j]. The sample index counts up within each dataset in stream
    order. A prefix of the stream does not depend on `size`.
    """
    G = int(global_batch_size)
    f = np.asarray(floor, dtype=np.int64)
    K = f.size
    if not 1 <= K <= 32767 or size < 0 or G <= 0:
        raise ValueError(f"build_batch_blending_indices: need 1..32767 datasets, size >= 0 and "
                         f"global_batch_size > 0, found {K}, {size}, {G}")
    n_batches = -(-size // G)
    if n_batches > MAX_BLEND_BATCHES:
        raise ValueError(f"build_batch_blending_indices: {n_batches} batches, more than {MAX_BLEND_BATCHES}")
    if int(f.sum()) + int(np.asarray(rho, dtype=np.int64).sum()) // q != G or np.any(f < 0):
        raise ValueError(f"build_batch_blending_indices: quota {f.tolist()} + {np.asarray(rho).tolist()}/{q} "
                         f"does not make batches of {G}")
    counts = f[None, :] + pfair_extras_numpy(rho, q, n_batches)                  # [B, K]
    ds = np.empty(n_batches * G, dtype=np.int16)
    labels_all = np.arange(K, dtype=np.int16)
    chunk = max(1, (1 << 18) // G)
    for b0 in range(0, n_batches, chunk):
        c = counts[b0:b0 + chunk]                                                   # [C, K]
        labels = np.repeat(np.tile(labels_all, len(c)), c.ravel()).reshape(len(c), G)  # slot order, per batch
        with np.errstate(over="ignore"):
            seeds = np.uint64(seed & _MASK64) + np.arange(b0, b0 + len(c), dtype=np.uint64)
        perm = _batch_permutations(G, seeds)                                        # [C, G]
        ds[b0 * G:(b0 + len(c)) * G] = np.take_along_axis(labels, perm, axis=1).ravel()
    ds = ds[:size]
    order = np.argsort(ds, kind="stable")
    first = np.searchsorted(ds[order], np.arange(K), side="left")                  # [K]
    ds_sample = np.empty(size, dtype=np.int64)
    ds_sample[order] = np.arange(size, dtype=np.int64) - first[ds[order]]
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


def build_batch_blending_indices(weights: np.ndarray, size: int, global_batch_size: int, seed: int,
                                 backend: Backend = "auto") -> tuple[np.ndarray, np.ndarray]:
    """Blend exact per global batch -> (dataset index int16 [size], sample index within it int64 [size]).

    Every global batch of `global_batch_size` samples holds floor or ceil of w_k * G samples of dataset k
    (weights normalised), cumulative counts stay within one sample of w_k * n at every batch boundary, and
    the order inside a batch is a seeded shuffle (seed + batch index). A pure function of (weights, G, seed);
    the first n samples are the same for any size >= n.
    """
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or w.size == 0 or np.any(w <= 0) or not np.all(np.isfinite(w)):
        raise ValueError(f"build_batch_blending_indices: expected positive finite weights, found {w.tolist()}")
    if global_batch_size <= 0:
        raise ValueError(f"build_batch_blending_indices: global_batch_size must be > 0, found {global_batch_size}")
    f, rho = blend_quota(w, global_batch_size)
    if _use_cpp(backend):
        if -(-size // global_batch_size) > MAX_BLEND_BATCHES:
            raise ValueError(f"build_batch_blending_indices: more than {MAX_BLEND_BATCHES} batches")
        return tuple(_cpp.build_batch_blending_indices(f, rho, BLEND_Q, int(global_batch_size), int(size),
                                                       int(seed) & _MASK64))  # type: ignore[return-value]
    return build_batch_blending_indices_numpy(f, rho, BLEND_Q, global_batch_size, size, seed)


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
