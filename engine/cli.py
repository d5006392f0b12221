"""`tessera ...` / `python -m engine ...`: train, config show, checkpoint inspect/export, generate, preprocess,
tokenizer, bench, plan."""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading
import traceback
from typing import Optional

from engine import __version__
from engine.errors import EXIT_INTERRUPTED, EXIT_TERMINATED, RunDirError, RunStopped, TesseraError

# Subcommands implemented by their own module's `main(argv) -> int` (they parse their own flags).
DELEGATED = {
    "preprocess": ("engine.data.preprocess", "Tokenize text/jsonl (optionally compressed) into Megatron .bin/.idx."),
    "convert": ("engine.convert.cli", "Hugging Face <-> Tessera checkpoints (from-hf, to-hf), exact, with --verify."),
    "plan": ("engine.plan.cli", "Memory planner and performance model: per-rank peak memory and step time of a "
             "config, and the layouts of N devices that fit, ranked by throughput (builds no model)."),
}
BENCHES = {
    "train": ("engine.bench.train", "Our training loop vs a minimal hand-written PyTorch loop (overhead)."),
    "kernels": ("engine.bench.kernels", "Triton kernels vs torch SDPA / eager / compile (TFLOP/s, GB/s)."),
    "data": ("engine.bench.data", "Preprocessing throughput and index building (C++ vs numpy)."),
    "pipeline": ("engine.bench.pipeline", "Pipeline schedule simulator: bubble fraction, in-flight activations."),
    "parallel": ("engine.bench.parallel", "Tensor-parallel step time and communication share on CPU processes."),
    "dp": ("engine.bench.data_parallel", "Data parallel: optimizer-state memory per rank, step time with/without overlap."),
    "build": ("engine.bench.build", "Model construction: wall time and peak memory per tensor-parallel rank."),
    "checkpoint": ("engine.bench.checkpoint", "Sharded checkpoints: sync/async save, training blocked, load, size."),
    "convert": ("engine.bench.convert", "Hugging Face conversion both ways: time, peak memory, bit-exact round trip."),
    "fp8": ("engine.bench.fp8", "FP8 (torch._scaled_mm) vs bf16: one linear (TFLOP/s) and a training step (tokens/s)."),
    "throughput": ("engine.bench.throughput", "Steady-state tokens/s, TFLOP/s, MFU, memory and step-time breakdown; "
                   "--sweep ablations."),
    "plan": ("engine.bench.plan", "The memory planner's prediction against the measured peak of real training steps."),
}
TOKENIZER_CMDS = {
    "train": ("engine.data.tokenizer_train", "Train a SentencePiece tokenizer (bpe or unigram)."),
    "extend": ("engine.data.tokenizer_extend", "Grow a tokenizer by new tokens, keeping every existing id."),
}

