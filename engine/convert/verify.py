"""`--verify`: transformers and our model on the same fixed input, in fp32, logits compared.

The input is fixed (seeded token ids, 2 x min(32, max_seq_len)). Our side is the one model definition built
from the checkpoint's config and filled from it; the Hugging Face side is transformers'
AutoModelForCausalLM.from_pretrained of the directory (transformers is needed here only). Both run in fp32.
When an export was cast (e.g. to bf16), our weights are rounded the same way first, so the check measures
the conversion -- names, splits, transposes, RoPE, config fields -- and not the cast.

Reported: max |logit difference| and KL(P_hf || P_ours) averaged over positions; the bounds are those
the conversion tests hold (fp32: 1e-4 and 1e-9).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from engine.errors import ConversionError

__all__ = ["MAX_ABS", "MAX_KL", "Verified", "compare_logits", "hf_logits", "our_logits", "verify"]

MAX_ABS = 1e-4
MAX_KL = 1e-9


@dataclass(frozen=True)
class Verified:
    max_abs: float
    kl: float
    ok: bool

    def line(self) -> str:
        verdict = "ok" if self.ok else "FAILED"
        return (f"verify: max |logit diff| {self.max_abs:.3g} (bound {MAX_ABS:g}), KL {self.kl:.3g} "
                f"(bound {MAX_KL:g}): {verdict}")


def fixed_input(vocab: int, max_len: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)
    return torch.randint(0, vocab, (2, min(32, max_len)), generator=g)


def compare_logits(hf: torch.Tensor, ours: torch.Tensor) -> Verified:
    """hf, ours: [B, S, V] logits over the real vocabulary."""
    a, b = hf.double(), ours.double()
    max_abs = float((a - b).abs().max())
    la, lb = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
    kl = float((la.exp() * (la - lb)).sum(-1).mean())
    return Verified(max_abs, kl, max_abs <= MAX_ABS and kl <= MAX_KL)


def hf_logits(hf_dir: str | os.PathLike, ids: torch.Tensor) -> torch.Tensor:
    try:
        from transformers import AutoModelForCausalLM
    except ImportError as e:
        raise ConversionError(f"--verify runs transformers, which is not importable here ({e}); install it "
                              f"(pip install transformers) or convert without --verify") from None
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32) \
        if _new_transformers() else AutoModelForCausalLM.from_pretrained(str(hf_dir), torch_dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return model(ids).logits.float()


def _new_transformers() -> bool:
    import transformers

    return int(transformers.__version__.split(".")[0]) >= 5


def our_logits(checkpoint: str | os.PathLike, ids: torch.Tensor, round_to: Optional[torch.dtype] = None
               ) -> torch.Tensor:
    """Our model from a checkpoint, fp32 (weights rounded through `round_to` first when given)."""
    import dataclasses

    from engine.checkpoint.export import ModelCheckpoint
    from engine.model.transformer import Transformer

    ck = ModelCheckpoint.open(checkpoint, "checkpoint")
    m = dataclasses.replace(ck.config.model, dropout=0.0, attention="sdpa", fused_ops=False)
    model = Transformer(m, device="cpu")
    ck.load_into(model)
    if round_to is not None:
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.to(round_to).float())
    model.eval()
    with torch.no_grad():
        return model(ids)[..., : m.vocab_size].float()


def verify(checkpoint: str | os.PathLike, hf_dir: str | Path, round_to: Optional[torch.dtype] = None) -> Verified:
    """Our model from `checkpoint` against transformers on `hf_dir`."""
    from engine.checkpoint.export import ModelCheckpoint

    m = ModelCheckpoint.open(checkpoint, "checkpoint").config.model
    ids = fixed_input(m.vocab_size, m.max_seq_len)
    return compare_logits(hf_logits(hf_dir, ids), our_logits(checkpoint, ids, round_to))
