"""C++ helpers equal the numpy reference; blending proportions; doc/shuffle index properties."""

import importlib
import os
from pathlib import Path

import numpy as np
import pytest

from engine.data import index_builders as ib

# The extension is optional for users (numpy fallback), so its tests skip where it is not built. CI sets
# TESSERA_REQUIRE_EXT=1 (.ci/run): there a missing extension fails these tests instead of skipping them.
REQUIRE_EXT = os.environ.get("TESSERA_REQUIRE_EXT") == "1"
cpp = pytest.mark.skipif(not ib.have_cpp() and not REQUIRE_EXT, reason="C++ helpers not built (engine.data._helpers)")


@pytest.mark.skipif(not REQUIRE_EXT, reason="TESSERA_REQUIRE_EXT=1 not set (CI sets it)")
def test_extension_built_when_required():
    try:
        importlib.import_module("engine.data._helpers")
    except ImportError as e:
        pytest.fail(f"TESSERA_REQUIRE_EXT=1: the C++ data helpers (engine.data._helpers) did not build or import "
                    f"({e}); see the install log for the compiler warning from setup.py")
    assert ib.have_cpp()


def test_ci_requires_the_extension():
    # without the export a failed build would make CI skip every C++ test and still pass
    lines = (Path(__file__).resolve().parents[2] / ".ci" / "run").read_text().splitlines()
    assert "export TESSERA_REQUIRE_EXT=1" in lines
    assert lines.index("export TESSERA_REQUIRE_EXT=1") < next(i for i, ln in enumerate(lines) if "&& pytest" in ln)


def _sample_idx_bruteforce(sizes, doc_idx, seq_len, num_samples):
    """Walk the token stream one document at a time (independent of both implementations)."""
    out, k, start = [], 0, 0
    for i in range(num_samples + 1):
        p = i * seq_len
        while start + sizes[doc_idx[k]] <= p:
            start += sizes[doc_idx[k]]
            k += 1
        out.append((k, p - start))
    return np.array(out, dtype=np.int64).reshape(-1, 2)


CASES = [
    # (sizes, epochs, seq_len): one document, documents longer than seq_len, empty documents, many epochs
    ([50], 1, 7),
    ([50], 9, 64),
    ([1000, 3, 2000], 2, 16),
    ([0, 5, 0, 0, 9, 1, 0], 30, 4),
    ([1] * 40, 3, 1),
    ([3, 300, 2, 2, 7], 5, 128),
]


@pytest.mark.parametrize("sizes,epochs,seq_len", CASES)
def test_sample_idx_matches_reference(sizes, epochs, seq_len):
    sizes = np.array(sizes, dtype=np.int32)
    doc_idx = ib.build_doc_idx(len(sizes), epochs, seed=3, separate_final_epoch=False, backend="numpy")
    num_samples = (int(sizes.sum()) * epochs - 1) // seq_len
    ref = _sample_idx_bruteforce(sizes, doc_idx, seq_len, num_samples)
    np.testing.assert_array_equal(ib.build_sample_idx(sizes, doc_idx, seq_len, num_samples, "numpy"), ref)
    if ib.have_cpp() or REQUIRE_EXT:
        np.testing.assert_array_equal(ib.build_sample_idx(sizes, doc_idx, seq_len, num_samples, "cpp"), ref)


@cpp
def test_sample_idx_random_inputs():
    rng = np.random.default_rng(0)
    for trial in range(20):
        n = int(rng.integers(1, 200))
        sizes = rng.integers(0, 300, size=n).astype(np.int32)
        sizes[rng.integers(0, n)] += 1  # at least one token
        epochs = int(rng.integers(1, 6))
        seq_len = int(rng.integers(1, 400))
        doc_idx = ib.build_doc_idx(n, epochs, trial, bool(trial % 2))
        num_samples = (int(sizes.sum()) * epochs - 1) // seq_len
        a = ib.build_sample_idx(sizes, doc_idx, seq_len, num_samples, "numpy")
        b = ib.build_sample_idx(sizes, doc_idx, seq_len, num_samples, "cpp")
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("backend", ["numpy", pytest.param("cpp", marks=cpp)])
def test_sample_idx_too_few_tokens(backend):
    with pytest.raises(ValueError, match="need 11 tokens, found 10"):
        ib.build_sample_idx(np.array([10], np.int32), np.array([0], np.int32), 5, 2, backend)


@cpp
@pytest.mark.parametrize("n,seed", [(0, 1), (1, 1), (2, 5), (1000, 0), (12345, 2**63 + 5), (777, -3), (200_003, 9)])
def test_permutation_matches(n, seed):
    a = ib.permutation(n, seed, "numpy")
    b = ib.permutation(n, seed, "cpp")
    np.testing.assert_array_equal(a, b)
    assert sorted(a.tolist()) == list(range(n))


def test_permutation_uniform_positions():
    """Over many seeds every element lands in every position about equally often (even for tiny n)."""
    n, seeds = 5, 4000
    counts = np.zeros((n, n))
    for s in range(seeds):
        counts[np.arange(n), ib.permutation(n, s)] += 1  # equal on both backends (tested above)
    expected = seeds / n
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 60  # 16 degrees of freedom: p < 1e-5 when above; 4 Feistel rounds gave ~500


def test_permutation_seeded():
    a, b, c = (ib.permutation(1000, s, "numpy") for s in (1, 1, 2))
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_doc_idx_epochs():
    d = ib.build_doc_idx(10, 4, 0, separate_final_epoch=True)
    assert d.dtype == np.int32 and d.size == 40
    assert np.bincount(d[:30], minlength=10).tolist() == [3] * 10   # first 3 epochs together:
    assert not all(sorted(d[e:e + 10].tolist()) == list(range(10)) for e in (0, 10, 20))  # mixed, not one by one
    assert sorted(d[30:].tolist()) == list(range(10))               # final epoch on its own
    s = ib.build_shuffle_idx(30, 37, 0)
    assert sorted(s[:30].tolist()) == list(range(30)) and sorted(s[30:].tolist()) == list(range(30, 37))


@pytest.mark.parametrize("weights", [[1.0], [0.5, 0.5], [0.7, 0.2, 0.1], [3, 1, 1, 5, 0.01]])
@pytest.mark.parametrize("backend", ["numpy", pytest.param("cpp", marks=cpp)])
def test_blending_proportions(weights, backend):
    size = 5000
    ds, ds_sample = ib.build_blending_indices(np.array(weights), size, backend)
    w = np.array(weights) / np.sum(weights)
    # the whole blend and every prefix hold each dataset within ~one sample of its exact share
    assert np.abs(np.bincount(ds, minlength=len(w)) - w * size).max() < 1.2
    onehot = np.zeros((size, len(w)))
    onehot[np.arange(size), ds] = 1
    prefix = np.cumsum(onehot, axis=0)
    expect = np.outer(np.arange(1, size + 1), w)
    assert np.abs(prefix - expect).max() < 1.2
    # sample indices count up within each dataset
    for k in range(len(w)):
        assert ds_sample[ds == k].tolist() == list(range(int((ds == k).sum())))


@cpp
def test_blending_cpp_equals_numpy():
    rng = np.random.default_rng(1)
    for _ in range(10):
        w = rng.random(int(rng.integers(1, 9))) + 1e-3
        a = ib.build_blending_indices(w, 3000, "numpy")
        b = ib.build_blending_indices(w, 3000, "cpp")
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])


def test_blending_bad_weights():
    with pytest.raises(ValueError, match="positive"):
        ib.build_blending_indices(np.array([1.0, 0.0]), 10)
