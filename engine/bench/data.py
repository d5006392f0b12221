"""`tessera bench data`: preprocessing throughput and index-building speed (C++ helpers vs numpy).

    python -m engine.bench.data --input corpus.txt --tokenizer byte sentencepiece:sp.model --workers 1 2 \
        --repeat 4 --num-docs 10000000 --json out.json

Preprocessing: every tokenizer x worker count, tokens/s overall and per worker, and the speed-up over
1 worker. Index building: the doc, sample and shuffle indices of one epoch over --num-docs documents
(random lengths) with each backend, plus the blending index of --blend-size samples over 3 datasets.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np

from engine.bench import cpu_name as _cpu
from engine.data import index_builders as ib
from engine.data.cleaning import CleanConfig
from engine.data.preprocess import preprocess


def bench_preprocess(inputs: list[str], tokenizers: list[str], workers: list[int], repeat: int) -> list[dict]:
    rows = []
    cfg = CleanConfig(exact_dedup=False)  # repeated inputs must not be deduplicated away
    with tempfile.TemporaryDirectory() as tmp:
        for spec in tokenizers:
            base = None
            for w in workers:
                stats = preprocess(inputs * repeat, os.path.join(tmp, "out"), spec, workers=w, cfg=cfg,
                                   progress=False, log=lambda s: None)
                tps = stats.tokens / stats.seconds
                base = base or tps
                rows.append({"tokenizer": spec.split("/")[-1], "workers": w, "docs": stats.docs_out,
                             "tokens": stats.tokens, "MB": round(stats.bytes_in / 1e6, 2),
                             "seconds": round(stats.seconds, 3), "tokens_per_s": round(tps),
                             "tokens_per_s_per_worker": round(tps / w), "MB_per_s": round(stats.bytes_in / 1e6 /
                                                                                          stats.seconds, 2),
                             "speedup_vs_1": round(tps / base, 2)})
    return rows


def _timed(fn, *args) -> tuple[float, object]:
    t = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t, out


def bench_indices(num_docs: int, seq_len: int, blend_size: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 2 * 600, size=num_docs).astype(np.int32)  # mean ~600 tokens per document
    tokens = int(sizes.astype(np.int64).sum())
    n_samples = (tokens - 1) // seq_len
    backends = ["numpy"] + (["cpp"] if ib.have_cpp() else [])
    rows, results = [], {}
    for b in backends:
        t_doc, doc_idx = _timed(ib.build_doc_idx, num_docs, 1, seed, False, b)
        t_sample, sample_idx = _timed(ib.build_sample_idx, sizes, doc_idx, seq_len, n_samples, b)
        t_shuffle, shuffle_idx = _timed(ib.build_shuffle_idx, n_samples, n_samples, seed, b)
        t_blend, blend = _timed(ib.build_blending_indices, np.array([0.5, 0.3, 0.2]), blend_size, b)
        results[b] = (doc_idx, sample_idx, shuffle_idx, blend)
        rows.append({"backend": b, "documents": num_docs, "tokens": tokens, "samples": n_samples,
                     "doc_idx_s": round(t_doc, 3), "sample_idx_s": round(t_sample, 3),
                     "shuffle_idx_s": round(t_shuffle, 3), "total_s": round(t_doc + t_sample + t_shuffle, 3),
                     "blend_samples": blend_size, "blend_s": round(t_blend, 3)})
    if len(results) == 2:  # the benchmark doubles as a large-input equality check
        a, c = results["numpy"], results["cpp"]
        same = all(np.array_equal(x, y) for x, y in zip(a[:3], c[:3])) and all(
            np.array_equal(x, y) for x, y in zip(a[3], c[3]))
        for r in rows:
            r["identical"] = bool(same)
    return rows


def _table(rows: list[dict]) -> str:
    if not rows:
        return ""
    cols = list(rows[0])
    widths = [max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols]
    line = lambda vals: "| " + " | ".join(str(v).rjust(w) for v, w in zip(vals, widths)) + " |"  # noqa: E731
    return "\n".join([line(cols), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] +
                     [line([r.get(c, "") for c in cols]) for r in rows])


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="tessera bench data", description=__doc__.split("\n")[0])
    p.add_argument("--input", nargs="+", default=["builtin:pydoc"], help="corpus files (default builtin:pydoc)")
    p.add_argument("--tokenizer", nargs="+", default=["byte"], help="tokenizer specs to compare")
    p.add_argument("--workers", nargs="+", type=int, default=[1, 2])
    p.add_argument("--repeat", type=int, default=1, help="read the inputs this many times (bigger corpus)")
    p.add_argument("--num-docs", type=int, default=10_000_000, help="documents for the index benchmark")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--blend-size", type=int, default=1_000_000, help="samples for the blending benchmark")
    p.add_argument("--skip-preprocess", action="store_true")
    p.add_argument("--skip-indices", action="store_true")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    out = {"machine": {"cpu": _cpu(), "cores": os.cpu_count(), "python": platform.python_version(),
                       "cpp_helpers": ib.have_cpp()}, "preprocess": [], "indices": []}
    print(f"machine: {out['machine']}")
    if not args.skip_preprocess:
        out["preprocess"] = bench_preprocess(args.input, args.tokenizer, args.workers, args.repeat)
        print("\npreprocessing\n" + _table(out["preprocess"]))
    if not args.skip_indices:
        out["indices"] = bench_indices(args.num_docs, args.seq_len, args.blend_size)
        print("\nindex building\n" + _table(out["indices"]))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
