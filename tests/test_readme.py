"""The README's two commands are what CI runs; keep them in sync."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)\n```", (REPO / "README.md").read_text(), flags=re.S)
    return [b.strip() for b in blocks[:2]]


def test_readme_starts_with_install_demo_and_install_test():
    demo, tests = _readme_commands()
    assert "pip install torch==2.13.0" in demo and "tessera train examples/tiny.yaml" in demo
    assert "pip install torch==2.13.0" in tests and tests.endswith("pytest")


def test_ci_runs_the_readme_commands_verbatim():
    ci = (REPO / ".ci" / "run").read_text()
    for cmd in _readme_commands():
        assert cmd in ci, cmd
    assert "-eq 5" in ci  # pytest's "no tests collected" is handled
