"""Whole-step compile: fengine's compiled step vs its eager step vs a hand-written torch loop.

The suite's workloads (bench/workloads.py), each trained with AdamW from the same initial
weights on the same batches: by default the tiny MLP (64-128-10, batch 64: per-step overhead
dominates) and the small GPT (2 pre-norm layers, d 128, batch 16 of 64 tokens: kernels
dominate). For each: the hand-written loop
(``torch.optim.AdamW(foreach=True)``, ``loss.backward()``), ``fe.train_step(...)`` eager and
``fe.train_step(..., compile=True)`` (inductor, one graph), interleaved in rounds, median
steps/s. The first compiled call (trace + compile) is reported apart and excluded. The
last line is ``ratio mlp X.XX gpt Y.YY``: compiled steps/s over the hand-written loop's.

    python bench/compile.py [--steps 500] [--rounds 3] [--threads 2] [--models mlp,gpt]
    python bench/compile.py --smoke       (seconds: tiny runs, backend "eager"; checks the plumbing)

Set TORCHINDUCTOR_CACHE_DIR to keep compiled kernels across runs (a warm cache skips most
of the first-call time).
"""

from __future__ import annotations

import argparse
import statistics
import time

import engines
import torch
from workloads import Workload, workload

import fengine as fe


def hand_written(w: Workload, batches: list) -> tuple[float, dict[str, torch.Tensor]]:
    """The suite's hand-written loop (bench/engines.py), timed over all of ``batches``."""
    return engines.hand(w, batches, len(batches), warmup=0)


def run_step(step: fe.Step, w: Workload, batches: list) -> tuple[float, fe.TrainState]:
    state = step.init(w.model())
    t0 = time.perf_counter()
    for b in batches:
        state, _ = step(state, b)
    return time.perf_counter() - t0, state


def bench(name: str, args) -> float:
    w = workload(name)  # the suite's workloads (bench/workloads.py)
    batches = w.batches(args.steps)
    eager = fe.train_step(w.loss, fe.optim.adamw(lr=1e-3))
    options = {"backend": args.backend} if args.backend != "inductor" else True
    compiled = fe.train_step(w.loss, fe.optim.adamw(lr=1e-3), compile=options)
    t0 = time.perf_counter()
    run_step(compiled, w, batches[:1])  # the first call traces and compiles
    first = time.perf_counter() - t0
    warm = batches[: min(20, len(batches))]
    hand_written(w, warm), run_step(eager, w, warm), run_step(compiled, w, warm)
    times: dict[str, list[float]] = {"hand": [], "eager": [], "compiled": []}
    for _ in range(args.rounds):
        t, ref = hand_written(w, batches)
        times["hand"].append(t)
        t, _ = run_step(eager, w, batches)
        times["eager"].append(t)
        t, state = run_step(compiled, w, batches)
        times["compiled"].append(t)
    rate = {k: len(batches) / statistics.median(v) for k, v in times.items()}
    diff = max((state.params[n] - p).abs().max().item() for n, p in ref.items())
    print(f"{name}: first compiled call {first:.1f} s (trace + compile, excluded)")
    print(f"{name}: hand-written loop (AdamW foreach): {rate['hand']:9.1f} steps/s  1.00")
    for key, label in (("eager", "fengine eager step"), ("compiled", "fengine compiled step")):
        print(f"{name}: {label:33s} {rate[key]:9.1f} steps/s  {rate[key] / rate['hand']:.2f}")
    print(f"{name}: compiled final params vs hand-written: max abs diff {diff:.2e}")
    return rate["compiled"] / rate["hand"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models", default="mlp,gpt", help="comma-separated: mlp, cnn, gpt")
    ap.add_argument("--backend", default="inductor", help="torch.compile backend")
    ap.add_argument(
        "--smoke", action="store_true", help="tiny runs with backend 'eager' (plumbing only)"
    )
    args = ap.parse_args()
    if args.smoke:
        args.steps, args.rounds, args.backend = 5, 1, "eager"
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, backend {args.backend}, "
        f"{args.steps} steps x {args.rounds} rounds (median)"
    )
    ratios = {m: bench(m, args) for m in args.models.split(",")}
    print("ratio " + " ".join(f"{m} {r:.2f}" for m, r in ratios.items()))


if __name__ == "__main__":
    main()
