"""The device figures the performance model runs on: one named record per accelerator, each number with its
source. Rates are *sustained* (what a large kernel reaches), not datasheet peaks, except `peak_tflops`, which
only serves the MFU column and comes from engine/train/flops.py's table.

Sources:
  [K] docs/kernels.md, "Measured on an H100 (2026-11-23)": NVIDIA H100 80GB HBM3, torch 2.11 + cu130 --
      bf16 matmul 8192^3: 693 TFLOP/s; device-to-device copy: 3001 GB/s; causal attention fwd+bwd at
      B=32, H=16, N=4096, D=128 (executed FLOPs): SDPA flash 289, Tessera's Triton 401, SDPA cuDNN 495
      TFLOP/s.
  [D] NVIDIA datasheets: H100 SXM (HBM3 3.35 TB/s, NVLink 4 900 GB/s total = 450 GB/s each way), H200 SXM
      (141 GB HBM3e 4.8 TB/s, NVLink 900 GB/s), A100 SXM 80GB (HBM2e 2.04 TB/s, NVLink 3 600 GB/s total,
      bf16 312 TFLOP/s dense); DGX H100/H200: 8 GPUs per node, one 400 Gb/s (50 GB/s) NDR InfiniBand port per
      GPU; DGX A100: one 200 Gb/s (25 GB/s) HDR port per GPU.
  [S] scaled from [K] by the datasheet ratio where a device was not measured: same GH100 compute for the
      H200 (matmul and attention as the H100), HBM bandwidth x 4.8/3.35; A100: matmul and attention at the
      H100's measured fraction of peak (0.70 of 312), HBM 3001/3350 of 2039 GB/s.
  [C] this project's 2-core CPU test machine (torch 2.13, 2 threads): fp32 1024^3 matmul ~0.03-0.05 TFLOP/s,
      copy ~7 GB/s, gloo over loopback ~1 GB/s; order-of-magnitude figures for planning CPU runs.
Link bandwidths are per GPU and per direction, used as the bus bandwidth of ring collectives.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.errors import ConfigError
from engine.train.flops import PEAK_TFLOPS

__all__ = ["Device", "DEVICES", "get_device"]


@dataclass(frozen=True)
class Device:
    name: str
    memory_gib: float  # device memory as torch reports it (an "80GB" H100: 79.19 GiB)
    matmul_tflops: float  # sustained dense GEMM rate in the 16-bit compute dtypes (bf16/fp16)
    matmul_tflops_fp32: float  # sustained fp32 GEMM rate (no TF32: Tessera does not enable it)
    attention_tflops: dict[str, float]  # causal attention fwd+bwd, executed FLOPs, by kernel
    hbm_gbps: float  # sustained copy bandwidth (read + write bytes per second)
    intra_node_gbps: float  # per GPU, per direction, within a node (NVLink)
    inter_node_gbps: float  # per GPU, per direction, between nodes (network)
    gpus_per_node: int
    latency_us: float = 10.0  # per collective / point-to-point message
    peak_row: str = ""  # row of engine.train.flops.PEAK_TFLOPS (MFU); "" = none (CPU)
    sources: str = ""
    notes: tuple[str, ...] = field(default_factory=tuple)

    def peak_tflops(self, dtype: str) -> float | None:
        row = PEAK_TFLOPS.get(self.peak_row)
        return None if row is None else row.get(dtype)


_H100_ATTN = {"sdpa": 289.0, "triton": 401.0, "cudnn": 495.0}

DEVICES: dict[str, Device] = {
    "h100": Device("H100 SXM", 79.19, 693.0, 51.0 * 0.9, _H100_ATTN, 3001.0, 450.0, 50.0, 8, 10.0, "H100 SXM",
                   "[K] matmul, attention, copy; [D] NVLink, InfiniBand; fp32: 0.9 of the 67 TFLOP/s fp32 peak "
                   "(assumed)"),
    "h200": Device("H200 SXM", 139.8, 693.0, 51.0 * 0.9, _H100_ATTN, 3001.0 * 4.8 / 3.35, 450.0, 50.0, 8, 10.0,
                   "H200 SXM", "[S] from the H100 measurement ([K]) and [D]",
                   ("not measured on an H200: compute as the H100's, HBM scaled by the datasheet",)),
    "a100": Device("A100 SXM 80GB", 79.19, 312.0 * 693.0 / 989.4, 19.5 * 0.9,
                   {k: v * 312.0 / 989.4 for k, v in _H100_ATTN.items()}, 2039.0 * 3001.0 / 3350.0, 300.0, 25.0,
                   8, 10.0, "A100", "[S] scaled from [K] by the datasheet peaks; [D] links",
                   ("not measured on an A100: rates are the H100's fractions of peak",)),
    "cpu": Device("CPU (2-core test machine)", 16.0, 0.04, 0.04, {"sdpa": 0.02, "triton": 0.02, "cudnn": 0.02},
                  7.0, 1.0, 1.0, 1, 200.0, "", "[C]", ("order-of-magnitude figures of the CPU test machine",)),
}


def get_device(name: str) -> Device:
    key = name.lower().replace(" ", "").replace("-", "").replace("sxm", "")
    if key not in DEVICES:
        raise ConfigError(f"--device: expected one of {', '.join(DEVICES)}, found {name!r}")
    return DEVICES[key]
