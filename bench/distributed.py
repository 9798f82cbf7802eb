"""Data parallel: fengine's `data_parallel` vs torch's DistributedDataParallel, and 2 processes vs 1.

Run as a plain script: it launches itself under ``torch.distributed.run`` with 2 CPU processes
(gloo, 1 thread each), where each rank times fengine's step (`fe.data_parallel()`, bucketed
all-reduce) and a hand-written DDP + ``torch.optim.AdamW(foreach=True)`` loop on the same
model and per-rank batches, interleaved in rounds (median); final params are checked
bitwise equal. The parent then times 1 process on the same total work (2 per-rank batches
concatenated per step). Last line: ``ratio X.XX`` (fengine / DDP steps per second).

    python bench/distributed.py [--steps 300] [--rounds 5]   (smoke: --steps 5 --rounds 1)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
    )


def batches(n: int, rank: int, world: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        xs = torch.randn(world, 64, 64, generator=g)
        ys = torch.randint(0, 10, (world, 64), generator=g)
        out.append((xs[rank], ys[rank]) if world > 1 else (xs.reshape(-1, 64), ys.reshape(-1)))
    return out


def loss_fn(model: nn.Module, batch) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


def run_fengine(data) -> tuple[float, dict]:
    import fengine as fe

    wrappers = [fe.data_parallel()] if fe.distributed.world_size() > 1 else []
    step = fe.train_step(loss_fn, fe.optim.adamw(1e-3), *wrappers)
    state = step.init(make_model())
    t0 = time.perf_counter()
    for b in data:
        state, _ = step(state, b)
    return time.perf_counter() - t0, state.params


def run_ddp(data) -> tuple[float, dict]:
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = DDP(make_model())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
    t0 = time.perf_counter()
    for x, y in data:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return time.perf_counter() - t0, {n: p.detach() for n, p in model.module.named_parameters()}


def worker(steps: int, rounds: int, out: str) -> None:
    import torch.distributed as dist

    import fengine as fe

    torch.set_num_threads(1)
    info = fe.distributed.setup("cpu")
    data = batches(steps, info.rank, info.world_size)
    run_fengine(data[:3]), run_ddp(data[:3])  # warm-up
    ours, ref = [], []
    for _ in range(rounds):
        dist.barrier()
        t, fe_params = run_fengine(data)
        ours.append(t)
        dist.barrier()
        t, ddp_params = run_ddp(data)
        ref.append(t)
    same = all(torch.equal(fe_params[n], ddp_params[n]) for n in fe_params)
    if info.rank == 0:
        Path(out).write_text(
            json.dumps({"fe": statistics.median(ours), "ddp": statistics.median(ref), "same": same})
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker is not None:
        worker(args.steps, args.rounds, args.worker)
        return
    with tempfile.TemporaryDirectory() as d:
        result = Path(d) / "result.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
               "--steps", str(args.steps), "--rounds", str(args.rounds), "--worker", str(result)]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parent.parent),
                                                            os.environ.get("PYTHONPATH", "")])}  # fmt: skip
        subprocess.run(cmd, check=True, env=env, capture_output=True)
        two = json.loads(result.read_text())
    data = batches(args.steps, 0, 1)
    one = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        run_fengine(data[:3])
        one[threads] = statistics.median(run_fengine(data)[0] for _ in range(args.rounds))
    rate = lambda t: args.steps / t  # noqa: E731
    print(
        f"torch {torch.__version__}, {args.steps} steps x {args.rounds} rounds (median); global batch 128"
    )
    print(f"1 process x 1 thread, fengine:          {rate(one[1]):8.1f} steps/s")
    print(f"1 process x 2 threads, fengine:         {rate(one[2]):8.1f} steps/s")
    print(f"2 processes x 1 thread, fengine:        {rate(two['fe']):8.1f} steps/s (data_parallel)")
    print(
        f"2 processes x 1 thread, DDP:            {rate(two['ddp']):8.1f} steps/s; final params bitwise equal: {two['same']}"
    )
    print(f"2 processes vs 1 (1 thread each): {one[1] / two['fe']:.2f}")
    print(f"ratio {two['ddp'] / two['fe']:.2f}")


if __name__ == "__main__":
    main()
