"""`tessera generate` sampling (engine/generate.py) with a stub model whose logits the test sets."""

import math
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from engine.generate import generate_ids, generate_text


class StubLM(nn.Module):
    """Transformer's interface for generation: .cfg.max_seq_len, .vocab_size, forward(ids [1, S]) ->
    logits [1, S, padded vocab]. logits_fn(tokens so far) gives the last position's logits over the
    real vocabulary; padded columns hold `pad_logit`. Every input is recorded."""

    def __init__(self, logits_fn, vocab_size=8, padded_vocab=16, max_seq_len=64, pad_logit=-1e4):
        super().__init__()
        self.cfg = SimpleNamespace(max_seq_len=max_seq_len)
        self.vocab_size, self.padded_vocab = vocab_size, padded_vocab
        self.logits_fn, self.pad_logit = logits_fn, pad_logit
        self.seen, self.modes = [], []

    def forward(self, ids):
        self.seen.append(ids[0].tolist())
        self.modes.append(self.training)
        out = torch.full((1, ids.shape[1], self.padded_vocab), self.pad_logit)
        out[0, -1, :self.vocab_size] = torch.as_tensor(self.logits_fn(ids[0].tolist()), dtype=torch.float32)
        out[0, :-1] = 7.0  # earlier positions must not be read: this would make token 0.. argmax garbage
        return out


def _fixed(logits):
    return lambda toks: logits


def _counts(model, n, seed, **kw):
    out = generate_ids(model, [0], n, seed=seed, **kw)[1:]
    assert len(out) == n
    return Counter(out)


# a context-dependent, tie-free score table: the best next token after t is (t + 3) % 8
def _cycle(toks):
    t = toks[-1]
    return [10.0 - ((j - t - 3) % 8) * 1.3 for j in range(8)]


def test_greedy_follows_argmax():
    # temperature 0 and below are greedy: 1 -> 4 -> 7 -> 2 -> 5 -> 0 (by hand: +3 mod 8)
    for t in (0.0, -1.0):
        assert generate_ids(StubLM(_cycle), [1], 5, temperature=t, top_k=None) == [1, 4, 7, 2, 5, 0]


@pytest.mark.parametrize("seed", range(5))
def test_top_k_1_is_greedy(seed):
    greedy = generate_ids(StubLM(_cycle), [1], 20, temperature=0)
    for temperature in (1.0, 5.0):
        assert generate_ids(StubLM(_cycle), [1], 20, temperature=temperature, top_k=1, seed=seed) == greedy


def test_top_k_never_samples_outside_the_k_largest():
    logits = [0.3, 2.0, -1.0, 1.5, 0.9, 1.8, -0.2, 0.0]  # descending: 1, 5, 3, 4, 0, 7, 6, 2
    order = sorted(range(8), key=lambda j: -logits[j])
    for k in (2, 3, 5):
        seen = Counter()
        for seed in range(20):
            seen += _counts(StubLM(_fixed(logits)), 100, seed, temperature=3.0, top_k=k)  # flat: all k reached
        assert set(seen) == set(order[:k]), (k, seen)


def test_top_k_with_ties_keeps_exactly_k():
    # the 3rd-largest value is shared by four tokens: top-3 is tokens 0, 1 and ONE of the tied ones
    logits = [5.0, 4.0, 3.0, 3.0, 3.0, 3.0, 0.0, -1.0]
    seen = Counter()
    for seed in range(20):
        seen += _counts(StubLM(_fixed(logits)), 100, seed, temperature=2.0, top_k=3)
    assert len(seen) == 3 and {0, 1} <= set(seen) and set(seen) - {0, 1} <= {2, 3, 4, 5}, seen


def test_tiny_temperature_is_argmax():
    # 1e-38 makes logits / T overflow float32 unless the max is subtracted first: never NaN, always argmax
    logits = [3.0, 9.5, 9.0, -2.0, 0.0, 1.0, 2.0, 4.0]
    for t in (1e-6, 1e-38):
        for seed in range(3):
            assert _counts(StubLM(_fixed(logits)), 30, seed, temperature=t, top_k=None) == Counter({1: 30})


def test_temperature_matches_softmax_and_flattens():
    logits = [2.0, 1.0, 0.0, -1.0, -1e4, -1e4, -1e4, -1e4]  # 4 live tokens
    n = 5000
    freqs = {}
    for t in (0.5, 1.0, 2.0):
        c = _counts(StubLM(_fixed(logits), max_seq_len=2), n, seed=123, temperature=t, top_k=None)
        z = [math.exp(x / t) for x in logits[:4]]
        p = [v / sum(z) for v in z]  # softmax(logits / T), by hand
        f = [c[j] / n for j in range(4)]
        # each frequency within 5 standard deviations of its probability (binomial: sqrt(p(1-p)/n))
        for pj, fj in zip(p, f):
            assert abs(fj - pj) < 5 * math.sqrt(pj * (1 - pj) / n), (t, p, f)
        assert sum(c.values()) == n and set(c) <= {0, 1, 2, 3}
        freqs[t] = f
    # higher temperature: less mass on the best token, more entropy (softmax at T=0.5/1/2: 0.84/0.64/0.43)
    ent = {t: -sum(x * math.log(x) for x in f if x > 0) for t, f in freqs.items()}
    assert freqs[0.5][0] > freqs[1.0][0] + 0.1 > freqs[2.0][0] + 0.2
    assert ent[0.5] < ent[1.0] < ent[2.0]


