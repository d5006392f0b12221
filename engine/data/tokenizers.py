"""Tokenizers behind one small protocol: byte-level, SentencePiece model files, HF `tokenizers` JSON.

`build_tokenizer(spec)` is the only constructor the rest of the engine uses; the spec string is
stored with every preprocessed dataset so a mismatch is caught before training starts.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Protocol, Sequence, runtime_checkable

from engine.errors import TokenizerProblem


class TokenizerError(TokenizerProblem):
    """A tokenizer file is missing or invalid, or data was built with another tokenizer."""


@runtime_checkable
class Tokenizer(Protocol):
    vocab_size: int  # number of ids the model must embed (all ids < vocab_size)
    eod_id: int      # appended after every document
    spec: str        # the string build_tokenizer was called with

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255 and EOD = 256, so vocab_size = 257. Needs no file."""

    def __init__(self) -> None:
        self.vocab_size = 257
        self.eod_id = 256
        self.spec = "byte"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        # ids >= 256 (EOD, padding) carry no text; broken UTF-8 (a sample cut mid-character) becomes U+FFFD.
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


# Piece names we look for as the end-of-document token, in order of preference.
_EOD_PIECES = ("<|endoftext|>", "</s>", "<eos>", "<eod>", "[EOS]", "<|end_of_text|>")


class SentencePieceTokenizer:
    """A SentencePiece `.model` file; EOD is the model's eos id (or a user-defined <|endoftext|>)."""

    def __init__(self, path: str, spec: str) -> None:
        try:
            import sentencepiece as spm
        except ImportError as e:  # pragma: no cover - dependency is listed in pyproject
            raise TokenizerError(f"tokenizer {spec!r}: the sentencepiece package is not installed ({e})") from None
        self.path = _existing_file(path, spec)
        self._sp = spm.SentencePieceProcessor()
        try:
            ok = self._sp.Load(str(self.path))
        except Exception as e:  # sentencepiece raises OSError/RuntimeError with a terse message
            raise TokenizerError(f"tokenizer {spec!r}: {self.path} is not a valid SentencePiece model "
                                 f"(expected a .model protobuf, found: {e})") from None
        if not ok:
            raise TokenizerError(f"tokenizer {spec!r}: {self.path} could not be loaded as a SentencePiece model")
        self.spec = spec
        self.vocab_size = int(self._sp.GetPieceSize())
        eod = -1
        for piece in _EOD_PIECES:
            pid = self._sp.PieceToId(piece)
            if pid != self._sp.unk_id() and pid >= 0:
                eod = pid
                break
        if eod < 0:
            eod = self._sp.eos_id()
        if eod < 0:
            raise TokenizerError(f"tokenizer {spec!r}: {self.path} has no end-of-document token (expected an eos "
                                 f"id or one of {', '.join(_EOD_PIECES)}; found none)")
        self.eod_id = int(eod)

    def encode(self, text: str) -> list[int]:
        return list(self._sp.EncodeAsIds(text))

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.DecodeIds([int(i) for i in ids if 0 <= int(i) < self.vocab_size])


