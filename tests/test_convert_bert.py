"""Hugging Face BERT conversion, checked against transformers itself (CPU, no network).

Tiny random BERTs are built locally with transformers (fixed seeds) and saved with save_pretrained:
- BertForPreTraining (erf "gelu", tied decoder, pooler + next-sentence head);
- BertForMaskedLM (tanh "gelu_new", three token types, no pooler);
- BertForPreTraining untied (relu, its own decoder weight and decoder bias);
every norm and bias is perturbed, so that a misplaced one shows in the logits.

HF -> ours: our MLM and NSP logits equal transformers' on a fixed two-segment input with padding (real
positions only; fp32: max |diff| <= 1e-4, KL <= 1e-9). HF -> ours cut at tp2 -> HF: bit-identical tensors and
an identical config.json, loaded by transformers without a missing or unexpected key. Ours (no Hugging Face
source) -> HF: a fresh config.json that transformers loads into the same logits. The Hub's layout (a
BertForMaskedLM config over pretraining files, gamma/beta names, the position_ids buffer, the decoder's tied
copies) converts and writes back unchanged. Negative controls: the two LayerNorms of a layer swapped, the
token-type embedding dropped, the pooler transposed (NSP only), the padding ignored: caught (> 1e-3).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from engine.config import ModelConfig  # noqa: E402
from engine.convert.from_hf import HFSource, convert_from_hf  # noqa: E402
from engine.convert.hf_config import arch_of_model, hf_config_from_model  # noqa: E402
from engine.convert.to_hf import convert_to_hf  # noqa: E402
from engine.convert.verify import MAX_ABS, MAX_KL, fixed_encoder_input, hf_encoder_logits, \
    our_encoder_logits, verify  # noqa: E402
from engine.errors import ConversionError  # noqa: E402

QUIET = lambda s: None  # noqa: E731
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
             max_position_embeddings=40)

MODELS = {
    "pretraining": lambda: transformers.BertForPreTraining(transformers.BertConfig(vocab_size=101, **SMALL)),
    "masked": lambda: transformers.BertForMaskedLM(transformers.BertConfig(
        vocab_size=97, hidden_act="gelu_new", type_vocab_size=3, **SMALL)),
    "untied": lambda: transformers.BertForPreTraining(transformers.BertConfig(
        vocab_size=90, hidden_act="relu", tie_word_embeddings=False, **SMALL)),
}


def _save(model, d: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    with torch.no_grad():  # non-trivial norms and biases
        for n, p in model.named_parameters():
            if n.endswith("bias") or "LayerNorm" in n:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bert")
    out = {}
    for i, (name, make) in enumerate(MODELS.items()):
        torch.manual_seed(200 + i)
        out[name] = _save(make(), root / name, 300 + i)
    return out


def _safetensors(d: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _loads_cleanly(d: Path, cls) -> None:
    model, info = cls.from_pretrained(d, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info.get("mismatched_keys"), info


# ----------------------------------------------------------------------------- logits

@pytest.mark.parametrize("name", list(MODELS))
def test_from_hf_logits_equal_transformers(hf_dirs, tmp_path, name):
    step = convert_from_hf(hf_dirs[name], tmp_path / "ck", log=QUIET)
    v = verify(step.path, hf_dirs[name])
    assert v.ok and v.max_abs <= MAX_ABS and v.kl <= MAX_KL, v.line()
    m = HFSource.open(hf_dirs[name]).model_config()
    assert m.encoder and m.norm_position == "post" and m.embed_norm
    assert m.binary_head == (name != "masked") and (v.nsp is not None) == m.binary_head
    if m.binary_head:
        assert v.nsp.max_abs <= MAX_ABS and v.nsp.kl <= MAX_KL, v.line()
    meta = json.loads((step.path / "tessera.json").read_text())
    assert meta["config"]["train"]["objective"] == ("mlm+nsp" if m.binary_head else "mlm")


def test_the_fixed_input_exercises_segments_padding_and_both_heads(hf_dirs):
    inp = fixed_encoder_input(101, 40, 2)
    assert set(inp.token_types.unique().tolist()) == {0, 1}
    assert inp.attention_mask[0].all() and not inp.attention_mask[1].all()
    assert torch.equal(inp.doc_ids, 1 - inp.attention_mask)
    mlm, nsp = hf_encoder_logits(hf_dirs["pretraining"], inp, binary_head=True)
    assert mlm.shape == (2, 32, 101) and nsp.shape == (2, 2)
    assert nsp.abs().min() > 1e-3 and not torch.allclose(nsp[0], nsp[1])  # not a trivial head


# ----------------------------------------------------------------------------- round trips

@pytest.mark.parametrize("name", list(MODELS))
def test_round_trip_at_tp2_is_bit_identical(hf_dirs, tmp_path, name):
    step = convert_from_hf(hf_dirs[name], tmp_path / "ck", tp=2, log=QUIET)
    meta = json.loads((step.path / "tessera.json").read_text())
    assert meta["layout"]["tp"] == 2 and meta["has_optimizer"] is False
    out = convert_to_hf(step.path, tmp_path / "hf", dtype="fp32", log=QUIET).out
    a, b = _safetensors(hf_dirs[name]), _safetensors(out)
    if name == "untied":
        # transformers 5 computes with decoder.bias (its own parameter when untied); the unused
        # cls.predictions.bias is written as a copy of it
        assert not torch.equal(a["cls.predictions.bias"], a["cls.predictions.decoder.bias"])
        assert torch.equal(b["cls.predictions.bias"], a["cls.predictions.decoder.bias"])
        a["cls.predictions.bias"] = a["cls.predictions.decoder.bias"]
    assert sorted(a) == sorted(b)
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    assert json.loads((out / "config.json").read_text()) == json.loads((hf_dirs[name] / "config.json").read_text())
    assert not (out / "generation_config.json").exists()  # an encoder's source had none
    cls = transformers.BertForMaskedLM if name == "masked" else transformers.BertForPreTraining
    _loads_cleanly(out, cls)


@pytest.mark.parametrize("name", ["pretraining", "masked"])
def test_ours_to_hf_without_a_source_writes_a_fresh_config(hf_dirs, tmp_path, name):
    """A model with no config.json to carry: the fresh one must describe it exactly (class, activation, token
    types, eps, tying) -- transformers loads it into the same logits."""
    step = convert_from_hf(hf_dirs[name], tmp_path / "ck", log=QUIET)
    meta_file = step.path / "tessera.json"
    meta = json.loads(meta_file.read_text())
    meta["hf"] = None
    meta_file.write_text(json.dumps(meta))
    out = convert_to_hf(step.path, tmp_path / "hf", dtype="fp32", log=QUIET).out
    fresh = json.loads((out / "config.json").read_text())
    source = json.loads((hf_dirs[name] / "config.json").read_text())
    for k in ("architectures", "hidden_act", "type_vocab_size", "vocab_size", "intermediate_size",
              "max_position_embeddings", "layer_norm_eps", "tie_word_embeddings"):
        assert fresh[k] == source[k], k
    _loads_cleanly(out, transformers.BertForMaskedLM if name == "masked" else transformers.BertForPreTraining)
    v = verify(step.path, out)
    assert v.ok, v.line()


def test_our_initialised_encoder_exports_to_what_transformers_computes(tmp_path):
    """Weights from our own initialiser (not from Hugging Face): a step-0 checkpoint of a bert-tiny shape,
    exported, computes in transformers what our model computes."""
    from engine.checkpoint.dcp_io import Pieces, write_pieces
    from engine.checkpoint.files import ensure_checkpoint_dir, publish, temp_dir
    from engine.checkpoint.meta import FORMAT
    from engine.config import Config, config_from_dict
    from engine.model.transformer import build_model

    cfg = Config()
    cfg.model = dataclasses.replace(ModelConfig(preset=None), vocab_size=77, d_model=32, n_layers=2, n_heads=4,
                                    ffn_hidden=48, max_seq_len=24, norm="layernorm", norm_eps=1e-12,
                                    activation="gelu_exact", position="learned", bias=True, tie_embeddings=True,
                                    encoder=True, norm_position="post", embed_norm=True, binary_head=True,
                                    type_vocab_size=2)
    cfg.train.objective = "mlm+nsp"
    cfg = config_from_dict(cfg.to_dict(), world_size=1)
    model = build_model(cfg.model, seed=7)
    specs = model.shard_specs()
    pieces = Pieces()
    for n, p in model.named_parameters():  # canonical pieces: the vocabulary padding cut off
        for box, values in specs[n].canonical_pieces(p.detach(), 0):
            pieces.add(f"model/{specs[n].name}", specs[n].global_shape, box, values.clone())
    root = tmp_path / "ck"
    ensure_checkpoint_dir(root)
    tmp = temp_dir(root, 0, 1, "ab12cd34")
    tmp.mkdir(parents=True)
    write_pieces(tmp, pieces, {})
    meta = {"format": FORMAT, "iteration": 0, "consumed_samples": 0, "config": cfg.to_dict(),
            "has_optimizer": False, "layout": {"tp": 1, "pp": 1, "vpp": 1, "dp": 1}, "lineage": []}
    step = publish(tmp, root, 0, json.dumps(meta).encode())
    out = convert_to_hf(step.path, tmp_path / "hf", dtype="fp32", log=QUIET).out
    _loads_cleanly(out, transformers.BertForPreTraining)
    assert json.loads((out / "config.json").read_text())["hidden_act"] == "gelu"
    v = verify(step.path, out)
    assert v.ok and v.nsp is not None, v.line()


def _hub_layout(src: Path, dst: Path) -> Path:
    """The Hub's bert-base-uncased layout: config.json says BertForMaskedLM (with position_embedding_type), the
    files hold the pooler and the next-sentence head too, LayerNorm parameters are gamma/beta, the
    position_ids buffer and the decoder's tied copies are stored."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(architectures=["BertForMaskedLM"], position_embedding_type="absolute")
    (dst / "config.json").write_text(json.dumps(cfg))
    state = load_file(dst / "model.safetensors")
    old = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
           for k, v in state.items()}
    old["bert.embeddings.position_ids"] = torch.arange(cfg["max_position_embeddings"])[None]
    old["cls.predictions.decoder.weight"] = state["bert.embeddings.word_embeddings.weight"].clone()
    old["cls.predictions.decoder.bias"] = state["cls.predictions.bias"].clone()
    save_file(old, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_hub_layout_converts_with_both_heads_and_writes_back_its_config(hf_dirs, tmp_path):
    d = _hub_layout(hf_dirs["pretraining"], tmp_path / "hub")
    src = HFSource.open(d)
    assert src.model_config().binary_head  # nothing the files hold is dropped
    step = convert_from_hf(d, tmp_path / "ck", log=QUIET)
    v = verify(step.path, d)  # transformers reads gamma/beta itself
    assert v.ok and v.nsp is not None, v.line()
    out = convert_to_hf(step.path, tmp_path / "hf", dtype="fp32", log=QUIET).out
    assert json.loads((out / "config.json").read_text()) == json.loads((d / "config.json").read_text())
    a, b = _safetensors(hf_dirs["pretraining"]), _safetensors(out)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)  # today's names
    model, info = transformers.BertForPreTraining.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


