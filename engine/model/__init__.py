"""The decoder model, its presets and attention backends."""

from engine.model.transformer import Transformer, build_model, count_parameters, padded_vocab

__all__ = ["Transformer", "build_model", "count_parameters", "padded_vocab"]
