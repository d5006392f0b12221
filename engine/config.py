"""Configuration: dataclasses whose fields carry their documentation, YAML loading,
`a.b=c` overrides with type checks, and strict cross-field validation.

Every error is a `ConfigError` with one message that names the field, what was
expected and what was found. Validation runs before any process group or file is
touched, so a typo never costs a cluster allocation.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from engine.errors import ConfigError


class _Bounds(typing.NamedTuple):
    """An interval of valid values, written as in mathematics: "[0, 1)", "(0, inf)", "[1, inf)"."""

    lo: float
    hi: float
    lo_open: bool
    hi_open: bool

    @classmethod
    def parse(cls, text: str) -> "_Bounds":
        m = re.fullmatch(r"\s*([\[(])\s*([^,\s]+)\s*,\s*([^,\s]+)\s*([\])])\s*", text)
        if m is None:
            raise ValueError(f"bad interval {text!r}")
        lo, hi = (float(x) if "." in x or "inf" in x or "e" in x else int(x) for x in (m[2], m[3]))
        return cls(lo, hi, m[1] == "(", m[4] == ")")

    def __contains__(self, x: object) -> bool:
        return (self.lo < x if self.lo_open else self.lo <= x) and (x < self.hi if self.hi_open else x <= self.hi)

    def describe(self, integer: bool) -> str:
        """'a positive integer', 'a finite number > 0', 'a number in [0, 1)' ..."""
        if self.hi == math.inf:
            if integer and (self.lo, self.lo_open) in ((1, False), (0, True)):
                return "a positive integer"
            if integer and (self.lo, self.lo_open) == (0, False):
                return "a non-negative integer"
            return f"{'an integer' if integer else 'a finite number'} {'>' if self.lo_open else '>='} {self.lo}"
        interval = f"{'(' if self.lo_open else '['}{self.lo}, {self.hi}{')' if self.hi_open else ']'}"
        return f"{'an integer' if integer else 'a number'} in {interval}"


def _doc(text: str, *, bounds: Optional[str] = None, path: Optional[str] = None,
         metadata_alias: Optional[str] = None, **kw: Any) -> Any:
    """A dataclass field whose documentation lives in its metadata (shown by `config show --doc`).

    `bounds`: the interval of valid values of a number (or of each number of a list), checked by
    `validate` (every float field must also be finite). `path`: the field is a path, described so
    (e.g. "a directory path"): it must not be empty or blank (null stays allowed where the type allows it).
    """
    meta: dict[str, Any] = {"doc": text}
    if bounds is not None:
        meta["bounds"] = _Bounds.parse(bounds)
    if path is not None:
        meta["path"] = path
    if metadata_alias is not None:  # another key accepted in YAML and overrides (a Python keyword: `async`)
        meta["alias"] = metadata_alias
    return field(metadata=meta, **kw)


_SEED_BOUNDS = f"[0, {2 ** 32 - 1}]"


# --------------------------------------------------------------------------- sections


@dataclass
class ModelConfig:
    preset: Optional[str] = _doc(
        "Name of a preset in engine/model/presets.py (gpt2, gpt2-medium, llama, llama2-7b, llama3-8b, "
        "qwen2, mistral, tiny ...). Its values are applied first; fields given here override them.",
        default=None)
    vocab_size: int = _doc("Tokenizer vocabulary size (before padding). 0 = take it from the tokenizer.", default=0,
                      bounds="[0, inf)")
    vocab_pad_multiple: int = _doc(
        "Pad the embedding/output vocabulary to a multiple of this (and of tp) for fast matmuls; "
        "padded logits never enter the loss.", default=128, bounds="[1, inf)")
    d_model: int = _doc("Hidden size.", default=512, bounds="[1, inf)")
    n_layers: int = _doc("Number of transformer blocks.", default=8, bounds="[1, inf)")
    n_heads: int = _doc("Number of attention (query) heads.", default=8, bounds="[1, inf)")
    n_kv_heads: Optional[int] = _doc("Key/value heads: = n_heads for MHA, < n_heads for GQA, 1 for MQA. "
                                     "null = n_heads.", default=None, bounds="[1, inf)")
    head_dim: Optional[int] = _doc("Per-head dimension. null = d_model // n_heads.", default=None,
                                   bounds="[1, inf)")
    ffn_hidden: Optional[int] = _doc(
        "MLP hidden size. null = 4*d_model for gelu/relu, or Llama's rule (2/3 * 4*d_model rounded up "
        "to a multiple of 256) for swiglu.", default=None, bounds="[1, inf)")
    max_seq_len: int = _doc("Longest sequence the model supports (learned position table size, RoPE cache).",
                            default=1024, bounds="[1, inf)")
    norm: Literal["rmsnorm", "layernorm"] = _doc("Normalisation layer.", default="rmsnorm")
    norm_eps: float = _doc("Epsilon of the normalisation layers.", default=1e-5, bounds="(0, inf)")
    activation: Literal["swiglu", "gelu", "gelu_exact", "relu"] = _doc(
        "MLP activation: swiglu (gate and up projections), gelu (the tanh approximation, GPT-2), gelu_exact "
        "(the erf form, BERT's \"gelu\") or relu.", default="swiglu")
    position: Literal["rope", "learned", "none"] = _doc("Position encoding.", default="rope")
    rope_theta: float = _doc("RoPE base frequency.", default=10000.0, bounds="(0, inf)")
    rope_scaling: Literal["none", "llama3"] = _doc(
        "RoPE frequency scaling: none, or llama3 (Llama 3.1/3.2: low frequencies divided by rope_scaling_factor, "
        "high ones kept, a smooth blend between; the four rope_* fields below are its parameters).",
        default="none")
    rope_scaling_factor: float = _doc("llama3 scaling: the factor low frequencies are divided by (HF `factor`).",
                                      default=8.0, bounds="[1, inf)")
    rope_low_freq_factor: float = _doc("llama3 scaling: wavelengths above original_max_seq_len / this are "
                                       "scaled (HF `low_freq_factor`).", default=1.0, bounds="(0, inf)")
    rope_high_freq_factor: float = _doc("llama3 scaling: wavelengths below original_max_seq_len / this are "
                                        "kept (HF `high_freq_factor`).", default=4.0, bounds="(0, inf)")
    rope_original_max_seq_len: int = _doc("llama3 scaling: the context length the model was first trained at "
                                          "(HF `original_max_position_embeddings`).", default=8192,
                                          bounds="[1, inf)")
    tie_embeddings: bool = _doc("Share the input embedding with the output head (GPT-2).", default=False)
    bias: bool = _doc("Biases in every linear layer and norm (GPT-2).", default=False)
    qkv_bias: Optional[bool] = _doc("Bias on the q/k/v projections only (Qwen2). null = same as `bias`.",
                                    default=None)
    dropout: float = _doc("Dropout probability on attention probabilities and residual branches.", default=0.0,
                         bounds="[0, 1)")
    init_std: float = _doc("Std of the normal init; output projections get std/sqrt(2*n_layers) (GPT-2/Megatron).",
                           default=0.02, bounds="(0, inf)")
    attention: Literal["sdpa", "triton", "te"] = _doc(
        "Attention backend: torch scaled_dot_product_attention, Tessera's Triton flash attention, or "
        "Transformer Engine (when installed).", default="sdpa")
    fused_ops: bool = _doc("Use Tessera's fused Triton kernels for norms, RoPE, SwiGLU and cross entropy "
                           "where Triton can run; torch otherwise.", default=False)
    encoder: bool = _doc(
        "The encoder variant (BERT): bidirectional attention, token-type embeddings (type_vocab_size) and the "
        "masked-LM head (dense D->D, activation (gelu_exact when activation is swiglu), norm, the vocabulary "
        "projection with the tied embedding or the untied head, plus a bias); trained with train.objective mlm "
        "or mlm+nsp. BERT itself also sets norm_position=post, embed_norm and binary_head (preset bert-base).",
        default=False)
    type_vocab_size: int = _doc("Encoder: rows of the token-type (segment) embedding added to the word and "
                                "position embeddings (BERT: 2); 0 = none. Unused by the decoder.", default=2,
                                bounds="[0, inf)")
    norm_position: Literal["pre", "post"] = _doc(
        "pre: x + f(norm(x)) and a final norm before the head (GPT-2, Llama); post: norm(x + f(x)) and no final "
        "norm (BERT, the original Transformer).", default="pre")
    embed_norm: bool = _doc("A norm right after the embedding sum, before the embedding dropout (BERT's "
                            "embeddings.LayerNorm).", default=False)
    binary_head: bool = _doc("Encoder: the pooler (dense D->D + tanh on the first token) and a two-way "
                             "sentence-pair head (BERT's next-sentence prediction, train.objective mlm+nsp).",
                             default=False)


@dataclass
class DatasetSpec:
    path: str = _doc("A Megatron .bin/.idx prefix, a text/jsonl file, `builtin:pydoc` (the English "
                     "documentation text that ships with every CPython) or `builtin:stdlib` (the source of its "
                     "standard library's Python modules).", default="builtin:pydoc",
                     path="a file path, a .bin/.idx prefix or builtin:pydoc")
    weight: float = _doc("Blending weight relative to the other datasets of the same split.", default=1.0,
                          bounds="(0, inf)")
    name: Optional[str] = _doc(
        "Name used in metrics (val_loss/<name>) and in cache file names: 1-100 letters, digits, '.', '_' or '-', "
        "not starting with '.', unique within its split. null = derived from path.", default=None)


@dataclass
class DataConfig:
    tokenizer: str = _doc('"byte", "sentencepiece:PATH" or "hf:PATH" (a tokenizers JSON file).', default="byte")
    train: list[DatasetSpec] = _doc("Training datasets (blended by weight).",
                                    default_factory=lambda: [DatasetSpec()])
    valid: list[DatasetSpec] = _doc("Validation datasets, each reported separately. Empty = the validation "
                                    "part of `split` taken from the training data.", default_factory=list)
    seq_len: int = _doc("Tokens per training sample. 0 = model.max_seq_len.", default=0, bounds="[0, inf)")
    split: str = _doc('Train/valid/test proportions of the training data, e.g. "98,2,0".', default="98,2,0")
    seed: int = _doc("Seed of the data order (shuffling); independent of the model seed.", default=1234,
                      bounds=_SEED_BOUNDS)
    document_masking: bool = _doc("Reset position ids and block attention at document boundaries.",
                                  default=False)
    cache_dir: Optional[str] = _doc("Where built indices and preprocessed raw text go. null = "
                                    "<train.out_dir>/data_cache.", default=None,
                                    path="a directory path")
    verify_token_ids: Literal["meta", "scan"] = _doc(
        "How token ids are checked against the vocabulary before training: 'meta' trusts the max id recorded "
        "in the dataset's meta.json (and scans when there is none), 'scan' always reads every token.",
        default="meta")


@dataclass
class ParallelConfig:
    tp: int = _doc("Tensor-parallel size (ranks that split every layer).", default=1, bounds="[1, inf)")
    pp: int = _doc("Pipeline-parallel size (stages of consecutive layers).", default=1, bounds="[1, inf)")
    vpp: int = _doc("Virtual pipeline stages per rank (interleaved schedule).", default=1, bounds="[1, inf)")
    dp: Union[int, Literal["auto"]] = _doc("Data-parallel size; auto = world_size / (tp*pp).", default="auto",
                                          bounds="[1, inf)")
    sequence_parallel: bool = _doc("Megatron sequence parallelism (needs tp > 1).", default=False)
    zero: Literal[0, 1, 3] = _doc("0: replicated optimizer; 1: ZeRO-1 distributed optimizer; 3: FSDP2.",
                                  default=1)
    schedule: Literal["gpipe", "1f1b", "interleaved", "zb"] = _doc(
        "Pipeline schedule (zb = zero-bubble ZB-H1).", default="1f1b")
    pp_layout: Optional[list[int]] = _doc("Layers per pipeline stage (len = pp*vpp). null = even split.",
                                          default=None, bounds="[0, inf)")
    timeout_minutes: float = _doc("Process-group timeout: how long a rank waits for a dead or hung peer "
                                  "(minutes).", default=10.0, bounds="(0, 1000000]")


@dataclass
class TrainConfig:
    micro_batch_size: int = _doc("Samples per forward/backward on one data-parallel rank.", default=4,
                                 bounds="[1, inf)")
    global_batch_size: int = _doc("Samples per optimizer step over all data-parallel ranks "
                                  "(gradient accumulation makes up the difference).", default=32, bounds="[1, inf)")
    iters: int = _doc("Optimizer steps to train.", default=1000, bounds="[0, inf)")
    eval_interval: int = _doc("Evaluate every N steps (and at the end); 0 = never.", default=200,
                             bounds="[0, inf)")
    eval_iters: int = _doc("Global batches per evaluation per validation set (as Megatron).", default=20,
                         bounds="[0, inf)")
    log_interval: int = _doc("Log metrics every N steps.", default=10, bounds="[1, inf)")
    seed: int = _doc("Seed of initialisation and dropout.", default=1234, bounds=_SEED_BOUNDS)
    out_dir: str = _doc("Run directory: config.yaml, metrics.jsonl, tensorboard/, final weights.",
                        default="runs/default", path="a directory path")
    device: Literal["auto", "cpu", "cuda"] = _doc("auto = cuda if available.", default="auto")
    compile: bool = _doc("torch.compile each Transformer block (every chunk, every pipeline stage); the embedding, "
                         "head and loss stay eager. Not with precision.fp8.", default=False)
    recompute: Literal["none", "selective", "full"] = _doc(
        "Activation recompute: none; selective = the attention core of every block (softmax(QK^T)V and its "
        "dropout, recomputed in the backward); full = whole blocks (every recompute_every-th one), keeping "
        "only their inputs.", default="none")
    recompute_every: int = _doc("recompute=full: recompute the blocks whose global layer index is a multiple of "
                                "N (1 = every block, 2 = blocks 0, 2, 4, ...); other modes need 1.", default=1,
                                bounds="[1, inf)")
    eval_at_start: Optional[bool] = _doc(
        "Evaluate before the first update (step 0 of the run), the baseline of `val_delta/<name>` (each "
        "validation set's change since then: forgetting and adaptation). null = when the run starts from prior "
        "weights (checkpoint.init_from); a resume keeps its run's baseline.", default=None)
    sample_prompt: Optional[str] = _doc("If set, generate a sample from this prompt at the end of training.",
                                        default=None)
    sample_tokens: int = _doc("Tokens generated for the end-of-training sample.", default=200,
                             bounds="[0, inf)")
    tensorboard: bool = _doc("Write TensorBoard event files to <out_dir>/tensorboard.", default=True)
    progress: bool = _doc("Show a progress bar (rank 0, interactive terminals).", default=True)
    allow_foreign_dir: bool = _doc("Train into an existing directory that is not a Tessera run directory; its "
                                   "files are left alone.", default=False)
    max_bad_steps: int = _doc("Stop after this many skipped steps (non-finite loss or grad norm, or a loss spike) "
                              "within bad_step_window steps; 0 = never stop.", default=5, bounds="[0, inf)")
    bad_step_window: int = _doc("The window (in steps) over which max_bad_steps counts skipped steps "
                                "(>= max_bad_steps when max_bad_steps > 0).", default=100, bounds="[0, inf)")
    loss_spike_zscore: float = _doc("Skip a step whose loss is this many standard deviations above the mean of "
                                    "the last loss_spike_window steps; 0 = off.", default=0.0, bounds="[0, inf)")
    loss_spike_window: int = _doc("Steps of loss history for loss_spike_zscore (>= 2 when it is on).", default=50,
                                  bounds="[0, inf)")
    straggler_factor: float = _doc("At each log interval, flag ranks whose step time exceeds the median of all "
                                   "ranks by this factor.", default=1.5, bounds="(1, inf)")
    objective: Literal["causal", "mlm", "mlm+nsp"] = _doc(
        "Training objective: causal (next-token prediction), mlm (BERT masked-LM: predict the chosen positions "
        "of a bidirectional encoder) or mlm+nsp (masked-LM plus next-sentence prediction on sentence pairs). "
        "mlm needs model.encoder; mlm+nsp also model.binary_head.", default="causal")
    mask_prob: float = _doc("mlm: fraction of a sample's maskable tokens (all but [CLS], [SEP], [PAD]) that are "
                            "chosen for prediction.", default=0.15, bounds="(0, 1)")
    mask_replace: float = _doc("mlm: of the chosen positions, the fraction shown as [MASK] in the input.",
                               default=0.8, bounds="[0, 1]")
    mask_random: float = _doc("mlm: of the chosen positions, the fraction shown as a random token (the rest, "
                              "1 - mask_replace - mask_random, keep their token).", default=0.1, bounds="[0, 1]")
    whole_word_masking: bool = _doc("mlm: choose whole words (every token of a word together), for tokenizers "
                                    "that mark word starts.", default=False)
    nsp_weight: float = _doc("mlm+nsp: weight of the next-sentence loss added to the masked-LM loss.",
                             default=1.0, bounds="[0, inf)")


@dataclass
class OptimConfig:
    lr: float = _doc("Peak learning rate.", default=3.0e-4, bounds="(0, inf)")
    min_lr: float = _doc("Learning rate at the end of the decay (<= lr).", default=3.0e-5, bounds="[0, inf)")
    weight_decay: float = _doc("AdamW decoupled weight decay (not applied to norms, biases).", default=0.1,
                              bounds="[0, inf)")
    betas: list[float] = _doc("AdamW betas: two numbers in [0, 1).", default_factory=lambda: [0.9, 0.95],
                               bounds="[0, 1)")
    eps: float = _doc("AdamW epsilon.", default=1.0e-8, bounds="(0, inf)")
    grad_clip: float = _doc("Clip the global gradient norm to this; 0 = no clipping.", default=1.0,
                            bounds="[0, inf)")
    warmup_iters: int = _doc("Linear warmup steps from warmup_init_lr to lr.", default=100,
                             bounds="[0, inf)")
    warmup_init_lr: float = _doc("Learning rate warmup starts from (<= lr): update i < warmup_iters uses "
                                 "warmup_init_lr + (lr - warmup_init_lr) * (i+1) / warmup_iters. A second phase "
                                 "(continued pretraining) re-warms from the first phase's min_lr by setting it "
                                 "here.", default=0.0, bounds="[0, inf)")
    decay: Literal["cosine", "linear", "wsd", "constant"] = _doc(
        "Decay after warmup: cosine/linear to min_lr, WSD (constant, then a final decay in wsd_decay_shape), or "
        "constant (with cooldown_iters: constant, then a final cooldown ending at decay_iters or train.iters).",
        default="cosine")
    decay_iters: Optional[int] = _doc("Step at which decay reaches min_lr (> warmup_iters). null = train.iters.",
                                    default=None, bounds="[1, inf)")
    wsd_decay_fraction: float = _doc("WSD: fraction of the steps from the end of warmup to decay_iters spent in "
                                     "the final decay (unused when cooldown_iters is set).", default=0.2,
                                     bounds="(0, 1]")
    wsd_decay_shape: Literal["linear", "cosine", "1-sqrt"] = _doc(
        "WSD (and constant's cooldown): shape of the final decay from lr to min_lr over its progress q in [0, 1]: "
        "linear, cosine (half cosine) or 1-sqrt (lr = min_lr + (lr - min_lr) * (1 - sqrt(q)), Hagele et al. "
        "2024).", default="linear")
    cooldown_iters: Optional[int] = _doc(
        "decay wsd or constant: length in steps of the final decay to min_lr, which ends at decay_iters (null = "
        "train.iters); lr is held until then. With decay_iters null the cooldown follows train.iters, so an "
        "open-ended run is extended by raising train.iters on resume (before its cooldown has begun). null = "
        "constant: no cooldown; wsd: wsd_decay_fraction.", default=None, bounds="[1, inf)")


@dataclass
class Fp8Config:
    recipe: Literal["tensorwise", "rowwise", "delayed"] = _doc(
        "FP8 scaling: tensorwise (one scale per tensor from its current amax), rowwise (one power-of-two scale "
        "per row), delayed (scales from the amax history of past steps).", default="tensorwise")
    backend: Literal["native", "te"] = _doc(
        "native = torch._scaled_mm layers; te = Transformer Engine (only when it is importable).", default="native")
    keep_high_precision: list[str] = _doc(
        "Linears kept in the compute dtype besides the embedding, output head, norms and attention core (always): "
        "first_block, last_block, or fnmatch patterns over module names (e.g. layers.*.mlp.down_proj). An entry "
        "matching no linear is an error.", default_factory=list)
    amax_history_len: int = _doc("delayed: optimizer steps of amax history a scale is computed from.", default=16,
                                 bounds="[1, inf)")
    margin: int = _doc("delayed: scales are divided by 2^margin (headroom against growing amaxes).", default=0,
                       bounds="[0, inf)")


@dataclass
class PrecisionConfig:
    dtype: Literal["fp32", "bf16", "fp16"] = _doc("Compute dtype (autocast); weights and optimizer stay fp32.",
                                                  default="bf16")
    fp8: Optional[Fp8Config] = _doc(
        "FP8 matmuls in the transformer blocks' linears: null = off, or a mapping {recipe, backend, "
        "keep_high_precision, amax_history_len, margin} (see docs/fp8.md). e4m3 weights/activations, e5m2 "
        "gradients.", default=None)
    initial_loss_scale: float = _doc("fp16: starting dynamic loss scale.", default=65536.0,
                                     bounds="(0, inf)")
    loss_scale_window: int = _doc("fp16: grow the scale x2 after this many steps without overflow.",
                                  default=1000, bounds="[1, inf)")
    min_loss_scale: float = _doc("fp16: never back off below this (<= initial_loss_scale).", default=1.0,
                                 bounds="(0, inf)")
    hysteresis: int = _doc("fp16: overflowing steps tolerated before the scale backs off.", default=2,
                         bounds="[1, inf)")


@dataclass
class CheckpointConfig:
    dir: Optional[str] = _doc("Checkpoint root (step-NNNNNNN/ directories and `latest`). null = no checkpoints. "
                              "A checkpoint is written every `interval` steps and at the end of training.",
                              default=None, path="a directory path")
    interval: int = _doc("Save every N steps; 0 = only at the end (and on SIGTERM/SIGUSR1/time_limit).",
                         default=0, bounds="[0, inf)")
    keep: int = _doc("Keep the last N complete checkpoints (never the one `latest` names); 0 = keep all.",
                     default=3, bounds="[0, inf)")
    keep_every: int = _doc("Also keep every checkpoint whose step is a multiple of this; 0 = off.", default=0,
                           bounds="[0, inf)")
    async_save: bool = _doc("Write in the background (YAML key `async` works too): training is blocked only "
                            "while the state is copied to host memory.", default=False, metadata_alias="async")
    load: Optional[str] = _doc("Resume from this checkpoint (a step-NNNNNNN/ directory, or a checkpoint root = "
                               "the one its `latest` names), or `auto` = the latest complete one in `dir` "
                               "(nothing if there is none).", default=None, path="a checkpoint path or auto")
    time_limit: Optional[float] = _doc("Wall-clock budget of this job in minutes: save and exit (code 75) before "
                                       "it runs out. null = none.", default=None, bounds="(0, inf)")
    init_from: Optional[str] = _doc("Start from these weights with a fresh optimizer, schedule and data "
                                    "position: a checkpoint path as for `load` (any layout), or hf:DIR = a "
                                    "Hugging Face model directory (Llama, Mistral, Qwen2, GPT-2), whose "
                                    "config.json then sets the model's architecture fields. Ignored when `load` "
                                    "finds a checkpoint.", default=None,
                                    path="a checkpoint path or hf:DIR")
    reset_optimizer: bool = _doc("init_from: start with fresh optimizer moments (true), or take the checkpoint's "
                                 "(false; our checkpoints with optimizer state only, any layout).", default=True)
    reset_schedule: bool = _doc("init_from: the iteration counter and the LR schedule start at start_iteration "
                                "(true), or continue from the checkpoint's iteration (false).", default=True)
    reset_data: bool = _doc("init_from: the training data starts at its beginning (true), or continues at the "
                            "checkpoint's data position (false; the same datasets, by name).", default=True)
    new_token_init: Optional[Literal["mean_cov", "zeros"]] = _doc(
        "init_from with a grown tokenizer (`tessera tokenizer extend`: the same ids plus new ones): how the new "
        "embedding/head rows start -- mean_cov = drawn from a normal with the mean and covariance of the existing "
        "rows, zeros. The existing rows are loaded unchanged. null = a vocabulary larger than the checkpoint's "
        "is an error.", default=None)
    start_iteration: Optional[int] = _doc("init_from with reset_schedule: the iteration (and LR schedule "
                                          "position) the new run starts at. null = 0.", default=None,
                                          bounds="[0, inf)")


_SECTIONS = {
    "model": ModelConfig, "data": DataConfig, "parallel": ParallelConfig, "train": TrainConfig,
    "optim": OptimConfig, "precision": PrecisionConfig, "checkpoint": CheckpointConfig,
}


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    # ------------------------------------------------------------ derived values
    @property
    def seq_len(self) -> int:
        return self.data.seq_len or self.model.max_seq_len

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return dump_yaml(self.to_dict())


# --------------------------------------------------------------------------- YAML

_FLOAT_TAG = "tag:yaml.org,2002:float"
# YAML 1.2's float grammar -- an exponent needs no dot (1e-3, 2E5) and its sign is optional (1.0e5),
# a leading dot may carry a sign (-.5) -- plus what YAML 1.1 (PyYAML's default) also reads as floats:
# digit-separating underscores (1_000.0) and base-60 (1:30.0). Plain integers (12, 1_000) stay integers.
_FLOAT_RE = re.compile(r"""^(?:
      [-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    | [-+]?\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?
    | [-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
    | [-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*
    | [-+]?\.(?:inf|Inf|INF)
    | \.(?:nan|NaN|NAN))$""", re.X)


def _resolvers(base: dict) -> dict:
    """PyYAML's implicit resolvers with YAML 1.2 floats, and without timestamps (no field takes a date,
    and a bare 2024-01-01 stays the string it looks like)."""
    out: dict = {}
    for first, pairs in base.items():
        kept = [(tag, _FLOAT_RE if tag == _FLOAT_TAG else rx) for tag, rx in pairs
                if tag != "tag:yaml.org,2002:timestamp"]
        if kept:
            out[first] = kept
    return out


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 floats (`1e-3` is a number, not a string)."""


class _Dumper(yaml.SafeDumper):
    """SafeDumper resolving as `_Loader` reads, so a string such as '1e-3' is written quoted."""


_Loader.yaml_implicit_resolvers = _resolvers(yaml.SafeLoader.yaml_implicit_resolvers)
_Dumper.yaml_implicit_resolvers = _resolvers(yaml.SafeDumper.yaml_implicit_resolvers)
_MERGE_TAG = "tag:yaml.org,2002:merge"


def _reject_duplicate_keys(loader: _Loader, root: yaml.Node, source: str) -> None:
    """A key given twice in one mapping (YAML keeps the last silently) -> ConfigError with both lines."""
    stack: list[tuple[yaml.Node, str]] = [(root, "")]
    seen: set[int] = set()
    while stack:
        node, where = stack.pop()
        if id(node) in seen:  # aliases share nodes (and may form cycles)
            continue
        seen.add(id(node))
        children: list[tuple[yaml.Node, str]] = []
        if isinstance(node, yaml.MappingNode):
            first: dict[Any, int] = {}
            for key_node, value_node in node.value:
                if key_node.tag == _MERGE_TAG:  # `<<: *base`: explicit keys may override merged ones
                    children.append((value_node, where))
                    continue
                if not isinstance(key_node, yaml.ScalarNode):
                    children.append((value_node, where))
                    continue
                try:
                    key = loader.construct_object(key_node)
                    hash(key)
                except Exception:  # reported when the document is constructed
                    key = (key_node.tag, key_node.value)
                name = f"{where}.{key}" if where else str(key)
                line = key_node.start_mark.line + 1
                if key in first:
                    raise ConfigError(f"{source}: duplicate key {name!r} at line {line} (first given at line "
                                      f"{first[key]}); give each key once")
                first[key] = line
                children.append((value_node, name))
        elif isinstance(node, yaml.SequenceNode):
            children = [(item, f"{where}[{i}]") for i, item in enumerate(node.value)]
        stack.extend(reversed(children))  # depth first, in document order


def load_yaml(text: str, source: str = "YAML") -> Any:
    """Parse YAML as configs are read (YAML 1.2 floats, duplicate keys rejected). Raises ConfigError;
    `source` names the text in messages, e.g. "config file 'a.yaml'"."""
    loader = None
    try:
        loader = _Loader(text)  # the reader already rejects non-printable characters
        node = loader.get_single_node()
        if node is None:
            return None
        _reject_duplicate_keys(loader, node, source)
        return loader.construct_document(node)
    except ConfigError:
        raise
    except yaml.YAMLError as e:
        raise ConfigError(f"{source} is not valid YAML: {' '.join(str(e).split())}") from None
    except (ValueError, OverflowError) as e:  # e.g. 0x_ (int("", 16)), an integer of 5000 digits
        raise ConfigError(f"{source}: a value cannot be read ({' '.join(str(e).split())})") from None
    except RecursionError:
        raise ConfigError(f"{source}: nested too deeply") from None
    finally:
        if loader is not None:
            loader.dispose()


def dump_yaml(data: Any) -> str:
    """YAML text that `load_yaml` reads back as `data`."""
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False)


# --------------------------------------------------------------------------- building from dicts

_INT64 = 2 ** 63


def _found(value: Any, limit: int = 160) -> str:
    """repr(value) for a message, shortened (and safe for integers too long to print)."""
    try:
        text = repr(value)
    except ValueError:
        return "a value too large to print"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _int_size(value: int) -> str:
    return f"an integer of about {int(value.bit_length() * math.log10(2)) + 1} digits"


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
        if type(value) in {type(c) for c in choices} and value in choices:
            return value
        raise ConfigError(f"{where}: expected one of {', '.join(repr(c) for c in choices)}, found {_found(value)}")
    if origin in (Union, types.UnionType):
        section = _section_type(tp)
        if section is not tp and isinstance(value, dict):  # an optional section given: its own errors name the key
            return _coerce(value, section, where)
        for arm in typing.get_args(tp):
            try:
                return _coerce(value, arm, where)
            except ConfigError:
                pass
        raise ConfigError(f"{where}: expected {_type_name(tp)}, found {_found(value)}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{where}: expected null, found {_found(value)}")
    if origin is list:
        (inner,) = typing.get_args(tp)
        if inner is DatasetSpec and isinstance(value, (str, dict)):
            value = [value]  # shorthand: one dataset
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, found {_found(value)}")
        return [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if isinstance(value, str) and tp is DatasetSpec:
            value = {"path": value}  # shorthand: a bare path
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {tp.__name__} fields, found {_found(value)}")
        return _build(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, found {_found(value)}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            if -_INT64 <= value < _INT64:
                return value
            raise ConfigError(f"{where}: expected a 64-bit integer, found {_int_size(value)}")
        raise ConfigError(f"{where}: expected an integer, found {_found(value)}")
    if tp is float:
        if isinstance(value, int) and not isinstance(value, bool):
            if -_INT64 <= value < _INT64:
                return float(value)
            raise ConfigError(f"{where}: expected a finite number, found {_int_size(value)}")
        if isinstance(value, float):
            return value
        raise ConfigError(f"{where}: expected a number, found {_found(value)}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, found {_found(value)}")
    raise TypeError(f"unsupported config annotation {tp!r} at {where}")


def _key_text(key: Any) -> str:
    """A key as the error shows it: plain when it is a printable name, else its repr (one line)."""
    return key if isinstance(key, str) and key.isprintable() else _found(key)


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
    aliases = {f.metadata["alias"]: f.name for f in dataclasses.fields(cls) if "alias" in f.metadata}
    kwargs = {}
    for key, value in data.items():
        if key in aliases:
            if aliases[key] in data:
                raise ConfigError(f"{where}.{key} and {where}.{aliases[key]} are the same setting; give one")
            key = aliases[key]
        if key not in fields:
            raise _unknown_key(cls, _key_text(key), where)
        kwargs[key] = _coerce(value, hints[key], f"{where}.{key}" if where else key)
    return cls(**kwargs)


def _deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=c` -> (["a", "b"], value parsed as YAML, so 3 -> int, 1e-3 -> float, true -> bool, [1,2] -> list)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected the form section.key=value, e.g. train.iters=50")
    key, raw = text.split("=", 1)
    path = key.strip().split(".")
    if not all(path):
        raise ConfigError(f"override {text!r}: empty key component in {key!r}")
    value = load_yaml(raw, f"override {text!r}: value {raw!r}") if raw.strip() != "" else ""
    return path, value


def _section_type(tp: Any) -> Any:
    """The dataclass of an optional section (Optional[Fp8Config] -> Fp8Config), else `tp` itself."""
    arms = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (Union, types.UnionType) and len(arms) == 1 and dataclasses.is_dataclass(arms[0]):
        return arms[0]
    return tp


def _apply_override(tree: dict, path: list[str], value: Any) -> None:
    cls: Any = Config
    node = tree
    for i, part in enumerate(path):
        where = ".".join(path[:i])
        if not dataclasses.is_dataclass(cls):
            raise ConfigError(f"override {'.'.join(path)}: {where} is not a section")
        names = {f.name for f in dataclasses.fields(cls)}
        aliases = {f.metadata["alias"]: f.name for f in dataclasses.fields(cls) if "alias" in f.metadata}
        if part in aliases:
            part = aliases[part]
        if part not in names:
            raise _unknown_key(cls, part, where)
        if i == len(path) - 1:
            for alias, name in aliases.items():  # an override replaces the file's value given by the alias
                if name == part:
                    node.pop(alias, None)
            node[part] = value
        else:
            cls = _section_type(typing.get_type_hints(cls)[part])
            if node.get(part) is None:  # absent, or an empty `section:` in the file
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise ConfigError(f"override {'.'.join(path)}: {'.'.join(path[:i + 1])} is not a section")


def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None,
                world_size: Optional[int] = None) -> Config:
    """Read YAML (optional), apply presets and `a.b=c` overrides, validate. Raises ConfigError."""
    tree: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist (or is not a file)")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"config file {str(p)!r}: expected UTF-8 text, found {e.reason} at byte "
                              f"{e.start}") from None
        except OSError as e:
            raise ConfigError(f"config file {str(p)!r} cannot be read: {e.strerror or e}") from None
        tree = load_yaml(text, f"config file {str(p)!r}")
        if tree is None:
            tree = {}
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {str(p)!r}: expected a mapping of sections at the top level, "
                              f"found {type(tree).__name__}")
    for ov in overrides or []:
        keys, value = parse_override(ov)
        _apply_override(tree, keys, value)
    return config_from_dict(tree, world_size=world_size)


def config_from_dict(tree: dict, world_size: Optional[int] = None) -> Config:
    """Build and validate a Config from a nested dict (presets are applied under the model's own fields)."""
    if not isinstance(tree, dict):
        raise ConfigError(f"config: expected a mapping of sections ({', '.join(_SECTIONS)}), found {_found(tree)}")
    tree = dict(tree)
    for key in tree:
        if key not in _SECTIONS:
            raise _unknown_key(Config, _key_text(key), "")
    model = tree.get("model")
    if model is None:
        model = {}
    if not isinstance(model, dict):
        raise ConfigError(f"model: expected a mapping of ModelConfig fields, found {_found(model)}")
    preset = model.get("preset")
    if preset is not None:
        if not isinstance(preset, str):
            raise ConfigError(f"model.preset: expected null or a preset name (a string), found {_found(preset)}")
        from engine.model.presets import get_preset  # local: presets import nothing from config

        model = _deep_merge(get_preset(preset), model)
        tree["model"] = model
    sections = {}
    for name, cls in _SECTIONS.items():
        value = tree.get(name)
        if value is None:  # absent, or an empty `section:`
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping of {cls.__name__} fields, found {_found(value)}")
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


_NAME_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}")


def _check_number(value: Any, bounds: Optional[_Bounds], where: str, optional: bool) -> None:
    if isinstance(value, list):
        for i, v in enumerate(value):
            _check_number(v, bounds, f"{where}[{i}]", False)
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where}: expected a finite number, found {value}")
    if bounds is not None and value not in bounds:
        prefix = "null or " if optional else ""
        raise ConfigError(f"{where}: expected {prefix}{bounds.describe(isinstance(value, int))}, found {value!r}")


def _check_fields(obj: Any, where: str) -> None:
    """Per-field checks from the metadata: every float finite, numbers within `bounds`, paths not blank."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value, name = getattr(obj, f.name), f"{where}.{f.name}"
        if value is None:
            continue
        optional = type(None) in typing.get_args(hints[f.name])
        if isinstance(value, list) and value and dataclasses.is_dataclass(value[0]):
            for i, item in enumerate(value):
                _check_fields(item, f"{name}[{i}]")
            continue
        _check_number(value, f.metadata.get("bounds"), name, optional)
        kind = f.metadata.get("path")
        if kind is not None and isinstance(value, str) and (not value.strip() or "\0" in value):
            raise ConfigError(f"{name}: expected {'null or ' if optional else ''}{kind}, found {_found(value)}")


def _check_datasets(split: str, specs: list[DatasetSpec]) -> None:
    named: dict[str, int] = {}
    for i, ds in enumerate(specs):
        if ds.name is None:
            continue
        where = f"data.{split}[{i}].name"
        _check(bool(_NAME_RE.fullmatch(ds.name)),
               f"{where}: expected 1-100 letters, digits, '.', '_' or '-', not starting with '.', found "
               f"{_found(ds.name)}")
        _check(ds.name not in named, f"{where}: {ds.name!r} is already the name of data.{split}[{named.get(ds.name)}]; "
                                     f"expected names unique within data.{split}")
        named[ds.name] = i


def validate(cfg: Config, world_size: Optional[int] = None) -> None:
    m, d, p, t, o = cfg.model, cfg.data, cfg.parallel, cfg.train, cfg.optim
    for name in _SECTIONS:
        _check_fields(getattr(cfg, name), name)
    kv = m.n_kv_heads or m.n_heads
    _check(kv <= m.n_heads and m.n_heads % kv == 0,
           f"model.n_kv_heads: expected a divisor of n_heads={m.n_heads}, found {kv}")
    if m.head_dim is None:
        _check(m.d_model % m.n_heads == 0,
               f"model.d_model={m.d_model} is not divisible by model.n_heads={m.n_heads}; set model.head_dim "
               f"explicitly or choose divisible sizes")
    hd = m.head_dim or m.d_model // m.n_heads
    if m.position == "rope":
        _check(hd % 2 == 0, f"model.head_dim: RoPE needs an even head dimension, found {hd}")
    if m.rope_scaling == "llama3":
        _check(m.rope_high_freq_factor > m.rope_low_freq_factor,
               f"model.rope_high_freq_factor: expected more than rope_low_freq_factor={m.rope_low_freq_factor:g} "
               f"(llama3 scaling blends between them), found {m.rope_high_freq_factor:g}")
    # the encoder variant (BERT)
    _check(m.encoder or not m.binary_head,
           "model.binary_head=true: expected model.encoder=true (the pooler and next-sentence head read the "
           "bidirectional encoder's first token), found model.encoder=false")
    _check(not m.encoder or m.position != "none",
           "model.encoder=true with model.position=none: bidirectional attention without positions cannot tell "
           "the token order apart; expected model.position learned or rope")
    seq = cfg.seq_len
    _check(seq <= m.max_seq_len,
           f"data.seq_len={seq} exceeds model.max_seq_len={m.max_seq_len}")
    _check(len(d.train) > 0, "data.train: expected at least one dataset, found none")
    _check_datasets("train", d.train)
    _check_datasets("valid", d.valid)
    try:
        parts = [float(x) for x in d.split.replace("/", ",").split(",")]
    except ValueError:
        raise ConfigError(f'data.split: expected comma-separated proportions like "98,2,0", found '
                          f'{_found(d.split)}') from None
    _check(len(parts) == 3 and all(math.isfinite(x) and x >= 0 for x in parts) and parts[0] > 0,
           f'data.split: expected three finite non-negative proportions with train > 0, like "98,2,0", found '
           f'{_found(d.split)}')
    tok = d.tokenizer
    _check(tok == "byte" or (tok.startswith(("sentencepiece:", "hf:")) and tok.split(":", 1)[1].strip() != ""
                             and "\0" not in tok),
           f'data.tokenizer: expected "byte", "sentencepiece:PATH" or "hf:PATH", found {_found(tok)}')

    # parallel layout
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
        _check(len(p.pp_layout) == stages and sum(p.pp_layout) == m.n_layers,
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
    _check(t.recompute == "full" or t.recompute_every == 1,
           f"train.recompute_every={t.recompute_every} applies to train.recompute=full only: expected 1 with "
           f"train.recompute={t.recompute}")
    _check(not (t.compile and p.pp > 1 and p.schedule == "zb"),
           "train.compile=true with parallel.schedule=zb: inside a compiled block torch.compile does not keep the "
           "zero-bubble deferral of weight gradients (they would run in B, as with 1f1b); expected "
           "parallel.schedule 1f1b, gpipe or interleaved with train.compile=true, or train.compile=false")
    _check(t.recompute_every <= m.n_layers,
           f"train.recompute_every: expected at most model.n_layers={m.n_layers} (block 0 is always recomputed; "
           f"a larger step recomputes nothing more), found {t.recompute_every}")

    # objective
    if t.objective != "causal":
        _check(m.encoder, f"train.objective={t.objective}: expected model.encoder=true (masked-LM trains a "
                          f"bidirectional encoder), found model.encoder=false")
        _check(t.mask_replace + t.mask_random <= 1.0,
               f"train.mask_replace + train.mask_random: expected at most 1 (the rest keep their token), found "
               f"{t.mask_replace} + {t.mask_random} = {t.mask_replace + t.mask_random}")
    else:
        _check(not m.encoder, "model.encoder=true with train.objective=causal: an encoder sees every position "
                              "(bidirectional), so next-token prediction would read its targets; expected "
                              "train.objective mlm or mlm+nsp")
    _check(t.sample_prompt is None or t.objective == "causal",
           f"train.sample_prompt with train.objective={t.objective}: a masked-LM encoder does not generate text; "
           f"expected train.sample_prompt=null")
    _check(t.objective != "mlm+nsp" or m.binary_head,
           "train.objective=mlm+nsp: expected model.binary_head=true (the pooler and next-sentence head), found "
           "model.binary_head=false")
    _check(t.objective != "mlm" or not m.binary_head,
           "train.objective=mlm with model.binary_head=true: the next-sentence head would get no gradient; "
           "expected train.objective=mlm+nsp or model.binary_head=false")

    # batch arithmetic
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

    # bad steps (the ranges of each field are checked above)
    if t.max_bad_steps > 0:
        _check(t.bad_step_window >= t.max_bad_steps,
               f"train.bad_step_window: expected a window of at least train.max_bad_steps={t.max_bad_steps} "
               f"steps (or max_bad_steps=0 to never stop), found {t.bad_step_window}")
    if t.loss_spike_zscore > 0:
        _check(t.loss_spike_window >= 2,
               f"train.loss_spike_window: expected at least 2 steps of loss history with "
               f"train.loss_spike_zscore={t.loss_spike_zscore}, found {t.loss_spike_window}")

    # optimizer
    _check(o.min_lr <= o.lr, f"optim.min_lr: expected min_lr <= lr = {o.lr}, found {o.min_lr}")
    _check(o.warmup_init_lr <= o.lr,
           f"optim.warmup_init_lr: expected warmup_init_lr <= lr = {o.lr} (warmup rises to lr), found "
           f"{o.warmup_init_lr}")
    _check(len(o.betas) == 2, f"optim.betas: expected two numbers in [0, 1), found {_found(o.betas)}")
    if o.decay_iters is not None:
        _check(o.decay_iters > o.warmup_iters,
               f"optim.decay_iters={o.decay_iters} must be greater than optim.warmup_iters={o.warmup_iters}")
    _check(o.cooldown_iters is None or o.decay in ("wsd", "constant"),
           f"optim.cooldown_iters: expected null with optim.decay={o.decay} (a cooldown follows a constant lr: "
           f"optim.decay wsd or constant), found {o.cooldown_iters}")
    shaped = o.decay == "wsd" or (o.decay == "constant" and o.cooldown_iters is not None)
    _check(o.wsd_decay_shape == "linear" or shaped,
           f"optim.wsd_decay_shape: expected linear (the default) with optim.decay={o.decay}"
           f"{' and no optim.cooldown_iters' if o.decay == 'constant' else ''}: it shapes only the final decay "
           f"of wsd and the cooldown of constant with cooldown_iters; found {o.wsd_decay_shape}")
    if o.cooldown_iters is not None:
        end, end_name = (o.decay_iters, "optim.decay_iters") if o.decay_iters is not None else (t.iters, "train.iters")
        _check(o.cooldown_iters <= end - o.warmup_iters,
               f"optim.cooldown_iters: expected at most {end_name} - optim.warmup_iters = {end} - {o.warmup_iters} = "
               f"{end - o.warmup_iters} (the cooldown ends at {end_name} and starts after warmup), found "
               f"{o.cooldown_iters}")
    c = cfg.checkpoint
    if c.load is not None and c.load != "auto":
        _check(c.load.strip() != "", "checkpoint.load: expected a checkpoint path or auto, found ''")
    _check(c.load != "auto" or c.dir is not None,
           "checkpoint.load=auto looks for the latest checkpoint in checkpoint.dir: set checkpoint.dir")
    for name in ("interval", "time_limit", "async_save"):
        value = getattr(c, name)
        _check(c.dir is not None or not value,
               f"checkpoint.{'async' if name == 'async_save' else name}={value} needs checkpoint.dir (where to "
               f"write); set checkpoint.dir or remove it")
    switches = {k: getattr(c, k) for k in ("reset_optimizer", "reset_schedule", "reset_data")}
    changed = [f"checkpoint.{k}={v}" for k, v in switches.items() if v is not True]
    if c.new_token_init is not None:
        changed.append(f"checkpoint.new_token_init={c.new_token_init}")
    if c.start_iteration is not None:
        changed.append(f"checkpoint.start_iteration={c.start_iteration}")
    _check(c.init_from is not None or not changed,
           f"{', '.join(changed)}: these choose what a run takes from checkpoint.init_from, which is not set")
    if c.init_from is not None:
        hf = c.init_from.startswith("hf:")
        _check(not (hf and not c.reset_optimizer),
               "checkpoint.reset_optimizer=false: a Hugging Face directory (init_from hf:...) holds no optimizer "
               "state; expected reset_optimizer=true")
        _check(not (hf and not c.reset_data),
               "checkpoint.reset_data=false: a Hugging Face directory (init_from hf:...) has no data position; "
               "expected reset_data=true")
        _check(not (hf and not c.reset_schedule),
               "checkpoint.reset_schedule=false: a Hugging Face directory (init_from hf:...) has no iteration "
               "to continue; expected reset_schedule=true (and start_iteration to choose where it starts)")
        _check(c.start_iteration is None or c.reset_schedule,
               f"checkpoint.start_iteration={c.start_iteration} with reset_schedule=false: the schedule continues "
               f"from the checkpoint's iteration; set one or the other")
        _check(c.start_iteration is None or c.start_iteration < t.iters,
               f"checkpoint.start_iteration={c.start_iteration}: expected less than train.iters={t.iters} (the "
               f"run would have nothing to train)")
    pr = cfg.precision
    _check(pr.min_loss_scale <= pr.initial_loss_scale,
           f"precision.min_loss_scale: expected at most precision.initial_loss_scale={pr.initial_loss_scale}, "
           f"found {pr.min_loss_scale}")
    if pr.fp8 is not None:
        _check_fields(pr.fp8, "precision.fp8")
        for i, pat in enumerate(pr.fp8.keep_high_precision):
            _check(pat.strip() != "", f"precision.fp8.keep_high_precision[{i}]: expected first_block, last_block "
                                      f"or a module-name pattern, found {_found(pat)}")
        _check(p.zero != 3, "precision.fp8 with parallel.zero=3 (FSDP2) is not supported: expected parallel.zero "
                            "0 or 1, found 3")
        _check(not t.compile, "precision.fp8 with train.compile=true is not supported yet (torch.compile cannot "
                              "trace the FP8 linear's autograd function): set train.compile=false")


def field_docs(cls: type = Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted name, default, doc) for every leaf field: `tessera config show --doc` prints these."""
    rows = []
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        name = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            rows += field_docs(tp, name + ".")
            continue
        if dataclasses.is_dataclass(_section_type(tp)):  # an optional section (precision.fp8): its row, then its fields
            rows.append((name, "None", f.metadata.get("doc", "")))
            rows += field_docs(_section_type(tp), name + ".")
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)  # type: ignore[misc]
        rows.append((name, repr(default), f.metadata.get("doc", "")))
    return rows
