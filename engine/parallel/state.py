"""ParallelState: who this process is and which process groups it talks to.

Built once from the launch environment (torchrun or Slurm variables) and the config, then
passed explicitly to everything that needs it; there are no module-level globals.

Rank layout (Megatron order, tp fastest): global rank = pp_rank*(dp*tp) + dp_rank*tp + tp_rank,
so a tp group is `tp` consecutive ranks and stays inside a node. The device mesh has the
dimension names ("pp", "dp", "tp").
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class LaunchEnv:
    """Process identity read from torchrun (RANK/WORLD_SIZE/LOCAL_RANK) or Slurm (SLURM_PROCID/...)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: Optional[str] = None
    master_port: Optional[str] = None
    launcher: str = "single"  # single | torchrun | slurm

    @classmethod
    def from_env(cls, env: Optional[dict[str, str]] = None) -> "LaunchEnv":
        env = dict(os.environ if env is None else env)
        if "RANK" in env and "WORLD_SIZE" in env:
            return cls(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                       env.get("MASTER_ADDR"), env.get("MASTER_PORT"), "torchrun")
        if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
            # srun started every rank itself: derive the rendezvous from Slurm's variables.
            nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST", "127.0.0.1")
            master = env.get("MASTER_ADDR") or _first_slurm_host(nodelist)
            port = env.get("MASTER_PORT") or str(29500 + int(env.get("SLURM_JOB_ID", "0")) % 10000)
            return cls(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)),
                       master, port, "slurm")
        return cls()


def _first_slurm_host(nodelist: str) -> str:
    """First host of a Slurm node list such as 'gpu[01-04,07],cpu1' -> 'gpu01'."""
    first = nodelist.split(",")[0] if "[" not in nodelist.split(",")[0] else nodelist
    if "[" not in first:
        return first
    prefix, rest = first.split("[", 1)
    token = rest.split("]", 1)[0].split(",")[0].split("-")[0]
    return prefix + token


def pick_device(requested: str, local_rank: int) -> torch.device:
    """'auto' -> cuda:<local_rank> when CUDA exists, else cpu."""
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("train.device='cuda' but torch.cuda.is_available() is False on this machine")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


