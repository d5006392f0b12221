"""Peak memory of every pipeline stage's ranks, by category, from the config alone (nothing is built).

What is counted follows the implementation, tensor by tensor (the test tests/test_plan_memory.py measures
real training steps and holds the totals within 10%):

- parameters: fp32 (weights and optimizer stay fp32, precision.dtype only sets autocast), this rank's tp
  shards of its stage's layers, the embedding on the first stage, final norm and head on the last (a tied
  head on a last stage without the embedding is a runtime copy), RoPE tables (fp32 [max_seq_len, hd] x 2 per
  model chunk);
- gradients: the data-parallel main-grad buffer (engine/parallel/grad_buffer.py: fp32, one element per
  parameter element) for zero 0/1; FSDP2's sharded gradients (1/dp) for zero 3;
- optimizer: AdamW exp_avg + exp_avg_sq (fp32) on the elements this rank steps on (all of them for zero 0 or
  one data-parallel rank, 1/dp for ZeRO-1 and FSDP2); the fp32 master is the parameter itself (no copy);
- activations: what autograd keeps for the backward of one micro-batch through this rank's layers
  (`block_saved`: norms' fp32 internals, the linears' inputs -- shared in fp32, one bf16 cast per linear under
  autocast --, the attention core's q/k/v/out/logsumexp, the MLP's activation inputs, dropout masks, residual
  stream tensors), times the micro-batches in flight, which the pipeline schedule's action lists decide
  (walked action by action, `stage_timeline`): 1 for pp = 1; for zero-bubble a micro-batch whose B ran keeps
  the inputs and output gradients of its linears until its W;
- logits and loss: the fp32 log-probabilities (tp = 1) or the vocab-parallel softmax [tokens, V/tp] saved for
  the backward, and at the loss the logits themselves plus the fp32 copy/shift;
- transient: the largest short-lived extra of a step: the loss and MLP backward working tensors, a recomputed
  block (recompute=full), a weight gradient before the grad-buffer hook moves it, the optimizer step's
  temporaries (torch's foreach AdamW: one fp32 tensor of the stepped size on CPU; fused on CUDA: none), the
  ZeRO-1 reduce-scatter outputs and parameter-gather copies (1/dp of the buffer each), FSDP2's gathered
  parameters of two blocks;
- pipeline buffers: a stage output stays referenced by its asynchronous send until the end of the step
  (engine/parallel/pipeline/p2p.py waits for all sends then), and so does the input gradient sent back;
- data: the step's micro-batches of int64 token ids, all loaded before the first forward.

The residual stream is fp32 in every precision (the embedding and the residual adds are not autocast), the
attention core and linears run in the compute dtype. Sequence parallelism divides the stream tensors by tp;
attention and MLP internals are always per tp rank (heads and hidden units split).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Optional

from engine.config import Config, ModelConfig
from engine.model.transformer import ffn_hidden, head_dim, kv_heads, padded_vocab
from engine.parallel.pipeline.partition import is_first_stage, is_last_stage, layers_for_stage
from engine.parallel.pipeline.schedules import Schedule, build_schedule
from engine.plan.layouts import Layout

__all__ = ["RankMemory", "Shapes", "estimate_memory", "schedule_for", "stage_timeline", "CATEGORIES"]

F32 = 4
I64 = 8
BUCKET_SIZE = 2 ** 22  # elements per data-parallel grad bucket (engine/train/build.py wrap_data_parallel)
CATEGORIES = ("parameters", "gradients", "optimizer", "activations", "logits_loss", "pipeline_buffers",
              "transient", "data")


@dataclass(frozen=True)
class Shapes:
    """The sizes the accounting needs, per tp rank. Elements per token unless the name says otherwise."""

    cfg: Config
    lay: Layout
    device_type: str  # "cuda" or "cpu": which SDPA backend and dropout mask format

    @property
    def m(self) -> ModelConfig:
        return self.cfg.model

    @property
    def a(self) -> int:
        """Bytes of the compute dtype (autocast): linear outputs, attention, MLP internals."""
        return F32 if self.cfg.precision.dtype == "fp32" else 2

    @property
    def seq(self) -> int:
        return self.cfg.seq_len

    @property
    def tokens(self) -> int:
        """Tokens of one micro-batch (full sequence)."""
        return self.lay.micro_batch_size * self.seq

    @property
    def s_r(self) -> float:
        """Fraction of the sequence a stream tensor holds on this rank (sequence parallel: 1/tp)."""
        return 1.0 / self.lay.tp if self.lay.sequence_parallel and self.lay.tp > 1 else 1.0

    @property
    def d(self) -> int:
        return self.m.d_model

    @property
    def heads(self) -> int:
        return self.m.n_heads // self.lay.tp

    @property
    def kv_local(self) -> int:
        return max(kv_heads(self.m) // self.lay.tp, 1)

    @property
    def hd(self) -> int:
        return head_dim(self.m)

    @property
    def f(self) -> int:
        return ffn_hidden(self.m) // self.lay.tp

    @property
    def vocab(self) -> int:
        """Real vocabulary."""
        return self.m.vocab_size

    @property
    def vocab_local(self) -> int:
        """Padded vocabulary columns of this tp rank."""
        return padded_vocab(self.m, self.lay.tp) // self.lay.tp

    @property
    def gqa_expanded(self) -> bool:
        """The SDPA path repeats K/V heads to the query heads before the kernel (engine/model/attention.py)."""
        return self.kv_local < self.heads and self.m.attention != "triton"

    @property
    def math_attention(self) -> bool:
        """CPU SDPA runs its math path (softmax probabilities [S, S] saved) with attention dropout."""
        return self.device_type != "cuda" and self.m.dropout > 0

    @property
    def dropout_mask(self) -> float:
        """Bytes per element of a residual dropout mask: CPU keeps a scaled noise tensor in the input dtype,
        CUDA's fused dropout a bool mask."""
        if self.m.dropout <= 0:
            return 0.0
        return 1.0 if self.device_type == "cuda" else float(self.a)


