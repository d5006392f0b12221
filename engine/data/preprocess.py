"""`tessera preprocess`: text/JSONL (optionally gzip/zstd) -> cleaned, deduplicated, tokenized PREFIX.bin/.idx.

Pipeline (streamed, memory flat in the input size):
  main process: read documents in order -> batches -> workers: clean, tokenize (+EOD), hash, MinHash
  -> main process, in input order: dedup decisions, write to the .bin, progress bar.
At most 2*workers batches are in flight, so a huge input never piles up in queues. Results are consumed in
submission order, so N workers write exactly the bytes 1 worker writes.
A PREFIX.meta.json sidecar records the tokenizer and the largest token id, so a dataset is never trained with
the wrong tokenizer or with ids the model cannot embed (check_tokenizer); invalid UTF-8 bytes of the inputs
are replaced by U+FFFD and counted per input in the summary.
"""

from __future__ import annotations

import argparse
import collections
import multiprocessing as mp
import os
import signal
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import numpy as np

from engine.data.cleaning import CleanConfig, clean
from engine.data.dedup import Deduplicator, content_hash, minhash_signature
from engine.data.indexed import (META_SUFFIX, IndexedDataset, IndexedDatasetWriter, bin_path, meta_path, read_meta,
                                 token_dtype)
from engine.data.sources import BUILTIN_PYDOC, SourceError, SourceReport, TextMode, check_text_file, iter_documents
from engine.data.tokenizers import (ByteTokenizer, Tokenizer, TokenizerError, build_tokenizer,
                                   tokenizer_fingerprint)
from engine.errors import ConfigError, DataError

BATCH_DOCS = 128          # a batch ends at this many documents ...
BATCH_CHARS = 1 << 18     # ... or this many characters, so workers get even, small pieces of work
VERIFY_MODES = ("meta", "scan")
__all__ = ["META_SUFFIX", "PreprocessStats", "SourceError", "check_tokenizer", "main", "preprocess", "read_meta"]


@dataclass
class PreprocessStats:
    docs_in: int = 0
    docs_out: int = 0
    tokens: int = 0
    bytes_in: int = 0
    seconds: float = 0.0
    removed: dict[str, int] = field(default_factory=dict)
    invalid_utf8: dict[str, int] = field(default_factory=dict)  # input -> invalid bytes replaced by U+FFFD

    def summary(self) -> str:
        mb = self.bytes_in / 1e6
        rate = mb / self.seconds if self.seconds > 0 else float("inf")
        tps = self.tokens / self.seconds if self.seconds > 0 else float("inf")
        lines = [f"documents: {self.docs_in} read, {self.docs_out} written; tokens: {self.tokens}; "
                 f"input: {mb:.2f} MB in {self.seconds:.2f} s ({rate:.2f} MB/s, {tps:,.0f} tokens/s)"]
        for name, n in sorted(self.removed.items()):
            lines.append(f"  removed by {name}: {n} documents")
        if not self.removed:
            lines.append("  no document removed by the filters")
        for path, n in self.invalid_utf8.items():
            if n:
                lines.append(f"  {n} invalid UTF-8 bytes replaced in {path} (by U+FFFD)")
        return "\n".join(lines)


# --------------------------------------------------------------------------- worker side

_worker_tok: Optional[Tokenizer] = None
_worker_cfg: Optional[CleanConfig] = None
_worker_dtype: np.dtype = np.dtype(np.uint16)


def _init_worker(tokenizer_spec: str, cfg: CleanConfig) -> None:
    global _worker_tok, _worker_cfg, _worker_dtype
    if mp.parent_process() is not None:  # a pool worker: the main process alone handles interrupts
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one thread per worker process
    _worker_tok = build_tokenizer(tokenizer_spec)
    _worker_cfg = cfg
    _worker_dtype = token_dtype(_worker_tok.vocab_size)


def _encode(tok: Tokenizer, text: str) -> np.ndarray:
    """Token ids with EOD appended -> int64 [n + 1]. Bytes skip the Python list (the main cost otherwise)."""
    if isinstance(tok, ByteTokenizer):
        raw = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
        out = np.empty(raw.size + 1, dtype=np.int64)
        out[:-1] = raw
    else:
        ids = tok.encode(text)
        out = np.empty(len(ids) + 1, dtype=np.int64)
        out[:-1] = ids
    out[-1] = tok.eod_id
    return out


