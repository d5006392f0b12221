"""Configuration: dataclasses whose fields carry their documentation, YAML loading,
`a.b=c` overrides with type checks, and strict cross-field validation.

Every error is a `ConfigError` with one message that names the field, what was
expected and what was found. Validation runs before any process group or file is
touched, so a typo never costs a cluster allocation.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from engine.errors import ConfigError


def _doc(text: str, **kw: Any) -> Any:
    """A dataclass field whose documentation lives in its metadata (shown by `config show --doc`)."""
    return field(metadata={"doc": text}, **kw)


# --------------------------------------------------------------------------- sections


@dataclass
class ModelConfig:
    preset: Optional[str] = _doc(
        "Name of a preset in engine/model/presets.py (gpt2, gpt2-medium, llama, llama2-7b, llama3-8b, "
        "qwen2, mistral, tiny ...). Its values are applied first; fields given here override them.",
        default=None)
    vocab_size: int = _doc("Tokenizer vocabulary size (before padding). 0 = take it from the tokenizer.", default=0)
    vocab_pad_multiple: int = _doc(
        "Pad the embedding/output vocabulary to a multiple of this (and of tp) for fast matmuls; "
        "padded logits never enter the loss.", default=128)
    d_model: int = _doc("Hidden size.", default=512)
    n_layers: int = _doc("Number of transformer blocks.", default=8)
    n_heads: int = _doc("Number of attention (query) heads.", default=8)
    n_kv_heads: Optional[int] = _doc("Key/value heads: = n_heads for MHA, < n_heads for GQA, 1 for MQA. "
                                     "null = n_heads.", default=None)
    head_dim: Optional[int] = _doc("Per-head dimension. null = d_model // n_heads.", default=None)
    ffn_hidden: Optional[int] = _doc(
        "MLP hidden size. null = 4*d_model for gelu/relu, or Llama's rule (2/3 * 4*d_model rounded up "
        "to a multiple of 256) for swiglu.", default=None)
    max_seq_len: int = _doc("Longest sequence the model supports (learned position table size, RoPE cache).",
                            default=1024)
    norm: Literal["rmsnorm", "layernorm"] = _doc("Normalisation layer.", default="rmsnorm")
    norm_eps: float = _doc("Epsilon of the normalisation layers.", default=1e-5)
    activation: Literal["swiglu", "gelu", "relu"] = _doc("MLP activation (swiglu has gate and up projections).",
                                                         default="swiglu")
    position: Literal["rope", "learned", "none"] = _doc("Position encoding.", default="rope")
    rope_theta: float = _doc("RoPE base frequency.", default=10000.0)
    tie_embeddings: bool = _doc("Share the input embedding with the output head (GPT-2).", default=False)
    bias: bool = _doc("Biases in every linear layer and norm (GPT-2).", default=False)
    qkv_bias: Optional[bool] = _doc("Bias on the q/k/v projections only (Qwen2). null = same as `bias`.",
                                    default=None)
    dropout: float = _doc("Dropout probability on attention probabilities and residual branches.", default=0.0)
    init_std: float = _doc("Std of the normal init; output projections get std/sqrt(2*n_layers) (GPT-2/Megatron).",
                           default=0.02)
    attention: Literal["sdpa", "triton", "te"] = _doc(
        "Attention backend: torch scaled_dot_product_attention, Tessera's Triton flash attention, or "
        "Transformer Engine (when installed).", default="sdpa")
    fused_ops: bool = _doc("Use Tessera's fused Triton kernels for norms, RoPE, SwiGLU and cross entropy "
                           "where Triton can run; torch otherwise.", default=False)


@dataclass
class DatasetSpec:
    path: str = _doc("A Megatron .bin/.idx prefix, a text/jsonl file, or `builtin:pydoc` (the English "
                     "documentation text that ships with every CPython).", default="builtin:pydoc")
    weight: float = _doc("Blending weight relative to the other datasets of the same split.", default=1.0)
    name: Optional[str] = _doc("Name used in metrics (val_loss/<name>). null = derived from path.", default=None)


@dataclass
class DataConfig:
    tokenizer: str = _doc('"byte", "sentencepiece:PATH" or "hf:PATH" (a tokenizers JSON file).', default="byte")
    train: list[DatasetSpec] = _doc("Training datasets (blended by weight).",
                                    default_factory=lambda: [DatasetSpec()])
    valid: list[DatasetSpec] = _doc("Validation datasets, each reported separately. Empty = the validation "
                                    "part of `split` taken from the training data.", default_factory=list)
    seq_len: int = _doc("Tokens per training sample. 0 = model.max_seq_len.", default=0)
    split: str = _doc('Train/valid/test proportions of the training data, e.g. "98,2,0".', default="98,2,0")
    seed: int = _doc("Seed of the data order (shuffling); independent of the model seed.", default=1234)
    document_masking: bool = _doc("Reset position ids and block attention at document boundaries.",
                                  default=False)
    cache_dir: Optional[str] = _doc("Where built indices and preprocessed raw text go. null = "
                                    "<train.out_dir>/data_cache.", default=None)


@dataclass
class ParallelConfig:
    tp: int = _doc("Tensor-parallel size (ranks that split every layer).", default=1)
    pp: int = _doc("Pipeline-parallel size (stages of consecutive layers).", default=1)
    vpp: int = _doc("Virtual pipeline stages per rank (interleaved schedule).", default=1)
    dp: Union[int, Literal["auto"]] = _doc("Data-parallel size; auto = world_size / (tp*pp).", default="auto")
    sequence_parallel: bool = _doc("Megatron sequence parallelism (needs tp > 1).", default=False)
    zero: Literal[0, 1, 3] = _doc("0: replicated optimizer; 1: ZeRO-1 distributed optimizer; 3: FSDP2.",
                                  default=1)
    schedule: Literal["gpipe", "1f1b", "interleaved", "zb"] = _doc(
        "Pipeline schedule (zb = zero-bubble ZB-H1).", default="1f1b")
    pp_layout: Optional[list[int]] = _doc("Layers per pipeline stage (len = pp*vpp). null = even split.",
                                          default=None)
    timeout_minutes: float = _doc("Process-group timeout: how long a rank waits for a dead or hung peer.",
                                  default=10.0)


@dataclass
class TrainConfig:
    micro_batch_size: int = _doc("Samples per forward/backward on one data-parallel rank.", default=4)
    global_batch_size: int = _doc("Samples per optimizer step over all data-parallel ranks "
                                  "(gradient accumulation makes up the difference).", default=32)
    iters: int = _doc("Optimizer steps to train.", default=1000)
    eval_interval: int = _doc("Evaluate every N steps (and at the end); 0 = never.", default=200)
    eval_iters: int = _doc("Global batches per evaluation per validation set (as Megatron).", default=20)
    log_interval: int = _doc("Log metrics every N steps.", default=10)
    seed: int = _doc("Seed of initialisation and dropout.", default=1234)
    out_dir: str = _doc("Run directory: config.yaml, metrics.jsonl, tensorboard/, final weights.",
                        default="runs/default")
    device: Literal["auto", "cpu", "cuda"] = _doc("auto = cuda if available.", default="auto")
    compile: bool = _doc("torch.compile the model.", default=False)
    sample_prompt: Optional[str] = _doc("If set, generate a sample from this prompt at the end of training.",
                                        default=None)
    sample_tokens: int = _doc("Tokens generated for the end-of-training sample.", default=200)
    tensorboard: bool = _doc("Write TensorBoard event files to <out_dir>/tensorboard.", default=True)
    progress: bool = _doc("Show a progress bar (rank 0, interactive terminals).", default=True)


@dataclass
class OptimConfig:
    lr: float = _doc("Peak learning rate.", default=3.0e-4)
    min_lr: float = _doc("Learning rate at the end of the decay.", default=3.0e-5)
    weight_decay: float = _doc("AdamW decoupled weight decay (not applied to norms, biases).", default=0.1)
    betas: list[float] = _doc("AdamW betas.", default_factory=lambda: [0.9, 0.95])
    eps: float = _doc("AdamW epsilon.", default=1.0e-8)
    grad_clip: float = _doc("Clip the global gradient norm to this; 0 = no clipping.", default=1.0)
    warmup_iters: int = _doc("Linear warmup steps from warmup_init_lr to lr.", default=100)
    warmup_init_lr: float = _doc("Learning rate at step 0 of warmup.", default=0.0)
    decay: Literal["cosine", "linear", "wsd", "constant"] = _doc(
        "Decay after warmup: cosine/linear to min_lr, WSD (constant, then a final linear decay), or constant.",
        default="cosine")
    decay_iters: Optional[int] = _doc("Step at which decay reaches min_lr. null = train.iters.", default=None)
    wsd_decay_fraction: float = _doc("WSD: fraction of decay_iters spent in the final decay.", default=0.2)


@dataclass
class PrecisionConfig:
    dtype: Literal["fp32", "bf16", "fp16"] = _doc("Compute dtype (autocast); weights and optimizer stay fp32.",
                                                  default="bf16")
    initial_loss_scale: float = _doc("fp16: starting dynamic loss scale.", default=65536.0)
    loss_scale_window: int = _doc("fp16: grow the scale x2 after this many steps without overflow.",
                                  default=1000)
    min_loss_scale: float = _doc("fp16: never back off below this.", default=1.0)
    hysteresis: int = _doc("fp16: overflowing steps tolerated before the scale backs off.", default=2)


_SECTIONS = {
    "model": ModelConfig, "data": DataConfig, "parallel": ParallelConfig, "train": TrainConfig,
    "optim": OptimConfig, "precision": PrecisionConfig,
}


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)

    # ------------------------------------------------------------ derived values
    @property
    def seq_len(self) -> int:
        return self.data.seq_len or self.model.max_seq_len

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# --------------------------------------------------------------------------- building from dicts


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        (inner,) = typing.get_args(tp)
        return f"list[{_type_name(inner)}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp`; return it converted where lossless (int -> float)."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices and type(value) in {type(c) for c in choices}:
            return value
        raise ConfigError(f"{where}: expected one of {', '.join(repr(c) for c in choices)}, found {value!r}")
    if origin in (Union, types.UnionType):
        errors = []
        for arm in typing.get_args(tp):
            try:
                return _coerce(value, arm, where)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(f"{where}: expected {_type_name(tp)}, found {value!r}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{where}: expected null, found {value!r}")
    if origin is list:
        (inner,) = typing.get_args(tp)
        if inner is DatasetSpec and isinstance(value, (str, dict)):
            value = [value]  # shorthand: one dataset
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, found {value!r}")
        return [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if isinstance(value, str) and tp is DatasetSpec:
            value = {"path": value}  # shorthand: a bare path
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {tp.__name__} fields, found {value!r}")
        return _build(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, found {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, found {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where}: expected a number, found {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, found {value!r}")
    raise TypeError(f"unsupported config annotation {tp!r} at {where}")


def _unknown_key(cls: type, key: str, where: str) -> ConfigError:
    names = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(key, names, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    prefix = f"{where}." if where else ""
    return ConfigError(f"unknown key '{prefix}{key}'.{hint} Valid keys{' of ' + where if where else ''}: "
                       f"{', '.join(names)}")


def _build(cls: type, data: dict, where: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise _unknown_key(cls, str(key), where)
        kwargs[key] = _coerce(value, hints[key], f"{where}.{key}" if where else key)
    return cls(**kwargs)


def _deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=c` -> (["a", "b"], value parsed as YAML, so 3 -> int, true -> bool, [1,2] -> list)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected the form section.key=value, e.g. train.iters=50")
    key, raw = text.split("=", 1)
    path = key.strip().split(".")
    if not all(path):
        raise ConfigError(f"override {text!r}: empty key component in {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value {raw!r} is not valid YAML ({e})") from None
    return path, value


def _apply_override(tree: dict, path: list[str], value: Any) -> None:
    cls: Any = Config
    node = tree
    for i, part in enumerate(path):
        where = ".".join(path[:i])
        if not dataclasses.is_dataclass(cls):
            raise ConfigError(f"override {'.'.join(path)}: {where} is not a section")
        if part not in {f.name for f in dataclasses.fields(cls)}:
            raise _unknown_key(cls, part, where)
        if i == len(path) - 1:
            node[part] = value
        else:
            cls = typing.get_type_hints(cls)[part]
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {'.'.join(path)}: {'.'.join(path[:i + 1])} is not a section")


def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None,
                world_size: Optional[int] = None) -> Config:
    """Read YAML (optional), apply presets and `a.b=c` overrides, validate. Raises ConfigError."""
    tree: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            tree = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {str(p)!r}: expected a mapping of sections at the top level, "
                              f"found {type(tree).__name__}")
    for ov in overrides or []:
        keys, value = parse_override(ov)
        _apply_override(tree, keys, value)
    return config_from_dict(tree, world_size=world_size)


def config_from_dict(tree: dict, world_size: Optional[int] = None) -> Config:
    """Build and validate a Config from a nested dict (presets are applied under the model's own fields)."""
    tree = dict(tree)
    for key in tree:
        if key not in _SECTIONS:
            raise _unknown_key(Config, str(key), "")
    model = tree.get("model") or {}
    if not isinstance(model, dict):
        raise ConfigError(f"model: expected a mapping, found {model!r}")
    if model.get("preset") is not None:
        from engine.model.presets import get_preset  # local: presets import nothing from config

        model = _deep_merge(get_preset(model["preset"]), model)
        tree["model"] = model
    sections = {}
    for name, cls in _SECTIONS.items():
        value = tree.get(name) or {}
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping of {cls.__name__} fields, found {value!r}")
        sections[name] = _build(cls, value, name)
    cfg = Config(**sections)
    validate(cfg, world_size=world_size)
    return cfg


# --------------------------------------------------------------------------- cross-field checks


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def resolve_dp(cfg: Config, world_size: int) -> int:
    """Data-parallel size for a world of `world_size` ranks (checks that tp*pp*dp == world)."""
    p = cfg.parallel
    mp = p.tp * p.pp
    _check(world_size % mp == 0,
           f"parallel: tp*pp = {p.tp}*{p.pp} = {mp} does not divide the world size {world_size}")
    dp = world_size // mp if p.dp == "auto" else p.dp
    _check(p.tp * p.pp * dp == world_size,
           f"parallel: tp*pp*dp = {p.tp}*{p.pp}*{dp} = {p.tp * p.pp * dp} must equal the world size "
           f"{world_size}")
    return dp


def validate(cfg: Config, world_size: Optional[int] = None) -> None:
    m, d, p, t, o = cfg.model, cfg.data, cfg.parallel, cfg.train, cfg.optim
    for name in ("d_model", "n_layers", "n_heads", "max_seq_len", "vocab_pad_multiple"):
        _check(getattr(m, name) > 0, f"model.{name}: expected a positive integer, found {getattr(m, name)}")
    _check(m.vocab_size >= 0, f"model.vocab_size: expected >= 0 (0 = from tokenizer), found {m.vocab_size}")
    kv = m.n_kv_heads or m.n_heads
    _check(1 <= kv <= m.n_heads and m.n_heads % kv == 0,
           f"model.n_kv_heads: expected a divisor of n_heads={m.n_heads}, found {kv}")
    if m.head_dim is None:
        _check(m.d_model % m.n_heads == 0,
               f"model.d_model={m.d_model} is not divisible by model.n_heads={m.n_heads}; set model.head_dim "
               f"explicitly or choose divisible sizes")
    hd = m.head_dim or m.d_model // m.n_heads
    if m.position == "rope":
        _check(hd % 2 == 0, f"model.head_dim: RoPE needs an even head dimension, found {hd}")
    _check(0.0 <= m.dropout < 1.0, f"model.dropout: expected 0 <= p < 1, found {m.dropout}")
    _check(m.norm_eps > 0, f"model.norm_eps: expected > 0, found {m.norm_eps}")
    seq = cfg.seq_len
    _check(seq > 0, f"data.seq_len: expected > 0, found {seq}")
    _check(seq <= m.max_seq_len,
           f"data.seq_len={seq} exceeds model.max_seq_len={m.max_seq_len}")
    _check(len(d.train) > 0, "data.train: expected at least one dataset, found none")
    for i, ds in enumerate([*d.train, *d.valid]):
        _check(ds.weight > 0, f"data dataset {ds.path!r}: weight must be > 0, found {ds.weight}")
    try:
        parts = [float(x) for x in d.split.replace("/", ",").split(",")]
    except ValueError:
        raise ConfigError(f'data.split: expected comma-separated proportions like "98,2,0", found {d.split!r}')
    _check(len(parts) == 3 and all(x >= 0 for x in parts) and parts[0] > 0,
           f'data.split: expected three non-negative proportions with train > 0, like "98,2,0", found {d.split!r}')
    tok = d.tokenizer
    _check(tok == "byte" or tok.startswith(("sentencepiece:", "hf:")),
           f'data.tokenizer: expected "byte", "sentencepiece:PATH" or "hf:PATH", found {tok!r}')

    # parallel layout
    for name in ("tp", "pp", "vpp"):
        _check(getattr(p, name) >= 1, f"parallel.{name}: expected >= 1, found {getattr(p, name)}")
    if p.dp != "auto":
        _check(p.dp >= 1, f"parallel.dp: expected >= 1 or 'auto', found {p.dp}")
    _check(m.n_heads % p.tp == 0,
           f"parallel.tp={p.tp} must divide model.n_heads={m.n_heads}")
    _check(kv % p.tp == 0 or p.tp % kv == 0,
           f"parallel.tp={p.tp} and model.n_kv_heads={kv}: one must divide the other")
    _check(not p.sequence_parallel or p.tp > 1,
           "parallel.sequence_parallel: needs parallel.tp > 1")
    if p.sequence_parallel:
        _check(seq % p.tp == 0, f"parallel.sequence_parallel: data.seq_len={seq} must be divisible by tp={p.tp}")
    stages = p.pp * p.vpp
    if p.pp_layout is not None:
        _check(len(p.pp_layout) == stages and all(x >= 0 for x in p.pp_layout) and sum(p.pp_layout) == m.n_layers,
               f"parallel.pp_layout: expected {stages} non-negative layer counts (pp*vpp) summing to "
               f"model.n_layers={m.n_layers}, found {p.pp_layout}")
    else:
        _check(m.n_layers % stages == 0,
               f"model.n_layers={m.n_layers} does not divide into pp*vpp={p.pp}*{p.vpp}={stages} equal stages; "
               f"change the sizes or give parallel.pp_layout")
    _check(p.vpp == 1 or p.schedule == "interleaved",
           f"parallel.vpp={p.vpp} needs parallel.schedule='interleaved', found {p.schedule!r}")
    _check(p.zero != 3 or (p.tp == 1 and p.pp == 1),
           f"parallel.zero=3 (FSDP2) supports data parallelism only: expected parallel.tp=1 and parallel.pp=1, "
           f"found tp={p.tp}, pp={p.pp}; use parallel.zero=1 (ZeRO-1) with tensor or pipeline parallelism")
    _check(not cfg.train.compile or p.pp == 1,
           "train.compile=true is not supported with parallel.pp > 1 yet (pipeline stages run eagerly); "
           "set train.compile=false or parallel.pp=1")
    _check(p.timeout_minutes > 0, f"parallel.timeout_minutes: expected > 0, found {p.timeout_minutes}")

    # batch arithmetic
    _check(t.micro_batch_size >= 1, f"train.micro_batch_size: expected >= 1, found {t.micro_batch_size}")
    _check(t.global_batch_size >= 1, f"train.global_batch_size: expected >= 1, found {t.global_batch_size}")
    _check(t.iters >= 0, f"train.iters: expected >= 0, found {t.iters}")
    _check(t.log_interval >= 1, f"train.log_interval: expected >= 1, found {t.log_interval}")
    _check(t.eval_interval >= 0 and t.eval_iters >= 0, "train.eval_interval/eval_iters: expected >= 0")
    if world_size is not None:
        dp = resolve_dp(cfg, world_size)
        _check(t.global_batch_size % (t.micro_batch_size * dp) == 0,
               f"train.global_batch_size={t.global_batch_size} must be divisible by micro_batch_size*dp = "
               f"{t.micro_batch_size}*{dp} = {t.micro_batch_size * dp}")
        if p.schedule == "interleaved" and p.pp > 1:
            n_micro = t.global_batch_size // (t.micro_batch_size * dp)
            _check(n_micro % p.pp == 0,
                   f"parallel.schedule='interleaved': micro-batches per step ({n_micro}) must be a multiple "
                   f"of pp={p.pp}")
    else:
        _check(t.global_batch_size % t.micro_batch_size == 0,
               f"train.global_batch_size={t.global_batch_size} must be divisible by "
               f"train.micro_batch_size={t.micro_batch_size}")

    # optimizer
    _check(o.lr > 0 and 0 <= o.min_lr <= o.lr, f"optim: expected 0 <= min_lr <= lr and lr > 0, found "
                                                f"lr={o.lr}, min_lr={o.min_lr}")
    _check(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas),
           f"optim.betas: expected two numbers in [0, 1), found {o.betas}")
    _check(o.warmup_iters >= 0, f"optim.warmup_iters: expected >= 0, found {o.warmup_iters}")
    _check(o.grad_clip >= 0, f"optim.grad_clip: expected >= 0, found {o.grad_clip}")
    _check(0 < o.wsd_decay_fraction <= 1, f"optim.wsd_decay_fraction: expected in (0, 1], found "
                                          f"{o.wsd_decay_fraction}")
    if o.decay_iters is not None:
        _check(o.decay_iters > o.warmup_iters,
               f"optim.decay_iters={o.decay_iters} must be greater than optim.warmup_iters={o.warmup_iters}")
    if cfg.precision.dtype == "fp16":
        _check(cfg.precision.initial_loss_scale > 0, "precision.initial_loss_scale: expected > 0")


def field_docs(cls: type = Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted name, default, doc) for every leaf field: `tessera config show --doc` prints these."""
    rows = []
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        name = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            rows += field_docs(tp, name + ".")
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)  # type: ignore[misc]
        rows.append((name, repr(default), f.metadata.get("doc", "")))
    return rows
