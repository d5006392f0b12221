"""Hugging Face -> Tessera: `tessera convert from-hf` and the source behind `checkpoint.init_from: hf:DIR`.

`HFSource.open` reads config.json (engine/convert/hf_config.py refuses what our model does not compute
exactly), indexes the safetensors, and checks every tensor the model needs is there with the shape our
config implies -- and that nothing else is (an unexpected tensor means a feature we would silently drop)
-- before anything is read or written. `canonical(name)` then gives one canonical tensor at a time.

`convert_from_hf` writes one of our checkpoints (step 0, weights only, no optimizer state) through DCP,
cut as the requested tp layout would cut it: every box is produced only when DCP writes it, so memory
stays at about one Hugging Face tensor whatever the model's size. The tokenizer files travel into the
checkpoint (`tokenizer/`), the run config there names them, and the source config.json and
generation_config.json are recorded in tessera.json so that `convert to-hf` writes them back unchanged.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from engine import __version__
from engine.checkpoint.dcp_io import Deferred, Pieces, write_pieces
from engine.checkpoint.files import StepDir, ensure_checkpoint_dir, publish, step_name, temp_dir
from engine.checkpoint.meta import FORMAT
from engine.checkpoint.weights import canonical_specs
from engine.config import Config, ModelConfig, config_from_dict
from engine.convert.hf_config import ARCHITECTURES, hf_class, model_fields_from_hf, read_hf_config
from engine.convert.hf_files import HFWeights, tokenizer_files
from engine.convert.hf_names import IGNORED, TIED_COPIES, Group, groups, hf_shape, hf_to_ours
from engine.errors import ConfigError, ConversionError
from engine.parallel.sharding import box_view
from engine.parallel.state import ParallelState

__all__ = ["HF_PREFIX", "HFSource", "convert_from_hf", "hf_record"]

HF_PREFIX = "hf:"
# BERT files that hold these hold the pooler and the next-sentence head (model.binary_head)
_BERT_NSP = ("bert.pooler.dense.weight", "cls.seq_relationship.weight")


@dataclass
class HFSource:
    """A checked Hugging Face model directory (see the module docstring)."""

    dir: Path
    arch: str  # llama | mistral | qwen2 | gpt2 | bert
    hf_config: dict
    generation_config: Optional[dict]
    fields: dict  # ModelConfig field values from config.json
    weights: HFWeights
    groups: list[Group]
    shapes: dict[str, tuple[int, ...]]  # canonical name -> shape
    _names: dict[str, str]  # our Hugging Face name -> the name in the files
    _of: dict[str, Group]
    _cache: Optional[tuple[str, dict[str, torch.Tensor]]] = None

    @classmethod
    def open(cls, hf_dir: str | os.PathLike, what: str = "Hugging Face directory") -> "HFSource":
        d = Path(hf_dir)
        hf_config = read_hf_config(d)
        arch, fields = model_fields_from_hf(hf_config, f"{what} {str(d)!r}: config.json")
        weights = HFWeights(d)
        names = _file_names(arch, weights)
        if arch == "bert" and not fields["binary_head"] and all(n in names for n in _BERT_NSP):
            fields["binary_head"] = True  # a BertForMaskedLM config over pretraining files: keep both heads
        model = dataclasses.replace(ModelConfig(), **fields)
        shapes = {n: s.global_shape for n, s in canonical_specs(model, ParallelState.single()).items()}
        gs = groups(arch, model)
        problems, expected = [], set()
        for g in gs:
            expected.add(g.hf)
            want = hf_shape(g, shapes)
            if g.hf not in names:
                if not g.alias:
                    problems.append(f"missing {g.hf} (expected shape {list(want)})")
            elif weights.tensors[names[g.hf]].shape != want:
                problems.append(f"{g.hf} has shape {list(weights.tensors[names[g.hf]].shape)}, config.json implies "
                                f"{list(want)}")
        # some files keep the copies of tied tensors (ignored: the tie is ours too)
        tied = set(TIED_COPIES.get(arch, ("lm_head.weight",))) if model.tie_embeddings else set()
        extra = sorted(n for n in names if n not in expected and not IGNORED.search(n) and n not in tied)
        if extra:
            problems.append(f"{len(extra)} tensor(s) this architecture does not have (a feature the conversion "
                            f"would drop): {', '.join(extra[:5])}" + (" ..." if len(extra) > 5 else ""))
        if problems:
            raise ConversionError(f"{what} {str(d)!r} does not match its config.json ({arch}): "
                                  + "; ".join(problems[:6]) + (" ..." if len(problems) > 6 else ""))
        gen = None
        if (d / "generation_config.json").is_file():
            try:
                gen = json.loads((d / "generation_config.json").read_text())
            except (OSError, ValueError) as e:
                raise ConversionError(f"{str(d / 'generation_config.json')!r}: not readable JSON ({e})") from None
        return cls(d, arch, hf_config, gen, fields, weights, gs, shapes, names,
                   {n: g for g in gs if not g.alias for n in g.ours})

    def model_config(self, base: Optional[ModelConfig] = None) -> ModelConfig:
        """`base` (default: ModelConfig()) with the architecture fields of config.json; the rest (dropout,
        attention backend, fused ops, vocabulary padding, init std) stays the base's."""
        keep = {"dropout"} if base is not None else set()
        return dataclasses.replace(base or ModelConfig(), preset=None,
                                   **{k: v for k, v in self.fields.items() if k not in keep})

    @property
    def dtype(self) -> torch.dtype:
        return self.weights.dtype()

    def canonical(self, name: str) -> torch.Tensor:
        """One canonical tensor (the last Hugging Face tensor read is kept: GPT-2's q, k, v share one)."""
        g = self._of[name]
        if self._cache is None or self._cache[0] != g.hf:
            self._cache = None  # drop the previous one before reading the next
            self._cache = (g.hf, hf_to_ours(g, self.weights.read(self._names[g.hf]), self.shapes))
        return self._cache[1][name]

    def tokenizer_files(self) -> list[Path]:
        return tokenizer_files(self.dir) if (self.dir / "tokenizer.json").is_file() else []


