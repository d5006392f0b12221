"""Model FLOPs per token against hand-computed values, the docs' formula, and the peak table / device matching."""

import re
from pathlib import Path

import pytest
import torch

from engine.config import config_from_dict
from engine.train import flops
from engine.train.flops import PEAK_TFLOPS, device_row, peak_tflops, training_flops_per_token

DOCS = Path(__file__).resolve().parents[1] / "docs" / "metrics.md"


def _model(preset, **fields):
    return config_from_dict({"model": {"preset": preset, **fields}}).model


# ---------------------------------------------------------------- FLOPs per token, worked out by hand

# GPT-2 124M: D=768, L=12, H=12 (hd=64, no GQA), F=4*768=3072 (GELU: 2 matrices), V=50257 padded to the
# next multiple of 128 (vocab_pad_multiple): ceil(50257/128)=393 -> 393*128 = 50304. S=1024.
GPT2_ATTN = 768 * 768 + 2 * 768 * 768 + 768 * 768           # q, k, v, o = 2,359,296
GPT2_MLP = 2 * 768 * 3072                                    # 4,718,592
GPT2_N = 12 * (GPT2_ATTN + GPT2_MLP) + 768 * 50304           # 84,934,656 + 38,633,472 = 123,568,128
GPT2_FLOPS = 6 * GPT2_N + 12 * 12 * 768 * 1024               # 741,408,768 + 113,246,208

# Llama-3-8B: D=4096, L=32, H=32 (hd=128), 8 KV heads (k, v: 4096 -> 8*128=1024), F=14336 (SwiGLU: 3
# matrices), V=128256 = 1002*128 (already a multiple of 128, no padding), S=8192.
LLAMA_ATTN = 4096 * 4096 + 2 * 4096 * 1024 + 4096 * 4096    # 41,943,040
LLAMA_MLP = 3 * 4096 * 14336                                 # 176,160,768
LLAMA_N = 32 * (LLAMA_ATTN + LLAMA_MLP) + 4096 * 128256     # 6,979,321,856 + 525,336,576 = 7,504,658,432
LLAMA_FLOPS = 6 * LLAMA_N + 12 * 32 * 4096 * 8192            # 45,027,950,592 + 12,884,901,888


def test_hand_arithmetic_is_what_it_says():
    # the literals in the comments above, so a typo in the hand arithmetic cannot hide
    assert (GPT2_N, GPT2_FLOPS) == (123_568_128, 854_654_976)
    assert (LLAMA_N, LLAMA_FLOPS) == (7_504_658_432, 57_912_852_480)


@pytest.mark.parametrize("preset,seq,expected", [("gpt2", 1024, GPT2_FLOPS), ("llama3-8b", 8192, LLAMA_FLOPS)])
def test_flops_per_token_by_hand(preset, seq, expected):
    assert training_flops_per_token(_model(preset), seq) == expected


def test_flops_padding_and_seq_len():
    # 6 FLOPs per padded head column: vocab 50257 -> 50304 (47 extra columns of 768 weights)
    m = _model("gpt2")
    assert training_flops_per_token(_model("gpt2", vocab_size=50304), 1024) == training_flops_per_token(m, 1024)
    assert (training_flops_per_token(_model("gpt2", vocab_size=50305), 1024)
            - training_flops_per_token(m, 1024)) == 6 * 768 * 128   # one more 128-column block
    # attention term is linear in S: 12 * L * H*hd per extra token of context
    assert training_flops_per_token(m, 2048) - training_flops_per_token(m, 1024) == 12 * 12 * 768 * 1024


def test_docs_state_the_same_formula():
    text = DOCS.read_text()
    line = next(ln for ln in text.splitlines() if ln.strip().startswith("FLOPs/token ="))
    attn = next(s for s in re.findall(r"`([^`]*)`", text) if "Hkv" in s)
    head = next(s for s in re.findall(r"`([^`]*)`", text) if "V_padded" in s)
    assert "`3*D*F` for SwiGLU" in text and "`2*D*F`" in text
    for (D, L, H, hd, Hkv, F, n_mat, V, S, expected) in [
            (768, 12, 12, 64, 12, 3072, 2, 50304, 1024, GPT2_FLOPS),
            (4096, 32, 32, 128, 8, 14336, 3, 128256, 8192, LLAMA_FLOPS)]:
        env = dict(D=D, H=H, hd=hd, Hkv=Hkv, V_padded=V)
        n_matmul = L * (eval(attn, {}, env) + n_mat * D * F) + eval(head, {}, env)
        assert eval(line.split("=", 1)[1], {}, dict(N_matmul=n_matmul, L=L, H=H, hd=hd, S=S)) == expected


# ---------------------------------------------------------------- peak table and device-name matching

def _fake_cuda(monkeypatch, name):
    seen = []

    def get_device_name(device=None):
        seen.append(device)
        return name

    monkeypatch.setattr(torch.cuda, "get_device_name", get_device_name)
    return torch.device("cuda", 0), seen  # a device descriptor needs no GPU


