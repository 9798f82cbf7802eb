"""2-D toy data for generative models (the GAN recipe): a ring of Gaussians, drawn from a seed."""

from __future__ import annotations

import math

import torch
from torch.utils.data import TensorDataset

from fengine import rng


__all__ = ["ring"]


def ring(
    n: int = 4096, *, modes: int = 8, radius: float = 2.0, std: float = 0.05, seed: int = 0
) -> TensorDataset:
    """``n`` float32 points ``(x, y)`` from ``modes`` equal Gaussians (std ``std``) centred on a
    circle of ``radius``, as 1-tuples ``(point,)``: the standard mode-collapse test for GANs
    (a collapsed generator covers a few modes only). A pure function of ``seed``."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"ring: `n` must be an int >= 1, got {n!r}")
    if isinstance(modes, bool) or not isinstance(modes, int) or modes < 1:
        raise ValueError(f"ring: `modes` must be an int >= 1, got {modes!r}")
    if not (radius > 0 and std > 0):
        raise ValueError(f"ring: `radius` and `std` must be > 0, got {radius!r} and {std!r}")
    g = rng.generator(seed)
    mode = torch.randint(0, modes, (n,), generator=g)
    angle = mode.to(torch.float64) * (2 * math.pi / modes)
    centres = radius * torch.stack([angle.cos(), angle.sin()], dim=1)
    points = centres + std * torch.randn(n, 2, generator=g, dtype=torch.float64)
    return TensorDataset(points.to(torch.float32))
