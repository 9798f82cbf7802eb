"""A tiny recipe for the replay tests (milliseconds a step), run in the test process.

`run(work_dir, ...)` trains like a recipe's ``main``: checkpoints every ``every`` steps and a
`RunRecorder` naming this file; `from_config` is the replay hook. The learning rate is a
cosine over the planned total, so a resume with a longer horizon really changes the schedule,
and dropout draws from (seed, step), so every step's bits depend on the position.
`threads_seen` collects ``torch.get_num_threads()`` at each build.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

import fengine as fe
from fengine import handlers, optim, schedules
from fengine.config import from_dict, to_dict
from fengine.data import Loader, synthetic_classification
from fengine.replay import RunRecorder


@dataclasses.dataclass(frozen=True)
class Config:
    work_dir: str = "work"
    max_steps: int | None = None
    max_epochs: int | None = None
    resume: bool = False
    resume_from: str | None = None
    lr: float = 0.05
    seed: int = 0
    every: int = 5
    """checkpoint every N steps"""
    keep: int = -1
    """max_keep_ckpts"""
    plateau: bool = False
    """the lr reduced on plateaus of a validation metric (replay refuses such runs)"""
    ema: float | None = None
    """an EMA of the weights with this momentum"""
    accumulate: int = 1
    """micro-batches per update"""


NOT_RECORDED = ("work_dir", "max_steps", "max_epochs", "resume", "resume_from", "every", "keep")
threads_seen: list[int] = []


@dataclasses.dataclass(frozen=True)
class Experiment:
    state: fe.TrainState
    step: fe.Step
    train_data: Loader
    loop: fe.Plan


def build(cfg: Config) -> Experiment:
    threads_seen.append(torch.get_num_threads())
    data = Loader(
        synthetic_classification(80, num_features=8, num_classes=3, seed=1), 8, seed=cfg.seed
    )
    loop = fe.plan(data, micro_batches=cfg.accumulate, max_epochs=cfg.max_epochs,
                   max_steps=cfg.max_steps)  # fmt: skip
    lr = schedules.cosine(cfg.lr, T_max=loop.total_steps)
    rop = fe.reduce_on_plateau(monitor="loss") if cfg.plateau else None
    tx = optim.adamw(rop(lr) if rop else lr)
    wrappers = [*([rop] if rop else []), *([fe.ema(cfg.ema)] if cfg.ema else []),
                *([fe.accumulate(cfg.accumulate)] if cfg.accumulate > 1 else [])]  # fmt: skip
    step = fe.train_step(lambda m, b: F.cross_entropy(m(b[0]), b[1]), tx, *wrappers)
    torch.manual_seed(cfg.seed)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 3))
    return Experiment(step.init(model, seed=cfg.seed), step, data, loop)


def from_config(config: dict, *, max_epochs: int | None, max_steps: int | None) -> Experiment:
    return build(from_dict(Config, {**config, "max_epochs": max_epochs, "max_steps": max_steps}))


def run(work_dir: str | Path, **options: Any) -> fe.TrainState:
    cfg = Config(work_dir=str(work_dir), **options)
    exp = build(cfg)
    recorded = {k: v for k, v in to_dict(cfg).items() if k not in NOT_RECORDED}
    hs = [
        handlers.Checkpointer(cfg.every, by_epoch=False, max_keep_ckpts=cfg.keep),
        RunRecorder(every=3, recipe=__file__, config=recorded),
    ]
    horizon = dict(max_steps=cfg.max_steps) if cfg.max_steps else dict(max_epochs=cfg.max_epochs)
    resume = cfg.resume_from or cfg.resume
    return fe.fit(
        exp.state,
        exp.step,
        exp.train_data,
        handlers=hs,
        work_dir=work_dir,
        resume=resume,
        **horizon,
    )
