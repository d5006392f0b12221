"""Which positions of a token sequence start a word, for whole-word masking.

Two tables per tokenizer, indexed by token id: `begins[id]` (the token starts a word whatever precedes it) and
`ends[id]` (the token after it starts a word). Position i starts a word when begins[ids[i]] or
ends[ids[i-1]]; position 0 always does. Special tokens ([CLS], [SEP], [MASK], [PAD], EOD, a tokenizer's
control / added tokens) are words of their own.

- byte: a word is a run of word bytes (ASCII letters, digits, "_", and every byte >= 0x80, so a UTF-8 character
  is never cut); every other byte (whitespace, punctuation) is a word of its own.
- sentencepiece: pieces starting with U+2581; control, unknown and user-defined pieces stand alone.
- hf WordPiece: tokens not starting with the model's continuing_subword_prefix ("##"); WordLevel: every token;
  byte-level BPE (a ByteLevel pre-tokenizer): tokens starting with "Ġ" (an encoded space), or after a token
  ending in encoded whitespace; Metaspace / "▁"-normalised models: tokens starting with U+2581.
Anything else cannot say where words start: word_starts_for raises a TokenizerError naming the tokenizer.
"""

from __future__ import annotations

import json
from typing import Iterable

import numpy as np

from engine.data.special_tokens import SpecialTokenizer, base_tokenizer
from engine.data.tokenizers import ByteTokenizer, HFTokenizer, SentencePieceTokenizer, Tokenizer, TokenizerError

__all__ = ["WordStarts", "word_starts_for"]

SP_SPACE = "\u2581"
# GPT-2's byte-to-unicode map sends the bytes 0..32 to U+0100..U+0120: the whitespace bytes \t \n \v \f \r and
# space become these characters in a byte-level BPE vocabulary ("Ġ" = space, "Ċ" = newline).
BYTE_LEVEL_SPACE = "\u0120"
BYTE_LEVEL_WHITESPACE = frozenset(chr(0x100 + b) for b in (9, 10, 11, 12, 13, 32))


class WordStarts:
    """Word-start tables of one tokenizer; calling it on ids int [S] gives bool [S] (True = starts a word)."""

    def __init__(self, begins: np.ndarray, ends: np.ndarray, kind: str) -> None:
        if begins.shape != ends.shape or begins.ndim != 1:
            raise ValueError(f"WordStarts: expected two tables of one shape, found {begins.shape}, {ends.shape}")
        self.begins = begins.astype(bool)  # [V]
        self.ends = ends.astype(bool)      # [V]
        self.kind = kind

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= len(self.begins)):
            raise ValueError(f"word starts ({self.kind}): expected token ids in [0, {len(self.begins)}), found "
                             f"[{int(ids.min())}, {int(ids.max())}]")
        out = self.begins[ids].copy()     # [S]
        if ids.size:
            out[1:] |= self.ends[ids[:-1]]
            out[0] = True
        return out


def _mark_alone(begins: np.ndarray, ends: np.ndarray, ids: Iterable[int]) -> None:
    for i in ids:
        if 0 <= int(i) < len(begins):
            begins[int(i)] = ends[int(i)] = True


def _byte_tables(vocab: int) -> tuple[np.ndarray, np.ndarray]:
    b = np.arange(256)
    word = ((b >= ord("0")) & (b <= ord("9"))) | ((b >= ord("A")) & (b <= ord("Z"))) \
        | ((b >= ord("a")) & (b <= ord("z"))) | (b == ord("_")) | (b >= 0x80)
    begins = np.ones(vocab, dtype=bool)
    begins[:256] = ~word
    return begins, begins.copy()  # a non-word byte is a word by itself: the next byte starts one as well