def test_stops_at_stop_id_without_appending_it():
    eod = 7

    def fn(toks):  # emit 4, 5, 6, then EOD is the best token
        nxt = {1: 4, 4: 5, 5: 6}.get(toks[-1], eod)
        return [5.0 if j == nxt else 0.0 for j in range(8)]

    for kw in (dict(temperature=0), dict(temperature=1.0, top_k=1, seed=3)):
        m = StubLM(fn)
        assert generate_ids(m, [1], 50, stop_id=eod, **kw) == [1, 4, 5, 6]
        assert len(m.seen) == 4  # stopped right after sampling EOD
    # without a stop id the EOD is an ordinary token and generation runs to max_new_tokens
    assert generate_ids(StubLM(fn), [1], 6, temperature=0) == [1, 4, 5, 6, eod, eod, eod]


def test_generate_text_stops_at_the_tokenizers_eod():
    from engine.data import build_tokenizer

    tok = build_tokenizer("byte")  # ids 0..255 are bytes, EOD = 256, vocab 257
    text = list(b"hi!")

    def fn(toks):
        n_new = len(toks) - 4  # prompt "The " is 4 bytes
        nxt = text[n_new] if n_new < len(text) else tok.eod_id
        return [5.0 if j == nxt else 0.0 for j in range(257)]

    m = StubLM(fn, vocab_size=257, padded_vocab=384)
    assert generate_text(m, tok, "The ", max_new_tokens=100, temperature=0) == "The hi!"
    assert len(m.seen) == 4


def test_model_sees_only_the_last_max_seq_len_tokens():
    m = StubLM(_cycle, max_seq_len=5)
    prompt = [0, 1, 2, 3, 4, 5, 6, 7]
    out = generate_ids(m, prompt, 6, temperature=1.0, top_k=3, seed=0)
    assert len(out) == 14 and out[:8] == prompt
    assert len(m.seen) == 6
    for i, ctx in enumerate(m.seen):
        assert ctx == out[:8 + i][-5:]  # the 5 most recent tokens, oldest first
    # a short prompt is passed whole until it reaches the window
    m = StubLM(_cycle, max_seq_len=5)
    out = generate_ids(m, [2, 3], 6, temperature=0)
    assert [len(c) for c in m.seen] == [2, 3, 4, 5, 5, 5] and m.seen[-1] == out[-6:-1]


@pytest.mark.parametrize("kw", [dict(temperature=0), dict(temperature=1.0, top_k=3), dict(temperature=1.0, top_k=None),
                                dict(temperature=100.0, top_k=None)])
def test_padded_vocab_is_never_sampled(kw):
    # the padded columns 8..15 hold the largest logits of all; only ids < vocab_size may come out
    for seed in range(10):
        m = StubLM(_fixed([0.0, 1.0, 0.5, -0.5, 0.2, 0.1, -1.0, 0.3]), pad_logit=100.0)
        out = generate_ids(m, [0], 40, seed=seed, **kw)
        assert max(out) < 8, out


def test_seeds():
    flat = _fixed([0.0] * 8)
    a, b, c = (generate_ids(StubLM(flat), [0], 40, temperature=1.0, top_k=None, seed=s) for s in (1, 1, 2))
    assert a == b and a != c
    # no seed: a fresh random stream each call (a new torch.Generator alone always starts from one fixed seed)
    runs = {tuple(generate_ids(StubLM(flat), [0], 40, temperature=1.0, top_k=None)) for _ in range(3)}
    assert len(runs) == 3  # 8^40 equally likely sequences: a repeat means the seed did not change


def test_eval_mode_during_generation_and_restored():
    m = StubLM(_cycle)
    m.train()
    generate_ids(m, [1], 3, temperature=0)
    assert m.modes == [False] * 3 and m.training


def test_bad_arguments():
    with pytest.raises(ValueError, match="at least one prompt token"):
        generate_ids(StubLM(_cycle), [], 3)
    with pytest.raises(ValueError, match="top_k"):
        generate_ids(StubLM(_cycle), [1], 3, top_k=-1)


def test_real_transformer_has_the_stub_interface():
    from engine.config import config_from_dict
    from engine.model.transformer import Transformer

    cfg = config_from_dict({"model": {"preset": "tiny", "d_model": 32, "n_layers": 1, "n_heads": 2,
                                      "n_kv_heads": 1, "ffn_hidden": 64, "max_seq_len": 8, "vocab_size": 10}})
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    assert model.padded_vocab == 128 and model.vocab_size == 10 and model.cfg.max_seq_len == 8
    out = generate_ids(model, [1, 2, 3], 12, temperature=1.0, top_k=None, seed=0)  # runs past max_seq_len
    assert len(out) == 15 and max(out) < 10


def test_cli_rejects_negative_top_k(tmp_path, capsys):
    from engine.cli import main

    # checked before the run directory is read: one clear message, exit code 2
    assert main(["generate", str(tmp_path / "run"), "--top-k", "-1"]) == 2
    assert "--top-k: expected a number >= 0" in capsys.readouterr().err
