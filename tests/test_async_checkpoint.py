"""Asynchronous checkpoints (``Checkpointer(async_save=True)``): the files are bitwise those of a
synchronous run although training runs on while they are written; the pointer moves and old files
go only once the new one is durable; a preemption and the end of `fit` wait for the pending save;
a writer's error is raised on the main thread, never lost.

The writer is slowed down (each ``pwrite`` sleeps first) so that steps really run while a file is
being written: without the snapshot copy, the in-place updates of those steps would reach the file.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import signal
import threading
import time
import zlib

import pytest
import safetensors.torch
import torch
from helpers import assert_dicts_equal, ce_loss, mlp, mlp_batches

import fengine as fe
from fengine import checkpoint, optim
from fengine.checkpoint import _background, _data, _io
from fengine.handlers import Checkpointer


class Clock(fe.Handler):
    """Counts updates and records the save events, to see what ran while a file was written."""

    def __init__(self) -> None:
        super().__init__()
        self.updates = 0
        self.events: list[tuple[str, str, int]] = []

    def on_after_train_iter(self, snap):
        self.updates += 1
        time.sleep(0.005)  # updates outlast the writer thread's start, even on a loaded machine

    def on_before_save_checkpoint(self, snap):
        self.events.append(("before", snap.checkpoint.name, snap.step))

    def on_after_save_checkpoint(self, snap):
        self.events.append(("after", snap.checkpoint.name, snap.step))


@pytest.fixture
def slow_writer(monkeypatch):
    """Every write sleeps first; records (updates before, updates after) per write of the writer thread."""
    real = checkpoint._pwrite_all
    seen: list[tuple[int, int]] = []
    clock = Clock()

    def slow(fd, data, offset):
        before = clock.updates
        if threading.current_thread() is not threading.main_thread():
            time.sleep(0.05)
        seen.append((before, clock.updates))
        return real(fd, data, offset)

    monkeypatch.setattr(checkpoint, "_pwrite_all", slow)
    return clock, seen


def run(work, *, async_save, max_steps=12, handlers=(), resume=False):
    step = fe.train_step(ce_loss, optim.sgd(0.2, momentum=0.9))
    ck = Checkpointer(3, by_epoch=False, max_keep_ckpts=2, async_save=async_save)
    return fe.fit(step.init(mlp(), seed=0), step, mlp_batches(5), max_steps=max_steps,
                  handlers=[ck, *handlers], work_dir=work, resume=resume)  # fmt: skip


def tensors_of(path):
    """Every tensor of the file (read by safetensors, an independent reader) and its step (read
    and verified by checkpoint.load)."""
    like = fe.train_step(ce_loss, optim.sgd(0.2, momentum=0.9)).init(mlp(), seed=0)
    return safetensors.torch.load_file(path), checkpoint.load(path, like).step


def files(work):
    return sorted(p.name for p in work.glob("*.safetensors"))


def writer_threads():
    return [t for t in threading.enumerate() if t.name == "fengine-checkpoint-writer"]


def test_async_checkpoints_are_bitwise_those_of_a_synchronous_run(tmp_path, slow_writer):
    clock, seen = slow_writer
    sync = run(tmp_path / "sync", async_save=False)
    seen.clear()
    done = run(tmp_path / "async", async_save=True, handlers=[clock])
    assert any(after > before for before, after in seen), "no step ran during a background write"
    assert not writer_threads()  # fit waited for the last one
    assert_dicts_equal(done.params, sync.params)
    assert files(tmp_path / "async") == files(tmp_path / "sync") == ["iter_12.safetensors", "iter_9.safetensors"]  # fmt: skip
    for name in files(tmp_path / "sync"):
        a, a_step = tensors_of(tmp_path / "async" / name)
        s, s_step = tensors_of(tmp_path / "sync" / name)
        assert a_step == s_step
        assert sorted(a) == sorted(s) and len(a) > 4
        assert_dicts_equal(a, s, name)
    assert checkpoint.latest(tmp_path / "async") == tmp_path / "async" / "iter_12.safetensors"
    # after_save_checkpoint fires once the file is durable, with the state saved; before_save at the save
    assert [e for e in clock.events if e[0] == "after"] == [
        ("after", f"iter_{n}.safetensors", n) for n in (3, 6, 9, 12)
    ]


def test_at_most_one_save_is_pending(tmp_path, slow_writer, monkeypatch):
    """Saves every update with a slow writer: each waits for the one before; never two writers."""
    active, most = [0], [0]
    real = checkpoint.save

    def counting(*a, **kw):
        active[0] += 1
        most[0] = max(most[0], active[0])
        try:
            return real(*a, **kw)
        finally:
            active[0] -= 1

    monkeypatch.setattr(checkpoint, "save", counting)
    step = fe.train_step(ce_loss, optim.sgd(0.2))
    fe.fit(step.init(mlp(), seed=0), step, mlp_batches(5), max_steps=6, work_dir=tmp_path,
           handlers=[Checkpointer(1, by_epoch=False, async_save=True)])  # fmt: skip
    assert most[0] == 1
    assert files(tmp_path) == [f"iter_{n}.safetensors" for n in range(1, 7)]


def test_preempted_async_run_resumes_bitwise_like_a_straight_synchronous_one(tmp_path, slow_writer):
    straight = run(tmp_path / "straight", async_save=False)

    @fe.on("after_train_iter", once=7)
    def sigterm(snap):
        os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(fe.Preempted) as info:
        run(tmp_path / "w", async_save=True, handlers=[sigterm])
    assert info.value.state.step == 7
    done = run(tmp_path / "w", async_save=True, resume=True)
    assert_dicts_equal(done.params, straight.params)
    assert (done.step, done.epoch, done.batch_in_epoch) == (
        straight.step,
        straight.epoch,
        straight.batch_in_epoch,
    )
    assert files(tmp_path / "w") == files(tmp_path / "straight")


def test_sigterm_waits_for_the_pending_save(tmp_path, slow_writer):
    """SIGTERM right after a background save was handed off: the preemption waits for it (its file
    complete, its after_save_checkpoint fired), then writes step_7, which the pointer names."""
    clock, _ = slow_writer

    @fe.on("after_train_iter", once=7)
    def sigterm(snap):
        os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(fe.Preempted) as info:
        run(tmp_path, async_save=True, handlers=[clock, sigterm])
    assert not writer_threads()
    assert info.value.checkpoint == tmp_path / "step_7.safetensors"
    assert checkpoint.latest(tmp_path) == tmp_path / "step_7.safetensors"
    assert tensors_of(tmp_path / "iter_6.safetensors")[1] == 6  # complete and verified
    assert clock.events[-4:] == [
        ("before", "iter_6.safetensors", 6),
        ("after", "iter_6.safetensors", 6),  # waited for before the preemption's save
        ("before", "step_7.safetensors", 7),
        ("after", "step_7.safetensors", 7),
    ]


@pytest.mark.parametrize("async_save", [False, True])
def test_sigterm_at_a_saved_step_stops_on_that_checkpoint(tmp_path, slow_writer, async_save):
    """SIGTERM at step 6, which the Checkpointer has just saved (its write still pending when
    async): no second copy of the same state (it would cost the grace period a save and, with
    max_keep_ckpts=2, retire iter_3); the run stops on iter_6, and resumes from it bit for bit."""
    clock, _ = slow_writer
    straight = run(tmp_path / "straight", async_save=async_save)

    @fe.on("after_train_iter", once=6)
    def sigterm(snap):
        os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(fe.Preempted) as info:
        run(tmp_path / "w", async_save=async_save, handlers=[clock, sigterm])
    assert not writer_threads()
    assert info.value.checkpoint == tmp_path / "w" / "iter_6.safetensors"
    assert checkpoint.latest(tmp_path / "w") == tmp_path / "w" / "iter_6.safetensors"
    assert files(tmp_path / "w") == ["iter_3.safetensors", "iter_6.safetensors"]
    assert tensors_of(tmp_path / "w" / "iter_6.safetensors")[1] == 6
    assert clock.events[-2:] == [
        ("before", "iter_6.safetensors", 6),
        ("after", "iter_6.safetensors", 6),
    ]
    done = run(tmp_path / "w", async_save=async_save, resume=True)
    assert_dicts_equal(done.params, straight.params)
    assert files(tmp_path / "w") == files(tmp_path / "straight")


def failing_at(monkeypatch, name, error):
    """``checkpoint._pwrite_all`` raises ``error()`` while ``name`` is being saved; returns the
    threads it raised on."""
    real_save, real_write = checkpoint.save, checkpoint._pwrite_all
    saving, threads = [None], []

    def save(path, *a, **kw):
        saving[0] = os.path.basename(path)
        return real_save(path, *a, **kw)

    def write(fd, data, offset):
        if saving[0] == name:
            threads.append(threading.current_thread())
            raise error()
        return real_write(fd, data, offset)

    monkeypatch.setattr(checkpoint, "save", save)
    monkeypatch.setattr(checkpoint, "_pwrite_all", write)
    return threads


@pytest.mark.parametrize("failing", [6, 12])
def test_a_failed_background_save_is_raised_on_the_main_thread(tmp_path, monkeypatch, failing):
    """A full disk in the writer while saving iter_6 (or the last, iter_12): fit raises that OSError
    by the next save (or at its end), never returns normally, and the previous checkpoint stays
    the latest, with no temp file left."""
    clock = Clock()
    threads = failing_at(
        monkeypatch, f"iter_{failing}.safetensors", lambda: OSError(errno.ENOSPC, "No space left")
    )
    with pytest.raises(OSError, match="untouched") as e:
        run(tmp_path, async_save=True, handlers=[clock])
    assert e.value.errno == errno.ENOSPC
    assert threads and all(t is not threading.main_thread() for t in threads)
    assert not writer_threads()
    assert checkpoint.latest(tmp_path) == tmp_path / f"iter_{failing - 3}.safetensors"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    # raised by the next save: no later save was handed off
    assert clock.updates <= min(failing + 3, 12)
    assert files(tmp_path) == [f"iter_{n}.safetensors" for n in range(3, failing, 3)][-2:]


def test_a_kill_during_a_background_save_leaves_the_previous_checkpoint_latest(
    tmp_path, monkeypatch
):
    """kill -9 while iter_9 is being written (simulated: the process dies at that write): the pointer
    still names iter_6, which loads; a resume reaches the straight run's parameters bitwise."""
    straight = run(tmp_path / "straight", async_save=False)

    class Killed(BaseException):
        pass

    with monkeypatch.context() as m:
        failing_at(m, "iter_9.safetensors", Killed)
        with pytest.raises(Killed):
            run(tmp_path / "w", async_save=True)
    assert checkpoint.latest(tmp_path / "w") == tmp_path / "w" / "iter_6.safetensors"
    assert files(tmp_path / "w") == ["iter_3.safetensors", "iter_6.safetensors"]  # nothing retired
    done = run(tmp_path / "w", async_save=True, resume=True)
    assert_dicts_equal(done.params, straight.params)


