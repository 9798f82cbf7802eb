"""The GAN of MMEngine's tutorial (OptimWrapperDict): an MLP generator and discriminator.

``GAN(noise_size, data_shape)`` holds ``gen`` and ``disc``, the submodule names that
`fengine.multi_step` parts select their params by. The generator is the tutorial's (blocks
of Linear, BatchNorm1d(eps=0.8), LeakyReLU(0.2), ending in Tanh for images) at a chosen
width; the discriminator returns a *logit*, not a sigmoid probability: the losses use
``binary_cross_entropy_with_logits``, the same loss, stable and safe under autocast
(``F.binary_cross_entropy`` on a sigmoid is refused under CUDA autocast).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


__all__ = ["GAN", "Discriminator", "Generator", "disc_loss", "gen_loss"]


class Generator(nn.Module):
    """Noise ``(batch, noise_size)`` -> samples ``(batch, *data_shape)``; ``tanh=True`` bounds
    them to [-1, 1] (images normalised as the tutorial's ``ImgDataPreprocessor(127.5, 127.5)``)."""

    def __init__(
        self,
        noise_size: int,
        data_shape: tuple[int, ...],
        widths: tuple[int, ...] = (128, 256),
        tanh: bool = False,
    ) -> None:
        super().__init__()
        self.noise_size, self.data_shape = noise_size, tuple(data_shape)
        layers: list[nn.Module] = []
        prev = noise_size
        for i, width in enumerate(widths):
            layers.append(nn.Linear(prev, width))
            if i > 0:  # the tutorial's first block has no normalisation
                layers.append(nn.BatchNorm1d(width, 0.8))
            layers.append(nn.LeakyReLU(0.2))
            prev = width
        layers.append(nn.Linear(prev, math.prod(self.data_shape)))
        if tanh:
            layers.append(nn.Tanh())
        self.model = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.model(z).view(z.shape[0], *self.data_shape)


class Discriminator(nn.Module):
    """Samples ``(batch, *data_shape)`` -> one real-vs-fake logit each, ``(batch, 1)``."""

    def __init__(self, data_shape: tuple[int, ...], widths: tuple[int, ...] = (256, 128)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        prev = math.prod(data_shape)
        for width in widths:
            layers += [nn.Linear(prev, width), nn.LeakyReLU(0.2)]
            prev = width
        layers.append(nn.Linear(prev, 1))
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.flatten(1))


class GAN(nn.Module):
    """``gen`` and ``disc`` side by side; ``GAN(...)(z)`` generates, as the tutorial's ``forward``."""

    def __init__(
        self,
        noise_size: int,
        data_shape: tuple[int, ...],
        *,
        gen_widths: tuple[int, ...] = (128, 256),
        disc_widths: tuple[int, ...] = (256, 128),
        tanh: bool = False,
    ) -> None:
        super().__init__()
        if isinstance(noise_size, bool) or not isinstance(noise_size, int) or noise_size < 1:
            raise ValueError(f"GAN: noise_size must be an int >= 1, got {noise_size!r}")
        for name, widths in (("gen_widths", gen_widths), ("disc_widths", disc_widths)):
            if any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in widths):
                raise ValueError(f"GAN: {name} must be ints >= 1, got {widths!r}")
        self.noise_size = noise_size
        self.gen = Generator(noise_size, data_shape, gen_widths, tanh)
        self.disc = Discriminator(data_shape, disc_widths)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.gen(z)

    def noise(self, batch: int, like: torch.Tensor) -> torch.Tensor:
        """``torch.randn(batch, noise_size)`` from torch's default generator, which fengine's step
        seeds per step and part (the tutorial draws ``z`` the same way in each part)."""
        return torch.randn(batch, self.noise_size, device=like.device, dtype=like.dtype)


def _bce(logits: torch.Tensor, target: float) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target))


def disc_loss(model: GAN, batch: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
    """The tutorial's ``train_discriminator``: fakes from fresh noise (no generator gradient),
    ``loss_disc_fake`` (fakes labelled 0) + ``loss_disc_real`` (reals labelled 1)."""
    real = batch[0]
    with torch.no_grad():
        fake = model.gen(model.noise(real.shape[0], real))
    return {
        "loss_disc_fake": _bce(model.disc(fake), 0.0),
        "loss_disc_real": _bce(model.disc(real), 1.0),
    }


def gen_loss(model: GAN, batch: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
    """The tutorial's ``train_generator``: ``loss_gen``, fresh fakes labelled 1 (the
    non-saturating loss); only the generator's params are updated by this part."""
    real = batch[0]
    fake = model.gen(model.noise(real.shape[0], real))
    return {"loss_gen": _bce(model.disc(fake), 1.0)}
