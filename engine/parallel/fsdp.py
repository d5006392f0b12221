"""parallel.zero = 3: torch FSDP2 (`fully_shard`) over the dp group, behind the same per-step interface as
`DataParallel`, so the training loop and the optimizer do not branch on the ZeRO level.

Parameters, gradients and optimizer state are all sharded 1/dp (parameters are DTensors after
`fully_shard`, split along dim 0); FSDP2 all-gathers a unit's parameters before its forward/backward and
reduce-scatters (mean over dp) its gradients in backward. Units: every block of `chunk.layers` when the
chunk has one (overlaps the next block's all-gather with compute), then the chunk itself (embeddings,
head, norms). Supported at tp = pp = 1 (config validation rejects the rest).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from engine.parallel.data_parallel import Segment
from engine.parallel.state import ParallelState

__all__ = ["FSDP2"]


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


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (a plain tensor is its own shard)."""
    return t.to_local() if hasattr(t, "to_local") else t


class _ShardGrad:
    """The local gradient of one FSDP2 parameter, read when the optimizer steps (FSDP2 creates a new
    gradient DTensor every backward). A parameter without gradient this step steps with zeros, as under
    DataParallel."""

    def __init__(self, param: nn.Parameter) -> None:
        self.param = param

    def __call__(self) -> torch.Tensor:
        g = self.param.grad
        local = _local(self.param)
        if g is None:
            return torch.zeros(local.numel(), dtype=local.dtype, device=local.device)
        return _local(g).reshape(-1)


class FSDP2:
    """`fully_shard` the chunks over the dp mesh; `no_sync`/`finish_grad_sync`/`zero_grad` like DataParallel."""

    def __init__(self, modules: Sequence[nn.Module], pstate: ParallelState) -> None:
        self.modules = list(modules)
        self.pstate = pstate
        self.shard_grads = True
        if pstate.is_distributed:
            from torch.distributed.fsdp import fully_shard

            mesh = pstate.mesh["dp"]
            for m in self.modules:
                for block in _blocks(m):
                    fully_shard(block, mesh=mesh)
                fully_shard(m, mesh=mesh)
        self.named = [(n, p) for m in self.modules for n, p in m.named_parameters() if p.requires_grad]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if len(self.modules) != 1:
            raise RuntimeError("FSDP2 over several chunks: call the chunks (wrapper.modules[i]) directly")
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

    def main_grad(self, param: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("FSDP2 keeps gradients as sharded DTensors; use segments()")

    def zero_grad(self) -> None:
        for _, p in self.named:
            p.grad = None
        self._set_sync(True)

    def finish_grad_sync(self) -> None:
        """FSDP2 finishes its reduce-scatters at the end of backward; nothing is left to wait for."""

    def sync_params(self) -> None:
        """Nothing to gather after the step: FSDP2 all-gathers each unit before its next forward."""

    def segments(self) -> list[Segment]:
        """This rank's dim-0 shard of every parameter (FSDP2's `Shard(0)`: rows [r*ceil(n/dp), ...))."""
        out = []
        for name, p in self.named:
            local = _local(p)
            rows = p.shape[0] if p.dim() else 1
            per_rank = -(-rows // self.pstate.dp) if self.pstate.is_distributed else rows  # ceil
            offset = min(self.pstate.dp_rank * per_rank, rows) * (p.numel() // rows if rows else 0)
            out.append(Segment(name, local, 0, local.numel(), _ShardGrad(p), offset))
        return out