def test_snapshots_copy_keep_aliasing_and_reuse_their_buffers():
    state = fe.train_step(ce_loss, optim.sgd(0.1), fe.ema(0.5)).init(mlp(), seed=0)
    snaps = _background.Snapshots()
    copy, ready = snaps.take(state)
    ready()
    name = next(iter(state.params))
    assert torch.equal(copy.params[name], state.params[name])
    assert copy.params[name] is not state.params[name]
    with torch.no_grad():
        state.params[name].add_(1.0)  # an in-place update after the snapshot
    assert not torch.equal(copy.params[name], state.params[name])
    again, _ = snaps.take(state)
    assert again.params[name].data_ptr() == copy.params[name].data_ptr()  # the buffer is reused
    assert torch.equal(again.params[name], state.params[name])
    ema_w, _ = state.eval_weights()
    ema_c, _ = again.eval_weights()
    shared = [n for n in ema_w if ema_w[n] is state.params.get(n)]
    assert all(ema_c[n] is again.params[n] for n in shared)  # aliasing survives the copy


def test_writer_raises_the_jobs_error_once_and_refuses_a_second_pending_job():
    w = _background.Writer()
    w.submit(lambda: 1 / 0)
    with pytest.raises(RuntimeError, match="still pending"):
        w.submit(lambda: None)
    with pytest.raises(ZeroDivisionError):
        w.wait()
    assert w.wait() is None and not w.pending
    w.submit(lambda: 42)
    assert w.wait() == 42


