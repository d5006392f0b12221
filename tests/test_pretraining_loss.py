"""The masked-LM + next-sentence loss and its metrics (engine/model/loss.py: pretraining_loss)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from engine.model.loss import IGNORE_INDEX, PRETRAIN_STATS, pretraining_loss, pretraining_metrics


def _batch(b: int = 3, s: int = 10, v: int = 20, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, s, 32, generator=g)  # padded vocabulary 32, real 20
    targets = torch.full((b, s), IGNORE_INDEX)
    chosen = torch.rand(b, s, generator=g) < 0.3
    chosen[0, 0] = True
    targets[chosen] = torch.randint(0, v, (int(chosen.sum()),), generator=g)
    nsp = torch.randn(b, 2, generator=g)
    labels = torch.tensor([0, 1, 1])[:b]
    return logits, nsp, {"targets": targets, "nsp_label": labels}


def test_loss_covers_the_chosen_positions_only_and_adds_weighted_nsp():
    logits, nsp, batch = _batch()
    loss, stats = pretraining_loss((logits, nsp), batch, vocab_size=20, nsp_weight=0.5)
    t = batch["targets"]
    keep = t != IGNORE_INDEX
    mlm = F.cross_entropy(logits[..., :20][keep], t[keep])  # padding columns never enter the softmax
    ref = mlm + 0.5 * F.cross_entropy(nsp, batch["nsp_label"])
    assert torch.allclose(loss, ref, atol=1e-6)
    # logits at positions that are not chosen do not matter
    other = logits.clone()
    other[~keep] = 100 * torch.randn_like(other[~keep])
    assert torch.allclose(pretraining_loss((other, nsp), batch, 20, 0.5)[0], loss, atol=1e-6)
    s = dict(zip(PRETRAIN_STATS, stats.tolist()))
    acc = (logits[..., :20].argmax(-1)[keep] == t[keep]).sum().item()
    assert s["mlm_correct"] == acc and s["mlm_count"] == keep.sum().item()
    assert s["nsp_correct"] == (nsp.argmax(-1) == batch["nsp_label"]).sum().item() and s["nsp_count"] == 3


def test_padding_columns_never_count_as_the_prediction():
    logits, _, batch = _batch()
    logits[..., 25] = 1e4  # a padded column (>= vocab_size 20) that would win an unrestricted argmax
    _, stats = pretraining_loss((logits, None), batch, vocab_size=20)
    s = dict(zip(PRETRAIN_STATS, stats.tolist()))
    keep = batch["targets"] != IGNORE_INDEX
    assert s["mlm_correct"] == (logits[..., :20].argmax(-1)[keep] == batch["targets"][keep]).sum().item()
    assert s["nsp_count"] == 0


def test_metrics_from_summed_stats():
    def stats(seed: int) -> torch.Tensor:
        logits, nsp, batch = _batch(seed=seed)
        return pretraining_loss((logits, nsp), batch, vocab_size=20)[1]

    a, b = stats(1), stats(2)
    m = pretraining_metrics(a + b)
    sa, sb = dict(zip(PRETRAIN_STATS, a.tolist())), dict(zip(PRETRAIN_STATS, b.tolist()))
    assert math.isclose(m["mlm_loss"], (sa["mlm_loss"] + sb["mlm_loss"]) / 2)
    assert math.isclose(m["mlm_acc"], (sa["mlm_correct"] + sb["mlm_correct"]) / (sa["mlm_count"] + sb["mlm_count"]))
    assert math.isclose(m["nsp_acc"], (sa["nsp_correct"] + sb["nsp_correct"]) / 6)
    assert set(pretraining_metrics(pretraining_loss((_batch()[0], None), _batch()[2], 20)[1])) == {"mlm_loss",
                                                                                                  "mlm_acc"}


@pytest.mark.parametrize("perfect", [True, False])
def test_accuracy_is_exact_for_perfect_and_wrong_predictions(perfect):
    _, _, batch = _batch()
    t = batch["targets"]
    logits = torch.zeros(3, 10, 32)
    idx = t.clamp_min(0) if perfect else (t.clamp_min(0) + 1) % 20
    logits.scatter_(-1, idx.unsqueeze(-1), 5.0)
    m = pretraining_metrics(pretraining_loss((logits, None), batch, 20)[1])
    assert m["mlm_acc"] == (1.0 if perfect else 0.0)
