"""Which linears run in FP8, the swap itself, and the FP8 state of a run (`Fp8Manager`).

Always high precision: the embedding (not a matmul), the output head, norms and the attention core
(softmax(QK^T)V stays in the compute dtype): only the Column/RowParallelLinear layers inside the transformer
blocks (`layers.<i>.*`) are candidates. Also kept: the first/last block (`first_block`, `last_block`) and
every module matched by a `keep_high_precision` entry (an fnmatch pattern over canonical module names, which
matches the module and everything below it, e.g. `layers.*.mlp.down_proj` or `layers.3`). An entry that
matches no linear of the model is an error: a filter that silently matches nothing would quantise exactly
the layer it was meant to protect. Layers whose local weight shape breaks _scaled_mm's alignment rules
stay in the compute dtype, each with one line in the start-up report.

State by canonical name (delayed recipe only): `<module>/<role>/amax_history|scale|steps`, role = `input`
or `grad_output`. Amaxes are reduced (max) over the tensor- and data-parallel ranks that hold the layer, once
per optimizer step, so every rank holding a layer holds the same scales: for an input shared by the tp ranks
(column-parallel layers; sequence parallel gathers it first) this is the amax of that one tensor, and for a
sharded one (row-parallel inputs, column-parallel output gradients) the amax of the whole canonical tensor.
The scales are therefore the same at every tp and dp, and a checkpoint's FP8 state loads at any layout.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from engine.errors import ConfigError
from engine.parallel.collectives import all_reduce
from engine.parallel.layers import ColumnParallelLinear, RowParallelLinear
from engine.parallel.state import ParallelState
from engine.precision.fp8 import Fp8Linear, StepClock
from engine.precision.fp8_recipes import RECIPES
from engine.precision.fp8_rules import shape_problem

SPECIAL = {"first_block": "the first block", "last_block": "the last block"}
_BLOCK = re.compile(r"^layers\.(\d+)\.(.+)$")


def _local_shape(layer: nn.Module) -> tuple[int, int]:
    out, inp = layer.weight.shape  # this rank's shard [out, in]
    return int(inp), int(out)


def _matches(name: str, pattern: str) -> bool:
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, pattern + ".*")


@dataclass
class Fp8Report:
    """What the swap decided on this rank: FP8 linears and {high-precision linear: why}."""

    fp8: list[str] = field(default_factory=list)
    high_precision: dict[str, str] = field(default_factory=dict)

    def merged(self, others: Sequence["Fp8Report"]) -> "Fp8Report":
        out = Fp8Report(list(self.fp8), dict(self.high_precision))
        for o in others:
            out.fp8 += [n for n in o.fp8 if n not in out.fp8]
            out.high_precision.update(o.high_precision)
        return out

    def lines(self, recipe: str) -> list[str]:
        """The start-up report: one summary line, then one line per high-precision linear."""
        total = len(self.fp8) + len(self.high_precision)
        head = (f"tessera: fp8 ({recipe}): {len(self.fp8)} of {total} linears run in FP8; "
                f"{len(self.high_precision)} stay high precision" + (":" if self.high_precision else ""))
        return [head] + [f"tessera: fp8:   {n}: {why}" for n, why in sorted(self.high_precision.items(),
                                                                           key=lambda kv: _order(kv[0]))]


def _order(name: str) -> tuple:
    m = _BLOCK.match(name)
    return (0, int(m[1]), m[2]) if m else (1, 0, name)


def _candidates(chunks: Sequence[nn.Module]) -> dict[str, nn.Module]:
    """{canonical module name: Column/RowParallelLinear} of this rank's chunks (names are global)."""
    out: dict[str, nn.Module] = {}
    for c in chunks:
        for name, mod in c.named_modules():
            if isinstance(mod, (ColumnParallelLinear, RowParallelLinear)):
                out[name] = mod
    return out


def canonical_linears(local: Sequence[str], n_layers: int) -> list[str]:
    """Every linear of the whole model (all pipeline stages), from this rank's: each block has the same
    linears, so the block-relative names seen here repeat over all n_layers blocks."""
    suffixes = sorted({m[2] for m in map(_BLOCK.match, local) if m})
    rest = [n for n in local if not _BLOCK.match(n)]
    return [f"layers.{i}.{s}" for i in range(n_layers) for s in suffixes] + sorted(set(rest) | {"head"})


def check_keep_patterns(patterns: Sequence[str], names: Sequence[str]) -> None:
    """Every keep_high_precision entry must match at least one linear of the model (ConfigError otherwise)."""
    for i, pat in enumerate(patterns):
        if pat in SPECIAL:
            continue
        if not any(_matches(n, pat) for n in names):
            examples = ", ".join(names[:4] + ["..."] if len(names) > 4 else names)
            raise ConfigError(f"precision.fp8.keep_high_precision[{i}]: {pat!r} matches no linear layer of this "
                              f"model; expected first_block, last_block or a pattern over module names such as "
                              f"{examples}")


