"""A small but complete experiment for the resume/replay tests (also run as a script for preemption).

    python tests/resume_experiment.py WORK_DIR MAX_STEPS [--sleep S] [--variant NAME]

trains with resume=True in WORK_DIR and prints ``step N`` after every update and
``digest HEX`` at the end.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from torch import nn
from torch.nn import functional as F

import fengine as fe
from fengine import optim, schedules
from fengine.data import Loader, synthetic_classification


VARIANTS = {
    "plain": dict(),
    "accumulate": dict(accumulate=3),
    "fp16_ema": dict(amp="float16", ema=0.9),
    "workers2": dict(num_workers=2),
    "everything": dict(accumulate=2, amp="float16", ema=0.99, num_workers=2),
}


def noisy(sample, generator):
    """Per-sample augmentation drawn from the loader's (seed, epoch, index) generator."""
    x, y = sample
    return x + 0.1 * torch.randn(x.shape, generator=generator), y


def experiment(variant: str = "plain", seed: int = 0):
    opts = VARIANTS[variant]
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 4)
    )
    data = Loader(
        synthetic_classification(100, num_features=16, num_classes=4, seed=1),
        8,
        seed=seed,
        transform=noisy,
        num_workers=opts.get("num_workers", 0),
        drop_last=False,
    )
    lr = schedules.warmup(schedules.cosine(0.05, T_max=60, begin=5), steps=5)
    tx = optim.chain(optim.clip_by_global_norm(1.0), optim.sgd(lr, momentum=0.9, weight_decay=1e-4))
    wrappers = []
    if opts.get("amp"):
        wrappers.append(fe.amp(opts["amp"]))
    if opts.get("accumulate"):
        wrappers.append(fe.accumulate(opts["accumulate"]))
    if opts.get("ema"):
        wrappers.append(fe.ema(opts["ema"]))
    step = fe.train_step(lambda m, b: F.cross_entropy(m(b[0]), b[1]), tx, *wrappers)
    return step.init(model, seed=seed), step, data


class SaveAtEnd(fe.Handler):
    def on_after_train(self, snap):
        return fe.Save(snap.run.work_dir / f"end_{snap.step}.safetensors")


class PrintSteps(fe.Handler):
    def __init__(self, sleep: float) -> None:
        super().__init__()
        self.sleep = sleep

    def on_after_train_iter(self, snap):
        print(f"step {snap.step}", flush=True)
        time.sleep(self.sleep)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("work_dir")
    ap.add_argument("max_steps", type=int)
    ap.add_argument("--sleep", type=float, default=0.0)
    ap.add_argument("--variant", default="plain")
    args = ap.parse_args()
    from fengine.replay import state_digest

    state, step, data = experiment(args.variant)
    try:
        final = fe.fit(
            state,
            step,
            data,
            max_steps=args.max_steps,
            work_dir=args.work_dir,
            resume=True,
            handlers=[PrintSteps(args.sleep)],
        )
    except fe.Preempted as stopped:
        sys.exit(stopped.exit_code)
    print(f"digest {state_digest(final)}", flush=True)


if __name__ == "__main__":
    main()
