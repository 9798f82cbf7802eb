"""`python -m fengine replay`: a recorded recipe run is re-executed and verified bit for bit."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


pytestmark = pytest.mark.slow  # every test here runs recipe subprocesses (seconds each)

ROOT = Path(__file__).resolve().parent.parent
FAST = [
    "--no-tensorboard",
    "--data.batch-size",
    "64",
    "--model.width",
    "8",
    "--model.blocks",
    "1",
    "--log-interval",
    "50",
]


def _run(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """A 30-step run of a copy of the recipe (23 steps per epoch: checkpoints at steps 23 and 30)."""
    root = tmp_path_factory.mktemp("replay")
    recipe = root / "classify.py"
    shutil.copy(ROOT / "recipes" / "classify.py", recipe)
    work = root / "work"
    out = _run(str(recipe), "--work-dir", str(work), "--max-steps", "30", *FAST)
    assert out.returncode == 0, out.stderr
    return recipe, work


def test_replay_from_scratch_reproduces_every_digest_and_tensor(recorded):
    _, work = recorded
    out = _run("-m", "fengine", "replay", str(work))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "every tensor bitwise equal" in out.stdout and "REPLAY OK" in out.stdout
    steps = [
        int(line.split()[0]) for line in out.stdout.splitlines() if line.strip().endswith("yes")
    ]
    assert 0 in steps and 23 in steps and 30 in steps


def test_replay_between_checkpoints(recorded):
    _, work = recorded
    out = _run("-m", "fengine", "replay", str(work), "--from", "23", "--to", "30")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "from step 23 to step 30" in out.stdout


def test_replay_reports_the_first_differing_step(recorded, tmp_path):
    _, work = recorded
    copy = tmp_path / "work"
    shutil.copytree(work, copy)
    log = copy / "run_log.jsonl"
    records = [json.loads(line) for line in log.read_text().splitlines()]
    for r in records:
        if r["kind"] == "digest" and r["step"] == 23:
            r["digest"] = "0" * 64  # as if the recorded run had computed something else at step 23
    log.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = _run("-m", "fengine", "replay", str(copy), "--to", "23")
    assert out.returncode == 1, out.stdout + out.stderr
    assert "first differing digest at step 23" in out.stdout and "REPLAY DIFFERS" in out.stdout


def test_replay_refuses_changed_code_or_config_unless_forced(recorded, tmp_path):
    recipe, work = recorded
    copy = tmp_path / "work"
    shutil.copytree(work, copy)
    log = copy / "run_log.jsonl"
    header = json.loads(log.read_text().splitlines()[0])
    header["config_hash"] = "f" * 64
    with log.open("a") as f:
        f.write(json.dumps(header) + "\n")  # a resume with another config
    out = _run("-m", "fengine", "replay", str(copy), "--to", "23")
    assert out.returncode == 2 and "different config" in out.stderr
    changed = tmp_path / "changed.py"
    changed.write_text(recipe.read_text() + "\n# edited after the run\n")
    header = json.loads(log.read_text().splitlines()[0])
    header["recipe"] = str(changed)
    log.write_text(json.dumps(header) + "\n" + "\n".join(log.read_text().splitlines()[1:-1]) + "\n")
    out = _run("-m", "fengine", "replay", str(copy), "--to", "23")
    assert out.returncode == 2 and "code changed" in out.stderr
    forced = _run("-m", "fengine", "replay", str(copy), "--to", "23", "--force")
    assert forced.returncode == 0, forced.stdout + forced.stderr
    assert "warning: the code changed" in forced.stdout


def test_resume_flag_continues_a_stopped_recipe_run(recorded, tmp_path):
    recipe, _ = recorded
    work = tmp_path / "w"
    first = _run(str(recipe), "--work-dir", str(work), "--max-steps", "30", *FAST)
    assert first.returncode == 0, first.stderr
    again = _run(str(recipe), "--work-dir", str(work), "--max-steps", "40", "--resume", *FAST)
    assert again.returncode == 0, again.stderr
    assert "resumed from" in again.stdout + again.stderr and "after 40 steps" in again.stdout