def _lin_in(sh: Shapes, width: float, consumers: int, dtype_bytes: int = F32) -> float:
    """Bytes per token a linear layer's saved input costs: an fp32 input is saved once however many linears
    read it; under autocast each linear saves its own cast (`consumers` copies in the compute dtype)."""
    if dtype_bytes == sh.a:
        return width * dtype_bytes
    return consumers * width * sh.a


def _norm_internals(sh: Shapes) -> float:
    """Per token, besides the norm's input (a stream tensor counted separately): RMSNorm keeps fp32
    x*rsqrt(...) [D] and rsqrt [1]; LayerNorm its mean and rstd."""
    if sh.m.norm == "rmsnorm":
        return (sh.d + 1) * F32 * sh.s_r
    return 2 * F32 * sh.s_r


def attention_core_saved(sh: Shapes, recompute: str) -> float:
    """Bytes per token kept for the backward of softmax(QK^T)V: q [H/tp*hd], k and v (expanded to the query
    heads on the SDPA path for GQA), the output (also the o_proj input), logsumexp [H/tp] fp32; CPU's math
    path (attention dropout) keeps the probabilities, the dropout noise and the dropped probabilities
    [H/tp, S] instead of logsumexp. Selective recompute keeps the core's inputs (k/v before expansion) and
    its output only."""
    q = sh.heads * sh.hd
    kv = (sh.heads if sh.gqa_expanded else sh.kv_local) * sh.hd
    out = q * sh.a
    if recompute == "selective":
        return (q + 2 * sh.kv_local * sh.hd) * sh.a + out
    saved = (q + 2 * kv) * sh.a + out
    if sh.math_attention:
        saved += 3 * sh.heads * sh.seq * sh.a
    else:
        saved += sh.heads * F32
    return saved


def _mlp_act_saved(sh: Shapes) -> float:
    """swiglu keeps gate, up, silu(gate) and their product [F/tp] each; gelu its input and output; relu
    its output (read by its own backward and by down_proj)."""
    n = {"swiglu": 4, "gelu": 2, "relu": 1}[sh.m.activation]
    return n * sh.f * sh.a


