"""Checkpoints in one process: the config section, `latest` resolution, weights-only starts (`init_from`).

Multi-process resume and resharding: tests/parallel/test_checkpoint_resume.py; kills, signals, full disks
and corrupt files: tests/test_checkpoint_robustness.py; inspect/export/generate: tests/test_checkpoint_cli.py.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tests.conftest import tiny_config


def test_config_section_and_its_checks(tmp_path):
    from engine.config import ConfigError, load_config

    cfg = load_config(None, ["checkpoint.dir=ck", "checkpoint.async=true", "checkpoint.interval=5",
                             "checkpoint.load=auto"])
    assert cfg.checkpoint.async_save is True and cfg.checkpoint.interval == 5 and cfg.checkpoint.load == "auto"
    assert "async_save: true" in cfg.to_yaml()
    for bad, match in [(["checkpoint.load=auto"], "checkpoint.dir"), (["checkpoint.interval=10"], "checkpoint.dir"),
                       (["checkpoint.async=true"], "checkpoint.dir"), (["checkpoint.keep=-1"], "checkpoint.keep"),
                       (["checkpoint.time_limit=0"], "checkpoint.time_limit"),
                       (["checkpoint.dir=ck", "checkpoint.intervall=3"], "interval")]:
        with pytest.raises(ConfigError, match=match):
            load_config(None, bad)
    f = tmp_path / "c.yaml"
    f.write_text("checkpoint:\n  dir: ck\n  async: true\n  async_save: false\n")
    with pytest.raises(ConfigError, match="same setting"):
        load_config(f)


def _fake_step(root, step: int, complete: bool = True) -> None:
    d = root / f"step-{step:07d}"
    d.mkdir(parents=True)
    (d / "tessera.json").write_text("{}")
    if complete:
        (d / "COMPLETE").write_text(f"{step}\n")


def test_latest_resolution(tmp_path):
    from engine.checkpoint.files import latest_step, resolve_checkpoint
    from engine.errors import CheckpointError

    root = tmp_path / "ck"
    assert latest_step(root) is None
    _fake_step(root, 2)
    _fake_step(root, 4)
    _fake_step(root, 6, complete=False)
    (root / "latest").write_text("step-0000002\n")
    assert latest_step(root).step == 4  # a crash between the rename and `latest`: the newer complete one
    (root / "latest").write_text("step-0000006\n")  # names an incomplete one: never loaded
    assert latest_step(root).step == 4
    assert resolve_checkpoint(root).step == 4
    assert resolve_checkpoint(root / "step-0000002").step == 2
    with pytest.raises(CheckpointError, match="incomplete"):
        resolve_checkpoint(root / "step-0000006")
    with pytest.raises(CheckpointError, match="no such"):
        resolve_checkpoint(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="found none"):
        resolve_checkpoint(tmp_path / "empty")


def test_init_from_loads_weights_only(tmp_path):
    """init_from: the model is the checkpoint's (bit for bit), the optimizer, schedule and data start fresh;
    and the run's own checkpoints record where it started from."""
    from engine.checkpoint.dcp_io import Pieces, read_pieces
    from engine.checkpoint.files import resolve_checkpoint
    from engine.parallel.state import ParallelState
    from engine.train.checkpointing import load_checkpoint
    from engine.train.loop import train
    from engine.train.trainer import Trainer

    src = tiny_config(tmp_path / "a", train={"iters": 3}, checkpoint={"dir": str(tmp_path / "ck")})
    train(src)
    step = resolve_checkpoint(tmp_path / "ck")
    assert step.step == 3

    cfg = tiny_config(tmp_path / "b", train={"iters": 3}, checkpoint={"init_from": str(tmp_path / "ck")})
    t = Trainer(cfg, ParallelState.single("cpu"))
    meta = load_checkpoint(t, tmp_path / "ck", weights_only=True, what="checkpoint.init_from")
    assert meta["iteration"] == 3 and t.iteration == 0 and t.consumed_samples == 0
    st = t.optimizer.inner.state
    assert all(float(s["step"]) == 0 and not s["exp_avg"].any() for s in st.values())
    pieces = Pieces()
    want = {}
    for name, shape in t.canonical_shapes.items():
        want[name] = torch.empty(shape)
        pieces.add(f"model/{name}", shape, ((0,) * len(shape), shape), want[name])
    read_pieces(step.path, pieces, {})
    specs = t.built.specs
    for n, p in t.model.named_parameters():
        for box, v in specs[n].canonical_pieces(p.detach(), 0):
            assert torch.equal(v, want[specs[n].tied_to or specs[n].name][tuple(slice(a, a + b) for a, b in zip(*box))])
    t.close()

    cfg2 = tiny_config(tmp_path / "c", train={"iters": 2}, checkpoint={"dir": str(tmp_path / "ck2"),
                                                                       "init_from": str(tmp_path / "ck")})
    r = train(cfg2)
    assert len(r.losses) == 2
    lineage = json.loads((resolve_checkpoint(tmp_path / "ck2").path / "tessera.json").read_text())["lineage"]
    assert lineage == [{"kind": "init_from", "path": str(step.path), "iteration": 3}]


def test_resume_keeps_the_run_directory(tmp_path):
    """A resumed run appends to metrics.jsonl (no archive/), and its steps continue the saved ones."""
    from engine.train.loop import train

    ck = str(tmp_path / "ck")
    train(tiny_config(tmp_path, train={"iters": 2, "log_interval": 1}, checkpoint={"dir": ck}))
    train(tiny_config(tmp_path, train={"iters": 4, "log_interval": 1}, checkpoint={"dir": ck, "load": "auto"}))
    steps = [json.loads(x)["step"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(x)]
    assert steps == [1, 2, 3, 4]
    assert not (tmp_path / "run" / "archive").exists()
    shutil.rmtree(tmp_path / "ck")


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("echo unpickled > evil-ran",))


def test_the_dcp_index_is_not_unpickled_as_code(tmp_path, monkeypatch):
    """DCP's .metadata is a pickle: ours is read by a restricted unpickler that rebuilds DCP's record types
    only, so a crafted index is one clear error and runs nothing."""
    import pickle

    from engine.checkpoint.dcp_io import read_metadata, tensor_infos
    from engine.errors import CheckpointError
    from engine.train.loop import train

    train(tiny_config(tmp_path, train={"iters": 1}, checkpoint={"dir": str(tmp_path / "ck")}))
    real = tmp_path / "ck" / "step-0000001"
    assert "model/embed.weight" in tensor_infos(read_metadata(real))  # a real index reads fine
    monkeypatch.chdir(tmp_path)
    (real / ".metadata").write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(CheckpointError, match="not part of a checkpoint index"):
        read_metadata(real)
    assert not (tmp_path / "evil-ran").exists()
