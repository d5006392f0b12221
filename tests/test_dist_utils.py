"""Tests of the multi-process helper itself (one 2-rank spawn per case; about 8 s each on 2 cores)."""

import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repo root, so `tests.dist_utils` imports
from tests.dist_utils import DistributedTestError, run_distributed  # noqa: E402


def _sum_ranks(rank: int, world_size: int, scale: float) -> dict:
    import os

    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    env = {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    return {"rank": rank, "sum": t.item() * scale, "tensor": torch.full((2,), float(rank)), "env": env,
            "backend": dist.get_backend()}


def _fail_on_rank1(rank: int, world_size: int) -> int:
    if rank == 1:
        raise ValueError("tp=3 does not divide n_heads=4")
    dist.barrier()  # rank 0 blocks here until rank 1's death resets the connection
    return rank


def _die_on_rank1(rank: int, world_size: int) -> int:
    import os

    if rank == 1:
        os._exit(3)
    return rank


def test_results_in_rank_order_and_env():
    out = run_distributed(_sum_ranks, 2, 10.0)
    assert [o["rank"] for o in out] == [0, 1]
    assert all(o["sum"] == 30.0 for o in out)
    assert torch.equal(out[1]["tensor"], torch.ones(2))
    assert out[0]["env"]["RANK"] == "0" and out[1]["env"]["LOCAL_RANK"] == "1"
    assert out[0]["env"]["WORLD_SIZE"] == "2" and out[0]["env"]["MASTER_PORT"] == out[1]["env"]["MASTER_PORT"]
    assert out[0]["backend"] == "gloo"


def test_worker_exception_is_reraised_with_traceback():
    with pytest.raises(ValueError, match="does not divide") as info:
        run_distributed(_fail_on_rank1, 2, timeout=30)
    assert "rank 1" in str(info.value.__cause__) and "_fail_on_rank1" in str(info.value.__cause__)


def test_dead_rank_is_reported():
    with pytest.raises(DistributedTestError, match="rank"):
        run_distributed(_die_on_rank1, 2, timeout=30)
