"""`tessera checkpoint inspect / export` and `tessera generate CHECKPOINT` on a real checkpoint.

One tiny run per module (2 steps, a checkpoint after each) is the reference: its final
`run/model.safetensors` is written by a different code path (engine/checkpoint/weights.py gathers the live
parameters) than the export (reads the DCP shards), so "equal bit for bit" compares two independent
results; the step-1 checkpoint holds other weights, so the comparison can fail.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from engine import __version__
from engine.cli import main
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from engine.train.loop import train

    tmp = tmp_path_factory.mktemp("ckrun")
    cfg = tiny_config(tmp, train={"iters": 2}, checkpoint={"dir": str(tmp / "ck"), "interval": 1})
    train(cfg)
    root = tmp / "ck"
    assert (root / "latest").read_text().strip() == "step-0000002"
    final = load_file(str(tmp / "run" / "model.safetensors"))
    return {"tmp": tmp, "root": root, "run": tmp / "run", "final": final}


def _cli(capsys, *argv):
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(-1).view(torch.uint8)


def _assert_bit_equal(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for name, w in want.items():
        assert got[name].dtype == w.dtype and got[name].shape == w.shape, name
        assert torch.equal(_bits(got[name]), _bits(w)), name


# ------------------------------------------------------------------ inspect

def test_inspect_json(run, capsys):
    rc, out, err = _cli(capsys, "checkpoint", "inspect", run["root"], "--json")
    assert rc == 0, err
    d = json.loads(out)
    assert d["path"] == str(run["root"] / "step-0000002")  # the root means the one `latest` names
    assert d["complete"] is True and d["loadable"] is True and d["problems"] == []
    assert d["iteration"] == 2 and d["step"] == 2 and d["engine"] == __version__ and d["lineage"] == []
    assert d["saved_at"] and d["format"] == "tessera.checkpoint.v1"
    assert {k: d["layout"][k] for k in ("tp", "pp", "vpp", "dp", "zero", "world_size")} == \
        {"tp": 1, "pp": 1, "vpp": 1, "dp": 1, "zero": 1, "world_size": 1}
    run_cfg = yaml.safe_load((run["run"] / "config.yaml").read_text())
    assert d["config"]["model"] == run_cfg["model"] and d["config"]["model"]["vocab_size"] == 257

    by_name = {t["name"]: t for t in d["tensors"]}
    final = run["final"]
    for name, w in final.items():  # every model weight, with its global shape (real vocabulary) and dtype
        t = by_name[f"model/{name}"]
        assert t["shape"] == list(w.shape) and t["dtype"] == "float32" and t["nbytes"] == w.numel() * 4
    assert by_name["model/embed.weight"]["shape"] == [257, 32]
    assert {n for n in by_name if n.startswith("model/")} == {f"model/{n}" for n in final}
    model_bytes = sum(w.numel() * w.element_size() for w in final.values())
    # Adam: exp_avg + exp_avg_sq per weight (fp32 params are their own master) + one float64 step count each
    optim_bytes = 2 * model_bytes + 8 * len(final)
    assert d["bytes"]["model"] == model_bytes and d["bytes"]["optimizer"] == optim_bytes
    assert d["bytes"]["rng"] > 0 and d["total_bytes"] == model_bytes + optim_bytes + d["bytes"]["rng"]
    assert d["total_bytes"] == sum(t["nbytes"] for t in d["tensors"])
    assert by_name["rng/rank00000/torch"]["dtype"] == "uint8"


def test_inspect_text(run, capsys):
    rc, out, err = _cli(capsys, "checkpoint", "inspect", run["root"] / "step-0000001")
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0] == f"checkpoint {run['root'] / 'step-0000001'}: complete"
    assert "  iteration     1" in lines
    assert "  layout        tp 1, pp 1, vpp 1, dp 1, zero 1, world size 1" in lines
    assert f"  engine        tessera {__version__} (format tessera.checkpoint.v1)" in lines
    assert "  lineage       none (trained from scratch)" in lines
    model_bytes = sum(w.numel() * w.element_size() for w in run["final"].values())
    assert any(ln.split() == ["model:", f"{model_bytes:,}", "bytes", *ln.split()[3:]] for ln in lines)
    rows = {ln.split()[0]: ln.split() for ln in lines if ln.startswith("  model/") or ln.startswith("  optim/")}
    assert rows["model/embed.weight"][1:4] == ["[257,", "32]", "float32"]
    assert rows["model/layers.0.attn.k_proj.weight"][1:4] == ["[16,", "32]", "float32"]  # 2 kv heads x 8
    assert rows["model/norm.weight"][1:3] == ["[32]", "float32"]
    assert len([n for n in rows if n.startswith("model/")]) == len(run["final"])
    assert "config:" in lines and "  model:" in lines and "    vocab_size: 257" in lines


def test_inspect_incomplete_shows_what_is_there(run, capsys, tmp_path):
    step = tmp_path / "step-0000002"
    shutil.copytree(run["root"] / "step-0000002", step)
    (step / "COMPLETE").unlink()
    rc, out, err = _cli(capsys, "checkpoint", "inspect", step)
    assert rc == 0, err
    assert out.splitlines()[0] == f"checkpoint {step}: INCOMPLETE (no COMPLETE marker: never loaded)"
    assert "  iteration     2" in out.splitlines() and "model/embed.weight" in out
    rc, out, err = _cli(capsys, "checkpoint", "inspect", step, "--json")
    d = json.loads(out)
    assert d["complete"] is False and d["loadable"] is False and d["iteration"] == 2
    assert any("COMPLETE" in p for p in d["problems"])
    assert {t["name"] for t in d["tensors"]} >= {f"model/{n}" for n in run["final"]}
    # ...and nothing loads it
    for argv in (("checkpoint", "export", step, tmp_path / "out"), ("generate", step)):
        rc, out, err = _cli(capsys, *argv)
        assert rc == 5 and "incomplete" in err and str(step) in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_inspect_reports_a_missing_shard(run, capsys, tmp_path):
    step = tmp_path / "step-0000002"
    shutil.copytree(run["root"] / "step-0000002", step)
    shard = next(p for p in step.iterdir() if p.suffix == ".distcp")
    shard.unlink()
    rc, out, err = _cli(capsys, "checkpoint", "inspect", step, "--json")
    d = json.loads(out)
    assert rc == 0 and d["complete"] is True and d["loadable"] is False
    assert d["problems"] == [f"shard file {shard.name} is missing"]


# ------------------------------------------------------------------ export

def test_export_is_the_runs_final_weights_bit_for_bit(run, capsys, tmp_path):
    out_dir = tmp_path / "exported"
    rc, out, err = _cli(capsys, "checkpoint", "export", run["root"], out_dir)
    assert rc == 0, err
    assert f"exported {run['root'] / 'step-0000002'} (step 2, {len(run['final'])} tensors" in out
    got = load_file(str(out_dir / "model.safetensors"))
    _assert_bit_equal(got, run["final"])
    # the same order as the file a run writes (the model's parameter order)
    with open(out_dir / "model.safetensors", "rb") as f, open(run["run"] / "model.safetensors", "rb") as g:
        def names(h):
            n = int.from_bytes(h.read(8), "little")
            return [k for k in json.loads(h.read(n)) if k != "__metadata__"]
        assert names(f) == names(g)
    from engine.config import load_config

    assert load_config(out_dir / "config.yaml").to_dict() == load_config(run["run"] / "config.yaml").to_dict()

    # the step-1 checkpoint holds other weights: the comparison above can fail
    rc, _, err = _cli(capsys, "checkpoint", "export", run["root"] / "step-0000001", tmp_path / "one")
    assert rc == 0, err
    older = load_file(str(tmp_path / "one" / "model.safetensors"))
    assert not torch.equal(older["embed.weight"], run["final"]["embed.weight"])


def test_export_dtype(run, capsys, tmp_path):
    rc, _, err = _cli(capsys, "checkpoint", "export", run["root"], tmp_path / "bf16", "--dtype", "bf16")
    assert rc == 0, err
    got = load_file(str(tmp_path / "bf16" / "model.safetensors"))
    _assert_bit_equal(got, {n: t.to(torch.bfloat16) for n, t in run["final"].items()})


def test_export_reads_in_bounded_batches(run):
    from engine.checkpoint.export import ModelCheckpoint

    ck = ModelCheckpoint.open(run["root"])
    one_at_a_time = dict(ck.tensors(batch_bytes=1))
    _assert_bit_equal(one_at_a_time, run["final"])
    assert ck.names == list(run["final"])  # parameter order


def test_export_directory_rules(run, capsys, tmp_path):
    out_dir = tmp_path / "exp"
    assert _cli(capsys, "checkpoint", "export", run["root"], out_dir)[0] == 0
    rc, out, err = _cli(capsys, "checkpoint", "export", run["root"], out_dir)  # our own: replaced
    assert rc == 0 and "replacing the earlier export" in out

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "model.safetensors").write_bytes(b"someone else's weights")
    for target in (foreign, run["run"], run["root"] / "exported"):
        rc, out, err = _cli(capsys, "checkpoint", "export", run["root"], target)
        assert rc == 6 and str(target) in err and len(err.splitlines()) == 1, err
    assert (foreign / "model.safetensors").read_bytes() == b"someone else's weights"
    assert not (run["root"] / "exported").exists()
    _assert_bit_equal(load_file(str(run["run"] / "model.safetensors")), run["final"])


# ------------------------------------------------------------------ generate

def test_generate_from_a_checkpoint_matches_the_run(run, capsys, tmp_path):
    from engine.generate import load_run

    exported = tmp_path / "exported"
    assert _cli(capsys, "checkpoint", "export", run["root"], exported)[0] == 0
    texts = {}
    for name, path in (("root", run["root"]), ("step", run["root"] / "step-0000002"), ("exported", exported),
                       ("run", run["run"])):
        rc, out, err = _cli(capsys, "generate", path, "--seed", "1", "--max-tokens", "20")
        assert rc == 0, err
        texts[name] = out
    assert texts["run"].strip() and len(set(texts.values())) == 1, texts

    cfg_ck, model_ck, _ = load_run(run["root"])
    cfg_run, model_run, _ = load_run(run["run"])
    assert cfg_ck.to_dict() == cfg_run.to_dict()
    a, b = model_ck.state_dict(), model_run.state_dict()
    assert sorted(a) == sorted(b) and all(torch.equal(_bits(a[k]), _bits(b[k])) for k in a)


def _train_tp2(rank: int, world: int, base: str) -> None:
    from engine.config import config_from_dict
    from engine.parallel.state import ParallelState
    from engine.train.loop import train

    tree = tiny_config(Path(base), train={"iters": 2}, checkpoint={"dir": f"{base}/ck"},
                       parallel={"tp": 2}).to_dict()
    cfg = config_from_dict(tree, world_size=world)
    train(cfg, ParallelState.initialize(tp=2, device="cpu"))


def test_export_and_generate_of_a_tp2_checkpoint(capsys, tmp_path):
    # tp 2: the fused q/k/v and the vocabulary-parallel embedding and head are saved as per-rank blocks
    from tests.dist_utils import run_distributed

    run_distributed(_train_tp2, 2, str(tmp_path), timeout=300)
    root, run_dir = tmp_path / "ck", tmp_path / "run"
    rc, out, err = _cli(capsys, "checkpoint", "inspect", root, "--json")
    d = json.loads(out)
    assert rc == 0 and d["layout"]["tp"] == 2 and d["layout"]["world_size"] == 2 and d["loadable"]
    assert max(t["chunks"] for t in d["tensors"] if t["name"].startswith("model/")) >= 2
    assert _cli(capsys, "checkpoint", "export", root, tmp_path / "exp")[0] == 0
    _assert_bit_equal(load_file(str(tmp_path / "exp" / "model.safetensors")),
                      load_file(str(run_dir / "model.safetensors")))
    texts = {_cli(capsys, "generate", p, "--seed", "3", "--max-tokens", "20")[1] for p in (root, run_dir)}
    assert len(texts) == 1


# ------------------------------------------------------------------ errors

@pytest.mark.parametrize("action", ["inspect", "export"])
def test_errors_name_the_path(run, capsys, tmp_path, action):
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "notes.txt").write_text("not a checkpoint")
    for path in (tmp_path / "missing", plain, plain / "notes.txt"):
        argv = ["checkpoint", action, path] + ([tmp_path / "out"] if action == "export" else [])
        rc, out, err = _cli(capsys, *argv)
        assert rc == 5, (path, err)
        assert len(err.splitlines()) == 1 and str(path) in err and err.startswith("tessera: error: checkpoint")
        assert out == ""
    assert not (tmp_path / "out").exists()


def test_generate_of_neither_a_run_nor_a_checkpoint(run, capsys, tmp_path):
    rc, _, err = _cli(capsys, "generate", tmp_path)  # unchanged: a run-directory error (exit 6)
    assert rc == 6 and str(tmp_path) in err and "checkpoint" in err and len(err.splitlines()) == 1
    # a run that stopped early (no model.safetensors): the message says where its checkpoints are
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    shutil.copy(run["run"] / "config.yaml", stopped / "config.yaml")
    rc, _, err = _cli(capsys, "generate", stopped)
    assert rc == 6 and f"its checkpoints are in {str(run['root'])!r}" in err and len(err.splitlines()) == 1
