"""The encoder variant of the one model (BERT): forward contract, bidirectional attention, padding through
doc_ids, the post-norm block against a hand-written one, the whole model against Hugging Face's
BertForPreTraining, the canonical names/specs and the one initialiser, the config checks, the Triton
attention path without the causal mask, and (one 2-rank gloo job) tp=2 with and without sequence
parallelism, pp=2 with the tied decoder, and weights saved at tp=2 loaded at tp=1.

Tolerances (fp32): logits and gradients max|a - b| <= 1e-5 * max|b| + 1e-7 (sums grouped differently
across ranks); Hugging Face 1e-5 absolute on logits of order 1.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repo root, so `tests.dist_utils` imports
from engine.config import ConfigError, ModelConfig, config_from_dict  # noqa: E402
from engine.model.attention import attention  # noqa: E402
from engine.model.init import materialize  # noqa: E402
from engine.model.loss import IGNORE_INDEX, lm_loss  # noqa: E402
from engine.model.transformer import Transformer, build_model, count_parameters  # noqa: E402
from engine.parallel.state import ParallelState  # noqa: E402
from tests.dist_utils import run_distributed  # noqa: E402

VOCAB, SEQ, B, D, SEED = 61, 12, 2, 32, 5
RTOL, ATOL = 1e-5, 1e-7

CFG = ModelConfig(vocab_size=VOCAB, vocab_pad_multiple=8, d_model=D, n_layers=2, n_heads=4, ffn_hidden=64,
                  max_seq_len=16, encoder=True, norm="layernorm", norm_eps=1e-12, activation="gelu_exact",
                  position="learned", bias=True, tie_embeddings=True, type_vocab_size=2, norm_position="post",
                  embed_norm=True, binary_head=True)


def _batch(seed: int) -> dict[str, torch.Tensor]:
    """[CLS] A [SEP] B [SEP] [PAD]...-like micro-batch: sample 0 has 3 pads, sample 1 none."""
    g = torch.Generator().manual_seed(seed)
    inputs = torch.randint(0, VOCAB, (B, SEQ), generator=g)
    token_types = torch.zeros(B, SEQ, dtype=torch.long)
    token_types[0, 5:9] = 1
    token_types[1, 4:] = 1
    doc_ids = torch.zeros(B, SEQ, dtype=torch.long)
    doc_ids[0, 9:] = 1
    targets = torch.full((B, SEQ), IGNORE_INDEX)
    targets[:, [1, 4, 7]] = torch.randint(0, VOCAB, (B, 3), generator=g)
    return {"inputs": inputs, "targets": targets, "token_types": token_types, "doc_ids": doc_ids,
            "nsp_label": torch.tensor([0, 1])}


def _forward(model, batch):
    return model(batch["inputs"], doc_ids=batch["doc_ids"], token_types=batch["token_types"])


def _loss(mlm, nsp, batch, pstate=None):
    return lm_loss(mlm, batch["targets"], VOCAB, pstate=pstate) + F.cross_entropy(nsp, batch["nsp_label"])


def _close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert a.shape == b.shape, (what, a.shape, b.shape)
    err = (a - b).abs().max().item()
    assert err <= RTOL * b.abs().max().item() + ATOL, f"{what}: max error {err:.3g}"


def _canonical(model) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{name: (value, grad)} cut to the canonical shape (real vocabulary), single process."""
    specs = model.shard_specs()
    out = {}
    for n, p in model.named_parameters():
        s = specs[n]
        cut = (lambda t: t.narrow(s.split_dim, 0, s.global_shape[s.split_dim])) if s.split_dim is not None else (
            lambda t: t)
        out[n] = (cut(p.detach()), None if p.grad is None else cut(p.grad))
    return out


# --------------------------------------------------------------------------- forward contract


def test_forward_returns_mlm_and_nsp_logits():
    model = build_model(CFG, seed=SEED)
    mlm, nsp = _forward(model, _batch(0))
    assert mlm.shape == (B, SEQ, 64) and nsp.shape == (B, 2)  # 61 padded to a multiple of 8
    mlm2, nsp2 = model(_batch(0)["inputs"])  # no token types = type 0 everywhere
    mlm3, nsp3 = model(_batch(0)["inputs"], token_types=torch.zeros(B, SEQ, dtype=torch.long))
    assert torch.allclose(mlm2, mlm3, atol=1e-6) and torch.allclose(nsp2, nsp3, atol=1e-6)
    plain = build_model(dataclasses.replace(CFG, binary_head=False), seed=SEED)
    mlm4, nsp4 = _forward(plain, _batch(0))
    assert nsp4 is None and mlm4.shape == (B, SEQ, 64)
    assert not any(n.startswith(("pooler", "nsp_head")) for n, _ in plain.named_parameters())
    # an intermediate pipeline stage returns hidden states
    mid = Transformer(CFG, layer_range=(1, 2), pre_process=False, post_process=False, device="meta")
    materialize(mid, "cpu", SEED)
    assert mid(torch.randn(B, SEQ, D)).shape == (B, SEQ, D)


