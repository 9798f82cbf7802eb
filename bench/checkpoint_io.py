"""Checkpoint I/O: fengine.checkpoint vs torch.save / torch.load on a ~1 GB training state.

The state is a few big Linear layers with AdamW moments (params + exp_avg +
exp_avg_sq, float32). Both sides write to and read from the same temp dir.
Load is timed warm: each loader runs once untimed, then the timed runs.
Runs of fengine and torch alternate and the median of each is reported (this
machine's I/O is noisy).
fengine's save includes what makes it safe (temp file, fsync, rename, directory
fsync, CRC-32 of every 16 MiB block); its load includes the structure check
against the template and the digest check. torch.save does not fsync; the
line "torch.save + fsync" shows that cost for comparison.

Run: python bench/checkpoint_io.py [--gb 1.0]   (smoke test: --gb 0.002 --repeats 1)
The last line is ``ratio save X.XX load Y.YY`` (fengine throughput / torch throughput).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
import torch.utils._pytree as pytree
from torch import nn

import fengine
from fengine import checkpoint


def build_state(gb: float) -> fengine.TrainState:
    # 3 float32 copies (params, exp_avg, exp_avg_sq) of 4 Linear(d, d) layers
    d = int((gb * 1e9 / (3 * 4 * 4)) ** 0.5)
    model = nn.Sequential(*[nn.Linear(d, d) for _ in range(4)])
    state = fengine.train_step(lambda m, b: m(b).sum(), fengine.optim.adamw(1e-3)).init(model)
    g = torch.Generator().manual_seed(0)
    for group in (state.params, state.opt_state.exp_avg, state.opt_state.exp_avg_sq):
        for t in group.values():
            with torch.no_grad():
                t.copy_(torch.rand(t.shape, generator=g))
    return state.replace(step=1000)


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


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--gb", type=float, default=1.0, help="approximate state size in GB")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs of each (median reported)")
    ap.add_argument("--dir", default=None, help="directory for the files (default: a temp dir)")
    args = ap.parse_args()

    state = build_state(args.gb)
    size = nbytes(state)
    torch_obj = {
        "params": state.params,
        "buffers": state.buffers,
        "opt_state": state.opt_state._asdict(),
        "step": state.step,
    }
    print(
        f"state: {size / 1e9:.3f} GB in {len(tensors(state))} tensors; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cpus; "
        f"median of {args.repeats} saves / {max(args.repeats, 5)} loads"
    )
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        fe_path = os.path.join(d, "state.safetensors")
        pt_path = os.path.join(d, "state.pt")

        # save: a warm-up write of each (allocates the files), then timed runs, interleaved so
        # that drifting machine conditions (page cache, background writeback) hit both sides alike
        checkpoint.save(fe_path, state)
        torch.save(torch_obj, pt_path)
        fsync_file(pt_path)
        runs: dict[str, list[float]] = {
            k: []
            for k in ("fe_save", "fe_save_nosync", "pt_save", "pt_save_sync", "fe_load", "pt_load")
        }
        for _ in range(args.repeats):
            runs["fe_save"].append(timed(lambda: checkpoint.save(fe_path, state))[0])
            runs["pt_save"].append(timed(lambda: torch.save(torch_obj, pt_path))[0])
            fsync_file(pt_path)  # untimed: flush it so the next run starts clean
            runs["fe_save_nosync"].append(
                timed(lambda: checkpoint.save(fe_path, state, fsync=False))[0]
            )
            fsync_file(fe_path)
            runs["pt_save_sync"].append(
                timed(lambda: (torch.save(torch_obj, pt_path), fsync_file(pt_path)))[0]
            )

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
    med = {k: statistics.median(v) for k, v in runs.items()}
    t_fe_save, t_fe_save_nosync, t_pt_save, t_pt_save_sync, t_fe_load, t_pt_load = (
        med[k]
        for k in ("fe_save", "fe_save_nosync", "pt_save", "pt_save_sync", "fe_load", "pt_load")
    )

    gbps = lambda t: size / t / 1e9  # noqa: E731
    print(
        f"fengine.checkpoint.save          {t_fe_save:6.3f} s  {gbps(t_fe_save):6.2f} GB/s  (temp file, fsync, rename, dir fsync; CRC-32 blocks)"
    )
    print(
        f"fengine.checkpoint.save no fsync {t_fe_save_nosync:6.3f} s  {gbps(t_fe_save_nosync):6.2f} GB/s  (fsync=False: atomic against process kills only)"
    )
    print(
        f"torch.save                       {t_pt_save:6.3f} s  {gbps(t_pt_save):6.2f} GB/s  (no fsync)"
    )
    print(
        f"torch.save + fsync               {t_pt_save_sync:6.3f} s  {gbps(t_pt_save_sync):6.2f} GB/s"
    )
    print(
        f"fengine.checkpoint.load          {t_fe_load:6.3f} s  {gbps(t_fe_load):6.2f} GB/s  (structure and CRC-32 checked; bitwise equal: {ok})"
    )
    print(f"torch.load                       {t_pt_load:6.3f} s  {gbps(t_pt_load):6.2f} GB/s")
    print(f"ratio save {t_pt_save / t_fe_save:.2f} load {t_pt_load / t_fe_load:.2f}")


if __name__ == "__main__":
    main()
