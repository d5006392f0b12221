"""`--verify`: transformers and our model on the same fixed input, in fp32, logits compared.

The input is fixed (seeded token ids, 2 x min(32, max_seq_len)). Our side is the one model definition built
from the checkpoint's config and filled from it; the Hugging Face side is transformers'
AutoModelForCausalLM.from_pretrained of the directory (transformers is needed here only). Both run in fp32.
When an export was cast (e.g. to bf16), our weights are rounded the same way first, so the check measures
the conversion -- names, splits, transposes, RoPE, config fields -- and not the cast.

Reported: max |logit difference| and KL(P_hf || P_ours) averaged over positions; the bounds are those
the conversion tests hold (fp32: 1e-4 and 1e-9).

An encoder (BERT) is run as BertForPreTraining (model.binary_head) or BertForMaskedLM on a fixed input with
two segments (token_type_ids / our token_types) and padding in the second row (attention_mask / our doc_ids:
real 0, pad 1). The MLM prediction logits are compared at the real positions only (a pad's own output is
not defined the same way: HF lets pads attend to the real tokens, ours keeps them apart), and the
next-sentence logits ([B, 2], from the first token) under the same bounds.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from engine.errors import ConversionError

__all__ = ["EncoderInput", "MAX_ABS", "MAX_KL", "Verified", "compare_logits", "fixed_encoder_input", "fixed_input",
           "hf_encoder_logits", "hf_logits", "our_encoder_logits", "our_logits", "verify"]

MAX_ABS = 1e-4
MAX_KL = 1e-9


@dataclass(frozen=True)
class Verified:
    max_abs: float
    kl: float
    ok: bool
    nsp: Optional["Verified"] = None  # an encoder's next-sentence logits (its `ok` is part of this one's)

    def line(self) -> str:
        verdict = "ok" if self.ok else "FAILED"
        what = "MLM logit diff" if self.nsp is not None else "logit diff"
        nsp = (f"; NSP: max |diff| {self.nsp.max_abs:.3g}, KL {self.nsp.kl:.3g}" if self.nsp is not None else "")
        return (f"verify: max |{what}| {self.max_abs:.3g} (bound {MAX_ABS:g}), KL {self.kl:.3g} "
                f"(bound {MAX_KL:g}){nsp}: {verdict}")


@dataclass(frozen=True)
class EncoderInput:
    ids: torch.Tensor  # [B, S] token ids
    token_types: torch.Tensor  # [B, S] segment 0 / 1
    attention_mask: torch.Tensor  # [B, S] 1 real, 0 pad (HF); our doc_ids are 1 - mask

    @property
    def doc_ids(self) -> torch.Tensor:
        return (1 - self.attention_mask).long()


def fixed_input(vocab: int, max_len: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)
    return torch.randint(0, vocab, (2, min(32, max_len)), generator=g)


def fixed_encoder_input(vocab: int, max_len: int, type_vocab: int) -> EncoderInput:
    """Two rows of min(32, max_len) seeded ids: segment A then B (when type_vocab > 1), the second row padded
    over its last 3/8 (so that its segment B is short)."""
    ids = fixed_input(vocab, max_len)
    b, s = ids.shape
    types = torch.zeros(b, s, dtype=torch.long)
    if type_vocab > 1:
        types[:, s // 2:] = 1
    mask = torch.ones(b, s, dtype=torch.long)
    pad = max(1, 3 * s // 8) if s > 2 else 0
    if pad:
        mask[1, s - pad:] = 0
        types[1, s - pad:] = 0  # HF tokenizers give pads segment 0
    return EncoderInput(ids, types, mask)


def compare_logits(hf: torch.Tensor, ours: torch.Tensor) -> Verified:
    """hf, ours: [..., V] logits over the real vocabulary (KL averaged over the leading dims)."""
    a, b = hf.double(), ours.double()
    max_abs = float((a - b).abs().max())
    la, lb = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
    kl = float((la.exp() * (la - lb)).sum(-1).mean())
    return Verified(max_abs, kl, max_abs <= MAX_ABS and kl <= MAX_KL)


def _hf_model(hf_dir: str | os.PathLike, auto_class: str) -> torch.nn.Module:
    try:
        import transformers
    except ImportError as e:
        raise ConversionError(f"--verify runs transformers, which is not importable here ({e}); install it "
                              f"(pip install transformers) or convert without --verify") from None
    auto = getattr(transformers, auto_class)
    model = auto.from_pretrained(str(hf_dir), dtype=torch.float32) \
        if _new_transformers() else auto.from_pretrained(str(hf_dir), torch_dtype=torch.float32)
    return model.eval()


def hf_logits(hf_dir: str | os.PathLike, ids: torch.Tensor) -> torch.Tensor:
    model = _hf_model(hf_dir, "AutoModelForCausalLM")
    with torch.no_grad():
        return model(ids).logits.float()


def hf_encoder_logits(hf_dir: str | os.PathLike, inp: EncoderInput, binary_head: bool
                      ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """transformers' (MLM logits [B, S, V], NSP logits [B, 2] or None). The class is chosen by our model
    (BertForPreTraining with the binary head, else BertForMaskedLM), not by config.json's architectures:
    the Hub's bert-base-uncased says BertForMaskedLM over files that hold the next-sentence head too."""
    model = _hf_model(hf_dir, "AutoModelForPreTraining" if binary_head else "AutoModelForMaskedLM")
    with torch.no_grad():
        out = model(input_ids=inp.ids, token_type_ids=inp.token_types, attention_mask=inp.attention_mask)
    if binary_head:
        return out.prediction_logits.float(), out.seq_relationship_logits.float()
    return out.logits.float(), None