def test_attention_is_bidirectional_unlike_the_decoder():
    cfg = dataclasses.replace(CFG, binary_head=False)
    enc = build_model(cfg, seed=SEED)
    dec = build_model(dataclasses.replace(cfg, encoder=False), seed=SEED)
    assert all(not blk.attn.causal for blk in enc.layers.values())
    assert all(blk.attn.causal for blk in dec.layers.values())
    x = _batch(0)["inputs"]
    x2 = x.clone()
    x2[:, -1] = (x2[:, -1] + 1) % VOCAB  # change the LAST token
    assert (enc(x)[0][:, 0] - enc(x2)[0][:, 0]).abs().max() > 1e-4  # the first position sees it
    assert torch.equal(dec(x)[:, :-1], dec(x2)[:, :-1])  # causal: earlier positions do not


def test_padding_through_doc_ids_leaves_real_positions_unchanged():
    model = build_model(CFG, seed=SEED)
    batch = _batch(0)
    other = dict(batch)
    other["inputs"] = batch["inputs"].clone()
    other["inputs"][0, 9:] = (batch["inputs"][0, 9:] + 7) % VOCAB  # different pad tokens and types
    other["token_types"] = batch["token_types"].clone()
    other["token_types"][0, 9:] = 1
    (m1, n1), (m2, n2) = _forward(model, batch), _forward(model, other)
    real = batch["doc_ids"] == 0
    assert torch.allclose(m1[real], m2[real], atol=1e-6, rtol=0) and torch.allclose(n1, n2, atol=1e-6, rtol=0)
    assert (m1[~real] - m2[~real]).abs().max() > 1e-4  # the pads themselves did change
    # without the doc ids the pads leak into the real positions
    m3, _ = model(other["inputs"], token_types=other["token_types"])
    m4, _ = model(batch["inputs"], token_types=batch["token_types"])
    assert (m3[real] - m4[real]).abs().max() > 1e-4


def _reference_post_norm_block(blk, x: torch.Tensor, doc_ids: torch.Tensor, eps: float) -> torch.Tensor:
    """Written out by hand: x = LN(x + attn(x)), x = LN(x + down(gelu_erf(up(x)))), masked by equal ids."""
    def lin(m, t):
        return t @ m.weight.T + m.bias

    b, s, d = x.shape
    h = blk.attn.n_heads
    q, k, v = (lin(p, x).view(b, s, h, d // h).transpose(1, 2) for p in (blk.attn.q_proj, blk.attn.k_proj,
                                                                       blk.attn.v_proj))
    scores = q @ k.transpose(-1, -2) / math.sqrt(d // h)
    scores = scores.masked_fill(doc_ids[:, None, :, None] != doc_ids[:, None, None, :], float("-inf"))
    y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, s, d)
    x = F.layer_norm(x + lin(blk.attn.o_proj, y), (d,), blk.attn_norm.weight, blk.attn_norm.bias, eps)
    u = lin(blk.mlp.up_proj, x)
    act = 0.5 * u * (1 + torch.erf(u / math.sqrt(2)))
    return F.layer_norm(x + lin(blk.mlp.down_proj, act), (d,), blk.mlp_norm.weight, blk.mlp_norm.bias, eps)


def test_post_norm_block_equals_hand_written_reference():
    model = build_model(dataclasses.replace(CFG, norm_eps=1e-5), seed=SEED)
    blk = model.layers["1"]
    for p in blk.parameters():  # biases and norms away from 0 / 1, so each one matters
        p.data.add_(0.1 * torch.randn_like(p))
    x = torch.randn(B, SEQ, D)
    doc = _batch(0)["doc_ids"]
    _close(blk(x, None, doc), _reference_post_norm_block(blk, x, doc, 1e-5), "post-norm block")


