"""`python -m fengine replay`: a recorded recipe run is re-executed and verified bit for bit."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fengine.config import config_hash


pytestmark = pytest.mark.slow  # every test here runs recipe subprocesses (seconds each)

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "classify.py"
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


def _run(*args: str, cwd: Path = ROOT, threads: int = 2, timeout: int = 240):
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env
    )


def _replay(*args: str, cwd: Path = ROOT):
    return _run("-m", "fengine", "replay", *args, cwd=cwd)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """A 30-step run on one thread (23 steps per epoch: checkpoints at steps 23 and 30)."""
    work = tmp_path_factory.mktemp("replay") / "work"
    out = _run(str(RECIPE), "--work-dir", str(work), "--max-steps", "30", *FAST, threads=1)
    assert out.returncode == 0, out.stderr
    return work


def test_replay_from_scratch_reproduces_every_digest_and_tensor(recorded):
    out = _replay(str(recorded))
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"running recipe {RECIPE}" in out.stdout
    assert "every tensor bitwise equal" in out.stdout and "REPLAY OK" in out.stdout
    steps = [
        int(line.split()[0]) for line in out.stdout.splitlines() if line.strip().endswith("yes")
    ]
    assert steps == [0, 23, 30]


def test_replay_sets_the_recorded_thread_count_and_says_so(recorded):
    out = _replay(str(recorded), "--from", "23")  # this process has 2 threads, the run had 1
    assert out.returncode == 0, out.stdout + out.stderr
    assert (
        "note: the run was recorded with 1 thread, replaying with 2: bits depend on the thread "
        "count; using 1 (--keep-settings keeps 2)" in out.stdout
    )
    assert "from step 23 to step 30" in out.stdout
    kept = _replay(str(recorded), "--from", "23", "--keep-settings")
    assert kept.returncode in (0, 1), kept.stderr  # 1 where two threads compute other bits
    assert "keeping 2 (--keep-settings)" in kept.stdout
    if kept.returncode == 1:
        assert "the environment differs from the recorded one" in kept.stdout


def test_replay_reports_the_first_differing_step(recorded, tmp_path):
    copy = tmp_path / "work"
    shutil.copytree(recorded, copy)
    log = copy / "run_log.jsonl"
    records = [json.loads(line) for line in log.read_text().splitlines()]
    for r in records:
        if r["kind"] == "digest" and r["step"] == 23:
            r["digest"] = "0" * 64  # as if the recorded run had computed something else at step 23
    log.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = _replay(str(copy), "--to", "23")
    assert out.returncode == 1, out.stdout + out.stderr
    assert "first differing digest at step 23" in out.stdout and "REPLAY DIFFERS" in out.stdout


def test_replay_never_runs_a_recipe_the_log_names_outside_the_project(recorded, tmp_path):
    copy = tmp_path / "work"
    shutil.copytree(recorded, copy)
    marker = tmp_path / "marker"
    evil = tmp_path / "evil.py"
    evil.write_text(f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n")
    log = copy / "run_log.jsonl"
    records = [json.loads(line) for line in log.read_text().splitlines()]
    for r in records:
        if r["kind"] == "segment":
            r["recipe"] = str(evil)
            r["code"]["recipe"] = hashlib.sha256(evil.read_bytes()).hexdigest()
    log.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = _replay(str(copy))
    assert out.returncode == 2, out.stdout + out.stderr
    assert f"names the recipe {evil}, outside" in out.stderr
    assert f"pass --recipe {evil} if you trust it" in out.stderr
    assert not marker.exists() and "running recipe" not in out.stdout
    # the recipe the user names is checked against the recorded hash (here: the evil script's)
    named = _replay(str(copy), "--recipe", str(RECIPE), "--from", "23")
    assert named.returncode == 2 and f"the recipe {RECIPE} differs" in named.stderr
    assert not marker.exists()


def test_replay_refuses_a_changed_recipe_unless_forced(recorded, tmp_path):
    changed = tmp_path / "changed.py"
    changed.write_text(RECIPE.read_text() + "\n# edited after the run\n")
    out = _replay(str(recorded), "--to", "23", "--recipe", str(changed))
    assert out.returncode == 2
    assert f"the recipe {changed} differs from the one segment 1 recorded" in out.stderr
    assert "pass --force to replay anyway" in out.stderr
    forced = _replay(str(recorded), "--to", "23", "--recipe", str(changed), "--force")
    assert forced.returncode == 0, forced.stdout + forced.stderr
    assert f"warning: the recipe {changed} differs" in forced.stdout


def test_the_readme_sequence_replays_ok(tmp_path):
    """README "Resume and replay": 30 steps, resumed to 60, replayed (from another directory)."""
    first = _run(str(RECIPE), "--work-dir", "W", "--max-steps", "30", *FAST, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    again = _run(
        str(RECIPE), "--work-dir", "W", "--max-steps", "60", "--resume", *FAST, cwd=tmp_path
    )
    assert again.returncode == 0, again.stderr
    assert "resumed from" in again.stdout + again.stderr and "after 60 steps" in again.stdout
    out = _replay(str(tmp_path / "W"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "segment 1: steps 0-30, max_steps 30" in out.stdout
    assert "segment 2: steps 30-60, max_steps 60, resumed from iter_30.safetensors" in out.stdout
    assert "(same as segment 1)" in out.stdout
    progress = [line for line in out.stdout.splitlines() if line.startswith("  step ")]
    assert len(progress) == 10 and progress[-1].startswith("  step 60/60 (100%")
    assert "every tensor bitwise equal" in out.stdout and out.stdout.rstrip().endswith("REPLAY OK")


def test_a_resume_that_adds_an_ema_replays_ok(tmp_path):
    """The resume starts the EMA from the loaded weights (as fit does); replay carries the state
    into that segment the same way, and the step's two digests (before and after) both match."""
    first = _run(str(RECIPE), "--work-dir", "W", "--max-steps", "8", *FAST, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    again = _run(str(RECIPE), "--work-dir", "W", "--max-steps", "12", "--resume", "--ema", "0.9",
                 *FAST, cwd=tmp_path)  # fmt: skip
    assert again.returncode == 0, again.stderr
    out = _replay(str(tmp_path / "W"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert " NO" not in out.stdout and out.stdout.rstrip().endswith("REPLAY OK")


def test_a_run_logs_load_from_is_read_only_when_the_user_passes_it(recorded, tmp_path):
    """A run started from weights (--load-from): replay refuses to read the file the run log names
    until the user passes it (--path load_from=FILE), and then reads that one, not the log's."""
    weights = tmp_path / "weights.safetensors"
    shutil.copy(recorded / "iter_23.safetensors", weights)
    work = tmp_path / "from_weights"
    out = _run(str(RECIPE), "--work-dir", str(work), "--max-steps", "8",
               "--load-from", str(weights), *FAST)  # fmt: skip
    assert out.returncode == 0, out.stderr

    refused = _replay(str(work))
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert f"--path load_from={weights}" in refused.stderr
    assert "REPLAY" not in refused.stdout

    ok = _replay(str(work), "--path", f"load_from={weights}")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.stdout.rstrip().endswith("REPLAY OK")

    # the log names another file (edited; a plain edit is refused as a damaged log, so its
    # config_hash made to match): never read; the user's file is
    log = work / "run_log.jsonl"
    records = [json.loads(line) for line in log.read_text().splitlines()]
    for r in records:
        if r["kind"] == "segment":
            r["config"]["load_from"] = "/nonexistent/other.safetensors"
            r["config_hash"] = config_hash(r["config"])
    log.write_text("".join(json.dumps(r) + "\n" for r in records))
    ok = _replay(str(work), "--path", f"load_from={weights}")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.stdout.rstrip().endswith("REPLAY OK")