def _file_names(arch: str, weights: HFWeights) -> dict[str, str]:
    """Our Hugging Face names -> the names in the files. GPT-2 files from the Hub's first upload have no
    `transformer.` prefix (GPT2Model's names); GPT2LMHeadModel.save_pretrained writes it. Old BERT files
    (TensorFlow-era, the Hub's bert-base-*) name LayerNorm parameters gamma / beta, as transformers still
    reads them."""
    out = {}
    for n in weights.tensors:
        if arch == "gpt2" and not n.startswith(("transformer.", "lm_head.")):
            out[f"transformer.{n}"] = n
        elif arch == "bert" and n.endswith(("LayerNorm.gamma", "LayerNorm.beta")):
            out[n[: -len("gamma")] + "weight" if n.endswith("gamma") else n[: -len("beta")] + "bias"] = n
        else:
            out[n] = n
    return out


def hf_record(src: HFSource) -> dict:
    """What tessera.json records of a Hugging Face source, for `convert to-hf` to write it back."""
    archs = src.hf_config.get("architectures") or []
    name = archs[0] if archs and ARCHITECTURES.get(archs[0]) == src.arch else \
        hf_class(src.arch, src.model_config())
    return {"architecture": name, "path": str(src.dir.resolve()), "config": src.hf_config,
            "generation_config": src.generation_config}