def _reason(name: str, patterns: Sequence[str], n_layers: int) -> str:
    """Why `name` is kept in high precision by rule or by the config, or '' (a candidate)."""
    m = _BLOCK.match(name)
    if m is None:
        return "output head (always high precision)" if name == "head" else "outside the blocks (always)"
    i = int(m[1])
    if i == 0 and "first_block" in patterns:
        return "first block (keep_high_precision: first_block)"
    if i == n_layers - 1 and "last_block" in patterns:
        return "last block (keep_high_precision: last_block)"
    for pat in patterns:
        if pat not in SPECIAL and _matches(name, pat):
            return f"keep_high_precision: {pat!r}"
    return ""


class Fp8Manager:
    """The FP8 layers of this rank by canonical module name, their clock and their state."""

    def __init__(self, recipe: str, layers: dict[str, Fp8Linear], clock: StepClock, report: Fp8Report) -> None:
        self.recipe, self.layers, self.clock, self.report = recipe, layers, clock, report

    def begin_step(self) -> None:
        """Before the forwards of an optimizer step (or an evaluation): the weights changed, cast them again."""
        self.clock.tick()

    @torch.no_grad()
    def update(self, pstate: ParallelState) -> None:
        """End of an optimizer step (every rank, collective over tp and dp): this step's amaxes, max-reduced
        over the ranks holding each layer, enter the histories and set the next scales (delayed recipe)."""
        states = [s for layer in self.layers.values() for s in layer.delayed_states().values()]
        if not states:
            return
        amax = torch.stack([s.pending for s in states])  # [n_states], one collective per group
        for group, size in ((pstate.tp_group, pstate.tp), (pstate.dp_group, pstate.dp)):
            if size > 1 and dist.is_initialized():
                amax = all_reduce(amax, group, op=dist.ReduceOp.MAX)
        for s, a in zip(states, amax):
            s.update(a)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """{"<module>/<role>/<field>": tensor} (empty unless the recipe keeps state)."""
        return {f"{name}/{role}/{k}": v for name, layer in self.layers.items()
                for role, st in layer.delayed_states().items() for k, v in st.state_dict().items()}

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        for name, layer in self.layers.items():
            for role, st in layer.delayed_states().items():
                p = f"{name}/{role}/"
                st.load_state_dict({k[len(p):]: v for k, v in sd.items() if k.startswith(p)})
        self.clock.tick()

    def state_shapes(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return {k: (tuple(v.shape), v.dtype) for k, v in self.state_dict().items()}

    def report_lines(self, pstate: ParallelState) -> list[str]:
        """The start-up report over all pipeline stages (collective over the pipeline group when pp > 1)."""
        report = self.report
        if pstate.pp > 1 and dist.is_initialized():
            got: list[Optional[Fp8Report]] = [None] * pstate.pp
            dist.all_gather_object(got, report, group=pstate.pp_group)
            report = report.merged([r for r in got if r is not None])
        return report.lines(self.recipe)


def te_available() -> tuple[bool, str]:
    """(Transformer Engine importable, why not)."""
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure means: not usable here
        return False, f"{type(e).__name__}: {e}"
    return True, ""


def apply_fp8(chunks: Sequence[nn.Module], pstate: ParallelState, *, recipe: str, backend: str = "native",
              keep_high_precision: Sequence[str] = (), n_layers: int, amax_history_len: int = 16, margin: int = 0,
              log: Optional[Callable[[str], None]] = None) -> Fp8Manager:
    """Swap the FP8 matmul into this rank's eligible linears (sets their `linear_fn`); returns the manager."""
    if recipe not in RECIPES:
        raise ConfigError(f"precision.fp8.recipe: expected one of {', '.join(RECIPES)}, found {recipe!r}")
    if backend == "te":
        ok, why = te_available()
        if not ok:
            raise ConfigError(f"precision.fp8.backend='te': Transformer Engine is not importable here ({why}); "
                              f"install transformer-engine, or use precision.fp8.backend=native (torch._scaled_mm)")
        raise ConfigError("precision.fp8.backend='te': Transformer Engine is installed, but Tessera's TE layer swap "
                          "is not implemented yet; use precision.fp8.backend=native (torch._scaled_mm)")
    if backend != "native":
        raise ConfigError(f"precision.fp8.backend: expected 'native' or 'te', found {backend!r}")
    found = _candidates(chunks)
    check_keep_patterns(list(keep_high_precision), canonical_linears(list(found), n_layers))
    clock = StepClock()
    report, layers = Fp8Report(), {}
    for name, mod in found.items():
        why = _reason(name, keep_high_precision, n_layers)
        if not why:
            problem = shape_problem(*_local_shape(mod))
            why = f"shape: {problem}" if problem else ""
        if why:
            report.high_precision[name] = why
            continue
        layers[name] = Fp8Linear(name, recipe, clock, amax_history_len, margin, device=mod.weight.device)
        mod.linear_fn = layers[name]
        report.fp8.append(name)
    if "head" not in found:  # tied head: an F.linear on the embedding, high precision by construction
        if any(getattr(c, "post_process", False) for c in chunks):
            report.high_precision["head"] = "output head (always high precision; tied to the embedding)"
    if log is not None:
        for line in report.lines(recipe):
            log(line)
    return Fp8Manager(recipe, layers, clock, report)


__all__ = ["Fp8Manager", "Fp8Report", "SPECIAL", "apply_fp8", "canonical_linears", "check_keep_patterns",
           "te_available"]
