"""BERT data: special tokens per tokenizer, word starts, MLM masking statistics, BertDataset samples (layout,
NSP pairs, determinism across rebuilds, resume and dp), and build_datasets for the mlm objectives."""

import math
import pickle

import numpy as np
import pytest
import torch

from engine.config import config_from_dict
from engine.data.bert_dataset import BertDataset, BertIndexSpec, document_table, segment_map, shuffle_order
from engine.data.build import build_datasets
from engine.data.gpt_dataset import BlendedDataset, DatasetBuildError, blending_counts
from engine.data.indexed import IndexedDataset, IndexedDatasetWriter
from engine.data.mlm_masking import IGNORE_INDEX, MaskingSpec, mask_tokens
from engine.data.sampler import PretrainingSampler
from engine.data.special_tokens import (SpecialTokenizer, SpecialTokens, base_tokenizer, tokenizer_for_objective,
                                        with_special_tokens)
from engine.data.tokenizer_train import main as train_sp
from engine.data.tokenizers import TokenizerError, build_tokenizer, tokenizer_fingerprint, tokenizer_record
from engine.data.word_starts import word_starts_for

BYTE = with_special_tokens(build_tokenizer("byte"))
SP = BYTE.special_tokens


def _within(count: int, n: int, p: float, sigmas: float = 4.0) -> bool:
    """count ~ Binomial(n, p) within `sigmas` standard deviations (+1 for the discreteness)."""
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p)) + 1


# --------------------------------------------------------------------------- special tokens


def test_byte_special_tokens_and_record():
    base = build_tokenizer("byte")
    assert (SP.cls, SP.sep, SP.mask, SP.pad) == (257, 258, 259, 260) and BYTE.vocab_size == 261
    assert BYTE.real_vocab_size == 257 and BYTE.eod_id == 256 and BYTE.spec == "byte"
    assert with_special_tokens(BYTE) is BYTE and base_tokenizer(BYTE) is BYTE.base
    assert BYTE.encode("hi") == [104, 105] and BYTE.decode([257, 104, 105, 259, 258, 260]) == "[CLS]hi[MASK][SEP][PAD]"
    # the causal vocabulary is untouched; the record and fingerprint carry the special tokens
    assert tokenizer_for_objective("byte", "causal").vocab_size == 257
    assert tokenizer_for_objective("byte", "mlm+nsp").vocab_size == 261
    rec, plain = tokenizer_record(BYTE), tokenizer_record(base)
    assert rec["special_tokens"] == {"cls": 257, "sep": 258, "mask": 259, "pad": 260} and "special_tokens" not in plain
    assert rec["fingerprint"] != plain["fingerprint"] == tokenizer_fingerprint(build_tokenizer("byte"))
    other = SpecialTokenizer(base, SpecialTokens(257, 258, 260, 259), BYTE.token_names, 4)  # roles swapped
    assert tokenizer_fingerprint(other) != rec["fingerprint"]
    with pytest.raises(TokenizerError, match="objective"):
        tokenizer_for_objective("byte", "mlm+sop")


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("sp")
    rng = np.random.default_rng(0)
    words = ["token", "model", "train", "data", "parallel", "tensor", "pipeline", "loss", "the", "a", "of"]
    (d / "c.txt").write_text("\n\n".join(" ".join(rng.choice(words, size=20)) + "." for _ in range(300)))
    assert train_sp(["--input", str(d / "c.txt"), "--output", str(d / "sp"), "--vocab-size", "400",
                     "--threads", "1", "--user-symbols", "[CLS]", "[SEP]"]) == 0
    return build_tokenizer(f"sentencepiece:{d / 'sp.model'}")