def convert_from_hf(hf_dir: str | os.PathLike, out_dir: str | os.PathLike, tp: int = 1, pp: int = 1, vpp: int = 1,
                    pp_layout: Optional[list[int]] = None, log: Callable[[str], None] = print) -> StepDir:
    """Write the Hugging Face model in `hf_dir` as a Tessera checkpoint under `out_dir` (its step-0000000),
    cut for tp x pp (x vpp). Everything is checked before anything is written."""
    src = HFSource.open(hf_dir)
    root = Path(out_dir)
    cfg = Config()
    cfg.model = src.model_config()
    if cfg.model.encoder:  # the objective an encoder's config validates with (BERT's own pretraining one)
        cfg.train.objective = "mlm+nsp" if cfg.model.binary_head else "mlm"
    cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.vpp = tp, pp, vpp
    cfg.parallel.schedule = "interleaved" if vpp > 1 else cfg.parallel.schedule
    cfg.parallel.pp_layout = list(pp_layout) if pp_layout else None
    cfg.checkpoint.dir = str(root)
    tok = src.tokenizer_files()
    if tok:  # the run config names the copy inside the checkpoint (an absolute path: configs are copied around)
        cfg.data.tokenizer = HF_PREFIX + str((root / step_name(0) / "tokenizer").resolve())
    try:
        cfg = config_from_dict(cfg.to_dict(), world_size=tp * pp)
    except ConfigError as e:
        raise ConversionError(f"convert from-hf {str(hf_dir)!r} at tp {tp}, pp {pp}, vpp {vpp}: {e} (--pp-layout "
                              f"sets parallel.pp_layout)") from None
    try:
        pieces = _pieces(src, cfg.model, tp)
    except ValueError as e:  # a size the layout cannot split (the model's own check)
        raise ConversionError(f"convert from-hf {str(hf_dir)!r} at tp {tp}: {e}") from None
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise ConversionError(f"convert from-hf: output {str(root)!r}: expected a new or empty directory, found "
                              f"{'a file' if not root.is_dir() else 'one with files in it'} (a checkpoint root of "
                              f"its own: its `latest` must not move); nothing was written")
    ensure_checkpoint_dir(root)
    tmp = temp_dir(root, 0, os.getpid(), secrets.token_hex(4))
    try:
        tmp.mkdir(parents=True)
        write_pieces(tmp, pieces, {})
        if tok:
            (tmp / "tokenizer").mkdir()
            for f in tok:
                shutil.copy2(f, tmp / "tokenizer" / f.name)
        meta = _meta(src, cfg, tp, pp, vpp, tok)
        step = publish(tmp, root, 0, json.dumps(meta, indent=1).encode())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"tessera: {src.arch} model from {src.dir} -> {step.path} ({len(src.shapes)} tensors, {src.dtype}, "
        f"cut for tp {tp} x pp {pp}" + (f" x vpp {vpp}" if vpp > 1 else "") + ")")
    if not tok and (src.dir / "vocab.txt").is_file():  # an older BERT directory: WordPiece vocabulary only
        log(f"tessera: {src.dir} has vocab.txt but no tokenizer.json: no tokenizer carried (transformers writes "
            f"one: AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR))")
    return step


def _pieces(src: HFSource, model: ModelConfig, tp: int) -> Pieces:
    """The boxes the tp ranks of the layout hold (each distinct box once), produced when written."""
    pieces = Pieces()
    dtype = src.dtype
    for name, spec in canonical_specs(model, ParallelState(tp=tp)).items():
        boxes = []
        for r in range(tp):
            full = ((0,) * len(spec.local_shape), spec.local_shape)
            boxes += [c for _, c in spec.local_to_canonical(full, r) if c not in boxes]
        for box in boxes:
            def make(name=name, box=box) -> torch.Tensor:
                return box_view(src.canonical(name), box).to(dtype).clone()
            pieces.add(f"model/{name}", spec.global_shape, box, Deferred(tuple(box[1]), dtype, make))
    return pieces


def _meta(src: HFSource, cfg: Config, tp: int, pp: int, vpp: int, tok: list[Path]) -> dict:
    from engine.data.special_tokens import tokenizer_for_objective
    from engine.data.tokenizers import tokenizer_record

    # recorded as a run with this config builds it (an encoder's mlm objectives add the special tokens' ids),
    # so that a run starting from the checkpoint finds the same fingerprint
    record = tokenizer_record(tokenizer_for_objective(HF_PREFIX + str(src.dir), cfg.train.objective)) if tok \
        else None
    return {
        "format": FORMAT, "engine": __version__,
        "saved_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "iteration": 0, "consumed_samples": 0, "consumed_per_dataset": {}, "train_samples": None,
        "schedule": None, "scaler": None, "faults": None,
        "layout": {"tp": tp, "pp": pp, "vpp": vpp, "dp": 1, "zero": cfg.parallel.zero, "world_size": tp * pp,
                   "sequence_parallel": False, "pp_layout": cfg.parallel.pp_layout},
        "config": cfg.to_dict(), "has_optimizer": False,
        "lineage": [{"kind": "from_hf", "path": str(src.dir.resolve()), "iteration": 0}],
        "hf": hf_record(src), "tokenizer": record,
    }
