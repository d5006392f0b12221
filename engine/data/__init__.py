"""Data pipeline: tokenizers, preprocessing into Megatron .bin/.idx, indexed datasets, samplers.

The training loop needs only the four names below. They are imported lazily so that tools that only read or
write data (`tessera preprocess`, its worker processes, the index builders) never pay for importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["build_tokenizer", "Tokenizer", "build_datasets", "PretrainingSampler"]

_WHERE = {"build_tokenizer": "engine.data.tokenizers", "Tokenizer": "engine.data.tokenizers",
          "build_datasets": "engine.data.build", "PretrainingSampler": "engine.data.sampler"}

if TYPE_CHECKING:
    from engine.data.build import build_datasets
    from engine.data.sampler import PretrainingSampler
    from engine.data.tokenizers import Tokenizer, build_tokenizer


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        value = getattr(importlib.import_module(_WHERE[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'engine.data' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