def _new_transformers() -> bool:
    import transformers

    return int(transformers.__version__.split(".")[0]) >= 5


def _our_model(checkpoint: str | os.PathLike, round_to: Optional[torch.dtype]) -> torch.nn.Module:
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
    return model.eval()


def our_logits(checkpoint: str | os.PathLike, ids: torch.Tensor, round_to: Optional[torch.dtype] = None
               ) -> torch.Tensor:
    """Our decoder's logits [B, S, V] over the real vocabulary (see _our_model)."""
    model = _our_model(checkpoint, round_to)
    with torch.no_grad():
        return model(ids)[..., : model.vocab_size].float()


def our_encoder_logits(checkpoint: str | os.PathLike, inp: EncoderInput, round_to: Optional[torch.dtype] = None
                       ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Our encoder's (MLM logits [B, S, V] over the real vocabulary, NSP logits [B, 2] or None)."""
    model = _our_model(checkpoint, round_to)
    with torch.no_grad():
        mlm, nsp = model(inp.ids, doc_ids=inp.doc_ids, token_types=inp.token_types)
    return mlm[..., : model.vocab_size].float(), None if nsp is None else nsp.float()


def _verify_encoder(checkpoint: str | os.PathLike, hf_dir: str | Path, m, round_to: Optional[torch.dtype]
                    ) -> Verified:
    inp = fixed_encoder_input(m.vocab_size, m.max_seq_len, m.type_vocab_size)
    hf_mlm, hf_nsp = hf_encoder_logits(hf_dir, inp, m.binary_head)
    mlm, nsp = our_encoder_logits(checkpoint, inp, round_to)
    real = inp.attention_mask.bool()  # [B, S]: compare real positions only -> [N, V]
    out = compare_logits(hf_mlm[real], mlm[real])
    if not m.binary_head:
        return out
    if hf_nsp is None or nsp is None:
        raise ConversionError(f"--verify: model.binary_head is set but {'ours' if nsp is None else 'transformers'} "
                              f"returned no next-sentence logits")
    head = compare_logits(hf_nsp, nsp)
    return Verified(out.max_abs, out.kl, out.ok and head.ok, head)


def verify(checkpoint: str | os.PathLike, hf_dir: str | Path, round_to: Optional[torch.dtype] = None) -> Verified:
    """Our model from `checkpoint` against transformers on `hf_dir`."""
    from engine.checkpoint.export import ModelCheckpoint

    m = ModelCheckpoint.open(checkpoint, "checkpoint").config.model
    if m.encoder:
        return _verify_encoder(checkpoint, hf_dir, m, round_to)
    ids = fixed_input(m.vocab_size, m.max_seq_len)
    return compare_logits(hf_logits(hf_dir, ids), our_logits(checkpoint, ids, round_to))