def _process_batch(texts: list[str]) -> list[tuple]:
    """-> per document (n_bytes, dropped_by) or (n_bytes, token bytes in the dataset dtype, digest, signature).

    Tokens travel back as raw bytes of the final dtype: pickling them is far cheaper than int lists/arrays.
    """
    assert _worker_tok is not None and _worker_cfg is not None
    out = []
    for text in texts:
        n_bytes = len(text.encode("utf-8", errors="replace"))
        res = clean(text, _worker_cfg)
        if isinstance(res, tuple):
            out.append((n_bytes, res[0]))
            continue
        ids = _encode(_worker_tok, res).astype(_worker_dtype).tobytes()
        digest = content_hash(res) if _worker_cfg.exact_dedup else None
        sig = minhash_signature(res) if _worker_cfg.minhash_threshold is not None else None
        out.append((n_bytes, ids, digest, sig))
    return out


# --------------------------------------------------------------------------- main side


def _batches(docs: Iterable[str], n: int, max_chars: int = BATCH_CHARS) -> Iterator[list[str]]:
    batch: list[str] = []
    chars = 0
    for d in docs:
        batch.append(d)
        chars += len(d)
        if len(batch) == n or chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _results(batches: Iterator[list[str]], tokenizer_spec: str, cfg: CleanConfig, workers: int
             ) -> Iterator[list[tuple]]:
    """Batch results in input order, with at most 2*workers batches in flight."""
    if workers <= 1:
        _init_worker(tokenizer_spec, cfg)
        for b in batches:
            yield _process_batch(b)
        return
    # forkserver, not fork: the caller may hold threads (torch, tqdm) and fork() of a threaded process can
    # deadlock the child; the fork server starts clean and imports only this module (no torch).
    methods = mp.get_all_start_methods()
    ctx = mp.get_context("forkserver" if "forkserver" in methods else "spawn")
    if ctx.get_start_method() == "forkserver":
        # imported once in the server, inherited by every worker (else each worker imports it: ~0.3 s apiece)
        ctx.set_forkserver_preload(["engine.data.preprocess"])
    # ProcessPoolExecutor, not Pool: a worker that dies (OOM-killed) raises BrokenProcessPool here instead of
    # leaving the main process waiting forever.
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                             initargs=(tokenizer_spec, cfg)) as pool:
        pending: collections.deque = collections.deque()
        try:
            for b in batches:
                pending.append(pool.submit(_process_batch, b))
                if len(pending) >= 2 * workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        except BrokenProcessPool as e:
            raise DataError(f"preprocess: a worker process died ({e}); if it was killed for memory, use fewer "
                            f"--workers") from None
        except BaseException:
            # An interrupt (SIGINT, SIGTERM) or an error: stop the workers now. Leaving the `with` would wait
            # for the queued batches, and a pool whose workers were signalled too can wait for ever.
            workers_alive = list((getattr(pool, "_processes", None) or {}).values())  # before shutdown clears it
            pool.shutdown(wait=False, cancel_futures=True)
            for proc in workers_alive:
                proc.terminate()
            raise
        finally:
            for f in pending:
                f.cancel()


