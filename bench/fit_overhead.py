"""Loop overhead: `fengine.fit` with the default handlers vs a hand-written torch loop.

Same tiny MLP and AdamW as bench/step_overhead.py, same initial weights and
batches, interleaved in rounds. fengine runs `fit` with Timer + Logger(interval=50)
and no checkpoints (MMEngine's Runner measured 0.69x and Lightning 0.26x of the
hand-written loop on this work). Last line: ``ratio X.XX`` (fengine / hand-written).

    python bench/fit_overhead.py [--epochs 4] [--batches 500] [--rounds 5]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

import torch
from step_overhead import make_batches, make_model
from torch.nn import functional as F

import fengine as fe


def hand_written(batches, epochs: int) -> float:
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
    t0 = time.perf_counter()
    for _ in range(epochs):
        for x, y in batches:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
    return time.perf_counter() - t0


def with_fit(batches, epochs: int) -> float:
    tx = fe.optim.adamw(lr=1e-3)
    state = fe.TrainState.create(make_model(), tx)
    step = fe.train_step(lambda model, b: F.cross_entropy(model(b[0]), b[1]), tx)
    timer = fe.handlers.Timer()
    handlers = [timer, fe.handlers.Logger(interval=50, timer=timer)]
    t0 = time.perf_counter()
    fe.fit(state, step, batches, max_epochs=epochs, handlers=handlers)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batches", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("fengine").setLevel(logging.WARNING)  # measure the work, not the terminal
    batches = make_batches(args.batches)
    hand_written(batches[:50], 1), with_fit(batches[:50], 1)
    ref, ours = [], []
    for _ in range(args.rounds):
        ref.append(hand_written(batches, args.epochs))
        ours.append(with_fit(batches, args.epochs))
    steps = args.epochs * args.batches
    ref_rate, our_rate = steps / statistics.median(ref), steps / statistics.median(ours)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {steps} steps x {args.rounds} rounds (median)"
    )
    print(f"hand-written loop (AdamW foreach):            {ref_rate:8.1f} steps/s")
    print(f"fengine.fit + Timer + Logger(interval=50):    {our_rate:8.1f} steps/s")
    print(f"ratio {our_rate / ref_rate:.2f}")


if __name__ == "__main__":
    main()
