"""fengine.cli defects found by a recipes hunt, each pinned: an epoch resume that would end short
of its schedules (another world size), a CIFAR-10 resume not saying why --data.root is needed,
the gpt recipe's extension note without its lrs, and what the YAML loader reads as a number."""

from __future__ import annotations

import dataclasses
import pickle
import shutil

import numpy as np
import pytest
from test_cli import FAST, run
from test_cli_hunt import _files, _load, _one_error

from fengine import cli, optim


# ----------------------------------------------------------------------- epoch resume, short end
def test_an_epoch_resume_that_would_end_short_of_its_schedules_is_refused(tmp_path, capsys):
    """Epoch 1 of 1 update (--accumulate 3), resumed for 2 epochs with --accumulate 1 (3 updates
    an epoch): it would end at step 4 while its schedules were planned over 6 updates (the
    cosine unfinished); only the other direction (past their end) was refused."""
    work = tmp_path / "w"
    assert run(*FAST, "--max-epochs", "1", "--accumulate", "3", "--work-dir", str(work)) == 0
    before = _files(work)
    assert run("--work-dir", str(work), "--resume", "--max-epochs", "2", "--accumulate", "1") == 2
    assert (
        f"{work / 'epoch_1.safetensors'} is at step 1 (epoch 1); this 2-epoch run plans its "
        "schedules over 6 updates (3 per epoch) but would train to step 4, short of their end "
        "(accumulate 3 -> 1): resume without that change, or give the horizon in updates "
        "(--max-steps 4)"
    ) in _one_error(capsys)
    assert _files(work) == before
    # an ordinary extension still runs: 2 epochs of 1 update end at step 2, as planned
    extended = tmp_path / "x"
    shutil.copytree(work, extended)
    assert run("--work-dir", str(extended), "--resume", "--max-epochs", "2") == 0
    assert (extended / "epoch_2.safetensors").is_file()
    # the way out it names
    assert run("--work-dir", str(work), "--resume", "--max-steps", "4", "--accumulate", "1") == 0
    assert (work / "iter_4.safetensors").is_file()


def test_an_epoch_resume_in_another_world_size_names_it(tmp_path, capsys, monkeypatch):
    """A 2-process run of 2 updates an epoch, at epoch 1 (step 2), resumed in 1 process (3 an
    epoch): it ends at step 5, not the 6 its 2-epoch schedules are planned over. The 2-process
    checkpoint is this run's epoch_1 with its step and run facts as 2 processes wrote them."""
    work = tmp_path / "w"
    assert run(*FAST, "--max-epochs", "1", "--work-dir", str(work)) == 0
    path = work / "epoch_1.safetensors"
    recorded, facts = cli._checkpoint_run(path)
    assert facts["world_size"] == 1 and facts["max_steps"] == 3  # what is faked below
    two = {**facts, "world_size": 2, "max_steps": 2, "batches_per_epoch": 2}
    validated = cli._validated
    monkeypatch.setattr(cli, "_checkpoint_run", lambda p: (recorded, two))
    monkeypatch.setattr(cli, "_validated", lambda p, like: validated(p, like).replace(step=2))
    assert run("--work-dir", str(work), "--resume", "--max-epochs", "2") == 2
    assert (
        f"{path} is at step 2 (epoch 1); this 2-epoch run plans its schedules over 6 updates (3 "
        "per epoch) but would train to step 5, short of their end (saved by 2 processes, resumed "
        "in 1): resume without that change, or give the horizon in updates (--max-steps 5)"
    ) in _one_error(capsys)


# ----------------------------------------------------------------------- CIFAR-10 resume
def test_a_cifar_resume_says_the_checkpoint_recorded_the_root(tmp_path, capsys):
    """It failed with "--data.name cifar10 needs --data.root PATH" alone: the checkpoint's
    data.root is dropped on purpose (a checkpoint never chooses a path), and now it says so."""
    root = tmp_path / "cifar"
    batches = root / "cifar-10-batches-py"
    batches.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        images = rng.integers(0, 256, (8, 3072), dtype=np.uint8)
        labels = [int(x) for x in rng.integers(0, 10, 8)]
        (batches / name).write_bytes(pickle.dumps({b"data": images, b"labels": labels}))
    (batches / "batches.meta").write_bytes(
        pickle.dumps({b"label_names": [b"c%d" % i for i in range(10)]})
    )
    work = tmp_path / "w"
    assert run("--preset", "tiny", "--data.name", "cifar10", "--data.root", str(root),
               "--data.batch-size", "8", "--max-steps", "1", "--work-dir", str(work),
               "--no-tensorboard", "--no-progress") == 0  # fmt: skip
    capsys.readouterr()
    assert run("--work-dir", str(work), "--resume", "--max-steps", "2") == 2
    assert (
        "--data.name cifar10 needs --data.root PATH (cifar-10-batches-py); "
        f"{work / 'iter_1.safetensors'} recorded data.root={root}, and a checkpoint never "
        f"chooses a path: pass --data.root {root} (see --help)"
    ) in _one_error(capsys)
    # the flag it names
    assert run("--work-dir", str(work), "--resume", "--max-steps", "2", "--data.root", str(root),
               "--no-progress") == 0  # fmt: skip
    assert (work / "iter_2.safetensors").is_file()


# ----------------------------------------------------------------------- gpt: param groups
def test_the_gpt_extension_note_names_the_lrs(tmp_path):
    """gpt's optimizer has param groups: its state reports ``base_lr`` and ``<group>/lr``, no
    ``lr``, and the note lacked "(lr of the last update ..., of the next ...)"."""
    gpt = _load("gpt")
    work = tmp_path / "w"
    notes: list[str] = []

    def main(*argv: str) -> int:
        return cli.main(gpt.Config, gpt.build, presets=gpt.PRESETS, argv=list(argv),
                        out=notes.append)  # fmt: skip

    args = ("--no-tensorboard", "--no-progress", "--work-dir", str(work))
    assert main("--preset", "tiny", "--max-steps", "2", *args) == 0
    notes.clear()
    assert main("--resume", "--max-steps", "3", *args) == 0
    (note,) = [n for n in notes if "re-planned" in n]
    cfg2 = cli.parse(gpt.Config, ["--preset", "tiny", "--max-steps", "2", *args],
                     presets=gpt.PRESETS)[0]  # fmt: skip
    lr2 = gpt.build(cfg2).hyperparams["lr"]
    lr3 = gpt.build(dataclasses.replace(cfg2, max_steps=3)).hyperparams["lr"]
    last, nxt = float(optim.resolve(lr2, 1)), float(optim.resolve(lr3, 2))
    assert f"(lr of the last update {last:.3g}, of the next {nxt:.3g})" in note


# ----------------------------------------------------------------------- YAML numbers
@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("0x1F", 31),
        ("1_000", 1000),
        ("+12", 12),
        ("1e-3", 0.001),
        ("017", "017"),
        ("0o17", "0o17"),
        ("-0x1", "-0x1"),
    ],  # fmt: skip
)
def test_the_yaml_loader_reads_the_numbers_its_comment_says(text, value):
    yaml = pytest.importorskip("yaml")
    assert yaml.load(f"a: {text}", Loader=cli._yaml_loader(yaml)) == {"a": value}