def block_saved(sh: Shapes, recompute: str = "none") -> float:
    """Bytes per token one transformer block keeps for its backward, its input included (recompute=full:
    its input only; `recompute` here is what applies to this block)."""
    stream = sh.d * F32 * sh.s_r
    if recompute == "full":
        return stream
    n_in = 2 if sh.m.activation == "swiglu" else 1
    saved = stream  # the block input x (read by the first norm)
    saved += _norm_internals(sh) + _lin_in(sh, sh.d, 3)  # attn_norm, q/k/v input (full sequence)
    saved += attention_core_saved(sh, recompute)  # o_proj's input is the core's output
    saved += 2 * sh.dropout_mask * sh.d * sh.s_r  # residual dropout after attention and MLP
    saved += stream  # x1 = x + attn(...), read by mlp_norm
    saved += _norm_internals(sh) + _lin_in(sh, sh.d, n_in)  # mlp_norm, gate/up input
    saved += _mlp_act_saved(sh)  # ... and down_proj's input
    return saved


def block_weights(sh: Shapes) -> int:
    """Weight elements (matrices) of one block on this tp rank."""
    q, kv = sh.heads * sh.hd, sh.kv_local * sh.hd
    n_mat = 3 if sh.m.activation == "swiglu" else 2
    return sh.d * (2 * q + 2 * kv) + n_mat * sh.d * sh.f


def block_params(sh: Shapes) -> int:
    """Parameter elements of one block on this tp rank (weights, biases, norms)."""
    m = sh.m
    q, kv = sh.heads * sh.hd, sh.kv_local * sh.hd
    qkv_bias = m.bias if m.qkv_bias is None else m.qkv_bias
    norms = 2 * sh.d * (2 if (m.norm == "layernorm" and m.bias) else 1)
    n = block_weights(sh) + norms
    if qkv_bias:
        n += q + 2 * kv
    if m.bias:
        n += sh.d + (sh.f * (2 if m.activation == "swiglu" else 1)) + sh.d
    return n


def zb_pending(sh: Shapes) -> float:
    """Bytes per token a zero-bubble W still needs after B (engine/parallel/pipeline/weight_grad.py): every
    linear's saved input and output gradient."""
    n_in = 2 if sh.m.activation == "swiglu" else 1
    q, kv = sh.heads * sh.hd, sh.kv_local * sh.hd
    inputs = _lin_in(sh, sh.d, 3) + q * sh.a + _lin_in(sh, sh.d, n_in) + sh.f * sh.a
    grads = (q + 2 * kv) * sh.a + sh.d * sh.a + n_in * sh.f * sh.a + sh.d * sh.a
    return inputs + grads


@dataclass(frozen=True)
class Chunk:
    """One model chunk of a pipeline rank: its layers and whether it holds the embedding / the head."""

    layers: tuple[int, ...]
    first: bool
    last: bool
    holds_head: bool  # a head weight of its own (untied, or a tied copy on a stage without the embedding)


def chunks_of(sh: Shapes, pp_rank: int) -> list[Chunk]:
    lay, m = sh.lay, sh.m
    out = []
    for c in range(lay.vpp):
        rng = layers_for_stage(m.n_layers, lay.pp, lay.vpp, pp_rank, c, lay.pp_layout)
        first, last = is_first_stage(pp_rank, c), is_last_stage(lay.pp, lay.vpp, pp_rank, c)
        out.append(Chunk(tuple(rng), first, last, last and not (m.tie_embeddings and first)))
    return out


@functools.lru_cache(maxsize=256)
def schedule_for(name: str, pp: int, num_micro: int, vpp: int) -> Schedule:
    """The executor's action lists (build_schedule with its default costs), memoised: layouts share them."""
    return build_schedule(name, pp, num_micro, vpp=vpp)


def _recompute_of(sh: Shapes, layer: int) -> str:
    lay = sh.lay
    if lay.recompute == "full":
        return "full" if layer % lay.recompute_every == 0 else "none"
    return lay.recompute


def chunk_params(sh: Shapes, chunk: Chunk) -> int:
    m = sh.m
    n = len(chunk.layers) * block_params(sh)
    emb = sh.vocab_local * sh.d
    if chunk.first:
        n += emb + (m.max_seq_len * sh.d if m.position == "learned" else 0)
    if chunk.last:
        n += sh.d * (2 if (m.norm == "layernorm" and m.bias) else 1)
        if chunk.holds_head:
            n += emb
    return n


