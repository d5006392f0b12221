"""The layers, read from the code's own imports.

Every .py under engine/ and kernels/ (installed as `engine.kernels`) is parsed with `ast`; every `import` / `from ... import`
counts, wherever it is (module level, inside a function, under `if TYPE_CHECKING:`): a lazy
import is still a dependency. Relative imports are resolved; anything outside the repository's
own packages (torch, numpy, the standard library) is ignored. Rules:

  kernels/ (engine.kernels)              imports nothing from the rest of engine, and never the
                                         top-level name `kernels` (Hugging Face's distribution)
  engine/parallel, engine/optim,
  engine/data                            never import engine.model, engine.train, engine.bench,
                                         engine.cli, engine.generate
  engine/model                           never imports engine.train, engine.bench, engine.cli,
                                         engine.generate
  engine/convert                         never imports engine.train, engine.bench, engine.cli,
                                         engine.generate; nothing below it (model, checkpoint,
                                         parallel, optim, data) imports it
  engine/parallel                        never imports engine.optim (optim is the layer above
                                         parallel: it reads ParallelState and sharding specs)
  everywhere                             no import cycles between modules

A module importing its own package's name does not count the package's __init__ twice: an edge
goes to the module the statement names (`from engine.data import x` -> engine.data.x when x is a
submodule, else engine.data). A submodule without a .py file (the compiled engine.data._helpers)
is a leaf. Imports through importlib with computed names are not seen.
"""

from __future__ import annotations

import ast
from collections import deque
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Folder -> installed package name: the repository's kernels/ folder is installed as engine.kernels
# (setup.py), so that it never collides with Hugging Face's top-level `kernels`.
FOLDERS = {"engine": "engine", "kernels": "engine.kernels"}
PACKAGES = ("engine",)
_TOP = ("engine.bench", "engine.cli", "engine.generate")
RULES = [  # (importer prefix, forbidden prefixes, why)
    ("engine.kernels", ("engine",), "kernels/ is standalone and imports nothing from engine"),
    *[(low, ("engine.model", "engine.train") + _TOP, f"{low} is below the model and the training loop")
      for low in ("engine.parallel", "engine.optim", "engine.data")],
    ("engine.model", ("engine.train",) + _TOP, "engine.model is below the training loop"),
    ("engine.checkpoint", ("engine.train",) + _TOP,
     "engine.checkpoint (files, DCP I/O, weights) is below the training loop, which saves through it"),
    ("engine.convert", ("engine.train",) + _TOP,
     "engine.convert (Hugging Face conversion) is below the training loop, which starts from it"),
    *[(low, ("engine.convert",), f"{low} is below the Hugging Face conversion")
      for low in ("engine.model", "engine.checkpoint", "engine.parallel", "engine.optim", "engine.data")],
    ("engine.parallel", ("engine.optim",),
     "engine.optim is the layer above parallel: it reads ParallelState and sharding specs"),
]


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _bound_names(tree: ast.Module) -> set[str]:
    """Names a module binds at top level (also inside top-level if/try/with), not in functions."""
    names: set[str] = set()
    todo = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name))
        elif isinstance(node, (ast.If, ast.Try, ast.With)):
            for field in ("body", "orelse", "finalbody", "handlers"):
                todo.extend(getattr(node, field, []))
        elif isinstance(node, ast.ExceptHandler):
            todo.extend(node.body)
    return names


