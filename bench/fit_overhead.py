"""Loop overhead: `fengine.fit` with Timer + Logger vs a hand-written torch loop, two ways.

Same tiny MLP and AdamW as bench/step_overhead.py, same initial weights, interleaved
in rounds (median). Each pair trains on the same batches in the same order:

* ``list``: a Python list of batches (the framework's own cost, nothing else);
* ``DataLoader``: one ``torch.utils.data.DataLoader`` (TensorDataset, shuffled by a
  seeded generator) per run, the loader most users have.

Final params are checked bitwise equal between fengine and the hand-written loop.
MMEngine's Runner measured 0.64-0.69x and Lightning 0.26-0.53x of the hand-written
loop on this work. The last line is ``ratio X.XX`` (fengine / hand-written over the
DataLoader); the line before gives the list ratio.

``--breakdown`` adds where fit's time over the bare step goes: the eager step in a plain
loop, then `fit` with no handlers, with a Timer, with a Logger that never prints a line, and
with the default Timer + Logger (lines every 10 updates, not shown), in microseconds per
update over the list (one process, interleaved rounds, median).

    python bench/fit_overhead.py [--epochs 4] [--batches 500] [--rounds 5] [--breakdown]   (smoke: --epochs 1 --batches 20 --rounds 1)
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from collections.abc import Callable, Iterable

import torch
from step_overhead import make_batches, make_model
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import fengine as fe


def hand_written(data: Callable[[], Iterable], epochs: int) -> tuple[float, nn.Module]:
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
    batches = data()
    t0 = time.perf_counter()
    for _ in range(epochs):
        for x, y in batches:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
    return time.perf_counter() - t0, model


def with_fit(data: Callable[[], Iterable], epochs: int) -> tuple[float, fe.TrainState]:
    step = fe.train_step(
        lambda model, b: F.cross_entropy(model(b[0]), b[1]), fe.optim.adamw(lr=1e-3)
    )
    state = step.init(make_model())
    timer = fe.handlers.Timer()
    handlers = [timer, fe.handlers.Logger(interval=50, timer=timer)]
    batches = data()
    t0 = time.perf_counter()
    state = fe.fit(state, step, batches, max_epochs=epochs, handlers=handlers)  # type: ignore[arg-type]
    return time.perf_counter() - t0, state


def breakdown(batches: list, rounds: int) -> None:
    """Per-update microseconds of the step alone and inside `fit` with more and more handlers."""
    step = fe.train_step(
        lambda model, b: F.cross_entropy(model(b[0]), b[1]), fe.optim.adamw(lr=1e-3)
    )
    configs: dict[str, Callable[[], list] | None] = {
        "step in a plain loop": None,
        "fit, no handlers": list,
        "fit + Timer": lambda: [fe.handlers.Timer()],
        "fit + Logger, no lines": lambda: [fe.handlers.Logger(timer=False, interval=10**9)],
        "fit + Timer + Logger": fe.handlers.default_handlers,
    }
    times: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(rounds):
        for name, handlers in configs.items():
            state = step.init(make_model())
            t0 = time.perf_counter()
            if handlers is None:
                for batch in batches:
                    state, _ = step(state, batch)
            else:
                fe.fit(state, step, batches, max_steps=len(batches), handlers=handlers())
            times[name].append((time.perf_counter() - t0) / len(batches) * 1e6)
    base = statistics.median(times["step in a plain loop"])
    for name, ts in times.items():
        us = statistics.median(ts)
        print(f"{name:>24}: {us:7.1f} us/update  (+{us - base:5.1f})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batches", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--breakdown",
        action="store_true",
        help="also: fit's cost over the step, handler by handler",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("fengine").setLevel(logging.WARNING)  # measure the work, not the terminal
    batches = make_batches(args.batches)
    xs, ys = torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])

    def as_list() -> Iterable:
        return batches

    def as_loader() -> Iterable:  # each run: a fresh loader whose shuffles follow the same seed
        return DataLoader(
            TensorDataset(xs, ys),
            batch_size=64,
            shuffle=True,
            generator=torch.Generator().manual_seed(0),
        )

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{args.epochs * args.batches} steps x {args.rounds} rounds (median)"
    )
    ratios = {}
    for name, data in (("list", as_list), ("DataLoader", as_loader)):
        hand_written(data, 1), with_fit(data, 1)  # warm-up
        ref, ours = [], []
        for _ in range(args.rounds):
            t, model = hand_written(data, args.epochs)
            ref.append(t)
            t, state = with_fit(data, args.epochs)
            ours.append(t)
        same = all(torch.equal(state.params[n], p.detach()) for n, p in model.named_parameters())
        steps = args.epochs * args.batches
        ref_rate, our_rate = steps / statistics.median(ref), steps / statistics.median(ours)
        ratios[name] = our_rate / ref_rate
        print(f"{name:>10}: hand-written {ref_rate:8.1f} steps/s, fengine.fit + Timer + Logger {our_rate:8.1f} steps/s, "
              f"final params bitwise equal: {same}")  # fmt: skip
    if args.breakdown:
        breakdown(batches, args.rounds)
    print(f"ratio over a list {ratios['list']:.2f}")
    print(f"ratio {ratios['DataLoader']:.2f}")


if __name__ == "__main__":
    main()
