"""The one optimizer path: AdamW on the segments this rank updates, for one process, DP, ZeRO-1 and FSDP2.

A data-parallel wrapper (engine/parallel/data_parallel.py `DataParallel`, engine/parallel/fsdp.py `FSDP2`)
says which elements of which parameter this rank steps on (`segments()`: whole parameters for one process
and ZeRO-0, 1/dp of every grad bucket for ZeRO-1, the dim-0 shard for FSDP2) and where their reduced
gradient is. The optimizer keeps, per segment, an fp32 master (a view of the parameter when that is fp32
already), exp_avg, exp_avg_sq and the step count, and runs torch's AdamW on the masters (foreach on the
CPU, fused on the GPU).

Its state is addressable by canonical name and global offset: `canonical_state()` lists every state
tensor as boxes of the canonical tensor (engine/parallel/sharding.py), and `load_canonical_state()` fills
a rank's segments from canonical tensors, so a state taken at one (tp, pp, dp, zero) can be cut for any
other. Objects that hold a ParallelState call it `pstate`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional, Sequence

import torch
from torch import nn

from engine.optim.clip import clip_coefficient, grad_norm_squared, reduce_norm_squared
from engine.parallel.sharding import Box, ShardSpec, box_view, flat_range_boxes
from engine.parallel.state import ParallelState

__all__ = ["Optimizer", "StatePiece", "decays"]

_FORMAT = "tessera.optimizer.v1"
STATE_KEYS = ("exp_avg", "exp_avg_sq")


def decays(spec: ShardSpec) -> bool:
    """Decoupled weight decay on matrices and embeddings only (2-D and up), never on norms and biases."""
    return len(spec.global_shape) >= 2


@dataclass(eq=False)
class _Slot:
    name: str  # the parameter's name in its chunk
    spec: ShardSpec
    param_view: torch.Tensor  # (n,) the elements this rank updates, a view of the parameter
    grad: Callable[[], torch.Tensor]  # -> (n,) their reduced gradient
    start: int  # flat index of param_view[0] in the tp-local (runtime) tensor
    master: nn.Parameter  # (n,) fp32

    @property
    def has_copy(self) -> bool:
        return self.master.data_ptr() != self.param_view.data_ptr()


@dataclass(frozen=True)
class StatePiece:
    """One rectangular part of a canonical tensor's optimizer state held by this rank."""

    name: str  # canonical name
    key: str  # "exp_avg" | "exp_avg_sq" | "master"
    box: Box  # where in the canonical tensor (start, size per dim)
    value: torch.Tensor  # a view of this rank's state, shaped like the box


