"""Image classification: MMEngine's 15-minute example, rebuilt with fengine.

A small ResNet-style net on sklearn's 8x8 digits (ships with scikit-learn: no
download), per-sample random-shift augmentation drawn from (seed, epoch, index),
SGD or AdamW with warmup + cosine, validation every epoch, console/JSON/
TensorBoard logs and checkpoints in ``--work-dir``. About a minute on 2 CPU
cores; validation accuracy >= 95%.

    python recipes/classify.py                          # 10 epochs
    python recipes/classify.py --max-steps 30 --work-dir W
    python recipes/classify.py --max-steps 60 --work-dir W --resume   # continues W exactly
    python recipes/classify.py --optim.name sgd --optim.lr 0.05 --amp bfloat16 --accumulate 2

Every field is a flag (``--help``); the resolved config is written to the work dir.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Literal

import torch
import tyro
from torch import nn
from torch.nn import functional as F

import fengine as fe
from fengine import checkpoint, handlers, optim, schedules
from fengine.config import from_dict, to_dict
from fengine.data import Loader, digits
from fengine.metrics import Accuracy
from fengine.replay import RunRecorder


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    width: int = 32
    """channels of the residual blocks"""
    blocks: int = 2
    """number of residual blocks"""


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = 3e-3
    momentum: float = 0.9
    """SGD momentum (ignored by AdamW)"""
    weight_decay: float = 1e-4
    warmup_steps: int = 20
    """linear warmup from 0.001 x lr over this many updates"""
    clip_grad: float | None = None
    """clip the global gradient norm to this value"""
    base_batch_size: int | None = None
    """MMEngine's auto_scale_lr: lr was tuned for this total batch size; scale it linearly to batch_size x processes"""


@dataclasses.dataclass(frozen=True)
class DataConfig:
    batch_size: int = 32
    num_workers: int = 0
    val_fraction: float = 0.2
    augment: bool = True
    """random +-1 pixel shifts, drawn per sample from (seed, epoch, index)"""


@dataclasses.dataclass(frozen=True)
class Config:
    work_dir: Path = Path("work_dirs/classify")
    max_epochs: int | None = None
    """train this many epochs (default 10 when --max-steps is not given)"""
    max_steps: int | None = None
    """train this many optimizer updates instead of epochs"""
    seed: int = 0
    device: str | None = None
    """cpu, cuda or cuda:N (default: cuda when available, else cpu); under torchrun, cuda is cuda:LOCAL_RANK"""
    resume: bool = False
    """continue from the latest checkpoint in --work-dir"""
    resume_from: Path | None = None
    """continue from this checkpoint file"""
    load_from: Path | None = None
    """start from these weights (a checkpoint, published file, safetensors or .pth state dict); partial
    loading, missing/unexpected names are reported"""
    amp: Literal["none", "bfloat16", "float16"] = "none"
    accumulate: int = 1
    """micro-batches per update"""
    ema: float | None = None
    """keep an EMA of the weights with this decay and validate with it"""
    log_interval: int = 10
    checkpoint_interval: int = 1
    """save a checkpoint every N epochs (N epochs' worth of steps with --max-steps); the last one is always saved"""
    keep_checkpoints: int = 3
    tensorboard: bool = True
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    data: DataConfig = DataConfig()


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(x + self.bn2(self.conv2(y)))