def test_matches_hugging_face_bert_for_pretraining():
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=D, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=16, type_vocab_size=2,
                                     layer_norm_eps=1e-12, hidden_act="gelu", hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0)
    hf = transformers.BertForPreTraining(hf_cfg).eval()
    model = build_model(CFG, seed=SEED)
    for p in model.parameters():  # non-trivial norms and biases
        p.data.add_(0.05 * torch.randn_like(p))
    ours = {n: v for n, (v, _) in _canonical(model).items()}
    names = {"bert.embeddings.word_embeddings.weight": "embed.weight",
             "bert.embeddings.position_embeddings.weight": "pos_embed.weight",
             "bert.embeddings.token_type_embeddings.weight": "type_embed.weight",
             "bert.pooler.dense.weight": "pooler.weight", "bert.pooler.dense.bias": "pooler.bias",
             "cls.predictions.bias": "mlm_head.bias", "cls.predictions.decoder.weight": "embed.weight",
             "cls.predictions.decoder.bias": "mlm_head.bias",
             "cls.seq_relationship.weight": "nsp_head.weight", "cls.seq_relationship.bias": "nsp_head.bias"}
    for wb in ("weight", "bias"):
        names[f"bert.embeddings.LayerNorm.{wb}"] = f"embed_norm.{wb}"
        names[f"cls.predictions.transform.dense.{wb}"] = f"mlm_head.dense.{wb}"
        names[f"cls.predictions.transform.LayerNorm.{wb}"] = f"mlm_head.norm.{wb}"
        for i in range(2):
            hp, op = f"bert.encoder.layer.{i}.", f"layers.{i}."
            for hn, on in (("attention.self.query", "attn.q_proj"), ("attention.self.key", "attn.k_proj"),
                           ("attention.self.value", "attn.v_proj"), ("attention.output.dense", "attn.o_proj"),
                           ("attention.output.LayerNorm", "attn_norm"), ("intermediate.dense", "mlp.up_proj"),
                           ("output.dense", "mlp.down_proj"), ("output.LayerNorm", "mlp_norm")):
                names[f"{hp}{hn}.{wb}"] = f"{op}{on}.{wb}"
    state = hf.state_dict()
    assert set(names) == set(state) and set(names.values()) == set(ours)
    hf.load_state_dict({k: ours[v].clone() for k, v in names.items()})
    batch = _batch(3)
    mlm, nsp = _forward(model, batch)
    with torch.no_grad():
        out = hf(input_ids=batch["inputs"], token_type_ids=batch["token_types"],
                 attention_mask=(batch["doc_ids"] == 0).long())
    real = batch["doc_ids"] == 0  # HF lets pads attend the real tokens; only the real positions are specified
    assert (mlm[..., :VOCAB][real] - out.prediction_logits[real]).abs().max() < 1e-5
    assert (nsp - out.seq_relationship_logits).abs().max() < 1e-5


# --------------------------------------------------------------------------- names, specs, init, config


CONTRACT_NAMES = ({"embed.weight", "pos_embed.weight", "type_embed.weight", "embed_norm.weight", "embed_norm.bias",
                   "pooler.weight", "pooler.bias", "nsp_head.weight", "nsp_head.bias", "mlm_head.dense.weight",
                   "mlm_head.dense.bias", "mlm_head.norm.weight", "mlm_head.norm.bias", "mlm_head.bias"}
                  | {f"layers.{i}.{m}.{wb}" for i in range(2) for wb in ("weight", "bias")
                     for m in ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "attn_norm",
                               "mlp.up_proj", "mlp.down_proj", "mlp_norm")})