@dataclass
class ChunkActivations:
    """Bytes one micro-batch costs on one chunk (see `stage_timeline` for how they combine)."""

    saved: float  # kept from the end of F to the end of B
    logits_saved: float  # part of `saved`: the loss's log-probabilities / softmax
    fwd_transient: float  # extra at the end of F (the logits and the loss's fp32 copies)
    bwd_transient: float  # extra during B over what is still saved
    pending_w: float  # zero-bubble: kept from B to W
    send_out: float  # a stage output, held by its send until the end of the step (not on the last stage)
    send_grad: float  # the input gradient sent back (not on the first stage)
    weight_casts: float  # autocast's compute-dtype weight copies, part of `saved`


def chunk_activations(sh: Shapes, chunk: Chunk, split_backward: bool) -> ChunkActivations:
    m, a, T = sh.m, sh.a, sh.tokens
    stream = sh.d * F32 * sh.s_r
    per_block = [block_saved(sh, _recompute_of(sh, i)) for i in chunk.layers]
    saved = sum(per_block)
    if chunk.first:
        saved += I64 + (sh.dropout_mask * sh.d * sh.s_r)  # token ids for the embedding backward (+ dropout)
    casts = 0.0
    if a != F32:
        casts = len(chunk.layers) * block_weights(sh) * a + (sh.vocab_local * sh.d * a if chunk.last else 0)
    logits_saved = fwd_t = loss_bwd = head_bwd = 0.0
    freed_before_blocks = 0.0
    if chunk.last:
        v_l = sh.vocab_local
        final = stream + _norm_internals(sh) + _lin_in(sh, sh.d, 1)  # final norm input + internals, head input
        if m.fused_ops:
            logits_saved = v_l * a + 2 * F32  # the fused CE keeps the logits and per-row statistics
            loss_bwd = v_l * a
        elif sh.lay.tp > 1:
            logits_saved = v_l * F32 + I64  # the vocab-parallel softmax [tokens, V/tp] and target indices
            padded_here = padded_vocab(m, sh.lay.tp) > m.vocab_size  # the last rank's shard (the largest)
            fwd_t = v_l * a + (v_l * F32 if (a != F32 or padded_here) else 0.0)
            loss_bwd = v_l * a if a != F32 else 0.0
        else:
            v = sh.vocab
            logits_saved = v * F32 + I64  # log_softmax output and targets
            fwd_t = v_l * a + (v * F32 if a != F32 else 0.0)  # the logits and their fp32 copy
            loss_bwd = 2 * v * F32  # nll and log_softmax gradients
        head_bwd = v_l * a + sh.d * a - logits_saved
        saved += final + logits_saved
        freed_before_blocks = final + logits_saved
    # The backward walks the blocks from the last: each one holds the incoming gradient and its MLP's
    # [F/tp] working tensors -- swiglu: d(h), d(up), d(silu), of which d(h) replaces the freed h unless
    # zero-bubble keeps h for W; gelu: d(h), d(up); relu: d(h), d(up) while relu keeps h --, and a
    # recomputed block first recomputes what it dropped. After a block, its saved tensors are freed, except
    # that zero-bubble keeps every linear's input and output gradient until W (so there the last block
    # walked, not the first, can be the peak); the head's too.
    act_work = ({"swiglu": 3, "gelu": 2, "relu": 2} if split_backward else
                {"swiglu": 2, "gelu": 1, "relu": 2})[m.activation] * sh.f * a
    cur = -freed_before_blocks  # relative to the start of B: the loss and the final norm are done
    if split_backward and chunk.last:
        cur += _lin_in(sh, sh.d, 1) + sh.vocab_local * a
    block_bwd = 0.0
    for layer, kept in zip(reversed(chunk.layers), reversed(per_block)):
        mode = _recompute_of(sh, layer)
        recomputed = 0.0
        if mode == "full":
            recomputed = block_saved(sh, "none") - stream
        elif mode == "selective":
            recomputed = attention_core_saved(sh, "none") - attention_core_saved(sh, "selective")
        block_bwd = max(block_bwd, cur + stream + act_work + recomputed)
        cur += (zb_pending(sh) if split_backward else 0.0) - kept
    bwd_t = max(loss_bwd, head_bwd, block_bwd, 0.0)
    # A weight gradient exists briefly before the grad-buffer hook moves it (fp32 p.grad, plus its compute-
    # dtype form under autocast); zero-bubble computes these in W instead.
    biggest_weight = max(sh.d * sh.f, sh.d * sh.heads * sh.hd) if chunk.layers else 0
    if chunk.last and chunk.holds_head:
        biggest_weight = max(biggest_weight, sh.vocab_local * sh.d)
    grad_t = biggest_weight * (F32 + (a if a != F32 else 0))
    pending = 0.0
    if split_backward:
        pending = sum(zb_pending(sh) for _ in chunk.layers)
        if chunk.last:
            pending += _lin_in(sh, sh.d, 1) + sh.vocab_local * a
    return ChunkActivations(
        saved=saved * T + casts, logits_saved=logits_saved * T, fwd_transient=fwd_t * T,
        bwd_transient=bwd_t * T + (0.0 if split_backward else grad_t), pending_w=pending * T,
        send_out=0.0 if chunk.last else stream * T, send_grad=0.0 if chunk.first else stream * T,
        weight_casts=casts)