EPILOG = """exit codes: 0 done, 2 configuration, 3 data, 4 tokenizer, 5 checkpoint, 6 run directory or file
system, 7 numerical fault, 8 a peer rank died or a collective timed out, 75 stopped early with a checkpoint
(signal or checkpoint.time_limit: resume with checkpoint.load=auto), 130 interrupted, 143 terminated;
one line per error (add --debug, or set TESSERA_DEBUG=1, for the traceback).

examples:
  tessera train examples/tiny.yaml
  tessera train examples/tiny.yaml train.iters=50 optim.lr=1e-3
  torchrun --nproc-per-node 8 -m engine train examples/llama_1b.yaml parallel.tp=2
  tessera config show examples/tiny.yaml --doc
  tessera generate runs/tiny --prompt "The " --max-tokens 200
  tessera generate ckpt/tiny --prompt "The "       (a checkpoint root: the checkpoint `latest` names)
  tessera checkpoint inspect ckpt/tiny/step-0000120 --json
  tessera checkpoint export ckpt/tiny exported/tiny --dtype bf16
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
    p.add_argument("--debug", action="store_true", help="print the traceback of an error too (or TESSERA_DEBUG=1)")
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

    ck = sub.add_parser("checkpoint", help="Inspect or export checkpoints.",
                        description="Inspect or export checkpoints (checkpoint.dir of a run). PATH is a "
                                    "step-NNNNNNN/ directory or a checkpoint root (= the checkpoint its `latest` "
                                    "names).")
    cksub = ck.add_subparsers(dest="checkpoint_command", metavar="ACTION", required=True)
    ins = cksub.add_parser("inspect", help="Show iteration, layout, config, every tensor and the sizes.",
                           description="Show what a checkpoint holds (iteration, the layout it was saved with, "
                                       "engine version, lineage, the resolved config, every tensor's name, global "
                                       "shape and dtype, sizes) without loading it. An incomplete step directory "
                                       "is shown too, marked incomplete.")
    ins.add_argument("path", metavar="PATH", help="step-NNNNNNN/ directory or checkpoint root")
    ins.add_argument("--json", action="store_true", help="print JSON instead of text")
    exp = cksub.add_parser("export", help="Write OUT/model.safetensors + OUT/config.yaml (consolidated weights).",
                           description="Consolidate a checkpoint's model weights, whatever layout saved them, into "
                                       "OUT/model.safetensors (canonical names, real vocabulary) with its resolved "
                                       "OUT/config.yaml: what `tessera generate OUT` and other tools read. One "
                                       "process, one tensor at a time. OUT must be new, empty or an earlier export.",
                           epilog="example: tessera checkpoint export ckpt/tiny exported/tiny --dtype bf16")
    exp.add_argument("path", metavar="PATH", help="step-NNNNNNN/ directory or checkpoint root")
    exp.add_argument("out", metavar="OUT", help="directory to write (created if missing)")
    exp.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None,
                     help="cast the weights (default: as saved)")

    gen = sub.add_parser("generate", help="Sample text from a trained run or a checkpoint.",
                         description="Sample text from a run directory written by `tessera train` (or by "
                                     "`tessera checkpoint export`), or straight from a checkpoint: a "
                                     "step-NNNNNNN/ directory or a checkpoint root (the checkpoint its `latest` "
                                     "names), whatever layout saved it.")
    gen.add_argument("run_dir", metavar="PATH", help="run directory (train.out_dir of the run), or a checkpoint "
                     "(step-NNNNNNN/ or checkpoint.dir of the run)")
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
    from engine.train.timing import process_start

    train(cfg, started_at=process_start())  # the end-of-run summary's start-up includes the imports
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    from engine.config import field_docs, load_config

    if args.doc:
        for name, default, doc in field_docs():
            print(f"{name} = {default}\n    {doc}")
        return 0
    print(load_config(args.config, args.overrides).to_yaml(), end="")
    return 0


def _cmd_checkpoint(args: argparse.Namespace) -> int:
    if args.checkpoint_command == "inspect":
        import json

        from engine.checkpoint.inspect import describe, render_text

        d = describe(args.path)
        print(json.dumps(d, indent=1) if args.json else render_text(d), end="\n" if args.json else "")
        return 0
    from engine.checkpoint.export import export_checkpoint

    e = export_checkpoint(args.path, args.out, args.dtype)
    print(f"tessera: exported {e.source} (step {e.iteration}, {e.tensors} tensors, {e.nbytes:,} bytes) to "
          f"{e.weights} and {e.config.name}" + (" (replacing the earlier export)" if e.replaced else ""))
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


class Terminated(BaseException):
    """SIGTERM, turned into an exception in the main thread so `finally` blocks run (locks, files)."""


def _on_sigterm(signum, frame) -> None:  # noqa: ANN001 - signal handler protocol
    raise Terminated()


def _where() -> str:
    """' (rank R/W)' inside a multi-process launch, so each rank's one line says whose it is."""
    world = os.environ.get("WORLD_SIZE") or os.environ.get("SLURM_NTASKS") or "1"
    rank = os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or "0"
    return f" (rank {rank}/{world})" if world not in ("", "1") else ""


def _os_error_line(e: OSError) -> str:
    what = e.filename if e.filename is not None else "file system"
    return f"{what}: {e.strerror or e}"


def _one_line(e: BaseException) -> tuple[str, int]:
    """The one line printed for a user-facing error or an interrupt, and its exit code."""
    if isinstance(e, KeyboardInterrupt):
        return f"interrupted{_where()} (SIGINT); the run stopped, files already written are kept", EXIT_INTERRUPTED
    if isinstance(e, Terminated):
        return f"terminated{_where()} (SIGTERM); the run stopped, files already written are kept", EXIT_TERMINATED
    if isinstance(e, RunStopped):
        return f"stopped{_where()}: {e}", e.exit_code
    if isinstance(e, OSError) and not isinstance(e, TesseraError):
        return f"error{_where()}: {_os_error_line(e)}", RunDirError.exit_code
    return f"error{_where()}: {e}", e.exit_code


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "train":
        return _cmd_train(args)
    if args.command == "config":
        return _cmd_config(args)
    if args.command == "checkpoint":
        return _cmd_checkpoint(args)
    if args.command == "generate":
        return _cmd_generate(args)
    if args.command == "tokenizer":
        return _delegate(TOKENIZER_CMDS[args.action][0], args.args)
    if args.command == "bench":
        return _delegate(BENCHES[args.name][0], args.args)
    _parser().print_help()
    return 1


def main(argv: Optional[list[str]] = None) -> int:
    """The one error path of the CLI: a user-facing error (engine.errors.TesseraError: config, data,
    tokenizer, checkpoint, run directory, numerical fault, peer failure) or a file-system error prints ONE
    line and exits with its documented code; `--debug` or TESSERA_DEBUG=1 also prints the traceback. An
    interrupt prints one line (exit 130 for SIGINT, 143 for SIGTERM). Anything else is a bug: traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get("TESSERA_DEBUG", "") not in ("", "0")
    if "--debug" in argv:
        argv.remove("--debug")
        debug = True
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        # Delegated commands keep all their flags (including --help) for their own parser.
        if argv and argv[0] in DELEGATED:
            return _delegate(DELEGATED[argv[0]][0], argv[1:])
        args = _parser().parse_args(argv)
        return _dispatch(args)
    except (TesseraError, OSError, KeyboardInterrupt, Terminated) as e:
        if debug:
            traceback.print_exc()
        line, code = _one_line(e)
        print(f"tessera: {line}", file=sys.stderr, flush=True)
        return code
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
