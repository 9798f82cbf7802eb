"""Resume edge cases (hunt 25): an epoch end saved by another number of processes, and a rewind
whose restored best record names a file the abandoned path deleted."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
from helpers import Scripted, ce_loss, mlp, mlp_batches

import fengine as fe
from fengine import checkpoint, optim
from fengine.handlers.checkpointer import Checkpointer


def _setup() -> tuple[fe.TrainState, fe.Step, list]:
    step = fe.train_step(ce_loss, optim.sgd(0.05))
    return step.init(mlp(), seed=0), step, mlp_batches(4)  # 4 batches an epoch in one process


def test_an_epoch_end_saved_by_two_processes_runs_that_epochs_end_first(tmp_path):
    """2 processes saved at the last update of epoch 1 (batch 2 of their 2 per epoch), before its
    validation and epoch checkpoint; one process resumes: they run first, as in 2 processes
    (the position became epoch 2's start, and epoch 1's end never ran)."""
    state, step, data = _setup()
    saved = state.replace(step=2, epoch=0, batch_in_epoch=2)
    path = checkpoint.save(tmp_path / "iter_2.safetensors", saved,
                           {"run": {"world_size": 2, "batches_per_epoch": 2},
                            "moment": "after_train_iter"})  # fmt: skip
    ends: list[tuple[int, int]] = []
    seen = fe.on("after_train_epoch")(lambda snap: ends.append((snap.state.epoch, snap.state.step)))
    vals: list[int] = []
    checked = fe.on("after_val_epoch")(lambda snap: vals.append(snap.state.epoch))
    state, step, data = _setup()
    out = fe.fit(state, step, data, max_epochs=2, work_dir=tmp_path, resume=path,
                 val=fe.Val(data[:1], [Scripted([0.5, 0.6])]),
                 handlers=[Checkpointer(1), seen, checked])  # fmt: skip
    assert ends == [(1, 2), (2, 6)]  # epoch 1's end at step 2, then epoch 2 (4 updates)
    assert vals == [1, 2]
    assert (tmp_path / "epoch_1.safetensors").is_file()
    assert checkpoint.read_meta(tmp_path / "epoch_1.safetensors")["step"] == 2
    assert (out.step, out.epoch, out.batch_in_epoch) == (6, 2, 0)


def test_a_rewind_whose_best_file_is_gone_drops_that_record_and_saves_a_best_again(tmp_path):
    """Epoch 2 was the best (0.9) until epoch 4 (0.95) deleted its file; a rewind to epoch 2
    moves epoch 4's best aside, so the restored record names a file that is gone: a warning
    names the key and file, and the next validation writes a best file (there was none)."""
    state, step, data = _setup()
    fe.fit(state, step, data, max_epochs=4, work_dir=tmp_path,
           val=fe.Val(data[:1], [Scripted([0.5, 0.9, 0.6, 0.95])]),
           handlers=[Checkpointer(1, save_best="acc")])  # fmt: skip
    assert not (tmp_path / "best_acc_epoch_2.safetensors").exists()
    state, step, data = _setup()
    with pytest.warns(UserWarning) as said:
        fe.fit(state, step, data, max_epochs=3, work_dir=tmp_path,
               resume=tmp_path / "epoch_2.safetensors",
               val=fe.Val(data[:1], [Scripted([0.1])]),
               handlers=[Checkpointer(1, save_best="acc")])  # fmt: skip
    (warning,) = [w for w in said if "best" in str(w.message)]
    text = str(warning.message)
    assert (
        "epoch_2.safetensors records the best 'acc' (0.9) as best_acc_epoch_2.safetensors" in text
    )
    assert f"which is not in {tmp_path}" in text
    assert sorted(p.name for p in Path(tmp_path).glob("best_*")) == ["best_acc_epoch_3.safetensors"]
    meta = checkpoint.read_meta(tmp_path / "epoch_3.safetensors")["meta"]["handlers"]
    assert meta["checkpointer"]["best"] == {
        "acc": {"score": 0.1, "path": "best_acc_epoch_3.safetensors"}
    }


def test_a_best_record_whose_file_exists_is_kept_without_a_warning(tmp_path):
    """The plain resume: its best file is there, so the record stands (0.1 is no new best)."""
    state, step, data = _setup()
    fe.fit(state, step, data, max_epochs=2, work_dir=tmp_path,
           val=fe.Val(data[:1], [Scripted([0.5, 0.9])]),
           handlers=[Checkpointer(1, save_best="acc")])  # fmt: skip
    state, step, data = _setup()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fe.fit(state, step, data, max_epochs=3, work_dir=tmp_path, resume=True,
               val=fe.Val(data[:1], [Scripted([0.1])]),
               handlers=[Checkpointer(1, save_best="acc")])  # fmt: skip
    assert sorted(p.name for p in Path(tmp_path).glob("best_*")) == ["best_acc_epoch_2.safetensors"]


def test_a_resume_between_two_ranks_batches_is_refused_naming_the_sample():
    """1 process saved after batch 3 of an epoch: 2 processes cannot start at sample 3 * batch
    (each takes every other batch); the error names the file, the position and what works."""
    from fengine.loop import repartition

    state, _, _ = _setup()
    at3 = state.replace(step=3, epoch=0, batch_in_epoch=3)
    with pytest.raises(ValueError) as e:
        repartition(at3, 1, 2, Path("iter_3.safetensors"), saved_batches=4)
    assert str(e.value) == (
        "iter_3.safetensors was saved by 1 process at batch 3 of the epoch (3 batches of all "
        "ranks); 2 processes cannot continue at that sample; resume with a world size that "
        "divides 3, or from an epoch boundary"
    )
    assert repartition(at3, 1, 3, Path("x"), saved_batches=4).batch_in_epoch == 1
