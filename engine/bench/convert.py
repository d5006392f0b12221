"""`tessera bench convert`: Hugging Face <-> Tessera conversion of a random Llama, time and peak memory.

    tessera bench convert                                  # ~1.24B-parameter Llama-3.2-1B shape, tp2 x pp2
    tessera bench convert --size tiny --json /tmp/c.json   # seconds: what the tests run

1. Writes a random Llama Hugging Face directory (config.json, bf16 safetensors shards of at most
   --shard-size, model.safetensors.index.json) without transformers and without holding the model: the
   shards are planned from the shapes, each file's header is written first and the tensors are generated
   and written one at a time (the file format: 8-byte little-endian header length, JSON header, raw bytes).
2. Runs `tessera convert from-hf HF OUT --tp T --pp P` and then `tessera convert to-hf OUT HF2 --dtype bf16
   --shard-size S`, each as its own process (`python -m engine`, the same entry point) started by a small
   launcher, and takes its wall time and peak resident memory from wait4's rusage (ru_maxrss), plus its RSS
   every 50 ms (where the peak falls). A process that only imports torch and the converters gives the floor
   every conversion starts from.
3. Compares the round trip tensor by tensor (safetensors' safe_open on both sides, torch.equal: bit-identical
   or not, one tensor of each side in memory), the tensor names, and the two config.json files.
4. Prints a table and writes JSON (--json) with the command that produced it.

The converter's budget is "one shard plus one tensor", not the model: the JSON has the model's bytes, the
largest shard's and the largest tensor's next to each peak. Files go to a fresh directory under --work-dir
(default the system's temp dir), deleted at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from engine.bench import measure_in_temp_dir

DEFAULT_OUT = Path("docs/results/bench_convert_cpu.json")

# Llama-3.2-1B's config.json (the fields a LlamaForCausalLM reads), and a tiny model of the same kind
# (odd vocabulary, so the converters' vocabulary padding is exercised; shards of 64 KiB, so there are several).
_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
SIZES: dict[str, dict] = {
    "1b": {"hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
           "intermediate_size": 8192, "vocab_size": 128256, "max_position_embeddings": 131072,
           "rope_theta": 500000.0, "original_max_position_embeddings": 8192, "bos_token_id": 128000,
           "eos_token_id": 128001, "shard_size": "2GB"},
    "tiny": {"hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
             "intermediate_size": 160, "vocab_size": 500, "max_position_embeddings": 512,
             "rope_theta": 500000.0, "original_max_position_embeddings": 64, "bos_token_id": 1,
             "eos_token_id": 2, "shard_size": "64KiB"},
}
_UNITS = {"b": 1, "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30}


def parse_size(text: str) -> int:
    """'2GB' -> 2e9 bytes (decimal, like Hugging Face's max_shard_size), '64KiB' -> 65536."""
    t = text.strip().lower()
    for unit in sorted(_UNITS, key=len, reverse=True):
        if t.endswith(unit) and t[: -len(unit)].strip().replace(".", "", 1).isdigit():
            return int(float(t[: -len(unit)]) * _UNITS[unit])
    if t.isdigit():
        return int(t)
    raise ValueError(f"--shard-size: expected a size like 2GB or 64KiB, found {text!r}")


def hf_config(size: str, tied: bool = True) -> dict:
    """config.json of a random Llama of this size (Llama-3 style: GQA, llama3 RoPE scaling)."""
    s = {k: v for k, v in SIZES[size].items() if k not in ("shard_size", "original_max_position_embeddings")}
    rope = {**_LLAMA3_ROPE, "original_max_position_embeddings": SIZES[size]["original_max_position_embeddings"]}
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **s,
            "hidden_act": "silu", "rms_norm_eps": 1e-5, "rope_scaling": rope,
            "tie_word_embeddings": tied, "attention_bias": False, "mlp_bias": False,
            "head_dim": s["hidden_size"] // s["num_attention_heads"], "initializer_range": 0.02,
            "pretraining_tp": 1, "use_cache": True, "torch_dtype": "bfloat16"}


