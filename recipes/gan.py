"""A GAN with two optimizers: MMEngine's GAN tutorial (OptimWrapperDict) rebuilt with fengine.

An MLP generator and discriminator (fengine.models.gan: the tutorial's networks at toy
width) trained by one fe.multi_step with two Adam optimizers (betas (0.5, 0.999) as the
tutorial's): each step updates the discriminator (loss_disc_fake + loss_disc_real), then
the generator (loss_gen), each part with its own optimizer state, its own lr in the log
(disc.lr, gen.lr) and, under --amp float16, its own loss scaler; --ema DECAY keeps an EMA
of the generator. The data is a ring of 8 Gaussians in 2-D (the mode-collapse test: the
modes the samples cover are counted) or sklearn's 8x8 digits (--data.name digits). At the
end it samples the generator (the EMA one when kept), prints the ring's mode coverage and
writes W/samples.png (needs matplotlib: pip install 'fengine[plot]'; without it the
picture is skipped, with a note). Measured with the defaults (3000 steps, one thread): 25 s
of CPU time for the whole command, so about 25 s on an idle core; the samples cover 8/8
modes, 70% of them within 4 std of a mode. --data.name digits --ema 0.999 draws
recognisable digits after 3000 steps.

    python recipes/gan.py                                       # ring of Gaussians, 3000 steps
    python recipes/gan.py --ema 0.999 --amp float16             # generator EMA, two loss scalers
    python recipes/gan.py --data.name digits --ema 0.999 --work-dir work_dirs/gan_digits
    python recipes/gan.py --max-steps 300 --work-dir W && python -m fengine replay W

Every field is a flag (--help); the resolved config is written to W/config.json.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path
from typing import Annotated, ClassVar, Literal

import numpy as np
import torch
from torch.utils.data import TensorDataset

import fengine as fe
from fengine import cli, optim
from fengine.bind import bind
from fengine.cli import Range
from fengine.data import Loader, digits
from fengine.data.toy import ring
from fengine.models.gan import GAN, disc_loss, gen_loss


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The generator and discriminator MLPs (fengine.models.gan)."""

    noise_size: Annotated[int, Range(ge=1)] = 16
    """length of the generator's noise vector z (the tutorial's: 100)"""
    gen_widths: tuple[int, ...] = (128, 128)
    """hidden widths of the generator's blocks (the tutorial's: 128 256 512 1024)"""
    disc_widths: tuple[int, ...] = (128, 128)
    """hidden widths of the discriminator (the tutorial's: 512 256)"""


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """One Adam per part, constant learning rates (as the tutorial)."""

    gen_lr: Annotated[float, Range(gt=0)] = 1e-3
    """generator Adam learning rate (the tutorial's 1e-4 suits its 220 MNIST epochs; 1e-3 is quick here)"""
    disc_lr: Annotated[float, Range(gt=0)] = 1e-3
    """discriminator Adam learning rate"""
    b1: Annotated[float, Range(ge=0, lt=1)] = 0.5
    """Adam beta1 of both optimizers (the tutorial's 0.5)"""
    b2: Annotated[float, Range(ge=0, lt=1)] = 0.999
    """Adam beta2 of both optimizers (the tutorial's 0.999)"""


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The real samples and their loader."""

    name: Literal["ring", "digits"] = "ring"
    """ring: 8 Gaussians on a circle in 2-D; digits: sklearn's 8x8 training digits scaled to [-1, 1]"""
    size: Annotated[int, Range(ge=1)] = 4096
    """points in the ring data set, drawn from --seed (digits: always its 1438 training images)"""
    batch_size: Annotated[
        int, Range(ge=2, why="the generator's BatchNorm needs 2 samples a batch")
    ] = 256
    """real samples per step (per process); each part draws as many noise vectors"""
    num_workers: Annotated[int, Range(ge=0, le=64)] = 0
    """loader worker processes (does not change a bit)"""


