"""Checkpoint I/O on a ~1 GB training state: against the disk, torch.save / torch.load, and in a run.

The state is a few big Linear layers with AdamW moments (params + exp_avg +
exp_avg_sq, float32). Everything writes to and reads from the same directory.

* **save** vs a dd-like write of the same number of bytes (16 MiB ``write``s from
  memory, then ``fdatasync``, i.e. ``dd bs=16M conv=fdatasync``): the disk's durable
  write speed, measured in the same run; and vs ``torch.save`` (which does not fsync).
  fengine's save includes what makes it safe: preallocation, temp file, CRC-32 of every
  16 MiB block, fsync, rename, directory fsync.
* **load** vs ``torch.load``, warm page cache (each runs once untimed first); fengine's
  load includes the structure check against the template and every block's CRC-32. Twice:
  repeated in this process, and once in a fresh process each (there every destination page
  is faulted in for the first time, which costs more than the copy). And as ``fit``'s resume
  loads: ``load(..., into=True)`` in a fresh process, reading into the tensors of the state
  the process built (no fresh pages, no second copy of the state), vs ``torch.load`` there
  (which a torch resume follows with ``load_state_dict``'s copies: not counted).
* **checksum**: the CRC-32 alone, on one core (ISA-L's when ``isal`` is installed).
* **async stall**: ``fit`` trains the state with AdamW on a tiny batch, saving every
  ``--every`` steps with ``Checkpointer`` (``max_keep_ckpts=1``), synchronously or with
  ``async_save=True``; training time lost per save = the time of the few updates after
  each save minus as many times the median update just before it (`lost_per_save`), and
  its ratio to a synchronous save's time (target <= 0.10).

Runs alternate and the median of each is reported (this machine's I/O is noisy).

Run: python bench/checkpoint_io.py [--gb 1.0]   (smoke test: --gb 0.002 --repeats 1 --steps 5 --every 2)
The last line is ``ratio save X.XX load Y.YY``: save throughput / the dd-like write's
(target >= 0.8), load throughput as a resume / torch.load's in a fresh process (target >= 2).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zlib

import torch
import torch.utils._pytree as pytree
from torch import nn

import fengine
from fengine import checkpoint, loop
from fengine.checkpoint import _data
from fengine.handlers import Checkpointer


def build_state(gb: float, device: str = "cpu") -> tuple[fengine.TrainState, fengine.Step]:
    # 3 float32 copies (params, exp_avg, exp_avg_sq) of 4 Linear(d, d) layers
    d = int((gb * 1e9 / (3 * 4 * 4)) ** 0.5)
    model = nn.Sequential(*[nn.Linear(d, d) for _ in range(4)]).to(device)
    step = fengine.train_step(lambda m, b: m(b).square().mean(), fengine.optim.adamw(1e-3))
    state = step.init(model)
    g = torch.Generator().manual_seed(0)
    for group in (state.params, state.opt_state.exp_avg, state.opt_state.exp_avg_sq):
        for t in group.values():
            with torch.no_grad():
                t.copy_(torch.rand(t.shape, generator=g))
    return state.replace(step=1000), step


def tensors(state: fengine.TrainState) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(state) if isinstance(t, torch.Tensor)]


def nbytes(state: fengine.TrainState) -> int:
    return sum(t.numel() * t.element_size() for t in tensors(state))


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


def dd_like(path: str, data: memoryview) -> None:
    """``dd bs=16M conv=fdatasync``: write ``data`` in 16 MiB pieces to a truncated file, then fdatasync."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for i in range(0, len(data), 16 << 20):
            piece = data[i : i + (16 << 20)]
            done = 0
            while done < len(piece):
                done += os.write(fd, piece[done:])
        os.fdatasync(fd)
    finally:
        os.close(fd)


