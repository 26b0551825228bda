"""The code is formatted and linted as pyproject.toml configures ruff (100 columns), and stays
within its size budgets after formatting: no source file over 600 lines, train.py at most 500, no
function over 100. A budget is met by moving a concern into a place of its own, not by packing
lines."""

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [
    p for p in ROOT.rglob("*.py") if not {".venv", "build", ".git"} & set(p.relative_to(ROOT).parts)
]


@pytest.mark.parametrize("command", [["format", "--check"], ["check"]], ids=["format", "check"])
def test_ruff(command):
    # the ruff of this interpreter's environment, whether or not it is on PATH
    if importlib.util.find_spec("ruff") is None:
        pytest.fail("ruff is not installed: pip install -e '.[test]'")
    done = subprocess.run(
        [sys.executable, "-m", "ruff", *command, "."],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def test_size_budgets():
    too_long = []
    for path in SOURCES:
        name = path.relative_to(ROOT).as_posix()
        text = path.read_text(encoding="utf-8")
        limit = 500 if name == "train.py" else 600
        if len(text.splitlines()) > limit and not name.startswith("tests/"):
            too_long.append(f"{name}: {len(text.splitlines())} lines > {limit}")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > 100:
                    too_long.append(f"{name}:{node.lineno} {node.name}: {lines} lines > 100")
    assert not too_long, "\n".join(too_long)
