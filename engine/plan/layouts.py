"""Parallel layouts the planner scores: one `Layout` per (tp, pp, dp, vpp, sequence parallel, ZeRO level,
schedule, recompute, micro-batch size), read from a config (`layout_of`) or enumerated for a world size
(`enumerate_layouts`) with the divisibility rules config validation applies to a real run.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

from engine.config import Config, resolve_dp
from engine.errors import ConfigError
from engine.model.transformer import ffn_hidden, kv_heads

__all__ = ["Layout", "layout_of", "enumerate_layouts", "divisors"]

RECOMPUTE = ("none", "selective", "full")


@dataclass(frozen=True)
class Layout:
    """How one run is cut over `tp * pp * dp` ranks and how each rank steps (the config fields of the same
    names: parallel.*, train.recompute*, train.micro_batch_size / global_batch_size)."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    vpp: int = 1
    sequence_parallel: bool = False
    zero: int = 1
    schedule: str = "1f1b"
    recompute: str = "none"
    recompute_every: int = 1
    micro_batch_size: int = 1
    global_batch_size: int = 1
    pp_layout: Optional[tuple[int, ...]] = None

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def num_micro(self) -> int:
        """Micro-batches per optimizer step on one data-parallel rank."""
        return self.global_batch_size // (self.micro_batch_size * self.dp)

    def describe(self) -> str:
        """'tp2 pp4 dp8 vpp2 sp zero1 interleaved mb1 recompute=selective' (what differs from one process)."""
        parts = [f"tp{self.tp}", f"pp{self.pp}", f"dp{self.dp}"]
        if self.vpp > 1:
            parts.append(f"vpp{self.vpp}")
        if self.sequence_parallel:
            parts.append("sp")
        parts.append(f"zero{self.zero}")
        if self.pp > 1:
            parts.append(self.schedule)
        parts.append(f"mb{self.micro_batch_size}")
        if self.recompute != "none":
            every = f"/{self.recompute_every}" if self.recompute == "full" and self.recompute_every > 1 else ""
            parts.append(f"recompute={self.recompute}{every}")
        return " ".join(parts)

    def overrides(self) -> list[str]:
        """The `section.key=value` overrides that give a config this layout (for `tessera train`)."""
        out = [f"parallel.tp={self.tp}", f"parallel.pp={self.pp}", f"parallel.dp={self.dp}",
               f"parallel.vpp={self.vpp}", f"parallel.sequence_parallel={str(self.sequence_parallel).lower()}",
               f"parallel.zero={self.zero}", f"parallel.schedule={self.schedule}",
               f"train.recompute={self.recompute}", f"train.recompute_every={self.recompute_every}",
               f"train.micro_batch_size={self.micro_batch_size}"]
        return out


def layout_of(cfg: Config, world_size: int) -> Layout:
    """The layout a config runs with on `world_size` ranks (dp resolved as the launcher would)."""
    p, t = cfg.parallel, cfg.train
    return Layout(tp=p.tp, pp=p.pp, dp=resolve_dp(cfg, world_size), vpp=p.vpp,
                  sequence_parallel=p.sequence_parallel, zero=p.zero, schedule=p.schedule,
                  recompute=getattr(t, "recompute", "none"), recompute_every=getattr(t, "recompute_every", 1),
                  micro_batch_size=t.micro_batch_size, global_batch_size=t.global_batch_size,
                  pp_layout=tuple(p.pp_layout) if p.pp_layout is not None else None)


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def check_layout(cfg: Config, lay: Layout) -> Optional[str]:
    """Why `lay` cannot run `cfg` (the rule config validation or the model would reject it), or None."""
    m = cfg.model
    kv = kv_heads(m)
    stages = lay.pp * lay.vpp
    if m.n_heads % lay.tp or (kv % lay.tp and lay.tp % kv):
        return f"tp={lay.tp} does not split n_heads={m.n_heads} / n_kv_heads={kv}"
    if ffn_hidden(m) % lay.tp:
        return f"tp={lay.tp} does not divide the MLP hidden size {ffn_hidden(m)}"
    if lay.sequence_parallel and (lay.tp == 1 or cfg.seq_len % lay.tp):
        return "sequence parallel needs tp > 1 dividing the sequence length"
    if lay.pp_layout is None and m.n_layers % stages:
        return f"n_layers={m.n_layers} does not split into pp*vpp={stages} stages"
    if lay.pp_layout is not None and (len(lay.pp_layout) != stages or sum(lay.pp_layout) != m.n_layers):
        return f"pp_layout {list(lay.pp_layout)} does not give pp*vpp={stages} stages of {m.n_layers} layers"
    if lay.vpp > 1 and lay.schedule != "interleaved":
        return "vpp > 1 needs the interleaved schedule"
    if lay.zero == 3 and (lay.tp > 1 or lay.pp > 1):
        return "zero=3 (FSDP2) runs with tp=1 and pp=1 only"
    if lay.global_batch_size % (lay.micro_batch_size * lay.dp):
        return (f"global batch {lay.global_batch_size} is not a multiple of micro batch {lay.micro_batch_size} "
                f"x dp {lay.dp}")
    if lay.schedule == "interleaved" and lay.pp > 1 and lay.num_micro % lay.pp:
        return f"interleaved: {lay.num_micro} micro-batches are not a multiple of pp={lay.pp}"
    if lay.recompute not in RECOMPUTE:
        return f"recompute must be one of {RECOMPUTE}"
    if lay.recompute != "full" and lay.recompute_every != 1:
        return "recompute_every applies to recompute=full only"
    return None