@dataclass
class RankMemory:
    """Predicted bytes of one rank (all ranks of a pipeline stage are alike) at its peak, by category."""

    pp_rank: int
    parameters: float = 0.0
    gradients: float = 0.0
    optimizer: float = 0.0
    activations: float = 0.0
    logits_loss: float = 0.0
    pipeline_buffers: float = 0.0
    transient: float = 0.0
    data: float = 0.0
    in_flight: int = 1  # micro-batches whose activations are held at the peak
    phase: str = ""  # where the peak is: "forward/backward" or "optimizer step"
    notes: list[str] = field(default_factory=list)

    @property
    def peak(self) -> float:
        return sum(getattr(self, c) for c in CATEGORIES)

    def as_dict(self) -> dict:
        d = {c: getattr(self, c) for c in CATEGORIES}
        d.update(pp_rank=self.pp_rank, peak=self.peak, in_flight=self.in_flight, phase=self.phase)
        return d


@dataclass
class _Timeline:
    peak_extra: float  # over the static memory
    activations: float
    logits: float
    buffers: float
    transient: float
    in_flight: int


def stage_timeline(acts: list[ChunkActivations], schedule: Optional[Schedule], rank: int,
                   num_micro: int) -> _Timeline:
    """Walk this rank's actions in order (pp = 1: F, B per micro-batch) and return the largest memory over
    the static part, with the categories at that moment."""
    if schedule is None:
        order = [(k, mb, 0) for mb in range(num_micro) for k in ("F", "B")]
    else:
        order = [(x.kind, x.mb, x.chunk) for x in schedule.actions[rank]]
    live_act = live_logits = live_buf = 0.0
    n_live = 0
    best = _Timeline(0.0, 0.0, 0.0, 0.0, 0.0, 0)

    def consider(extra: float, kind: str) -> None:
        nonlocal best
        total = live_act + live_logits + live_buf + extra
        if total > best.peak_extra:
            best = _Timeline(total, live_act, live_logits, live_buf, extra, n_live)

    for kind, _mb, c in order:
        ca = acts[c]
        if kind == "F":
            live_act += ca.saved - ca.logits_saved
            live_logits += ca.logits_saved
            n_live += 1
            consider(ca.fwd_transient, kind)
            live_buf += ca.send_out
        elif kind == "B":
            consider(ca.bwd_transient, kind)
            live_act -= ca.saved - ca.logits_saved
            live_logits -= ca.logits_saved
            live_act += ca.pending_w
            live_buf += ca.send_grad
            if not ca.pending_w:
                n_live -= 1
        else:  # W
            consider(0.0, kind)
            live_act -= ca.pending_w
            n_live -= 1
    return best


def largest_param(sh: Shapes, chunks: list[Chunk]) -> int:
    """Elements of the largest single parameter of a rank (the embedding or head, or a block matrix)."""
    n = max(sh.d * sh.f, sh.d * sh.heads * sh.hd) if any(c.layers for c in chunks) else 0
    if any(c.first or c.holds_head for c in chunks):
        n = max(n, sh.vocab_local * sh.d)
    return n


def _bucket_padding(numel: int, dp: int) -> int:
    return dp * math.ceil(numel / dp) if dp > 1 else numel


