"""Every script in bench/ runs in a tiny smoke mode, so an API change cannot break one unnoticed."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest


BENCH = Path(__file__).resolve().parent.parent / "bench"
SMOKE = {  # script -> arguments that make it finish in seconds
    "step_overhead.py": ["--steps", "20", "--rounds", "1"],
    "fit_overhead.py": ["--epochs", "1", "--batches", "20", "--rounds", "1"],
    "checkpoint_io.py": ["--gb", "0.002", "--repeats", "1", "--steps", "5", "--every", "2"],
    "distributed.py": ["--steps", "5", "--rounds", "1"],
}


def test_every_bench_script_has_a_smoke_mode():
    assert sorted(p.name for p in BENCH.glob("*.py")) == sorted(SMOKE)


@pytest.mark.parametrize("script", sorted(SMOKE))
def test_bench_script_runs_and_ends_with_a_ratio(script):
    out = subprocess.run(
        [sys.executable, str(BENCH / script), *SMOKE[script]],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=BENCH,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    last = out.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"ratio( \w+)? \d+\.\d\d( \w+ \d+\.\d\d)?", last), last
    assert "bitwise equal: False" not in out.stdout, out.stdout