def test_sentencepiece_reuses_its_pieces(sp_model):
    tok = with_special_tokens(sp_model)
    sp = sp_model._sp
    s = tok.special_tokens
    assert s.cls == sp.PieceToId("[CLS]") and s.sep == sp.PieceToId("[SEP]")  # its user-defined pieces
    assert s.pad == sp.pad_id() == sp.PieceToId("<pad>") >= 0                  # its pad piece
    assert s.mask == sp_model.vocab_size and tok.vocab_size == sp_model.vocab_size + 1  # only [MASK] appended
    ids = np.array(sp_model.encode("the tensor model parallel"))
    starts = word_starts_for(tok)(ids)
    assert starts.tolist() == [sp.IdToPiece(int(i)).startswith("\u2581") for i in ids] and starts.sum() == 4


def _wordpiece(tmp_path, config):
    import json

    from tokenizers import Tokenizer
    from tokenizers.models import WordPiece
    from tokenizers.pre_tokenizers import BertPreTokenizer

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "<s>"]
    words = ["the", "token", "##s", "model", "##ing", "train", "a", ","]
    vocab = {t: i for i, t in enumerate(specials + words)}
    tok = Tokenizer(WordPiece(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = BertPreTokenizer()
    tok.add_special_tokens(specials)
    d = tmp_path / "wp"
    d.mkdir()
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    return build_tokenizer(f"hf:{d}"), vocab


def test_hf_wordpiece_reuses_configured_tokens(tmp_path):
    # the config's tokens win over the names searched for (cls_token "<s>" although "[CLS]" exists)
    base, vocab = _wordpiece(tmp_path, {"cls_token": "<s>", "sep_token": "[SEP]", "mask_token": {"content": "[MASK]"},
                                        "pad_token": "[PAD]"})
    tok = with_special_tokens(base)
    assert base.eod_id == vocab["[SEP]"]  # a BERT tokenizer has no end-of-text token: [SEP] ends documents
    assert tok.special_tokens == SpecialTokens(vocab["<s>"], vocab["[SEP]"], vocab["[MASK]"], vocab["[PAD]"])
    assert tok.vocab_size == base.vocab_size == len(vocab) and tok.appended == 0
    ids = np.array(base.encode("the tokens model training , a"))
    pieces = [base._tok.id_to_token(int(i)) for i in ids]
    assert pieces == ["the", "token", "##s", "model", "train", "##ing", ",", "a"]
    assert word_starts_for(tok)(ids).tolist() == [not p.startswith("##") for p in pieces]


def _byte_level_bpe(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["the model trains the tokens of the data\n"] * 20, trainer)
    tok.save(str(tmp_path / "bpe.json"))
    return build_tokenizer(f"hf:{tmp_path / 'bpe.json'}")


def test_hf_byte_level_appends_and_marks_words(tmp_path):
    base = _byte_level_bpe(tmp_path)
    tok = with_special_tokens(base)
    V = base.vocab_size
    assert tok.special_tokens == SpecialTokens(V, V + 1, V + 2, V + 3) and tok.vocab_size == V + 4
    ids = np.array(base.encode("the models\nthe data"))
    pieces = [base._tok.id_to_token(int(i)) for i in ids]
    starts = word_starts_for(tok)(ids)
    expect = [k == 0 or p.startswith("\u0120") or pieces[k - 1].endswith("\u010a") for k, p in enumerate(pieces)]
    assert starts.tolist() == expect and starts.sum() == 4  # the, models, the (after a newline), data


def test_whole_word_masking_refused_without_word_starts(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    t = Tokenizer(models.BPE(vocab={"a": 0, "b": 1, "ab": 2, "</s>": 3}, merges=[("a", "b")]))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.save(str(tmp_path / "plain.json"))
    tok = with_special_tokens(build_tokenizer(f"hf:{tmp_path / 'plain.json'}"))
    with pytest.raises(TokenizerError, match=r"whole-word masking: tokenizer 'hf:.*plain\.json'"):
        word_starts_for(tok)

    class Custom:
        vocab_size, eod_id, spec = 10, 9, "custom"

    with pytest.raises(TokenizerError, match="custom"):
        word_starts_for(Custom())


def test_byte_word_starts():
    text = "ab c,d  é_x"
    ids = np.array([SP.cls] + BYTE.encode(text) + [SP.sep, SP.pad])
    got = word_starts_for(BYTE)(ids)
    # [CLS] a b ' ' c , d ' ' ' ' é(2 bytes) _ x [SEP] [PAD]
    assert got.tolist() == [True, True, False, True, True, True, True, True, True, True, False, False, False,
                            True, True]


# --------------------------------------------------------------------------- masking


def _samples(n, S, rng):
    """n byte samples [CLS] body [SEP] [PAD]... with random body lengths -> int64 [n, S]."""
    out = np.full((n, S), SP.pad, dtype=np.int64)
    for r in range(n):
        L = int(rng.integers(S // 2, S - 1))
        out[r, 0], out[r, 1:L + 1], out[r, L + 1] = SP.cls, rng.integers(0, 256, L), SP.sep
    return out


@pytest.mark.parametrize("p,rep,rnd", [(0.15, 0.8, 0.1), (0.3, 0.5, 0.3)])
def test_masking_statistics(p, rep, rnd):
    spec = MaskingSpec(SP, BYTE.real_vocab_size, p, rep, rnd, exclude=(BYTE.eod_id,))
    assert spec.random_ids.tolist() == list(range(256))  # the real vocabulary without EOD and the special ids
    data = _samples(1500, 96, np.random.default_rng(0))
    chosen = n_mask = n_same = n_rand = 0
    per_pos = np.zeros(96)
    for r, ids in enumerate(data):
        inputs, targets = mask_tokens(ids, np.random.default_rng([7, r, 1]), spec)
        cand = ids < 256
        sel = targets != IGNORE_INDEX
        assert sel.sum() == max(1, math.floor(p * cand.sum() + 0.5))          # the exact count per sample
        assert not (sel & ~cand).any() and (inputs[~cand] == ids[~cand]).all()  # specials, pads: never
        assert (targets[sel] == ids[sel]).all() and (inputs[~sel] == ids[~sel]).all()
        shown = inputs[sel]
        n_mask += int((shown == SP.mask).sum())
        n_same += int((shown == ids[sel]).sum())
        other = (shown != SP.mask) & (shown != ids[sel])
        assert (shown[other] < 256).all()  # a random token of the real vocabulary, never a special one
        n_rand += int(other.sum())
        chosen += int(sel.sum())
        per_pos += sel
    R = 256
    assert _within(n_mask, chosen, rep)
    assert _within(n_same, chosen, (1 - rep - rnd) + rnd / R)  # kept, or a random token equal to the original
    assert _within(n_rand, chosen, rnd * (1 - 1 / R))
    # no position is favoured: both halves of the bodies are chosen at the rate p (positions 1..47 always real)
    cand_counts = (data[:, 1:48] < 256).sum()
    assert _within(int(per_pos[1:24].sum()), int((data[:, 1:24] < 256).sum()), p)
    assert _within(int(per_pos[24:48].sum()), int(cand_counts - (data[:, 1:24] < 256).sum()), p)


def test_masking_edge_cases():
    spec = MaskingSpec(SP, 257, exclude=(256,))
    only_special = np.array([SP.cls, SP.sep, SP.pad, SP.pad])
    inputs, targets = mask_tokens(only_special, np.random.default_rng(0), spec)
    assert (targets == IGNORE_INDEX).all() and (inputs == only_special).all()
    one = np.array([SP.cls, 65, SP.sep, SP.pad])
    assert (mask_tokens(one, np.random.default_rng(1), spec)[1] != IGNORE_INDEX).sum() == 1  # at least one
    with pytest.raises(ValueError, match="mask_prob"):
        MaskingSpec(SP, 257, mask_prob=0.0)
    with pytest.raises(ValueError, match="replace_prob"):
        MaskingSpec(SP, 257, replace_prob=0.8, random_prob=0.3)


def test_whole_word_masking_masks_whole_words():
    words = ["alpha", "be", "c", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda", "mu"]
    rng = np.random.default_rng(3)
    spec = MaskingSpec(SP, 257, exclude=(256,))
    ws_of = word_starts_for(BYTE)
    chosen = cands = 0
    for r in range(400):
        body = BYTE.encode(" ".join(rng.choice(words, size=int(rng.integers(8, 20)))))
        ids = np.array([SP.cls] + body + [SP.sep] + [SP.pad] * 4)
        ws = ws_of(ids)
        inputs, targets = mask_tokens(ids, np.random.default_rng([1, r, 1]), spec, word_starts=ws)
        sel = targets != IGNORE_INDEX
        word = np.cumsum(ws)
        for w in np.unique(word[sel]):  # every chosen word is chosen whole
            assert sel[word == w].all(), (r, w)
        assert not sel[ids >= 256].any()
        k = max(1, math.floor(0.15 * len(body) + 0.5))
        assert 1 <= sel.sum() and (sel.sum() <= k or len(np.unique(word[sel])) == 1)
        chosen, cands = chosen + int(sel.sum()), cands + len(body)
    assert 0.10 < chosen / cands <= 0.155  # words that overshoot are skipped: at or a little under 15%


# --------------------------------------------------------------------------- BertDataset


def _write(tmp_path, docs, name="d", eod=BYTE.eod_id):
    prefix = tmp_path / name
    with IndexedDatasetWriter(prefix, np.uint16) as w:
        for d in docs:
            w.add_document(list(d) + ([eod] if eod is not None else []))
    return IndexedDataset(prefix)


def _docs(lengths, seed=0):
    """Document k holds tokens from its own band [20k, 20k + 20), so a segment's document is visible."""
    rng = np.random.default_rng(seed)
    return [rng.integers(20 * k, 20 * k + 20, size=n) for k, n in enumerate(lengths)]


def _ds(tmp_path, indexed, seq_len, num_samples, nsp, seed=0, build=True, cache="c", begin=0, end=None, ws=None,
        masking=None):
    end = indexed.num_documents if end is None else end
    spec = BertIndexSpec("t", indexed.prefix, begin, end, seq_len, num_samples, seed, nsp)
    masking = masking or MaskingSpec(SP, BYTE.real_vocab_size, exclude=(BYTE.eod_id,))
    return BertDataset(indexed, spec, masking, BYTE.eod_id, tmp_path / cache, build, word_starts=ws)


def _unmasked(sample):
    x = sample["inputs"].clone()
    sel = sample["targets"] != IGNORE_INDEX
    x[sel] = sample["targets"][sel]
    return x.numpy()


def test_segments_cover_documents_and_layout(tmp_path):
    docs = _docs([3, 300, 62, 63, 0, 1])
    indexed = _write(tmp_path, docs)
    table = document_table(indexed, 0, len(docs), BYTE.eod_id)
    assert table[:, 1].tolist() == [3, 300, 62, 63, 0, 1]  # the trailing EOD is not content
    ds = _ds(tmp_path, indexed, 64, 10, nsp=False)
    segs = np.asarray(ds.segments)
    for k, d in enumerate(docs):  # a document's segments, in order, are the document
        mine = segs[segs[:, 0] == k]
        got = np.concatenate([d[o:o + n] for _, o, n in mine]) if len(mine) else np.zeros(0)
        np.testing.assert_array_equal(got, d)
        assert (mine[:, 2] <= 62).all()
    assert np.sum(segs[:, 0] == 1) == 5 and np.sum(segs[:, 0] == 3) == 2  # 300 / 62 -> 5 pieces, 63 -> 2
    n_seg = len(segs)
    assert len(ds) == n_seg and sorted(np.asarray(ds.shuffle).tolist()) == list(range(n_seg))  # one epoch
    for i in range(len(ds)):
        s = ds[i]
        doc, off, n = ds.segment(i)
        x = _unmasked(s)
        assert s["inputs"].shape == (64,) and s["inputs"].dtype == torch.long and "nsp_label" not in s
        np.testing.assert_array_equal(x[:n + 2], np.r_[SP.cls, docs[doc][off:off + n], SP.sep])
        assert (x[n + 2:] == SP.pad).all() and (s["doc_ids"].numpy() == (np.arange(64) >= n + 2)).all()
        assert (s["token_types"] == 0).all() and BYTE.eod_id not in x
        sel = (s["targets"] != IGNORE_INDEX).numpy()
        assert sel.sum() == max(1, math.floor(0.15 * n + 0.5)) and not sel[0] and not sel[n + 1:].any()


def test_segment_map_and_shuffle_helpers():
    docs = np.array([[0, 10], [10, 1], [11, 0], [11, 7]])
    seg = segment_map(docs, 5, max_len=4, min_len=2)
    assert seg.tolist() == [[5, 0, 3], [5, 3, 3], [5, 6, 4], [8, 0, 3], [8, 3, 4]]
    a, b = shuffle_order(7, 3, seed=1), shuffle_order(7, 5, seed=1)
    np.testing.assert_array_equal(a, b[:21])  # more epochs keep the first ones
    assert all(sorted(b[e * 7:(e + 1) * 7].tolist()) == list(range(7)) for e in range(5))
    assert not np.array_equal(shuffle_order(7, 3, seed=2), a)


def _occurs(piece, doc):
    """Whether piece is a contiguous slice of doc."""
    if len(piece) > len(doc):
        return False
    return bool((np.lib.stride_tricks.sliding_window_view(doc, len(piece)) == piece).all(axis=1).any())


def test_nsp_pairs(tmp_path):
    docs = _docs([40, 90, 25, 60, 1, 33, 70, 12])
    indexed = _write(tmp_path, docs)
    ds = _ds(tmp_path, indexed, 32, 1200, nsp=True)
    assert ds.segments[:, 2].min() >= 2 and 4 not in set(np.asarray(ds.segments)[:, 0].tolist())  # 1-token doc
    labels = []
    for i in range(1200):
        s = ds[i]
        label = int(s["nsp_label"])
        labels.append(label)
        x = _unmasked(s)
        seps = np.flatnonzero(x == SP.sep)
        assert x[0] == SP.cls and len(seps) == 2
        a, b = x[1:seps[0]], x[seps[0] + 1:seps[1]]
        assert len(a) >= 1 and len(b) >= 1 and (x[seps[1] + 1:] == SP.pad).all()
        pos = np.arange(32)
        assert (s["token_types"].numpy() == ((pos > seps[0]) & (pos <= seps[1]))).all()  # B and its [SEP]
        assert (s["doc_ids"].numpy() == (pos > seps[1])).all()                            # 1 = padding
        doc_a, doc_b = int(a[0]) // 20, int(b[0]) // 20
        assert (a // 20 == doc_a).all() and (b // 20 == doc_b).all()
        if label == 0:  # B really follows A in A's document
            assert doc_b == doc_a and _occurs(np.r_[a, b], docs[doc_a])
        else:           # B is a piece of another document
            assert doc_b != doc_a and _occurs(a, docs[doc_a]) and _occurs(b, docs[doc_b])
    assert _within(sum(labels), len(labels), 0.5)


def test_same_samples_after_rebuild_resume_and_at_any_dp(tmp_path):
    docs = _docs([50, 120, 33, 80, 64, 7, 90, 41])
    indexed = _write(tmp_path, docs)
    ds = _ds(tmp_path, indexed, 32, 64, nsp=True)

    def same(x, y):
        return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)

    reader = _ds(tmp_path, IndexedDataset(indexed.prefix), 32, 64, nsp=True, build=False)  # a fresh object
    rebuilt = _ds(tmp_path, indexed, 32, 64, nsp=True, cache="c2")                          # built again
    unpickled = pickle.loads(pickle.dumps(ds))
    for i in range(64):
        assert same(ds[i], reader[i]) and same(ds[i], rebuilt[i]) and same(ds[i], unpickled[i])
    reseeded = _ds(tmp_path, indexed, 32, 64, nsp=True, seed=1, cache="c3")
    assert not all(same(ds[i], reseeded[i]) for i in range(4))

    def read(dp, rank, consumed, dataset):
        s = PretrainingSampler(64, consumed, micro_batch_size=2, dp_rank=rank, dp_size=dp, global_batch_size=8)
        return {i: dataset[i] for batch in s for i in batch}

    one = read(1, 0, 0, ds)
    two = {**read(2, 0, 0, ds), **read(2, 1, 0, reader)}  # two ranks, each with its own dataset object
    resumed = read(2, 0, 16, rebuilt) | read(2, 1, 16, unpickled)
    assert one.keys() == two.keys() == set(range(64)) and set(resumed) == set(range(16, 64))
    assert all(same(one[i], two[i]) for i in one) and all(same(one[i], resumed[i]) for i in resumed)


def test_longer_run_extends_the_same_order(tmp_path):
    indexed = _write(tmp_path, _docs([30, 40, 50]))
    short = _ds(tmp_path, indexed, 16, 10, nsp=False)
    n_seg = len(short.segments)
    assert len(short) == n_seg * math.ceil(10 / n_seg)
    with pytest.raises(DatasetBuildError, match="extends it"):  # a reader cannot extend the cache itself
        _ds(tmp_path, indexed, 16, 10 * n_seg, nsp=False, build=False)
    long = _ds(tmp_path, indexed, 16, 10 * n_seg, nsp=False)
    assert len(long) == 10 * n_seg
    for i in range(len(short)):
        assert torch.equal(short[i]["inputs"], long[i]["inputs"])


def test_errors_short_documents_and_seq_len(tmp_path):
    indexed = _write(tmp_path, _docs([5, 6, 7]))
    with pytest.raises(DatasetBuildError, match=r"seq_len=2 is too small for mlm: expected at least 3"):
        _ds(tmp_path, indexed, 2, 4, nsp=False)
    with pytest.raises(DatasetBuildError, match=r"seq_len=4 is too small for mlm\+nsp: expected at least 5"):
        _ds(tmp_path, indexed, 4, 4, nsp=True)
    empty = _write(tmp_path, [[], []], name="empty")  # documents of only an EOD
    with pytest.raises(DatasetBuildError, match="no document long enough for mlm"):
        _ds(tmp_path, empty, 16, 4, nsp=False)
    ones = _write(tmp_path, [[3], [4], [5]], name="ones")
    with pytest.raises(DatasetBuildError, match=r"no document long enough for mlm\+nsp"):
        _ds(tmp_path, ones, 16, 4, nsp=True)
    single = _write(tmp_path, _docs([30]), name="single")
    with pytest.raises(DatasetBuildError, match="at least 2 non-empty documents"):
        _ds(tmp_path, single, 16, 4, nsp=True)
    with pytest.raises(DatasetBuildError, match="does not exist"):
        _ds(tmp_path, indexed, 16, 4, nsp=False, build=False, cache="nothing")


def test_blended_bert_datasets(tmp_path):
    a = _ds(tmp_path, _write(tmp_path, _docs([40, 50]), name="a"), 16, 40, nsp=False)
    spec = BertIndexSpec("u", str(tmp_path / "b"), 0, 2, 16, 40, 0, False)
    b = BertDataset(_write(tmp_path, _docs([60, 20], seed=1), name="b"), spec, a.masking, BYTE.eod_id,
                    tmp_path / "c", True, source="b")
    idx, smp = blending_counts([0.5, 0.5], 40, global_batch_size=8, seed=0)
    blend = BlendedDataset([a, b], idx, smp)
    assert blend.samples_in(0, 8) == {"t": 4, "b": 4} and sum(blend.samples_drawn(16).values()) == 16
    assert set(blend[3]) == {"inputs", "targets", "token_types", "doc_ids"}


def test_whole_word_dataset(tmp_path):
    text = "the quick brown fox jumps over the lazy dog and keeps running far away"
    indexed = _write(tmp_path, [BYTE.encode(text)] * 4)
    ws = word_starts_for(BYTE)
    ds = _ds(tmp_path, indexed, 96, 40, nsp=False, ws=ws)
    for i in range(40):
        s = ds[i]
        sel = (s["targets"] != IGNORE_INDEX).numpy()
        word = np.cumsum(ws(_unmasked(s)))
        assert sel.any() and all(sel[word == w].all() for w in np.unique(word[sel]))


# --------------------------------------------------------------------------- build_datasets


def _cfg(tmp_path, objective, **train):
    tree = {"model": {"max_seq_len": 64, "d_model": 32, "n_layers": 2, "n_heads": 2},
            "data": {"seq_len": 48, "split": "90,10,0", "train": [{"path": "builtin:pydoc"}]},
            "train": {"micro_batch_size": 2, "global_batch_size": 4, "out_dir": str(tmp_path / "run")}}
    cfg = config_from_dict(tree)
    # set after validation: the encoder model fields are not needed by the data
    cfg.train.objective = objective
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return cfg


def test_build_datasets_mlm_objectives(tmp_path):
    cache = tmp_path / "cache"
    gpt, _ = build_datasets(_cfg(tmp_path, "causal"), build_tokenizer("byte"), 8, 4, cache)
    assert "tokens" in gpt[0]
    train, valids = build_datasets(_cfg(tmp_path, "mlm+nsp", whole_word_masking=True), build_tokenizer("byte"),
                                   40, 8, cache)
    assert isinstance(train, BertDataset) and train.spec.nsp and train.word_starts is not None
    assert list(valids) == ["pydoc"] and isinstance(valids["pydoc"], BertDataset) and len(valids["pydoc"]) >= 8
    assert train.spec.doc_end == valids["pydoc"].spec.doc_begin  # the train / valid document split
    s = train[0]
    assert set(s) == {"inputs", "targets", "token_types", "doc_ids", "nsp_label"} and s["inputs"].shape == (48,)
    assert int(s["inputs"][0]) == 257 and int(s["inputs"].max()) <= 260
    assert len(list(cache.glob("raw-*.idx"))) == 1  # the preprocessed corpus is shared with the causal run
    mlm, _ = build_datasets(_cfg(tmp_path, "mlm", mask_prob=0.3), BYTE, 40, 0, cache)  # a wrapped tokenizer too
    s = mlm[0]
    assert "nsp_label" not in s and (s["token_types"] == 0).all()
    n = int((s["doc_ids"] == 0).sum()) - 2
    assert int((s["targets"] != IGNORE_INDEX).sum()) == max(1, math.floor(0.3 * n + 0.5))
    cfg = _cfg(tmp_path, "mlm")
    cfg.model.vocab_size = 257  # the causal vocabulary: no room for the special tokens
    with pytest.raises(TokenizerError, match="261 ids, more than model.vocab_size=257"):
        build_datasets(cfg, build_tokenizer("byte"), 4, 0, cache)


def test_build_datasets_refuses_whole_word_masking_before_writing(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    t = Tokenizer(models.BPE(vocab={"a": 0, "b": 1, "</s>": 2}, merges=[]))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.save(str(tmp_path / "plain.json"))
    with pytest.raises(TokenizerError, match="whole-word masking"):
        build_datasets(_cfg(tmp_path, "mlm", whole_word_masking=True), build_tokenizer(f"hf:{tmp_path}/plain.json"),
                       4, 0, tmp_path / "cache")
    assert not (tmp_path / "cache").exists()
