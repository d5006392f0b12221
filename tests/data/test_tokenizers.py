"""SentencePiece training and use: special tokens recorded, lossless byte fallback, preprocessing with it."""

import json

import numpy as np
import pytest

from engine.data import build_tokenizer
from engine.data.indexed import IndexedDataset
from engine.data.preprocess import check_tokenizer, preprocess
from engine.data.tokenizer_train import main as train_main
from engine.data.tokenizers import TokenizerError


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("sp")
    rng = np.random.default_rng(0)
    words = ["token", "model", "train", "data", "parallel", "tensor", "pipeline", "loss", "the", "a", "of"]
    text = "\n\n".join(" ".join(rng.choice(words, size=20)) + "." for _ in range(400))
    (d / "corpus.txt").write_text(text)
    rc = train_main(["train", "--input", str(d / "corpus.txt"), "--output", str(d / "sp"), "--vocab-size", "400",
                     "--model-type", "bpe", "--threads", "1", "--user-symbols", "<|im_start|>"])
    assert rc == 0
    return d


def test_trained_model_and_meta(sp_model):
    meta = json.loads((sp_model / "sp.json").read_text())
    tok = build_tokenizer(f"sentencepiece:{sp_model / 'sp.model'}")
    assert tok.vocab_size == meta["vocab_size"] <= 400
    assert tok.eod_id == meta["special_tokens"]["eod"][1] == 2
    assert meta["special_tokens"]["<|im_start|>"][1] > 3
    text = "the tensor model — ünïcode 中文 42"
    assert tok.decode(tok.encode(text)) == text  # byte fallback: unseen characters survive
    assert tok.eod_id not in tok.encode("</s> the")  # control symbol: text never produces EOD


def test_unigram_small(tmp_path):
    (tmp_path / "c.txt").write_text("\n".join(f"sentence number {i} with words" for i in range(300)))
    assert train_main(["--input", str(tmp_path / "c.txt"), "--output", str(tmp_path / "u"), "--vocab-size", "300",
                       "--model-type", "unigram", "--threads", "1", "--text-mode", "line"]) == 0
    tok = build_tokenizer(f"sentencepiece:{tmp_path / 'u.model'}")
    assert tok.decode(tok.encode("sentence number 7")) == "sentence number 7"


def test_train_missing_input(tmp_path, capsys):
    assert train_main(["--input", str(tmp_path / "nope.txt"), "--output", str(tmp_path / "x"),
                       "--vocab-size", "100"]) == 1
    assert "nope.txt" in capsys.readouterr().err


def test_preprocess_with_sentencepiece_workers(sp_model, tmp_path):
    spec = f"sentencepiece:{sp_model / 'sp.model'}"
    inputs = [str(sp_model / "corpus.txt")]
    preprocess(inputs, str(tmp_path / "one"), spec, workers=1, progress=False, log=lambda s: None)
    preprocess(inputs, str(tmp_path / "two"), spec, workers=2, progress=False, log=lambda s: None)
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"one{ext}").read_bytes() == (tmp_path / f"two{ext}").read_bytes()
    ds = IndexedDataset(tmp_path / "one")
    tok = build_tokenizer(spec)
    assert ds[0][-1] == tok.eod_id and ds.dtype == np.uint16
    check_tokenizer(tmp_path / "one", tok)
    with pytest.raises(TokenizerError, match="was built with tokenizer 'sentencepiece:"):
        check_tokenizer(tmp_path / "one", build_tokenizer("byte"))
