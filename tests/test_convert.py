"""Hugging Face conversion, checked against transformers itself (CPU, no network).

Tiny random models are built locally with transformers and saved with save_pretrained:
- GPT-2 (Conv1D weights, fused c_attn, learned positions, tied head);
- Llama with GQA at odd sizes (6 heads over 3 KV heads, 5 layers, untied, rope_theta 5e4);
- Llama-3 style with llama3 rope scaling (factor 32 over an original context of 16, so that most
  frequencies of the 32-token test input are scaled) and tied embeddings;
- Mistral without a sliding window, Qwen2 with its q/k/v bias and tied embeddings.

HF -> ours: our logits equal transformers' on the same input (fp32: max |diff| < 1e-4, KL < 1e-9).
HF -> ours cut at tp2 x pp2 (tp3 x pp2 for the 3-KV-head Llama) -> HF: bit-identical tensors, the same
names and an identical config.json (nothing is documented as changing), loaded by transformers without a
missing or unexpected key. Negative controls: a q/k permutation applied (the interleaved layout of Meta's
files), gate and up swapped, or the llama3 scaling dropped, and these same comparisons fail.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from engine.convert.from_hf import HFSource, convert_from_hf  # noqa: E402
from engine.convert.hf_names import IGNORED  # noqa: E402
from engine.convert.to_hf import convert_to_hf  # noqa: E402
from engine.convert.verify import MAX_ABS, MAX_KL, compare_logits, fixed_input, hf_logits, our_logits, verify  # noqa: E402
from engine.errors import ConversionError, RunDirError, TokenizerProblem  # noqa: E402

QUIET = lambda s: None  # noqa: E731


def _llama_cfg(**kw):
    base = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=5, num_attention_heads=6,
                num_key_value_heads=3, vocab_size=211, rope_theta=5e4, max_position_embeddings=64,
                tie_word_embeddings=False)
    base.update(kw)
    return transformers.LlamaConfig(**base)


MODELS = {
    "gpt2": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_embd=48, n_layer=2, n_head=4, vocab_size=199, n_positions=64, bos_token_id=0, eos_token_id=0)),
    "llama": lambda: transformers.LlamaForCausalLM(_llama_cfg()),
    "llama3": lambda: transformers.LlamaForCausalLM(_llama_cfg(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=300, rope_theta=5e5, max_position_embeddings=128, tie_word_embeddings=True,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 16})),
    "mistral": lambda: transformers.MistralForCausalLM(transformers.MistralConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=256, max_position_embeddings=64, sliding_window=None)),
    "qwen2": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=256, max_position_embeddings=64, tie_word_embeddings=True)),
}
LAYOUT = {"gpt2": (2, 2, None), "llama": (3, 2, [3, 2]), "llama3": (2, 2, None), "mistral": (2, 2, None),
          "qwen2": (2, 2, None)}


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for i, (name, make) in enumerate(MODELS.items()):
        torch.manual_seed(100 + i)
        model = make()
        with torch.no_grad():  # non-trivial norms and biases, so that a misplaced one shows in the logits
            for n, p in model.named_parameters():
                if n.endswith("bias") or "norm" in n or "ln_" in n:
                    p.add_(0.1 * torch.randn_like(p))
        model.save_pretrained(root / name)
        out[name] = root / name
    return out


def _safetensors(d: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("name", list(MODELS))
def test_from_hf_logits_equal_transformers(hf_dirs, tmp_path, name):
    step = convert_from_hf(hf_dirs[name], tmp_path / "ck", log=QUIET)
    v = verify(step.path, hf_dirs[name])
    assert v.max_abs < MAX_ABS and v.kl < MAX_KL, v.line()
    assert v.ok


@pytest.mark.parametrize("name", list(MODELS))
def test_round_trip_at_a_parallel_layout_is_bit_identical(hf_dirs, tmp_path, name):
    tp, pp, layout = LAYOUT[name]
    step = convert_from_hf(hf_dirs[name], tmp_path / "ck", tp=tp, pp=pp, pp_layout=layout, log=QUIET)
    meta = json.loads((step.path / "tessera.json").read_text())
    assert (meta["layout"]["tp"], meta["layout"]["pp"]) == (tp, pp) and meta["has_optimizer"] is False
    out = convert_to_hf(step.path, tmp_path / "hf", dtype="fp32", log=QUIET).out
    a, b = _safetensors(hf_dirs[name]), _safetensors(out)
    a = {k: v for k, v in a.items() if not IGNORED.search(k)}  # GPT-2's causal-mask buffers, if any
    assert sorted(a) == sorted(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((out / "config.json").read_text()) == json.loads((hf_dirs[name] / "config.json").read_text())
    model, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info.get("mismatched_keys")


def test_sharded_files_both_ways(hf_dirs, tmp_path):
    """Input: shards with their index (save_pretrained's max_shard_size); output: shards of --shard-size."""
    torch.manual_seed(5)
    sharded = tmp_path / "sharded"
    transformers.LlamaForCausalLM(_llama_cfg()).save_pretrained(sharded, max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    step = convert_from_hf(sharded, tmp_path / "ck", log=QUIET)
    done = convert_to_hf(step.path, tmp_path / "out", dtype="bf16", shard_size="60KB", log=QUIET)
    assert len(done.files) > 2 and (done.out / "model.safetensors.index.json").is_file()
    index = json.loads((done.out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(done.files)
    model, info = transformers.AutoModelForCausalLM.from_pretrained(done.out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert next(model.parameters()).dtype == torch.bfloat16  # config.json says bfloat16
    assert verify(step.path, done.out, round_to=torch.bfloat16).ok  # the cast is applied to ours too


# ----------------------------------------------------------------------------- negative controls

def _interleave(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rotate-half rows -> Meta's interleaved RoPE rows, per head (the permutation conversions get wrong)."""
    out, hd = w.shape[0], w.shape[0] // heads
    return w.view(heads, 2, hd // 2, -1).transpose(1, 2).reshape(out, -1)


@pytest.mark.parametrize("broken", ["qk_permutation", "gate_up_swapped", "llama3_scaling_dropped"])
def test_a_wrong_conversion_is_caught(hf_dirs, tmp_path, monkeypatch, broken):
    import engine.convert.from_hf as from_hf
    from engine.convert import hf_names

    name = "llama3" if broken == "llama3_scaling_dropped" else "llama"
    if broken == "qk_permutation":
        real = hf_names.hf_to_ours

        def permuted(g, t, shapes):
            out = real(g, t, shapes)
            for n in out:
                if n.endswith(("q_proj.weight", "k_proj.weight")):
                    out[n] = _interleave(out[n], out[n].shape[0] // 8)  # head_dim 8
            return out
        monkeypatch.setattr(from_hf, "hf_to_ours", permuted)
    elif broken == "gate_up_swapped":
        real_groups = from_hf.groups

        def swapped(arch, m):
            return [hf_names.Group(g.hf.replace("gate_proj", "UP").replace("up_proj", "gate_proj").replace("UP", "up_proj"),
                                   g.ours, g.transpose) for g in real_groups(arch, m)]
        monkeypatch.setattr(from_hf, "groups", swapped)
    else:
        real_fields = from_hf.model_fields_from_hf

        def dropped(cfg, where="config.json"):
            arch, fields = real_fields(cfg, where)
            return arch, {**fields, "rope_scaling": "none"}
        monkeypatch.setattr(from_hf, "model_fields_from_hf", dropped)
    step = convert_from_hf(hf_dirs[name], tmp_path / "ck", log=QUIET)
    v = verify(step.path, hf_dirs[name])
    assert not v.ok and v.max_abs > 10 * MAX_ABS, v.line()  # far above the fp32 noise (~1e-7)


def test_compare_logits_measures_what_it_says():
    a = torch.randn(2, 5, 11)
    same = compare_logits(a, a.clone())
    assert same.ok and same.max_abs == 0 and abs(same.kl) < 1e-15
    b = a.clone()
    b[1, 3, 7] += 1e-3
    off = compare_logits(a, b)
    assert not off.ok and abs(off.max_abs - 1e-3) < 1e-6 and off.kl > 0


# ----------------------------------------------------------------------------- clear errors

def _edit_config(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_unsupported_architectures_and_fields_are_refused(hf_dirs, tmp_path):
    cases = {
        "MixtralForCausalLM": dict(architectures=["MixtralForCausalLM"], model_type="mixtral"),
        "sliding_window": dict(sliding_window=16),  # shorter than max_position_embeddings=64
        "hidden_act": dict(hidden_act="gelu"),
        "rope_type": dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}),
    }
    for i, (field, change) in enumerate(cases.items()):
        d = _edit_config(hf_dirs["mistral"], tmp_path / f"m{i}", **change)
        with pytest.raises(ConversionError, match=field):
            convert_from_hf(d, tmp_path / f"out{i}", log=QUIET)
        assert not (tmp_path / f"out{i}").exists()  # checked before anything is written


def test_config_weight_shape_mismatch_names_the_tensor(hf_dirs, tmp_path):
    d = _edit_config(hf_dirs["llama"], tmp_path / "m", intermediate_size=128)
    with pytest.raises(ConversionError, match=r"mlp\.(gate|up|down)_proj\.weight has shape"):
        HFSource.open(d)


def test_missing_shard_is_named(tmp_path):
    torch.manual_seed(6)
    d = tmp_path / "sharded"
    transformers.LlamaForCausalLM(_llama_cfg()).save_pretrained(d, max_shard_size="100KB")
    victim = sorted(d.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(ConversionError, match=f"shard '{victim.name}' named by model.safetensors.index.json is missing"):
        convert_from_hf(d, tmp_path / "out", log=QUIET)


def test_output_directories_are_protected(hf_dirs, tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ConversionError, match="expected a new or empty directory"):
        convert_from_hf(hf_dirs["qwen2"], tmp_path / "busy", log=QUIET)
    step = convert_from_hf(hf_dirs["qwen2"], tmp_path / "ck", log=QUIET)
    with pytest.raises(RunDirError, match="notes.txt"):
        convert_to_hf(step.path, tmp_path / "busy", log=QUIET)
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"
    convert_to_hf(step.path, tmp_path / "hf", log=QUIET)
    convert_to_hf(step.path, tmp_path / "hf", dtype="fp32", log=QUIET)  # an earlier export: replaced


# ----------------------------------------------------------------------------- tokenizers

def _tokenizer_files(d: Path, words: list[str]) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["<unk>", "</s>"] + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "tokenizer_class":
                                                         "PreTrainedTokenizerFast"}))


def test_tokenizer_is_carried_and_a_mismatch_is_an_error(hf_dirs, tmp_path):
    from engine.data.tokenizers import build_tokenizer
    from engine.train.checkpointing import check_tokenizer

    d = tmp_path / "with_tok"
    shutil.copytree(hf_dirs["qwen2"], d)
    _tokenizer_files(d, ["the", "for", "statement"])
    step = convert_from_hf(d, tmp_path / "ck", log=QUIET)
    meta = json.loads((step.path / "tessera.json").read_text())
    carried = step.path / "tokenizer"
    assert (carried / "tokenizer.json").read_bytes() == (d / "tokenizer.json").read_bytes()
    assert meta["config"]["data"]["tokenizer"] == f"hf:{carried.resolve()}"
    tok = build_tokenizer(meta["config"]["data"]["tokenizer"])  # the recorded spec works as it is
    assert tok.eod_id == 1 and tok.encode("the for") == [2, 3]
    check_tokenizer(meta["tokenizer"], tok, "checkpoint")  # same tokenizer: no error
    with pytest.raises(TokenizerProblem, match="is not this run's data.tokenizer"):
        check_tokenizer(meta["tokenizer"], build_tokenizer("byte"), "checkpoint")
    other = tmp_path / "other"
    other.mkdir()
    _tokenizer_files(other, ["the", "statement", "for"])  # same words, other ids
    with pytest.raises(TokenizerProblem, match="fingerprint"):
        check_tokenizer(meta["tokenizer"], build_tokenizer(f"hf:{other}"), "checkpoint")
    out = convert_to_hf(step.path, tmp_path / "hf", log=QUIET).out
    assert (out / "tokenizer.json").read_bytes() == (d / "tokenizer.json").read_bytes()
    assert (out / "tokenizer_config.json").is_file()


# ----------------------------------------------------------------------------- training from hf:DIR

def test_init_from_hf_dir_trains_and_exports(hf_dirs, tmp_path):
    """checkpoint.init_from: hf:DIR takes the architecture from config.json; the first loss is the HF
    model's own loss on that batch, and the trained model exports to what transformers computes."""
    from engine.config import config_from_dict
    from engine.train.loop import train

    tree = {
        "model": {"preset": "tiny", "vocab_pad_multiple": 8},  # architecture fields come from config.json
        "data": {"tokenizer": "byte", "train": [{"path": "builtin:pydoc"}], "split": "90,10,0", "seq_len": 32,
                 "cache_dir": str(tmp_path / "cache")},
        "train": {"micro_batch_size": 2, "global_batch_size": 4, "iters": 3, "eval_interval": 0, "log_interval": 1,
                  "out_dir": str(tmp_path / "run"), "device": "cpu", "tensorboard": False, "progress": False},
        "optim": {"lr": 1e-3, "warmup_iters": 1},
        "checkpoint": {"dir": str(tmp_path / "ck"), "interval": 3, "init_from": f"hf:{hf_dirs['llama3']}"},
    }
    result = train(config_from_dict(tree))
    assert len(result.losses) == 3
    meta = json.loads((tmp_path / "ck" / "step-0000003" / "tessera.json").read_text())
    assert meta["config"]["model"]["rope_scaling"] == "llama3" and meta["config"]["model"]["d_model"] == 64
    assert meta["hf"]["architecture"] == "LlamaForCausalLM"
    out = convert_to_hf(tmp_path / "ck", tmp_path / "hf", dtype="fp32", log=QUIET).out
    assert json.loads((out / "config.json").read_text()) == json.loads((hf_dirs["llama3"] / "config.json").read_text())
    ids = fixed_input(300, 128)
    trained = hf_logits(out, ids)
    assert compare_logits(trained, our_logits(tmp_path / "ck", ids)).ok
    assert not compare_logits(trained, hf_logits(hf_dirs["llama3"], ids)).ok  # it did train


@pytest.mark.parametrize("name", list(MODELS))
def test_export_without_a_hugging_face_source_writes_a_fresh_config(hf_dirs, tmp_path, name):
    """A model trained from scratch has no config.json to carry: the fresh one (transformers 4.x spelling,
    which 5.x reads too) must describe it exactly -- architecture, sizes, eps, RoPE and its scaling, biases,
    tying."""
    step = convert_from_hf(hf_dirs[name], tmp_path / "ck", log=QUIET)
    meta_file = step.path / "tessera.json"
    meta = json.loads(meta_file.read_text())
    meta["hf"] = None
    meta_file.write_text(json.dumps(meta))
    out = convert_to_hf(step.path, tmp_path / "hf", dtype="fp32", log=QUIET).out
    fresh = json.loads((out / "config.json").read_text())
    source = json.loads((hf_dirs[name] / "config.json").read_text())["architectures"]
    # without its window Mistral computes what Llama does: a model with no recorded source is written as Llama
    assert fresh["architectures"] == (["LlamaForCausalLM"] if name == "mistral" else source)
    model, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert verify(step.path, out).ok


def test_a_converted_checkpoint_resumes_with_checkpoint_load(hf_dirs, tmp_path):
    """checkpoint.load of a from-hf checkpoint (weights only, no optimizer state) starts at step 0 from it."""
    from engine.config import config_from_dict
    from engine.train.loop import train

    step = convert_from_hf(hf_dirs["llama3"], tmp_path / "ck", log=QUIET)  # vocabulary 300 > the byte tokenizer's
    meta = json.loads((step.path / "tessera.json").read_text())
    tree = meta["config"]
    tree["data"].update(tokenizer="byte", train=[{"path": "builtin:pydoc"}], split="90,10,0", seq_len=32,
                        cache_dir=str(tmp_path / "cache"))
    tree["parallel"].update(tp=1, pp=1)
    tree["train"].update(micro_batch_size=2, global_batch_size=2, iters=1, eval_interval=0, out_dir=str(tmp_path / "run"),
                         device="cpu", tensorboard=False, progress=False, sample_prompt=None)
    tree["checkpoint"].update(dir=str(tmp_path / "ck2"), load=str(step.path), interval=0)
    result = train(config_from_dict(tree))
    assert len(result.losses) == 1 and math.isfinite(result.losses[0])
    saved = json.loads((tmp_path / "ck2" / "step-0000001" / "tessera.json").read_text())
    assert saved["iteration"] == 1 and saved["lineage"][-1] == {"kind": "resume", "path": str(step.path),
                                                                "iteration": 0}
    assert saved["lineage"][0]["kind"] == "from_hf" and saved["hf"]["architecture"] == "LlamaForCausalLM"
    # one step of lr 3e-4 from the converted weights: still close to, but not, the Hugging Face model
    v = verify(tmp_path / "ck2", hf_dirs["llama3"])
    assert not v.ok and v.max_abs < 1.0


def test_init_from_hf_refuses_another_tokenizer_before_training(hf_dirs, tmp_path):
    from engine.config import config_from_dict
    from engine.train.loop import train

    d = tmp_path / "with_tok"
    shutil.copytree(hf_dirs["qwen2"], d)
    _tokenizer_files(d, ["the", "for", "statement"])
    tree = {"data": {"tokenizer": "byte", "seq_len": 32, "cache_dir": str(tmp_path / "cache")},
            "train": {"iters": 1, "out_dir": str(tmp_path / "run"), "device": "cpu", "tensorboard": False,
                      "progress": False},
            "checkpoint": {"init_from": f"hf:{d}"}}
    with pytest.raises(TokenizerProblem, match="is not this run's data.tokenizer"):
        train(config_from_dict(tree))
    assert not (tmp_path / "run").exists()  # refused before anything was written
