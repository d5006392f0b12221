"""RNG streams for tensor parallelism (Megatron's "CUDA RNG tracker", device-agnostic).

Two kinds of randomness inside a tp group:
- the DEFAULT stream (torch's global generator), seeded identically on every tp rank: dropout on
  activations that are replicated across tp (e.g. the residual stream without sequence parallel) draws
  the same mask everywhere, as it must, because every rank continues with the same tensor;
- the MODEL-PARALLEL stream, seeded differently per tp rank: dropout on activations that are split
  across tp (attention probabilities of this rank's heads, sequence-parallel shards) must draw
  independent masks per shard. Code enters it with `with tracker.fork(): ...`.

A fork swaps the device's default generator state in and out, so ordinary torch code (F.dropout) is
unchanged inside it and the default stream continues untouched afterwards.

At tp=1 use `model_parallel_rng(state)`: it does not fork, so results equal plain torch.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch

from engine.parallel.state import ParallelState

MODEL_PARALLEL_RNG = "model-parallel"
_MP_SEED_OFFSET = 2718  # keeps the per-tp-rank stream away from the default seed (same constant as Megatron)
_PP_SEED_STRIDE = 100  # each pipeline stage gets its own default stream (different layers, different masks)


def _get_state(device: torch.device) -> torch.Tensor:
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _set_state(state: torch.Tensor, device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


class RNGStatesTracker:
    """Named generator states that can be forked into (swapped with the device's default generator)."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self._states: dict[str, torch.Tensor] = {}
        self._seeds: dict[str, int] = {}

    def add(self, name: str, seed: int) -> None:
        if name in self._states:
            raise ValueError(f"RNG stream {name!r} already exists")
        if seed in self._seeds.values():
            raise ValueError(f"seed {seed} is already used by another RNG stream")
        gen = torch.Generator(device=self.device).manual_seed(seed)
        self._states[name] = gen.get_state()
        self._seeds[name] = seed

    def names(self) -> list[str]:
        return list(self._states)

    def get_states(self) -> dict[str, torch.Tensor]:
        """Copies of every stream's state (per-rank checkpoint content)."""
        return {k: v.clone() for k, v in self._states.items()}

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self._states = {k: v.clone() for k, v in states.items()}

    @contextlib.contextmanager
    def fork(self, name: str = MODEL_PARALLEL_RNG) -> Iterator[None]:
        """Run the body with stream `name` as the device's default generator; its advance is kept."""
        if name not in self._states:
            raise KeyError(f"RNG stream {name!r} was never added (call seed_parallel_rng first)")
        saved = _get_state(self.device)
        _set_state(self._states[name], self.device)
        try:
            yield
        finally:
            self._states[name] = _get_state(self.device)
            _set_state(saved, self.device)


def seed_parallel_rng(seed: int, state: ParallelState) -> RNGStatesTracker:
    """Seed the default stream (same on all tp and dp ranks of a pipeline stage) and the per-tp-rank
    model-parallel stream; store the tracker on `state.rng_tracker` and return it.

    Call once at start-up, after building the ParallelState and BEFORE building the model only if the
    model's init uses the global RNG (Tessera's layers use their own seeded generators for init).
    """
    default_seed = seed + _PP_SEED_STRIDE * state.pp_rank
    torch.manual_seed(default_seed)  # CPU and every CUDA device
    tracker = RNGStatesTracker(state.device)
    tracker.add(MODEL_PARALLEL_RNG, default_seed + _MP_SEED_OFFSET + state.tp_rank)
    state.rng_tracker = tracker
    return tracker


def get_tracker(state: ParallelState) -> RNGStatesTracker:
    """The state's tracker; created from torch.initial_seed() if `seed_parallel_rng` was never called."""
    tracker: Optional[RNGStatesTracker] = getattr(state, "rng_tracker", None)
    if tracker is None:
        tracker = RNGStatesTracker(state.device)
        tracker.add(MODEL_PARALLEL_RNG, torch.initial_seed() + _MP_SEED_OFFSET + state.tp_rank)
        state.rng_tracker = tracker
    return tracker


def model_parallel_rng(state: ParallelState) -> contextlib.AbstractContextManager:
    """Context for randomness on tp-split activations: the per-tp-rank stream at tp > 1, nothing at tp=1."""
    if state.tp == 1:
        return contextlib.nullcontext()
    return get_tracker(state).fork(MODEL_PARALLEL_RNG)
