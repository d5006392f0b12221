"""Mixed precision: bf16/fp16 autocast, dynamic loss scaling (no fp8 yet)."""

from engine.precision.mixed import DTYPES, DynamicLossScaler, autocast, unscale_and_check

__all__ = ["DTYPES", "DynamicLossScaler", "autocast", "unscale_and_check"]
