"""Whole-step compile: fengine's compiled step vs its eager step vs a hand-written torch loop.

Two workloads, each trained with AdamW from the same initial weights on the same batches:
a tiny MLP (64-128-10, batch 64: per-step overhead dominates) and a small GPT-like model
(causal self-attention blocks: kernels dominate). For each: the hand-written loop
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
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

import fengine as fe


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        a = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, vocab: int, d: int, layers: int, heads: int, seq: int) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(seq, d)
        self.blocks = nn.Sequential(*[Block(d, heads) for _ in range(layers)])
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        return self.head(self.ln(self.blocks(x)))


def mlp_workload(steps: int, smoke: bool) -> tuple[Callable[[], nn.Module], list, Callable]:
    def make() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))

    g = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(64, 64, generator=g), torch.randint(0, 10, (64,), generator=g))
        for _ in range(steps)
    ]

    def loss(model: nn.Module, b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(model(b[0]), b[1])

    return make, batches, loss


def gpt_workload(steps: int, smoke: bool) -> tuple[Callable[[], nn.Module], list, Callable]:
    vocab, d, layers, heads, seq, batch = (
        (64, 32, 1, 2, 16, 2) if smoke else (256, 128, 2, 4, 64, 8)
    )

    def make() -> nn.Module:
        torch.manual_seed(0)
        return GPT(vocab, d, layers, heads, seq)

    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, vocab, (batch, seq + 1), generator=g) for _ in range(steps)]

    def loss(model: nn.Module, b: torch.Tensor) -> torch.Tensor:
        logits = model(b[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), b[:, 1:].reshape(-1))

    return make, batches, loss


def hand_written(make, batches, loss) -> tuple[float, nn.Module]:
    model = make()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
    t0 = time.perf_counter()
    for b in batches:
        opt.zero_grad(set_to_none=True)
        loss(model, b).backward()
        opt.step()
    return time.perf_counter() - t0, model


def run_step(step: fe.Step, make, batches) -> tuple[float, fe.TrainState]:
    state = step.init(make())
    t0 = time.perf_counter()
    for b in batches:
        state, _ = step(state, b)
    return time.perf_counter() - t0, state


def bench(name: str, workload, args) -> float:
    make, batches, loss = workload(args.steps, args.smoke)
    eager = fe.train_step(loss, fe.optim.adamw(lr=1e-3))
    options = {"backend": args.backend} if args.backend != "inductor" else True
    compiled = fe.train_step(loss, fe.optim.adamw(lr=1e-3), compile=options)
    t0 = time.perf_counter()
    run_step(compiled, make, batches[:1])  # the first call traces and compiles
    first = time.perf_counter() - t0
    warm = batches[: min(20, len(batches))]
    hand_written(make, warm, loss), run_step(eager, make, warm), run_step(compiled, make, warm)
    times: dict[str, list[float]] = {"hand": [], "eager": [], "compiled": []}
    for _ in range(args.rounds):
        t, ref = hand_written(make, batches, loss)
        times["hand"].append(t)
        t, _ = run_step(eager, make, batches)
        times["eager"].append(t)
        t, state = run_step(compiled, make, batches)
        times["compiled"].append(t)
    rate = {k: len(batches) / statistics.median(v) for k, v in times.items()}
    diff = max((state.params[n] - p.detach()).abs().max().item() for n, p in ref.named_parameters())
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
    ap.add_argument("--models", default="mlp,gpt")
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
    workloads = {"mlp": mlp_workload, "gpt": gpt_workload}
    ratios = {m: bench(m, workloads[m], args) for m in args.models.split(",")}
    print("ratio " + " ".join(f"{m} {r:.2f}" for m, r in ratios.items()))


if __name__ == "__main__":
    main()
