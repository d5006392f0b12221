"""`tessera bench convert` at a tiny size, end to end, and the pieces it trusts.

- the random Hugging Face directory it writes by hand is a real Llama: transformers loads it with no missing,
  unexpected or mismatched key, and safetensors reads back exactly the tensors of the index;
- its round-trip comparison catches a single flipped bit (else "bit-identical" would prove nothing);
- the whole benchmark (write, `convert from-hf` at tp2 x pp2, `convert to-hf`, compare) runs in seconds,
  writes the JSON fields docs/conversion.md quotes, finds the round trip bit-identical, and removes its files.
"""
from __future__ import annotations

import json
import shutil

import pytest

from engine.bench import convert as bench


def test_random_llama_is_a_transformers_llama(tmp_path):
    transformers = pytest.importorskip("transformers")
    hf = bench.write_random_llama(tmp_path / "hf", "tiny", bench.parse_size("64KiB"))
    assert len(hf.files) > 1 and (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    assert hf.model_bytes == 2 * hf.params and hf.largest_tensor == "model.embed_tokens.weight"
    model, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert sum(p.numel() for p in model.parameters()) == hf.params  # tied: the head is the embedding
    rope = getattr(model.config, "rope_parameters", None) or model.config.rope_scaling
    assert rope["rope_type"] == "llama3" and rope["factor"] == 32.0


def test_roundtrip_check_catches_one_flipped_bit(tmp_path):
    hf = bench.write_random_llama(tmp_path / "a", "tiny", bench.parse_size("64KiB"))
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    assert bench.compare_hf_dirs(tmp_path / "a", tmp_path / "b")["bit_identical"]
    last = tmp_path / "b" / hf.files[-1].name  # its last bytes are the last tensor's (model.norm.weight)
    data = bytearray(last.read_bytes())
    data[-1] ^= 0x01
    last.write_bytes(bytes(data))
    res = bench.compare_hf_dirs(tmp_path / "a", tmp_path / "b")
    assert not res["bit_identical"] and [d.split(":")[0] for d in res["differ"]] == ["model.norm.weight"]


def test_bench_convert_tiny_end_to_end(tmp_path, capsys):
    out, work = tmp_path / "res.json", tmp_path / "work"
    rc = bench.main(["--size", "tiny", "--json", str(out), "--work-dir", str(work), "--quiet"])
    res = json.loads(out.read_text())
    assert rc == 0, res["roundtrip"]
    assert res["command"].startswith("tessera bench convert --size tiny")
    assert res["bit_identical"] is True
    rt = res["roundtrip"]
    assert rt["missing"] == [] and rt["unexpected"] == [] and rt["differ"] == [] and rt["generation_config"]
    assert rt["tensors"] == 2 + 9 * bench.SIZES["tiny"]["num_hidden_layers"]  # embed, norm, 9 per layer (tied)
    assert res["layout"] == {"tp": 2, "pp": 2} and res["shards"] > 1 and res["hf_out_shards"] > 1
    assert res["model_bytes"] == 2 * res["params"] > res["largest_shard_bytes"] >= res["largest_tensor_bytes"] > 0
    assert res["checkpoint_bytes"] > 0 and res["floor_rss_bytes"] > 0
    assert [s["step"] for s in res["steps"]] == ["from-hf", "to-hf"]
    for s in res["steps"]:
        assert s["returncode"] == 0 and s["seconds"] > 0
        assert s["peak_rss_bytes"] > 0 and s["above_floor_bytes"] == s["peak_rss_bytes"] - res["floor_rss_bytes"]
        assert s["command"].startswith(f"tessera convert {s['step']} ")
    assert "bit-identical" in capsys.readouterr().out
    assert list(work.iterdir()) == [], "the benchmark left files behind"
