"""Continued pretraining in one process: what `checkpoint.init_from` takes (the reset switches and
start_iteration), the step-0 evaluation and val_delta, and growing the vocabulary.

The switches are checked against the run they imitate: init_from with every switch off is a resume
without the RNG and loss-scaler state, so with no dropout (fp32) its losses are the resume's, bit for bit.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from engine.errors import CheckpointError, ConfigError, TokenizerProblem
from engine.optim.schedule import lr_at
from tests.conftest import tiny_config


def _pretrain(tmp_path: Path, iters: int = 4, **train) -> Path:
    from engine.train.loop import train as run

    run(tiny_config(tmp_path / "pre", train={"iters": iters, **train}, checkpoint={"dir": str(tmp_path / "ck")}))
    return tmp_path / "ck"


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    return _pretrain(tmp_path_factory.mktemp("continued"))


def test_init_from_with_every_switch_off_continues_like_a_resume(pretrained, tmp_path):
    from engine.train.loop import train

    ck = {"reset_optimizer": False, "reset_schedule": False, "reset_data": False}
    cont = train(tiny_config(tmp_path / "a", train={"iters": 7}, checkpoint={"init_from": str(pretrained), **ck}))
    resumed = train(tiny_config(tmp_path / "b", train={"iters": 7},
                                checkpoint={"dir": str(tmp_path / "ck-b"), "load": str(pretrained)}))
    assert len(cont.losses) == 3 and cont.losses == resumed.losses


def test_reset_schedule_and_start_iteration_place_the_schedule(pretrained, tmp_path):
    from engine.train.loop import train

    cfg = tiny_config(tmp_path / "a", train={"iters": 6, "log_interval": 1},
                      optim={"lr": 2e-3, "warmup_iters": 3, "decay": "linear"},
                      checkpoint={"init_from": str(pretrained), "start_iteration": 2})
    r = train(cfg)
    assert len(r.losses) == 4  # steps 2..5
    lrs = [m["lr"] for m in _metrics(tmp_path / "a" / "run") if "lr" in m]
    assert lrs == pytest.approx([lr_at(k, cfg.optim, 6) for k in range(2, 6)], rel=1e-12)


def test_reset_data_false_continues_the_data_position(pretrained, tmp_path):
    from engine.train.loop import train

    cfg = tiny_config(tmp_path / "a", train={"iters": 2},
                      checkpoint={"init_from": str(pretrained), "reset_data": False, "dir": str(tmp_path / "ck2")})
    train(cfg)
    saved = json.loads((tmp_path / "ck2" / "step-0000002" / "tessera.json").read_text())
    # the pretrain consumed 4 steps x 4 samples; this run 2 more steps, from step 0 of its own schedule
    assert saved["consumed_samples"] == 24 and saved["iteration"] == 2
    assert saved["lineage"][-1] == {"kind": "init_from", "path": str(pretrained / "step-0000004"), "iteration": 4,
                                    "reset_data": False, "start_consumed_samples": 16}
    from engine.checkpoint.inspect import describe, render_text

    text = render_text(describe(tmp_path / "ck2"))
    assert f"weights from {pretrained / 'step-0000004'} (step 4; also its data position; starting at consumed " \
           f"samples 16)" in text


def test_inconsistent_switches_are_clear_errors(pretrained, tmp_path):
    with pytest.raises(ConfigError, match="not set"):
        tiny_config(tmp_path, checkpoint={"reset_optimizer": False})
    with pytest.raises(ConfigError, match="start_iteration=2 with reset_schedule=false"):
        tiny_config(tmp_path, checkpoint={"init_from": str(pretrained), "reset_schedule": False,
                                          "start_iteration": 2})
    with pytest.raises(ConfigError, match="holds no optimizer state"):
        tiny_config(tmp_path, checkpoint={"init_from": "hf:/somewhere", "reset_optimizer": False})
    from engine.train.loop import train

    with pytest.raises(ConfigError, match="nothing to train"):
        train(tiny_config(tmp_path / "x", train={"iters": 4},
                          checkpoint={"init_from": str(pretrained), "reset_schedule": False}))
    other = tiny_config(tmp_path / "y", data={"train": [{"path": "builtin:pydoc", "name": "docs"}]},
                        checkpoint={"init_from": str(pretrained), "reset_data": False})
    with pytest.raises(CheckpointError, match=r"the same datasets \(by name\)"):
        train(other)


def test_step0_evaluation_and_val_delta(pretrained, tmp_path):
    """The first evaluation of a continued run is before any update: it equals the source run's last one
    (same weights, same validation batches), and val_delta is measured from it."""
    from engine.train.loop import train

    evals = {"eval_interval": 2, "eval_iters": 2}
    src = train(tiny_config(tmp_path / "src", train={"iters": 4, **evals},
                            checkpoint={"dir": str(tmp_path / "ck-src")}))
    cont = train(tiny_config(tmp_path / "c", train={"iters": 4, **evals},
                             checkpoint={"init_from": str(tmp_path / "ck-src")}))
    assert sorted(cont.val_losses) == [0, 2, 4]
    assert cont.val_losses[0] == src.val_losses[4]
    vals = [m for m in _metrics(tmp_path / "c" / "run") if "val_loss" in m]
    assert vals[0]["step"] == 0 and vals[0]["val_delta/pydoc"] == 0.0
    for m in vals[1:]:
        assert m["val_delta/pydoc"] == pytest.approx(m["val_loss/pydoc"] - vals[0]["val_loss/pydoc"], abs=1e-12)
    assert not any("val_delta/pydoc" in m for m in _metrics(tmp_path / "src" / "run"))  # scratch: no baseline


def test_val_delta_baseline_survives_a_resume(pretrained, tmp_path):
    from engine.errors import RunStopped
    from engine.train.loop import train

    evals = {"eval_interval": 2, "eval_iters": 2}
    ck = {"init_from": str(pretrained), "dir": str(tmp_path / "ck-c"), "interval": 2}
    full = train(tiny_config(tmp_path / "full", train={"iters": 4, **evals}, checkpoint=dict(ck, dir=str(tmp_path / "f"))))
    with pytest.raises(RunStopped):
        train(tiny_config(tmp_path / "part", train={"iters": 4, **evals}, checkpoint={**ck, "time_limit": 1e-9}))
    train(tiny_config(tmp_path / "part", train={"iters": 4, **evals}, checkpoint={**ck, "load": "auto"}))
    deltas = {m["step"]: m["val_delta/pydoc"] for m in _metrics(tmp_path / "part" / "run") if "val_delta/pydoc" in m}
    assert 4 in deltas and deltas[4] == pytest.approx(full.val_losses[4]["pydoc"] - full.val_losses[0]["pydoc"])


# ----------------------------------------------------------------------------- vocabulary extension

def _hf_with_tokenizer(root: Path, words: list[str]) -> Path:
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    d = root / "hf"
    torch.manual_seed(0)
    vocab = {w: i for i, w in enumerate(["<unk>", "</s>"] + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=len(vocab), max_position_embeddings=32,
                                   tie_word_embeddings=False)
    transformers.LlamaForCausalLM(cfg).save_pretrained(d)
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    return d


def _words() -> list[str]:
    import keyword

    return sorted(set(keyword.kwlist) | {"the", "a", "of", "to", "is", "in", "and", "for", "with", "as"})


def test_grown_vocabulary_keeps_old_rows_and_trains_new_ones(tmp_path):
    from engine.data.tokenizer_extend import extend_tokenizer
    from engine.train.loop import train
    from engine.train.vocab_extension import new_rows

    hf = _hf_with_tokenizer(tmp_path, _words())
    spec, added = extend_tokenizer(f"hf:{hf}", ["statement", "function", "module"], tmp_path / "grown")
    assert added == ["statement", "function", "module"]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(("the for statement is a statement of the module and the function\n\n" * 200))
    tree = {"data": {"tokenizer": spec, "train": [{"path": str(corpus)}], "split": "90,10,0", "seq_len": 16},
            "train": {"iters": 3, "micro_batch_size": 2, "global_batch_size": 4, "eval_interval": 0,
                      "out_dir": str(tmp_path / "run"), "device": "cpu", "tensorboard": False, "progress": False},
            "model": {"vocab_pad_multiple": 8},
            "optim": {"lr": 1e-2, "warmup_iters": 1, "weight_decay": 0.0},
            "checkpoint": {"init_from": f"hf:{hf}", "new_token_init": "mean_cov", "dir": str(tmp_path / "ck")}}
    from engine.config import config_from_dict
    from engine.convert.from_hf import HFSource

    src = HFSource.open(hf)
    old_v = src.fields["vocab_size"]
    with pytest.raises(TokenizerProblem, match="set checkpoint.new_token_init"):  # without the switch: refused
        train(config_from_dict({**tree, "checkpoint": {"init_from": f"hf:{hf}"}}))
    cfg = config_from_dict(json.loads(json.dumps(tree)))
    cfg.train.iters = 0  # the start, before any update
    cfg.checkpoint.dir = str(tmp_path / "ck0")
    train(cfg)

    def saved(root: Path, name: str) -> torch.Tensor:
        from engine.checkpoint.export import ModelCheckpoint

        return ModelCheckpoint.open(root).read([name])[name]

    for name in ("embed.weight", "head.weight"):
        start = saved(tmp_path / "ck0", name)
        assert start.shape[0] == old_v + 3
        assert torch.equal(start[:old_v], src.canonical(name))  # old rows bit for bit
        want = new_rows(src.canonical(name), 3, "mean_cov", cfg.train.seed + ("embed.weight", "head.weight").index(name))
        assert torch.equal(start[old_v:], want.float())
    trained = train(config_from_dict(tree))
    assert all(math.isfinite(x) for x in trained.losses)
    new_after = saved(tmp_path / "ck", "embed.weight")[old_v:]
    assert not torch.equal(new_after, saved(tmp_path / "ck0", "embed.weight")[old_v:])  # the new rows train


def test_new_rows_follow_the_old_rows_statistics():
    from engine.train.vocab_extension import extend_rows, new_rows

    g = torch.Generator().manual_seed(0)
    old = torch.randn(4000, 6, generator=g) @ torch.tensor([[2.0, 0, 0, 0, 0, 0], [1.0, 1.0, 0, 0, 0, 0],
                                                            *[[0.0] * i + [0.5] + [0.0] * (5 - i) for i in range(2, 6)]]) + 3.0
    rows = new_rows(old, 20000, "mean_cov", seed=1)
    assert torch.allclose(rows.mean(0), old.double().mean(0), atol=0.05)
    assert torch.allclose(torch.cov(rows.T), torch.cov(old.double().T), atol=0.1)
    assert not new_rows(old, 3, "zeros", 1).any()
    grown = extend_rows(old, 4003, "zeros", 0)
    assert torch.equal(grown[:4000], old) and grown.dtype == old.dtype
    assert torch.equal(new_rows(old, 5, "mean_cov", 7), new_rows(old, 5, "mean_cov", 7))


def test_tokenizer_extend_keeps_ids_and_refuses_what_cannot_grow(tmp_path):
    from engine.data.tokenizer_extend import extend_tokenizer, vocabulary_prefix_matches
    from engine.data.tokenizers import build_tokenizer
    from engine.data.tokenizer_train import train_tokenizer

    hf = _hf_with_tokenizer(tmp_path, _words())
    spec, added = extend_tokenizer(f"hf:{hf}", ["the", "brand_new"], tmp_path / "grown")
    assert added == ["brand_new"]  # "the" was there already
    old, new = build_tokenizer(f"hf:{hf}"), build_tokenizer(spec)
    assert new.vocab_size == old.vocab_size + 1 and vocabulary_prefix_matches(old, new)
    assert new.encode("the brand_new") == [old.encode("the")[0], old.vocab_size]
    shuffled = tmp_path / "shuffled"
    shutil.copytree(hf, shuffled)
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = list(reversed(_words()))
    t = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<unk>", "</s>"] + words)}, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.save(str(shuffled / "tokenizer.json"))
    assert not vocabulary_prefix_matches(old, build_tokenizer(f"hf:{shuffled}"))

    text = tmp_path / "t.txt"
    text.write_text("\n".join(f"line {i} of the text with words {' '.join(_words()[i % 20:])}" for i in range(300)))
    train_tokenizer([str(text)], str(tmp_path / "sp"), vocab_size=360)
    sp_spec, sp_added = extend_tokenizer(f"sentencepiece:{tmp_path / 'sp.model'}", ["<domain>"], tmp_path / "sp2")
    sp_old, sp_new = build_tokenizer(f"sentencepiece:{tmp_path / 'sp.model'}"), build_tokenizer(sp_spec)
    assert sp_added == ["<domain>"] and sp_new.vocab_size == sp_old.vocab_size + 1
    assert vocabulary_prefix_matches(sp_old, sp_new) and sp_new.encode("<domain>")[-1] == sp_old.vocab_size
    with pytest.raises(TokenizerProblem, match="fixed vocabulary"):
        extend_tokenizer("byte", ["x"], tmp_path / "b")


def test_a_tokenizer_that_does_not_extend_the_old_one_is_refused(tmp_path):
    from engine.config import config_from_dict
    from engine.train.loop import train

    hf = _hf_with_tokenizer(tmp_path, _words())
    other = tmp_path / "other"
    other.mkdir()
    from tokenizers import Tokenizer, models, pre_tokenizers

    t = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<unk>", "</s>"] + list(reversed(_words())) + ["x"])},
                                   unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.save(str(other / "tokenizer.json"))
    (other / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    tree = {"data": {"tokenizer": f"hf:{other}", "seq_len": 16},
            "train": {"iters": 1, "out_dir": str(tmp_path / "run"), "device": "cpu"},
            "checkpoint": {"init_from": f"hf:{hf}", "new_token_init": "zeros"}}
    with pytest.raises(TokenizerProblem, match="does not keep the ids"):
        train(config_from_dict(tree))
    assert not (tmp_path / "run").exists()


def test_a_validation_set_may_be_named_like_a_training_set(tmp_path):
    """The old domain is both a training set (replay) and a validation set: one name, val_loss/<name>."""
    from engine.parallel.state import ParallelState
    from engine.train.trainer import Trainer

    held_out = tmp_path / "held_out.txt"
    held_out.write_text("\n\n".join(f"A held-out paragraph number {i} about the for statement." for i in range(60)))
    cfg = tiny_config(tmp_path, data={"train": [{"name": "docs", "path": "builtin:pydoc"}],
                                      "valid": [{"name": "docs", "path": str(held_out)}]},
                      train={"eval_interval": 2, "eval_iters": 1})
    t = Trainer(cfg, ParallelState.single("cpu"))
    assert list(t.valid_sets) == ["docs"] and list(t.train_set.samples_in(0, 4)) == ["docs"]
    assert list(t.evaluate()) == ["docs"]
