"""A small ResNet for 8x8 digits or 32x32 CIFAR images (recipes/classify.py)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


__all__ = ["Block", "ResNet"]


def _check_int(owner: str, name: str, value: object, least: int) -> None:
    """Refuse a size that is not an int (a bool, a float) or is below ``least``, naming it: torch
    would build an empty layer silently or fail later inside a conv."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{owner}: {name} must be an int >= {least}, got {value!r}")
    if value < least:
        raise ValueError(f"{owner}: {name} must be an int >= {least}, got {value!r}")


class Block(nn.Module):
    """Two 3x3 conv + BatchNorm layers with an identity shortcut."""

    def __init__(self, width: int) -> None:
        super().__init__()
        _check_int("Block", "width", width, 1)
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(x + self.bn2(self.conv2(y)))


class ResNet(nn.Module):
    """A conv stem, ``blocks`` residual blocks of ``width`` channels at the input resolution,
    global average pooling and a linear head (any input size; ``in_channels`` 1 or 3)."""

    def __init__(
        self, width: int = 32, blocks: int = 2, classes: int = 10, in_channels: int = 1
    ) -> None:
        super().__init__()
        for name, value, least in (("width", width, 1), ("blocks", blocks, 0),
                                   ("classes", classes, 1), ("in_channels", in_channels, 1)):  # fmt: skip
            _check_int("ResNet", name, value, least)
        self.in_channels = in_channels
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
        )
        self.blocks = nn.Sequential(*[Block(width) for _ in range(blocks)])
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"ResNet: expected images (batch, {self.in_channels}, height, width), got shape "
                f"{tuple(x.shape)}"
            )
        x = self.blocks(self.stem(x))
        return self.head(x.mean(dim=(2, 3)))
