import math

import pytest
import torch
import torch.nn.functional as F

from engine.config import config_from_dict
from engine.model import build_model, count_parameters
from engine.model.loss import IGNORE_INDEX, lm_loss

# Published parameter counts (real vocabulary, before padding).
KNOWN = {
    "gpt2": 124_439_808,
    "gpt2-medium": 354_823_168,
    "llama2-7b": 6_738_415_616,
    "llama3-8b": 8_030_261_248,
    "mistral": 7_241_732_096,
    "qwen2-0.5b": 494_032_768,
    "llama3.2-1b": 1_235_814_400,
}


@pytest.mark.parametrize("preset", sorted(KNOWN))
def test_preset_parameter_counts(preset):
    cfg = config_from_dict({"model": {"preset": preset}, "data": {"seq_len": 128}})
    assert count_parameters(cfg.model) == KNOWN[preset]


def test_gpt2_built_model_matches_count():
    cfg = config_from_dict({"model": {"preset": "gpt2"}})
    model = build_model(cfg.model)
    padding = (model.padded_vocab - 50257) * 768  # tied: one padded matrix
    assert model.padded_vocab % 128 == 0
    assert model.num_params() - padding == 124_439_808


def _small(**model):
    base = {"preset": "llama", "vocab_size": 100, "d_model": 32, "n_layers": 2, "n_heads": 4, "max_seq_len": 16}
    base.update(model)
    return config_from_dict({"model": base}).model


@pytest.mark.parametrize("kv", [4, 2, 1])  # MHA, GQA, MQA
def test_forward_shapes_and_causality(kv):
    torch.manual_seed(0)
    model = build_model(_small(n_kv_heads=kv))
    x = torch.randint(0, 100, (3, 11))
    logits = model(x)
    assert logits.shape == (3, 11, 128)  # vocab 100 padded to 128
    x2 = x.clone()
    x2[:, 7:] = (x2[:, 7:] + 1) % 100  # changing later tokens must not change earlier logits
    assert torch.allclose(model(x2)[:, :7], logits[:, :7], atol=1e-6)


def test_gpt2_style_and_qkv_bias():
    model = build_model(_small(norm="layernorm", position="learned", activation="gelu", bias=True,
                               tie_embeddings=True))
    assert model.head is None and hasattr(model, "pos_embed")
    assert model.layers["0"].attn.q_proj.bias is not None
    model = build_model(_small(qkv_bias=True))
    assert model.layers["0"].attn.q_proj.bias is not None and model.layers["0"].attn.o_proj.bias is None


def test_padded_logits_excluded_from_loss():
    logits = torch.randn(2, 5, 128)
    targets = torch.randint(0, 100, (2, 5))
    targets[0, 0] = IGNORE_INDEX
    ref = F.cross_entropy(logits[..., :100].reshape(-1, 100), targets.reshape(-1), ignore_index=IGNORE_INDEX)
    logits[..., 100:] = 1e4  # huge padded logits must not matter
    assert torch.allclose(lm_loss(logits, targets, 100), ref, atol=1e-6)


def test_scaled_init_of_output_projections():
    cfg = _small(n_layers=8, d_model=256, n_heads=4, init_std=0.02)
    model = build_model(cfg)
    o = model.layers["0"].attn.o_proj.weight.std().item()
    q = model.layers["0"].attn.q_proj.weight.std().item()
    assert math.isclose(q, 0.02, rel_tol=0.05)
    assert math.isclose(o, 0.02 / math.sqrt(16), rel_tol=0.05)


def test_init_independent_of_layout():
    """Stage models hold the same values as the full model (init seeded by parameter name)."""
    from engine.model.transformer import Transformer

    cfg = _small(n_layers=4)
    full = build_model(cfg, seed=5)
    stage = Transformer(cfg, layer_range=(2, 4), pre_process=False, post_process=True)
    stage.init_weights(5)
    for name, p in stage.named_parameters():
        assert torch.equal(p, full.state_dict()[name]), name


def test_overfit_one_batch():
    torch.manual_seed(0)
    model = build_model(_small())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    tokens = torch.randint(0, 100, (4, 17))
    first = None
    for _ in range(60):
        loss = lm_loss(model(tokens[:, :-1]), tokens[:, 1:], 100)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 4.0 and loss.item() < 0.5 * first


def test_document_masking_blocks_cross_document_attention():
    torch.manual_seed(0)
    model = build_model(_small())
    x = torch.randint(0, 100, (1, 12))
    doc_ids = torch.tensor([[0] * 5 + [1] * 7])
    pos = torch.tensor([list(range(5)) + list(range(7))])
    out = model(x, position_ids=pos, doc_ids=doc_ids)
    alone = model(x[:, 5:])  # the second document on its own
    assert torch.allclose(out[:, 5:], alone, atol=1e-5)
