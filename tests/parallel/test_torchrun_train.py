"""A two-"node" launch on loopback: two torchrun agents (c10d rendezvous on 127.0.0.1), one process each,
train a few data-parallel steps through the real CLI (`-m engine train`)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_PORT_TAKEN = ("Address already in use", "EADDRINUSE")


def _launch_two_agents(tmp_path: Path, args: list[str]) -> tuple[list[int], list[str]]:
    """Start both agents on a rendezvous port; the two agents must be told the port in advance, so it is
    picked free and released first, and another process may take it meanwhile: then retry on a new port."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    for _attempt in range(3):
        port = _free_port()
        agents = []
        for _node in range(2):
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                   "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id",
                   f"tessera-test-{port}", "--max-restarts", "0", *args]
            agents.append(subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                           stderr=subprocess.STDOUT, text=True))
        outputs = [a.communicate(timeout=600)[0] for a in agents]
        codes = [a.returncode for a in agents]
        if any(c != 0 for c in codes) and any(m in text for text in outputs for m in _PORT_TAKEN):
            continue
        return codes, outputs
    return codes, outputs


def test_two_torchrun_agents_train(tmp_path):
    out = tmp_path / "run"
    args = ["-m", "engine", "train", str(REPO / "examples" / "tiny.yaml"), "train.iters=3", "train.log_interval=1",
            "train.eval_interval=0", "train.sample_prompt=null", f"train.out_dir={out}", "model.n_layers=2",
            "model.d_model=64", "train.global_batch_size=8", "train.micro_batch_size=2", "parallel.timeout_minutes=2"]
    codes, outputs = _launch_two_agents(tmp_path, args)
    for code, text in zip(codes, outputs):
        assert code == 0, text[-4000:]
    records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3] and "wall_s/total" in records[-1]
    assert any("dp 0/2" in text for text in outputs)  # the two agents formed one dp=2 job
