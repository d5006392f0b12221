"""Tessera: a Megatron-style engine for training large Transformers."""

__version__ = "0.1.0"
