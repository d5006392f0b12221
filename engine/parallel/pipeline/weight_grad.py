"""Split backward for zero-bubble schedules: B computes input gradients, W the weight gradients later.

Choice: defer the weight-gradient matmul of every linear map `F.linear(x, W, b)` with a trainable
parameter W (dW = dY^T X, about half of a transformer's backward FLOPs) and compute all other
parameter gradients (norms, biases, embeddings, anything custom) during B as usual. That is correct
for any module -- an op we do not recognise simply gets its full gradient in B -- and needs no
graph surgery: forwards run under a TorchFunctionMode (`defer_weight_grads`) that swaps F.linear for
a custom autograd Function whose backward returns dX (and the bias grad) and records (W, X, dY) in a
`WeightGradStore` under the key of the running B. W(key) then does the matmuls and accumulates into
`W.grad`, in micro-batch order, so the sums match plain autograd accumulation.

Data parallelism: deferred weights get their gradient outside autograd, so post-accumulate-grad
hooks do not fire for them; W adds into the data-parallel main grad when the store has a
`grad_target` (what the hook would have done: the executor sets it to `ddp.main_grad`), and the
executor keeps DP reductions for after the step.

FP8: the FP8 linear (engine/precision/fp8.py) is not an F.linear; it takes part in the same mode through
a small protocol (`accepts_weight_grad_store`) and hands its FP8 wgrad matmul to `add_deferred`.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Hashable, Iterator, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


class WeightGradStore:
    """Pending (weight, input, grad_output) triples, grouped by the key of the backward that made them."""

    def __init__(self, grad_target: Optional[Callable[[nn.Parameter], torch.Tensor]] = None) -> None:
        # parameter -> the tensor its weight gradient accumulates into (None: weight.grad)
        self.grad_target = grad_target
        self._key: Optional[Hashable] = None
        # key -> [(weight, the deferred computation returning dW [out, in])]
        self._pending: dict[Hashable, list[tuple[nn.Parameter, Callable[[], torch.Tensor]]]] = {}
        self.n_deferred_layers = 0  # linear calls routed through the deferring Function (statistics, tests)

    @contextlib.contextmanager
    def capture(self, key: Hashable) -> Iterator[None]:
        """Backward passes run inside this context defer their linear weight gradients to `flush(key)`."""
        prev, self._key = self._key, key
        try:
            yield
        finally:
            self._key = prev

    @property
    def capturing(self) -> bool:
        return self._key is not None

    def add(self, weight: nn.Parameter, x: torch.Tensor, gy: torch.Tensor) -> None:
        """Defer dW = dY^T X of an F.linear (x [..., in], gy [..., out])."""
        self.add_deferred(weight, lambda: gy.reshape(-1, gy.shape[-1]).t().matmul(x.reshape(-1, x.shape[-1])))

    def add_deferred(self, weight: nn.Parameter, compute: Callable[[], torch.Tensor]) -> None:
        """Defer any weight-gradient computation (`compute()` -> dW shaped like `weight`), e.g. the FP8
        linear's wgrad matmul (engine/precision/fp8.py)."""
        self._pending.setdefault(self._key, []).append((weight, compute))

    @torch.no_grad()  # saved inputs may require grad (stage inputs): dW must not build a graph
    def flush(self, key: Hashable) -> None:
        """W pass: every dW recorded under `key`, accumulated into weight.grad (or the grad target)."""
        for weight, compute in self._pending.pop(key, []):
            gw = compute()  # [out, in]
            main = self.grad_target(weight) if self.grad_target is not None else None
            if main is not None:  # data-parallel grad buffer (engine/parallel/data_parallel.py)
                main.add_(gw.to(main.dtype))
            elif weight.grad is None:
                weight.grad = gw.to(weight.dtype)
            else:
                weight.grad += gw.to(weight.dtype)

    def __len__(self) -> int:
        return len(self._pending)


class _DeferredLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                store: WeightGradStore) -> torch.Tensor:
        param = weight  # forward sees the parameter object itself; keep it to accumulate into later
        # Reproduce autocast by hand (custom Functions run their forward with autocast's inputs as given).
        dev = x.device.type
        if torch.is_autocast_enabled(dev):
            dt = torch.get_autocast_dtype(dev)
            x, weight = x.to(dt), weight.to(dt)
            bias = bias.to(dt) if bias is not None else None
        with torch.autocast(dev, enabled=False):
            y = F.linear(x, weight, bias)  # [..., out]
        ctx.save_for_backward(x, weight)
        ctx.store, ctx.param, ctx.has_bias = store, param, bias is not None
        return y

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        gy = gy.to(weight.dtype)
        gx = gy.matmul(weight) if ctx.needs_input_grad[0] else None  # [..., in]
        gb = gy.reshape(-1, gy.shape[-1]).sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        gw = None
        if ctx.needs_input_grad[1]:
            if ctx.store.capturing:
                ctx.store.add(ctx.param, x, gy)  # computed by WeightGradStore.flush (the W pass)
            else:
                gw = gy.reshape(-1, gy.shape[-1]).t().matmul(x.reshape(-1, x.shape[-1]))
        return gx, gw, gb, None


class defer_weight_grads(TorchFunctionMode):
    """Forwards run inside this context route every `F.linear(x, W, b)` whose W is a trainable
    nn.Parameter through the deferring Function. Intercepting the functional call (not module types)
    covers nn.Linear, the tensor-parallel Column/RowParallelLinear (which call F.linear between their
    communication ops) and the output head's F.linear on the embedding/head weight alike.

    A function marked `accepts_weight_grad_store = True` (the FP8 linear) is called with
    `weight_grad_store=store` instead, and defers its own weight-gradient computation through
    `store.add_deferred`.

    Outside `store.capture(...)` the recorded layers still compute their full gradient in backward.
    """

    def __init__(self, store: WeightGradStore) -> None:
        super().__init__()
        self.store = store

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch protocol
        kwargs = kwargs or {}
        if getattr(func, "accepts_weight_grad_store", False):  # e.g. the FP8 linear: it defers its own wgrad
            weight = args[1] if len(args) > 1 else kwargs["weight"]
            if isinstance(weight, nn.Parameter) and weight.requires_grad and torch.is_grad_enabled():
                self.store.n_deferred_layers += 1
                return func(*args, **{**kwargs, "weight_grad_store": self.store})
            return func(*args, **kwargs)
        if func is F.linear:
            x, weight = args[0], args[1] if len(args) > 1 else kwargs["weight"]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if isinstance(weight, nn.Parameter) and weight.requires_grad and torch.is_grad_enabled():
                self.store.n_deferred_layers += 1
                return _DeferredLinear.apply(x, weight, bias, self.store)
        return func(*args, **kwargs)