@pytest.mark.parametrize("name,bf16", [
    ("NVIDIA H100 80GB HBM3", 989.4),       # SXM5
    ("NVIDIA H100 PCIe", 756.5),
    ("NVIDIA H100 NVL", 835.5),             # 1,671 with sparsity: not the SXM row
    ("NVIDIA H200", 989.4),                 # H200 SXM: H100 SXM compute
    ("NVIDIA H200 NVL", 835.5),
    ("NVIDIA GH200 480GB", 989.4),          # Grace Hopper: an H100/H200 SXM-class GPU
    ("NVIDIA GH200 144G HBM3e", 989.4),
    ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA A100-SXM4-40GB", 312.0),
    ("NVIDIA A100 80GB PCIe", 312.0),       # PCIe and SXM: the same tensor-core peak
    ("NVIDIA A100-PCIE-40GB", 312.0),
    ("NVIDIA B200", 2250.0),
    ("NVIDIA GB200", 2500.0),               # not the HGX B200 row
])
def test_peak_by_device_name(monkeypatch, name, bf16):
    dev, seen = _fake_cuda(monkeypatch, name)
    assert peak_tflops(dev, "bf16") == bf16 and peak_tflops(dev, "fp16") == bf16
    assert seen and all(d == dev for d in seen)  # asked about this device


@pytest.mark.parametrize("name,row", [
    ("NVIDIA H100 80GB HBM3", "H100 SXM"), ("NVIDIA H100 PCIe", "H100 PCIe"), ("NVIDIA H100 NVL", "H100 NVL"),
    ("NVIDIA H200", "H200 SXM"), ("NVIDIA H200 NVL", "H200 NVL"), ("NVIDIA GH200 480GB", "GH200"),
    ("NVIDIA A100-SXM4-80GB", "A100"), ("NVIDIA A100 80GB PCIe", "A100"), ("NVIDIA B200", "B200"),
    ("NVIDIA GB200", "GB200"),
    ("NVIDIA GeForce RTX 4090", None), ("NVIDIA L40S", None), ("Tesla V100-SXM2-16GB", None),
    ("AMD Instinct MI300X", None), ("NVIDIA H20", None), ("NVIDIA H1000", None),
])
def test_device_row(name, row):
    assert device_row(name) == row


def test_unknown_gpu_and_cpu_have_no_peak(monkeypatch):
    dev, _ = _fake_cuda(monkeypatch, "NVIDIA GeForce RTX 4090")
    assert peak_tflops(dev, "bf16") is None
    # a CPU run is n/a even where a known GPU sits in the machine
    _, seen = _fake_cuda(monkeypatch, "NVIDIA H100 80GB HBM3")
    assert peak_tflops(torch.device("cpu"), "bf16") is None and peak_tflops(torch.device("cpu"), "fp32") is None
    assert not seen  # the CPU device is never looked up as a GPU
    dev, _ = _fake_cuda(monkeypatch, "NVIDIA A100-SXM4-80GB")
    assert peak_tflops(dev, "fp8") is None      # no fp8 on Ampere
    assert peak_tflops(dev, "fp32") == 19.5


def test_peak_rows_from_datasheets():
    # dense = datasheet figure with sparsity / 2 (bf16 1,979 / 1,513 / 1,671; B200 4.5 PF; GB200 5 PF)
    assert PEAK_TFLOPS["H100 SXM"] == PEAK_TFLOPS["H200 SXM"] == PEAK_TFLOPS["GH200"]
    assert PEAK_TFLOPS["H100 NVL"] == PEAK_TFLOPS["H200 NVL"]
    for row, bf16_sparse in [("H100 SXM", 1979), ("H100 PCIe", 1513), ("H100 NVL", 1671), ("B200", 4500),
                             ("GB200", 5000), ("A100", 624)]:
        assert abs(PEAK_TFLOPS[row]["bf16"] - bf16_sparse / 2) < 0.6, row
        assert PEAK_TFLOPS[row]["fp16"] == PEAK_TFLOPS[row]["bf16"]
        if "fp8" in PEAK_TFLOPS[row]:
            assert abs(PEAK_TFLOPS[row]["fp8"] - 2 * PEAK_TFLOPS[row]["bf16"]) < 1.0, row
    assert {row for _, row in flops.DEVICE_ROWS} == set(PEAK_TFLOPS)  # every row reachable, none dangling


def test_docs_peak_table_matches_code():
    lines = DOCS.read_text().split("## Peak table", 1)[1].splitlines()
    rows = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in lines if ln.startswith("| ")]
    header, body = rows[0], rows[1:]
    assert header == ["row", "name matches", "e.g.", "bf16 / fp16", "fp8", "fp32"]
    assert [r[0] for r in body] == [row for _, row in flops.DEVICE_ROWS]  # same rows, same matching order
    num = lambda s: None if s == "-" else float(s)  # noqa: E731
    for row, _, examples, bf16, fp8, fp32 in body:
        t = PEAK_TFLOPS[row]
        assert (num(bf16), num(fp8), num(fp32)) == (t["bf16"], t.get("fp8"), t["fp32"]), row
        for name in examples.split(", "):
            assert device_row(name) == row, name
