"""The names the training loop relies on: tokenizers, PretrainingSampler, document-masking features."""

import pytest
import torch

from engine.data import PretrainingSampler, Tokenizer, build_tokenizer
from engine.data.masking import document_features


def test_byte_tokenizer():
    tok = build_tokenizer("byte")
    assert isinstance(tok, Tokenizer)
    assert (tok.vocab_size, tok.eod_id, tok.spec) == (257, 256, "byte")
    ids = tok.encode("héllo")
    assert ids == list("héllo".encode())
    assert tok.decode(ids + [256]) == "héllo"
    assert tok.decode(ids[:2]) == "h\ufffd"  # cut mid-character: replaced, never raises


@pytest.mark.parametrize("spec", ["sentencepiece:/nope/x.model", "hf:/nope/tok.json"])
def test_missing_tokenizer_file_names_path(spec):
    with pytest.raises(ValueError, match="/nope/"):
        build_tokenizer(spec)


def test_invalid_tokenizer_files(tmp_path):
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="bad.model"):
        build_tokenizer(f"sentencepiece:{bad}")
    with pytest.raises(ValueError, match="bad.model"):
        build_tokenizer(f"hf:{bad}")
    with pytest.raises(ValueError, match="expected"):
        build_tokenizer("gpt2")


def test_document_features_manual():
    t = torch.tensor([5, 9, 1, 9, 9, 2, 3])  # eod = 9
    pos, doc = document_features(t, 9)
    assert pos.tolist() == [0, 1, 0, 1, 0, 0]
    assert doc.tolist() == [0, 0, 1, 1, 2, 3]


def _global_batches(total, consumed, mbs, dp, G, seed=None):
    """Per optimizer step, the sorted sample indices all dp ranks see together."""
    per_rank = [list(PretrainingSampler(total, consumed, mbs, r, dp, G, seed)) for r in range(dp)]
    m_per_step = G // (mbs * dp)
    steps = len(per_rank[0]) // m_per_step
    out = []
    for s in range(steps):
        batch = []
        for r in range(dp):
            for mb in per_rank[r][s * m_per_step:(s + 1) * m_per_step]:
                assert len(mb) == mbs
                batch.extend(mb)
        out.append(sorted(batch))
    return out


@pytest.mark.parametrize("seed", [None, 7])
def test_sampler_order_independent_of_dp_and_resumable(seed):
    ref = _global_batches(100, 0, 2, 1, 8, seed)
    flat = sum(ref, [])
    assert len(ref) == 12 and len(flat) == len(set(flat)) == 96
    for dp in (2, 4):
        assert _global_batches(100, 0, 2, dp, 8, seed) == ref
    # saved at dp=4, resumed at step 5 with dp=2 and another micro-batch size
    assert _global_batches(100, 40, 1, 2, 8, seed) == ref[5:]
    assert _global_batches(100, 96, 2, 2, 8, seed) == []


def test_sampler_rank_slices():
    s = PretrainingSampler(100, 0, 2, 1, 2, 8)
    assert list(s)[:3] == [[4, 5], [6, 7], [12, 13]] and len(s) == 24


def test_sampler_errors():
    with pytest.raises(ValueError, match="consumed_samples"):
        PretrainingSampler(100, 3, 2, 0, 2, 8)
    with pytest.raises(ValueError, match="divisible"):
        PretrainingSampler(100, 0, 3, 0, 2, 8)
    with pytest.raises(ValueError, match="dp_rank"):
        PretrainingSampler(100, 0, 2, 2, 2, 8)
