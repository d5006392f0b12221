"""Shared pytest setup: CPU-only defaults and small helpers for building test configs."""

from __future__ import annotations

import os

# Triton kernels run under the interpreter on CPU; this must be set before triton is imported.
try:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # pragma: no cover
    pass

import pytest


def pytest_collection_modifyitems(config, items):
    """`slow` tests run only when selected (`pytest -m slow`) or with TESSERA_SLOW=1: the default suite must
    stay within CI's budget on 2 cores."""
    if "slow" in (config.option.markexpr or "") or os.environ.get("TESSERA_SLOW", "") not in ("", "0"):
        return
    skip = pytest.mark.skip(reason="slow: select with -m slow (or TESSERA_SLOW=1)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def tiny_config(tmp_path, **sections):
    """A very small, fast config (byte tokenizer, builtin corpus) with per-section overrides."""
    from engine.config import config_from_dict

    tree = {
        "model": {"preset": "tiny", "d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
                  "ffn_hidden": 64, "max_seq_len": 32},
        "data": {"tokenizer": "byte", "train": [{"path": "builtin:pydoc"}], "split": "90,10,0"},
        "train": {"micro_batch_size": 2, "global_batch_size": 4, "iters": 4, "eval_interval": 0,
                  "log_interval": 2, "out_dir": str(tmp_path / "run"), "device": "cpu", "tensorboard": False,
                  "progress": False},
        "optim": {"lr": 1e-3, "warmup_iters": 1},
        "precision": {"dtype": "fp32"},
    }
    for name, values in sections.items():
        tree.setdefault(name, {}).update(values)
    return config_from_dict(tree)


@pytest.fixture
def make_tiny_config(tmp_path):
    return lambda **sections: tiny_config(tmp_path, **sections)
