"""Activation recompute (Megatron's "activation checkpointing"): keep only a function's inputs during the
forward, drop the activations inside it, and run it again in the backward to get them back.

    y = checkpoint(block.forward, x, rope, doc_ids, pstate=pstate)   # one call
    checkpoint_method(block, "forward", pstate)                      # every later block(...) call

Why our own and not `torch.utils.checkpoint`: that restores only torch's default generators, but dropout
on tensor-parallel-split activations (attention probabilities of this rank's heads, sequence-parallel
shards) draws from the model-parallel stream of the RNG tracker (engine/parallel/random.py). A recomputed
mask that differs from the original makes the gradient belong to another function than the loss. So the
recomputed forward runs with everything the original forward ran with:

- RNG: the CPU generator, the CUDA generator of the inputs' device, and every stream of this rank's
  tracker, as they were when the original forward started. Afterwards all of them are put back where the
  backward found them, so the streams advance exactly as without recompute (next micro-batches and steps
  draw the same masks).
- autocast: enabled / dtype / cache flag of the inputs' device type.
- torch-function modes: the stack that was active around the original call, e.g. the zero-bubble
  schedule's `defer_weight_grads` (engine/parallel/pipeline/weight_grad.py), so the linears of the
  recomputed graph defer their weight gradients to the W pass as the original ones would have. A mode that
  is already active when the backward runs is not entered twice.
- grad mode: enabled.

The design is reentrant, as Megatron's CheckpointFunction: a custom autograd Function runs the function
under no_grad in its forward and saves only the tensor inputs; its backward recomputes the function with
grad on detached copies of them and backpropagates through the recomputed graph with a nested
`torch.autograd.backward`. Consequences:
- parameter gradients accumulate inside that nested backward, so post-accumulate-grad hooks (the data-
  parallel grad buffers of engine/parallel/data_parallel.py) and FSDP2's per-module hooks see them as
  usual; use `.backward()` / `torch.autograd.backward` (not `torch.autograd.grad(..., inputs=...)`, which
  would leave the parameters' gradients in `.grad` instead of returning them);
- an empty anchor tensor that requires grad is an extra input, so the output requires grad (and the
  parameters inside get their gradients) even when no tensor input does (e.g. a frozen embedding);
- under no_grad (evaluation) the function simply runs: nothing to recompute;
- the wrapper must not be traced by torch.compile (its backward re-enters autograd): compile the
  function it wraps (compile inside the checkpoint), or mark the wrapper `torch.compiler.disable` where
  it sits inside a compiled region (a graph break; the wrapped part then runs eagerly).

Arguments and results are pytrees (tuples, lists, dicts) of tensors and other values: tensors anywhere in
the arguments are inputs (saved, and given gradients when they require grad); every leaf of the result
must be a tensor.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch
import torch.nn as nn
from torch.overrides import _get_current_function_mode_stack
from torch.utils._pytree import tree_flatten, tree_unflatten

from engine.parallel.random import RNGStatesTracker, get_tracker
from engine.parallel.state import ParallelState

__all__ = ["checkpoint", "checkpoint_method", "is_checkpointed", "RecomputeError"]

_MARK = "_tessera_recompute"  # set on the wrapper functions (never on modules or parameters)


class RecomputeError(TypeError):
    """A function handed to `checkpoint` returns something other than a pytree of tensors."""


@dataclass
class _RngSnapshot:
    cpu: torch.Tensor
    cuda: Optional[torch.Tensor]
    tracker: Optional[dict[str, torch.Tensor]]

    @classmethod
    def take(cls, device: torch.device, tracker: Optional[RNGStatesTracker]) -> "_RngSnapshot":
        cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        return cls(torch.get_rng_state(), cuda, tracker.get_states() if tracker is not None else None)

    def restore(self, device: torch.device, tracker: Optional[RNGStatesTracker]) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, device)
        if self.tracker is not None and tracker is not None:
            tracker.set_states(self.tracker)


@dataclass
class _ForwardContext:
    """What the original forward ran under; the recompute runs under the same."""

    device: torch.device
    tracker: Optional[RNGStatesTracker]
    rng: _RngSnapshot
    autocast: tuple[bool, torch.dtype, bool]  # enabled, dtype, cache_enabled for device.type
    modes: list[Any]  # torch-function modes, outermost first

    @classmethod
    def capture(cls, device: torch.device, tracker: Optional[RNGStatesTracker]) -> "_ForwardContext":
        dev = device.type
        autocast = (torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev), torch.is_autocast_cache_enabled())
        return cls(device, tracker, _RngSnapshot.take(device, tracker), autocast, _get_current_function_mode_stack())

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        """RNG streams, autocast, torch-function modes and grad mode of the original forward; the RNG streams
        are returned to their present state on exit."""
        now = _RngSnapshot.take(self.device, self.tracker)
        self.rng.restore(self.device, self.tracker)
        enabled, dtype, cache = self.autocast
        active = _get_current_function_mode_stack()
        try:
            with contextlib.ExitStack() as stack:
                for mode in self.modes:
                    if not any(mode is m for m in active):
                        stack.enter_context(mode)
                stack.enter_context(torch.enable_grad())
                stack.enter_context(torch.autocast(self.device.type, dtype=dtype, enabled=enabled,
                                                   cache_enabled=cache))
                yield
        finally:
            now.restore(self.device, self.tracker)


class _Recompute(torch.autograd.Function):
    """forward(plan, anchor, *tensors): run the plan's function under no_grad, save the tensor inputs.
    backward: recompute with grad under the captured context, backprop the incoming gradients through it."""

    @staticmethod
    def forward(ctx: Any, plan: "_Plan", anchor: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        with torch.no_grad():
            out = plan.run(tensors)
        ctx.plan = plan
        ctx.save_for_backward(*tensors)  # version counters: an input changed in place before backward is an error
        return out

    @staticmethod
    def backward(ctx: Any, *grads: Optional[torch.Tensor]) -> tuple[Optional[torch.Tensor], ...]:  # type: ignore[override]
        plan: _Plan = ctx.plan
        saved = ctx.saved_tensors
        needs = ctx.needs_input_grad[2:]
        inputs = [t.detach().requires_grad_(bool(need)) for t, need in zip(saved, needs)]
        with plan.context.replay():
            outs = plan.run(inputs)
        pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        ctx.plan = None  # free the function's closure and the captured RNG states
        return (None, None) + tuple(t.grad if need else None for t, need in zip(inputs, needs))


class _Plan:
    """The function and its arguments with the tensor leaves taken out (they travel as Function inputs)."""

    def __init__(self, function: Callable[..., Any], args: tuple, kwargs: dict, context: _ForwardContext) -> None:
        self.function = function
        self.leaves, self.spec = tree_flatten((args, kwargs))
        self.slots = [i for i, v in enumerate(self.leaves) if isinstance(v, torch.Tensor)]
        self.context = context
        self.out_spec: Any = None

    def tensors(self) -> list[torch.Tensor]:
        return [self.leaves[i] for i in self.slots]

    def run(self, tensors) -> tuple[torch.Tensor, ...]:  # noqa: ANN001 - a sequence of tensors
        leaves = list(self.leaves)
        for i, t in zip(self.slots, tensors):
            leaves[i] = t
        args, kwargs = tree_unflatten(leaves, self.spec)
        out = self.function(*args, **kwargs)
        flat, spec = tree_flatten(out)
        bad = [type(v).__name__ for v in flat if not isinstance(v, torch.Tensor)]
        if bad:
            raise RecomputeError(f"activation recompute: {getattr(self.function, '__qualname__', self.function)} "
                                 f"must return tensors (a tensor or a tuple/list/dict of them), found {bad}")
        self.out_spec = spec
        return tuple(flat)


def _tracker_of(pstate: Optional[ParallelState]) -> Optional[RNGStatesTracker]:
    """The tracker whose streams the forward may draw from: the state's, created as the forward itself would
    create it (engine/parallel/random.get_tracker) when tp > 1; none needed at tp = 1 without one."""
    if pstate is None:
        return None
    if pstate.rng_tracker is not None:
        return pstate.rng_tracker
    return get_tracker(pstate) if pstate.tp > 1 else None


def checkpoint(function: Callable[..., Any], *args: Any, pstate: Optional[ParallelState] = None,
               **kwargs: Any) -> Any:
    """`function(*args, **kwargs)` with its activations recomputed in the backward (see the module docstring).

    pstate: whose RNG tracker streams to save and replay (None: only torch's default generators). The name
    `pstate` is taken by this function, so it cannot be a keyword argument of `function`."""
    if not torch.is_grad_enabled():
        return function(*args, **kwargs)
    probe = next((v for v in tree_flatten((args, kwargs))[0] if isinstance(v, torch.Tensor)), None)
    device = probe.device if probe is not None else (pstate.device if pstate is not None else torch.device("cpu"))
    plan = _Plan(function, args, kwargs, _ForwardContext.capture(device, _tracker_of(pstate)))
    anchor = torch.empty(0, device=device, requires_grad=True)  # the output requires grad even if no input does
    out = _Recompute.apply(plan, anchor, *plan.tensors())
    return tree_unflatten(list(out), plan.out_spec)


def checkpoint_method(module: nn.Module, name: str, pstate: Optional[ParallelState]) -> None:
    """Recompute every later call of `module.<name>` (a method such as Block.forward or Attention.core, or a
    function already set on the instance, e.g. a compiled forward). The instance attribute shadows the
    class's method; arguments pass through as *args/**kwargs, so a changed signature keeps working."""
    inner = getattr(module, name)
    if is_checkpointed(inner):
        raise ValueError(f"activation recompute: {type(module).__name__}.{name} is already recomputed")

    @functools.wraps(inner)
    def recomputed(*args: Any, **kwargs: Any) -> Any:
        return checkpoint(inner, *args, pstate=pstate, **kwargs)

    setattr(recomputed, _MARK, True)
    setattr(module, name, recomputed)


def is_checkpointed(fn: Any) -> bool:
    """Whether `fn` (e.g. `block.forward`) is a recompute wrapper made by `checkpoint_method`, also under
    wrappers that keep `__wrapped__` (functools.wraps, torch.compiler.disable)."""
    seen = 0
    while fn is not None and seen < 8:
        if getattr(fn, _MARK, False):
            return True
        fn, seen = getattr(fn, "__wrapped__", None), seen + 1
    return False
