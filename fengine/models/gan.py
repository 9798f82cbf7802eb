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


def _check_shape(owner: str, data_shape: object) -> tuple[int, ...]:
    """``data_shape`` as a tuple, refused unless it is a non-empty tuple or list of ints >= 1
    (torch would build a layer of no or negative outputs, or fail with an unrelated message)."""
    expected = "a non-empty tuple of ints >= 1, e.g. (1, 8, 8)"
    if not isinstance(data_shape, (tuple, list)) or any(
        isinstance(d, bool) or not isinstance(d, int) for d in data_shape
    ):
        raise TypeError(f"{owner}: data_shape must be {expected}, got {data_shape!r}")
    if not data_shape or any(d < 1 for d in data_shape):
        raise ValueError(f"{owner}: data_shape must be {expected}, got {data_shape!r}")
    return tuple(data_shape)


def _check_sizes(owner: str, noise_size: int | None, widths: dict[str, tuple[int, ...]]) -> None:
    """Refuse a ``noise_size`` (when given) or layer widths that are not ints >= 1."""
    if noise_size is not None and (
        isinstance(noise_size, bool) or not isinstance(noise_size, int) or noise_size < 1
    ):
        raise ValueError(f"{owner}: noise_size must be an int >= 1, got {noise_size!r}")
    for name, sizes in widths.items():
        if not isinstance(sizes, (tuple, list)) or any(
            isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in sizes
        ):
            raise ValueError(f"{owner}: {name} must be ints >= 1, got {sizes!r}")


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
        self.data_shape = _check_shape("Generator", data_shape)
        _check_sizes("Generator", noise_size, {"widths": widths})
        self.noise_size = noise_size
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
        if z.ndim != 2 or z.shape[1] != self.noise_size:
            raise ValueError(
                f"Generator: expected noise (batch, {self.noise_size}), got shape {tuple(z.shape)}"
            )
        return self.model(z).view(z.shape[0], *self.data_shape)


class Discriminator(nn.Module):
    """Samples ``(batch, *data_shape)`` -> one real-vs-fake logit each, ``(batch, 1)``."""

    def __init__(self, data_shape: tuple[int, ...], widths: tuple[int, ...] = (256, 128)) -> None:
        super().__init__()
        self.data_shape = _check_shape("Discriminator", data_shape)
        _check_sizes("Discriminator", None, {"widths": widths})
        self.features = math.prod(self.data_shape)
        layers: list[nn.Module] = []
        prev = self.features
        for width in widths:
            layers += [nn.Linear(prev, width), nn.LeakyReLU(0.2)]
            prev = width
        layers.append(nn.Linear(prev, 1))
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(1) if x.ndim >= 2 else None
        if flat is None or flat.shape[1] != self.features:
            raise ValueError(
                f"Discriminator: expected samples (batch, *{self.data_shape}), got shape "
                f"{tuple(x.shape)}"
            )
        return self.model(flat)


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
        _check_shape("GAN", data_shape)
        _check_sizes("GAN", noise_size, {"gen_widths": gen_widths, "disc_widths": disc_widths})
        self.noise_size = noise_size
        self.gen = Generator(noise_size, data_shape, gen_widths, tanh)
        self.disc = Discriminator(data_shape, disc_widths)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.gen(z)

    def noise(self, batch: int, like: torch.Tensor) -> torch.Tensor:
        """``torch.randn(batch, noise_size)`` from torch's default generator, which fengine's step
        seeds per step and part (the tutorial draws ``z`` the same way in each part)."""
        if not like.is_floating_point():
            raise TypeError(
                f"GAN.noise: like must be a floating-point tensor (noise takes its dtype), got "
                f"{like.dtype}"
            )
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
