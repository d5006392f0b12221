"""ParallelState: launch-environment parsing (no processes) and the tp-fastest rank layout on 8 gloo ranks."""

import sys
from pathlib import Path

import pytest
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # repo root, so `tests.dist_utils` imports
from engine.parallel.state import LaunchEnv, ParallelState, _first_slurm_host  # noqa: E402
from tests.dist_utils import run_distributed  # noqa: E402


# ----------------------------------------------------------------------------- launch environment

def test_single_process_env():
    env = LaunchEnv.from_env({})
    assert (env.rank, env.world_size, env.local_rank, env.launcher) == (0, 1, 0, "single")


def test_torchrun_env():
    env = LaunchEnv.from_env({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "node3",
                              "MASTER_PORT": "29400", "SLURM_PROCID": "0", "SLURM_NTASKS": "2"})
    # torchrun's variables win over Slurm's (torchrun inside an sbatch allocation)
    assert (env.rank, env.world_size, env.local_rank) == (5, 8, 1)
    assert (env.master_addr, env.master_port, env.launcher) == ("node3", "29400", "torchrun")


def test_slurm_env():
    env = LaunchEnv.from_env({"SLURM_PROCID": "6", "SLURM_NTASKS": "8", "SLURM_LOCALID": "2",
                              "SLURM_JOB_NODELIST": "gpu[07-08,11],cpu1", "SLURM_JOB_ID": "123456"})
    assert (env.rank, env.world_size, env.local_rank, env.launcher) == (6, 8, 2, "slurm")
    assert env.master_addr == "gpu07"
    assert env.master_port == str(29500 + 123456 % 10000)


def test_slurm_env_explicit_master_and_single_task():
    env = LaunchEnv.from_env({"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_NODELIST": "a1,b2",
                              "MASTER_ADDR": "head", "MASTER_PORT": "1234"})
    assert (env.master_addr, env.master_port) == ("head", "1234")
    # a single Slurm task (e.g. an interactive `srun python ...`) is a single-process run
    assert LaunchEnv.from_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}).launcher == "single"


@pytest.mark.parametrize("nodelist,first", [("node1", "node1"), ("a[3-5]", "a3"), ("x[09,12]", "x09"),
                                            ("n1,n[2-3]", "n1"), ("gpu-[001-004]", "gpu-001")])
def test_first_slurm_host(nodelist, first):
    assert _first_slurm_host(nodelist) == first


def test_single_state():
    s = ParallelState.single()
    assert (s.tp, s.pp, s.dp, s.tp_rank, s.world_size) == (1, 1, 1, 0, 1)
    assert s.tp_group is None and not s.is_distributed and s.is_first_stage and s.is_last_stage


def test_initialize_rejects_bad_sizes_without_processes():
    env = LaunchEnv(rank=0, world_size=8)
    with pytest.raises(ValueError, match="does not divide the world size 8"):
        ParallelState.initialize(tp=3, device="cpu", env=env)
    with pytest.raises(ValueError, match="must equal the world size 8"):
        ParallelState.initialize(tp=2, pp=2, dp=4, device="cpu", env=env)


# ----------------------------------------------------------------------------- 8 ranks: tp2 x pp2 x dp2

def _layout(rank: int, world_size: int) -> dict:
    s = ParallelState.initialize(tp=2, pp=2, device="cpu")
    ranks = dist.get_process_group_ranks
    return {"tp_rank": s.tp_rank, "dp_rank": s.dp_rank, "pp_rank": s.pp_rank, "dp": s.dp,
            "tp": ranks(s.tp_group), "dp_g": ranks(s.dp_group), "pp_g": ranks(s.pp_group),
            "mp": ranks(s.mp_group), "emb": ranks(s.embedding_group),
            "first": s.is_first_stage, "last": s.is_last_stage,
            "global": s.global_rank(s.tp_rank, s.dp_rank, s.pp_rank)}


def test_rank_layout_tp2_pp2_dp2():
    out = run_distributed(_layout, 8, timeout=90)
    for rank, o in enumerate(out):
        tp_rank, dp_rank, pp_rank = rank % 2, (rank // 2) % 2, rank // 4  # tp fastest, then dp, then pp
        assert (o["tp_rank"], o["dp_rank"], o["pp_rank"], o["dp"]) == (tp_rank, dp_rank, pp_rank, 2)
        assert o["global"] == rank
        base = rank - tp_rank
        assert sorted(o["tp"]) == [base, base + 1]  # consecutive ranks: a tp group stays inside a node
        assert sorted(o["dp_g"]) == [pp_rank * 4 + tp_rank, pp_rank * 4 + 2 + tp_rank]
        assert sorted(o["pp_g"]) == [dp_rank * 2 + tp_rank, 4 + dp_rank * 2 + tp_rank]
        assert sorted(o["mp"]) == sorted(p * 4 + dp_rank * 2 + t for p in range(2) for t in range(2))
        assert sorted(o["emb"]) == sorted(o["pp_g"])  # pp=2: first and last stage are the whole pp group
        assert o["first"] == (pp_rank == 0) and o["last"] == (pp_rank == 1)
