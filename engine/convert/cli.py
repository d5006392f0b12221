"""`tessera convert from-hf HF_DIR OUT_DIR` and `tessera convert to-hf CKPT_DIR OUT_DIR`."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Optional

from engine.errors import ConversionError

EPILOG = """examples:
  tessera convert from-hf ~/models/Llama-3.2-1B ckpt/llama32-1b --tp 2 --pp 2 --verify
  tessera train examples/llama_1b.yaml checkpoint.init_from=ckpt/llama32-1b
  tessera train examples/llama_1b.yaml checkpoint.init_from=hf:~/models/Llama-3.2-1B   (no convert step)
  tessera convert to-hf ckpt/run1 hf/run1 --dtype bf16 --shard-size 2GB --verify
  tessera convert from-hf ~/models/bert-base-uncased ckpt/bert-base --tp 2 --verify
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tessera convert", description="Move weights between Hugging Face model "
                                "directories and Tessera checkpoints, exactly: Llama 2/3/3.1/3.2, Mistral, "
                                "Qwen2/2.5, GPT-2 and BERT (BertForPreTraining / BertForMaskedLM).", epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="direction", metavar="DIRECTION", required=True)
    f = sub.add_parser("from-hf", help="Hugging Face directory -> a Tessera checkpoint (step 0, weights only).",
                       description="Read config.json and the safetensors (one file, or shards with their index) "
                                   "and write a Tessera checkpoint cut for the given layout, ready for "
                                   "checkpoint.init_from or checkpoint.load. The tokenizer files are carried "
                                   "into it. Unsupported features are refused, naming the field.")
    f.add_argument("hf_dir", metavar="HF_DIR")
    f.add_argument("out", metavar="OUT_DIR", help="checkpoint root to create (new or empty)")
    f.add_argument("--tp", type=int, default=1)
    f.add_argument("--pp", type=int, default=1)
    f.add_argument("--vpp", type=int, default=1)
    f.add_argument("--pp-layout", default=None, metavar="N,N,...",
                   help="layers per pipeline stage (pp*vpp numbers), when n_layers does not split evenly")
    f.add_argument("--verify", action="store_true",
                   help="run transformers on HF_DIR and our model on the result; fail above the bounds")
    t = sub.add_parser("to-hf", help="A Tessera checkpoint (any layout) -> a Hugging Face directory.",
                       description="Stream a checkpoint's model, tensor by tensor, into sharded safetensors with "
                                   "model.safetensors.index.json, config.json, generation_config.json and the "
                                   "tokenizer files. OUT_DIR must be new, empty or an earlier export.")
    t.add_argument("path", metavar="CKPT_DIR", help="step-NNNNNNN/ directory or checkpoint root")
    t.add_argument("out", metavar="OUT_DIR")
    t.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None,
                   help="weights dtype (default: the Hugging Face source's, else bf16)")
    t.add_argument("--shard-size", default="5GB", help="largest safetensors file (default 5GB)")
    t.add_argument("--verify", action="store_true",
                   help="run our model on the checkpoint and transformers on OUT_DIR; fail above the bounds")
    return p


def _check(verified) -> None:
    print(verified.line(), flush=True)
    if not verified.ok:
        raise ConversionError(f"{verified.line()}: the converted model does not compute what the original does "
                              f"(its files are kept for inspection)")


def main(argv: Optional[list[str]] = None) -> int:
    a = _parser().parse_args(argv)
    t0 = time.perf_counter()
    if a.direction == "from-hf":
        from engine.convert.from_hf import convert_from_hf

        for name in ("tp", "pp", "vpp"):
            if getattr(a, name) < 1:
                raise ConversionError(f"--{name}: expected a positive integer, found {getattr(a, name)}")
        layout = None
        if a.pp_layout:
            try:
                layout = [int(x) for x in a.pp_layout.split(",")]
            except ValueError:
                raise ConversionError(f"--pp-layout: expected comma-separated layer counts like 3,2, found "
                                      f"{a.pp_layout!r}") from None
        step = convert_from_hf(a.hf_dir, a.out, tp=a.tp, pp=a.pp, vpp=a.vpp, pp_layout=layout)
        if a.verify:
            from engine.convert.verify import verify

            _check(verify(step.path, a.hf_dir))
    else:
        from engine.convert.to_hf import convert_to_hf

        done = convert_to_hf(a.path, a.out, dtype=a.dtype, shard_size=a.shard_size)
        if a.verify:
            from engine.convert.verify import verify

            _check(verify(a.path, done.out, round_to=done.dtype))
    print(f"tessera: done in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    return 0
