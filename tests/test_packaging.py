"""Packaging: the wheel installs our Triton kernels as `engine.kernels`, and Tessera coexists with Hugging Face.

Hugging Face's `kernels` distribution (installed beside transformers, which probes for it) owns the top-level
import name `kernels`; a top-level `kernels` package of ours would be overwritten by it or overwrite it. So
the repository's kernels/ folder is installed as `engine.kernels` (setup.py's package_dir), and the
distribution is `tessera-train` (`tessera` on the public index is another project; the command stays).

- the wheel, built offline without the C++ extension, holds engine/kernels/*, no top-level kernels/, and
  the right name and console script;
- with Hugging Face's `kernels` installed, one fresh process (started outside the repository, so the repo
  root is not on sys.path through the working directory) imports both packages, runs a tiny transformers
  Llama, and runs a Tessera forward whose Triton path goes through engine.kernels.

The second test runs in a subprocess on purpose: pytest's `pythonpath = ["."]` puts the repository root on
sys.path of the test process, where `import kernels` finds the repository's kernels/ folder instead of
Hugging Face's package. An installed Tessera never has that folder on sys.path.
"""
from __future__ import annotations

import configparser
import email.parser
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Not copied into the build tree: local state, build leftovers (a stale build/lib/ would be packed into the
# wheel as it is) and the compiled extension (TESSERA_NO_EXT=1 builds without it).
_NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "build", "dist", "runs", "*.egg-info", "__pycache__",
                                     ".pytest_cache", ".hypothesis", "*.so", ".whl", ".gl")


def _can_build_wheels_here() -> bool:
    import importlib.util

    import setuptools

    major, minor = (int(x) for x in setuptools.__version__.split(".")[:2])
    return (major, minor) >= (70, 1) or importlib.util.find_spec("wheel") is not None


def _build_wheel(tmp_path: Path) -> tuple[Path, float]:
    """Build the wheel from a copy of the source tree (an in-place build writes build/ and *.egg-info into
    the repository); no C++ extension. Returns (wheel path, seconds)."""
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=_NOT_SOURCE)
    out = tmp_path / "wheel"
    env = {**os.environ, "TESSERA_NO_EXT": "1", "PIP_NO_INPUT": "1"}
    # Offline, in this environment (setuptools >= 70.1 has bdist_wheel; older ones need the `wheel` package,
    # which a fresh venv lacks). An isolated build (latest setuptools + wheel 0.48) failed inside setuptools'
    # bdist_wheel on 2026-12-01, for this tree and the previous one alike.
    flags = ["--no-build-isolation", "--no-index"]
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", *flags,
                           "--disable-pip-version-check", "-w", str(out), str(src)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    seconds = time.perf_counter() - t0
    assert proc.returncode == 0, f"pip wheel failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    wheels = sorted(out.glob("*.whl"))
    assert len(wheels) == 1, f"expected one wheel in {out}, found {[w.name for w in wheels]}"
    return wheels[0], seconds


def test_the_installed_distribution_has_one_top_level_package():
    """What `pip install` made of setup.py here (the README's install: editable in CI): one top-level package,
    engine, whose engine.kernels is the repository's kernels/ folder; the name and the console script."""
    import importlib.metadata
    import importlib.util

    dist = importlib.metadata.distribution("tessera-train")
    assert dist.metadata["Name"] == "tessera-train"
    assert (dist.read_text("top_level.txt") or "").split() == ["engine"]
    scripts = {e.name: e.value for e in dist.entry_points if e.group == "console_scripts"}
    assert scripts == {"tessera": "engine.cli:main"}
    spec = importlib.util.find_spec("engine.kernels")
    assert spec is not None and Path(spec.origin).resolve() == (REPO / "kernels" / "__init__.py").resolve()


@pytest.mark.skipif(not _can_build_wheels_here(), reason="this environment's setuptools cannot build a wheel "
                    "offline (< 70.1 without the wheel package, as in a fresh venv); the installed "
                    "distribution is checked above")
