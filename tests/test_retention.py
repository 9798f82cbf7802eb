"""Nothing lost: a kill at any moment of a run with rotation and best-tracking leaves a resumable
run, its best checkpoint and no stale temp files; resume finishes what the straight run did.

Two harnesses. ``kill_at(k)`` stops the process's k-th filesystem mutation in its tracks (the
disk is frozen from then on, as a kill -9 leaves it), for every k of a run: every distinct
on-disk state. ``fork`` + SIGKILL at random moments is the real thing.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import time
import warnings

import pytest
import torch
from helpers import assert_dicts_equal, ce_loss, mlp, mlp_batches
from torch.nn import functional as F

import fengine as fe
from fengine import checkpoint, loop, optim
from fengine.handlers import Checkpointer
from fengine.metrics import MeanLoss


MUTATING = (
    "open",
    "write",
    "pwrite",
    "fsync",
    "replace",
    "rename",
    "unlink",
    "ftruncate",
    "posix_fallocate",
)


class Killed(BaseException):
    """The simulated kill -9 (a BaseException: nothing in fengine may catch it)."""


@contextlib.contextmanager
def kill_at(k: int | None, monkeypatch):
    """Raise `Killed` at the k-th mutating filesystem call; every later call raises too, so no cleanup
    code touches the disk after the "kill". ``k=None`` only counts. Yields the counter."""
    state = {"n": 0, "dead": False}

    def wrap(fn):
        def call(*args, **kw):
            if state["dead"]:
                raise Killed()
            if fn is os.open and not args[1] & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                return fn(*args, **kw)  # reading is not a mutation
            state["n"] += 1
            if state["n"] == k:
                state["dead"] = True
                raise Killed()
            return fn(*args, **kw)

        return call

    with monkeypatch.context() as m:
        for name in MUTATING:
            m.setattr(os, name, wrap(getattr(os, name)))
        yield state


def experiment(work, max_keep, *, resume=True, max_epochs=4, async_save=False):
    """4 epochs of 3 batches; a checkpoint every epoch, at most ``max_keep`` kept; the best val loss;
    ``async_save``: written on the background thread (then the kill may hit that thread)."""
    step = fe.train_step(ce_loss, optim.sgd(0.2, momentum=0.9))
    val = fe.Val(
        mlp_batches(2, seed=9), [MeanLoss()], eval_fn=lambda m, b: F.cross_entropy(m(b[0]), b[1])
    )
    ck = Checkpointer(
        1, max_keep_ckpts=max_keep, save_best="loss", rule="less", async_save=async_save
    )
    return fe.fit(step.init(mlp(), seed=0), step, mlp_batches(3), max_epochs=max_epochs, val=val,
                  handlers=[ck], work_dir=work, resume=resume)  # fmt: skip


def _ckpts(work):
    return sorted(p.name for p in work.glob("*.safetensors"))


def _best_ok(work):
    return any(checkpoint.read_meta(p)["step"] >= 0 for p in work.glob("best_*.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("max_keep,async_save", [(1, False), (3, False), (1, True)])
def test_a_kill_at_every_filesystem_step_loses_nothing(tmp_path, monkeypatch, max_keep, async_save):
    """Async: the kill lands in the writer thread during a background save (every later write of
    any thread fails too), and surfaces in fit at its next save or its end."""
    straight = experiment(tmp_path / "straight", max_keep)
    expected_files = _ckpts(tmp_path / "straight")
    with kill_at(None, monkeypatch) as counted:
        experiment(tmp_path / "count", max_keep, async_save=async_save)
    total = counted["n"]
    assert total > 40  # every save: temp file, data, fsync, rename, dir fsync, pointer, retire...
    saved: list = []
    real_write = loop._write

    def recording_write(path, *a, **kw):  # a save's file is durable and the pointer moved
        real_write(path, *a, **kw)
        saved.append(path.name)

    monkeypatch.setattr(loop, "_write", recording_write)
    unresumable = lost_best = stale = 0
    for k in range(1, total + 1):
        work = tmp_path / f"k{k}"
        saved.clear()
        with kill_at(k, monkeypatch), pytest.raises(Killed):
            experiment(work, max_keep, async_save=async_save)
        # the disk as the kill left it: a completed save means a loadable checkpoint and, once a best
        # was saved, a best file
        if saved:
            with (
                warnings.catch_warnings()
            ):  # a kill between a save and its pointer: latest falls back, warning
                warnings.simplefilter("ignore")
                unresumable += checkpoint.latest(work) is None
        if any(n.startswith("best_") for n in saved):
            lost_best += not _best_ok(work)
        done = experiment(work, max_keep, async_save=async_save)
        assert_dicts_equal(done.params, straight.params, f"resumed after a kill at step {k}")
        assert _ckpts(work) == expected_files, k
        stale += len([p for p in work.iterdir() if p.name.endswith(".tmp")])
    assert (unresumable, lost_best, stale) == (0, 0, 0)


@pytest.mark.slow
def test_sigkill_at_random_moments_loses_nothing(tmp_path):
    """50 real kill -9 of a forked run at random moments, each followed by a resume to the end.
    Every run, killed child or resuming parent, uses one intra-op thread: bits depend on the
    thread count (a child killed after a save, resumed with the parent's two threads, differed)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _sigkill_at_random_moments(tmp_path)
    finally:
        torch.set_num_threads(threads)


def _sigkill_at_random_moments(tmp_path):
    straight = experiment(tmp_path / "straight", 1)

    def forked_run(work):
        """A child that trains until it ends or is killed (fork to exit, as each killed run)."""
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                experiment(work, 1)  # one thread, as the parent
                code = 0
            finally:
                os._exit(code)
        return pid

    # the kills' range from children run to their end the same way (the shortest: a parent-side
    # timing with other threads, or under load, overestimated it and most kills came too late)
    durations = []
    for k in range(2):
        t0 = time.perf_counter()
        os.waitpid(forked_run(tmp_path / f"timing{k}"), 0)
        durations.append(time.perf_counter() - t0)
    duration = min(durations)
    rng = random.Random(0)
    outcomes = {"unresumable": 0, "lost_best": 0, "stale": 0, "killed": 0}
    for i in range(50):
        work = tmp_path / f"run{i}"
        pid = forked_run(work)
        time.sleep(rng.uniform(0, duration * 1.2))
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        outcomes["killed"] += os.WIFSIGNALED(status)
        with (
            warnings.catch_warnings()
        ):  # a kill between a save and its pointer: latest falls back, warning
            warnings.simplefilter("ignore")
            if any(work.glob("*.safetensors")) and checkpoint.latest(work) is None:
                outcomes["unresumable"] += 1
        done = experiment(work, 1)
        assert_dicts_equal(done.params, straight.params, f"run {i}")
        outcomes["lost_best"] += not _best_ok(work)
        outcomes["stale"] += len([p for p in work.iterdir() if p.name.endswith(".tmp")])
    assert outcomes["killed"] >= 10  # kills that landed before the run ended (timing-dependent)
    assert (outcomes["unresumable"], outcomes["lost_best"], outcomes["stale"]) == (0, 0, 0), (
        outcomes
    )


# ----------------------------------------------------------------- resume finishes what the straight run did
class Events(fe.Handler):
    def __init__(self):
        super().__init__()
        self.seen = []

    def on_after_val_epoch(self, snap):
        self.seen.append(("val", snap.step, snap.epoch))


def test_resume_from_the_last_step_of_an_epoch_finishes_the_epoch_and_validates(tmp_path):
    """A preemption right after the last update: the checkpoint sits at (epoch 3, batch 3) before the
    epoch's end and its validation; the resumed run does both and ends where the straight run ends."""
    straight = experiment(tmp_path / "straight", 3)

    @fe.on("after_train_iter", once=12)
    def sigterm(snap):
        os.kill(os.getpid(), signal.SIGTERM)

    step = fe.train_step(ce_loss, optim.sgd(0.2, momentum=0.9))
    val = fe.Val(
        mlp_batches(2, seed=9), [MeanLoss()], eval_fn=lambda m, b: F.cross_entropy(m(b[0]), b[1])
    )
    with pytest.raises(fe.Preempted) as info:
        fe.fit(step.init(mlp(), seed=0), step, mlp_batches(3), max_epochs=4, val=val, work_dir=tmp_path / "w",
               handlers=[Checkpointer(1, max_keep_ckpts=3, save_best="loss", rule="less"), sigterm])  # fmt: skip
    assert (info.value.state.epoch, info.value.state.batch_in_epoch) == (3, 3)
    done = experiment(tmp_path / "w", 3)
    assert (done.step, done.epoch, done.batch_in_epoch) == (
        straight.step,
        straight.epoch,
        straight.batch_in_epoch,
    )
    assert_dicts_equal(done.params, straight.params)
    best = lambda w: sorted(p.name for p in w.glob("best_*"))  # noqa: E731
    assert best(tmp_path / "w") == best(tmp_path / "straight")  # the final validation happened
    # the preemption file counts in max_keep_ckpts=3: epoch_1 and epoch_2 were retired for step_12 and epoch_4
    assert [n for n in _ckpts(tmp_path / "w") if not n.startswith("best")] == [
        "epoch_3.safetensors",
        "epoch_4.safetensors",
        "step_12.safetensors",
    ]


def test_a_preemption_in_the_validation_after_a_save_replaces_that_steps_file(tmp_path):
    """SIGTERM in the validation at step 6, which the Checkpointer saved just before it (interval
    3, max_keep_ckpts=2): the preemption's step_6 (after the validation) takes iter_6's place in
    the rotation, so iter_3 stays; before, iter_6 and step_6 (one update, twice) were kept and
    iter_3 deleted. The run resumes from step_6 to the straight run's bits and files."""

    def run(work, handlers=(), resume=False):
        step = fe.train_step(ce_loss, optim.sgd(0.2, momentum=0.9))
        val = fe.Val(mlp_batches(2, seed=9), [MeanLoss()], interval=3,
                     eval_fn=lambda m, b: F.cross_entropy(m(b[0]), b[1]))  # fmt: skip
        ck = Checkpointer(3, by_epoch=False, max_keep_ckpts=2)
        return fe.fit(step.init(mlp(), seed=0), step, mlp_batches(5), max_steps=12, val=val,
                      work_dir=work, handlers=[ck, *handlers], resume=resume)  # fmt: skip

    straight = run(tmp_path / "straight")

    @fe.on("before_val_iter", once=3)  # the validation at step 6 (the third batch seen)
    def sigterm(snap):
        os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(fe.Preempted) as info:
        run(tmp_path / "w", [sigterm])
    assert info.value.state.step == 6
    assert info.value.checkpoint == tmp_path / "w" / "step_6.safetensors"
    assert _ckpts(tmp_path / "w") == ["iter_3.safetensors", "step_6.safetensors"]
    assert checkpoint.read_meta(info.value.checkpoint)["meta"]["moment"] == "after_val"
    done = run(tmp_path / "w", resume=True)
    assert_dicts_equal(done.params, straight.params)
    assert _ckpts(tmp_path / "w") == _ckpts(tmp_path / "straight")

    # the same across a resume: stopped on iter_6 right after its save, then SIGTERM in the
    # validation the resumed run runs again at step 6 (the marker was this process's only:
    # step_6 joined iter_6 in the rotation and iter_3 was later retired for a copy of step 6)
    @fe.on("after_train_iter", once=6)
    def at_the_save(snap):
        os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(fe.Preempted) as info:
        run(tmp_path / "r", [at_the_save])
    assert info.value.checkpoint == tmp_path / "r" / "iter_6.safetensors"

    @fe.on("before_val_iter", once=1)
    def in_the_validation(snap):
        os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(fe.Preempted):
        run(tmp_path / "r", [in_the_validation], resume=True)
    assert _ckpts(tmp_path / "r") == ["iter_3.safetensors", "step_6.safetensors"]
    done = run(tmp_path / "r", resume=True)
    assert_dicts_equal(done.params, straight.params)
    assert _ckpts(tmp_path / "r") == _ckpts(tmp_path / "straight")


def test_sigterm_during_the_final_validation_is_a_preemption(tmp_path):
    step = fe.train_step(ce_loss, optim.sgd(0.1))

    @fe.on("before_val_iter", once=1)
    def sigterm(snap):
        os.kill(os.getpid(), signal.SIGTERM)

    val = fe.Val(mlp_batches(1), [MeanLoss()], eval_fn=lambda m, b: F.cross_entropy(m(b[0]), b[1]))
    with pytest.raises(fe.Preempted) as info:
        fe.fit(
            step.init(mlp()),
            step,
            mlp_batches(2),
            max_epochs=1,
            val=val,
            handlers=[sigterm],
            work_dir=tmp_path,
        )
    assert info.value.exit_code == 128 + signal.SIGTERM
    assert checkpoint.read_meta(info.value.checkpoint)["meta"]["moment"] == "after_val"


def test_iteration_run_killed_before_its_last_validation_validates_on_resume(tmp_path):
    """The last periodic checkpoint is written before that step's validation; a kill in between and a
    resume give the validation the straight run did (the best checkpoint moves to the last step)."""

    def run(work, handlers=()):
        step = fe.train_step(ce_loss, optim.sgd(0.2, momentum=0.9))
        val = fe.Val(mlp_batches(2, seed=9), [MeanLoss()], eval_fn=lambda m, b: F.cross_entropy(m(b[0]), b[1]),
                     interval=3)  # fmt: skip
        ck = Checkpointer(3, by_epoch=False, save_best="loss", rule="less")
        return fe.fit(step.init(mlp(), seed=0), step, mlp_batches(3), max_steps=9, val=val, work_dir=work,
                      handlers=[ck, *handlers], resume=True)  # fmt: skip

    run(tmp_path / "straight")

    class KillInLastValidation(fe.Handler):
        def on_before_val(self, snap):
            if snap.step == 9:
                raise Killed()

    with pytest.raises(Killed):
        run(tmp_path / "w", [KillInLastValidation()])
    validated: list = []
    run(
        tmp_path / "w",
        [fe.on("after_val_epoch")(lambda snap: validated.append((snap.step, dict(snap.metrics))))],
    )
    straight: list = []
    run(
        tmp_path / "again",
        [fe.on("after_val_epoch")(lambda snap: straight.append((snap.step, dict(snap.metrics))))],
    )
    assert (
        validated == straight[-1:] and validated[0][0] == 9
    )  # step 9's validation, with the same result
    best = lambda w: sorted(p.name for p in w.glob("best_*"))  # noqa: E731
    assert best(tmp_path / "w") == best(tmp_path / "straight")


def test_sigterm_in_the_validation_a_resume_runs_first_is_a_preemption(tmp_path):
    """A checkpoint written before its step's validation: the resumed run validates first. A
    SIGTERM there was left to the default action (the process died without a checkpoint)."""

    class Unhandled(Exception):
        pass

    def default_action(signum, frame):  # stands for the process-killing default, catchably
        raise Unhandled(signum)

    previous = signal.signal(signal.SIGTERM, default_action)

    class KillInValidation(fe.Handler):
        def on_before_val(self, snap):
            raise Killed()

    @fe.on("before_val_iter", once=1)
    def sigterm(snap):
        os.kill(os.getpid(), signal.SIGTERM)

    def run(handler):
        step = fe.train_step(ce_loss, optim.sgd(0.2, momentum=0.9))
        val = fe.Val(mlp_batches(2, seed=9), [MeanLoss()], eval_fn=lambda m, b: F.cross_entropy(m(b[0]), b[1]),
                     interval=3)  # fmt: skip
        return fe.fit(step.init(mlp(), seed=0), step, mlp_batches(3), max_steps=6, val=val,
                      work_dir=tmp_path, resume=True,
                      handlers=[Checkpointer(3, by_epoch=False), handler])  # fmt: skip

    try:
        with pytest.raises(Killed):
            run(KillInValidation())  # iter_3 saved, then killed in step 3's validation
        with pytest.raises(fe.Preempted) as info:
            run(sigterm)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert info.value.exit_code == 128 + signal.SIGTERM and info.value.state.step == 3
    assert checkpoint.read_meta(info.value.checkpoint)["meta"]["moment"] == "after_val"


# ----------------------------------------------------------------- untrusted handler state
@pytest.mark.parametrize("field,value", [
    ("kept", ["../outside.safetensors"]),
    ("kept", ["/etc/passwd"]),
    ("retiring", ["sub/dir.safetensors"]),
    ("last_ckpt", "/tmp/x.safetensors"),
    ("best", {"loss": {"score": 0.1, "path": "../../victim.safetensors"}}),
    ("best", {"loss": {"score": "high", "path": "best.safetensors"}}),
    ("kept", "epoch_1.safetensors"),
])  # fmt: skip
def test_paths_from_checkpoint_metadata_must_be_plain_names(tmp_path, field, value):
    victim = tmp_path / "victim.safetensors"
    experiment(tmp_path / "w", 1, max_epochs=1)
    victim.write_bytes(
        (tmp_path / "w" / "epoch_1.safetensors").read_bytes()
    )  # a real checkpoint outside
    path = tmp_path / "w" / "epoch_1.safetensors"
    meta = checkpoint.read_meta(path)["meta"]
    meta["handlers"]["checkpointer"][field] = value
    state = checkpoint.load(
        path, like=fe.train_step(ce_loss, optim.sgd(0.2, momentum=0.9)).init(mlp())
    )
    evil = tmp_path / "w" / "evil.safetensors"
    checkpoint.save(evil, state, meta)
    with pytest.raises(checkpoint.CheckpointError, match="Checkpointer.*checkpointer"):
        step = fe.train_step(ce_loss, optim.sgd(0.2, momentum=0.9))
        fe.fit(step.init(mlp()), step, mlp_batches(3), max_epochs=3, resume=evil, work_dir=tmp_path / "w",
               handlers=[Checkpointer(1, max_keep_ckpts=1, save_best="loss", rule="less", published=True)])  # fmt: skip
    assert victim.exists()


def test_retire_never_deletes_the_pointer_target_or_a_non_checkpoint(tmp_path):
    experiment(tmp_path, 3, max_epochs=2)
    pointed = checkpoint.latest(tmp_path)
    other = tmp_path / "notes.safetensors"
    other.write_text("not a checkpoint")
    loop.retire([pointed, other], tmp_path)
    assert pointed.exists() and other.exists()


@pytest.mark.parametrize("pointer", ["fifo", "nul", "dir"])
def test_retire_reads_an_untrusted_pointer_safely(tmp_path, pointer):
    """retire read last_checkpoint with read_text: a FIFO hung the run, a NUL raised a raw
    ValueError (and a link to /dev/zero filled memory). An unusable pointer protects nothing
    and stops nothing; a good one still protects its file."""
    import threading

    experiment(tmp_path, 3, max_epochs=2)
    kept = checkpoint.latest(tmp_path)
    old = sorted(p for p in tmp_path.glob("*.safetensors") if p != kept)[0]
    (tmp_path / "last_checkpoint").unlink()
    if pointer == "fifo":
        os.mkfifo(tmp_path / "last_checkpoint")
    elif pointer == "nul":
        (tmp_path / "last_checkpoint").write_bytes(b"epoch_1\0.safetensors")
    else:
        (tmp_path / "last_checkpoint").mkdir()
    done = threading.Thread(target=loop.retire, args=([old], tmp_path), daemon=True)
    done.start()
    done.join(timeout=20)
    assert not done.is_alive(), "retire hung on the pointer"
    assert not old.exists() and kept.exists()


def test_resume_over_a_damaged_run_without_pointer_is_an_error_not_a_fresh_start(tmp_path):
    """The only checkpoint torn and ``last_checkpoint`` gone: `fit(resume=True)` names the file and
    writes nothing, instead of training from scratch over the damaged run."""
    experiment(tmp_path, 3, max_epochs=1)
    torn = tmp_path / "epoch_1.safetensors"
    os.truncate(torn, os.path.getsize(torn) - 100)
    for p in [tmp_path / "last_checkpoint", *tmp_path.glob("best_*")]:
        p.unlink()
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(checkpoint.CheckpointError, match="damaged checkpoints") as info:
        experiment(tmp_path, 3, max_epochs=2)
    assert f"{torn}: truncated" in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


# ----------------------------------------------------------------- one run per work dir
def test_a_second_run_in_a_locked_work_dir_is_refused_naming_the_holder(tmp_path):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            with fe.lock_work_dir(tmp_path):
                os.write(w, b"locked")
                time.sleep(30)
            code = 0
        finally:
            os._exit(code)
    assert os.read(r, 6) == b"locked"
    try:
        step = fe.train_step(ce_loss, optim.sgd(0.1))
        with pytest.raises(fe.WorkDirLocked, match=f"in use by another run \\(pid {pid}\\)"):
            fe.fit(
                step.init(mlp()), step, mlp_batches(2), max_epochs=1, work_dir=tmp_path, handlers=[]
            )
        assert not list(tmp_path.glob("*.safetensors"))
    finally:
        os.kill(pid, signal.SIGKILL)  # kill -9 releases the OS lock
        os.waitpid(pid, 0)
    step = fe.train_step(ce_loss, optim.sgd(0.1))
    fe.fit(step.init(mlp()), step, mlp_batches(2), max_epochs=1, work_dir=tmp_path, handlers=[])
    with fe.lock_work_dir(tmp_path), fe.lock_work_dir(tmp_path):  # re-entrant in one process
        fe.fit(step.init(mlp()), step, mlp_batches(2), max_epochs=1, work_dir=tmp_path, handlers=[])


# ----------------------------------------------------------------- non-finite losses by default
def test_a_non_finite_loss_is_caught_by_default_without_per_step_reads():
    def loss_fn(model, batch):
        ce = ce_loss(model, batch)
        return {"loss_ce": ce, "loss_log": torch.log(ce - 10)}  # NaN from the start

    step = fe.train_step(loss_fn, optim.sgd(0.1))
    with pytest.raises(
        FloatingPointError, match=r"non-finite loss at step 1: loss=nan, loss_log=nan"
    ):
        fe.fit(step.init(mlp()), step, mlp_batches(7), max_steps=70, handlers=[])
    ok = fe.fit(
        step.init(mlp()), step, mlp_batches(7), max_steps=20, handlers=[], check_nonfinite=False
    )
    assert ok.step == 20


@pytest.mark.parametrize("key", [None, "loss/cls", "loss_cls"])
def test_fp16_skipped_steps_are_not_non_finite_losses(key):
    """A loss named with a "/" (MMEngine's "loss/cls" style) looked for "loss/update_skipped",
    missed the step's flag, and raised on a routine fp16 overflow the scaler had skipped."""

    def loss_fn(model, batch):
        x, y, blowup = batch
        loss = ce_loss(model, (x, y)) * blowup
        return loss if key is None else {key: loss}

    step = fe.train_step(loss_fn, optim.sgd(0.1), fe.amp("float16"))
    data = [
        (x, y, torch.tensor(float("inf") if i == 1 else 1.0))
        for i, (x, y) in enumerate(mlp_batches(4))
    ]
    final = fe.fit(step.init(mlp()), step, data, max_epochs=2, handlers=[])
    assert final.step == 8  # two skipped updates, no error


@pytest.mark.slow
def test_two_recipe_runs_in_one_work_dir_the_second_is_refused(tmp_path):
    """The recipe holds the lock around config.json and fit: the second run exits 2 naming the first's
    pid, and leaves the first run's config and checkpoints alone."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    fast = [
        "--no-tensorboard",
        "--model.width",
        "8",
        "--model.blocks",
        "1",
        "--work-dir",
        str(tmp_path),
    ]
    first = subprocess.Popen(
        [sys.executable, str(root / "recipes" / "classify.py"), *fast, "--max-steps", "100000", "--seed", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        lock = tmp_path / fe.workdir.LOCK_NAME
        deadline = time.time() + 120
        while not (lock.exists() and lock.read_text().strip() == str(first.pid)):
            assert time.time() < deadline and first.poll() is None, (
                "the first run never took the lock"
            )
            time.sleep(0.05)
        second = subprocess.run(
            [sys.executable, str(root / "recipes" / "classify.py"), *fast, "--max-steps", "5", "--seed", "2"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert second.returncode == 2, second.stderr
        assert f"in use by another run (pid {first.pid})" in second.stderr
    finally:  # the first run trains until stopped (however slow the second's start): preempt it
        first.send_signal(signal.SIGTERM)
        out, err = first.communicate(timeout=300)
    assert first.returncode == 143, err  # preempted, with its checkpoint
    assert json.loads((tmp_path / "config.json").read_text())["seed"] == 1


def test_a_full_disk_at_a_save_keeps_every_older_checkpoint(tmp_path, monkeypatch):
    """Rotation happens after the new file is durable: ENOSPC at epoch 3's save leaves epoch_2 (and the
    best) in place and named by the pointer, as the error message says."""
    import errno

    real = checkpoint._pwrite_all

    def full_from_epoch_3(fd, data, offset):
        if state["epoch"] == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data, offset)

    state = {"epoch": 0}
    monkeypatch.setattr(checkpoint, "_pwrite_all", full_from_epoch_3)
    watch = fe.on("after_train_epoch")(lambda snap: state.update(epoch=snap.epoch))
    step = fe.train_step(ce_loss, optim.sgd(0.2, momentum=0.9))
    val = fe.Val(
        mlp_batches(2, seed=9), [MeanLoss()], eval_fn=lambda m, b: F.cross_entropy(m(b[0]), b[1])
    )
    ck = Checkpointer(1, max_keep_ckpts=1, save_best="loss", rule="less")
    with pytest.raises(
        OSError, match="existing checkpoints and the last_checkpoint pointer are untouched"
    ) as e:
        fe.fit(step.init(mlp(), seed=0), step, mlp_batches(3), max_epochs=4, val=val, work_dir=tmp_path,
               handlers=[watch, ck])  # fmt: skip
    assert e.value.errno == errno.ENOSPC
    assert checkpoint.latest(tmp_path) == tmp_path / "epoch_2.safetensors"
    assert "epoch_2.safetensors" in _ckpts(tmp_path) and any(
        n.startswith("best_") for n in _ckpts(tmp_path)
    )
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_retire_keeps_the_pointed_file_in_a_checkpointers_out_dir(tmp_path):
    """The pointer in the work dir names a file in out_dir: reading it safely must still accept
    that directory, or the file it names is not protected."""
    step = fe.train_step(ce_loss, optim.sgd(0.1))
    ck = Checkpointer(2, by_epoch=False, out_dir=tmp_path / "out")
    fe.fit(step.init(mlp(), seed=0), step, mlp_batches(4), max_steps=4, work_dir=tmp_path / "w",
           handlers=[ck])  # fmt: skip
    last = checkpoint.latest(tmp_path / "w", save_dir=tmp_path / "out" / "w")
    assert last is not None and last.parent == tmp_path / "out" / "w"
    loop.retire([last], tmp_path / "w")
    assert last.exists()
