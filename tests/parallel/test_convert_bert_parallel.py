"""Hugging Face BERT weights through a parallel run (gloo, CPU): a BertForPreTraining starts from
`checkpoint.init_from: hf:DIR` at tp2 x pp2 (the vocabulary-split MLM bias and the tied decoder on the last
stage, token types and the embedding norm on the first), trains 2 steps of mlm+nsp and saves; the same run
in one process gives the same losses (within the layout-equivalence bound), and the checkpoint exported with
`convert to-hf` computes in transformers what our model computes (MLM and NSP logits, fp32: max |diff|
< 1e-4, KL < 1e-9)."""

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
        "model": {"preset": "bert-tiny", "vocab_size": 0, "vocab_pad_multiple": 8},
        "data": {"tokenizer": "byte", "train": [{"path": "builtin:pydoc"}], "split": "90,10,0", "seq_len": 32,
                 "cache_dir": str(tmp / "cache")},
        "parallel": {"zero": 1, **parallel},
        "train": {"objective": "mlm+nsp", "micro_batch_size": 2, "global_batch_size": 4, "iters": 2,
                  "eval_interval": 0, "log_interval": 1, "out_dir": str(tmp / f"run-{name}"), "device": "cpu",
                  "tensorboard": False, "progress": False},
        "optim": {"lr": 3e-3, "warmup_iters": 1},
        "precision": {"dtype": "fp32"},
        "checkpoint": {"dir": str(tmp / f"ck-{name}"), "interval": 2, "init_from": f"hf:{hf_dir}"},
    }


def _train(rank: int, world_size: int, tree: dict) -> list[float]:
    from engine.config import config_from_dict
    from engine.parallel.state import ParallelState
    from engine.train.loop import train

    cfg = config_from_dict(tree, world_size=world_size)
    p = cfg.parallel
    pstate = ParallelState.initialize(tp=p.tp, pp=p.pp, device="cpu") if world_size > 1 else ParallelState.single()
    return train(cfg, pstate).losses


@pytest.mark.slow  # 4 spawned ranks + one process: ~45 s of CPU on the 2-core machine
def test_hf_bert_trains_at_tp2_pp2_and_exports_to_what_transformers_computes(tmp_path):
    from engine.convert.to_hf import convert_to_hf
    from engine.convert.verify import verify

    torch.manual_seed(4)
    cfg = transformers.BertConfig(vocab_size=261, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=40)  # 261: bytes + EOD + 4 special
    hf_dir = tmp_path / "hf"
    model = transformers.BertForPreTraining(cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias") or "LayerNorm" in n:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(hf_dir)

    per_rank = run_distributed(_train, 4, _tree(tmp_path, "tp2pp2", hf_dir, tp=2, pp=2), timeout=300)
    single = _train(0, 1, _tree(tmp_path, "single", hf_dir))
    losses = per_rank[-1] or per_rank[0]  # the last pipeline stage computes the loss
    assert len(losses) == 2 and all(math.isclose(a, b, rel_tol=RTOL) for a, b in zip(losses, single)), \
        (losses, single)

    ck = tmp_path / "ck-tp2pp2"
    meta = json.loads((ck / "step-0000002" / "tessera.json").read_text())
    assert (meta["layout"]["tp"], meta["layout"]["pp"]) == (2, 2)
    out = convert_to_hf(ck, tmp_path / "exported", dtype="fp32", log=lambda s: None).out
    v = verify(ck, out)
    assert v.ok and v.nsp is not None, v.line()
    assert not verify(ck, hf_dir).ok  # the exported model is the trained one, not the start