# ----------------------------------------------------------------------------- negative controls

@pytest.mark.parametrize("broken", ["layernorms_swapped", "token_type_embedding_dropped", "pooler_transposed",
                                    "padding_ignored"])
def test_a_wrong_conversion_is_caught(hf_dirs, tmp_path, monkeypatch, broken):
    import engine.convert.from_hf as from_hf
    import engine.convert.verify as verify_mod
    from engine.convert import hf_names

    if broken == "layernorms_swapped":
        real_groups = from_hf.groups

        def swapped(arch, m):
            out = []
            for g in real_groups(arch, m):
                hf = g.hf.replace("layer.0.attention.output.LayerNorm", "SWAP") \
                    .replace("layer.0.output.LayerNorm", "layer.0.attention.output.LayerNorm") \
                    .replace("SWAP", "layer.0.output.LayerNorm")
                out.append(hf_names.Group(hf, g.ours, g.transpose, g.alias))
            return out
        monkeypatch.setattr(from_hf, "groups", swapped)
    elif broken in ("token_type_embedding_dropped", "pooler_transposed"):
        real = hf_names.hf_to_ours

        def damaged(g, t, shapes):
            out = real(g, t, shapes)
            if broken == "token_type_embedding_dropped" and "type_embed.weight" in out:
                out["type_embed.weight"] = torch.zeros_like(out["type_embed.weight"])
            if broken == "pooler_transposed" and "pooler.weight" in out:
                out["pooler.weight"] = out["pooler.weight"].t()
            return out
        monkeypatch.setattr(from_hf, "hf_to_ours", damaged)
    else:  # our side sees the pads as real tokens (attends to them)
        monkeypatch.setattr(verify_mod.EncoderInput, "doc_ids", property(lambda self: torch.zeros_like(self.ids)))
    step = convert_from_hf(hf_dirs["pretraining"], tmp_path / "ck", log=QUIET)
    v = verify(step.path, hf_dirs["pretraining"])
    assert not v.ok, v.line()
    if broken == "pooler_transposed":  # the MLM logits do not read the pooler: only the NSP comparison sees it
        assert v.max_abs <= MAX_ABS and v.nsp.max_abs > 10 * MAX_ABS, v.line()
    elif broken == "padding_ignored":
        # a random-init BERT attends nearly uniformly: 12 extra keys among 32 move the logits by ~6e-4, still
        # thousands of times the fp32 noise of the right input (~1e-7)
        assert v.max_abs > 3 * MAX_ABS, v.line()
    else:
        assert v.max_abs > 10 * MAX_ABS, v.line()  # far above the fp32 noise (~1e-7)


