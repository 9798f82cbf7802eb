"""Checkpoint I/O under injected faults: a failed directory fsync, a work dir deleted mid-run,
a full disk when the lock's pid is written.

A checkpoint is durable only once its directory is fsynced (README "Nothing lost"): a directory
fsync failing with EIO/ENOSPC fails the save, naming the file, and nothing older is retired;
only file systems that refuse directory fsync (EINVAL, ...) are let through.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import stat

import pytest
from helpers import ce_loss, mlp, mlp_batches

import fengine as fe
from fengine import checkpoint as ckpt, optim
from fengine.checkpoint import _io
from fengine.workdir import LOCK_NAME


def _failing_dir_fsync(monkeypatch, err: int, armed: dict | None = None) -> list[int]:
    """Make ``os.fsync`` of a directory raise ``err`` (while ``armed["on"]``); returns the calls."""
    real, calls = os.fsync, []

    def fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode) and (armed is None or armed["on"]):
            calls.append(fd)
            raise OSError(err, os.strerror(err))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return calls


def _state():
    step = fe.train_step(ce_loss, optim.sgd(0.1))
    return step.init(mlp(), seed=0)


def test_a_dir_fsync_eio_fails_the_save_naming_the_file(tmp_path, monkeypatch):
    calls = _failing_dir_fsync(monkeypatch, errno.EIO)
    path = tmp_path / "a.safetensors"
    with pytest.raises(OSError) as info:
        ckpt.save(path, _state())
    e = info.value
    assert e.errno == errno.EIO and e.filename == str(path) and len(calls) == 1
    assert f"cannot save checkpoint {path} durably: fsync of directory {tmp_path} failed" in str(e)
    assert "older checkpoints are kept" in str(e)
    assert path.is_file()  # renamed into place (complete), only not known durable


@pytest.mark.parametrize("err", [errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF])
def test_a_file_system_refusing_dir_fsync_still_saves(tmp_path, monkeypatch, err):
    calls = _failing_dir_fsync(monkeypatch, err)
    path = ckpt.save(tmp_path / "a.safetensors", _state(), update_latest=True)
    assert len(calls) == 2  # the file's directory, then the pointer's
    assert ckpt.latest(tmp_path) == path


def test_a_directory_that_cannot_be_opened_is_skipped_but_a_missing_one_raises(
    tmp_path, monkeypatch
):
    real_open = os.open

    def refuse_dirs(p, flags, *a, **k):
        if os.path.isdir(p):
            raise PermissionError(errno.EACCES, "Permission denied")  # as Windows does
        return real_open(p, flags, *a, **k)

    monkeypatch.setattr(os, "open", refuse_dirs)
    _io._fsync_dir(tmp_path)  # skipped: no directory fsync on such a platform
    monkeypatch.setattr(os, "open", real_open)
    with pytest.raises(
        FileNotFoundError, match=f"cannot open directory {tmp_path / 'gone'} to fsync"
    ):
        _io._fsync_dir(tmp_path / "gone")


def test_remove_logs_a_failed_dir_fsync(tmp_path, monkeypatch, caplog):
    """The file is deleted already: a run must not fail over the deletion's durability."""
    path = ckpt.save(tmp_path / "a.safetensors", _state())
    _failing_dir_fsync(monkeypatch, errno.ENOSPC)
    with caplog.at_level("WARNING", logger="fengine"):
        assert ckpt.remove(path)
    assert not path.exists()
    assert f"fsync of directory {tmp_path} failed" in caplog.text


@pytest.mark.parametrize("async_save", [False, True])
def test_fit_retires_nothing_after_a_failed_dir_fsync(tmp_path, monkeypatch, async_save):
    """max_keep_ckpts=1: iter_2 is the only checkpoint when iter_4's directory fsync fails; fit
    raises that error and iter_2 stays, still named by last_checkpoint."""
    armed = {"on": False}
    _failing_dir_fsync(monkeypatch, errno.EIO, armed)

    class Arm(fe.Handler):
        def on_after_save_checkpoint(self, snap):  # iter_2 durable (async too): arm
            armed["on"] = True

    step = fe.train_step(ce_loss, optim.sgd(0.1))
    keep = fe.handlers.Checkpointer(2, by_epoch=False, max_keep_ckpts=1, async_save=async_save)
    with pytest.raises(OSError, match=re.escape(f"{tmp_path / 'iter_4.safetensors'} durably")):
        fe.fit(step.init(mlp(), seed=0), step, mlp_batches(4), max_steps=8, work_dir=tmp_path,
               handlers=[Arm(), keep])  # fmt: skip
    armed["on"] = False
    assert (tmp_path / "iter_2.safetensors").is_file()
    assert (tmp_path / "last_checkpoint").read_text().strip() == "iter_2.safetensors"
    assert not (tmp_path / "iter_6.safetensors").exists()


def test_a_save_into_a_deleted_work_dir_raises_and_does_not_recreate_it(tmp_path):
    work = tmp_path / "w"
    with fe.lock_work_dir(work):
        ckpt.save(work / "a.safetensors", _state())  # the lock is still on it: saved
        shutil.rmtree(work)
        with pytest.raises(FileNotFoundError) as info:
            ckpt.save(work / "b.safetensors", _state())
        assert f"work dir {work.resolve()} was deleted or replaced during the run" in str(
            info.value
        )
        assert info.value.filename == str(work / "b.safetensors")
        assert not work.exists()  # not recreated without its lock


def test_a_save_into_a_replaced_work_dir_raises(tmp_path):
    work = tmp_path / "w"
    with fe.lock_work_dir(work):
        shutil.rmtree(work)
        work.mkdir()
        (work / LOCK_NAME).write_text("123\n")  # another run's lock file
        with pytest.raises(
            OSError, match=f"work dir {work.resolve()} was deleted or replaced"
        ) as info:
            ckpt.mark_latest(work, ckpt.save(tmp_path / "elsewhere.safetensors", _state()))
        assert info.value.errno == errno.ESTALE
        assert "another file" in str(info.value) and not (work / "last_checkpoint").exists()
    # unlocked: the same save goes through
    ckpt.save(work / "a.safetensors", _state())


def test_a_full_disk_writing_the_lock_pid_names_the_lock_file(tmp_path, monkeypatch):
    work = tmp_path / "w"

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    real = os.pwrite
    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(OSError, match=re.escape(f"{work.resolve() / LOCK_NAME}: No space")) as info:
        with fe.lock_work_dir(work):
            pass
    assert info.value.errno == errno.ENOSPC
    monkeypatch.setattr(os, "pwrite", real)
    with fe.lock_work_dir(work):  # the failed attempt released the lock
        pass