class Optimizer:
    """AdamW (decoupled weight decay) on the segments of a data-parallel wrapper.

    segments: objects with name, param, lo, hi, offset and `current_grad()` (engine.parallel.data_parallel.Segment).
    specs: {parameter name: ShardSpec} of this rank's chunks. grads_sharded: the segments of the dp ranks are
    disjoint (ZeRO-1, FSDP2), so the gradient norm sums over dp. after_step: runs after every update (ZeRO-1
    all-gathers the updated shards there). zero_grad: clears the gradients the segments read (the wrapper's).
    """

    def __init__(self, segments: Sequence, specs: dict[str, ShardSpec], pstate: ParallelState, *,
                 lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, grads_sharded: bool = False,
                 after_step: Optional[Callable[[], None]] = None,
                 zero_grad: Optional[Callable[[], None]] = None) -> None:
        self.pstate = pstate
        self.grads_sharded = grads_sharded
        self.after_step = after_step
        self._zero_grad = zero_grad
        self.slots: list[_Slot] = []
        for seg in segments:
            spec = specs[seg.name]
            view = seg.param.data.view(-1)[seg.lo:seg.hi]
            master = nn.Parameter(view if seg.param.dtype == torch.float32 else view.detach().float().clone())
            self.slots.append(_Slot(seg.name, spec, view, seg.current_grad, seg.offset + seg.lo, master))
        decay = [s.master for s in self.slots if decays(s.spec)]
        no_decay = [s.master for s in self.slots if not decays(s.spec)]
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        # fused: one kernel for all masters on the GPU; foreach elsewhere (one op per step for all tensors:
        # the per-tensor loop costs about 2% of a step of the CPU demo)
        kwargs = {"fused": True} if pstate.device.type == "cuda" else {"foreach": True}
        self.inner = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, **kwargs)

    # ------------------------------------------------------------ per step
    @property
    def param_groups(self) -> list[dict]:
        """The live torch param groups (an LR schedule sets `group["lr"]` on them)."""
        return self.inner.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients before the first micro-batch of a step (the data-parallel wrapper's buffers)."""
        if self._zero_grad is not None:
            self._zero_grad()

    def set_lr(self, lr: float) -> None:
        for g in self.inner.param_groups:
            g["lr"] = lr

    def local_grads(self) -> list[torch.Tensor]:
        """The reduced gradient pieces this rank steps on (fp16 unscaling / inf checks: combine the result
        over the world, since with sharded grads each rank sees only its part)."""
        return [s.grad() for s in self.slots]

    def grad_norm(self) -> float:
        """L2 norm of the global gradient (over tp, pp and, for sharded grads, the dp shards)."""
        local = grad_norm_squared([(s.grad(), s.spec) for s in self.slots], self.pstate)
        return float(reduce_norm_squared(local, self.pstate, over_dp=self.grads_sharded).sqrt())

    def clip_grad_norm(self, max_norm: float) -> float:
        """Scale this rank's gradient pieces so the global norm is <= max_norm; return the norm before."""
        norm = self.grad_norm()
        coef = clip_coefficient(norm, max_norm)
        if coef < 1.0:
            with torch.no_grad():
                for s in self.slots:
                    s.grad().mul_(coef)
        return norm

    @torch.no_grad()
    def step(self) -> None:
        """AdamW on the masters, copy them into low-precision parameters, then `after_step`."""
        for s in self.slots:
            s.master.grad = s.grad().to(torch.float32)  # a view when the main grad is fp32 already
        self.inner.step()
        for s in self.slots:
            if s.has_copy:
                s.param_view.copy_(s.master)
        if self.after_step is not None:
            self.after_step()

    # ------------------------------------------------------------ memory
    def state_bytes(self) -> int:
        """Bytes of optimizer state held by this rank: Adam moments (+ step) and fp32 master copies."""
        n = sum(t.numel() * t.element_size() for st in self.inner.state.values() for t in st.values()
                if torch.is_tensor(t))
        return n + sum(s.master.numel() * s.master.element_size() for s in self.slots if s.has_copy)

    # ------------------------------------------------------------ same-layout state (resume)
    def _layout(self) -> list[tuple[str, int, int]]:
        return [(s.name, s.start, s.master.numel()) for s in self.slots]

    def state_dict(self) -> dict:
        """This rank's state for a resume with the same layout: per slot (name, start, length) with its step,
        moments and fp32 master."""
        slots = []
        for s in self.slots:
            st = self.inner.state.get(s.master, {})
            slots.append({"name": s.name, "start": s.start, "numel": s.master.numel(),
                          "step": float(st["step"]) if "step" in st else 0.0,
                          **{k: st[k].detach().clone() for k in STATE_KEYS if k in st},
                          "master": s.master.detach().clone()})
        return {"format": _FORMAT, "slots": slots}

    @torch.no_grad()
    def load_state_dict(self, sd: dict) -> None:
        """Load a state saved by `state_dict` on the same layout (a clear error otherwise)."""
        if sd.get("format") != _FORMAT:
            raise ValueError(f"optimizer state: expected format {_FORMAT!r}, found {sd.get('format')!r}")
        found = [(x["name"], int(x["start"]), int(x["numel"])) for x in sd["slots"]]
        if found != self._layout():
            diff = next(((a, b) for a, b in zip(found, self._layout()) if a != b), (len(found), len(self.slots)))
            raise ValueError(f"optimizer state was saved with another layout (first difference: saved {diff[0]}, "
                             f"here {diff[1]}); cut it through canonical_state()/load_canonical_state()")
        for s, x in zip(self.slots, sd["slots"]):
            self._set_slot(s, x["step"], {k: x[k] for k in STATE_KEYS if k in x}, x["master"])

    def _set_slot(self, s: _Slot, step: float, moments: dict[str, torch.Tensor], master: torch.Tensor) -> None:
        s.master.copy_(master.reshape(-1))
        if s.has_copy:
            s.param_view.copy_(s.master)
        if moments:
            st = self.inner.state[s.master]
            st["step"] = self._step_tensor(step, s.master)
            for k, v in moments.items():
                st[k] = v.detach().reshape(-1).to(s.master.device, torch.float32).clone()

    def _step_tensor(self, step: float, master: torch.Tensor) -> torch.Tensor:
        """A step count as torch's AdamW keeps it: fp32, on the parameter's device for the fused kernel."""
        fused = bool(self.inner.defaults.get("fused"))
        return torch.tensor(float(step), dtype=torch.float32, device=master.device if fused else "cpu")

    # ------------------------------------------------------------ canonical state (any layout)
    def _boxes(self, s: _Slot) -> Iterator[tuple[int, Box, Box, Box]]:
        """(flat index in the slot where a contiguous box of the tp-local tensor starts, that box, a sub-box of
        it in local coordinates, the same elements' canonical box) for every part of a slot that is not
        padding."""
        n = s.master.numel()
        for box in flat_range_boxes(s.spec.local_shape, s.start, s.start + n):
            first = _flat_index(box[0], s.spec.local_shape) - s.start
            for lbox, cbox in s.spec.local_to_canonical(box, self.pstate.tp_rank):
                yield first, box, lbox, cbox

    def _pieces(self, s: _Slot, flats: dict[str, torch.Tensor], name: str) -> Iterator[StatePiece]:
        """Every non-padding part of the slot's flat tensors `flats` ({key: (n,) tensor laid out like the
        slot}) as views shaped like boxes of the canonical tensor `name`."""
        for first, box, lbox, cbox in self._boxes(s):
            rel = tuple(a - b for a, b in zip(lbox[0], box[0]))
            for key, flat in flats.items():
                whole = flat.view(-1)[first:first + _numel(box[1])].view(box[1])  # the contiguous box
                yield StatePiece(name, key, cbox, box_view(whole, (rel, lbox[1])))

    def _holds(self, s: _Slot, holders_only: bool) -> bool:
        return not holders_only or s.spec.counts_once(self.pstate.tp_rank)

    def _name(self, s: _Slot, holders_only: bool) -> str:
        """A holder lists its own canonical tensor; a reader of every slot reads a tied copy's canonical one."""
        return s.spec.name if holders_only else (s.spec.tied_to or s.spec.name)

    def canonical_state(self) -> tuple[list[StatePiece], dict[str, float]]:
        """(pieces of exp_avg / exp_avg_sq / master as boxes of canonical tensors, {canonical name: step}).
        Only the spec's holder lists a tensor: one tp rank per distinct shard (tp replicas step identically),
        and never a tied copy (its canonical tensor's state is listed where it lives). Assembling the pieces
        of every rank (over dp, tp and pp) gives each canonical element exactly once per dp replica for
        ZeRO-0, exactly once for sharded grads."""
        pieces: list[StatePiece] = []
        for s in self.slots:
            if not self._holds(s, True):
                continue
            st = self.inner.state.get(s.master, {})
            tensors = {k: st[k] for k in STATE_KEYS if k in st}
            tensors["master"] = s.master.detach()
            pieces += self._pieces(s, tensors, s.spec.name)
        return pieces, self.steps()

    def state_views(self, keys: Sequence[str] = ("param", *STATE_KEYS, "master"), holders_only: bool = True
                    ) -> list[StatePiece]:
        """Views of this rank's tensors as boxes of canonical tensors, for a checkpoint to write from
        (`holders_only`: the pieces `canonical_state` lists) or to read into (every slot, tied copies under
        their canonical tensor's name). Keys: "param" (the parameter elements this rank steps on, in the
        parameter's dtype), exp_avg, exp_avg_sq, and "master" (only where the fp32 master is a separate copy;
        else it is the parameter). The moments must exist (`init_state`)."""
        out: list[StatePiece] = []
        for s in self.slots:
            if not self._holds(s, holders_only):
                continue
            st = self.inner.state.get(s.master, {})
            tensors = {"param": s.param_view, **{k: st[k] for k in STATE_KEYS if k in st}}
            if s.has_copy:
                tensors["master"] = s.master.detach()
            out += self._pieces(s, {k: tensors[k] for k in keys if k in tensors}, self._name(s, holders_only))
        return out

    def steps(self, holders_only: bool = True) -> dict[str, float]:
        """{canonical name: AdamW step count} of this rank's slots."""
        out = {}
        for s in self.slots:
            if self._holds(s, holders_only):
                st = self.inner.state.get(s.master, {})
                out[self._name(s, holders_only)] = float(st["step"]) if "step" in st else 0.0
        return out

    @torch.no_grad()
    def init_state(self) -> None:
        """Create the moments (zeros) and step count of every slot now rather than at the first step, so a
        checkpoint can be read into them."""
        for s in self.slots:
            st = self.inner.state[s.master]
            if "step" not in st:
                st["step"] = self._step_tensor(0.0, s.master)
            for k in STATE_KEYS:
                if k not in st:
                    st[k] = torch.zeros_like(s.master, memory_format=torch.preserve_format)

    @torch.no_grad()
    def finish_load(self, steps: dict[str, float], params_loaded: bool, masters_loaded: bool) -> None:
        """After `state_views(holders_only=False)` were filled: set the step counts, make masters and
        parameters agree (a master read from the checkpoint wins; else the parameter is the source), and
        re-gather parameters over dp (ZeRO-1: each rank read its own 1/dp)."""
        for s in self.slots:
            st = self.inner.state[s.master]
            canon = s.spec.tied_to or s.spec.name
            if canon in steps:
                st["step"] = self._step_tensor(steps[canon], s.master)
            if s.has_copy:
                if masters_loaded:
                    s.param_view.copy_(s.master)
                elif params_loaded:
                    s.master.copy_(s.param_view)
        if params_loaded and self.after_step is not None:
            self.after_step()

    @torch.no_grad()
    def load_canonical_state(self, tensors: Callable[[str, str], Optional[torch.Tensor]],
                             steps: dict[str, float]) -> None:
        """Fill every slot from canonical tensors: `tensors(canonical name, key)` returns the full canonical
        exp_avg / exp_avg_sq / master (or None: that key is not restored). Tied copies read their canonical
        tensor's state. Padding elements get zeros."""
        for s in self.slots:
            canon = s.spec.tied_to or s.spec.name
            got = {k: tensors(canon, k) for k in (*STATE_KEYS, "master")}
            flat = {k: torch.zeros(s.master.numel(), dtype=torch.float32, device=s.master.device)
                    for k, v in got.items() if v is not None}
            if "master" in flat:  # keep padding elements as they are
                flat["master"].copy_(s.master)
            for piece in self._pieces(s, flat, canon):
                piece.value.copy_(box_view(got[piece.key], piece.box))
            self._set_slot(s, steps.get(canon, 0.0), {k: flat[k] for k in STATE_KEYS if k in flat},
                           flat.get("master", s.master))


def _numel(size: Iterable[int]) -> int:
    n = 1
    for x in size:
        n *= x
    return n


def _flat_index(index: Sequence[int], shape: Sequence[int]) -> int:
    flat = 0
    for i, n in zip(index, shape):
        flat = flat * n + i
    return flat
