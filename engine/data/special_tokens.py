"""[CLS], [SEP], [MASK] and [PAD] for the masked-LM objectives, for every tokenizer kind.

A tokenizer that has these tokens already keeps them (Hugging Face: tokenizer_config.json / special_tokens_map.json
cls_token, sep_token, mask_token, pad_token, else tokens named [CLS], <s>, ... in the vocabulary; SentencePiece:
pieces named [CLS], <cls>, <s>, ..., or its pad id). Every role still missing gets a new id appended after the
vocabulary, in the order [CLS], [SEP], [MASK], [PAD]: the byte tokenizer (256 bytes + EOD = 256) gets
[CLS] 257, [SEP] 258, [MASK] 259, [PAD] 260 and a vocabulary of 261.

Only the mlm objectives use `with_special_tokens`: the causal objective's vocabulary (and so its checkpoints)
never changes. The wrapped tokenizer keeps the base tokenizer's spec (the data is tokenized by the base
tokenizer, which never produces an appended id); its fingerprint and record include the special tokens, so a
checkpoint records them and a run with other special tokens is refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from engine.data.tokenizers import (ByteTokenizer, HFTokenizer, SentencePieceTokenizer, Tokenizer, TokenizerError,
                                    build_tokenizer)

__all__ = ["SpecialTokens", "SpecialTokenizer", "with_special_tokens", "base_tokenizer", "tokenizer_for_objective",
           "ROLES", "MLM_OBJECTIVES"]

ROLES = ("cls", "sep", "mask", "pad")
MLM_OBJECTIVES = ("mlm", "mlm+nsp")
# The names an appended token is shown as (decode) and recorded under.
APPENDED_NAMES = {"cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]", "pad": "[PAD]"}
# Token / piece names searched for each role, in order of preference (BERT, XLNet, RoBERTa spellings).
CANDIDATES = {"cls": ("[CLS]", "<cls>", "<s>"), "sep": ("[SEP]", "<sep>", "</s>"),
              "mask": ("[MASK]", "<mask>"), "pad": ("[PAD]", "<pad>")}
_HF_CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json")


@dataclass(frozen=True)
class SpecialTokens:
    """The ids of the four tokens of a BERT sample, all different."""

    cls: int
    sep: int
    mask: int
    pad: int

    def ids(self) -> tuple[int, int, int, int]:
        return (self.cls, self.sep, self.mask, self.pad)

    def as_dict(self) -> dict[str, int]:
        return {r: int(getattr(self, r)) for r in ROLES}


class SpecialTokenizer:
    """A tokenizer plus its special tokens: vocab_size counts the appended ones; encode is the base tokenizer's
    (it never produces an appended id); decode shows appended ids by their names ([MASK], ...)."""

    def __init__(self, base: Tokenizer, special: SpecialTokens, names: dict[str, str], appended: int) -> None:
        self.base = base
        self.special_tokens = special
        self.token_names = dict(names)  # role -> the token's string
        self.appended = int(appended)   # ids base.vocab_size .. base.vocab_size + appended - 1
        self.vocab_size = int(base.vocab_size) + self.appended
        self.eod_id = int(base.eod_id)
        self.spec = base.spec
        path = getattr(base, "path", None)
        if path is not None:  # the checkpoint copies the tokenizer's file(s) from here
            self.path = path
        self._appended_names = {getattr(special, r): names[r] for r in ROLES
                                if getattr(special, r) >= base.vocab_size}

    @property
    def real_vocab_size(self) -> int:
        """Ids of the base tokenizer: random replacements of the masking are drawn from these."""
        return int(self.base.vocab_size)

    def encode(self, text: str) -> list[int]:
        return self.base.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        out: list[str] = []
        run: list[int] = []
        for i in ids:
            name = self._appended_names.get(int(i))
            if name is None:
                run.append(int(i))
                continue
            if run:
                out.append(self.base.decode(run))
                run = []
            out.append(name)
        if run:
            out.append(self.base.decode(run))
        return "".join(out)

    def __repr__(self) -> str:
        return (f"SpecialTokenizer({self.spec!r}, vocab {self.vocab_size}, {self.special_tokens.as_dict()}, "
                f"appended {self.appended})")


def base_tokenizer(tok: Tokenizer) -> Tokenizer:
    """The tokenizer that tokenizes the data (the wrapped one of a SpecialTokenizer, else tok itself)."""
    return getattr(tok, "base", tok)


def _hf_configured(tok: HFTokenizer) -> dict[str, str]:
    """role -> token string named by the tokenizer's tokenizer_config.json / special_tokens_map.json."""
    found: dict[str, str] = {}
    for name in _HF_CONFIG_FILES:
        try:
            cfg = json.loads((Path(tok.path).parent / name).read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(cfg, dict):
            continue
        for role in ROLES:
            value = cfg.get(f"{role}_token")
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str) and value and role not in found:
                found[role] = value
    return found