@dataclass
class ParallelState:
    """Sizes, ranks and groups of the tp x pp x dp layout. Groups are None in a single process."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    vpp: int = 1
    tp_rank: int = 0
    pp_rank: int = 0
    dp_rank: int = 0
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    sequence_parallel: bool = False
    tp_group: Any = None
    pp_group: Any = None
    dp_group: Any = None
    mp_group: Any = None  # tp x pp ranks sharing one data shard (grad-norm reductions)
    embedding_group: Any = None  # first + last pp stage (tied embeddings)
    mesh: Any = None
    # engine.parallel.random.RNGStatesTracker: per-tp-rank dropout stream; set by seed_parallel_rng()
    rng_tracker: Any = None
    # engine.parallel.collectives.CommTimer: set by a benchmark that measures time inside tp collectives
    comm_timer: Any = None

    # ------------------------------------------------------------ queries
    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    def global_rank(self, tp_rank: int, dp_rank: int, pp_rank: int) -> int:
        return pp_rank * self.dp * self.tp + dp_rank * self.tp + tp_rank

    def describe(self) -> str:
        return (f"rank {self.rank}/{self.world_size}: tp {self.tp_rank}/{self.tp}, pp {self.pp_rank}/{self.pp}, "
                f"dp {self.dp_rank}/{self.dp}, device {self.device}")

    # ------------------------------------------------------------ construction
    @classmethod
    def single(cls, device: torch.device | str = "cpu") -> "ParallelState":
        return cls(device=torch.device(device))

    @classmethod
    def initialize(cls, tp: int = 1, pp: int = 1, dp: Optional[int] = None, vpp: int = 1,
                   sequence_parallel: bool = False, device: str = "auto", timeout_minutes: float = 10.0,
                   env: Optional[LaunchEnv] = None) -> "ParallelState":
        """Create the process groups for this launch. Call once per process.

        Starts the default process group (NCCL on CUDA, gloo on CPU) when the world has more than one
        rank and none exists yet; in a single process no group is created.
        """
        env = env or LaunchEnv.from_env()
        dev = pick_device(device, env.local_rank)
        world = dist.get_world_size() if dist.is_initialized() else env.world_size
        rank = dist.get_rank() if dist.is_initialized() else env.rank
        if dp is None:
            if world % (tp * pp) != 0:
                raise ValueError(f"tp*pp = {tp * pp} does not divide the world size {world}")
            dp = world // (tp * pp)
        if tp * pp * dp != world:
            raise ValueError(f"tp*pp*dp = {tp}*{pp}*{dp} = {tp * pp * dp} must equal the world size {world}")
        tp_rank, dp_rank, pp_rank = rank % tp, (rank // tp) % dp, rank // (tp * dp)
        state = cls(tp=tp, pp=pp, dp=dp, vpp=vpp, tp_rank=tp_rank, pp_rank=pp_rank, dp_rank=dp_rank, rank=rank,
                    world_size=world, local_rank=env.local_rank, device=dev, sequence_parallel=sequence_parallel)
        if world == 1:
            return state
        if not dist.is_initialized():
            if env.launcher == "slurm":
                os.environ.setdefault("MASTER_ADDR", env.master_addr or "127.0.0.1")
                os.environ.setdefault("MASTER_PORT", env.master_port or "29500")
            backend = "nccl" if dev.type == "cuda" else "gloo"
            # torch.distributed.nn binds `group=group.WORLD` as default arguments when it is first imported
            # (torch._dynamo imports it, e.g. when the first optimizer is built). Imported after this call, those
            # defaults hold the default group for the life of the interpreter: destroy_process_group() cannot
            # free it and its gloo worker threads run on into interpreter shutdown, where one that drops a
            # finished collective's tensors aborts the process (SIGABRT). Imported now, they bind None.
            import torch.distributed.nn  # noqa: F401
            dist.init_process_group(backend=backend, rank=rank, world_size=world,
                                    timeout=datetime.timedelta(minutes=timeout_minutes),
                                    device_id=dev if dev.type == "cuda" else None)
        state._build_groups()
        return state

    def _build_groups(self) -> None:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(self.device.type, (self.pp, self.dp, self.tp), mesh_dim_names=("pp", "dp", "tp"))
        self.mesh = mesh
        self.tp_group = mesh.get_group("tp")
        self.dp_group = mesh.get_group("dp")
        self.pp_group = mesh.get_group("pp")
        # Groups every rank must create in the same order (new_group is collective over the world).
        mp_groups = {}
        for dp_rank in range(self.dp):
            ranks = [self.global_rank(t, dp_rank, p) for p in range(self.pp) for t in range(self.tp)]
            mp_groups[dp_rank] = dist.new_group(ranks)
        self.mp_group = mp_groups[self.dp_rank]
        if self.pp > 1:
            emb = {}
            for dp_rank in range(self.dp):
                for t in range(self.tp):
                    ranks = [self.global_rank(t, dp_rank, 0), self.global_rank(t, dp_rank, self.pp - 1)]
                    emb[(dp_rank, t)] = dist.new_group(ranks)
            self.embedding_group = emb[(self.dp_rank, self.tp_rank)]

    def destroy(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
        # torch's DTensor caches (FSDP2, parallel.zero=3) keep the mesh alive: drop the groups it holds
        # (a private torch attribute, hence getattr) so their gloo threads end now, not at interpreter exit.
        getattr(self.mesh, "_pg_registry", {}).clear()


def all_reduce_max(value: float, state: ParallelState) -> float:
    """Max of a Python float over the whole world (e.g. 'did any rank overflow')."""
    if not state.is_distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=state.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())