def test_checkpointer_async_save_must_be_a_bool():
    with pytest.raises(TypeError, match="async_save must be a bool"):
        Checkpointer(1, async_save="yes")


# ----------------------------------------------------------------- the block digests, zlib or ISA-L
CRC32 = {"zlib": zlib.crc32}
try:
    from isal.isal_zlib import crc32 as _isal_crc32

    CRC32["isal"] = _isal_crc32
except ImportError:  # pragma: no cover - the optional fast path
    pass


@pytest.mark.parametrize("impl", ["zlib", "isal"])
def test_block_digests_are_zlibs_crc32_of_each_16_mib_block_whichever_implementation(
    tmp_path, monkeypatch, impl
):
    """Pieces of 1 MiB checksummed next to their write/read give the CRC-32 of each whole 16 MiB
    block, recomputed here with zlib from the file's bytes; a file written with one implementation
    is byte-identical to the other's and loads under either."""
    if impl not in CRC32:
        pytest.skip("isal is not installed (pip install fengine[fast])")
    g = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(2300, 2301), torch.nn.Linear(2301, 3))  # ~21 MB
    state = fe.train_step(lambda m, b: m(b).sum(), optim.sgd(0.1, momentum=0.9)).init(model)
    for t in state.params.values():
        with torch.no_grad():
            t.copy_(torch.rand(t.shape, generator=g))
    files_by = {}
    for name, fn in CRC32.items():
        monkeypatch.setattr(_data, "crc32", fn)
        files_by[name] = checkpoint.save(tmp_path / f"{name}.safetensors", state)
    raw = files_by[impl].read_bytes()
    assert all(p.read_bytes() == raw for p in files_by.values())
    n = int.from_bytes(raw[:8], "little")
    data = raw[8 + n :]
    digest = json.loads(json.loads(raw[8 : 8 + n])["__metadata__"]["fengine.data_digest"])
    block = digest["block_size"]
    assert len(data) > block  # several blocks, tensors straddling them
    assert digest["blocks"] == [
        f"{zlib.crc32(data[i : i + block]):08x}" for i in range(0, len(data), block)
    ]
    for fn in CRC32.values():
        monkeypatch.setattr(_data, "crc32", fn)
        loaded = checkpoint.load(files_by[impl], state)
        assert_dicts_equal(loaded.params, state.params)


