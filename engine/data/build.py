"""`build_datasets`: from the config's data section to one train dataset and named validation datasets.

Every source becomes an indexed .bin/.idx dataset (a raw text/jsonl file or builtin:pydoc is preprocessed
once into cache_dir), split by document into train/valid/test, indexed by GPTDataset (cached; BertDataset
for train.objective mlm / mlm+nsp), and the train parts are blended by weight. The builder rank does all
writing, then everyone meets at barrier() and the other ranks open what it wrote.

`check_data_sources` does the cheap checks only (every file exists; raw inputs are text; every .bin/.idx is
consistent, matches its meta.json and the tokenizer, and holds no id outside the model's vocabulary) and
writes nothing, so a run can refuse bad data before it prepares its run directory; build_datasets runs the
same checks before it writes anything.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import sys
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from torch.utils.data import Dataset

from engine.data.bert_dataset import BertDataset, BertIndexSpec
from engine.data.cleaning import CleanConfig
from engine.data.gpt_dataset import BlendedDataset, DatasetBuildError, GPTDataset, IndexSpec, blending_counts
from engine.data.indexed import IndexedDataset, IndexedDatasetError, bin_path, idx_path, inside, safe_stem
from engine.data.mlm_masking import MaskingSpec
from engine.data.preprocess import check_tokenizer, preprocess
from engine.data.sources import (BUILTIN_PYDOC, BUILTIN_STDLIB, SourceError, _megatron_prefix, check_text_file,
                                 is_raw_source, source_name, stdlib_identity)
from engine.data.special_tokens import MLM_OBJECTIVES, SpecialTokenizer, base_tokenizer, with_special_tokens
from engine.data.tokenizers import Tokenizer, TokenizerError, tokenizer_fingerprint
from engine.data.word_starts import WordStarts, word_starts_for

if TYPE_CHECKING:
    from engine.config import Config, DatasetSpec

# Raw sources are kept as they are (documents only split, never filtered) when built from a config;
# `tessera preprocess` is the place for cleaning and dedup.
RAW_CLEANING = CleanConfig(normalize=None, strip_control=False, min_chars=1, exact_dedup=False)


def parse_split(split: str) -> list[float]:
    """'98,2,0' -> [0.98, 0.02, 0.0] (normalised)."""
    parts = [float(x) for x in split.replace("/", ",").split(",")]
    while len(parts) < 3:
        parts.append(0.0)
    total = sum(parts)
    return [p / total for p in parts]


def split_ranges(n_docs: int, split: str) -> list[tuple[int, int]]:
    """Contiguous document ranges [start, end) for train/valid/test, by rounding the cumulative proportions."""
    fracs = parse_split(split)
    cum, bounds = 0.0, [0]
    for f in fracs:
        cum += f
        bounds.append(min(int(round(cum * n_docs)), n_docs))
    bounds[-1] = n_docs
    return [(bounds[i], bounds[i + 1]) for i in range(3)]


@dataclass
class _Source:
    name: str
    prefix: str
    weight: float
    raw: str | None  # the raw input to preprocess into prefix, if any


def _raw_prefix(path: str, name: str, tokenizer: Tokenizer, cache_dir: pathlib.Path) -> str:
    """Cache prefix of a raw source, keyed by its identity and the tokenizer (so any change rebuilds it)."""
    if path == BUILTIN_PYDOC:
        ident = {"pydoc": sys.version}
    elif path == BUILTIN_STDLIB:
        ident = stdlib_identity()
    else:
        st = os.stat(path)
        ident = {"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    key = hashlib.sha256(json.dumps({**ident, "tok": tokenizer_fingerprint(tokenizer), "v": 1},
                                    sort_keys=True).encode()).hexdigest()[:16]
    # the name comes from the config: only its sanitized form goes into the file name (never "../")
    return str(inside(cache_dir, cache_dir / f"raw-{safe_stem(name)}-{key}"))


def _resolve(specs: list["DatasetSpec"], tokenizer: Tokenizer, cache_dir: pathlib.Path, used: set[str]
             ) -> list[_Source]:
    out = []
    for spec in specs:
        name = spec.name or source_name(spec.path)
        base, i = name, 2
        while name in used:  # two datasets from files with the same stem
            name, i = f"{base}_{i}", i + 1
        used.add(name)
        prefix = _megatron_prefix(pathlib.Path(spec.path))
        if prefix is not None and bin_path(prefix).is_file() and idx_path(prefix).is_file():
            raise SourceError(f"data: dataset path {spec.path!r} is the {pathlib.Path(spec.path).suffix} file of a "
                              f"Megatron dataset; expected its prefix without extension ({prefix!r})")
        if is_raw_source(spec.path):
            out.append(_Source(name, _raw_prefix(spec.path, name, tokenizer, cache_dir), spec.weight, spec.path))
        elif bin_path(spec.path).is_file() or idx_path(spec.path).is_file():
            out.append(_Source(name, spec.path, spec.weight, None))
        else:
            raise SourceError(f"data: dataset path {spec.path!r} is neither an existing text/jsonl file, "
                              f"builtin:pydoc, nor a .bin/.idx prefix ({spec.path}.bin / .idx not found)")
    return out


def _gpt(src: _Source, indexed: IndexedDataset, doc_range: tuple[int, int], kind: str, num_samples: int,
         cfg: "Config", tokenizer: Tokenizer, cache_dir: pathlib.Path, build: bool) -> GPTDataset:
    di = indexed.document_indices
    spec = IndexSpec(name=f"{src.name}-{kind}", prefix=src.prefix, seq_begin=int(di[doc_range[0]]),
                     seq_end=int(di[doc_range[1]]), seq_len=cfg.seq_len, num_samples=num_samples, seed=cfg.data.seed)
    try:
        return GPTDataset(indexed, spec, tokenizer.eod_id, cfg.data.document_masking, cache_dir, build,
                          source=src.name)
    except DatasetBuildError as e:
        raise DatasetBuildError(f"dataset {src.name!r} ({src.prefix}), {kind} split {doc_range}: {e}") from None


@dataclass(frozen=True)
class _MLM:
    """What every BertDataset of a run shares: the tokenizer with its special tokens, the masking, the word
    starts (whole-word masking only) and whether samples are sentence pairs (mlm+nsp)."""

    tokenizer: SpecialTokenizer
    masking: MaskingSpec
    word_starts: WordStarts | None
    nsp: bool


def _objective(cfg: "Config") -> str:
    return getattr(cfg.train, "objective", "causal")


def _run_tokenizer(cfg: "Config", tokenizer: Tokenizer) -> Tokenizer:
    """The tokenizer whose vocabulary the model embeds: with [CLS]/[SEP]/[MASK]/[PAD] for the mlm objectives."""
    return with_special_tokens(tokenizer) if _objective(cfg) in MLM_OBJECTIVES else tokenizer


def _mlm(cfg: "Config", tokenizer: Tokenizer) -> _MLM | None:
    if _objective(cfg) not in MLM_OBJECTIVES:
        return None
    t, tok = cfg.train, with_special_tokens(tokenizer)
    masking = MaskingSpec(tok.special_tokens, tok.real_vocab_size, mask_prob=getattr(t, "mask_prob", 0.15),
                          replace_prob=getattr(t, "mask_replace", 0.8), random_prob=getattr(t, "mask_random", 0.1),
                          exclude=(tok.eod_id,))
    ws = word_starts_for(tok) if getattr(t, "whole_word_masking", False) else None  # refused here, before any write
    return _MLM(tok, masking, ws, _objective(cfg) == "mlm+nsp")


def _bert(src: _Source, indexed: IndexedDataset, doc_range: tuple[int, int], kind: str, num_samples: int,
          cfg: "Config", mlm: _MLM, cache_dir: pathlib.Path, build: bool) -> BertDataset:
    spec = BertIndexSpec(name=f"{src.name}-{kind}", prefix=src.prefix, doc_begin=int(doc_range[0]),
                         doc_end=int(doc_range[1]), seq_len=cfg.seq_len, num_samples=num_samples, seed=cfg.data.seed,
                         nsp=mlm.nsp)
    try:
        return BertDataset(indexed, spec, mlm.masking, mlm.tokenizer.eod_id, cache_dir, build, source=src.name,
                           word_starts=mlm.word_starts)
    except DatasetBuildError as e:
        raise DatasetBuildError(f"dataset {src.name!r} ({src.prefix}), {kind} split {doc_range}: {e}") from None


def _check_vocab(cfg: "Config", tokenizer: Tokenizer) -> None:
    if cfg.model.vocab_size and tokenizer.vocab_size > cfg.model.vocab_size:
        raise TokenizerError(f"tokenizer {tokenizer.spec!r} has {tokenizer.vocab_size} ids, more than "
                             f"model.vocab_size={cfg.model.vocab_size}")


def _check_sources(sources: list[_Source], cfg: "Config", tokenizer: Tokenizer, verify_token_ids: str,
                   scan: bool, opened: dict[str, IndexedDataset]) -> None:
    """The read-only checks: raw inputs exist and are text; .bin/.idx prefixes are consistent and fit the
    tokenizer and the model's vocabulary. Opened datasets go to `opened`. (The cache of a raw source is
    checked when it is opened, and rebuilt if damaged: see _open_raw.)"""
    for src in sources:
        if src.raw is not None:
            if src.raw != BUILTIN_PYDOC:
                check_text_file(src.raw)
            continue
        ds = opened.get(src.prefix) or IndexedDataset(src.prefix)
        opened[src.prefix] = ds
        check_tokenizer(src.prefix, tokenizer, cfg.model.vocab_size, verify_token_ids, dataset=ds,
                        scan_if_unrecorded=scan)


def _open_raw(src: _Source, tokenizer: Tokenizer, cache_dir: pathlib.Path, build: bool) -> IndexedDataset:
    """The cached dataset of a raw source; the builder preprocesses it when it is missing, or damaged (a
    build killed mid-write): the cache is ours, keyed by the input file and the tokenizer."""
    assert src.raw is not None
    if idx_path(src.prefix).is_file() or not build:
        try:
            return IndexedDataset(src.prefix)
        except IndexedDatasetError as e:
            if not build:
                raise
            print(f"[tessera data] rebuilding the cache of {src.name}: {e}", flush=True)
    cache_dir.mkdir(parents=True, exist_ok=True)
    preprocess([src.raw], src.prefix, tokenizer.spec, workers=1, cfg=RAW_CLEANING, progress=False,
               log=lambda s, n=src.name: print(f"[tessera data] preprocessed {n}: {s}", flush=True))
    return IndexedDataset(src.prefix)


def check_data_sources(cfg: "Config", tokenizer: Tokenizer, verify_token_ids: str = "meta") -> None:
    """Raise SourceError / IndexedDatasetError / DataError / TokenizerError if the data of cfg cannot be trained
    with this tokenizer and model; writes nothing (call it before preparing a run directory).

    Checks: every data.train / data.valid path exists (a text/jsonl file, builtin:pydoc or a .bin/.idx prefix);
    raw files are text (not binary, their compression readable); every .bin/.idx prefix is consistent, matches
    its meta.json and tokenizer, and its token ids are < the model's vocabulary (verify_token_ids: "meta" trusts
    the recorded max id, "scan" reads the .bin). Raw sources are checked again, fully, when preprocessed.
    """
    _check_vocab(cfg, _run_tokenizer(cfg, tokenizer))
    tokenizer = base_tokenizer(tokenizer)  # the data is tokenized without the mlm special tokens
    d = cfg.data
    used: set[str] = set()
    cache_dir = pathlib.Path(d.cache_dir) if d.cache_dir else pathlib.Path(cfg.train.out_dir) / "data_cache"
    sources = _resolve(d.train, tokenizer, cache_dir, used) + _resolve(d.valid, tokenizer, cache_dir, used)
    _check_sources(sources, cfg, tokenizer, verify_token_ids, scan=True, opened={})


def _assemble(cfg: "Config", tokenizer: Tokenizer, train_samples: int, valid_samples: int,
              cache_dir: pathlib.Path, build: bool, verify_token_ids: str = "meta"
              ) -> tuple[Dataset, dict[str, Dataset]]:
    d = cfg.data
    mlm = _mlm(cfg, tokenizer)
    tokenizer = base_tokenizer(tokenizer)  # the data's tokenizer: preprocessing, cache keys and data checks

    def make(src: _Source, indexed: IndexedDataset, doc_range: tuple[int, int], kind: str, n: int) -> Dataset:
        if mlm is not None:
            return _bert(src, indexed, doc_range, kind, n, cfg, mlm, cache_dir, build)
        return _gpt(src, indexed, doc_range, kind, n, cfg, tokenizer, cache_dir, build)

    # Two namespaces: a validation set may be named like a training set (val_loss/<name> of that domain).
    # Their caches never collide: a raw source's cache is keyed by its identity, an index by "<name>-train"
    # or "<name>-valid".
    train_src = _resolve(d.train, tokenizer, cache_dir, set())
    valid_src = _resolve(d.valid, tokenizer, cache_dir, set())
    opened: dict[str, IndexedDataset] = {}
    # every cheap check first, before anything is written; only the builder scans .bin files
    _check_sources(train_src + valid_src, cfg, tokenizer, verify_token_ids, scan=build, opened=opened)
    for src in train_src + valid_src:
        if src.raw is not None and src.prefix not in opened:
            opened[src.prefix] = _open_raw(src, tokenizer, cache_dir, build)
            check_tokenizer(src.prefix, tokenizer, cfg.model.vocab_size, verify_token_ids,
                            dataset=opened[src.prefix], scan_if_unrecorded=build)

    # train: the train split of every train dataset, blended by weight, exact per global batch (the blend
    # knows train.global_batch_size; its cache is keyed by it and the data seed)
    parts: list[Dataset] = []
    valids: dict[str, Dataset] = {}
    counts = None
    if len(train_src) > 1:
        ds_index, ds_sample = blending_counts([s.weight for s in train_src], max(train_samples, 1), cache_dir, build,
                                              global_batch_size=cfg.train.global_batch_size, seed=d.seed)
        counts = [int((ds_index == k).sum()) for k in range(len(train_src))]
    for k, src in enumerate(train_src):
        indexed = opened[src.prefix]
        n_docs = indexed.num_documents
        tr, va, _ = split_ranges(n_docs, d.split)
        if tr[1] > tr[0]:
            parts.append(make(src, indexed, tr, "train", counts[k] if counts else train_samples))
        elif counts is not None:
            raise DatasetBuildError(f"dataset {src.name!r}: the train split {d.split!r} of its {n_docs} documents is "
                                    f"empty, but it has blending weight {src.weight}")
        if not d.valid and va[1] > va[0]:
            valids[src.name] = make(src, indexed, va, "valid", valid_samples)
    if not parts:
        raise DatasetBuildError(f"data.train: the train split {d.split!r} selected no documents")
    for src in valid_src:  # explicit validation sets: all of their documents
        indexed = opened[src.prefix]
        valids[src.name] = make(src, indexed, (0, indexed.num_documents), "valid", valid_samples)
    if not d.valid and not valids and parse_split(d.split)[1] > 0:
        warnings.warn(f"data.split={d.split!r}: the validation split holds no documents (datasets too small); "
                      f"no validation set", RuntimeWarning)
    train = parts[0] if len(parts) == 1 else BlendedDataset(parts, ds_index, ds_sample,
                                                            names=[s.name for s in train_src])
    return train, valids


def build_datasets(cfg: "Config", tokenizer: Tokenizer, train_samples: int, valid_samples: int,
                   cache_dir: pathlib.Path, is_builder: bool = True, barrier: Callable[[], None] = lambda: None,
                   verify_token_ids: str = "meta") -> tuple[Dataset, dict[str, Dataset]]:
    """-> (train dataset, {name: validation dataset}); each yields {"tokens": LongTensor [seq_len+1], ...}, or
    for train.objective mlm / mlm+nsp the BERT batch of engine/data/bert_dataset.py ({"inputs", "targets",
    "token_types", "doc_ids"[, "nsp_label"]}; the tokenizer gets its special tokens, with_special_tokens).

    Datasets hold at least train_samples / valid_samples samples (more epochs are added as needed).
    The builder rank preprocesses raw sources and writes index caches under cache_dir, then calls barrier();
    the other ranks call barrier() first and then read the caches. Before writing anything the builder runs
    the checks of check_data_sources (verify_token_ids "meta" or "scan", see check_tokenizer).
    """
    cache_dir = pathlib.Path(cache_dir)
    if is_builder:
        try:
            _check_vocab(cfg, _run_tokenizer(cfg, tokenizer))
            return _assemble(cfg, tokenizer, train_samples, valid_samples, cache_dir, build=True,
                             verify_token_ids=verify_token_ids)
        finally:
            # also on failure: the waiting ranks then stop with "cache does not exist" instead of hanging
            barrier()
    barrier()
    _check_vocab(cfg, _run_tokenizer(cfg, tokenizer))
    return _assemble(cfg, tokenizer, train_samples, valid_samples, cache_dir, build=False,
                     verify_token_ids=verify_token_ids)