def test_shard_specs_follow_the_contract_at_tp2_with_sequence_parallel():
    assert set(build_model(CFG).shard_specs()) == CONTRACT_NAMES
    untied = Transformer(dataclasses.replace(CFG, tie_embeddings=False), device="meta").shard_specs()
    assert set(untied) == CONTRACT_NAMES | {"head.weight"}
    fake = ParallelState(tp=2, tp_rank=1, world_size=2, sequence_parallel=True)  # constructors never communicate
    specs = Transformer(CFG, fake, device="meta").shard_specs()
    assert set(specs) == CONTRACT_NAMES
    params = dict(build_model(CFG).named_parameters())
    for n, s in specs.items():  # global shapes: the single-process ones with the real vocabulary
        vocab_rows = n in ("embed.weight", "mlm_head.bias")
        assert s.global_shape == ((VOCAB, *params[n].shape[1:]) if vocab_rows else tuple(params[n].shape)), n
    bias = specs["mlm_head.bias"]
    assert (bias.global_shape, bias.split_dim, bias.runtime_shape, bias.local_shape) == ((VOCAB,), 0, (64,), (32,))
    assert specs["embed.weight"].global_shape == (VOCAB, D) and specs["embed.weight"].local_shape == (32, D)
    # sequence shards give partial gradients: the embeddings added per position and the norms / MLM transform
    partial = {n for n, s in specs.items() if s.sequence_parallel}
    assert {"pos_embed.weight", "type_embed.weight", "embed_norm.weight", "mlm_head.dense.weight",
            "mlm_head.dense.bias", "mlm_head.norm.weight", "layers.0.attn_norm.bias"} <= partial
    # the pooler and next-sentence head see the replicated first token: full gradients
    assert not partial & {"pooler.weight", "pooler.bias", "nsp_head.weight", "nsp_head.bias", "mlm_head.bias"}
    assert not any(s.is_split for n, s in specs.items() if n.startswith(("pooler", "nsp_head", "type_embed")))


def test_one_initialiser_fills_every_layout_from_the_same_canonical_weights():
    full = dict(build_model(CFG, seed=SEED).named_parameters())
    first = Transformer(CFG, layer_range=(0, 1), post_process=False, device="meta")
    last = Transformer(CFG, layer_range=(1, 2), pre_process=False, device="meta")
    for chunk in (first, last):
        materialize(chunk, "cpu", SEED)
        for n, p in chunk.named_parameters():
            assert torch.equal(p, full["embed.weight" if n == "head.weight" else n]), n
    assert {n for c in (first, last) for n, _ in c.named_parameters()} == set(full) | {"head.weight"}
    assert "type_embed.weight" in dict(first.named_parameters()) and "pooler.weight" in dict(last.named_parameters())
    std = CFG.init_std
    for n, p in full.items():
        if n.endswith("norm.weight"):
            assert torch.equal(p, torch.ones_like(p)), n
        elif n.endswith("bias"):
            assert torch.equal(p, torch.zeros_like(p)), n  # mlm_head.bias with its padding too
        else:
            assert 0.7 * std < p.std().item() < 1.3 * std, (n, p.std().item())
    # BERT: the block output projections keep init_std (the decoder divides by sqrt(2 * n_layers) = 2)
    dec = dict(build_model(dataclasses.replace(CFG, encoder=False, binary_head=False), seed=SEED).named_parameters())
    for n in ("layers.0.attn.o_proj.weight", "layers.1.mlp.down_proj.weight"):
        assert torch.allclose(full[n], 2 * dec[n], rtol=1e-6, atol=0), n
    assert torch.equal(full["layers.0.attn.q_proj.weight"], dec["layers.0.attn.q_proj.weight"])


def test_bert_presets_and_parameter_counts():
    base = config_from_dict({"model": {"preset": "bert-base"}, "train": {"objective": "mlm+nsp"},
                             "data": {"seq_len": 128}}).model
    assert (base.d_model, base.n_layers, base.n_heads, base.ffn_hidden, base.vocab_size, base.max_seq_len) == (
        768, 12, 12, 3072, 30522, 512)
    assert base.encoder and base.norm_position == "post" and base.embed_norm and base.binary_head
    assert base.activation == "gelu_exact" and base.norm_eps == 1e-12 and base.tie_embeddings
    # Hugging Face's published sizes: BertForPreTraining and BertForMaskedLM of bert-base-uncased
    assert count_parameters(base) == 110_106_428
    assert count_parameters(dataclasses.replace(base, binary_head=False)) == 109_514_298
    tiny = config_from_dict({"model": {"preset": "bert-tiny", "vocab_size": VOCAB},
                             "train": {"objective": "mlm+nsp"}, "data": {"seq_len": 64}}).model
    model = build_model(tiny)
    assert count_parameters(tiny, padded=True) == sum(p.numel() for p in model.parameters())
    for cfg in (dataclasses.replace(CFG, tie_embeddings=False, type_vocab_size=3, binary_head=False),
                dataclasses.replace(CFG, encoder=False, binary_head=False),  # a post-norm decoder: no final norm
                dataclasses.replace(CFG, norm_position="pre", embed_norm=False, bias=False)):
        assert count_parameters(cfg) == sum(s.numel for s in Transformer(cfg, device="meta").shard_specs().values())