def _sp_tables(tok: SentencePieceTokenizer, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    model = sp_pb2.ModelProto()
    model.ParseFromString(tok._sp.serialized_model_proto())
    kinds = sp_pb2.ModelProto.SentencePiece
    standalone = (kinds.UNKNOWN, kinds.CONTROL, kinds.USER_DEFINED, kinds.UNUSED)
    begins, ends = np.ones(vocab, dtype=bool), np.ones(vocab, dtype=bool)
    for i, p in enumerate(model.pieces[:tok.vocab_size]):
        alone = p.type in standalone
        begins[i] = alone or p.piece.startswith(SP_SPACE)
        ends[i] = alone
    return begins, ends


def _json_types(node) -> set[str]:
    """Every "type" value in a tokenizer.json subtree (a Sequence pre-tokenizer nests its parts)."""
    out: set[str] = set()
    if isinstance(node, dict):
        if isinstance(node.get("type"), str):
            out.add(node["type"])
        for v in node.values():
            out |= _json_types(v)
    elif isinstance(node, list):
        for v in node:
            out |= _json_types(v)
    return out


def _hf_tables(tok: HFTokenizer, vocab: int) -> tuple[np.ndarray, np.ndarray, str]:
    try:
        conf = json.loads(tok.path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise TokenizerError(f"tokenizer {tok.spec!r}: cannot read {str(tok.path)!r} to find word starts ({e})") \
            from None
    model = conf.get("model") or {}
    mtype = model.get("type")
    pre = _json_types(conf.get("pre_tokenizer"))
    metaspace = "Metaspace" in pre or "Metaspace" in _json_types(conf.get("decoder")) \
        or SP_SPACE in json.dumps(conf.get("normalizer"), ensure_ascii=False)
    pieces = [tok._tok.id_to_token(i) or "" for i in range(tok.vocab_size)]
    begins, ends = np.ones(vocab, dtype=bool), np.ones(vocab, dtype=bool)
    if mtype == "WordPiece":
        prefix = model.get("continuing_subword_prefix") or "##"
        kind = f"WordPiece ({prefix!r} continues a word)"
        begins[:len(pieces)] = [not p.startswith(prefix) for p in pieces]
        ends[:len(pieces)] = False
    elif mtype == "WordLevel":
        kind = "WordLevel (every token a word)"
    elif "ByteLevel" in pre:
        kind = "byte-level BPE ('Ġ' starts a word)"
        begins[:len(pieces)] = [p.startswith(BYTE_LEVEL_SPACE) for p in pieces]
        ends[:len(pieces)] = [bool(p) and p[-1] in BYTE_LEVEL_WHITESPACE for p in pieces]
    elif metaspace:
        kind = f"{mtype} with '\u2581' word starts"
        begins[:len(pieces)] = [p.startswith(SP_SPACE) for p in pieces]
        ends[:len(pieces)] = False
    else:
        raise TokenizerError(
            f"whole-word masking: tokenizer {tok.spec!r} (model {mtype}, pre-tokenizer "
            f"{', '.join(sorted(pre)) or 'none'}) does not mark where words start; expected a WordPiece or "
            f"WordLevel model, a ByteLevel pre-tokenizer ('Ġ') or Metaspace ('\u2581') pieces; set "
            f"train.whole_word_masking=false")
    # added tokens (special or not) are matched whole, before the model splits the text: words of their own
    _mark_alone(begins, ends, (int(t["id"]) for t in conf.get("added_tokens") or [] if "id" in t))
    return begins, ends, kind


def word_starts_for(tok: Tokenizer) -> WordStarts:
    """The word-start tables of tok (a SpecialTokenizer's special ids stand alone). Raises TokenizerError, naming
    the tokenizer, when it cannot say where words start."""
    base = base_tokenizer(tok)
    vocab = int(tok.vocab_size)
    if isinstance(base, ByteTokenizer):
        begins, ends = _byte_tables(vocab)
        kind = "byte"
    elif isinstance(base, SentencePieceTokenizer):
        begins, ends = _sp_tables(base, vocab)
        kind = "sentencepiece ('\u2581' starts a word)"
    elif isinstance(base, HFTokenizer):
        begins, ends, kind = _hf_tables(base, vocab)
    else:
        raise TokenizerError(f"whole-word masking: tokenizer {getattr(tok, 'spec', tok)!r} "
                             f"({type(base).__name__}) cannot mark where words start; expected a byte, "
                             f"sentencepiece or hf tokenizer, or set train.whole_word_masking=false")
    alone = [base.eod_id]
    if isinstance(tok, SpecialTokenizer):
        alone += list(tok.special_tokens.ids())
    _mark_alone(begins, ends, alone)
    begins[base.vocab_size:] = ends[base.vocab_size:] = True  # appended ids: special tokens
    return WordStarts(begins, ends, f"{tok.spec}: {kind}")