def hf_tensors(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(Hugging Face name, shape) of every weight, in the order transformers' save_pretrained writes them."""
    d, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    out = [("model.embed_tokens.weight", (v, d))]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [(p + "self_attn.q_proj.weight", (q, d)), (p + "self_attn.k_proj.weight", (kv, d)),
                (p + "self_attn.v_proj.weight", (kv, d)), (p + "self_attn.o_proj.weight", (d, q)),
                (p + "mlp.gate_proj.weight", (f, d)), (p + "mlp.up_proj.weight", (f, d)),
                (p + "mlp.down_proj.weight", (d, f)), (p + "input_layernorm.weight", (d,)),
                (p + "post_attention_layernorm.weight", (d,))]
    out.append(("model.norm.weight", (d,)))
    if not cfg["tie_word_embeddings"]:
        out.append(("lm_head.weight", (v, d)))
    return out


def plan_shards(tensors: list[tuple[str, tuple[int, ...]]], shard_bytes: int,
                itemsize: int = 2) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Consecutive tensors grouped into shards of at most shard_bytes (a larger tensor gets one alone)."""
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    used = 0
    for name, shape in tensors:
        n = math.prod(shape) * itemsize
        if shards[-1] and used + n > shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append((name, shape))
        used += n
    return shards


def _random(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """One bf16 weight: N(0, 0.02) for matrices; 1 + N(0, 0.02) for norm weights (random, so that a swapped or
    dropped norm cannot round-trip unnoticed)."""
    t = torch.randn(shape, generator=gen, dtype=torch.bfloat16).mul_(0.02)
    return t.add_(1.0) if len(shape) == 1 else t


def _st_header(entries: list[tuple[str, tuple[int, ...]]]) -> bytes:
    """safetensors header for bf16 tensors stored in this order (written by hand: the benchmark does not use
    the code it measures)."""
    meta: dict = {"__metadata__": {"format": "pt"}}
    off = 0
    for name, shape in entries:
        n = math.prod(shape) * 2
        meta[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    head = json.dumps(meta, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the format pads the header to 8 bytes
    return struct.pack("<Q", len(head)) + head


@dataclass
class HFDir:
    path: Path
    files: list[Path]
    params: int
    model_bytes: int
    largest_shard_bytes: int
    largest_tensor_bytes: int
    largest_tensor: str
    write_s: float


def write_random_llama(path: Path, size: str, shard_bytes: int, tied: bool = True, seed: int = 0) -> HFDir:
    """A random Llama Hugging Face directory at `path`, one tensor in memory at a time."""
    t0 = time.perf_counter()
    path.mkdir(parents=True, exist_ok=True)
    cfg = hf_config(size, tied)
    (path / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    tensors = hf_tensors(cfg)
    shards = plan_shards(tensors, shard_bytes)
    gen = torch.Generator().manual_seed(seed)
    files, weight_map = [], {}
    for i, entries in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" if len(shards) > 1 else "model.safetensors"
        with open(path / name, "wb") as f:
            f.write(_st_header(entries))
            for tname, shape in entries:
                t = _random(tname, shape, gen)
                f.write(memoryview(t.view(torch.uint8).numpy()))  # no copy: the tensor's own bytes
                weight_map[tname] = name
                del t
        files.append(path / name)
    sizes = {n: math.prod(s) * 2 for n, s in tensors}
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
        (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    biggest = max(sizes, key=sizes.get)
    return HFDir(path, files, sum(math.prod(s) for _, s in tensors), sum(sizes.values()),
                 max(sum(sizes[n] for n, _ in e) for e in shards), sizes[biggest], biggest,
                 time.perf_counter() - t0)


# ------------------------------------------------------------------------------------------- measuring
@dataclass
class Run:
    argv: list[str]
    seconds: float
    peak_rss_bytes: int
    returncode: int
    output: str
    rss_samples: list[tuple[float, int]]  # (seconds since start, bytes), downsampled


# Started by a small launcher, not by this process: Linux's exec records the peak RSS of the memory image it
# replaces in the child's ru_maxrss, and a child started from this process (vfork or fork) replaces an image
# as large as this process has ever been (torch, a generated 0.5 GB tensor): that peak would mask the
# converter's own. The launcher (python -S: no site, no torch) stays at a few MiB.
_LAUNCHER = r"""
import json, os, sys, time
log, argv = sys.argv[1], sys.argv[2:]
acts = [(os.POSIX_SPAWN_OPEN, 1, log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), (os.POSIX_SPAWN_DUP2, 1, 2)]
t0 = time.perf_counter()
pid = os.posix_spawn(argv[0], argv, os.environ, file_actions=acts)
samples = []  # (seconds, VmRSS KiB) every 50 ms: where in the run the peak falls
while True:
    done, status, ru = os.wait4(pid, os.WNOHANG)
    if done:
        break
    try:
        with open(f"/proc/{pid}/status") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        samples.append((time.perf_counter() - t0, kib))
    except (OSError, StopIteration, ValueError):
        pass  # between exec and exit the file can be missing or lack the line
    time.sleep(0.05)
print(json.dumps({"seconds": time.perf_counter() - t0, "maxrss_kib": ru.ru_maxrss, "samples": samples,
                  "returncode": os.waitstatus_to_exitcode(status)}))
"""


def _downsample(samples: list[tuple[float, int]], n: int = 60) -> list[tuple[float, int]]:
    """At most n (seconds, bytes) points, each the largest sample of its stretch of time (peaks survive)."""
    if len(samples) <= n:
        return [(round(t, 2), k * 1024) for t, k in samples]
    step = len(samples) / n
    out = []
    for i in range(n):
        chunk = samples[int(i * step): int((i + 1) * step)] or samples[-1:]
        t, k = max(chunk, key=lambda s: s[1])
        out.append((round(t, 2), k * 1024))
    return out


def run_measured(argv: list[str], log: Path) -> Run:
    """Run argv (argv[0] an absolute path) as its own process; wall time, peak RSS from wait4's rusage
    (ru_maxrss, KiB on Linux) and RSS samples over time. Its output goes to `log`."""
    done = subprocess.run([sys.executable, "-S", "-c", _LAUNCHER, str(log), *argv], capture_output=True,
                          text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"bench convert: the launcher failed ({done.returncode}): {done.stderr[-2000:]}")
    got = json.loads(done.stdout.strip().splitlines()[-1])
    return Run(argv, got["seconds"], got["maxrss_kib"] * 1024, got["returncode"], log.read_text(errors="replace"),
               _downsample([tuple(x) for x in got["samples"]]))


def _hf_files(d: Path) -> dict[str, Path]:
    """{tensor name: file} of a Hugging Face directory (its index, or the one model.safetensors)."""
    index = d / "model.safetensors.index.json"
    if index.is_file():
        return {n: d / f for n, f in json.loads(index.read_text())["weight_map"].items()}
    from safetensors import safe_open

    with safe_open(str(d / "model.safetensors"), "pt") as f:
        return {n: d / "model.safetensors" for n in f.keys()}


def compare_hf_dirs(a: Path, b: Path) -> dict:
    """Tensor-by-tensor comparison of two Hugging Face directories: names, dtype, shape, bits."""
    from safetensors import safe_open

    fa, fb = _hf_files(a), _hf_files(b)
    t0 = time.perf_counter()
    differ: list[str] = []
    with contextlib.ExitStack() as stack:
        handles: dict[Path, object] = {}

        def get(path: Path, name: str) -> torch.Tensor:
            if path not in handles:  # each file opened once, whatever order its tensors come in
                handles[path] = stack.enter_context(safe_open(str(path), "pt"))
            return handles[path].get_tensor(name)

        for name in sorted(set(fa) & set(fb)):
            x, y = get(fa[name], name), get(fb[name], name)
            if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x, y):
                differ.append(f"{name}: {x.dtype} {list(x.shape)} vs {y.dtype} {list(y.shape)}")
            del x, y  # one tensor of each side at a time
    ca, cb = (json.loads((d / "config.json").read_text()) for d in (a, b))
    return {"tensors": len(fa), "missing": sorted(set(fa) - set(fb)), "unexpected": sorted(set(fb) - set(fa)),
            "differ": differ, "bit_identical": not differ and set(fa) == set(fb),
            "config_differences": {k: [ca.get(k), cb.get(k)] for k in sorted(set(ca) | set(cb))
                                   if ca.get(k) != cb.get(k)},
            "generation_config": (b / "generation_config.json").is_file(), "seconds": time.perf_counter() - t0}


def _dir_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file())


def _step(name: str, run: Run, hf: HFDir, floor: int) -> dict:
    one = hf.largest_shard_bytes + hf.largest_tensor_bytes
    rss = sorted(b for _, b in run.rss_samples)
    peak_t = max(run.rss_samples, key=lambda s: s[1])[0] if run.rss_samples else None
    return {"step": name, "command": " ".join(["tessera"] + run.argv[3:]), "seconds": run.seconds,
            # the level most of the run sits at, and when the peak came (fraction of the run)
            "rss_median_bytes": rss[len(rss) // 2] if rss else None,
            "peak_at_fraction": peak_t / run.seconds if peak_t is not None else None,
            "rss_samples": run.rss_samples, "output_tail": run.output[-1000:],
            "peak_rss_bytes": run.peak_rss_bytes, "above_floor_bytes": run.peak_rss_bytes - floor,
            "peak_over_model": run.peak_rss_bytes / hf.model_bytes,
            "peak_over_shard_plus_tensor": run.peak_rss_bytes / one,
            "above_floor_over_shard_plus_tensor": (run.peak_rss_bytes - floor) / one, "returncode": run.returncode}


def measure(args: argparse.Namespace, work: Path) -> dict:
    py = [sys.executable, "-m", "engine"]
    shard = args.shard_size or SIZES[args.size]["shard_size"]
    say = (lambda s: print(s, file=sys.stderr, flush=True)) if args.verbose else (lambda s: None)
    load_before = os.getloadavg()[0]
    say(f"bench convert: writing a random {args.size} Llama to {work / 'hf'}")
    hf = write_random_llama(work / "hf", args.size, parse_size(shard), tied=not args.untied)
    say(f"bench convert: {hf.params:,} parameters, {hf.model_bytes / 1e9:.2f} GB in {len(hf.files)} shard(s), "
        f"written in {hf.write_s:.1f} s")
    # the floor: an interpreter that imports torch and the converters (what every conversion pays first)
    probe = "import torch, engine.cli, engine.convert.from_hf, engine.convert.to_hf"
    floor = run_measured([sys.executable, "-c", probe], work / "floor.log")
    if floor.returncode != 0:
        raise RuntimeError(f"bench convert: `python -c {probe!r}` failed:\n{floor.output[-3000:]}")
    ckpt, out = work / "ckpt", work / "hf_out"
    layout = ["--tp", str(args.tp), "--pp", str(args.pp)]
    steps = []
    for name, argv in (("from-hf", py + ["convert", "from-hf", str(hf.path), str(ckpt)] + layout),
                       ("to-hf", py + ["convert", "to-hf", str(ckpt), str(out), "--dtype", "bf16",
                                       "--shard-size", shard])):
        say(f"bench convert: {' '.join(argv[3:])}")
        run = run_measured(argv, work / f"{name}.log")
        if run.returncode != 0:
            raise RuntimeError(f"bench convert: `tessera {' '.join(argv[3:])}` exited with {run.returncode}:\n"
                               f"{run.output[-6000:]}")
        steps.append(_step(name, run, hf, floor.peak_rss_bytes))
        say(f"bench convert: {name} {run.seconds:.1f} s, peak RSS {run.peak_rss_bytes / 2**30:.2f} GiB")
    say("bench convert: comparing the round trip tensor by tensor")
    check = compare_hf_dirs(hf.path, out)
    argv_text = args.argv if args.argv is not None else sys.argv[1:]
    return {
        "command": "tessera bench convert " + " ".join(argv_text),
        "machine": {"cpu": _cpu(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "python": platform.python_version()},
        "size": args.size, "params": hf.params, "dtype": "bf16", "tied": not args.untied,
        "layout": {"tp": args.tp, "pp": args.pp}, "shard_size": shard, "shards": len(hf.files),
        "model_bytes": hf.model_bytes, "largest_shard_bytes": hf.largest_shard_bytes,
        "largest_tensor_bytes": hf.largest_tensor_bytes, "largest_tensor": hf.largest_tensor,
        "shard_plus_tensor_bytes": hf.largest_shard_bytes + hf.largest_tensor_bytes,
        "floor_rss_bytes": floor.peak_rss_bytes, "write_random_s": hf.write_s,
        "checkpoint_bytes": _dir_bytes(ckpt), "hf_out_bytes": _dir_bytes(out),
        "hf_out_shards": len(list(out.glob("*.safetensors"))),
        "steps": steps, "roundtrip": check, "bit_identical": check["bit_identical"],
        # other work on the machine skews the times: the 1-minute load at the start and the end
        "loadavg_1min": [load_before, os.getloadavg()[0]],
    }


def _cpu() -> str:
    from engine.bench import cpu_name

    return cpu_name()


def table(res: dict) -> str:
    gib = 2 ** 30
    lines = ["| step | seconds | peak RSS GiB | peak at | median RSS GiB | above floor GiB | peak / model | "
             "peak / (shard + tensor) | above floor / (shard + tensor) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in res["steps"]:
        at = f"{100 * s['peak_at_fraction']:.0f}%" if s["peak_at_fraction"] is not None else "n/a"
        med = f"{s['rss_median_bytes'] / gib:.2f}" if s["rss_median_bytes"] is not None else "n/a"
        lines.append(f"| {s['step']} | {s['seconds']:.1f} | {s['peak_rss_bytes'] / gib:.2f} | {at} | {med} | "
                     f"{s['above_floor_bytes'] / gib:.2f} | {s['peak_over_model']:.2f} | "
                     f"{s['peak_over_shard_plus_tensor']:.2f} | {s['above_floor_over_shard_plus_tensor']:.2f} |")
    rt = res["roundtrip"]
    lines += ["", f"model: random Llama ({res['size']}), {res['params']:,} parameters, bf16, "
              f"{res['model_bytes'] / gib:.2f} GiB in {res['shards']} shard(s) of at most {res['shard_size']}; "
              f"largest shard {res['largest_shard_bytes'] / gib:.2f} GiB, largest tensor {res['largest_tensor']} "
              f"{res['largest_tensor_bytes'] / gib:.2f} GiB; from-hf layout tp{res['layout']['tp']} x "
              f"pp{res['layout']['pp']}; checkpoint {res['checkpoint_bytes'] / gib:.2f} GiB on disk",
              f"floor (python + torch + converter imports): {res['floor_rss_bytes'] / gib:.2f} GiB; machine: "
              f"{res['machine']['cpu']} ({res['machine']['cpu_count']} cores), torch {res['machine']['torch']}; "
              f"1-min load average {res['loadavg_1min'][0]:.1f} at the start, {res['loadavg_1min'][1]:.1f} at the end",
              f"round trip: {rt['tensors']} tensors, " + ("bit-identical" if rt["bit_identical"] else
              f"NOT identical ({len(rt['differ'])} differ, missing {rt['missing'][:3]}, unexpected "
              f"{rt['unexpected'][:3]})") + f"; config.json fields that differ: "
              f"{', '.join(rt['config_differences']) or 'none'}"]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="tessera bench convert", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="1b",
                    help="1b: the Llama-3.2-1B shape (default); tiny: seconds, for tests")
    ap.add_argument("--shard-size", default=None,
                    help="largest safetensors shard written, both ways (default 2GB for 1b, 64KiB for tiny)")
    ap.add_argument("--untied", action="store_true", help="write a separate lm_head.weight (default tied)")
    ap.add_argument("--tp", type=int, default=2, help="tensor-parallel size of the checkpoint from-hf writes (2)")
    ap.add_argument("--pp", type=int, default=2, help="pipeline-parallel size of that checkpoint (2)")
    ap.add_argument("--work-dir", type=Path, default=None,
                    help="write the files into a fresh directory under this one (default the system's temp dir); "
                         "deleted at the end")
    ap.add_argument("--json", type=Path, default=DEFAULT_OUT, help=f"JSON results (default {DEFAULT_OUT})")
    ap.add_argument("--quiet", dest="verbose", action="store_false", help="no progress lines on stderr")
    args = ap.parse_args(argv)
    if args.tp < 1 or args.pp < 1:
        ap.error(f"--tp and --pp: expected sizes >= 1, found tp={args.tp} pp={args.pp}")
    if args.shard_size is not None:
        try:
            parse_size(args.shard_size)
        except ValueError as e:
            ap.error(str(e))
    args.argv = argv
    res = measure_in_temp_dir(lambda work: measure(args, work), "tessera-bench-convert-", args.work_dir, args.json,
                              table)
    return 0 if res["bit_identical"] else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
