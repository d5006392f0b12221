"""Mixed precision: bf16/fp16 autocast, dynamic loss scaling; FP8 matmuls in their own modules.

FP8 (docs/fp8.md): fp8_rules.py (CUDA's _scaled_mm rules, the one call site), fp8_recipes.py (casts and
delayed scaling), fp8.py (the FP8 linear), fp8_swap.py (which layers, the start-up report, `Fp8Manager`).
They are imported from there, not re-exported here, so `engine.precision` stays importable without them.
"""

from engine.precision.mixed import DTYPES, DynamicLossScaler, autocast, unscale_and_check

__all__ = ["DTYPES", "DynamicLossScaler", "autocast", "unscale_and_check"]