def check_tokenizer(prefix: str | os.PathLike, tokenizer: Tokenizer, model_vocab_size: int = 0,
                    verify_token_ids: str = "meta", dataset: Optional[IndexedDataset] = None,
                    scan_if_unrecorded: bool = True) -> None:
    """Check that PREFIX can be trained with this tokenizer and a model of model_vocab_size ids (0: the
    tokenizer's): TokenizerError if it was built with another tokenizer, DataError if a token id is outside
    [0, vocab). verify_token_ids="meta" trusts the max id recorded in PREFIX.meta.json and scans the .bin only
    when none is recorded; "scan" always scans (and compares with what is recorded).
    scan_if_unrecorded=False skips the scan (a rank that is not the builder: the builder has scanned).
    """
    if verify_token_ids not in VERIFY_MODES:
        raise ConfigError(f"data.verify_token_ids: expected one of {', '.join(VERIFY_MODES)}, found "
                          f"{verify_token_ids!r}")
    name = os.fspath(prefix)
    ds = dataset if dataset is not None else IndexedDataset(prefix)
    meta = ds.meta
    recorded = meta is not None and "tokenizer_fingerprint" in meta
    if recorded and meta.get("tokenizer_fingerprint") != tokenizer_fingerprint(tokenizer):
        raise TokenizerError(f"dataset {name!r} was built with tokenizer {meta.get('tokenizer')!r} "
                             f"(vocab {meta.get('vocab_size')}), but the run uses {tokenizer.spec!r} (vocab "
                             f"{tokenizer.vocab_size}); re-run `tessera preprocess` with the run's tokenizer")
    if recorded and model_vocab_size and int(meta.get("vocab_size", 0)) > model_vocab_size:
        raise TokenizerError(f"dataset {name!r}: its tokenizer has {meta['vocab_size']} ids, larger "
                             f"than model.vocab_size={model_vocab_size}")
    vocab = model_vocab_size or tokenizer.vocab_size
    has_range = meta is not None and "max_token_id" in meta and "min_token_id" in meta
    if has_range and verify_token_ids == "meta":
        lo, hi, how = meta["min_token_id"], meta["max_token_id"], f"as recorded in {meta_path(prefix)}"
    elif scan_if_unrecorded or verify_token_ids == "scan":
        rng = ds.token_range()
        lo, hi = (None, None) if rng is None else rng
        how = f"found by scanning {bin_path(prefix)}"
        if has_range and (lo, hi) != (meta["min_token_id"], meta["max_token_id"]):
            raise DataError(f"dataset {name!r}: {meta_path(prefix)} records token ids in "
                            f"[{meta['min_token_id']}, {meta['max_token_id']}], but {bin_path(prefix)} holds ids in "
                            f"[{lo}, {hi}]: the .bin was changed after it was written; re-run the preprocessing")
    else:
        return
    unrecorded = "" if recorded else (f"; no tokenizer is recorded for this data ({meta_path(prefix).name} "
                                      f"{'is missing' if meta is None else 'names none'}), so nothing shows it was "
                                      f"tokenized with {tokenizer.spec!r}")
    if hi is not None and (hi >= vocab or lo < 0):
        what = (f"model.vocab_size={model_vocab_size}" if model_vocab_size
                else f"tokenizer {tokenizer.spec!r}, {tokenizer.vocab_size} ids")
        raise DataError(f"dataset {name!r}: expected token ids in [0, {vocab}) for the model vocabulary ({what}), "
                        f"found ids in [{lo}, {hi}] ({how}){unrecorded}; re-run `tessera preprocess` with the "
                        f"run's tokenizer or fix model.vocab_size")
    if unrecorded:
        warnings.warn(f"dataset {name!r}: its token ids [{lo}, {hi}] fit the vocabulary of {vocab} ({how})"
                      f"{unrecorded}", UserWarning, stacklevel=2)


