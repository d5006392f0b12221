"""Property: a corrupted .bin/.idx (+ meta.json) either raises IndexedDatasetError on open or reads EXACTLY
the original data -- never another exception, a crash or silently different tokens.

Two cases:
  * written by Tessera (with PREFIX.meta.json): any damage to any of the three files -- bit flips, overwritten
    bytes, truncation, extension -- must be caught (structure checks, then sizes and digests in meta.json);
    the original sequences and documents are compared.
  * from elsewhere (no meta.json): only the structure can be checked. Token bytes of the .bin changed in place
    cannot be detected (the format has no checksum), so the .bin is only truncated or extended; the .idx
    takes any damage. Ids stay below 32768, where the only same-width dtype (int16 for uint16) reads the
    same values; document indices that stay non-decreasing from 0 to N regroup sequences undetectably, so
    the sequences are compared (what GPTDataset reads) and the documents must cover them in order, once.
"""

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")  # in the `test` extra
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from engine.data.indexed import IndexedDataset, IndexedDatasetError, IndexedDatasetWriter, meta_path  # noqa: E402

FUZZ = settings(max_examples=200, deadline=None, derandomize=True, database=None)

docs_strategy = st.lists(st.lists(st.integers(0, 65535), max_size=8), min_size=1, max_size=6)


def _edit(kind_files):
    """One edit: (file, op, a, b) with op flip/set/truncate/extend."""
    files = st.sampled_from(kind_files)
    return st.one_of(
        st.tuples(files, st.just("flip"), st.integers(0, 10_000), st.integers(0, 7)),
        st.tuples(files, st.just("set"), st.integers(0, 10_000), st.integers(0, 255)),
        st.tuples(files, st.just("truncate"), st.integers(0, 10_000), st.just(0)),
        st.tuples(files, st.just("extend"), st.integers(1, 16), st.integers(0, 255)),
    )


def _apply(path: Path, op: str, a: int, b: int) -> None:
    raw = bytearray(path.read_bytes())
    if op in ("flip", "set"):
        if not raw:
            return
        i = a % len(raw)
        raw[i] = raw[i] ^ (1 << b) if op == "flip" else b
    elif op == "truncate":
        del raw[a % (len(raw) + 1):]
    else:
        raw += bytes([b]) * a
    path.write_bytes(bytes(raw))


def _changed(prefix: Path, originals: dict) -> bool:
    return any(Path(f"{prefix}{ext}").read_bytes() != data for ext, data in originals.items())


def _check(docs, edits, with_meta: bool) -> None:
    with tempfile.TemporaryDirectory() as d:
        prefix = Path(d) / "f"
        with IndexedDatasetWriter(prefix, np.uint16) as w:
            for doc in docs:
                w.add_document(doc)
        if not with_meta:
            os.unlink(meta_path(prefix))
        exts = [".bin", ".idx"] + ([".meta.json"] if with_meta else [])
        originals = {ext: Path(f"{prefix}{ext}").read_bytes() for ext in exts}
        for ext, op, a, b in edits:
            _apply(Path(f"{prefix}{ext}"), op, a, b)
        try:
            ds = IndexedDataset(prefix)
        except IndexedDatasetError:
            return
        # opened: it must be the original data
        assert len(ds) == len(docs)
        for i, doc in enumerate(docs):
            assert ds[i].tolist() == doc, (i, edits)
        # whatever opened is sound: documents group all the sequences, in order, once each
        di = ds.document_indices.tolist()
        assert di[0] == 0 and di[-1] == len(docs) and di == sorted(di), (di, edits)
        assert sum((ds.document(k).tolist() for k in range(ds.num_documents)), []) == sum(docs, [])
        if with_meta:
            assert ds.num_documents == len(docs)
            assert [ds.document(k).tolist() for k in range(len(docs))] == docs
            assert not _changed(prefix, {k: v for k, v in originals.items() if k != ".meta.json"}), edits
        del ds


@FUZZ
@given(docs=docs_strategy, edits=st.lists(_edit([".bin", ".idx", ".meta.json"]), min_size=1, max_size=3))
def test_fuzz_tessera_dataset(docs, edits):
    _check(docs, edits, with_meta=True)


structural_edit = st.one_of(
    _edit([".idx"]),
    st.tuples(st.just(".bin"), st.just("truncate"), st.integers(0, 10_000), st.just(0)),
    st.tuples(st.just(".bin"), st.just("extend"), st.integers(1, 16), st.integers(0, 255)),
)


@FUZZ
@given(docs=st.lists(st.lists(st.integers(0, 32767), max_size=8), min_size=1, max_size=6),
       edits=st.lists(structural_edit, min_size=1, max_size=3))
def test_fuzz_foreign_dataset(docs, edits):
    _check(docs, edits, with_meta=False)
