"""BERT masking of one sample: which positions the model predicts, and what its input shows there.

Of the candidate positions (every position whose id is not [CLS], [SEP], [MASK], [PAD] or another excluded id
such as EOD), exactly k = max(1, round(mask_prob * n_candidates)) are chosen (as in BERT's
create_pretraining_data, not a per-token coin: every sample predicts the same fraction). With whole-word
masking, words are taken in a random order and added whole while they fit into k (a word that would overshoot
is skipped), so k is met or slightly undershot; at least one word is always chosen.
Each chosen position independently shows [MASK] (replace_prob), a random token (random_prob) drawn uniformly
from the real vocabulary without the special ids, or its own token (the rest). targets hold the original id at
the chosen positions and -100 elsewhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from engine.data.special_tokens import SpecialTokens

__all__ = ["MaskingSpec", "mask_tokens", "IGNORE_INDEX"]

IGNORE_INDEX = -100  # targets value of positions that are not predicted (torch cross_entropy's ignore_index)


@dataclass(frozen=True)
class MaskingSpec:
    """What mask_tokens needs besides the sample. vocab_size: the REAL vocabulary (ids a tokenizer produces,
    without appended special tokens); `exclude`: more ids that are never chosen nor drawn (EOD)."""

    special: SpecialTokens
    vocab_size: int
    mask_prob: float = 0.15
    replace_prob: float = 0.8
    random_prob: float = 0.1
    exclude: tuple[int, ...] = ()
    random_ids: np.ndarray = field(init=False, repr=False, compare=False)  # int64 [R] ids a random token takes
    never: np.ndarray = field(init=False, repr=False, compare=False)       # int64 ids never chosen
    never_table: np.ndarray = field(init=False, repr=False, compare=False)  # bool [max(vocab, never) + 1]

    def __post_init__(self) -> None:
        if not 0.0 < self.mask_prob < 1.0:
            raise ValueError(f"mlm masking: mask_prob must be in (0, 1), found {self.mask_prob}")
        if self.replace_prob < 0 or self.random_prob < 0 or self.replace_prob + self.random_prob > 1.0 + 1e-12:
            raise ValueError(f"mlm masking: expected replace_prob, random_prob >= 0 with replace_prob + random_prob "
                             f"<= 1, found {self.replace_prob} and {self.random_prob}")
        never = np.unique(np.array(list(self.special.ids()) + [int(i) for i in self.exclude], dtype=np.int64))
        allowed = np.setdiff1d(np.arange(int(self.vocab_size), dtype=np.int64), never)
        if self.random_prob > 0 and allowed.size == 0:
            raise ValueError(f"mlm masking: random_prob={self.random_prob} but the real vocabulary of "
                             f"{self.vocab_size} ids has no id that is not a special token")
        object.__setattr__(self, "never", never)
        table = np.zeros(max(int(never.max()) + 1, int(self.vocab_size)), dtype=bool)
        table[never] = True
        object.__setattr__(self, "never_table", table)
        object.__setattr__(self, "random_ids", allowed)


def _n_to_predict(n_candidates: int, mask_prob: float) -> int:
    return max(1, int(math.floor(mask_prob * n_candidates + 0.5))) if n_candidates else 0


def _choose_words(candidate: np.ndarray, word_starts: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Positions of whole words, about k of them: candidate, word_starts bool [S] -> sorted int64 positions."""
    start = word_starts.astype(bool) | ~candidate    # a non-candidate is its own unit ...
    start[1:] |= ~candidate[:-1]                     # ... and the position after it starts a word
    word = np.cumsum(start) - 1                      # [S] word index of every position
    cand_pos = np.flatnonzero(candidate)
    w_of = word[cand_pos]
    # candidate words and their (begin, length) over the positions
    first = np.flatnonzero(np.r_[True, w_of[1:] != w_of[:-1]])
    begins = cand_pos[first]
    lengths = np.diff(np.r_[first, cand_pos.size])
    order = rng.permutation(len(begins))
    chosen, total = [], 0
    for w in order:
        n = int(lengths[w])
        if total + n > k:
            continue
        chosen.append(w)
        total += n
        if total == k:
            break
    if not chosen:  # every word is longer than k: one word still
        chosen = [int(order[0])]
    parts = [np.arange(begins[w], begins[w] + lengths[w]) for w in chosen]
    return np.sort(np.concatenate(parts))


def mask_tokens(ids: np.ndarray, rng: np.random.Generator, spec: MaskingSpec,
                word_starts: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
    """ids int [S] -> (inputs int64 [S], targets int64 [S]); see the module doc. word_starts bool [S]: choose
    whole words (engine/data/word_starts.py), None: single tokens. rng decides everything (seed it per sample)."""
    ids = np.asarray(ids, dtype=np.int64)
    inputs = ids.copy()
    targets = np.full(ids.shape, IGNORE_INDEX, dtype=np.int64)
    if ids.size and not 0 <= int(ids.min()) <= int(ids.max()) < spec.never_table.size:
        raise ValueError(f"mlm masking: expected token ids in [0, {spec.never_table.size}), found "
                         f"[{int(ids.min())}, {int(ids.max())}]")
    candidate = ~spec.never_table[ids]               # [S]
    k = _n_to_predict(int(candidate.sum()), spec.mask_prob)
    if k == 0:
        return inputs, targets
    if word_starts is None:
        pos = np.flatnonzero(candidate)
        chosen = np.sort(pos[rng.permutation(pos.size)[:k]])
    else:
        if word_starts.shape != ids.shape:
            raise ValueError(f"mlm masking: word_starts must have the shape of ids {ids.shape}, found "
                             f"{word_starts.shape}")
        chosen = _choose_words(candidate, word_starts, k, rng)
    targets[chosen] = ids[chosen]
    u = rng.random(chosen.size)
    as_mask = chosen[u < spec.replace_prob]
    as_random = chosen[(u >= spec.replace_prob) & (u < spec.replace_prob + spec.random_prob)]
    inputs[as_mask] = spec.special.mask
    if as_random.size:  # floor(u * R): uniform over the R ids (and much cheaper than rng.integers per sample)
        pick = (rng.random(as_random.size) * spec.random_ids.size).astype(np.int64)
        inputs[as_random] = spec.random_ids[pick]
    return inputs, targets
