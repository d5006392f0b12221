"""Per-document text cleaning: unicode normalisation, control characters, length and repetition filters.

Each filter is a pure function of one document, so workers can run it in any order and the result does
not depend on the number of workers. `clean` returns the cleaned text, or the name of the filter that
dropped the document (the preprocessing summary counts those names).
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import dataclass
from typing import Optional, Union

# C0/C1 control characters except tab and newline (which carry layout), plus DEL.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


@dataclass(frozen=True)
class CleanConfig:
    normalize: Optional[str] = "NFC"      # unicode normal form (NFC, NFKC, ...) or None
    strip_control: bool = True            # drop control characters (\r included: lines end with \n)
    min_chars: int = 1                    # drop documents shorter than this after cleaning
    max_chars: Optional[int] = None       # drop documents longer than this (None = no limit)
    max_dup_line_frac: Optional[float] = None  # drop if more than this fraction of characters sit in repeated lines
    exact_dedup: bool = False             # drop documents whose cleaned text was already seen
    minhash_threshold: Optional[float] = None  # near-dedup: drop if estimated Jaccard >= this with a kept doc


def dup_line_fraction(text: str) -> float:
    """Fraction of characters in lines that occur more than once (Gopher-style repetition measure)."""
    lines = [ln.strip() for ln in text.split("\n")]
    lines = [ln for ln in lines if ln]
    total = sum(len(ln) for ln in lines)
    if total == 0:
        return 0.0
    counts = Counter(lines)
    return sum(len(ln) for ln in lines if counts[ln] > 1) / total


def clean(text: str, cfg: CleanConfig) -> Union[str, tuple[str]]:
    """-> cleaned text, or a 1-tuple (filter name,) when the document is dropped."""
    if cfg.normalize:
        text = unicodedata.normalize(cfg.normalize, text)
    if cfg.strip_control:
        text = _CONTROL.sub("", text)
    if len(text.strip()) < max(cfg.min_chars, 1):
        return ("too_short",)
    if cfg.max_chars is not None and len(text) > cfg.max_chars:
        return ("too_long",)
    if cfg.max_dup_line_frac is not None and dup_line_fraction(text) > cfg.max_dup_line_frac:
        return ("repetition",)
    return text