def enumerate_layouts(cfg: Config, world_size: int, *, schedules: Sequence[str] = ("1f1b", "interleaved", "zb"),
                      zeros: Sequence[int] = (0, 1, 3), recomputes: Sequence[str] = RECOMPUTE,
                      micro_batches: Optional[Sequence[int]] = None, max_tp: Optional[int] = None,
                      tp_options: Optional[Sequence[int]] = None, pp_options: Optional[Sequence[int]] = None,
                      max_vpp: int = 8) -> Iterator[Layout]:
    """Every layout of `world_size` ranks that can run `cfg` (its global batch fixed): tp x pp x dp =
    world_size, vpp (interleaved) dividing the layers per stage, sequence parallel on whenever tp > 1 (it only
    removes memory and replaces all-reduces by the same volume of all-gathers/reduce-scatters), the ZeRO
    levels, recompute modes and micro-batch sizes (default: the powers of two up to 16 that divide the per-rank
    batch), vpp up to `max_vpp`. `max_tp` caps tp (e.g. GPUs per node: tensor parallelism across nodes is
    slow)."""
    if world_size < 1:
        raise ConfigError(f"--gpus: expected a positive number of devices, found {world_size}")
    t, m = cfg.train, cfg.model
    for tp in tp_options or divisors(world_size):
        if max_tp is not None and tp > max_tp:
            continue
        for pp in pp_options or divisors(world_size // tp):
            if (world_size // tp) % pp:
                continue
            dp = world_size // (tp * pp)
            if t.global_batch_size % dp:
                continue
            per_rank = t.global_batch_size // dp
            mbs = [b for b in (micro_batches or (1, 2, 4, 8, 16)) if per_rank % b == 0]
            if pp == 1:
                pipes = [("1f1b", 1)]
            else:
                pipes = []
                for s in schedules:
                    if s == "interleaved":
                        stages_layers = m.n_layers // pp if m.n_layers % pp == 0 else 0
                        pipes += [(s, v) for v in divisors(stages_layers) if 1 < v <= max_vpp]
                    else:
                        pipes.append((s, 1))
            for schedule, vpp in pipes:
                for zero in zeros:
                    if zero == 3 and (tp > 1 or pp > 1):
                        continue
                    if zero in (1, 3) and dp == 1 and 0 in zeros:
                        continue  # the same run as zero=0 on one data-parallel rank
                    for recompute in recomputes:
                        for mb in mbs:
                            lay = Layout(tp=tp, pp=pp, dp=dp, vpp=vpp, sequence_parallel=tp > 1, zero=zero,
                                         schedule=schedule, recompute=recompute, micro_batch_size=mb,
                                         global_batch_size=t.global_batch_size)
                            if check_layout(cfg, lay) is None:
                                yield lay


def with_layout(cfg: Config, lay: Layout) -> Config:
    """A copy of `cfg` whose parallel/train fields say `lay` (not re-validated: the planner checks layouts
    with `check_layout`)."""
    p = dataclasses.replace(cfg.parallel, tp=lay.tp, pp=lay.pp, dp=lay.dp, vpp=lay.vpp,
                            sequence_parallel=lay.sequence_parallel, zero=lay.zero, schedule=lay.schedule,
                            pp_layout=list(lay.pp_layout) if lay.pp_layout is not None else None)
    fields = {"micro_batch_size": lay.micro_batch_size, "global_batch_size": lay.global_batch_size}
    if hasattr(cfg.train, "recompute"):
        fields.update(recompute=lay.recompute, recompute_every=lay.recompute_every)
    return dataclasses.replace(cfg, parallel=p, train=dataclasses.replace(cfg.train, **fields))
