"""builtin:stdlib: the standard library's pure-Python source as a built-in corpus (engine/data/sources.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.data.sources import (BUILTIN_STDLIB, STDLIB_MAX_CHARS, SourceError, check_stdlib, check_text_file,
                                 is_raw_source, iter_documents, iter_stdlib, source_name, stdlib_dir, stdlib_files)


def _tree(root: Path) -> None:
    files = {
        "a.py": "A = 1\n",
        "b/__init__.py": "B = 2\n",
        "b/c.py": "C = 3\n",
        "latin1.py": b"# caf\xe9\n",                     # not UTF-8: left out
        "empty.py": "  \n",                                # no text: left out
        "notes.txt": "not python\n",
        "site-packages/pkg/x.py": "X = 0\n",
        "test/test_a.py": "import a\n",
        "tkinter/test/runner.py": "R = 0\n",
        "idlelib/idle_test/t.py": "T = 0\n",
        "lib2to3/tests/data/d.py": "D = 0\n",
        "unittest/test_case_helper.py": "H = 0\n",
        "pydoc_data/topics.py": "topics = {}\n",
        "config-3.11-x86_64-linux-gnu/python-config.py": "P = 0\n",
    }
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(text if isinstance(text, bytes) else text.encode())


def test_synthetic_tree_selection_and_order(tmp_path):
    _tree(tmp_path)
    rel = [f.relative_to(tmp_path).as_posix() for f in stdlib_files(tmp_path)]
    assert rel == ["a.py", "b/__init__.py", "b/c.py", "empty.py", "latin1.py"]  # sorted by path; no tests, no site
    assert list(iter_stdlib(tmp_path)) == ["A = 1\n", "B = 2\n", "C = 3\n"]      # not-UTF-8 and empty left out
    # the cap: every k-th file, k = ceil(total bytes / max_chars)
    sizes = sum((tmp_path / r).stat().st_size for r in rel)
    capped = stdlib_files(tmp_path, max_chars=-(-sizes // 2))
    assert [f.relative_to(tmp_path).as_posix() for f in capped] == ["a.py", "b/c.py", "latin1.py"]


def test_missing_sources_are_a_clear_error(tmp_path):
    with pytest.raises(SourceError, match=r"builtin:stdlib: expected the standard library's \.py sources under"):
        check_stdlib(tmp_path / "nowhere")
    (tmp_path / "only").mkdir()
    (tmp_path / "only" / "test").mkdir()
    (tmp_path / "only" / "test" / "test_x.py").write_text("x = 1\n")
    with pytest.raises(SourceError, match="found none"):
        list(iter_stdlib(tmp_path / "only"))


def test_real_stdlib_deterministic_non_empty_no_tests():
    files = stdlib_files()
    assert files and files == stdlib_files()
    root = stdlib_dir()
    for f in files:
        parts = f.relative_to(root).parts
        assert not {"test", "tests", "idle_test", "site-packages", "dist-packages", "pydoc_data"} & set(parts), f
        assert not parts[-1].startswith("test_"), f
    first = next(iter_documents(BUILTIN_STDLIB))
    assert first == files[0].read_text(encoding="utf-8") and first.strip()
    assert sum(f.stat().st_size for f in files) <= 1.25 * STDLIB_MAX_CHARS  # a few MB: preprocessing stays fast


def test_name_and_validation():
    assert source_name(BUILTIN_STDLIB) == "stdlib"
    assert source_name("builtin:pydoc") == "pydoc"
    assert is_raw_source(BUILTIN_STDLIB)
    check_text_file(BUILTIN_STDLIB)  # the read-only check the data builder runs before anything is written


def test_data_check_accepts_builtin_stdlib(tmp_path):
    from engine.config import load_config
    from engine.data.build import check_data_sources
    from engine.data.tokenizers import build_tokenizer

    cfg = load_config(None, ["data.tokenizer=byte", 'data.train=[{path: "builtin:stdlib"}]',
                             f"train.out_dir={tmp_path / 'run'}", "model.preset=tiny"])
    check_data_sources(cfg, build_tokenizer("byte"))
    assert not (tmp_path / "run").exists()  # read-only
