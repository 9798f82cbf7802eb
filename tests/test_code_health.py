"""Code health, enforced: the formatter, the linter and the type checker all pass.

Each tool runs as ``python -m <tool>`` from the repository root with the settings in
pyproject.toml; on failure the assertion message is the tool's own report.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str) -> None:
    cmd = [sys.executable, "-m", *args]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        report = (out.stdout + out.stderr).strip()
        pytest.fail(f"`{' '.join(args)}` exited with {out.returncode}:\n{report}", pytrace=False)


def test_ruff_format():
    _run("ruff", "format", "--check", ".")


def test_ruff_check():
    _run("ruff", "check", ".")


@pytest.mark.mypy
def test_mypy():
    _run("mypy", "fengine")
