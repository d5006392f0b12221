"""tessera preprocess: formats, workers equal one worker, filters, errors."""

import gzip
import json

import numpy as np
import pytest

try:  # a declared dependency; the tests still run (without the .zst input) where it is missing
    import zstandard
except ImportError:  # pragma: no cover
    zstandard = None

from engine.data.cleaning import CleanConfig, clean, dup_line_fraction
from engine.data.indexed import IndexedDataset
from engine.data.preprocess import main, preprocess, read_meta


def _corpus(tmp_path):
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "épsilon", "zeta", "eta", "theta", "iota", "kappa"]
    docs = [" ".join(rng.choice(words, size=int(rng.integers(3, 60)))) for _ in range(700)]
    txt = tmp_path / "a.txt"
    txt.write_text("\n\n".join(docs[:300]) + "\n")
    jl = tmp_path / "b.jsonl.gz"
    with gzip.open(jl, "wt", encoding="utf-8") as f:
        for d in docs[300:500]:
            f.write(json.dumps({"text": d, "id": 1}) + "\n")
    zs = tmp_path / "c.txt.zst"
    body = ("\n\n".join(docs[500:]) + "\n").encode()
    if zstandard is not None:
        zs.write_bytes(zstandard.ZstdCompressor().compress(body))
    else:
        zs = tmp_path / "c.txt"
        zs.write_bytes(body)
    return [str(txt), str(jl), str(zs)], docs


def test_workers_equal_one_worker(tmp_path):
    inputs, docs = _corpus(tmp_path)
    s1 = preprocess(inputs, str(tmp_path / "w1"), "byte", workers=1, progress=False, log=lambda s: None)
    s2 = preprocess(inputs, str(tmp_path / "w2"), "byte", workers=2, progress=False, log=lambda s: None)
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"w1{ext}").read_bytes() == (tmp_path / f"w2{ext}").read_bytes()
    assert s1.docs_in == s2.docs_in == 700 and s1.tokens == s2.tokens
    ds = IndexedDataset(tmp_path / "w1")
    assert ds.dtype == np.uint16
    kept = list(dict.fromkeys(docs))  # exact dedup keeps first occurrences, in order
    assert len(ds) == len(kept) == s1.docs_out
    assert bytes(ds[0][:-1].tolist()).decode() == kept[0] and ds[0][-1] == 256
    assert bytes(ds[len(ds) - 1][:-1].tolist()).decode() == kept[-1]
    meta = read_meta(tmp_path / "w1")
    assert meta["tokenizer"] == "byte" and meta["vocab_size"] == 257 and meta["documents"] == len(ds)


def test_filters_report(tmp_path):
    base = " ".join(f"w{i}" for i in range(60)) + " lazy " + " ".join(f"v{i}" for i in range(20))
    docs = [base, base,                                      # exact duplicate
            base.replace("lazy", "sleepy", 1),               # near duplicate
            "x",                                             # too short
            "line one\nline one\nline one\nother",           # repetitive
            "y" * 1000,                                       # too long
            "caf\u0065\u0301 ok\x07 fine enough"]            # normalised, control char removed
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in docs))
    cfg = CleanConfig(min_chars=5, max_chars=900, max_dup_line_frac=0.5, exact_dedup=True, minhash_threshold=0.7)
    stats = preprocess([str(tmp_path / "d.jsonl")], str(tmp_path / "f"), "byte", json_key="body", cfg=cfg,
                       progress=False, log=lambda s: None)
    assert stats.removed == {"exact_duplicate": 1, "near_duplicate": 1, "too_short": 1, "repetition": 1,
                             "too_long": 1}
    ds = IndexedDataset(tmp_path / "f")
    assert len(ds) == 2
    assert bytes(ds[1][:-1].tolist()).decode() == "caf\u00e9 ok fine enough"
    assert "removed by near_duplicate: 1" in stats.summary()


def test_clean_units():
    assert dup_line_fraction("a\na\nb") == pytest.approx(2 / 3)
    assert clean("\r\nab\x00c", CleanConfig()) == "\nabc"
    assert clean("  ", CleanConfig()) == ("too_short",)


def test_line_mode(tmp_path):
    (tmp_path / "l.txt").write_text("one\ntwo\n\nthree\n")
    preprocess([str(tmp_path / "l.txt")], str(tmp_path / "l"), "byte", text_mode="line", progress=False,
               log=lambda s: None)
    ds = IndexedDataset(tmp_path / "l")
    assert [bytes(ds[i][:-1].tolist()).decode() for i in range(len(ds))] == ["one", "two", "three"]


def test_cli(tmp_path, capsys):
    (tmp_path / "t.txt").write_text("hello world\n\nsecond doc\n")
    assert main(["--input", str(tmp_path / "t.txt"), "--output-prefix", str(tmp_path / "o"), "--tokenizer", "byte",
                 "--workers", "2", "--no-progress"]) == 0
    assert "2 written" in capsys.readouterr().out
    assert len(IndexedDataset(tmp_path / "o")) == 2


@pytest.mark.parametrize("args,match,code", [  # exit codes of engine/errors.py: 3 data, 4 tokenizer
    (["--input", "MISSING.txt", "--tokenizer", "byte"], "MISSING.txt", 3),
    (["--input", "T", "--tokenizer", "sentencepiece:/no/such.model"], "/no/such.model", 4),
    (["--input", "T", "--tokenizer", "wordpiece"], "expected", 4),
    (["--input", "J", "--tokenizer", "byte"], "key 'text'", 3),
])
def test_cli_errors(tmp_path, capsys, args, match, code):
    """Through the CLI's one error path (engine/cli.py): one line naming the thing, the documented code."""
    from engine.cli import main as cli_main

    (tmp_path / "t.txt").write_text("hello\n")
    (tmp_path / "j.jsonl").write_text('{"body": "x"}\n')
    args = [{"T": str(tmp_path / "t.txt"), "J": str(tmp_path / "j.jsonl")}.get(a, a) for a in args]
    assert cli_main(["preprocess", *args, "--output-prefix", str(tmp_path / "o"), "--no-progress"]) == code
    err = capsys.readouterr().err
    assert match in err and err.startswith("tessera: error") and "Traceback" not in err, err
    assert not (tmp_path / "o.idx").exists()
