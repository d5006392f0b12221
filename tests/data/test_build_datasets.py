"""build_datasets end to end: raw sources preprocessed into the cache, splits, caching, barrier, blending."""

import numpy as np
import pytest
import torch

from engine.config import config_from_dict
from engine.data import build_datasets, build_tokenizer
from engine.data.gpt_dataset import DatasetBuildError
from engine.data.preprocess import preprocess
from engine.data.tokenizers import TokenizerError


def _cfg(seq_len=32, model=None, **data):
    tree = {"model": {"max_seq_len": 64, "d_model": 32, "n_layers": 2, "n_heads": 2, **(model or {})},
            "data": {"seq_len": seq_len, **data}, "train": {"micro_batch_size": 2, "global_batch_size": 4}}
    return config_from_dict(tree)


def _pieces(tok, sample):
    """Decoded text pieces between EODs of one sample."""
    ids = sample["tokens"].tolist()
    out, cur = [], []
    for i in ids:
        if i == tok.eod_id:
            out.append(tok.decode(cur))
            cur = []
        else:
            cur.append(i)
    out.append(tok.decode(cur))
    return [p for p in out if len(p) >= 8]


def test_pydoc_default(tmp_path):
    from pydoc_data.topics import topics

    tok = build_tokenizer("byte")
    train, valids = build_datasets(_cfg(), tok, train_samples=100, valid_samples=10, cache_dir=tmp_path)
    assert len(train) >= 100 and list(valids) == ["pydoc"] and len(valids["pydoc"]) >= 10
    s = train[0]
    assert s["tokens"].dtype == torch.long and s["tokens"].shape == (33,) and "position_ids" not in s
    docs = [topics[k] for k in sorted(topics)]
    # 98/2/0 of 79 documents: train = docs[:77], valid = docs[77:]; pieces never cross the split
    train_text, valid_text = "\x00".join(docs[:77]), "\x00".join(docs[77:])
    for i in range(0, len(train), max(len(train) // 50, 1)):
        for p in _pieces(tok, train[i]):
            if "\ufffd" not in p:
                assert p in train_text
    for i in range(len(valids["pydoc"])):
        for p in _pieces(tok, valids["pydoc"][i]):
            if "\ufffd" not in p:
                assert p in valid_text
    # all train samples together cover each train token once per epoch (no gaps, no overlap): one epoch of
    # the 77 documents (each document's bytes + EOD, in the dataset's document order) is cut into
    # consecutive 33-token windows that share only their boundary token, and fewer than 32 tokens are left
    encoded = [np.array(list(d.encode()) + [tok.eod_id]) for d in docs[:77]]
    n_tokens = sum(len(e) for e in encoded)
    assert len(train) == (n_tokens - 1) // 32
    assert sorted(train.doc_idx.tolist()) == list(range(77))  # each train document exactly once
    stream = np.concatenate([encoded[int(k)] for k in train.doc_idx])
    position = np.asarray(train.shuffle_idx)  # sample i is window position[i]: it starts at token 32 * position[i]
    assert sorted(position.tolist()) == list(range(len(train)))  # every window once
    for j, i in enumerate(np.argsort(position)):  # in stream order
        np.testing.assert_array_equal(train[int(i)]["tokens"].numpy(), stream[32 * j: 32 * j + 33])


def test_document_masking_and_wraparound(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("aaaa\n\nbbbbbbbbbb\n\ncc\n\n" * 3)  # 57 tokens: 100 samples need many epochs
    cfg = _cfg(seq_len=16, document_masking=True, train=[{"path": str(text)}], split="100,0,0")
    train, valids = build_datasets(cfg, build_tokenizer("byte"), 100, 0, tmp_path)
    assert valids == {} and len(train) >= 100
    doc_len = {b"a": 4, b"b": 10, b"c": 2}
    for i in range(len(train)):
        s = train[i]
        toks, pos, doc = s["tokens"][:-1], s["position_ids"], s["doc_ids"]
        assert s["tokens"].shape == (17,) and pos.shape == (16,) and doc.shape == (16,)
        for j in range(1, 16):
            if toks[j - 1] == 256:
                assert pos[j] == 0 and doc[j] == doc[j - 1] + 1
            else:
                assert pos[j] == pos[j - 1] + 1 and doc[j] == doc[j - 1]
        # every document is intact: runs of one letter of the right length between EODs (the window may
        # cut the first and last run short, never lengthen or mix one)
        pieces = bytes(t if t != 256 else ord("|") for t in s["tokens"].tolist()).split(b"|")
        for n, piece in enumerate(pieces):
            if piece:
                assert len(set(piece)) == 1 and piece[:1] in (b"a", b"b", b"c"), pieces
            full = doc_len[piece[:1]] if piece else None
            if 0 < n < len(pieces) - 1:  # between two EODs: a whole document
                assert len(piece) == full, pieces
            elif piece:
                assert len(piece) <= full, pieces


def test_cache_reuse_and_non_builder(tmp_path):
    tok = build_tokenizer("byte")
    cfg = _cfg()
    calls = []
    a, va = build_datasets(cfg, tok, 50, 5, tmp_path, is_builder=True, barrier=lambda: calls.append("b"))
    assert calls == ["b"]
    files = sorted(p.name for p in tmp_path.iterdir())
    mtimes = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    b, vb = build_datasets(cfg, tok, 50, 5, tmp_path, is_builder=False, barrier=lambda: calls.append("w"))
    assert calls == ["b", "w"]
    assert sorted(p.name for p in tmp_path.iterdir()) == files
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == mtimes
    for i in (0, 7, 49):
        assert torch.equal(a[i]["tokens"], b[i]["tokens"])
    assert torch.equal(va["pydoc"][3]["tokens"], vb["pydoc"][3]["tokens"])
    # another seed builds other indices, with another order
    c, _ = build_datasets(_cfg(seed=5), tok, 50, 5, tmp_path)
    assert not all(torch.equal(a[i]["tokens"], c[i]["tokens"]) for i in range(5))


def test_non_builder_without_cache_fails_clearly(tmp_path):
    tok = build_tokenizer("byte")
    with pytest.raises((DatasetBuildError, FileNotFoundError, ValueError), match="builder|does not exist"):
        build_datasets(_cfg(), tok, 10, 2, tmp_path / "empty", is_builder=False)


def test_builder_failure_still_reaches_barrier(tmp_path):
    calls = []
    with pytest.raises(ValueError, match="nope.txt"):
        build_datasets(_cfg(train=[{"path": str(tmp_path / "nope.txt")}]), build_tokenizer("byte"), 10, 2, tmp_path,
                       barrier=lambda: calls.append(1))
    assert calls == [1]


def test_blending_exact_proportions(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("\n\n".join("a" * (10 + i % 7) for i in range(40)))
    b.write_text("\n\n".join("b" * (5 + i % 3) for i in range(40)))
    cfg = _cfg(seq_len=8, train=[{"path": str(a), "weight": 3}, {"path": str(b), "weight": 1}],
               split="90,10,0")
    tok = build_tokenizer("byte")
    train, valids = build_datasets(cfg, tok, 400, 4, tmp_path)
    assert len(train) == 400 and sorted(valids) == ["a", "b"]
    src = []
    for i in range(400):
        letters = set(train[i]["tokens"].tolist()) - {256}
        assert len(letters) == 1  # a sample never mixes datasets
        src.append(letters.pop())
    assert src.count(ord("a")) == 300 and src.count(ord("b")) == 100
    assert abs(src[:40].count(ord("a")) - 30) <= 1
    # DataLoader workers under spawn get a small pickle and the same samples
    import pickle

    blob = pickle.dumps(train)
    assert len(blob) < 20_000
    again = pickle.loads(blob)
    assert all(torch.equal(again[i]["tokens"], train[i]["tokens"]) for i in (0, 17, 399))


def test_megatron_prefix_and_tokenizer_mismatch(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n".join(f"document number {i} " * 5 for i in range(30)))
    preprocess([str(corpus)], str(tmp_path / "pre"), "byte", progress=False, log=lambda s: None)
    cfg = _cfg(train=[{"path": str(tmp_path / "pre")}])
    train, valids = build_datasets(cfg, build_tokenizer("byte"), 20, 2, tmp_path / "cache")
    assert list(valids) == ["pre"] and len(train) >= 20
    hf = _tiny_hf_tokenizer(tmp_path)
    with pytest.raises(TokenizerError, match="was built with tokenizer 'byte'"):
        build_datasets(cfg, build_tokenizer(f"hf:{hf}"), 20, 2, tmp_path / "cache")
    with pytest.raises(TokenizerError, match="model.vocab_size=100"):
        build_datasets(_cfg(model={"vocab_size": 100}, train=[{"path": str(tmp_path / "pre")}]),
                       build_tokenizer("byte"), 20, 2, tmp_path / "cache")


def test_bad_dataset_path(tmp_path):
    with pytest.raises(ValueError, match="neither an existing"):
        build_datasets(_cfg(train=[{"path": str(tmp_path / "missing")}]), build_tokenizer("byte"), 5, 1, tmp_path)


def _tiny_hf_tokenizer(tmp_path):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    vocab = {"<unk>": 0, "</s>": 1, "document": 2, "number": 3}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    path = tmp_path / "tok.json"
    tok.save(str(path))
    return path


def test_hf_tokenizer(tmp_path):
    tok = build_tokenizer(f"hf:{_tiny_hf_tokenizer(tmp_path)}")
    assert tok.vocab_size == 4 and tok.eod_id == 1
    assert tok.encode("document number x") == [2, 3, 0]
    assert tok.decode([2, 3]) == "document number"
