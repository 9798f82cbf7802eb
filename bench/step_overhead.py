"""Framework overhead of one training step: fengine vs a hand-written torch loop.

Tiny MLP (64-128-10), batch 64, AdamW(lr=1e-3): the work is so small that what
is measured is the per-step overhead of each approach. Both run in this process
on the same initial weights and batches, interleaved in rounds to share the
machine's noise; the last line is ``ratio X.XX`` (fengine steps/s over the
hand-written loop's, higher is better).

    python bench/step_overhead.py [--steps 2000] [--rounds 5] [--threads 2]   (smoke: --steps 20 --rounds 1)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn
from torch.nn import functional as F

import fengine as fe


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


def make_batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(64, 64, generator=g), torch.randint(0, 10, (64,), generator=g))
        for _ in range(n)
    ]


def hand_written(batches) -> tuple[float, nn.Module]:
    model = make_model().to(batches[0][0].device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
    t0 = time.perf_counter()
    for x, y in batches:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return time.perf_counter() - t0, model


def functional(batches) -> tuple[float, fe.TrainState]:
    step = fe.train_step(
        lambda model, b: F.cross_entropy(model(b[0]), b[1]), fe.optim.adamw(lr=1e-3)
    )
    state = step.init(make_model(), device=batches[0][0].device)
    t0 = time.perf_counter()
    for batch in batches:
        state, _ = step(state, batch)
    return time.perf_counter() - t0, state


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--device", default="cpu", help="cpu or cuda (batches are placed there up front)"
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    batches = [(x.to(args.device), y.to(args.device)) for x, y in make_batches(args.steps)]
    hand_written(batches[:100]), functional(batches[:100])  # warm-up
    ref_times, fe_times = [], []
    for _ in range(args.rounds):
        t, ref_model = hand_written(batches)
        ref_times.append(t)
        t, state = functional(batches)
        fe_times.append(t)
    ref_rate = args.steps / statistics.median(ref_times)
    fe_rate = args.steps / statistics.median(fe_times)
    same = all(torch.equal(state.params[n], p.detach()) for n, p in ref_model.named_parameters())
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.steps} steps x {args.rounds} rounds (median)"
    )
    print(f"hand-written loop (AdamW foreach): {ref_rate:8.1f} steps/s")
    print(f"fengine train_step (adamw):        {fe_rate:8.1f} steps/s")
    print(f"final params bitwise equal: {same}")
    print(f"ratio {fe_rate / ref_rate:.2f}")


if __name__ == "__main__":
    main()
