"""The Trainer resumes exactly: 2 steps, state_dict, a fresh Trainer loads it, 2 more steps == 4 steps straight.

Bit-for-bit (losses and every parameter), with dropout on (the torch RNG must come back) and in fp16 (the
loss scaler must come back), in one process; the multi-process resume is in tests/parallel/test_state_contract.py.
The global RNGs are scrambled between save and load, so a resume that forgot them cannot pass by luck.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from engine.parallel.state import ParallelState
from engine.train.trainer import Trainer


@pytest.mark.parametrize("variant", ["dropout", "fp16"])
def test_resume_continues_bit_for_bit(make_tiny_config, tmp_path, variant):
    sections = {"train": {"iters": 4}, "optim": {"lr": 3e-3, "warmup_iters": 1}}
    if variant == "dropout":
        sections["model"] = {"dropout": 0.1}
    else:
        sections["precision"] = {"dtype": "fp16", "initial_loss_scale": 2.0 ** 20, "hysteresis": 1}
    cfg = make_tiny_config(**sections)
    single = ParallelState.single()

    straight = Trainer(cfg, single)
    ref = [straight.train_step() for _ in range(4)]

    first = Trainer(cfg, single)
    for _ in range(2):
        first.train_step()
    sd = first.state_dict()
    assert sd["iteration"] == 2 and sd["consumed_samples"] == 2 * cfg.train.global_batch_size
    assert sum(sd["consumed_per_dataset"].values()) == sd["consumed_samples"]

    torch.manual_seed(12345), np.random.seed(7), random.seed(3)  # what a new process would have
    resumed = Trainer(cfg, single)
    resumed.load_state_dict(sd)
    got = [resumed.train_step() for _ in range(2)]
    assert [r.loss for r in got] == [r.loss for r in ref[2:]]
    assert [repr(r.grad_norm) for r in got] == [repr(r.grad_norm) for r in ref[2:]]  # nan (a skipped step) too
    assert [r.skipped for r in got] == [r.skipped for r in ref[2:]]
    if variant == "fp16":
        assert resumed.scaler.scale == straight.scaler.scale
    for (n, a), b in zip(straight.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), n


def test_load_state_dict_names_what_does_not_match(make_tiny_config):
    cfg = make_tiny_config()
    t = Trainer(cfg, ParallelState.single())
    sd = t.state_dict()
    with pytest.raises(ValueError, match="expected format"):
        t.load_state_dict({**sd, "format": "other"})
    bad = dict(sd["model"])
    bad.pop("norm.weight")
    with pytest.raises(ValueError, match=r"missing \['norm.weight'\]"):
        t.load_state_dict({**sd, "model": bad})
    shapes = dict(sd["model"], **{"norm.weight": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"norm.weight has shape \(3,\), expected"):
        t.load_state_dict({**sd, "model": shapes})