def checksum_speed(state: fengine.TrainState) -> tuple[str, float]:
    """(which CRC-32, GB/s on one core) over the state's bytes, up to 256 MiB."""
    t = max(tensors(state), key=lambda x: x.numel())
    data = memoryview(t.reshape(-1).view(torch.uint8).numpy())[: 256 << 20]
    crc = _data.crc32
    crc(data, 0)  # warm
    dt, _ = timed(lambda: crc(data, 0))
    name = "zlib" if crc is zlib.crc32 else f"{crc.__module__}"
    return name, len(data) / dt / 1e9


class Blocked:
    """Seconds the training thread spends in the background saves' hand-off (snapshot copy) and
    waiting for a pending one: `fengine.loop._Background.flush` / `collect`, timed."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.real = {n: getattr(loop._Background, n) for n in ("flush", "collect")}
        for name, fn in self.real.items():
            setattr(loop._Background, name, self._timed(fn))

    def _timed(self, fn):
        def call(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.seconds += time.perf_counter() - t0

        return call

    def restore(self) -> None:
        for name, fn in self.real.items():
            setattr(loop._Background, name, fn)


def train(state, step, steps: int, work: str | None, every: int, async_save: bool) -> list[float]:
    """Seconds of each of ``steps`` updates of ``fit`` (from one update's end to the next's, so a
    save's hand-off and the writer's competition land in the updates they delay), saving every
    ``every`` updates (no saves without ``work``)."""
    weight = state.params["0.weight"]
    batch = torch.ones(1, weight.shape[1], device=weight.device)
    cuda = weight.device.type == "cuda"
    marks: list[float] = []

    class Clock(fengine.handlers.Handler):
        def on_after_train_iter(self, snap) -> None:
            if cuda:  # the update's kernels are done: durations are the updates'
                torch.cuda.synchronize()
            marks.append(time.perf_counter())

    handlers: list = [Clock()]
    if work is not None:
        shutil.rmtree(work, ignore_errors=True)
        handlers.append(Checkpointer(every, by_epoch=False, max_keep_ckpts=1, save_last=False,
                                     async_save=async_save))  # fmt: skip
    fresh = state.replace(step=0).clone()  # fit consumes the state it is given
    t0 = time.perf_counter()
    fengine.fit(fresh, step, [batch] * steps, max_steps=steps, handlers=handlers, work_dir=work)
    return [b - a for a, b in zip([t0, *marks], marks)]


def lost_per_save(durations: list[float], every: int) -> list[float]:
    """Seconds each save cost the run: the n = min(4, every // 2) updates from the one a save's
    hand-off delays (a save at update ``s`` is flushed at its end, inside update ``s + 1``'s time)
    minus n times the median of the n updates before. A local baseline: this VM's update time
    drifts by up to 2x within a run, more than a save costs, so runs with and without saves
    cannot be compared. Saves too close to the end for a full window are not counted."""
    n = max(1, min(4, every // 2))
    out = []
    for s in range(every, len(durations) - n + 1, every):  # update s (1-based) saved
        window, before = durations[s : s + n], durations[s - n : s]
        out.append(sum(window) - n * statistics.median(before))
    return out


def fresh_load(kind: str, path: str, gb: float) -> float:
    """Seconds of one ``checkpoint.load`` (kind "fe"; "fe_into": into the template's tensors, as
    fit's resume) or ``torch.load`` ("pt") of ``path`` in a fresh process (the template is built
    there first, untimed)."""
    done = subprocess.run(
        [sys.executable, __file__, "--gb", str(gb), "--fresh-load", kind, path],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return float(done.stdout.split()[-1])


def _fresh_load_here(kind: str, path: str, gb: float) -> None:
    state, _ = build_state(gb)  # for both kinds: the same memory history before the load
    t0 = time.perf_counter()
    if kind == "pt":
        out = torch.load(path)
    else:
        out = checkpoint.load(path, state, into=kind == "fe_into")
    print(time.perf_counter() - t0)
    del out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--gb", type=float, default=1.0, help="approximate state size in GB")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs of each (median reported)")
    ap.add_argument("--dir", default=None, help="directory for the files (default: a temp dir)")
    ap.add_argument(
        "--steps", type=int, default=29, help="updates of each run of the async-stall rows"
    )
    ap.add_argument(
        "--every",
        type=int,
        default=8,
        help="a checkpoint every N updates there (give the write time to finish)",
    )
    ap.add_argument(
        "--device", default="cpu", help="where the async-stall rows train (cpu, cuda, cuda:N)"
    )
    ap.add_argument("--fresh-load", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    logging.getLogger("fengine").setLevel(logging.WARNING)
    if args.fresh_load:
        return _fresh_load_here(*args.fresh_load, args.gb)

    state, step = build_state(args.gb)
    size = nbytes(state)
    torch_obj = {
        "params": state.params,
        "buffers": state.buffers,
        "opt_state": state.opt_state._asdict(),
        "step": state.step,
    }
    crc_name, crc_gbps = checksum_speed(state)
    print(
        f"state: {size / 1e9:.3f} GB in {len(tensors(state))} tensors; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cpus; "
        f"median of {args.repeats} saves / {max(args.repeats, 5)} loads / "
        f"{args.repeats} fresh-process loads"
    )
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        fe_path = os.path.join(d, "state.safetensors")
        pt_path = os.path.join(d, "state.pt")
        dd_path = os.path.join(d, "dd.bin")

        # save: a warm-up write of each (allocates the files), then timed runs, interleaved so
        # that drifting machine conditions (page cache, background writeback) hit all alike
        checkpoint.save(fe_path, state)
        file_size = os.path.getsize(fe_path)
        dd_data = memoryview(bytearray(os.urandom(1 << 20)) * ((file_size >> 20) + 1))[:file_size]
        dd_like(dd_path, dd_data)
        torch.save(torch_obj, pt_path)
        fsync_file(pt_path)
        names = ("fe_save", "dd", "fe_save_nosync", "pt_save", "pt_save_sync", "fe_load", "pt_load",
                 "fe_load_fresh", "pt_load_fresh", "fe_load_into")  # fmt: skip
        runs: dict[str, list[float]] = {k: [] for k in names}
        for _ in range(args.repeats):
            runs["fe_save"].append(timed(lambda: checkpoint.save(fe_path, state))[0])
            runs["dd"].append(timed(lambda: dd_like(dd_path, dd_data))[0])
            runs["pt_save"].append(timed(lambda: torch.save(torch_obj, pt_path))[0])
            fsync_file(pt_path)  # untimed: flush it so the next run starts clean
            runs["fe_save_nosync"].append(
                timed(lambda: checkpoint.save(fe_path, state, fsync=False))[0]
            )
            fsync_file(fe_path)
            runs["pt_save_sync"].append(
                timed(lambda: (torch.save(torch_obj, pt_path), fsync_file(pt_path)))[0]
            )
        os.unlink(dd_path)

        # load, warm cache: one untimed run of each, then timed runs, interleaved
        like = state
        loaded = checkpoint.load(fe_path, like)
        ok = all(torch.equal(a, b) for a, b in zip(tensors(loaded), tensors(state)))
        del loaded
        torch.load(pt_path)
        for _ in range(max(args.repeats, 5)):
            t, out = timed(lambda: checkpoint.load(fe_path, like))
            del out
            runs["fe_load"].append(t)
            t, out = timed(lambda: torch.load(pt_path))
            del out
            runs["pt_load"].append(t)
        for _ in range(args.repeats):  # a resume: one load in a fresh process
            runs["fe_load_fresh"].append(fresh_load("fe", fe_path, args.gb))
            runs["pt_load_fresh"].append(fresh_load("pt", pt_path, args.gb))
            runs["fe_load_into"].append(fresh_load("fe_into", fe_path, args.gb))
        os.unlink(pt_path)
        os.unlink(fe_path)

        # a run that saves: time lost per save, synchronous vs asynchronous
        work = os.path.join(d, "run")
        # these rows train on the device (the rows above read and write the CPU state)
        if args.device != "cpu":
            state, step = build_state(args.gb, args.device)
        lost: dict[str, list[float]] = {"sync": [], "async": [], "blocked": []}
        train(state, step, 2, None, args.every, False)  # warm-up
        for _ in range(args.repeats):
            lost["sync"] += lost_per_save(
                train(state, step, args.steps, work, args.every, False), args.every
            )
            blocked = Blocked()
            try:
                durations = train(state, step, args.steps, work, args.every, True)
            finally:
                blocked.restore()
            lost["async"] += lost_per_save(durations, args.every)
            lost["blocked"].append(blocked.seconds / max((args.steps - 1) // args.every, 1))
    med = {k: statistics.median(v) for k, v in runs.items()}
    lost_sync, lost_async, blocked = (
        statistics.median(lost[k]) for k in ("sync", "async", "blocked")
    )

    gbps = lambda t: size / t / 1e9  # noqa: E731
    rows = [
        ("fengine.checkpoint.save", med["fe_save"], "temp file, CRC-32 blocks, fsync, rename, dir fsync"),
        ("dd-like write + fdatasync", med["dd"], f"{file_size / 1e9:.3f} GB, the disk's durable write speed"),
        ("fengine.checkpoint.save no fsync", med["fe_save_nosync"], "fsync=False: atomic against process kills only"),
        ("torch.save", med["pt_save"], "no fsync"),
        ("torch.save + fsync", med["pt_save_sync"], ""),
        ("fengine.checkpoint.load", med["fe_load"], f"structure and CRC-32 checked; bitwise equal: {ok}"),
        ("torch.load", med["pt_load"], ""),
        ("fengine.checkpoint.load, fresh", med["fe_load_fresh"], "once in a fresh process, into new tensors"),
        ("fengine load into=True, fresh", med["fe_load_into"], "once in a fresh process, into the state's tensors: fit's resume"),
        ("torch.load, fresh", med["pt_load_fresh"], "once in a fresh process"),
    ]  # fmt: skip
    for name, t, note in rows:
        print(f"{name:34s} {t:6.3f} s  {gbps(t):6.2f} GB/s  {f'({note})' if note else ''}")
    print(f"checksum CRC-32 ({crc_name}), one core   {crc_gbps:6.2f} GB/s")
    print(
        f"sync stall   {lost_sync:6.3f} s lost per save in fit (median of {len(lost['sync'])} saves, "
        f"every {args.every} updates; each: the updates it delays minus as many of those before)"
    )
    print(
        f"async stall  {lost_async:6.3f} s lost per save in fit = "
        f"{lost_async / med['fe_save']:.2f} of a synchronous save's {med['fe_save']:.3f} s (target <= 0.10), "
        f"{lost_async / lost_sync if lost_sync > 0 else float('nan'):.2f} of a synchronous save's loss in fit"
    )
    print(
        f"async block  {blocked:6.3f} s per save on the training thread (snapshot copy, waits) = "
        f"{blocked / med['fe_save']:.2f} of a synchronous save; the rest of the stall is the "
        "writer's work (CRC, direct I/O) competing with training for the cores and memory"
    )
    print(f"ratio save / dd-like write  {med['dd'] / med['fe_save']:.2f}  (target >= 0.8)")
    print(f"ratio save / torch.save     {med['pt_save'] / med['fe_save']:.2f}")
    print(
        f"ratio load / torch.load     {med['pt_load'] / med['fe_load']:.2f}  (repeated in one process)"
    )
    fresh = med["pt_load_fresh"] / med["fe_load_fresh"]
    print(f"ratio load / torch.load     {fresh:.2f}  (once in a fresh process, into new tensors)")
    resume = med["pt_load_fresh"] / med["fe_load_into"]
    print(
        f"ratio load / torch.load     {resume:.2f}  (once in a fresh process, as fit's resume; target >= 2)"
    )
    print(f"ratio save {med['dd'] / med['fe_save']:.2f} load {resume:.2f}")


if __name__ == "__main__":
    main()
