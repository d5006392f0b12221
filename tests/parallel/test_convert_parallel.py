"""Hugging Face weights through a parallel run (gloo, CPU): a Llama-3 style model (llama3 rope scaling, tied
embeddings, GQA) starts from `checkpoint.init_from: hf:DIR` at tp2 x pp2 (the tied head crosses the
pipeline), trains 3 steps and saves; the same run in one process gives the same losses (within the
layout-equivalence bound), and the checkpoint exported with `convert to-hf` computes in transformers what
our model computes (fp32: max |diff| < 1e-4, KL < 1e-9)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.dist_utils import run_distributed

transformers = pytest.importorskip("transformers")

RTOL = 1e-5


def _tree(tmp: Path, name: str, hf_dir: Path, **parallel) -> dict:
    return {
        "model": {"vocab_pad_multiple": 8},
        "data": {"tokenizer": "byte", "train": [{"path": "builtin:pydoc"}], "split": "90,10,0", "seq_len": 32,
                 "cache_dir": str(tmp / "cache")},
        "parallel": {"zero": 1, **parallel},
        "train": {"micro_batch_size": 2, "global_batch_size": 4, "iters": 3, "eval_interval": 0, "log_interval": 1,
                  "out_dir": str(tmp / f"run-{name}"), "device": "cpu", "tensorboard": False, "progress": False},
        "optim": {"lr": 3e-3, "warmup_iters": 1},
        "precision": {"dtype": "fp32"},
        "checkpoint": {"dir": str(tmp / f"ck-{name}"), "interval": 3, "init_from": f"hf:{hf_dir}"},
    }


def _train(rank: int, world_size: int, *trees: dict):
    """Every tree in turn on the same process group; the losses of each."""
    import torch.distributed as dist

    from engine.config import config_from_dict
    from engine.parallel.state import ParallelState
    from engine.train.loop import train

    out = []
    for tree in trees:
        cfg = config_from_dict(tree, world_size=world_size)
        p = cfg.parallel
        pstate = ParallelState.initialize(tp=p.tp, pp=p.pp, device="cpu")
        out.append(train(cfg, pstate).losses)
        if dist.is_initialized():
            dist.barrier()
    return out[0] if len(out) == 1 else out


def test_hf_weights_train_at_tp2_pp2_and_export_to_what_transformers_computes(tmp_path):
    from engine.convert.to_hf import convert_to_hf
    from engine.convert.verify import verify

    torch.manual_seed(3)
    cfg = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=300, rope_theta=5e5, max_position_embeddings=64, tie_word_embeddings=True,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 16})
    hf_dir = tmp_path / "hf"
    transformers.LlamaForCausalLM(cfg).save_pretrained(hf_dir)

    # the same group also grows the vocabulary at tp2 x pp2 (new rows from the seed: the same in every layout)
    grown = _grown_tokenizer(tmp_path, hf_dir)
    grow = _tree(tmp_path, "grown", grown["model"], tp=2, pp=2)
    grow["data"]["tokenizer"] = grown["spec"]
    grow["train"]["iters"] = 0
    grow["checkpoint"]["new_token_init"] = "mean_cov"
    per_rank = run_distributed(_train, 4, _tree(tmp_path, "tp2pp2", hf_dir, tp=2, pp=2), grow, timeout=300)
    parallel = [r[0] for r in per_rank]
    single = _train(0, 1, _tree(tmp_path, "single", hf_dir))
    losses = parallel[-1] or parallel[0]  # the last pipeline stage computes the loss
    assert len(losses) == 3 and all(math.isclose(a, b, rel_tol=RTOL) for a, b in zip(losses, single)), \
        (losses, single)
    assert losses[0] != losses[-1]

    ck = tmp_path / "ck-tp2pp2"
    meta = json.loads((ck / "step-0000003" / "tessera.json").read_text())
    assert (meta["layout"]["tp"], meta["layout"]["pp"]) == (2, 2)
    out = convert_to_hf(ck, tmp_path / "exported", dtype="fp32", log=lambda s: None).out
    v = verify(ck, out)
    assert v.ok, v.line()
    assert not verify(ck, hf_dir).ok  # the exported model is the trained one, not the start

    # init_from our tp2 x pp2 checkpoint in one process: the weights are its weights, bit for bit
    from engine.checkpoint.export import ModelCheckpoint

    again = _tree(tmp_path, "again", hf_dir)
    again["checkpoint"]["init_from"] = str(ck)
    again["train"]["iters"] = 0
    _train(0, 1, again)
    a, b = ModelCheckpoint.open(ck), ModelCheckpoint.open(tmp_path / "ck-again")
    assert all(torch.equal(a.read([n])[n], b.read([n])[n]) for n in a.names)

    # the vocabulary grown at tp2 x pp2 equals the one grown in one process
    one = _tree(tmp_path, "grown1", grown["model"])
    one["data"]["tokenizer"] = grown["spec"]
    one["train"]["iters"] = 0
    one["checkpoint"]["new_token_init"] = "mean_cov"
    _train(0, 1, one)
    g2, g1 = ModelCheckpoint.open(tmp_path / "ck-grown"), ModelCheckpoint.open(tmp_path / "ck-grown1")
    emb2, emb1 = g2.read(["embed.weight"])["embed.weight"], g1.read(["embed.weight"])["embed.weight"]
    assert emb2.shape[0] == grown["old_vocab"] + 2 and torch.equal(emb2, emb1)


def _grown_tokenizer(tmp_path: Path, hf_dir: Path) -> dict:
    """A copy of the model with a word-level tokenizer of its vocabulary size, grown by two tokens."""
    import shutil

    from tokenizers import Tokenizer, models, pre_tokenizers

    from engine.data.tokenizer_extend import extend_tokenizer

    d = tmp_path / "hf-tok"
    shutil.copytree(hf_dir, d)
    vocab = {f"w{i}": i for i in range(300)}
    vocab["</s>"] = vocab.pop("w1")
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    spec, _ = extend_tokenizer(f"hf:{d}", ["alpha", "beta"], tmp_path / "tok-grown")
    return {"model": d, "spec": spec, "old_vocab": 300}