def preprocess(inputs: list[str], output_prefix: str, tokenizer_spec: str, workers: int = 1,
               text_mode: TextMode = "blank", json_key: str = "text", cfg: CleanConfig = CleanConfig(),
               progress: bool = True, log: Callable[[str], None] = print) -> PreprocessStats:
    """Write OUTPUT_PREFIX.bin/.idx/.meta.json from the inputs (in order). Returns the statistics."""
    tok = build_tokenizer(tokenizer_spec)  # fail fast in the main process, before any worker starts
    for path in inputs:  # every input exists and is text, before anything is written
        if path != BUILTIN_PYDOC:
            check_text_file(path)
    stats = PreprocessStats()
    dedup = Deduplicator(cfg.exact_dedup, cfg.minhash_threshold)
    removed: collections.Counter = collections.Counter()
    reports = [SourceReport(path) for path in inputs]
    docs = (d for r in reports for d in iter_documents(r.path, text_mode, json_key, report=r))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(unit=" docs", desc=f"preprocess {Path(output_prefix).name}", file=sys.stderr, mininterval=0.5)
    t0 = time.perf_counter()
    dtype = token_dtype(tok.vocab_size)
    with IndexedDatasetWriter(output_prefix, dtype) as writer:  # nothing replaced unless all inputs read
        for batch in _results(_batches(docs, BATCH_DOCS), tokenizer_spec, cfg, workers):
            for item in batch:
                stats.docs_in += 1
                stats.bytes_in += item[0]
                if len(item) == 2:
                    removed[item[1]] += 1
                    continue
                _, ids, digest, sig = item
                why = dedup.seen(digest, sig)
                if why is not None:
                    removed[why] += 1
                    continue
                n_tokens = len(ids) // dtype.itemsize
                writer.add_raw(ids, n_tokens)
                stats.docs_out += 1
                stats.tokens += n_tokens
            if bar is not None:
                bar.update(len(batch))
                dt = max(time.perf_counter() - t0, 1e-9)
                bar.set_postfix_str(f"{stats.tokens:,} tokens, {stats.bytes_in / 1e6 / dt:.2f} MB/s", refresh=False)
        stats.removed = dict(removed)
        stats.invalid_utf8 = {r.path: r.invalid_bytes for r in reports if r.invalid_bytes}
        # .bin, .idx and meta.json are renamed into place together (see IndexedDatasetWriter.finalize)
        writer.finalize({"tokenizer": tok.spec, "tokenizer_fingerprint": tokenizer_fingerprint(tok),
                         "vocab_size": tok.vocab_size, "eod_id": tok.eod_id, "inputs": list(inputs),
                         "text_mode": text_mode, "json_key": json_key, "cleaning": asdict(cfg),
                         "removed": stats.removed, "invalid_utf8_bytes": stats.invalid_utf8})
    if bar is not None:
        bar.close()
    stats.seconds = time.perf_counter() - t0
    log(stats.summary())
    return stats


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tessera preprocess",
                                description="Tokenize text/JSONL files (optionally .gz/.zst) into a Megatron "
                                            ".bin/.idx dataset, with cleaning and deduplication.")
    p.add_argument("--input", nargs="+", required=True, metavar="FILE",
                   help="input files (text, .jsonl; .gz/.zst compressed) or builtin:pydoc")
    p.add_argument("--output-prefix", required=True, metavar="P", help="writes P.bin, P.idx and P.meta.json")
    p.add_argument("--tokenizer", required=True, metavar="SPEC", help='"byte", "sentencepiece:PATH" or "hf:PATH"')
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes (default 1)")
    p.add_argument("--text-mode", choices=["blank", "line"], default="blank",
                   help="plain text: one document per blank-line-separated block (blank) or per line")
    p.add_argument("--json-key", default="text", help="JSONL: key holding the document text (default text)")
    p.add_argument("--normalize", default="NFC", help="unicode normal form, or 'none' (default NFC)")
    p.add_argument("--keep-control", action="store_true", help="keep control characters")
    p.add_argument("--min-chars", type=int, default=1, help="drop documents shorter than this (default 1)")
    p.add_argument("--max-chars", type=int, default=None, help="drop documents longer than this")
    p.add_argument("--max-dup-line-frac", type=float, default=None,
                   help="drop documents with more than this fraction of characters in repeated lines (e.g. 0.3)")
    p.add_argument("--no-dedup", action="store_true", help="keep exact duplicates (dedup is on by default)")
    p.add_argument("--minhash", type=float, default=None, metavar="JACCARD",
                   help="near-dedup: drop documents whose estimated Jaccard similarity with a kept one is >= this "
                        "(e.g. 0.8)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = _parser().parse_args(argv)
    if args.workers < 1:
        print(f"tessera preprocess: --workers must be >= 1, found {args.workers}", file=sys.stderr)
        return 2
    cfg = CleanConfig(normalize=None if args.normalize.lower() == "none" else args.normalize,
                      strip_control=not args.keep_control, min_chars=args.min_chars, max_chars=args.max_chars,
                      max_dup_line_frac=args.max_dup_line_frac, exact_dedup=not args.no_dedup,
                      minhash_threshold=args.minhash)
    if cfg.normalize and cfg.normalize not in ("NFC", "NFKC", "NFD", "NFKD"):
        print(f"tessera preprocess: --normalize: expected NFC, NFKC, NFD, NFKD or none, found {args.normalize!r}",
              file=sys.stderr)
        return 2
    # Errors (data 3, tokenizer 4, engine/errors.py) and interrupts are printed by the CLI's one error path
    # (engine/cli.py main), which also honours --debug.
    preprocess(args.input, args.output_prefix, args.tokenizer, args.workers, args.text_mode, args.json_key,
               cfg, progress=not args.no_progress)
    return 0


if __name__ == "__main__":  # `tessera preprocess` (engine/cli.py) is the entry point that prints errors as one line
    raise SystemExit(main())