class ResNet(nn.Module):
    """A ResNet-style net for 1x8x8 inputs."""

    def __init__(self, width: int = 32, blocks: int = 2, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        self.blocks = nn.Sequential(*[Block(width) for _ in range(blocks)])
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.head(x.mean(dim=(2, 3)))


def random_shift(sample, generator: torch.Generator):
    """Shift the image by up to one pixel (zero padding); randomness from the loader's per-sample generator."""
    image, label = sample
    dx, dy = torch.randint(-1, 2, (2,), generator=generator).tolist()
    padded = F.pad(image, (1, 1, 1, 1))
    return padded[:, 1 + dy : 9 + dy, 1 + dx : 9 + dx], label


def loss_fn(model: nn.Module, batch) -> dict[str, torch.Tensor]:
    images, labels = batch
    logits = model(images)
    return {
        "loss": F.cross_entropy(logits, labels),
        "acc": (logits.argmax(1) == labels).float().mean(),
    }


@dataclasses.dataclass(frozen=True)
class Experiment:
    """Everything `fit` needs, built from a config alone (replay rebuilds runs with it)."""

    state: fe.TrainState
    step: fe.Step
    train_data: Loader
    val: fe.Val
    fit_kwargs: dict
    loop: fe.Plan


def build(cfg: Config) -> Experiment:
    if cfg.max_epochs is not None and cfg.max_steps is not None:
        raise SystemExit(
            f"give --max-epochs or --max-steps, not both (got {cfg.max_epochs} and {cfg.max_steps})"
        )
    dist = fe.distributed.setup(cfg.device)  # under torchrun: the process group, this rank's device
    shard = dict(rank=dist.rank, world_size=dist.world_size)
    train = Loader(digits("train", val_fraction=cfg.data.val_fraction), cfg.data.batch_size, seed=cfg.seed,
                   transform=random_shift if cfg.data.augment else None, num_workers=cfg.data.num_workers,
                   pin_memory=dist.device.type == "cuda", **shard)  # fmt: skip
    val = Loader(
        digits("val", val_fraction=cfg.data.val_fraction),
        256,
        seed=cfg.seed,
        shuffle=False,
        **shard,
    )
    max_epochs = cfg.max_epochs if cfg.max_steps is None else None
    if max_epochs is None and cfg.max_steps is None:
        max_epochs = 10
    loop = fe.plan(
        train, micro_batches=cfg.accumulate, max_epochs=max_epochs, max_steps=cfg.max_steps
    )
    total = loop.total_steps
    o = cfg.optim
    base_lr = o.lr
    if (
        o.base_batch_size is not None
    ):  # the effective lr goes to the log and, via the config, the run log
        base_lr = optim.scale_lr(o.lr, base_batch_size=o.base_batch_size, batch_size=cfg.data.batch_size,
                                 world_size=dist.world_size)  # fmt: skip
        if dist.rank == 0:
            print(f"auto_scale_lr: {base_lr!r}")
    warm = min(o.warmup_steps, max(total - 1, 1))
    lr = (
        schedules.warmup(
            schedules.cosine(base_lr, T_max=max(total - warm, 1), begin=warm), steps=warm
        )
        if warm
        else schedules.cosine(base_lr, T_max=total)
    )
    opt = (
        optim.adamw(lr, weight_decay=o.weight_decay)
        if o.name == "adamw"
        else optim.sgd(lr, momentum=o.momentum, weight_decay=o.weight_decay, nesterov=True)
    )
    tx = optim.chain(optim.clip_by_global_norm(o.clip_grad), opt) if o.clip_grad else opt
    wrappers: list[fe.Wrapper] = [fe.data_parallel()] if dist.world_size > 1 else []  # before amp
    if cfg.amp != "none":
        wrappers.append(fe.amp(cfg.amp))
    wrappers.append(fe.check_finite())  # after amp: fp16 overflows are the scaler's to skip
    if cfg.accumulate > 1:
        wrappers.append(fe.accumulate(cfg.accumulate))
    if cfg.ema is not None:
        wrappers.append(fe.ema(cfg.ema))
    step = fe.train_step(loss_fn, tx, *wrappers)
    fe.seed_everything(cfg.seed)  # weight init: the only draw from the global generators
    state = step.init(ResNet(cfg.model.width, cfg.model.blocks), seed=cfg.seed, device=dist.device)
    if cfg.load_from is not None:
        state, report = checkpoint.load_params(cfg.load_from, state)
        print(report)
    fit_kwargs = dict(max_epochs=max_epochs) if loop.by_epoch else dict(max_steps=cfg.max_steps)
    return Experiment(state, step, train, fe.Val(val, [Accuracy()]), fit_kwargs, loop)


def checkpoints(cfg: Config, exp: Experiment) -> handlers.Checkpointer:
    """Every ``checkpoint_interval`` epochs (in steps for --max-steps runs), the last and the best."""
    if exp.loop.by_epoch:
        return handlers.Checkpointer(
            cfg.checkpoint_interval, max_keep_ckpts=cfg.keep_checkpoints, save_best="auto"
        )
    return handlers.Checkpointer(
        cfg.checkpoint_interval * exp.loop.steps_per_epoch,
        by_epoch=False,
        max_keep_ckpts=cfg.keep_checkpoints,
        save_best="auto",
    )


# How to start (where, from which checkpoint) and how far: not what the run computes. The run log
# records the config without them, and the horizon per segment (each start of fit), so a resumed
# run is the same config; output-only fields (logging, checkpoint cadence) do not change a bit either.
NOT_RECORDED = ("work_dir", "resume", "resume_from", "max_epochs", "max_steps", "log_interval",
                "checkpoint_interval", "keep_checkpoints", "tensorboard", "device")  # fmt: skip


def recorded_config(cfg: Config) -> dict:
    """The config that determines the bits, as the run log records it (``load_from`` made absolute,
    so a replay from another directory finds the same file)."""
    config = {k: v for k, v in to_dict(cfg).items() if k not in NOT_RECORDED}
    if cfg.load_from is not None:
        config["load_from"] = str(cfg.load_from.resolve())
    return config


def from_config(config: dict, *, max_epochs: int | None, max_steps: int | None) -> Experiment:
    """Rebuild one segment of a run from its recorded config and horizon (``python -m fengine replay``)."""
    return build(from_dict(Config, {**config, "max_epochs": max_epochs, "max_steps": max_steps}))


def main(cfg: Config) -> float:
    exp = build(cfg)
    main_rank = fe.distributed.is_main()
    with fe.lock_work_dir(
        cfg.work_dir if main_rank else None
    ):  # one run per work dir, config.json included
        config = to_dict(cfg)
        if main_rank:
            (cfg.work_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        timer = handlers.Timer()
        hs = [
            timer,
            handlers.Logger(interval=cfg.log_interval, timer=timer),
            checkpoints(cfg, exp),
            RunRecorder(every=100, config=recorded_config(cfg)),
        ]
        if cfg.tensorboard:
            hs.append(handlers.TensorBoard(timer=timer))
        resume = cfg.resume_from if cfg.resume_from is not None else cfg.resume
        state = fe.fit(exp.state, exp.step, exp.train_data, val=exp.val, handlers=hs, work_dir=cfg.work_dir,
                       resume=resume, config=config, **exp.fit_kwargs)  # fmt: skip
    result = fe.evaluate(state, fe.default_predict, exp.val.data, exp.val.metrics)
    if main_rank:
        print(
            f"final validation accuracy: {result['accuracy']:.2f}% after {state.step} steps ({state.epoch} epochs)"
        )
    return result["accuracy"]


if __name__ == "__main__":
    try:
        main(tyro.cli(Config, description=__doc__.split("\n\n")[0]))
    except fe.Preempted as stopped:  # SIGTERM/SIGINT: a checkpoint was saved; resume with --resume
        print(stopped, file=sys.stderr)
        sys.exit(stopped.exit_code)
    except fe.WorkDirLocked as busy:
        print(f"error: {busy}", file=sys.stderr)
        sys.exit(2)
    sys.exit(0)
