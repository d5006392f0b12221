"""Weight decay applies to matrices and embeddings only, never to norm weights or biases.

Checked two ways, both independent of `engine.optim.param_groups`' own rule (parameter rank):
- by name on the real model (GPT-2 style has every kind: LayerNorm weight+bias, linear biases, learned
  positions, tied embedding; Llama style has RMSNorm and QKV biases);
- by behaviour: one AdamW step with all-zero gradients moves a parameter only through decoupled weight
  decay, p <- p * (1 - lr * wd), so decayed parameters shrink by exactly that factor and the others stay
  bit-identical. Run for the plain torch optimizer of hand-written loops (`build_adamw`) and for the
  engine's one optimizer (`wrap_data_parallel`, ZeRO 0 and 1), which the training loop uses in every layout.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from engine.config import config_from_dict
from engine.model import build_model
from engine.optim import build_adamw, param_groups
from engine.parallel.state import ParallelState
from engine.train.build import wrap_data_parallel

LR, WD = 0.1, 0.5  # factor 0.95: far from 1 so that a missed or extra decay shows


def _model(style: str):
    base = {"vocab_size": 50, "d_model": 16, "n_layers": 2, "n_heads": 4, "max_seq_len": 8}
    if style == "gpt2":
        cfg = {"preset": "gpt2", **base}
    else:
        cfg = {"preset": "qwen2", "n_kv_heads": 2, "ffn_hidden": 32, **base}  # RMSNorm + QKV biases
    return build_model(config_from_dict({"model": cfg}).model, seed=3)


def _should_decay(name: str) -> bool:
    """The rule, by name: biases and the weights of norm layers are not decayed; everything else is."""
    if name.endswith(".bias"):
        return False
    module = name.rsplit(".", 2)[-2] if "." in name else ""
    return not module.endswith("norm")


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_param_groups_by_name(style):
    model = _model(style)
    groups = param_groups(model.named_parameters(), WD)
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    plain = {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    names = dict(model.named_parameters())
    assert any(n.endswith(".bias") for n in names) and any(n.endswith("norm.weight") for n in names)
    for name, p in names.items():
        want = _should_decay(name)
        assert (id(p) in decayed) == want and (id(p) in plain) == (not want), name
    # every parameter in exactly one group, the tied embedding once
    assert len(decayed) + len(plain) == len({id(p) for p in model.parameters()})
    assert sum(len(g["params"]) for g in groups) == len(decayed) + len(plain)


def _zero_grad_step(model, optimizer, ddp=None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer.zero_grad()
    if ddp is None:
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
    else:
        ddp.finish_grad_sync()  # zeroed main grads, reduced as zeros
    optimizer.step()
    return {n: (before[n], p.detach()) for n, p in model.named_parameters()}


def _check_decay(moved: dict) -> None:
    for name, (before, after) in moved.items():
        if _should_decay(name):
            torch.testing.assert_close(after, before * (1 - LR * WD), rtol=1e-6, atol=0, msg=name)
            assert not torch.equal(after, before), name
        else:
            assert torch.equal(after, before), f"{name} was decayed"


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_single_process_adamw_decays_only_matrices(style):
    model = _model(style)
    cfg = SimpleNamespace(lr=LR, betas=(0.9, 0.95), eps=1e-8, weight_decay=WD)
    _check_decay(_zero_grad_step(model, build_adamw(model.named_parameters(), cfg, torch.device("cpu"))))


@pytest.mark.parametrize("zero", [0, 1])
def test_data_parallel_optimizer_decays_only_matrices(zero):
    model = _model("gpt2")
    cfg = SimpleNamespace(parallel=SimpleNamespace(zero=zero),
                          optim=SimpleNamespace(lr=LR, betas=[0.9, 0.95], eps=1e-8, weight_decay=WD))
    ddp, opt = wrap_data_parallel([model], model.shard_specs(), cfg, ParallelState.single())
    _check_decay(_zero_grad_step(model, opt, ddp))
