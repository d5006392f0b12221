"""parallel.zero = 3: torch FSDP2 (`fully_shard`) over the dp group, behind the same per-step interface
as `DataParallel` + `DistributedOptimizer` so the training loop does not branch on the ZeRO level.

Parameters, gradients and optimizer state are all sharded 1/dp (parameters are DTensors after
`fully_shard`); FSDP2 all-gathers a unit's parameters before its forward/backward and reduce-scatters
(mean over dp) its gradients in backward. Units: every block of `chunk.layers` when the chunk has one
(overlaps the next block's all-gather with compute), then the chunk itself (embeddings, head, norms).
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from engine.optim.clip import clip_coefficient, grad_norm_squared, reduce_norm_squared
from engine.parallel.state import ParallelState

__all__ = ["FSDPWrapper", "FSDPOptimizer"]


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (a plain tensor is its own shard)."""
    return t.to_local() if hasattr(t, "to_local") else t


def _blocks(chunk: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a chunk, each its own FSDP unit. `Transformer.layers` is an nn.ModuleDict
    keyed by the global layer index (iterating it yields the keys, not the blocks); a list-like
    container (nn.ModuleList / nn.Sequential) yields the blocks themselves."""
    layers = getattr(chunk, "layers", None)
    if layers is None:
        return []
    if isinstance(layers, nn.ModuleDict):
        return list(layers.values())
    return list(layers)


class FSDPWrapper:
    """`fully_shard` the chunks over the dp mesh; `no_sync`/`finish_grad_sync`/`zero_grad` like DataParallel."""

    def __init__(self, modules: Sequence[nn.Module], state: ParallelState) -> None:
        self.modules = list(modules)
        self.state = state
        self.shard_grads = True
        names_before = {id(p): (ci, n) for ci, m in enumerate(self.modules) for n, p in m.named_parameters()}
        if state.is_distributed:
            from torch.distributed.fsdp import fully_shard

            mesh = state.mesh["dp"]
            for m in self.modules:
                for block in _blocks(m):
                    fully_shard(block, mesh=mesh)
                fully_shard(m, mesh=mesh)
        # fully_shard replaces parameters by DTensor parameters: map the old objects to the new ones by name.
        after = {(ci, n): p for ci, m in enumerate(self.modules) for n, p in m.named_parameters()}
        self._new_param = {old: after[key] for old, key in names_before.items()}
        self.params = list(dict.fromkeys(p for m in self.modules for p in m.parameters() if p.requires_grad))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if len(self.modules) != 1:
            raise RuntimeError("FSDPWrapper over several chunks: call the chunks (wrapper.modules[i]) directly")
        return self.modules[0](*args, **kwargs)

    def _set_sync(self, on: bool) -> None:
        for m in self.modules:
            if hasattr(m, "set_requires_gradient_sync"):
                m.set_requires_gradient_sync(on)

    @contextlib.contextmanager
    def no_sync(self, enabled: bool = True) -> Iterator[None]:
        if enabled:
            self._set_sync(False)
        try:
            yield
        finally:
            if enabled:
                self._set_sync(True)

    def set_is_last_microbatch(self, is_last: bool) -> None:
        self._set_sync(is_last)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None
        self._set_sync(True)

    def finish_grad_sync(self) -> None:
        """FSDP2 finishes its reduce-scatters at the end of backward; nothing is left to wait for."""

    def remap_groups(self, groups: list[dict]) -> list[dict]:
        """Param groups built before sharding -> the same groups over the sharded parameters."""
        return [{**g, "params": [self._new_param.get(id(p), p) for p in g["params"]]} for g in groups]

    def make_optimizer(self, groups: list[dict], **adam: Any) -> "FSDPOptimizer":
        return FSDPOptimizer(self, self.remap_groups(groups), **adam)


class FSDPOptimizer:
    """torch AdamW on the sharded (DTensor) parameters, with the DistributedOptimizer's interface."""

    def __init__(self, wrapper: FSDPWrapper, groups: list[dict], **adam: Any) -> None:
        self.ddp = wrapper
        self.state = wrapper.state
        self.inner = torch.optim.AdamW(groups, foreach=False, **adam)

    @property
    def param_groups(self) -> list[dict]:
        return self.inner.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.ddp.zero_grad()

    def _pieces(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(_local(p.grad), p) for p in self.ddp.params if p.grad is not None]

    def local_grads(self) -> list[torch.Tensor]:
        return [g for g, _ in self._pieces()]

    def grad_norm(self) -> float:
        over_dp = self.state.is_distributed
        return float(reduce_norm_squared(grad_norm_squared(self._pieces(), self.state), self.state,
                                         over_dp=over_dp).sqrt())

    def clip_grad_norm(self, max_norm: float) -> float:
        norm = self.grad_norm()
        coef = clip_coefficient(norm, max_norm)
        if coef < 1.0:
            with torch.no_grad():
                for g, _ in self._pieces():
                    g.mul_(coef)
        return norm

    @torch.no_grad()
    def step(self) -> None:
        # Same semantics as DataParallel: a parameter that got no gradient this step steps with a zero grad.
        for p in self.ddp.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        self.inner.step()

    def state_bytes(self) -> int:
        return sum(_local(t).numel() * _local(t).element_size() for st in self.inner.state.values()
                   for t in st.values() if torch.is_tensor(t))

    def state_dict(self) -> dict:
        return {"format": "tessera.fsdp_optimizer.v1", "optimizer": self.inner.state_dict()}

    def load_state_dict(self, sd: dict) -> None:
        self.inner.load_state_dict(copy.deepcopy(sd["optimizer"]))
