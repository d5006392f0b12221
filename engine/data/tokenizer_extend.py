"""`tessera tokenizer extend`: grow a tokenizer by new tokens, keeping every existing id.

For a new domain or language: the new tokens get the ids after the existing vocabulary (old ids, and so
the rows of a model trained with the old tokenizer, keep their meaning), and a run that starts from that
model with `checkpoint.new_token_init` grows its embedding and head by the new rows (engine/train/
vocab_extension.py).

- Hugging Face `tokenizers` JSON (hf:PATH, a tokenizer.json or a directory holding one): the tokens are
  added as added tokens (matched before the model's own splitting), written as OUTPUT/tokenizer.json with
  the directory's other tokenizer files copied.
- SentencePiece (sentencepiece:PATH.model): the tokens are appended to the model as user-defined pieces,
  written as OUTPUT.model.
The byte tokenizer has a fixed vocabulary (256 bytes + EOD): it cannot grow.

Tokens already in the vocabulary are skipped (and reported); one per line in --tokens-file, or --add.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Optional, Sequence

from engine.data.tokenizers import TokenizerError, build_tokenizer

__all__ = ["extend_tokenizer", "main", "vocabulary_prefix_matches"]

_HF_SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def _hf(path: Path, tokens: list[str], out: Path) -> tuple[str, list[str]]:
    from tokenizers import AddedToken, Tokenizer

    src = path / "tokenizer.json" if path.is_dir() else path
    tok = Tokenizer.from_file(str(src))
    vocab = tok.get_vocab(with_added_tokens=True)
    new = [t for t in dict.fromkeys(tokens) if t not in vocab]
    tok.add_tokens([AddedToken(t, normalized=False) for t in new])
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    for name in _HF_SIDE_FILES:
        if (src.parent / name).is_file() and not (out / name).exists():
            shutil.copy2(src.parent / name, out / name)
    return f"hf:{out}", new


def _sentencepiece(path: Path, tokens: list[str], out: Path) -> tuple[str, list[str]]:
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    model = sp_pb2.ModelProto()
    model.ParseFromString(path.read_bytes())
    have = {p.piece for p in model.pieces}
    new = [t for t in dict.fromkeys(tokens) if t not in have]
    for t in new:
        piece = model.pieces.add()
        piece.piece, piece.score, piece.type = t, 0.0, sp_pb2.ModelProto.SentencePiece.USER_DEFINED
    target = out if out.suffix == ".model" else out.with_name(out.name + ".model")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(model.SerializeToString())
    return f"sentencepiece:{target}", new


def extend_tokenizer(spec: str, tokens: Sequence[str], output: str | Path) -> tuple[str, list[str]]:
    """Write the grown tokenizer; returns (its spec, the tokens actually added). Old ids are checked to be
    unchanged in the result."""
    old = build_tokenizer(spec)  # a clear error for a missing or broken file
    kind, _, path = spec.partition(":")
    tokens = [t for t in tokens if t]
    if not tokens:
        raise TokenizerError("tokenizer extend: expected at least one new token, found none")
    out = Path(output)
    if kind == "hf":
        new_spec, added = _hf(Path(path).expanduser(), list(tokens), out)
    elif kind == "sentencepiece":
        new_spec, added = _sentencepiece(Path(path).expanduser(), list(tokens), out)
    else:
        raise TokenizerError(f"tokenizer extend: {spec!r} has a fixed vocabulary; expected hf:PATH or "
                             f"sentencepiece:PATH")
    grown = build_tokenizer(new_spec)
    if not vocabulary_prefix_matches(old, grown):  # the promise of this command: a bug if broken
        raise AssertionError(f"tokenizer extend: the ids of {spec!r} changed in {new_spec!r}")
    return new_spec, added


def _pieces(tok, n: int) -> Optional[list[str]]:
    if hasattr(tok, "_tok"):  # HFTokenizer
        return [tok._tok.id_to_token(i) for i in range(n)]
    if hasattr(tok, "_sp"):  # SentencePieceTokenizer
        return [tok._sp.IdToPiece(i) for i in range(n)]
    return None


def vocabulary_prefix_matches(old, new) -> bool:
    """Whether `new` gives every id of `old` the same token (and keeps its end-of-document id): a model
    trained with `old` means the same by its rows under `new`."""
    if new.vocab_size < old.vocab_size or old.eod_id != new.eod_id:
        return False
    if old.spec == "byte" or new.spec == "byte":
        return old.spec == new.spec
    a, b = _pieces(old, old.vocab_size), _pieces(new, old.vocab_size)
    return a is not None and a == b


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="tessera tokenizer extend", description=__doc__.split("\n\n")[0])
    p.add_argument("--tokenizer", required=True, help="hf:PATH or sentencepiece:PATH")
    p.add_argument("--tokens-file", help="new tokens, one per line")
    p.add_argument("--add", nargs="*", default=[], help="new tokens on the command line")
    p.add_argument("--output", required=True, help="a directory (hf) or OUTPUT[.model] (sentencepiece)")
    a = p.parse_args(argv)
    tokens = list(a.add)
    if a.tokens_file:
        try:
            tokens += [line.rstrip("\n") for line in Path(a.tokens_file).read_text(encoding="utf-8").splitlines()]
        except (OSError, UnicodeDecodeError) as e:
            raise TokenizerError(f"--tokens-file {a.tokens_file!r}: cannot be read as UTF-8 text ({e})") from None
    spec, added = extend_tokenizer(a.tokenizer, tokens, a.output)
    grown = build_tokenizer(spec)
    print(f"tessera: {len(added)} token(s) added ({len(tokens) - len(added)} already present); vocabulary "
          f"{grown.vocab_size}; use data.tokenizer: {spec}", file=sys.stderr)
    return 0
