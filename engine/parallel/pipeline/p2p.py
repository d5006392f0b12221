"""Point-to-point exchange of activations and gradients between neighbouring pipeline stages.

Shapes are fixed by the config ([micro_batch, seq (/tp with sequence parallel), d_model], one
dtype), so no shape handshake is sent. Every message carries a tag unique within one step
(direction, destination virtual stage, micro-batch): two neighbours may exchange activations and
gradients in both directions at once (pp=2, or the interleaved wrap-around from the last rank to
rank 0), and tags keep each receive matched to the right send whatever the posting order.

Sends are asynchronous (their handles are waited for at the end of the step); receives block
until the data is there. With action lists that the simulator runs to completion, this cannot
deadlock: a rank only ever waits for data that a peer produces without waiting on this rank.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist

from engine.parallel.state import ParallelState


def activation_shape(micro_batch: int, seq_len: int, d_model: int, tp: int = 1,
                     sequence_parallel: bool = False) -> tuple[int, int, int]:
    """[B, S, D] of the hidden states crossing a stage boundary; S/tp under sequence parallelism."""
    if sequence_parallel:
        if seq_len % tp:
            raise ValueError(f"sequence parallel: seq_len={seq_len} not divisible by tp={tp}")
        seq_len //= tp
    return (micro_batch, seq_len, d_model)


class StageP2P:
    """Activation/gradient traffic of one pipeline rank (all of its virtual chunks)."""

    _FWD, _BWD = 0, 1

    def __init__(self, pstate: ParallelState, vpp: int, num_micro: int, shape: Sequence[int],
                 dtype: torch.dtype = torch.float32, device: Optional[torch.device] = None):
        self.pstate, self.vpp, self.num_micro = pstate, vpp, num_micro
        self.shape, self.dtype = tuple(shape), dtype
        self.device = device or pstate.device
        pp, r = pstate.pp, pstate.pp_rank
        # Global ranks of the neighbours: same tp/dp coordinates, pp rank -+ 1 (wrapping for interleaved).
        self.prev_rank = pstate.global_rank(pstate.tp_rank, pstate.dp_rank, (r - 1) % pp)
        self.next_rank = pstate.global_rank(pstate.tp_rank, pstate.dp_rank, (r + 1) % pp)
        self._pending: list = []  # async send handles

    # ------------------------------------------------------------ helpers
    def _stage(self, chunk: int) -> int:
        return chunk * self.pstate.pp + self.pstate.pp_rank

    def _tag(self, direction: int, dst_stage: int, mb: int) -> int:
        return (direction * self.pstate.pp * self.vpp + dst_stage) * self.num_micro + mb

    def _send(self, t: torch.Tensor, peer: int, tag: int) -> None:
        if tuple(t.shape) != self.shape:
            raise RuntimeError(f"pipeline p2p: sending shape {tuple(t.shape)} but the configured boundary shape "
                               f"is {self.shape} (micro_batch, seq, d_model)")
        buf = t.detach().to(self.dtype).contiguous()
        op = dist.P2POp(dist.isend, buf, peer, self.pstate.pp_group, tag)
        self._pending += dist.batch_isend_irecv([op])

    def _recv(self, peer: int, tag: int) -> torch.Tensor:
        buf = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        op = dist.P2POp(dist.irecv, buf, peer, self.pstate.pp_group, tag)
        for work in dist.batch_isend_irecv([op]):
            work.wait()
        return buf

    # ------------------------------------------------------------ API
    def recv_forward(self, mb: int, chunk: int) -> torch.Tensor:
        """Input activation of (mb, chunk) from the previous virtual stage."""
        return self._recv(self.prev_rank, self._tag(self._FWD, self._stage(chunk), mb))

    def send_forward(self, t: torch.Tensor, mb: int, chunk: int) -> None:
        self._send(t, self.next_rank, self._tag(self._FWD, self._stage(chunk) + 1, mb))

    def recv_backward(self, mb: int, chunk: int) -> torch.Tensor:
        """Gradient w.r.t. the output of (mb, chunk), from the next virtual stage."""
        return self._recv(self.next_rank, self._tag(self._BWD, self._stage(chunk), mb))

    def send_backward(self, t: torch.Tensor, mb: int, chunk: int) -> None:
        self._send(t, self.prev_rank, self._tag(self._BWD, self._stage(chunk) - 1, mb))

    def wait_sends(self) -> None:
        """Block until every send of this step has been delivered (buffers may then be freed)."""
        for work in self._pending:
            work.wait()
        self._pending.clear()
