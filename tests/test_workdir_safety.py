"""A work dir may come from someone else: its lock file never redirects fengine's writes.

`lock_work_dir` writes its pid into ``.fengine.lock``; a symlink, a hard link or a non-regular
file there is refused, naming the path, and the file it leads to is left as it was.
"""

from __future__ import annotations

import os

import pytest
from helpers import ce_loss, mlp, mlp_batches

import fengine as fe
from fengine import optim
from fengine.workdir import LOCK_NAME


VICTIM = b"important data\nline 2\n"


def _fit(work_dir):
    step = fe.train_step(ce_loss, optim.sgd(0.1))
    return fe.fit(
        step.init(mlp()), step, mlp_batches(2), max_epochs=1, work_dir=work_dir, handlers=[]
    )


def test_a_symlinked_lock_file_is_refused_and_its_target_untouched(tmp_path):
    work, victim = tmp_path / "w", tmp_path / "victim.txt"
    work.mkdir()
    victim.write_bytes(VICTIM)
    (work / LOCK_NAME).symlink_to(victim)
    with pytest.raises(OSError, match=f"{work / LOCK_NAME} is a symbolic link .*victim.txt"):
        _fit(work)
    with pytest.raises(OSError, match="symbolic link"):
        with fe.lock_work_dir(work):
            pass
    (work / LOCK_NAME).unlink()
    (work / LOCK_NAME).symlink_to(tmp_path / "missing.txt")  # dangling: not created through it
    with pytest.raises(OSError, match="symbolic link"):
        _fit(work)
    assert victim.read_bytes() == VICTIM and not (tmp_path / "missing.txt").exists()
    assert not list(work.glob("*.safetensors"))


def test_a_hard_linked_lock_file_is_refused(tmp_path):
    work, victim = tmp_path / "w", tmp_path / "victim.txt"
    work.mkdir()
    victim.write_bytes(VICTIM)
    os.link(victim, work / LOCK_NAME)
    with pytest.raises(OSError, match=f"{work / LOCK_NAME} is a hard link"):
        _fit(work)
    assert victim.read_bytes() == VICTIM


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo")
def test_a_fifo_or_directory_lock_file_is_refused(tmp_path):
    os.mkfifo(tmp_path / LOCK_NAME)
    with pytest.raises(OSError, match="is not a regular file"):
        _fit(tmp_path)
    os.unlink(tmp_path / LOCK_NAME)
    (tmp_path / LOCK_NAME).mkdir()
    with pytest.raises(OSError, match="is not a regular file"):
        _fit(tmp_path)


def test_a_regular_lock_file_holds_the_pid(tmp_path):
    with fe.lock_work_dir(tmp_path):
        assert (tmp_path / LOCK_NAME).read_text() == f"{os.getpid()}\n"
    (tmp_path / LOCK_NAME).write_text("stale 12345 and more text\n")
    _fit(tmp_path)  # an existing plain file is reused, its contents replaced
    assert (tmp_path / LOCK_NAME).read_text() == f"{os.getpid()}\n"


_HOLDER = """
import os, signal, sys, time
from fengine.workdir import lock_work_dir
with lock_work_dir(sys.argv[1]):
    if os.fork() == 0:  # a DataLoader worker's fork: it outlives its parent for a while
        time.sleep(30)
        os._exit(0)
    print("locked", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_killed_runs_forked_children_do_not_keep_its_work_dir_locked(tmp_path):
    """A run SIGKILLed while its forked DataLoader workers live: they inherited the lock's open
    file and held the lock until they exited (an immediate --resume was refused, naming the
    dead pid); they close their copy at fork now, so the work dir is free at once."""
    import subprocess
    import sys

    from fengine.workdir import lock_work_dir

    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(tmp_path)],
                              stdout=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        holder.wait(timeout=30)
        with lock_work_dir(tmp_path):
            assert (tmp_path / LOCK_NAME).read_text() == f"{os.getpid()}\n"
    finally:
        os.killpg(holder.pid, 9)  # the sleeping child
        holder.stdout.close()
