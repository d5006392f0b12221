"""Resumable, data-parallel batch sampler whose global sample order does not depend on the DP size.

Global batch b holds the samples at positions [b*G, (b+1)*G) of one fixed order (identity, or a seeded
permutation). Rank r of dp takes the contiguous slice [r*G/dp, (r+1)*G/dp) of every global batch and
yields it micro-batch by micro-batch. So a run saved at DP=4 and resumed at DP=2 trains on exactly the
same samples in every global batch; only which rank computes which sample changes.
"""

from __future__ import annotations

from typing import Iterator, Optional

import numpy as np


class PretrainingSampler:
    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int, dp_rank: int,
                 dp_size: int, global_batch_size: Optional[int] = None, shuffle_seed: Optional[int] = None):
        G = micro_batch_size * dp_size if global_batch_size is None else global_batch_size
        if total_samples <= 0:
            raise ValueError(f"PretrainingSampler: total_samples must be > 0, found {total_samples}")
        if micro_batch_size <= 0 or dp_size <= 0:
            raise ValueError(f"PretrainingSampler: micro_batch_size and dp_size must be > 0, found "
                             f"{micro_batch_size} and {dp_size}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"PretrainingSampler: dp_rank must be in [0, {dp_size}), found {dp_rank}")
        if G % (micro_batch_size * dp_size) != 0:
            raise ValueError(f"PretrainingSampler: global_batch_size={G} must be divisible by "
                             f"micro_batch_size*dp_size = {micro_batch_size}*{dp_size}")
        if consumed_samples < 0 or consumed_samples % G != 0:
            raise ValueError(f"PretrainingSampler: consumed_samples must be a non-negative multiple of the global "
                             f"batch size {G} (resume happens at step boundaries), found {consumed_samples}")
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.global_batch_size = G
        self.shuffle_seed = shuffle_seed
        self._order: Optional[np.ndarray] = None
        if shuffle_seed is not None:
            # One permutation of all samples, independent of dp: [total_samples] (uint32 when it fits, to halve
            # memory for long runs). The datasets are already shuffled; this is an extra, optional layer.
            dtype = np.uint32 if total_samples < 2**32 else np.int64
            self._order = np.random.default_rng(shuffle_seed).permutation(total_samples).astype(dtype)

    def __len__(self) -> int:
        """Micro-batches this rank will still yield (incomplete last global batch dropped)."""
        steps = self.total_samples // self.global_batch_size - self.consumed_samples // self.global_batch_size
        return max(steps, 0) * self.global_batch_size // (self.micro_batch_size * self.dp_size)

    def __iter__(self) -> Iterator[list[int]]:
        G, mbs = self.global_batch_size, self.micro_batch_size
        per_rank = G // self.dp_size
        for b in range(self.consumed_samples // G, self.total_samples // G):
            start = b * G + self.dp_rank * per_rank
            for m in range(start, start + per_rank, mbs):
                if self._order is None:
                    yield list(range(m, m + mbs))
                else:
                    yield [int(i) for i in self._order[m:m + mbs]]