class HFTokenizer:
    """A Hugging Face `tokenizers` JSON file (tokenizer.json), or a model directory holding one. EOD is the
    directory's eos_token (tokenizer_config.json) when it names one, else found among the special tokens."""

    def __init__(self, path: str, spec: str) -> None:
        try:
            from tokenizers import Tokenizer as _HFTok
        except ImportError as e:  # pragma: no cover
            raise TokenizerError(f"tokenizer {spec!r}: the tokenizers package is not installed ({e})") from None
        if path and Path(path).expanduser().is_dir():
            d = Path(path).expanduser()
            if not (d / "tokenizer.json").is_file():
                found = ", ".join(sorted(p.name for p in d.iterdir())[:8]) or "nothing"
                raise TokenizerError(f"tokenizer {spec!r}: expected a tokenizer.json in the directory {str(d)!r}, "
                                     f"found {found}")
            path = str(d / "tokenizer.json")
        self.path = _existing_file(path, spec)
        try:
            self._tok = _HFTok.from_file(str(self.path))
        except Exception as e:
            raise TokenizerError(f"tokenizer {spec!r}: {self.path} is not a valid tokenizers JSON file "
                                 f"(expected a tokenizer.json, found: {str(e)[:200]})") from None
        self.spec = spec
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        eod = None
        # [SEP] last: a BERT tokenizer has no end-of-text token, and [SEP] is where its documents are cut
        for piece in _configured_eos(self.path.parent) + _EOD_PIECES + ("<|im_end|>", "<|eot_id|>", "[SEP]"):
            eod = self._tok.token_to_id(piece)
            if eod is not None:
                break
        if eod is None:
            raise TokenizerError(f"tokenizer {spec!r}: {self.path} has no end-of-document token (expected one of "
                                 f"{', '.join(_EOD_PIECES)}; found none)")
        self.eod_id = int(eod)

    def encode(self, text: str) -> list[int]:
        # No special tokens added: the pipeline appends EOD itself, once per document.
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids if 0 <= int(i) < self.vocab_size])


def _configured_eos(d: Path) -> tuple[str, ...]:
    """The eos_token of a Hugging Face tokenizer_config.json next to the tokenizer, if there is one."""
    try:
        eos = json.loads((d / "tokenizer_config.json").read_text()).get("eos_token")
    except (OSError, ValueError, AttributeError):
        return ()
    if isinstance(eos, dict):
        eos = eos.get("content")
    return (eos,) if isinstance(eos, str) and eos else ()


def _existing_file(path: str, spec: str) -> Path:
    p = Path(path).expanduser()
    if not path:
        raise TokenizerError(f"tokenizer {spec!r}: expected a file path after the ':', found nothing")
    if not p.is_file():
        raise TokenizerError(f"tokenizer {spec!r}: file {str(p)!r} does not exist")
    return p


def build_tokenizer(spec: str) -> Tokenizer:
    """"byte" | "sentencepiece:PATH" | "hf:PATH" -> a Tokenizer. Raises TokenizerError naming the path."""
    if spec == "byte":
        return ByteTokenizer()
    kind, sep, path = spec.partition(":")
    if sep and kind == "sentencepiece":
        return SentencePieceTokenizer(path, spec)
    if sep and kind == "hf":
        return HFTokenizer(path, spec)
    raise TokenizerError(f'tokenizer: expected "byte", "sentencepiece:PATH" or "hf:PATH", found {spec!r}')


def tokenizer_fingerprint(tok: Tokenizer) -> str:
    """A short hash identifying the tokenizer's vocabulary (the model file's bytes), for cache keys and checks."""
    h = hashlib.sha256(tok.spec.split(":", 1)[0].encode())
    path = getattr(tok, "path", None)
    if path is not None:
        h.update(Path(path).read_bytes())
    h.update(f"{tok.vocab_size}:{tok.eod_id}".encode())
    special = _special_ids(tok)
    if special is not None:  # the mlm objectives' [CLS]/[SEP]/[MASK]/[PAD] (engine/data/special_tokens.py)
        h.update(json.dumps({"special_tokens": special}, sort_keys=True).encode())
    return h.hexdigest()[:16]


def _special_ids(tok: Tokenizer) -> dict | None:
    """{"cls": id, "sep": id, "mask": id, "pad": id} of a tokenizer with special tokens, else None (a plain
    tokenizer: its fingerprint and record stay what they always were)."""
    special = getattr(tok, "special_tokens", None)
    return None if special is None else special.as_dict()


def tokenizer_record(tok: Tokenizer) -> dict:
    """What a checkpoint records of the tokenizer it was trained with (compared when it is loaded)."""
    record = {"spec": tok.spec, "fingerprint": tokenizer_fingerprint(tok), "vocab_size": int(tok.vocab_size),
              "eod_id": int(tok.eod_id)}
    special = _special_ids(tok)
    if special is not None:
        record["special_tokens"] = special
    return record
