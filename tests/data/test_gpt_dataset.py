"""GPTDataset samples equal windows of the epoch-shuffled token stream; epochs; C++ fallback warning."""

import subprocess
import sys

import numpy as np
import pytest

from engine.data.gpt_dataset import GPTDataset, IndexSpec, build_indices
from engine.data.indexed import IndexedDataset, IndexedDatasetWriter


def _dataset(tmp_path, sizes, seq_len, num_samples, seed=0, begin=0, end=None):
    rng = np.random.default_rng(1)
    docs = [rng.integers(0, 1000, size=n) for n in sizes]
    with IndexedDatasetWriter(tmp_path / "d", np.uint16) as w:
        for d in docs:
            w.add_document(d)
    ind = IndexedDataset(tmp_path / "d")
    end = len(sizes) if end is None else end
    spec = IndexSpec("t", str(tmp_path / "d"), begin, end, seq_len, num_samples, seed)
    return GPTDataset(ind, spec, eod_id=999, document_masking=True, cache_dir=tmp_path / "c", build=True), docs


@pytest.mark.parametrize("sizes,seq_len,num_samples", [
    ([100], 7, 3),                  # one document
    ([100], 16, 50),                # one document, many epochs
    ([3, 500, 2, 0, 40], 8, 200),   # documents longer than seq_len, an empty one
    ([5, 6, 7], 64, 10),            # seq_len longer than the whole epoch
])
def test_samples_are_stream_windows(tmp_path, sizes, seq_len, num_samples):
    ds, docs = _dataset(tmp_path, sizes, seq_len, num_samples)
    assert len(ds) >= num_samples
    stream = np.concatenate([docs[int(k)] for k in ds.doc_idx])
    for i in range(len(ds)):
        j = int(ds.shuffle_idx[i])
        np.testing.assert_array_equal(ds.tokens(i), stream[j * seq_len: j * seq_len + seq_len + 1])
        assert ds[i]["tokens"].shape == (seq_len + 1,) and ds[i]["doc_ids"].shape == (seq_len,)
    assert sorted(ds.shuffle_idx.tolist()) == list(range(len(ds)))


def test_sub_range(tmp_path):
    ds, docs = _dataset(tmp_path, [10, 20, 30, 40], 5, 4, begin=2, end=4)
    stream = np.concatenate([docs[2 + int(k)] for k in ds.doc_idx])
    assert set(ds.doc_idx.tolist()) == {0, 1}
    j = int(ds.shuffle_idx[0])
    np.testing.assert_array_equal(ds.tokens(0), stream[j * 5: j * 5 + 6])


def test_separate_final_epoch():
    sizes = np.full(100, 10, dtype=np.int32)        # 1000 tokens per epoch, 99 samples of 10
    doc_idx, sample_idx, shuffle_idx = build_indices(sizes, 10, 110, seed=0)  # 2 epochs, 2nd barely used
    assert len(doc_idx) == 200 and sorted(doc_idx[100:].tolist()) == list(range(100))
    n_first = (1000 - 1) // 10
    assert sorted(shuffle_idx[:n_first].tolist()) == list(range(n_first))
    doc_idx2, _, shuffle_idx2 = build_indices(sizes, 10, 190, seed=0)        # 2nd epoch mostly used: together
    assert len(shuffle_idx2) == (2000 - 1) // 10
    assert not np.array_equal(np.sort(doc_idx2[:100]), np.arange(100))


def test_too_few_tokens():
    with pytest.raises(ValueError, match="at least 2 tokens"):
        build_indices(np.array([1], np.int32), 4, 1, 0)


def test_missing_extension_warns_once_and_falls_back():
    code = (
        "import sys, warnings; sys.modules['engine.data._helpers'] = None\n"
        "warnings.simplefilter('always')\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    from engine.data import index_builders as ib\n"
        "    import numpy as np\n"
        "    assert not ib.have_cpp()\n"
        "    ib.permutation(10, 1); ib.build_sample_idx(np.array([5], np.int32), np.array([0], np.int32), 2, 2)\n"
        "    msgs = [str(x.message) for x in w if 'C++ data helpers' in str(x.message)]\n"
        "assert len(msgs) == 1, msgs\n"
        "print('ok')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


def test_pickle_is_small_and_equal(tmp_path):
    import pickle

    ds, _ = _dataset(tmp_path, [5000] * 20, 16, 2000)
    blob = pickle.dumps(ds)
    assert len(blob) < 10_000  # file names, not the mapped arrays
    ds2 = pickle.loads(blob)
    for i in (0, 5, len(ds) - 1):
        assert np.array_equal(ds.tokens(i), ds2.tokens(i))


def test_longer_run_in_same_epoch_reuses_indices(tmp_path):
    a, _ = _dataset(tmp_path, [300] * 10, 16, 20)
    b, _ = _dataset(tmp_path, [300] * 10, 16, 150)     # still one epoch (187 samples): same cache, same order
    assert a._files == b._files and np.array_equal(a.shuffle_idx, b.shuffle_idx)
    assert len(a) == len(b) == (3000 - 1) // 16 == 187 and len(b.doc_idx) == 10
    c, _ = _dataset(tmp_path, [300] * 10, 16, 400)     # needs 3 epochs: new indices
    assert c._files != a._files and len(c) >= 400
    assert len(c.doc_idx) == 30 and len(c) == (3 * 3000 - 1) // 16  # 400 * 16 + 1 tokens need 3 epochs of 3000