def estimate_memory(cfg: Config, lay: Layout, device_type: str = "cuda") -> list[RankMemory]:
    """Predicted peak memory of a rank of every pipeline stage (index = pp rank). `device_type` "cuda" or
    "cpu" picks the SDPA/dropout/optimizer paths that differ between them."""
    sh = Shapes(cfg, lay, device_type)
    schedule = None
    if lay.pp > 1:
        schedule = schedule_for(lay.schedule, lay.pp, lay.num_micro, lay.vpp)
    split = schedule is not None and schedule.split_backward
    out = []
    for r in range(lay.pp):
        chunks = chunks_of(sh, r)
        n_params = sum(chunk_params(sh, c) for c in chunks)
        rope = 2 * cfg.model.max_seq_len * sh.hd * F32 * lay.vpp if cfg.model.position == "rope" else 0
        mem = RankMemory(pp_rank=r)
        mem.parameters = n_params * F32 + rope
        sharded = lay.zero in (1, 3) and lay.dp > 1
        stepped = n_params / lay.dp if sharded else n_params
        mem.optimizer = 2 * stepped * F32
        if lay.zero == 3 and lay.dp > 1:
            mem.parameters = n_params / lay.dp * F32 + rope
            mem.gradients = n_params / lay.dp * F32
        else:
            mem.gradients = _bucket_padding(n_params, lay.dp) * F32
        mem.data = lay.num_micro * lay.micro_batch_size * (cfg.seq_len + 1) * I64
        if cfg.data.document_masking:
            mem.data += 2 * lay.num_micro * lay.micro_batch_size * cfg.seq_len * I64
        acts = [chunk_activations(sh, c, split) for c in chunks]
        tl = stage_timeline(acts, schedule, r, lay.num_micro)
        fsdp_gather = fsdp_grads = 0.0
        if lay.zero == 3 and lay.dp > 1:
            # FSDP2 (measured on its torch 2.13 implementation): the root unit (embedding, final norm, head)
            # stays gathered through forward and backward; at the start of the backward the block whose
            # backward runs and the next one (prefetched) are gathered. Further in, with the first block's
            # activations freed, a block stays unsharded while the next two are all-gathered and a block's
            # unsharded gradients wait for their reduce-scatter (output 1/dp). The sharded gradients only
            # appear during the backward (zero_grad drops them), after these peaks.
            blk = block_params(sh) * F32
            root = (n_params - len(chunks[0].layers) * block_params(sh)) * F32
            at_start = root + 2 * blk
            n_layers = max(len(chunks[0].layers), 1)
            later = root + 4 * blk + blk / lay.dp - tl.activations / n_layers
            fsdp_gather = max(at_start, later)
            fsdp_grads, mem.gradients = mem.gradients, 0.0
        # After the backward (activations gone): ZeRO-1's reduce-scatter outputs (1/dp of the buffer; gloo also
        # copies the bucket in flight, at most one at a time), foreach AdamW's sqrt(v) temporary off CUDA
        # (fused AdamW on CUDA has none), ZeRO-1's copies of this rank's shard for the parameter all-gather.
        step_t = 0.0 if device_type == "cuda" else stepped * F32
        if lay.zero == 1 and lay.dp > 1:
            bucket = min(n_params, BUCKET_SIZE + largest_param(sh, chunks)) * F32
            scatter = stepped * F32 + (bucket if device_type != "cuda" else 0.0)
            step_t = max(step_t, stepped * F32, scatter)
        fb_extra = tl.peak_extra + fsdp_gather
        if fb_extra >= step_t:
            mem.activations, mem.logits_loss, mem.pipeline_buffers = tl.activations, tl.logits, tl.buffers
            mem.transient = tl.transient + fsdp_gather
            mem.in_flight, mem.phase = tl.in_flight, "forward/backward"
        else:
            mem.transient, mem.phase, mem.in_flight = step_t, "optimizer step", 0
            mem.gradients += fsdp_grads
        if cfg.model.fused_ops:
            mem.notes.append("model.fused_ops: norms/RoPE/SwiGLU are counted as their torch path")
        if cfg.precision.fp8 is not None:
            mem.notes.append("precision.fp8: FP8 copies of weights and activations are not counted")
        if getattr(cfg.model, "encoder", False):
            mem.notes.append("model.encoder: counted as the causal model (MLM/NSP heads left out)")
        out.append(mem)
    return out
