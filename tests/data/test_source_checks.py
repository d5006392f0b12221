"""Raw inputs that are not what they claim: binary files given as text, truncated or corrupt .gz/.zst,
invalid UTF-8 (counted and reported); the error types of the data layer."""

import gzip
import json
import os

import numpy as np
import pytest

try:  # a declared dependency; the zstd cases skip where it is missing
    import zstandard
except ImportError:  # pragma: no cover
    zstandard = None

from engine.config import config_from_dict
from engine.data import build_datasets, build_tokenizer
from engine.data.build import check_data_sources
from engine.data.gpt_dataset import DatasetBuildError
from engine.data.indexed import IndexedDataset, IndexedDatasetError
from engine.cli import main as cli_main
from engine.data.preprocess import preprocess, read_meta
from engine.data.sources import SourceError, SourceReport, is_raw_source, iter_documents
from engine.data.tokenizers import TokenizerError
from engine.errors import DataError, TokenizerProblem

needs_zstd = pytest.mark.skipif(zstandard is None, reason="zstandard not installed")


def _quiet(s):
    pass


def _cfg(tmp_path, train, **data):
    return config_from_dict({"model": {"max_seq_len": 64, "d_model": 32, "n_layers": 2, "n_heads": 2},
                             "data": {"seq_len": 16, "train": train, "split": "100,0,0", **data},
                             "train": {"micro_batch_size": 2, "global_batch_size": 4,
                                       "out_dir": str(tmp_path / "run")}})


def _text(n_docs=3000):
    return "".join(f"document {i}: " + "some words of text " * 8 + "\n\n" for i in range(n_docs))


def _good_prefix(tmp_path):
    (tmp_path / "c.txt").write_text(_text(50))
    preprocess([str(tmp_path / "c.txt")], str(tmp_path / "good"), "byte", progress=False, log=_quiet)
    return tmp_path / "good"


def test_error_types_are_tessera_errors_and_value_errors():
    for cls in (SourceError, IndexedDatasetError, DatasetBuildError):
        assert issubclass(cls, DataError) and issubclass(cls, ValueError) and cls.exit_code == 3
    assert issubclass(TokenizerError, TokenizerProblem) and issubclass(TokenizerError, ValueError)
    assert TokenizerError.exit_code == 4


# --------------------------------------------------------------------------- binary input


