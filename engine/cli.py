"""`tessera ...` / `python -m engine ...`: train, config show, generate, preprocess, tokenizer, bench."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional

from engine import __version__

# Subcommands implemented by their own module's `main(argv) -> int` (they parse their own flags).
DELEGATED = {
    "preprocess": ("engine.data.preprocess", "Tokenize text/jsonl (optionally compressed) into Megatron .bin/.idx."),
}
BENCHES = {
    "train": ("engine.bench.train", "Our training loop vs a minimal hand-written PyTorch loop (overhead)."),
    "kernels": ("engine.bench.kernels", "Triton kernels vs torch SDPA / eager / compile (TFLOP/s, GB/s)."),
    "data": ("engine.bench.data", "Preprocessing throughput and index building (C++ vs numpy)."),
    "pipeline": ("engine.bench.pipeline", "Pipeline schedule simulator: bubble fraction, in-flight activations."),
    "parallel": ("engine.bench.parallel", "Tensor-parallel step time and communication share on CPU processes."),
    "dp": ("engine.bench.data_parallel", "Data parallel: optimizer-state memory per rank, step time with/without overlap."),
    "build": ("engine.bench.build", "Model construction: wall time and peak memory per tensor-parallel rank."),
}
TOKENIZER_CMDS = {
    "train": ("engine.data.tokenizer_train", "Train a SentencePiece tokenizer (bpe or unigram)."),
}

EPILOG = """examples:
  tessera train examples/tiny.yaml
  tessera train examples/tiny.yaml train.iters=50 optim.lr=1e-3
  torchrun --nproc-per-node 8 -m engine train examples/llama_1b.yaml parallel.tp=2
  tessera config show examples/tiny.yaml --doc
  tessera generate runs/tiny --prompt "The " --max-tokens 200
  tessera bench train examples/tiny.yaml
"""


def _delegate(module: str, argv: list[str]) -> int:
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name == module:
            print(f"tessera: this command is not available in this build ({module} is missing)", file=sys.stderr)
            return 2
        raise
    return int(mod.main(argv) or 0)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tessera", description="Tessera: train large Transformers with tensor, "
                                "pipeline and data parallelism.", epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"tessera {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    tr = sub.add_parser("train", help="Train a model from a YAML config (plus a.b=c overrides).",
                        description="Train a model. Works in one process or under torchrun/srun; the launch "
                                    "environment (RANK, WORLD_SIZE, LOCAL_RANK or Slurm's) picks the layout.",
                        epilog="example: tessera train examples/tiny.yaml train.iters=50 parallel.tp=2")
    tr.add_argument("config", help="YAML config file")
    tr.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.iters=50")

    cs = sub.add_parser("config", help="Inspect configs.", description="Inspect configs.")
    csub = cs.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    show = csub.add_parser("show", help="Print the resolved config (presets and overrides applied, validated).",
                           description="Print the resolved config (presets and overrides applied, validated).")
    show.add_argument("config", nargs="?", help="YAML config file (omit for the defaults)")
    show.add_argument("overrides", nargs="*", help="section.key=value overrides")
    show.add_argument("--doc", action="store_true", help="list every field with its default and documentation")

    gen = sub.add_parser("generate", help="Sample text from a trained run.",
                         description="Sample text from a run directory written by `tessera train`.")
    gen.add_argument("run_dir", help="run directory (train.out_dir of the run)")
    gen.add_argument("--prompt", default="", help="text to continue")
    gen.add_argument("--max-tokens", type=int, default=200, help="tokens to generate (default 200)")
    gen.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    gen.add_argument("--top-k", type=int, default=40, help="sample from the k most likely tokens; 0 = all")
    gen.add_argument("--seed", type=int, default=None, help="seed for reproducible samples")
    gen.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="default: auto")

    for name, (_, help_text) in DELEGATED.items():
        d = sub.add_parser(name, help=help_text, add_help=False)
        d.add_argument("args", nargs=argparse.REMAINDER)
    tok = sub.add_parser("tokenizer", help="Tokenizer tools (train).", description="Tokenizer tools.")
    tok.add_argument("action", choices=sorted(TOKENIZER_CMDS), help="; ".join(
        f"{k}: {v[1]}" for k, v in TOKENIZER_CMDS.items()))
    tok.add_argument("args", nargs=argparse.REMAINDER)
    b = sub.add_parser("bench", help="Benchmarks (results as a table and JSON).",
                       description="Benchmarks: " + "; ".join(f"{k}: {v[1]}" for k, v in BENCHES.items()))
    b.add_argument("name", choices=sorted(BENCHES), help="which benchmark (see `tessera bench NAME --help`)")
    b.add_argument("args", nargs=argparse.REMAINDER)
    return p


def _cmd_train(args: argparse.Namespace) -> int:
    from engine.config import load_config
    from engine.parallel.state import LaunchEnv

    env = LaunchEnv.from_env()
    cfg = load_config(args.config, args.overrides, world_size=env.world_size)
    from engine.train.loop import train

    train(cfg)
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    from engine.config import field_docs, load_config

    if args.doc:
        for name, default, doc in field_docs():
            print(f"{name} = {default}\n    {doc}")
        return 0
    print(load_config(args.config, args.overrides).to_yaml(), end="")
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from engine.config import ConfigError
    from engine.generate import generate_text, load_run
    from engine.parallel.state import pick_device

    if args.top_k < 0:
        raise ConfigError(f"--top-k: expected a number >= 0 (0 = all tokens), found {args.top_k}")
    device = pick_device(args.device, 0)
    _, model, tok = load_run(args.run_dir, device)
    print(generate_text(model, tok, args.prompt, args.max_tokens, args.temperature, args.top_k or None,
                        args.seed, device))
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    from engine.config import ConfigError

    argv = list(sys.argv[1:] if argv is None else argv)
    # Delegated commands keep all their flags (including --help) for their own parser.
    if argv and argv[0] in DELEGATED:
        return _delegate(DELEGATED[argv[0]][0], argv[1:])
    args = _parser().parse_args(argv)
    try:
        if args.command == "train":
            return _cmd_train(args)
        if args.command == "config":
            return _cmd_config(args)
        if args.command == "generate":
            return _cmd_generate(args)
        if args.command == "tokenizer":
            return _delegate(TOKENIZER_CMDS[args.action][0], args.args)
        if args.command == "bench":
            return _delegate(BENCHES[args.name][0], args.args)
    except ConfigError as e:
        print(f"tessera: error: {e}", file=sys.stderr)
        return 2
    _parser().print_help()
    return 1