@pytest.mark.gpu
def test_async_checkpoints_of_a_cuda_run_are_bitwise_those_of_a_synchronous_one(tmp_path):
    """The snapshot is a non-blocking copy into pinned memory; the writer waits for its event."""

    def cuda_run(work, async_save):
        step = fe.train_step(ce_loss, optim.sgd(0.2, momentum=0.9))
        ck = Checkpointer(2, by_epoch=False, async_save=async_save)
        return fe.fit(step.init(mlp(), seed=0, device="cuda"), step, mlp_batches(5), max_steps=8,
                      handlers=[ck], work_dir=work)  # fmt: skip

    done = cuda_run(tmp_path / "async", True)
    sync = cuda_run(tmp_path / "sync", False)
    assert_dicts_equal(done.params, sync.params)
    for name in files(tmp_path / "sync"):
        a = safetensors.torch.load_file(tmp_path / "async" / name)
        assert_dicts_equal(a, safetensors.torch.load_file(tmp_path / "sync" / name), name)
    snaps = _background.Snapshots()
    copy, ready = snaps.take(done)
    ready()
    first = next(iter(done.params))
    assert copy.params[first].is_pinned() and torch.equal(
        copy.params[first].cuda(), done.params[first]
    )


class _Mixed(torch.nn.Module):
    """Params and buffers of five dtypes, a 0-d and an empty one: the data is not a page multiple."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(33, 17)
        self.register_buffer("counts", torch.arange(5, dtype=torch.int64))
        self.register_buffer("h16", torch.randn(7, 3).half())
        self.register_buffer("flags", torch.tensor([True, False, True]))
        self.register_buffer("scale", torch.tensor(2.5, dtype=torch.float64))
        self.register_buffer("empty", torch.zeros(0, 4))


def _mixed_state():
    return fe.train_step(ce_loss, optim.adamw(1e-3)).init(_Mixed(), seed=0)


def _has_direct_io(directory) -> bool:
    """Whether files in ``directory`` take O_DIRECT (not on tmpfs, say)."""
    fd = os.open(directory / "probe", os.O_WRONLY | os.O_CREAT)
    try:
        return _io.set_direct(fd, True)
    finally:
        os.close(fd)
        os.unlink(directory / "probe")


def _data_section(path):
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return 8 + n, raw[8 + n :]


def test_snapshots_lie_back_to_back_from_a_page_in_the_files_order():
    state = _mixed_state()
    snaps = _background.Snapshots()
    copy, ready = snaps.take(state)
    ready()
    leaves = [t for t in torch.utils._pytree.tree_leaves(copy) if isinstance(t, torch.Tensor)]
    order = sorted(leaves, key=lambda t: -t.element_size())  # checkpoint.save's file order
    order = [t for t in order if t.numel()]  # an empty tensor has no bytes (nor an address)
    assert order[0].data_ptr() % 4096 == 0
    for a, b in zip(order, order[1:]):
        assert b.data_ptr() == a.data_ptr() + a.numel() * a.element_size()
    live = [t for t in torch.utils._pytree.tree_leaves(state) if isinstance(t, torch.Tensor)]
    assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(leaves, live))
    # the same layout reuses the buffer; a state of other shapes gets its own
    again, _ = snaps.take(state)
    assert again.params["lin.weight"].data_ptr() == copy.params["lin.weight"].data_ptr()
    other = fe.train_step(ce_loss, optim.adamw(1e-3)).init(mlp(), seed=0)
    theirs, _ = snaps.take(other)
    assert theirs.params["0.weight"].shape == (32, 16)
    assert torch.equal(theirs.params["0.weight"], other.params["0.weight"])


def test_a_snapshot_is_written_by_direct_io_and_its_data_bytes_are_a_normal_saves(
    tmp_path, monkeypatch
):
    """The snapshot's file: data from a page boundary, sent with O_DIRECT (when the file system has
    it), the last partial page through the page cache; the same data bytes as a synchronous save
    of the live state, read alike by safetensors and checkpoint.load."""
    state = _mixed_state()
    calls = []
    real = _data.set_direct
    monkeypatch.setattr(_data, "set_direct", lambda fd, on: calls.append(on) or real(fd, on))
    copy, ready = _background.Snapshots().take(state)
    ready()
    checkpoint.save(tmp_path / "snap.safetensors", copy)
    # direct I/O asked for, and (where this file system has it) switched off after its writes
    assert calls == ([True, False] if _has_direct_io(tmp_path) else [True])
    checkpoint.save(tmp_path / "live.safetensors", state)
    assert calls[2:] == []  # the live state's tensors are scattered: the page-cache path
    start, data = _data_section(tmp_path / "snap.safetensors")
    assert start % 4096 == 0 and len(data) % 4096 != 0
    live_start, live_data = _data_section(tmp_path / "live.safetensors")
    assert live_start % 4096 != 0 and data == live_data
    a = safetensors.torch.load_file(tmp_path / "snap.safetensors")
    assert_dicts_equal(a, safetensors.torch.load_file(tmp_path / "live.safetensors"))
    back = checkpoint.load(tmp_path / "snap.safetensors", _mixed_state())
    assert_dicts_equal(back.params, state.params)
    assert_dicts_equal(back.buffers, state.buffers)


def _snapshot_saved_as_the_live_state(tmp_path):
    """A snapshot's file has a synchronous save's data bytes and loads back as the state."""
    state = _mixed_state()
    copy, ready = _background.Snapshots().take(state)
    ready()
    checkpoint.save(tmp_path / "snap.safetensors", copy)
    checkpoint.save(tmp_path / "live.safetensors", state)
    snap, live = (_data_section(tmp_path / f"{n}.safetensors")[1] for n in ("snap", "live"))
    assert snap == live
    back = checkpoint.load(tmp_path / "snap.safetensors", _mixed_state())
    assert_dicts_equal(back.params, state.params)
    assert_dicts_equal(back.buffers, state.buffers)


def test_without_direct_io_a_snapshot_goes_through_the_page_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(_data, "set_direct", lambda fd, on: False)  # e.g. tmpfs
    _snapshot_saved_as_the_live_state(tmp_path)


def test_a_full_disk_during_a_direct_write_leaves_nothing(tmp_path, monkeypatch):
    state = _mixed_state()
    copy, ready = _background.Snapshots().take(state)
    ready()
    checkpoint.save(tmp_path / "old.safetensors", state)

    def no_space(fd, data, offset):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint, "_pwrite_all", no_space)
    with pytest.raises(OSError) as e:
        checkpoint.save(tmp_path / "new.safetensors", copy)
    assert e.value.errno == errno.ENOSPC
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.safetensors"]


def test_a_file_system_refusing_direct_writes_gets_the_page_cache_path(tmp_path, monkeypatch):
    """O_DIRECT accepted by fcntl but a write refused (EINVAL): the save goes on through the page
    cache, the same bytes, instead of failing the run."""
    real = checkpoint._pwrite_all

    def refuse_direct(fd, data, offset):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return real(fd, data, offset)

    monkeypatch.setattr(checkpoint, "_pwrite_all", refuse_direct)
    _snapshot_saved_as_the_live_state(tmp_path)


@pytest.mark.gpu
def test_a_cuda_states_snapshot_is_pinned_page_aligned_and_back_to_back():
    state = fe.train_step(ce_loss, optim.adamw(1e-3)).init(mlp().cuda(), seed=0)
    copy, ready = _background.Snapshots().take(state)
    ready()
    leaves = [t for t in torch.utils._pytree.tree_leaves(copy) if isinstance(t, torch.Tensor)]
    order = [t for t in sorted(leaves, key=lambda t: -t.element_size()) if t.numel()]
    assert all(t.is_pinned() for t in order) and order[0].data_ptr() % 4096 == 0
    for a, b in zip(order, order[1:]):
        assert b.data_ptr() == a.data_ptr() + a.numel() * a.element_size()
    assert torch.equal(copy.params["0.weight"], state.params["0.weight"].cpu())