def test_bin_file_given_as_text_is_refused(tmp_path, capsys):
    good = _good_prefix(tmp_path)
    binf = f"{good}.bin"
    with pytest.raises(SourceError, match="looks binary") as e:
        preprocess([binf], str(tmp_path / "out"), "byte", progress=False, log=_quiet)
    assert binf in str(e.value) and f"prefix without extension ('{good}')" in str(e.value)
    assert not (tmp_path / "out.bin").exists() and not (tmp_path / "out.idx").exists()
    assert cli_main(["preprocess", "--input", binf, "--output-prefix", str(tmp_path / "o2"), "--tokenizer", "byte",
                     "--no-progress"]) == 3  # the CLI's one error path: one line, exit code 3 (data)
    assert "looks binary" in capsys.readouterr().err
    # in a config: PREFIX.bin with PREFIX.idx beside it is the dataset's file, not a text input
    assert is_raw_source(binf) is False and is_raw_source(f"{good}.idx") is False and is_raw_source(str(good)) is False
    assert is_raw_source(str(tmp_path / "c.txt")) is True
    with pytest.raises(SourceError, match=r"expected its prefix without extension") as e:
        build_datasets(_cfg(tmp_path, [{"path": binf}]), build_tokenizer("byte"), 10, 0, tmp_path / "cache")
    assert str(good) in str(e.value)
    # a lone .bin (no .idx beside it) is sniffed and refused as binary, before anything is written
    lone = tmp_path / "lone.bin"
    lone.write_bytes(open(binf, "rb").read())
    with pytest.raises(SourceError, match="looks binary.*NUL"):
        build_datasets(_cfg(tmp_path, [{"path": str(lone)}]), build_tokenizer("byte"), 10, 0, tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_binary_without_nul_and_compressed_binary(tmp_path):
    rng = np.random.default_rng(0)
    noise = rng.integers(0x80, 0x100, size=100_000, dtype=np.uint8).tobytes()  # no NUL, ~all invalid UTF-8
    (tmp_path / "noise.txt").write_bytes(noise)
    with pytest.raises(SourceError, match="noise.txt' looks binary.*invalid UTF-8"):
        list(iter_documents(str(tmp_path / "noise.txt")))
    (tmp_path / "z.jsonl.gz").write_bytes(gzip.compress(bytes(1000)))  # sniffed after decompression
    with pytest.raises(SourceError, match="z.jsonl.gz' looks binary"):
        list(iter_documents(str(tmp_path / "z.jsonl.gz")))


# --------------------------------------------------------------------------- truncated / corrupt compression


def _compressed(tmp_path, kind, body, name="t.txt"):
    path = tmp_path / f"{name}.{kind}"
    if kind == "gz":
        path.write_bytes(gzip.compress(body))
    else:
        path.write_bytes(zstandard.ZstdCompressor(write_checksum=True).compress(body))
    return path


@pytest.mark.parametrize("kind", ["gz", pytest.param("zst", marks=needs_zstd)])
@pytest.mark.parametrize("cut", [0.5, 0.999, 12])  # deep in the file, just before its end, in the header
def test_truncated_compressed_input(tmp_path, kind, cut, capsys):
    body = _text().encode()
    path = _compressed(tmp_path, kind, body)
    raw = path.read_bytes()
    path.write_bytes(raw[:int(len(raw) * cut) if cut < 1 else cut])
    docs = []
    with pytest.raises(SourceError, match="ends early: the compressed stream is truncated") as e:
        for d in iter_documents(str(path)):
            docs.append(d)
    assert str(path) in str(e.value)
    if cut == 0.5:
        assert len(docs) > 100  # the damage is found while streaming, far into the file
    assert cli_main(["preprocess", "--input", str(path), "--output-prefix", str(tmp_path / "o"), "--tokenizer",
                     "byte", "--no-progress"]) == 3
    assert "ends early" in capsys.readouterr().err
    assert not (tmp_path / "o.idx").exists() and not list(tmp_path.glob("o.*tmp*"))


@pytest.mark.parametrize("kind", ["gz", pytest.param("zst", marks=needs_zstd)])
def test_corrupt_compressed_input(tmp_path, kind):
    body = _text().encode()
    path = _compressed(tmp_path, kind, body)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x55
    path.write_bytes(bytes(raw))
    with pytest.raises(SourceError, match="is corrupt") as e:
        list(iter_documents(str(path)))
    assert str(path) in str(e.value)


@needs_zstd
def test_multi_frame_zstd_reads_whole(tmp_path):
    body = _text(500).encode()
    c = zstandard.ZstdCompressor()
    (tmp_path / "m.txt.zst").write_bytes(c.compress(body[:7777]) + c.compress(body[7777:]))
    (tmp_path / "m.txt").write_bytes(body)
    assert list(iter_documents(str(tmp_path / "m.txt.zst"))) == list(iter_documents(str(tmp_path / "m.txt")))


# --------------------------------------------------------------------------- invalid UTF-8


def test_invalid_utf8_counted_and_reported(tmp_path, capsys):
    path = tmp_path / "corpus.txt"
    path.write_bytes("caf\xe9 cr\xe8me\n\nna\xefve enough text\n".encode("latin-1"))  # 3 Latin-1 bytes
    report = SourceReport(str(path))
    assert list(iter_documents(str(path), report=report)) == ["caf\ufffd cr\ufffdme", "na\ufffdve enough text"]
    assert report.invalid_bytes == 3
    stats = preprocess([str(path)], str(tmp_path / "p"), "byte", progress=False, log=_quiet)
    assert stats.invalid_utf8 == {str(path): 3}
    assert f"3 invalid UTF-8 bytes replaced in {path}" in stats.summary()
    assert read_meta(tmp_path / "p")["invalid_utf8_bytes"] == {str(path): 3}
    # and in the line a run prints when it preprocesses a raw source
    build_datasets(_cfg(tmp_path, [{"path": str(path)}]), build_tokenizer("byte"), 2, 0, tmp_path / "cache")
    out = capsys.readouterr().out
    assert "[tessera data] preprocessed corpus" in out and f"3 invalid UTF-8 bytes replaced in {path}" in out


def test_mostly_invalid_utf8_is_binary(tmp_path):
    head = tmp_path / "latin_heavy.txt"
    head.write_bytes(("\xe9\xe8\xe0\xef" * 50 + " ok\n").encode("latin-1"))
    with pytest.raises(SourceError, match="latin_heavy.txt' looks binary"):
        preprocess([str(head)], str(tmp_path / "p"), "byte", progress=False, log=_quiet)
    # valid for its first 64 KiB, then mostly invalid: refused once read (nothing is written)
    tail = tmp_path / "tail.txt"
    tail.write_bytes(b"fine text\n" * 7000 + b"\xe9\xe8\n" * 200_000)
    with pytest.raises(SourceError, match=r"tail.txt' looks binary.*of its \d+ bytes are invalid UTF-8"):
        preprocess([str(tail)], str(tmp_path / "p"), "byte", progress=False, log=_quiet)
    assert not (tmp_path / "p.idx").exists() and not list(tmp_path.glob("p.*tmp*"))


# --------------------------------------------------------------------------- checks before anything is written


def test_check_data_sources_reads_only(tmp_path):
    good = _good_prefix(tmp_path)
    (tmp_path / "ok.txt").write_text(_text(20))
    trunc = _compressed(tmp_path, "gz", _text().encode(), name="late.txt")
    trunc.write_bytes(trunc.read_bytes()[:-100])
    tok = build_tokenizer("byte")
    before = sorted(p.name for p in tmp_path.iterdir())
    check_data_sources(_cfg(tmp_path, [{"path": str(good)}, {"path": str(tmp_path / "ok.txt")}]), tok)
    check_data_sources(_cfg(tmp_path, [{"path": str(good)}]), tok, verify_token_ids="scan")
    with pytest.raises(SourceError, match="nope.txt' is neither an existing"):
        check_data_sources(_cfg(tmp_path, [{"path": str(tmp_path / "nope.txt")}]), tok)
    (tmp_path / "noise.txt").write_bytes(bytes(range(256)) * 10)
    with pytest.raises(SourceError, match="looks binary"):
        check_data_sources(_cfg(tmp_path, [{"path": str(good)}, {"path": str(tmp_path / "noise.txt")}]), tok)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(before + ["noise.txt"])  # nothing written
    # build_datasets runs the same checks before it preprocesses anything: ok.txt is not cached when a later
    # source is binary
    with pytest.raises(SourceError, match="noise.txt' looks binary"):
        build_datasets(_cfg(tmp_path, [{"path": str(tmp_path / "ok.txt")}, {"path": str(tmp_path / "noise.txt")}]),
                       tok, 4, 0, tmp_path / "cache")
    assert not (tmp_path / "cache").exists()
    # damage near the end of a .gz is found only while streaming it: nothing of it is left in the cache
    with pytest.raises(SourceError, match="late.txt.gz' ends early"):
        build_datasets(_cfg(tmp_path, [{"path": str(tmp_path / "ok.txt")}, {"path": str(trunc)}]), tok, 4, 0,
                       tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("raw-late*")) and not list((tmp_path / "cache").glob("*tmp*"))


def test_unsafe_dataset_name_stays_in_cache_dir(tmp_path, monkeypatch):
    """Config validation rejects such names; the data layer must not write outside cache_dir anyway."""
    (tmp_path / "ok.txt").write_text(_text(20))
    cfg = _cfg(tmp_path, [{"path": str(tmp_path / "ok.txt"), "name": "x"}])
    object.__setattr__(cfg.data.train[0], "name", "../../escaped")
    cache = tmp_path / "a" / "b" / "cache"
    train, _ = build_datasets(cfg, build_tokenizer("byte"), 4, 0, cache)
    assert len(train) >= 4
    outside = [p for p in tmp_path.rglob("*escaped*") if cache not in p.parents]
    assert outside == [] and list(cache.glob("*escaped*"))
    assert train.spec.name == "../../escaped-train"  # the name itself is kept for metrics
    assert not os.path.exists(tmp_path / "a" / "escaped-train.json")
    descs = list(cache.glob("*escaped-train-*[0-9a-f].json"))
    assert len(descs) == 1 and json.loads(descs[0].read_text())["name"] == "../../escaped-train"
    raws = list(cache.glob("raw-*escaped*.idx"))
    assert len(raws) == 1 and IndexedDataset(raws[0].with_suffix("")).num_documents == 20