def test_config_checks_are_clear():
    with pytest.raises(ConfigError, match=r"model.binary_head=true: expected model.encoder=true"):
        config_from_dict({"model": {"binary_head": True}})
    with pytest.raises(ConfigError, match=r"model.encoder=true with model.position=none"):
        config_from_dict({"model": {"encoder": True, "position": "none"}, "train": {"objective": "mlm"}})
    with pytest.raises(ConfigError, match=r"train.sample_prompt with train.objective=mlm\+nsp"):
        config_from_dict({"model": {"preset": "bert-tiny"}, "train": {"objective": "mlm+nsp", "sample_prompt": "a"}})
    with pytest.raises(ConfigError, match=r"model.type_vocab_size"):
        config_from_dict({"model": {"type_vocab_size": -1}})
    with pytest.raises(ConfigError, match=r"model.norm_position"):
        config_from_dict({"model": {"norm_position": "middle"}})
    # the forward's own checks
    dec = build_model(dataclasses.replace(CFG, encoder=False, binary_head=False))
    with pytest.raises(ValueError, match=r"token_types given, but this model has no token-type embedding"):
        dec(_batch(0)["inputs"], token_types=_batch(0)["token_types"])
    with pytest.raises(ValueError, match=r"token_types: expected shape \(2, 12\)"):
        build_model(CFG)(_batch(0)["inputs"], token_types=torch.zeros(2, 11, dtype=torch.long))


def test_flops_count_the_mlm_dense():
    from engine.train.flops import matmul_params_per_token

    dec = dataclasses.replace(CFG, encoder=False, binary_head=False)
    assert matmul_params_per_token(CFG) - matmul_params_per_token(dec) == D * D


# --------------------------------------------------------------------------- Triton attention, non-causal


def test_triton_attention_without_causal_mask_equals_sdpa(monkeypatch):
    kernels = pytest.importorskip("engine.kernels")
    if not kernels.TRITON_AVAILABLE or not (torch.cuda.is_available() or kernels.INTERPRET_REQUESTED):
        pytest.skip("the Triton path needs triton and CUDA or TRITON_INTERPRET=1")
    calls = []
    real = kernels.flash_attention
    monkeypatch.setattr(kernels, "flash_attention", lambda *a, **kw: calls.append(kw["causal"]) or real(*a, **kw))
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 19, 16, generator=g, requires_grad=True)  # 19: not a block multiple
    k = torch.randn(2, 2, 19, 16, generator=g, requires_grad=True)  # GQA 4/2
    v = torch.randn(2, 2, 19, 16, generator=g, requires_grad=True)
    doc = torch.tensor([[0] * 13 + [1] * 6, [0] * 19])  # padding in the first sample
    dout = torch.randn(2, 4, 19, 16, generator=g)
    res = {}
    for backend in ("sdpa", "triton"):
        out = attention(q, k, v, causal=False, doc_ids=doc, backend=backend)
        grads = torch.autograd.grad(out, (q, k, v), dout)
        res[backend] = (out.detach(), *grads)
    assert calls == [False]  # the Triton kernel ran, without the causal mask
    for name, a, b in zip(("out", "dq", "dk", "dv"), res["triton"], res["sdpa"]):
        assert (a - b).abs().max() < 1e-4, name
    # and the whole encoder through it
    tri = build_model(dataclasses.replace(CFG, attention="triton"), seed=SEED)
    ref = build_model(CFG, seed=SEED)
    (m1, n1), (m2, n2) = _forward(tri, _batch(1)), _forward(ref, _batch(1))
    assert len(calls) == 1 + CFG.n_layers and (m1 - m2).abs().max() < 1e-4 and (n1 - n2).abs().max() < 1e-4


# --------------------------------------------------------------------------- tp=2 (+sp), pp=2, tp2 -> tp1 weights

LR = 0.5
N_MICRO = 4


def _tp_case(pstate: ParallelState, save_to) -> dict:
    from engine.checkpoint.weights import save_weights
    from engine.parallel import tensor_parallel as tpl
    from engine.parallel.collectives import all_gather

    model = build_model(CFG, pstate, seed=SEED)
    batch = _batch(0)
    mlm, nsp = _forward(model, batch)
    _loss(mlm, nsp, batch, pstate).backward()
    tpl.allreduce_sequence_parallel_grads(model, pstate)
    specs = model.shard_specs()
    grads = {n: tpl.gather_tensor(p.grad, specs[n], pstate) for n, p in model.named_parameters()}
    logits = all_gather(mlm.detach(), -1, pstate.tp_group, pstate.tp)[..., :VOCAB]  # [B, S, V]
    if save_to is not None:
        with torch.no_grad():
            for p in model.parameters():
                p -= LR * p.grad
        save_weights(save_to, [model], CFG, pstate)
    return {"mlm": logits, "nsp": nsp.detach(), "grads": grads}


