"""Deduplication: exact (content hash) and near-duplicate (MinHash signatures + LSH banding).

Signatures are computed in the workers; the decisions are taken in input order by one `Deduplicator` in the
main process, so the kept documents never depend on the number of workers.
"""

from __future__ import annotations

import hashlib
from typing import Optional

import numpy as np

NUM_PERM = 64          # signature length
BANDS, ROWS = 16, 4    # LSH: 16 bands of 4 rows -> candidate pairs above ~0.5 Jaccard are found reliably
SHINGLE = 5            # word 5-grams
_SEEDS = np.frombuffer(hashlib.sha256(b"tessera-minhash").digest() * 16, dtype=np.uint64)[:NUM_PERM]


def content_hash(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def _mix(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def minhash_signature(text: str) -> np.ndarray:
    """uint64 [NUM_PERM]: min over word-5-gram shingles of NUM_PERM independent hashes."""
    words = text.split()
    grams = {" ".join(words[i:i + SHINGLE]) for i in range(max(len(words) - SHINGLE + 1, 1))}
    h = np.array([int.from_bytes(hashlib.blake2b(g.encode(), digest_size=8).digest(), "little") for g in grams],
                 dtype=np.uint64)                                 # [n_shingles]
    return _mix(h[:, None] ^ _SEEDS[None, :]).min(axis=0)         # [NUM_PERM]


class Deduplicator:
    """Keeps state across documents; `seen(...)` -> the filter name that drops the doc, or None to keep it."""

    def __init__(self, exact: bool, minhash_threshold: Optional[float]):
        self.exact = exact
        self.threshold = minhash_threshold
        self._hashes: set[bytes] = set()
        self._buckets: dict[bytes, list[int]] = {}
        self._sigs: list[np.ndarray] = []

    def seen(self, digest: Optional[bytes], signature: Optional[np.ndarray]) -> Optional[str]:
        if self.exact and digest is not None:
            if digest in self._hashes:
                return "exact_duplicate"
            self._hashes.add(digest)
        if self.threshold is not None and signature is not None:
            keys = [bytes([b]) + signature[b * ROWS:(b + 1) * ROWS].tobytes() for b in range(BANDS)]
            for key in keys:
                for other in self._buckets.get(key, ()):
                    if float(np.mean(self._sigs[other] == signature)) >= self.threshold:
                        return "near_duplicate"
            me = len(self._sigs)
            self._sigs.append(signature)
            for key in keys:
                self._buckets.setdefault(key, []).append(me)
        return None
