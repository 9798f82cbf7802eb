"""The front door: README's test command is what CI runs; the recipe CLI documents its flags."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch


ROOT = Path(__file__).resolve().parent.parent


def test_ci_runs_readme_test_command_verbatim():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"```bash\n(.+?)\n```", readme, flags=re.S)
    test_cmd = next(c for c in commands if "pytest" in c)
    assert test_cmd in (ROOT / ".ci" / "run").read_text()


def test_recipe_help_lists_top_level_and_nested_flags():
    out = subprocess.run(
        [sys.executable, str(ROOT / "recipes" / "classify.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    for flag in (
        "--work-dir",
        "--max-epochs",
        "--max-steps",
        "--seed",
        "--resume",
        "--resume-from",
        "--optim.lr",
        "--data.batch-size",
        "--model.width",
    ):
        assert flag in out.stdout, flag


def test_readme_example_runs(tmp_path, monkeypatch):
    """The 20-line example in README.md trains and evaluates (one epoch here)."""
    readme = (ROOT / "README.md").read_text()
    code = re.findall(r"```python\n(.+?)\n```", readme, flags=re.S)[0]
    assert "max_epochs=10" in code and '"work_dirs/example"' in code
    code = code.replace("max_epochs=10", "max_epochs=1").replace(
        '"work_dirs/example"', repr(str(tmp_path))
    )
    printed = []
    monkeypatch.setattr("builtins.print", lambda *a, **k: printed.append(a))
    ns: dict = {}
    exec(compile(code, "README.md", "exec"), ns)
    assert printed and "accuracy" in printed[-1][0]
    assert (tmp_path / "last_checkpoint").is_file()
    ema = ns["state"].eval_weights()[0]  # load_into gave the module the EMA weights
    assert all(torch.equal(p, ema[n]) for n, p in ns["model"].named_parameters())


def test_readme_user_wrappers_example_runs(monkeypatch):
    """README's "Composing a step" block: a gradient transformation, a forward wrapper and a
    post-update wrapper under fp16 loss scaling with accumulation."""
    readme = (ROOT / "README.md").read_text()
    code = next(
        c for c in re.findall(r"```python\n(.+?)\n```", readme, flags=re.S) if "gradient_noise" in c
    )
    printed = []
    monkeypatch.setattr("builtins.print", lambda *a, **k: printed.append(a))
    exec(compile(code, "README.md", "exec"), {})
    metrics = printed[-1][0]
    assert set(metrics) == {"loss", "grad_norm", "lr", "loss_scale", "update_skipped"}
    assert metrics["loss_scale"] == 65536.0 and metrics["update_skipped"] == 0.0


@pytest.mark.slow
def test_readme_resume_and_replay_sequence_runs_as_written(tmp_path):
    """README's "Resume and replay" commands, in order, with W in a temp dir (the first run
    with the tiny preset, which the resumes then take from its checkpoints): the extension says
    how it changes the schedule, the branch continues, and replay agrees bit for bit."""
    readme = (ROOT / "README.md").read_text()
    block = next(
        c for c in re.findall(r"```bash\n(.+?)\n```", readme, flags=re.S) if "replay W" in c
    )
    outs = []
    for line in block.splitlines():
        argv = shlex.split(line.split("#")[0].replace("W", str(tmp_path / "W")))
        assert argv[0] == "python"
        if not outs:
            argv += ["--preset", "tiny", "--no-tensorboard", "--log-interval", "50"]
        done = subprocess.run([sys.executable, *argv[1:]], capture_output=True, text=True,
                              timeout=600, cwd=ROOT)  # fmt: skip
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        outs.append(done.stdout)
    assert "is at step 30 of a 30-step run" in outs[1] and "re-planned over 60 updates" in outs[1]
    assert "is at step 30 of a 30-step run" in outs[2] and "re-planned over 40 updates" in outs[2]
    assert "best_accuracy_iter_30.safetensors is removed" not in outs[2]  # step 2 removed it
    assert "REPLAY OK" in outs[3]
    (aside,) = (tmp_path / "W").glob("abandoned_after_step_30.*")  # the rewind replaced nothing
    assert "iter_60.safetensors" in {p.name for p in aside.iterdir()}
    saved = json.loads((tmp_path / "W" / "config.json").read_text())
    assert saved["model"] == {"width": 8, "blocks": 1} and saved["max_steps"] == 40


@pytest.mark.slow
def test_main_job_reaches_95_percent_and_replays(tmp_path):
    """README's main job as written (``python recipes/classify.py``, defaults: 10 epochs on digits)
    reaches >= 95 % validation accuracy, and replay of its work dir agrees bit for bit."""
    work = tmp_path / "classify"
    done = subprocess.run([sys.executable, "recipes/classify.py", "--work-dir", str(work), "--no-tensorboard"],
                          capture_output=True, text=True, timeout=900, cwd=ROOT)  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    accuracy = float(re.search(r"final validation accuracy: ([\d.]+)%", done.stdout).group(1))
    assert accuracy >= 95.0, done.stdout[-2000:]
    replayed = subprocess.run([sys.executable, "-m", "fengine", "replay", str(work)],
                              capture_output=True, text=True, timeout=900, cwd=ROOT)  # fmt: skip
    assert replayed.returncode == 0 and "REPLAY OK" in replayed.stdout, replayed.stdout[-2000:]
