"""Megatron .bin/.idx: round trip, a hand-written fixture, merge, corrupt and truncated files."""

import struct

import numpy as np
import pytest

from engine.data.indexed import (DTYPES, IndexedDataset, IndexedDatasetError, IndexedDatasetWriter, merge_datasets,
                                 token_dtype)


@pytest.mark.parametrize("code", sorted(DTYPES))
def test_round_trip_every_dtype(tmp_path, code):
    dtype = np.dtype(DTYPES[code])
    rng = np.random.default_rng(code)
    docs = [rng.integers(0, 100, size=n).astype(dtype) for n in (5, 0, 1, 17)]
    with IndexedDatasetWriter(tmp_path / "d", dtype) as w:
        for d in docs:
            w.add_document(d)
    ds = IndexedDataset(tmp_path / "d")
    assert ds.dtype == dtype and len(ds) == 4 and ds.num_documents == 4
    assert ds.sizes.tolist() == [5, 0, 1, 17]
    for a, b in zip(docs, [ds[i] for i in range(4)]):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(ds.get(3, 2, 4), docs[3][2:6])
    # header bytes are exactly the spec
    raw = (tmp_path / "d.idx").read_bytes()
    assert raw[:9] == b"MMIDIDX\x00\x00" and struct.unpack("<QBQQ", raw[9:34]) == (1, code, 4, 5)


def test_reads_hand_written_fixture(tmp_path):
    # two documents: [1, 2, 3] and [65535, 7] as uint16 (code 8), written straight from the spec
    tokens = np.array([1, 2, 3, 65535, 7], dtype="<u2")
    (tmp_path / "f.bin").write_bytes(tokens.tobytes())
    idx = b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", 8) + struct.pack("<Q", 2) + \
        struct.pack("<Q", 3) + struct.pack("<2i", 3, 2) + struct.pack("<2q", 0, 6) + struct.pack("<3q", 0, 1, 2)
    (tmp_path / "f.idx").write_bytes(idx)
    ds = IndexedDataset(tmp_path / "f")
    assert ds[0].tolist() == [1, 2, 3] and ds[1].tolist() == [65535, 7] and ds.dtype == np.uint16
    # and our writer produces the very same bytes
    with IndexedDatasetWriter(tmp_path / "g", np.uint16) as w:
        w.add_document([1, 2, 3])
        w.add_document([65535, 7])
    assert (tmp_path / "g.idx").read_bytes() == idx
    assert (tmp_path / "g.bin").read_bytes() == tokens.tobytes()


def test_merge(tmp_path):
    parts = [[[1, 2], [3]], [[4, 5, 6]], [[], [7]]]
    for i, docs in enumerate(parts):
        with IndexedDatasetWriter(tmp_path / f"p{i}", np.int32) as w:
            for d in docs:
                w.add_document(d)
    merge_datasets([tmp_path / f"p{i}" for i in range(3)], tmp_path / "m")
    ds = IndexedDataset(tmp_path / "m")
    assert [ds[i].tolist() for i in range(len(ds))] == [[1, 2], [3], [4, 5, 6], [], [7]]
    assert ds.document_indices.tolist() == [0, 1, 2, 3, 4, 5]
    with IndexedDatasetWriter(tmp_path / "u", np.uint16) as w:
        w.add_document([1])
    with pytest.raises(IndexedDatasetError, match="dtype"):
        merge_datasets([tmp_path / "p0", tmp_path / "u"], tmp_path / "bad")


def test_token_dtype_and_range_check(tmp_path):
    assert token_dtype(257) == np.uint16 and token_dtype(65536) == np.uint16 and token_dtype(65537) == np.int32
    w = IndexedDatasetWriter(tmp_path / "r", np.uint16)
    with pytest.raises(IndexedDatasetError, match="does not fit"):
        w.add_document(np.array([70000]))
    w.abort()


def _write(tmp_path, name="c"):
    with IndexedDatasetWriter(tmp_path / name, np.uint16) as w:
        w.add_document([1, 2, 3])
        w.add_document([4, 5])
    return tmp_path / name


def _expect(prefix, match):
    with pytest.raises(IndexedDatasetError, match=match) as e:
        IndexedDataset(prefix)
    assert str(prefix) in str(e.value)


def test_missing_files(tmp_path):
    _expect(tmp_path / "nothing", "does not exist")
    p = _write(tmp_path)
    (tmp_path / "c.bin").unlink()
    _expect(p, "does not exist")


def test_truncated_bin(tmp_path):
    p = _write(tmp_path)
    b = (tmp_path / "c.bin").read_bytes()
    (tmp_path / "c.bin").write_bytes(b[:-3])
    _expect(p, r"expected 10 bytes.*found 7 bytes \(truncated\)")


@pytest.mark.parametrize("cut", [0, 5, 20, 40, 60])
def test_truncated_idx(tmp_path, cut):
    p = _write(tmp_path)
    raw = (tmp_path / "c.idx").read_bytes()
    (tmp_path / "c.idx").write_bytes(raw[:cut])
    _expect(p, "truncated header|size does not match|magic")


@pytest.mark.parametrize("pos,value,match", [
    (0, b"XXIDIDX\x00\x00", "magic"),
    (9, struct.pack("<Q", 2), "version"),
    (17, struct.pack("<B", 9), "dtype code"),
    (18, struct.pack("<Q", 1000), "size does not match"),
    (34, struct.pack("<i", -1), "sequence lengths"),
    (42, struct.pack("<q", 4), "pointers"),
    (58, struct.pack("<q", 1), "document indices"),
])
def test_corrupt_idx(tmp_path, pos, value, match):
    p = _write(tmp_path)
    raw = bytearray((tmp_path / "c.idx").read_bytes())
    raw[pos:pos + len(value)] = value
    (tmp_path / "c.idx").write_bytes(bytes(raw))
    _expect(p, match)


def test_empty_dataset(tmp_path):
    with IndexedDatasetWriter(tmp_path / "e", np.uint16):
        pass
    ds = IndexedDataset(tmp_path / "e")
    assert len(ds) == 0 and ds.num_tokens == 0