@dataclasses.dataclass(frozen=True)
class Config(cli.RunConfig):
    work_dir: Path = Path("work_dirs/gan")
    """where checkpoints, logs, config.json, run_log.jsonl and samples.png go"""
    max_steps: Annotated[int | None, Range(ge=1)] = 3000
    """train this many steps, each updating the discriminator then the generator; giving --max-epochs clears it"""
    amp: Literal["none", "bfloat16", "float16"] = "none"
    """autocast dtype of the forward passes; float16 gives each optimizer its own loss scaler"""
    ema: Annotated[float | None, Range(gt=0, lt=1)] = None
    """keep an EMA of the generator with this decay per step; the samples come from it (None: off)"""
    samples: Annotated[int, Range(ge=1)] = 1024
    """samples drawn at the end for the picture (digits: the first 64) and the ring's mode coverage"""
    log_interval: Annotated[int, Range(ge=1)] = 100
    """log every N steps"""
    checkpoint_interval: Annotated[int, Range(ge=1)] = 25
    """save a checkpoint every N epochs (N epochs' worth of steps with --max-steps); the last is always saved"""
    tensorboard: bool = False
    """also write TensorBoard event files to the work dir"""
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    data: DataConfig = DataConfig()

    NOT_RECORDED: ClassVar[tuple[str, ...]] = (*cli.RunConfig.NOT_RECORDED, "samples")

    def check(self) -> None:
        super().check()
        for flag, widths in (("gen-widths", self.model.gen_widths), ("disc-widths", self.model.disc_widths)):  # fmt: skip
            if any(w < 1 for w in widths):
                raise cli.UsageError(f"--model.{flag} must all be >= 1, got {widths}")


RING = dict(modes=8, radius=2.0, std=0.05)


def dataset(cfg: DataConfig, seed: int) -> TensorDataset:
    """The real samples: the ring (drawn from ``seed``) or the digits in [-1, 1] (the tutorial's
    ``ImgDataPreprocessor(mean=127.5, std=127.5)`` on 8-bit images)."""
    if cfg.name == "ring":
        return ring(cfg.size, seed=seed, **RING)  # type: ignore[arg-type]
    images = digits("train").tensors[0]
    return TensorDataset(images * 2 - 1)


def build(cfg: Config) -> cli.Experiment:
    """Everything `fit` needs, from the config alone (replay rebuilds runs with it)."""
    dist = fe.distributed.setup(cfg.device)
    data = dataset(cfg.data, cfg.seed)
    train = Loader(data, cfg.data.batch_size, seed=cfg.seed, drop_last=True,
                   num_workers=cfg.data.num_workers, rank=dist.rank, world_size=dist.world_size)  # fmt: skip
    loop = fe.plan(train, max_epochs=cfg.max_epochs, max_steps=cfg.max_steps)
    o = cfg.optim
    wrappers: list[fe.Wrapper] = [fe.data_parallel()] if dist.world_size > 1 else []
    if cfg.amp != "none":
        wrappers.append(fe.amp(cfg.amp))
    wrappers.append(fe.check_finite())  # after amp: fp16 overflows are the scalers' to skip
    if cfg.ema is not None:
        wrappers.append(fe.ema(cfg.ema, params="gen"))
    step = fe.multi_step(
        {  # MMEngine's GAN updates the discriminator first, then the generator
            "disc": (disc_loss, optim.adam(o.disc_lr, b1=o.b1, b2=o.b2), "disc"),
            "gen": (gen_loss, optim.adam(o.gen_lr, b1=o.b1, b2=o.b2), "gen"),
        },
        *wrappers,
    )
    fe.seed_everything(cfg.seed)  # weight init: the only draw from the global generators
    shape = tuple(data.tensors[0].shape[1:])
    m = cfg.model
    model = GAN(m.noise_size, shape, gen_widths=m.gen_widths, disc_widths=m.disc_widths,
                tanh=cfg.data.name == "digits")  # fmt: skip
    state = cli.initial_state(step, model, cfg, dist.device)
    hyper = {"disc/lr": o.disc_lr, "gen/lr": o.gen_lr, "disc/momentum": o.b1, "gen/momentum": o.b1}
    # --dry-run's complexity: GAN(z) runs the generator (two noise vectors: its BatchNorm in
    # training mode needs more than one sample); the discriminator's parameters are listed too
    example = torch.zeros(2, m.noise_size)
    return cli.Experiment(state=state, step=step, train_data=train, plan=loop, hyperparams=hyper,
                          example_input=example)  # fmt: skip