def test_wheel_installs_kernels_under_engine(tmp_path):
    wheel, seconds = _build_wheel(tmp_path)
    print(f"wheel built in {seconds:.1f} s: {wheel.name}")
    assert wheel.name.startswith("tessera_train-"), f"wheel file name: expected tessera_train-*, found {wheel.name}"
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        dist_info = {n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info")}
        assert len(dist_info) == 1, f"expected one .dist-info folder in the wheel, found {sorted(dist_info)}"
        info = dist_info.pop()
        meta = email.parser.Parser().parsestr(z.read(f"{info}/METADATA").decode())
        eps = configparser.ConfigParser()
        eps.read_string(z.read(f"{info}/entry_points.txt").decode())

    tops = {n.split("/")[0] for n in names}
    assert tops == {"engine", info}, (
        f"top-level entries of the wheel: expected engine/ and {info}/, found {sorted(tops)}")
    assert not [n for n in names if n.startswith("kernels/")], "the wheel has a top-level kernels/ package"
    # every module of the repository's kernels/ folder, installed under engine/kernels/
    expected = {f"engine/kernels/{p.name}" for p in (REPO / "kernels").glob("*.py")}
    assert "engine/kernels/__init__.py" in expected
    missing = sorted(expected - set(names))
    assert not missing, f"kernel modules missing from the wheel: {missing}"
    for must in ("engine/__init__.py", "engine/cli.py", "engine/py.typed"):
        assert must in names, f"{must} missing from the wheel"
    assert meta["Name"] == "tessera-train", f"METADATA Name: expected tessera-train, found {meta['Name']!r}"
    assert eps.has_option("console_scripts", "tessera"), f"no `tessera` console script in {info}/entry_points.txt"
    assert eps.get("console_scripts", "tessera").strip() == "engine.cli:main", (
        f"entry point tessera: expected engine.cli:main, found {eps.get('console_scripts', 'tessera')!r}")


# Runs in a fresh interpreter started in a temporary directory. Prints one JSON line for the test to check.
_PROBE = r"""
import json, sys
import torch

import kernels as hf_kernels          # Hugging Face's distribution
import engine.kernels as ours         # the repository's kernels/ folder, installed under engine/
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

# transformers: a tiny random Llama, one forward
cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
torch.manual_seed(0)
hf = LlamaForCausalLM(cfg).eval()
with torch.no_grad():
    hf_logits = hf(torch.randint(0, 64, (2, 7))).logits

# Tessera: the same tiny model on the Triton path (attention=triton, fused_ops) and on the torch path
from engine.config import config_from_dict
from engine.model import build_model
from engine.model.ops import kernels_for

def tessera_logits(triton_path):
    m = {"preset": "llama", "vocab_size": 50, "d_model": 32, "n_layers": 1, "n_heads": 4, "n_kv_heads": 2,
         "ffn_hidden": 48, "max_seq_len": 24}
    if triton_path:
        m.update(attention="triton", fused_ops=True)
    model = build_model(config_from_dict({"model": m}).model, seed=7, device="cpu")
    with torch.no_grad():
        return model(torch.arange(38).view(2, 19) % 50)

called = set()
if ours.TRITON_AVAILABLE:  # record which kernels the model reached (a silent fallback would match too)
    for name in ("flash_attention", "rms_norm", "apply_rope", "swiglu"):
        real = getattr(ours, name)
        setattr(ours, name, (lambda n, r: lambda *a, **k: called.add(n) or r(*a, **k))(name, real))
fused, plain = tessera_logits(True), tessera_logits(False)
print(json.dumps({
    "hf_kernels": hf_kernels.__file__, "engine_kernels": ours.__file__,
    "kernels_module_is_hf": sys.modules["kernels"] is hf_kernels,
    "engine_kernels_module": sys.modules["engine.kernels"] is ours,
    "kernels_for_is_ours": kernels_for(torch.zeros(1)) is ours if ours.TRITON_AVAILABLE else None,
    "triton": ours.TRITON_AVAILABLE, "called": sorted(called),
    "transformers": transformers.__file__, "hf_logits_finite": bool(torch.isfinite(hf_logits).all()),
    "hf_shape": list(hf_logits.shape), "tessera_shape": list(fused.shape),
    "triton_vs_torch_max_diff": (fused - plain).abs().max().item(),
}))
"""


def test_hf_kernels_and_engine_kernels_in_one_process(tmp_path):
    # Not pytest.importorskip("kernels"): in this process that would import the repository's kernels/ folder
    # (see the module docstring). Hugging Face's distribution is looked up by its metadata instead.
    try:
        dist = importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("Hugging Face's `kernels` distribution is not installed (pip install -e '.[test]')")
    pytest.importorskip("transformers")
    hf_init = Path(dist.locate_file("kernels/__init__.py")).resolve()
    try:
        importlib.metadata.distribution("tessera-train")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("tessera-train is not installed here (pip install -e '.[test]'): nothing to test")

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # only what is installed
    env["TRITON_INTERPRET"] = "1"  # the Triton kernels run in the CPU interpreter (tiny shapes: seconds)
    proc = subprocess.run([sys.executable, "-c", _PROBE], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, f"probe failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    got = json.loads(proc.stdout.strip().splitlines()[-1])

    hf_file, our_file = Path(got["hf_kernels"]).resolve(), Path(got["engine_kernels"]).resolve()
    # `import kernels` is Hugging Face's: the distribution's own file, in site-packages, not in the repository
    assert hf_file == hf_init, f"import kernels: expected Hugging Face's {hf_init}, found {hf_file}"
    assert {"site-packages", "dist-packages"} & set(hf_file.parts), f"import kernels: {hf_file} is not in site-packages"
    # (the venv may live inside the repository, so "not in the repository" means not its kernels/ folder)
    assert hf_file.parent != REPO / "kernels", f"import kernels: found the repository's {hf_file}, not Hugging Face's"
    assert hf_file.read_bytes() != (REPO / "kernels" / "__init__.py").read_bytes()
    assert got["kernels_module_is_hf"] and got["engine_kernels_module"]
    # `import engine.kernels` is ours: the repository's kernels/ (editable install) or an installed copy of it
    assert our_file != hf_file
    assert our_file.read_bytes() == (REPO / "kernels" / "__init__.py").read_bytes(), (
        f"import engine.kernels: expected the repository's kernels/__init__.py, found {our_file}")
    assert got["hf_logits_finite"] and got["hf_shape"] == [2, 7, 64]
    assert got["tessera_shape"][:2] == [2, 19]
    if got["triton"]:  # with triton, the forward really ran our kernels, and matches the torch path
        assert got["kernels_for_is_ours"] is True
        assert got["called"] == ["apply_rope", "flash_attention", "rms_norm", "swiglu"], got["called"]
        assert got["triton_vs_torch_max_diff"] < 1e-4, got["triton_vs_torch_max_diff"]
