"""Mixed precision: bf16/fp16 autocast, dynamic loss scaling (fp8 arrives with its own issue)."""

from engine.precision.mixed import DTYPES, DynamicLossScaler, autocast, unscale_and_check

__all__ = ["DTYPES", "DynamicLossScaler", "autocast", "unscale_and_check"]
