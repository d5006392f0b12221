"""Token ids are checked against the model's vocabulary before training: from meta.json (recorded at
preprocessing and merge) or by scanning the .bin (no meta.json, or data.verify_token_ids="scan")."""

import warnings

import numpy as np
import pytest

from engine.config import config_from_dict
from engine.data import build_datasets, build_tokenizer
from engine.data.build import check_data_sources
from engine.data.indexed import IndexedDataset, IndexedDatasetWriter, merge_datasets, meta_path, scan_token_range
from engine.data.preprocess import check_tokenizer, preprocess, read_meta
from engine.errors import ConfigError, DataError


def _cfg(tmp_path, prefix, vocab=0):
    return config_from_dict({"model": {"max_seq_len": 64, "d_model": 32, "n_layers": 2, "n_heads": 2,
                                       "vocab_size": vocab},
                             "data": {"seq_len": 8, "train": [{"path": str(prefix)}], "split": "100,0,0"},
                             "train": {"micro_batch_size": 2, "global_batch_size": 4,
                                       "out_dir": str(tmp_path / "run")}})


def _foreign(tmp_path, docs, name="foreign", dtype=np.uint16):
    """A dataset written without a tokenizer (like data from another tool)."""
    with IndexedDatasetWriter(tmp_path / name, dtype) as w:
        for d in docs:
            w.add_document(d)
    return tmp_path / name


def test_meta_records_max_id_and_tokens(tmp_path):
    (tmp_path / "c.txt").write_text("\n\n".join(f"doc {i} \u00ff" for i in range(20)))
    preprocess([str(tmp_path / "c.txt")], str(tmp_path / "p"), "byte", progress=False, log=lambda s: None)
    meta, ds = read_meta(tmp_path / "p"), IndexedDataset(tmp_path / "p")
    assert meta["max_token_id"] == 256 and meta["min_token_id"] == 32 and meta["tokens"] == ds.num_tokens
    assert (meta["min_token_id"], meta["max_token_id"]) == ds.token_range()
    other = _foreign(tmp_path, [[1, 300], [7]])
    merge_datasets([tmp_path / "p", other], tmp_path / "m")
    m = read_meta(tmp_path / "m")
    assert m["max_token_id"] == 300 and m["min_token_id"] == 1 and m["tokens"] == ds.num_tokens + 3
    assert "tokenizer" not in m  # the inputs do not record one tokenizer
    merge_datasets([tmp_path / "p", tmp_path / "p"], tmp_path / "pp")
    assert read_meta(tmp_path / "pp")["tokenizer"] == "byte" and read_meta(tmp_path / "pp")["max_token_id"] == 256


def test_id_beyond_vocab_refused_before_training(tmp_path):
    bad = _foreign(tmp_path, [[1, 2, 3] * 10, [4, 300, 5] * 10])  # 300 >= 257 (byte tokenizer)
    tok = build_tokenizer("byte")
    for call in (lambda: build_datasets(_cfg(tmp_path, bad), tok, 4, 0, tmp_path / "cache"),
                 lambda: check_data_sources(_cfg(tmp_path, bad), tok)):
        with pytest.raises(DataError, match=r"expected token ids in \[0, 257\).*found ids in \[1, 300\]") as e:
            call()
        assert str(bad) in str(e.value) and "byte" in str(e.value)
    assert not (tmp_path / "cache").exists()
    # against model.vocab_size when it is set
    fine = _foreign(tmp_path, [[1, 2, 3] * 10, [4, 250, 5] * 10], name="fine")
    with pytest.raises(DataError, match=r"\[0, 200\).*model.vocab_size=200"):
        check_tokenizer(fine, build_tokenizer("byte"), 200)


def test_missing_meta_scans_and_says_no_tokenizer(tmp_path):
    bad = _foreign(tmp_path, [[1, 2, 3] * 10, [4, 999, 5]])
    meta_path(bad).unlink()
    with pytest.raises(DataError, match=r"found ids in \[1, 999\] \(found by scanning .*foreign.bin\).*no tokenizer "
                                        r"is recorded for this data \(foreign.meta.json is missing\)"):
        build_datasets(_cfg(tmp_path, bad), build_tokenizer("byte"), 4, 0, tmp_path / "cache")
    # byte-level ids under a larger vocabulary fit, but it is not silent any more
    ok = _foreign(tmp_path, [list(b"hello world") + [256]] * 5, name="bytes")
    meta_path(ok).unlink()
    with pytest.warns(UserWarning, match="no tokenizer is recorded for this data"):
        check_tokenizer(ok, build_tokenizer("byte"), 32000)


def test_scan_mode_does_not_trust_meta(tmp_path):
    p = _foreign(tmp_path, [[1, 2, 3] * 10, [4, 300, 5] * 10])
    text = meta_path(p).read_text().replace('"max_token_id": 300', '"max_token_id": 100')
    meta_path(p).write_text(text)  # a meta.json that lies (another tool, or a hand edit)
    tok = build_tokenizer("byte")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        check_tokenizer(p, tok, verify_token_ids="meta")  # trusts the record
    with pytest.raises(DataError, match=r"records token ids in \[1, 100\], but .*foreign.bin holds ids in \[1, 300\]"):
        check_tokenizer(p, tok, verify_token_ids="scan")
    with pytest.raises(DataError, match="foreign.bin holds ids"):
        build_datasets(_cfg(tmp_path, p), tok, 4, 0, tmp_path / "cache", verify_token_ids="scan")
    with pytest.raises(DataError, match="foreign.bin holds ids"):
        check_data_sources(_cfg(tmp_path, p), tok, verify_token_ids="scan")
    with pytest.raises(ConfigError, match="verify_token_ids"):
        check_tokenizer(p, tok, verify_token_ids="full")


def test_scan_chunks_and_negative_ids(tmp_path):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 1000, size=10_000)
    ids[7777] = 4321
    p = _foreign(tmp_path, [ids[:5000], ids[5000:]])
    assert scan_token_range(f"{p}.bin", np.uint16, chunk_bytes=64) == (int(ids.min()), 4321)
    neg = _foreign(tmp_path, [[5, -3, 7]], name="neg", dtype=np.int32)
    meta_path(neg).unlink()
    with pytest.raises(DataError, match=r"found ids in \[-3, 7\]"):
        check_tokenizer(neg, build_tokenizer("byte"))