def _lookup(tok: Tokenizer) -> tuple[Callable[[str], Optional[int]], dict[str, str], dict[str, int]]:
    """-> (token string -> id or None, role -> configured token string, role -> id from the tokenizer itself)."""
    if isinstance(tok, HFTokenizer):
        return tok._tok.token_to_id, _hf_configured(tok), {}
    if isinstance(tok, SentencePieceTokenizer):
        sp = tok._sp

        def piece(s: str) -> Optional[int]:
            pid = int(sp.PieceToId(s))
            # PieceToId answers unk_id for an unknown piece: only an exact match counts
            return pid if 0 <= pid < tok.vocab_size and sp.IdToPiece(pid) == s else None

        own = {"pad": int(sp.pad_id())} if sp.pad_id() >= 0 else {}
        return piece, {}, own
    if isinstance(tok, ByteTokenizer):
        return (lambda s: None), {}, {}
    raise TokenizerError(f"tokenizer {getattr(tok, 'spec', tok)!r}: special tokens for the mlm objectives need "
                         f"a byte, sentencepiece or hf tokenizer, found {type(tok).__name__}")


def _decoded_name(tok: Tokenizer, i: int, fallback: str) -> str:
    if isinstance(tok, HFTokenizer):
        return tok._tok.id_to_token(i) or fallback
    if isinstance(tok, SentencePieceTokenizer):
        return tok._sp.IdToPiece(i)
    return fallback


def with_special_tokens(tok: Tokenizer) -> SpecialTokenizer:
    """tok with [CLS], [SEP], [MASK], [PAD]: its own tokens where it has them, else ids appended after its
    vocabulary (see the module doc). Every role gets its own id; a role whose token is already taken by an
    earlier role (e.g. pad_token = sep_token) gets an appended id. Idempotent."""
    if isinstance(tok, SpecialTokenizer):
        return tok
    lookup, configured, own = _lookup(tok)
    ids: dict[str, int] = {}
    names: dict[str, str] = {}
    appended = 0
    for role in ROLES:
        choice = None
        wanted = ([configured[role]] if role in configured else []) + list(CANDIDATES[role])
        for s in wanted:
            i = lookup(s)
            if i is not None and int(i) not in ids.values():
                choice, names[role] = int(i), s
                break
        if choice is None and role in own and own[role] not in ids.values():
            choice = own[role]
            names[role] = _decoded_name(tok, choice, APPENDED_NAMES[role])
        if choice is None:
            choice, names[role] = int(tok.vocab_size) + appended, APPENDED_NAMES[role]
            appended += 1
        ids[role] = choice
    return SpecialTokenizer(tok, SpecialTokens(**ids), names, appended)


def tokenizer_for_objective(spec: str, objective: str) -> Tokenizer:
    """The run's tokenizer: build_tokenizer(spec), with special tokens for the mlm objectives (the vocabulary
    the model is built for is its vocab_size)."""
    tok = build_tokenizer(spec)
    if objective in MLM_OBJECTIVES:
        return with_special_tokens(tok)
    if objective != "causal":
        raise TokenizerError(f"train.objective: expected causal, mlm or mlm+nsp, found {objective!r}")
    return tok