def import_graph(root: Path) -> tuple[dict[str, Path], dict[str, list[tuple[int, str]]]]:
    """(module name -> file, module name -> [(line, imported repo module)]) for the packages under root."""
    root = Path(root)
    files: dict[str, Path] = {}
    for folder, pkg in FOLDERS.items():
        for path in sorted((root / folder).rglob("*.py")):
            parts = pkg.split(".") + list(path.relative_to(root / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            files[".".join(parts)] = path
    trees = {mod: ast.parse(path.read_text(), filename=str(path)) for mod, path in files.items()}
    bound = {mod: _bound_names(t) for mod, t in trees.items() if files[mod].name == "__init__.py"}

    def target(base: str, name: str | None) -> str:
        """The repo module that `from base import name` (or `import base`) depends on."""
        if name is None or name == "*" or f"{base}.{name}" in files:
            return f"{base}.{name}" if name not in (None, "*") else base
        if base in bound and name not in bound[base]:
            return f"{base}.{name}"  # a submodule without source (compiled): a leaf
        return base

    edges: dict[str, list[tuple[int, str]]] = {}
    for mod, tree in trees.items():
        package = mod if files[mod].name == "__init__.py" else mod.rpartition(".")[0]
        out: list[tuple[int, str]] = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found = [(node.lineno, target(a.name, None)) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(up + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                found = [(node.lineno, target(base, a.name)) for a in node.names]
            else:
                continue
            out += [(line, t) for line, t in found
                    if (t.split(".")[0] in PACKAGES or t.split(".")[0] == "kernels") and t != mod]
        edges[mod] = sorted(set(out))
    return files, edges


def _cycles(edges: dict[str, list[tuple[int, str]]]) -> list[list[str]]:
    """For every module on a cycle, the shortest cycle through it (each cycle once, smallest name first)."""
    succ = {m: sorted({t for _, t in e if t in edges}) for m, e in edges.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    sccs: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in succ[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                sccs.append(sorted(comp))

    for v in sorted(succ):
        if v not in index:
            visit(v)
    seen: set[tuple[str, ...]] = set()
    cycles = []
    for comp in sccs:
        inside = set(comp)
        for start in comp:
            prev: dict[str, str] = {}
            queue = deque([start])
            while queue and start not in prev:
                v = queue.popleft()
                for w in succ[v]:
                    if w in inside and w not in prev:
                        prev[w] = v
                        queue.append(w)
            path = [start]
            while prev[path[-1]] != start:
                path.append(prev[path[-1]])
            path.reverse()  # start -> ... -> start, without the final start
            i = path.index(min(path))
            key = tuple(path[i:] + path[:i])
            if key not in seen:
                seen.add(key)
                cycles.append(list(key))
    return cycles


def check_layering(root: Path) -> list[str]:
    """One message per forbidden import (file:line, importer, imported module) and per import cycle."""
    root = Path(root)
    files, edges = import_graph(root)
    rel = {m: files[m].relative_to(root).as_posix() for m in files}
    problems = []
    for mod in sorted(edges, key=lambda m: rel[m]):
        for line, imported in edges[mod]:
            for importer, forbidden, why in RULES:
                if _under(imported, "kernels"):
                    problems.append(f"{rel[mod]}:{line}: {mod} imports the top-level name {imported} (ours is "
                                    f"engine.kernels; the top-level `kernels` is Hugging Face's distribution)")
                    break
                own = importer if _under(mod, importer) and _under(imported, importer) else None
                if _under(mod, importer) and not own and any(_under(imported, f) for f in forbidden):
                    problems.append(f"{rel[mod]}:{line}: {mod} imports {imported} ({why})")
                    break
    for cycle in _cycles(edges):
        chain = " -> ".join(cycle + cycle[:1])
        where = "; ".join(
            f"{rel[a]}:{min(line for line, t in edges[a] if t == b)} imports {b}"
            for a, b in zip(cycle, cycle[1:] + cycle[:1]))
        problems.append(f"import cycle: {chain} ({where})")
    return problems


def test_the_repository_keeps_its_layers():
    problems = check_layering(REPO)
    assert not problems, f"{len(problems)} layering problem(s):\n" + "\n".join(problems)


def _tree(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def test_the_checker_reports_planted_back_imports_and_cycles(tmp_path):
    """A tiny tree with one violation of every rule and one cycle; everything else is allowed."""
    _tree(tmp_path, {
        "engine/__init__.py": "",
        "engine/cli.py": "import argparse\n",
        "engine/errors.py": "",
        "engine/train/__init__.py": "",
        "engine/train/loop.py": ("import torch\nfrom engine.model.m import M\nfrom engine.optim.adam import Adam\n"
                                 "from ..parallel import ok\n\ndef train():\n    pass\n"),
        "engine/model/__init__.py": "",
        "engine/model/m.py": "import os\n\n\ndef run():\n    import engine.cli  # a lazy back-import\n",
        "engine/optim/__init__.py": "",
        "engine/optim/adam.py": "from engine.parallel.ok import spec\nAdam = object\n",
        "engine/parallel/__init__.py": "",
        "engine/parallel/ok.py": "from engine.errors import ConfigError\nspec = 1\n",
        "engine/parallel/bad.py": ("from __future__ import annotations\n\n\ndef step():\n"
                                   "    from engine.train import loop\n    return loop\n"),
        "engine/parallel/sharded.py": "import torch\n\nfrom ..optim.adam import Adam\n",
        "engine/data/__init__.py": "from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    from .a import A\n",
        "engine/data/a.py": "from . import b\nfrom engine.data import _native  # compiled, no .py\nA = 1\n",
        "engine/data/b.py": "import numpy\n\n\ndef f():\n    import engine.data.a\n",
        "kernels/__init__.py": "import torch\n",
        "kernels/k.py": "from . import helpers\nfrom engine.errors import ConfigError\n",
        "kernels/old.py": "from kernels import helpers\n",
        "kernels/helpers.py": "",
    })
    assert check_layering(tmp_path) == [
        "engine/model/m.py:5: engine.model.m imports engine.cli (engine.model is below the training loop)",
        "engine/parallel/bad.py:5: engine.parallel.bad imports engine.train.loop "
        "(engine.parallel is below the model and the training loop)",
        "engine/parallel/sharded.py:3: engine.parallel.sharded imports engine.optim.adam "
        "(engine.optim is the layer above parallel: it reads ParallelState and sharding specs)",
        "kernels/k.py:2: engine.kernels.k imports engine.errors (kernels/ is standalone and imports nothing from "
        "engine)",
        "kernels/old.py:1: engine.kernels.old imports the top-level name kernels (ours is engine.kernels; the "
        "top-level `kernels` is Hugging Face's distribution)",
        "import cycle: engine.data.a -> engine.data.b -> engine.data.a "
        "(engine/data/a.py:1 imports engine.data.b; engine/data/b.py:5 imports engine.data.a)",
    ]
    # Removing the planted problems leaves a clean tree.
    _tree(tmp_path, {"engine/model/m.py": "", "engine/parallel/bad.py": "", "engine/parallel/sharded.py": "",
                     "kernels/k.py": "", "kernels/old.py": "", "engine/data/b.py": ""})
    assert check_layering(tmp_path) == []


# The planner (engine/plan, `tessera plan`) is arithmetic on the config: it may read the model's size
# formulas, the FLOPs accounting, the pipeline schedules and their simulator and a tokenizer's size, and must
# build no model. Only the command line and the benchmarks use it.
PLAN_MAY_IMPORT = ("engine.plan", "engine.config", "engine.errors", "engine.model.transformer", "engine.train.flops",
                   "engine.parallel.pipeline.actions", "engine.parallel.pipeline.schedules",
                   "engine.parallel.pipeline.simulator", "engine.parallel.pipeline.partition",
                   "engine.data.tokenizers")
PLAN_USERS = ("engine.plan", "engine.cli", "engine.bench")


def test_the_planner_reads_only_sizes_flops_and_schedules():
    files, edges = import_graph(REPO)
    rel = {m: files[m].relative_to(REPO).as_posix() for m in files}
    bad = [f"{rel[mod]}:{line}: {mod} imports {imp}" for mod, found in edges.items() if _under(mod, "engine.plan")
           for line, imp in found if not any(_under(imp, ok) for ok in PLAN_MAY_IMPORT)]
    bad += [f"{rel[mod]}:{line}: {mod} imports {imp} (only the CLI and benchmarks use the planner)"
            for mod, found in edges.items() if not any(_under(mod, u) for u in PLAN_USERS)
            for line, imp in found if _under(imp, "engine.plan")]
    assert not bad, "\n".join(bad)
