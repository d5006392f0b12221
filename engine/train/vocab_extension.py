"""Growing the vocabulary of prior weights: a run starting from a checkpoint (or hf:DIR) whose tokenizer was
extended (`tessera tokenizer extend`: every old id kept, new ids after them) gets an embedding and output
head of the new size whose first rows are the checkpoint's, bit for bit, and whose new rows start as
`checkpoint.new_token_init` says:

- mean_cov: drawn from a normal distribution with the mean and covariance of the existing rows (Hewitt,
  2021): new tokens start "like an average token", so the model's outputs barely move at the start;
- zeros: all zero (a new token contributes nothing to the input, and the head gives it logit 0).

The new rows are a function of the old tensor and the seed only (drawn on the CPU in float64, the full
[new, D] block at once), so every layout -- tp shards of the vocabulary, padding, a tied head, ZeRO or
FSDP2 -- starts from the same canonical tensor; each rank then copies its own box of it.
"""

from __future__ import annotations

import torch

__all__ = ["VOCAB_TENSORS", "extend_rows", "new_rows"]

VOCAB_TENSORS = ("embed.weight", "head.weight", "mlm_head.bias")  # canonical tensors with a row per token


def new_rows(old: torch.Tensor, n_new: int, how: str, seed: int) -> torch.Tensor:
    """[n_new, D] rows for new tokens from the old rows [V_old, D] (float64); for a per-token bias [V_old] (the
    encoder's mlm_head.bias) [n_new] entries: zeros, or the old entries' mean."""
    x = old.detach().to("cpu", torch.float64)
    if x.dim() == 1:
        if how not in ("zeros", "mean_cov"):
            raise ValueError(f"new_token_init: expected mean_cov or zeros, found {how!r}")
        return torch.full((n_new,), 0.0 if how == "zeros" else float(x.mean()), dtype=torch.float64)
    if how == "zeros":
        return torch.zeros(n_new, x.shape[1], dtype=torch.float64)
    if how != "mean_cov":
        raise ValueError(f"new_token_init: expected mean_cov or zeros, found {how!r}")
    mean = x.mean(0)
    centred = x - mean
    cov = centred.T @ centred / max(x.shape[0] - 1, 1)  # [D, D]
    # cov is positive semi-definite but may be singular (fewer rows than D, tied rows): a square root from
    # its eigen-decomposition (negative rounding noise clamped) instead of a Cholesky factor
    w, q = torch.linalg.eigh(cov)
    root = q * w.clamp_min(0).sqrt()  # root @ root.T = cov
    z = torch.randn(n_new, x.shape[1], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return mean + z @ root.T


def extend_rows(old: torch.Tensor, vocab: int, how: str, seed: int) -> torch.Tensor:
    """The canonical tensor of the grown vocabulary: old rows unchanged, then the new ones (old's dtype)."""
    n_new = vocab - old.shape[0]
    if n_new < 0:
        raise ValueError(f"a vocabulary of {vocab} rows cannot hold the checkpoint's {old.shape[0]}")
    if n_new == 0:
        return old
    return torch.cat([old, new_rows(old, n_new, how, seed).to(old.dtype)], dim=0)