# ----------------------------------------------------------------------------- refusals

def _edit_config(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("change, match", [
    (dict(position_embedding_type="relative_key"), r"position_embedding_type='relative_key' is not supported"),
    (dict(position_embedding_type="relative_key_query"), r"position_embedding_type='relative_key_query'"),
    (dict(hidden_act="gelu_fast"), r"hidden_act='gelu_fast' is not supported: implemented are gelu, gelu_new"),
    (dict(hidden_act="silu"), r"hidden_act='silu'"),
    (dict(is_decoder=True), r"is_decoder=True is not supported"),
    (dict(architectures=["BertForSequenceClassification"]), r"'BertForSequenceClassification' is not supported"),
])
def test_unsupported_bert_configs_are_refused(hf_dirs, tmp_path, change, match):
    d = _edit_config(hf_dirs["pretraining"], tmp_path / "m", **change)
    with pytest.raises(ConversionError, match=match):
        convert_from_hf(d, tmp_path / "out", log=QUIET)
    assert not (tmp_path / "out").exists()  # checked before anything is written


def test_missing_and_unexpected_bert_tensors_are_named(hf_dirs, tmp_path):
    from safetensors.torch import load_file, save_file

    d = shutil.copytree(hf_dirs["masked"], tmp_path / "m")
    state = load_file(d / "model.safetensors")
    del state["bert.embeddings.token_type_embeddings.weight"]
    state["bert.pooler.dense.weight"] = torch.zeros(32, 32)  # a pooler without its head: would be dropped
    save_file(state, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConversionError, match=r"missing bert\.embeddings\.token_type_embeddings\.weight .*"
                                              r"bert\.pooler\.dense\.weight"):
        HFSource.open(d)


def test_an_encoder_that_is_not_bert_is_refused_on_export():
    bert = ModelConfig(preset=None, vocab_size=50, d_model=32, n_layers=1, n_heads=4, norm="layernorm",
                       activation="gelu_exact", position="learned", bias=True, tie_embeddings=True, encoder=True,
                       norm_position="post", embed_norm=True)
    assert arch_of_model(bert) == "bert"
    assert hf_config_from_model(bert, "float32")["architectures"] == ["BertForMaskedLM"]
    for change, field in ((dict(norm_position="pre"), "norm_position='pre'"), (dict(norm="rmsnorm"), "norm="),
                          (dict(activation="swiglu"), "activation='swiglu'"), (dict(embed_norm=False), "embed_norm"),
                          (dict(type_vocab_size=0), "type_vocab_size=0")):
        with pytest.raises(ConversionError, match=field):
            arch_of_model(dataclasses.replace(bert, **change))


# ----------------------------------------------------------------------------- tokenizer

def _bert_tokenizer_files(d: Path, words: list[str]) -> None:
    """A WordPiece tokenizer as BertTokenizerFast saves it: tokenizer.json, vocab.txt, tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words)}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok.decoder = decoders.WordPiece()
    tok.save(str(d / "tokenizer.json"))
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "BertTokenizer", "do_lower_case": True, "cls_token": "[CLS]", "sep_token": "[SEP]",
        "pad_token": "[PAD]", "mask_token": "[MASK]", "unk_token": "[UNK]"}))


def test_bert_tokenizer_files_are_carried_both_ways(hf_dirs, tmp_path):
    from engine.data.special_tokens import tokenizer_for_objective

    d = shutil.copytree(hf_dirs["pretraining"], tmp_path / "with_tok")
    _bert_tokenizer_files(d, ["the", "for", "state", "##ment", "is", "a"])
    step = convert_from_hf(d, tmp_path / "ck", log=QUIET)
    carried = step.path / "tokenizer"
    for f in ("tokenizer.json", "vocab.txt", "tokenizer_config.json"):
        assert (carried / f).read_bytes() == (d / f).read_bytes(), f
    meta = json.loads((step.path / "tessera.json").read_text())
    assert meta["config"]["data"]["tokenizer"] == f"hf:{carried.resolve()}"
    tok = tokenizer_for_objective(meta["config"]["data"]["tokenizer"], "mlm+nsp")  # as a run builds it
    assert tok.encode("The statement") == [5, 7, 8]
    assert tok.special_tokens.as_dict() == {"cls": 2, "sep": 3, "mask": 4, "pad": 0}
    assert meta["tokenizer"]["special_tokens"] == tok.special_tokens.as_dict()
    meta["hf"] = None  # a fresh config.json takes [PAD]'s id from the tokenizer
    (step.path / "tessera.json").write_text(json.dumps(meta))
    out = convert_to_hf(step.path, tmp_path / "hf", log=QUIET).out
    for f in ("tokenizer.json", "vocab.txt", "tokenizer_config.json"):
        assert (out / f).read_bytes() == (d / f).read_bytes(), f
    assert json.loads((out / "config.json").read_text())["pad_token_id"] == 0
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tok("The statement")["input_ids"] == [2, 5, 7, 8, 3]


def test_a_vocab_txt_without_tokenizer_json_is_reported(hf_dirs, tmp_path):
    d = shutil.copytree(hf_dirs["masked"], tmp_path / "old")
    (d / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nthe\n")
    said: list[str] = []
    step = convert_from_hf(d, tmp_path / "ck", log=said.append)
    assert not (step.path / "tokenizer").exists()
    assert any("vocab.txt but no tokenizer.json" in s for s in said), said


# ----------------------------------------------------------------------------- training from hf:DIR

def test_init_from_hf_bert_trains_and_exports(tmp_path):
    """checkpoint.init_from: hf:DIR for an encoder (mlm+nsp, byte tokenizer with its appended special tokens):
    the trained model exports to what transformers computes, with the source's config.json."""
    from engine.config import config_from_dict
    from engine.train.loop import train

    torch.manual_seed(9)
    d = _save(transformers.BertForPreTraining(transformers.BertConfig(vocab_size=261, **SMALL)), tmp_path / "src", 10)
    tree = {
        "model": {"preset": "bert-tiny", "vocab_size": 0},  # architecture fields come from config.json
        "data": {"tokenizer": "byte", "train": [{"path": "builtin:pydoc"}], "split": "90,10,0", "seq_len": 32,
                 "cache_dir": str(tmp_path / "cache")},
        "train": {"objective": "mlm+nsp", "micro_batch_size": 2, "global_batch_size": 2, "iters": 2,
                  "eval_interval": 0, "log_interval": 1, "out_dir": str(tmp_path / "run"), "device": "cpu",
                  "tensorboard": False, "progress": False},
        "optim": {"lr": 1e-3, "warmup_iters": 1},
        "precision": {"dtype": "fp32"},
        "checkpoint": {"dir": str(tmp_path / "ck"), "interval": 2, "init_from": f"hf:{d}"},
    }
    result = train(config_from_dict(tree))
    assert len(result.losses) == 2
    meta = json.loads((tmp_path / "ck" / "step-0000002" / "tessera.json").read_text())
    assert meta["config"]["model"]["encoder"] and meta["config"]["model"]["d_model"] == 32
    assert meta["hf"]["architecture"] == "BertForPreTraining"
    out = convert_to_hf(tmp_path / "ck", tmp_path / "hf", dtype="fp32", log=QUIET).out
    assert json.loads((out / "config.json").read_text()) == json.loads((d / "config.json").read_text())
    assert verify(tmp_path / "ck", out).ok
    inp = fixed_encoder_input(261, 40, 2)
    trained, _ = our_encoder_logits(tmp_path / "ck", inp)
    source, _ = hf_encoder_logits(d, inp, binary_head=True)
    assert (trained - source).abs().max() > 10 * MAX_ABS  # it did train


def test_cli_both_ways_with_verify(hf_dirs, tmp_path, capsys):
    from engine.convert.cli import main

    assert main(["from-hf", str(hf_dirs["pretraining"]), str(tmp_path / "ck"), "--tp", "2", "--verify"]) == 0
    # bf16 in shards: the check rounds our weights the same way (it measures the conversion, not the cast)
    assert main(["to-hf", str(tmp_path / "ck"), str(tmp_path / "hf"), "--dtype", "bf16", "--shard-size", "20KB",
                 "--verify"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("verify:")]
    assert len(lines) == 2 and all("NSP" in ln and ln.endswith(": ok") for ln in lines), lines
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["BertForPreTraining"] and config["dtype"] == "bfloat16"
    assert len(list((tmp_path / "hf").glob("model-*-of-*.safetensors"))) > 1
    _loads_cleanly(tmp_path / "hf", transformers.BertForPreTraining)


def test_a_converted_bert_with_its_tokenizer_trains_from_init_from(hf_dirs, tmp_path):
    """The tokenizer recorded by from-hf (with its special tokens, as an mlm run builds it) is the one a run
    with the carried data.tokenizer finds: init_from the converted checkpoint trains, another tokenizer is
    refused."""
    from engine.config import config_from_dict
    from engine.errors import TokenizerProblem
    from engine.train.loop import train

    d = shutil.copytree(hf_dirs["pretraining"], tmp_path / "with_tok")
    _bert_tokenizer_files(d, ["the", "for", "state", "##ment", "is", "a", "of", "to", "and", "in"])
    step = convert_from_hf(d, tmp_path / "ck", log=QUIET)
    spec = json.loads((step.path / "tessera.json").read_text())["config"]["data"]["tokenizer"]

    def tree(tokenizer: str, name: str) -> dict:
        return {"model": {"preset": "bert-tiny", "vocab_size": 0},  # the architecture comes from the checkpoint
                "data": {"tokenizer": tokenizer, "train": [{"path": "builtin:pydoc"}], "split": "90,10,0",
                         "seq_len": 32, "cache_dir": str(tmp_path / "cache")},
                "train": {"objective": "mlm+nsp", "micro_batch_size": 2, "global_batch_size": 2, "iters": 1,
                          "eval_interval": 0, "out_dir": str(tmp_path / name), "device": "cpu",
                          "tensorboard": False, "progress": False},
                "precision": {"dtype": "fp32"},
                "checkpoint": {"init_from": str(step.path)}}

    result = train(config_from_dict(tree(spec, "run")))
    assert len(result.losses) == 1 and result.losses[0] > 0
    with pytest.raises(TokenizerProblem, match="is not this run's data.tokenizer"):
        train(config_from_dict(tree("byte", "other")))
