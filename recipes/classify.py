"""Image classification: MMEngine's 15-minute example, rebuilt with fengine.

A small ResNet (fengine.models.ResNet) on sklearn's 8x8 digits (ships with scikit-learn:
no download) or on CIFAR-10 read from its python batches on disk (--data.name cifar10
--data.root PATH), per-sample random-shift augmentation drawn from (seed, epoch, index),
SGD or AdamW with warmup + cosine, validation every epoch, console/JSON/TensorBoard logs,
checkpoints and config.json in --work-dir. About 10 s of training on 2 CPU cores by
default (10 epochs); validation accuracy >= 95%.

    python recipes/classify.py                                   # 10 epochs on digits
    python recipes/classify.py --preset tiny --max-steps 30 --work-dir W
    python recipes/classify.py --work-dir W --max-steps 60 --resume
    python recipes/classify.py --optim.name sgd --optim.lr 0.05 --amp bfloat16 --accumulate 2
    python recipes/classify.py --config W/config.json --work-dir W2 --seed 1
    python recipes/classify.py --preset wide --dry-run           # config, groups, FLOPs, lr plot

--resume continues W's latest checkpoint with its recorded config and horizon, bit for bit
as if never stopped. Giving a longer horizon (--max-steps 60 after a 30-step run) extends
the run: the schedules are re-planned over the new horizon from the checkpoint's step on,
which it says, with the lr before and after; that is not what a straight 60-step run
computes, and `python -m fengine replay W` re-runs each part with its own horizon.
Every field is a flag (--help); the resolved config is written to W/config.json.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Annotated, ClassVar, Literal

import torch
from torch import nn
from torch.nn import functional as F

import fengine as fe
from fengine import cli, optim, schedules
from fengine.cli import Range
from fengine.data import Loader, cifar10, digits
from fengine.metrics import Accuracy
from fengine.models import ResNet


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The ResNet (fengine.models.ResNet)."""

    width: Annotated[int, Range(ge=1)] = 32
    """channels of the stem and of every residual block"""
    blocks: Annotated[int, Range(ge=0)] = 2
    """number of residual blocks (two 3x3 convs each)"""


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """The optimizer and its schedule: linear warmup, then cosine to 0 at the last update."""

    name: Literal["adamw", "sgd"] = "adamw"
    """optimizer: AdamW (decoupled weight decay) or SGD with Nesterov momentum"""
    lr: Annotated[float, Range(gt=0)] = 3e-3
    """peak learning rate, reached after the warmup; cosine-annealed to 0 at the last update"""
    momentum: Annotated[float, Range(ge=0, lt=1)] = 0.9
    """SGD momentum (ignored by AdamW)"""
    weight_decay: Annotated[float, Range(ge=0)] = 1e-4
    """weight decay (AdamW: decoupled, per update; SGD: L2 added to the gradient)"""
    warmup_steps: Annotated[int, Range(ge=0)] = 20
    """linear warmup from 0.001 x lr over this many updates (0: none)"""
    clip_grad: Annotated[float | None, Range(gt=0)] = None
    """clip the global gradient norm to this value (None: no clipping)"""
    norm_decay_mult: Annotated[float | None, Range(ge=0)] = None
    """weight-decay multiplier of BatchNorm weights and biases (MMEngine's paramwise_cfg; None: 1)"""
    bias_decay_mult: Annotated[float | None, Range(ge=0)] = None
    """weight-decay multiplier of biases outside norm layers (None: 1)"""
    base_batch_size: Annotated[int | None, Range(ge=1)] = None
    """MMEngine's auto_scale_lr: lr was tuned for this total batch size; scale it linearly to
    batch_size x processes (None: off)"""


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The dataset and its loader."""

    name: Literal["digits", "cifar10"] = "digits"
    """dataset: sklearn's 8x8 digits (built in) or CIFAR-10's python batches under --data.root"""
    root: Path | None = None
    """CIFAR-10 directory holding data_batch_1..5 and test_batch (cifar-10-batches-py)"""
    batch_size: Annotated[int, Range(ge=1)] = 32
    """samples per micro-batch (per process)"""
    num_workers: Annotated[int, Range(ge=0, le=64)] = 0
    """loader worker processes (does not change a bit)"""
    val_fraction: Annotated[float, Range(gt=0, lt=1)] = 0.2
    """digits only: share of the 1797 images held out for validation"""
    augment: bool = True
    """random +-1 pixel shifts (digits; +-4 for CIFAR), drawn per sample from (seed, epoch, index)"""


@dataclasses.dataclass(frozen=True)
class Config(cli.RunConfig):
    work_dir: Path = Path("work_dirs/classify")
    """where checkpoints, logs, config.json and run_log.jsonl go"""
    max_epochs: Annotated[int | None, Range(ge=1)] = 10
    """train this many epochs (passes over the training data); giving --max-steps clears it"""
    amp: Literal["none", "bfloat16", "float16"] = "none"
    """autocast dtype of the forward pass (float16 adds dynamic loss scaling)"""
    accumulate: Annotated[int, Range(ge=1)] = 1
    """micro-batches per optimizer update (gradient accumulation)"""
    ema: Annotated[float | None, Range(gt=0, lt=1)] = None
    """keep an EMA of the weights with this decay per update and validate with it (None: off)"""
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    data: DataConfig = DataConfig()

    NOT_RECORDED: ClassVar[tuple[str, ...]] = cli.RunConfig.NOT_RECORDED

    def check(self) -> None:
        super().check()
        if self.data.name == "cifar10" and self.data.root is None:
            raise cli.UsageError("--data.name cifar10 needs --data.root PATH (cifar-10-batches-py)")


BASE = Config()
PRESETS = {
    "tiny": dataclasses.replace(BASE, model=ModelConfig(width=8, blocks=1)),
    "base": BASE,
    "wide": dataclasses.replace(BASE, model=ModelConfig(width=64, blocks=3)),
}
"""Named configs derived from the base (MMEngine's ``_base_`` inheritance): ``--preset NAME``."""


def random_shift(sample, generator: torch.Generator, pixels: int = 1):
    """Shift the image by up to ``pixels`` (zero padding); randomness from the loader's per-sample generator."""
    image, label = sample
    dx, dy = torch.randint(-pixels, pixels + 1, (2,), generator=generator).tolist()
    h, w = image.shape[-2:]
    padded = F.pad(image, (pixels,) * 4)
    return padded[:, pixels + dy : pixels + dy + h, pixels + dx : pixels + dx + w], label


def shift4(sample, generator: torch.Generator):
    return random_shift(sample, generator, 4)


def loss_fn(model: nn.Module, batch) -> dict[str, torch.Tensor]:
    images, labels = batch
    logits = model(images)
    return {
        "loss": F.cross_entropy(logits, labels),
        "acc": (logits.argmax(1) == labels).float().mean(),
    }


def datasets(cfg: Config):
    """(train, val, image channels, shift augmentation) of the chosen dataset."""
    if cfg.data.name == "cifar10":
        assert cfg.data.root is not None
        return cifar10(cfg.data.root, "train"), cifar10(cfg.data.root, "test"), 3, shift4
    v = cfg.data.val_fraction
    train, val = digits("train", val_fraction=v), digits("val", val_fraction=v)
    for split, part in (("training", train), ("validation", val)):
        if len(part) == 0:
            raise cli.UsageError(f"--data.val-fraction {v} leaves no {split} samples")
    return train, val, 1, random_shift


def build(cfg: Config) -> cli.Experiment:
    """Everything `fit` needs, from the config alone (replay rebuilds runs with it)."""
    dist = fe.distributed.setup(cfg.device)  # under torchrun: the process group, this rank's device
    shard = dict(rank=dist.rank, world_size=dist.world_size)
    train_set, val_set, channels, shift = datasets(cfg)
    train = Loader(train_set, cfg.data.batch_size, seed=cfg.seed,
                   transform=shift if cfg.data.augment else None, num_workers=cfg.data.num_workers,
                   pin_memory=dist.device.type == "cuda", **shard)  # fmt: skip
    val = Loader(val_set, 256, seed=cfg.seed, shuffle=False, **shard)
    loop = fe.plan(train, micro_batches=cfg.accumulate, max_epochs=cfg.max_epochs, max_steps=cfg.max_steps)  # fmt: skip
    total, o = loop.total_steps, cfg.optim
    base_lr: optim.Hyper = o.lr
    if o.base_batch_size is not None:  # the effective lr goes to the log and the run log
        base_lr = optim.scale_lr(o.lr, base_batch_size=o.base_batch_size, batch_size=cfg.data.batch_size,
                                 world_size=dist.world_size)  # fmt: skip
        if dist.rank == 0:
            print(f"auto_scale_lr: {base_lr!r}")
    warm = min(o.warmup_steps, max(total - 1, 1))
    cosine = schedules.cosine(base_lr, T_max=max(total - warm, 1), begin=warm)
    lr = schedules.warmup(cosine, steps=warm) if warm else schedules.cosine(base_lr, T_max=total)
    fe.seed_everything(cfg.seed)  # weight init: the only draw from the global generators
    model = ResNet(cfg.model.width, cfg.model.blocks, in_channels=channels)
    groups = optim.paramwise(model, lr=lr, weight_decay=o.weight_decay,
                             norm_decay_mult=o.norm_decay_mult, bias_decay_mult=o.bias_decay_mult)  # fmt: skip
    rules = o.norm_decay_mult is not None or o.bias_decay_mult is not None
    if o.name == "adamw":
        opt = groups.build(optim.adamw) if rules else optim.adamw(lr, weight_decay=o.weight_decay)
        hyper = {
            "lr": lr,
            "momentum": 0.9,
            "weight_decay": o.weight_decay,
        }  # AdamW's b1 is momentum
    else:
        kw = dict(momentum=o.momentum, nesterov=True)
        opt = (
            groups.build(optim.sgd, **kw)
            if rules
            else optim.sgd(lr, weight_decay=o.weight_decay, **kw)
        )
        hyper = {"lr": lr, "momentum": o.momentum, "weight_decay": o.weight_decay}
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
    state = cli.initial_state(step, model, cfg, dist.device)
    example = val_set[0][0].unsqueeze(0).to(dist.device)
    return cli.Experiment(state=state, step=step, train_data=train, plan=loop,
                          val=fe.Val(val, [Accuracy()]), hyperparams=hyper, param_groups=groups,
                          example_input=example)  # fmt: skip


from_config = cli.replay_hook(Config, build)  # replay rebuilds each segment with it


def finish(cfg: Config, exp: cli.Experiment, state: fe.TrainState) -> float:
    """The final validation accuracy (EMA weights when kept), printed by rank 0."""
    result = fe.evaluate(state, fe.default_predict, exp.val.data, exp.val.metrics)
    if fe.distributed.is_main():
        print(f"final validation accuracy: {result['accuracy']:.2f}% after {state.step} steps ({state.epoch} epochs)")  # fmt: skip
    return result["accuracy"]


if __name__ == "__main__":
    sys.exit(cli.main(Config, build, presets=PRESETS, description=__doc__, finish=finish))
