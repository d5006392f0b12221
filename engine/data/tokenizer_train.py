"""`tessera tokenizer train`: train a SentencePiece BPE/unigram tokenizer on text/JSONL (optionally compressed).

Writes OUTPUT.model, OUTPUT.vocab and OUTPUT.json (the special tokens and training settings). Use it as
`data.tokenizer: sentencepiece:OUTPUT.model`. EOD is the model's eos piece `</s>` (a control symbol, so no
text can produce it); byte_fallback keeps unseen characters lossless instead of mapping them to <unk>.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Iterator, Optional

from engine.data.sources import SourceError, iter_documents

MAX_SENTENCE_CHARS = 8192  # longer lines are cut: SentencePiece skips over-long sentences otherwise


def _sentences(inputs: list[str], text_mode: str, json_key: str) -> Iterator[str]:
    """Lines of every document: SentencePiece learns from "sentences"; newlines are not pieces."""
    for path in inputs:
        for doc in iter_documents(path, text_mode, json_key):  # type: ignore[arg-type]
            for line in doc.split("\n"):
                line = line.strip()
                while line:
                    yield line[:MAX_SENTENCE_CHARS]
                    line = line[MAX_SENTENCE_CHARS:]


def train_tokenizer(inputs: list[str], output: str, vocab_size: int, model_type: str = "bpe",
                    input_sentence_size: int = 2_000_000, byte_fallback: bool = True,
                    character_coverage: float = 0.9995, text_mode: str = "blank", json_key: str = "text",
                    threads: Optional[int] = None, user_symbols: tuple[str, ...] = ()) -> dict:
    """Train and write OUTPUT.model/.vocab/.json; returns the recorded metadata."""
    import sentencepiece as spm

    for path in inputs:
        if path != "builtin:pydoc" and not Path(path).is_file():
            raise SourceError(f"input file {path!r} does not exist")
    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"--model-type: expected bpe or unigram, found {model_type!r}")
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    try:
        spm.SentencePieceTrainer.Train(
            sentence_iterator=_sentences(inputs, text_mode, json_key),
            model_prefix=output,
            vocab_size=vocab_size,
            model_type=model_type,
            # sample this many sentences (uniformly, via shuffle) so 50k-100k vocabularies on big corpora fit in
            # memory and time; small corpora are used whole
            input_sentence_size=input_sentence_size,
            shuffle_input_sentence=True,
            byte_fallback=byte_fallback,
            character_coverage=character_coverage,
            max_sentence_length=MAX_SENTENCE_CHARS * 4,  # bytes
            # a small corpus cannot fill a large vocabulary: return what it supports instead of failing
            hard_vocab_limit=False,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            remove_extra_whitespaces=False,
            normalization_rule_name="identity",
            unk_id=0, bos_id=1, eos_id=2, pad_id=3,
            user_defined_symbols=list(user_symbols),
            num_threads=threads or os.cpu_count() or 1,
            minloglevel=2,
        )
    except RuntimeError as e:
        raise ValueError(f"tokenizer training on {inputs} failed: {e}") from None
    sp = spm.SentencePieceProcessor(model_file=f"{output}.model")
    # record the EOD that build_tokenizer will actually use (a user symbol like <|endoftext|> wins over </s>)
    from engine.data.tokenizers import SentencePieceTokenizer

    eod_id = SentencePieceTokenizer(f"{output}.model", f"sentencepiece:{output}.model").eod_id
    meta = {"model": f"{output}.model", "spec": f"sentencepiece:{output}.model", "vocab_size": sp.GetPieceSize(),
            "requested_vocab_size": vocab_size, "model_type": model_type, "byte_fallback": byte_fallback,
            "special_tokens": {"unk": ["<unk>", sp.unk_id()], "bos": ["<s>", sp.bos_id()],
                               "eod": [sp.IdToPiece(eod_id), eod_id], "pad": ["<pad>", sp.pad_id()],
                               **{s: [s, sp.PieceToId(s)] for s in user_symbols}},
            "inputs": list(inputs), "input_sentence_size": input_sentence_size}
    Path(f"{output}.json").write_text(json.dumps(meta, indent=1))
    return meta


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tessera tokenizer train",
                                description="Train a SentencePiece tokenizer (BPE or unigram).")
    p.add_argument("--input", nargs="+", required=True, metavar="FILE",
                   help="text/jsonl files (.gz/.zst ok) or builtin:pydoc")
    p.add_argument("--output", required=True, metavar="PREFIX", help="writes PREFIX.model, .vocab, .json")
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")
    p.add_argument("--input-sentence-size", type=int, default=2_000_000,
                   help="sentences sampled for training (0 = all); default 2M")
    p.add_argument("--no-byte-fallback", action="store_true", help="map unseen characters to <unk>")
    p.add_argument("--character-coverage", type=float, default=0.9995)
    p.add_argument("--text-mode", choices=["blank", "line"], default="blank")
    p.add_argument("--json-key", default="text")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--user-symbols", nargs="*", default=[], help="extra special tokens, e.g. <|im_start|>")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:  # accept both `tokenizer train ...` remainders and the bare options
        argv = argv[1:]
    args = _parser().parse_args(argv)
    if args.vocab_size < 8:
        print(f"tessera tokenizer train: --vocab-size must be >= 8, found {args.vocab_size}", file=sys.stderr)
        return 2
    try:
        meta = train_tokenizer(args.input, args.output, args.vocab_size, args.model_type, args.input_sentence_size,
                               not args.no_byte_fallback, args.character_coverage, args.text_mode, args.json_key,
                               args.threads, tuple(args.user_symbols))
    except (SourceError, ValueError) as e:
        print(f"tessera tokenizer train: error: {e}", file=sys.stderr)
        return 1
    eod_piece, eod_id = meta["special_tokens"]["eod"]
    print(f"wrote {meta['model']} (vocab {meta['vocab_size']}, requested {meta['requested_vocab_size']}; "
          f"eod {eod_piece!r} = {eod_id}); use data.tokenizer={meta['spec']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