from_config = cli.replay_hook(Config, build)  # replay rebuilds each segment with it


def sample(state: fe.TrainState, n: int) -> torch.Tensor:
    """``n`` samples from the generator's eval weights (the EMA ones when kept), in eval mode
    (BatchNorm's running statistics), from noise derived from the run's seed only."""
    model = state.model
    if not isinstance(model, GAN):
        raise TypeError(f"sample: the state's model is {type(model).__name__}, not a GAN")
    params, buffers = state.eval_weights()
    device = next(iter(params.values())).device
    z = torch.randn(n, model.noise_size, generator=fe.rng.generator(state.seed, 0x5A4D))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), bind(model, params, buffers):
            return model(z.to(device)).float().cpu()
    finally:
        model.train(was_training)


def mode_coverage(points: torch.Tensor, modes: int, radius: float, std: float) -> tuple[int, float]:
    """Ring quality: (modes with >= 1% of the samples within 4 std, fraction of samples within 4 std
    of some mode). A collapsed generator covers few modes; a blurry one has few good samples."""
    angle = torch.arange(modes, dtype=torch.float32) * (2 * math.pi / modes)
    centres = radius * torch.stack([angle.cos(), angle.sin()], dim=1)
    dist, nearest = torch.cdist(points, centres).min(dim=1)
    good = dist < 4 * std
    counts = torch.bincount(nearest[good], minlength=modes)
    return int((counts >= 0.01 * len(points)).sum()), float(good.float().mean())


def picture(points: torch.Tensor, real: torch.Tensor, name: str, path: Path) -> bool:
    """Write the samples as a PNG (ring: a scatter over the real data; digits: an 8x8 grid);
    False (and a note) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'fengine[plot]'): no samples.png")
        return False
    points, real = points.numpy(), real.numpy()  # matplotlib wants arrays, not tensors
    if name == "ring":
        fig, ax = plt.subplots(figsize=(5, 5))
        ax.scatter(real[:, 0], real[:, 1], s=2, c="lightgray", label="real")
        ax.scatter(points[:, 0], points[:, 1], s=2, c="tab:red", label="generated")
        ax.set_aspect("equal")
        ax.legend(loc="center")
    else:  # one image: up to 8x8 samples tiled with a 1-pixel border
        tiles = points[:64, 0]
        n, (h, w) = len(tiles), tiles.shape[1:]
        rows = -(-n // 8)
        grid = np.full((rows * (h + 1) + 1, 8 * (w + 1) + 1), -1.0, dtype=np.float32)
        for i, tile in enumerate(tiles):
            r, c = divmod(i, 8)
            grid[1 + r * (h + 1) : (r + 1) * (h + 1), 1 + c * (w + 1) : (c + 1) * (w + 1)] = tile
        fig, ax = plt.subplots(figsize=(5, 5 * rows / 8))
        ax.imshow(grid, cmap="gray", vmin=-1, vmax=1)
        ax.axis("off")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def finish(cfg: Config, exp: cli.Experiment, state: fe.TrainState) -> dict:
    """Draw the samples, print their quality (ring: mode coverage) and write ``samples.png``."""
    if not fe.distributed.is_main():
        return {}
    points = sample(state, cfg.samples)
    result: dict = {"samples": points}
    if cfg.data.name == "ring":
        covered, good = mode_coverage(points, **RING)  # type: ignore[arg-type]
        result.update(modes_covered=covered, good_fraction=good)
        print(f"samples: {covered}/{RING['modes']} modes covered, {good:.0%} within 4 std of a mode")  # fmt: skip
    path = cfg.work_dir / "samples.png"
    if picture(points, exp.train_data.dataset.tensors[0], cfg.data.name, path):
        print(f"samples written to {path}")
        result["picture"] = path
    return result


if __name__ == "__main__":
    sys.exit(cli.main(Config, build, description=__doc__, finish=finish))