def _pp_case(pstate: ParallelState) -> dict:
    from engine.parallel.pipeline.executor import forward_backward_pipeline
    from engine.train.build import build_chunks, chunk_specs, tied_embedding
    from engine.train.step import complete_grads

    chunks = build_chunks(CFG, pstate, seed=SEED)
    batches = [_batch(10 + i) for i in range(N_MICRO)]
    losses = forward_backward_pipeline(chunks, batches, pstate, schedule="1f1b",
                                       loss_fn=lambda out, b: _loss(*out, b, pstate), seq_len=SEQ,
                                       micro_batch_size=B, d_model=D)
    complete_grads(chunks, chunk_specs(chunks), pstate, None, tied_embedding(chunks))
    return {"losses": losses, "grads": {n: p.grad.clone() for c in chunks for n, p in c.named_parameters()}}


def _dist_worker(rank: int, world_size: int, path: str) -> dict:
    out = {}
    for sp in (False, True):
        pstate = ParallelState.initialize(tp=2, sequence_parallel=sp, device="cpu")
        out[("tp", sp)] = _tp_case(pstate, path if sp else None)
    out["pp"] = _pp_case(ParallelState.initialize(pp=2, device="cpu"))
    return out


@pytest.fixture(scope="module")
def dist_results(tmp_path_factory):
    path = tmp_path_factory.mktemp("enc") / "model.safetensors"
    return run_distributed(_dist_worker, 2, str(path), timeout=200), path


@pytest.mark.parametrize("sp", [False, True])
def test_tp2_matches_tp1_forward_and_gradients(dist_results, sp):
    ranks, _ = dist_results
    ref = build_model(CFG, seed=SEED)
    batch = _batch(0)
    mlm, nsp = _forward(ref, batch)
    _loss(mlm, nsp, batch).backward()
    ref_grads = {n: g for n, (_, g) in _canonical(ref).items()}
    for r, res in enumerate(ranks):
        got = res[("tp", sp)]
        _close(got["nsp"], nsp.detach(), f"rank {r} nsp logits")  # every tp rank: the same nsp logits
        _close(got["mlm"], mlm.detach()[..., :VOCAB], f"rank {r} mlm logits")
        assert set(got["grads"]) == set(ref_grads)
        for n, g in got["grads"].items():
            _close(g, ref_grads[n], f"rank {r} grad {n} (sp={sp})")


def test_weights_saved_at_tp2_load_at_tp1(dist_results):
    from engine.checkpoint.weights import load_weights

    _, path = dist_results
    ref = build_model(CFG, seed=SEED)
    batch = _batch(0)
    _loss(*_forward(ref, batch), batch).backward()
    with torch.no_grad():
        for p in ref.parameters():
            p -= LR * p.grad
    loaded = build_model(CFG, seed=SEED + 1)  # other initial values: everything must come from the file
    load_weights(loaded, path)
    want, got = _canonical(ref), _canonical(loaded)
    for n in want:
        _close(got[n][0], want[n][0], f"loaded {n}")


def test_pp2_with_the_tied_decoder_matches_pp1(dist_results):
    ranks, _ = dist_results
    ref = build_model(CFG, seed=SEED)
    losses = []
    for i in range(N_MICRO):
        batch = _batch(10 + i)
        loss = _loss(*_forward(ref, batch), batch)
        (loss / N_MICRO).backward()
        losses.append(loss.item())
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    ref_grads["head.weight"] = ref_grads["embed.weight"]  # the last stage's copy of the tied decoder
    names = set()
    for r, res in enumerate(ranks):
        got = res["pp"]
        assert max(abs(a - b) / abs(b) for a, b in zip(got["losses"], losses)) < 1e-6
        for n, g in got["grads"].items():
            _close(g, ref_grads[n], f"pp rank {r} grad {n}")
        names |= set(got["grads"])
    assert "type_embed.weight" in ranks[0]["pp"]["grads"] and "mlm_head.bias" in ranks[1]["pp"]["grads"]
    assert names == set(ref_grads)
