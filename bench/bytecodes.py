"""Python per update, counted: bytecodes the interpreter runs per update of the tiny MLP.

Timings on a shared machine swing by tens of percent; the Python an update runs does not.
On a small model that Python decides the speed (it also evicts the step's caches), so this
counts it exactly with ``sys.settrace`` opcode events, for the hand-written
``torch.optim.AdamW(foreach=True)`` loop, fengine's eager step in a plain loop, and `fit`
with its default handlers (Timer + Logger, a line every 10 updates, not shown). The same
counts at the same Python and torch versions, run after run. ``--top N`` lists the
functions that run the most.

    python bench/bytecodes.py [--updates 200] [--top 0]   (smoke: --updates 20)

The last line is ``ratio X.XX``: the hand-written loop's bytecodes per update over `fit`'s.
"""

from __future__ import annotations

import argparse
import collections
import logging
import sys
from collections.abc import Callable
from typing import Any

import torch
from step_overhead import make_batches, make_model
from torch.nn import functional as F

import fengine as fe


def count(run: Callable[[], None]) -> collections.Counter:
    """Bytecodes ``run`` executes, by ``file:function``."""
    counts: collections.Counter = collections.Counter()

    def trace(frame: Any, event: str, arg: Any) -> Any:
        frame.f_trace_opcodes = True
        if event == "opcode":
            code = frame.f_code
            counts[f"{code.co_filename.rsplit('site-packages/', 1)[-1]}:{code.co_name}"] += 1
        return trace

    sys.settrace(trace)
    try:
        run()
    finally:
        sys.settrace(None)
    return counts


def _loss(model: torch.nn.Module, batch: Any) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


def per_update(updates: int) -> dict[str, collections.Counter]:
    """Counts per ``updates`` updates of each way, after a warm-up of the same length. `fit`'s
    are the difference of a run of twice as many updates and one of ``updates``: what a run
    does once (the environment banner, opening the log) is not an update's."""
    batches = make_batches(3 * updates)
    warm, measured, longer = batches[:updates], batches[updates : 2 * updates], batches[updates:]

    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)

    def hand(data: list) -> None:
        for x, y in data:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()

    step = fe.train_step(_loss, fe.optim.adamw(lr=1e-3))
    state = step.init(make_model())

    def step_loop(data: list) -> None:
        nonlocal state
        for batch in data:
            state, _ = step(state, batch)

    logging.getLogger("fengine").setLevel(logging.WARNING)  # count the work, not the terminal

    def fit(data: list) -> None:
        fit_step = fe.train_step(_loss, fe.optim.adamw(lr=1e-3))
        fit_state = fit_step.init(make_model())
        handlers = fe.handlers.default_handlers()
        fe.fit(fit_state, fit_step, data, max_steps=len(data), handlers=handlers)  # type: ignore[arg-type]

    out = {}
    for name, fn in (("hand-written loop", hand), ("fengine step", step_loop)):
        fn(warm)
        out[name] = count(lambda fn=fn: fn(measured))
    fit(warm)
    out["fengine fit"] = count(lambda: fit(longer))
    out["fengine fit"].subtract(count(lambda: fit(measured)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--updates", type=int, default=200)
    ap.add_argument("--top", type=int, default=0, help="list the N functions running the most")
    args = ap.parse_args()
    counts = per_update(args.updates)
    print(f"Python {sys.version.split()[0]}, torch {torch.__version__}, {args.updates} updates")
    for name, c in counts.items():
        print(f"{name:>18}: {sum(c.values()) / args.updates:8.1f} bytecodes per update")
        for where, n in c.most_common(args.top):
            print(f"{'':>20}{n / args.updates:8.1f}  {where}")
    hand, fit = (sum(counts[k].values()) for k in ("hand-written loop", "fengine fit"))
    print(f"ratio {hand / fit:.2f}")


if __name__ == "__main__":
    main()
