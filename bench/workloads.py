"""The benchmark suite's workloads: a model, its batches and its loss, identical for every engine.

Each workload builds its model under ``torch.manual_seed(0)`` (the same initial weights
for every engine) and its data from a fixed generator. Two feeds give the same batches
in the same order: ``list`` (precomputed batches: the engine's own cost) and ``loader``
(one shuffling ``torch.utils.data.DataLoader`` with a seeded generator, re-iterated per
epoch: the loader most users have).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from fengine.models.resnet import ResNet


Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class Workload:
    """What one benchmark row trains: model factory, dataset tensors, batch size, loss."""

    name: str
    make_model: Callable[[], nn.Module]
    inputs: torch.Tensor
    targets: torch.Tensor
    batch_size: int
    loss: Callable[[nn.Module, Batch], torch.Tensor]
    device: torch.device = torch.device("cpu")

    def model(self) -> nn.Module:
        torch.manual_seed(0)  # built on the CPU (same bits on any device), then moved
        return self.make_model().to(self.device)

    def to_device(self, batch: Batch) -> Batch:
        x, y = batch
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def now(self) -> float:
        """The clock, after the device's queued work (CUDA kernels run asynchronously)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def loader(self) -> DataLoader:
        """A fresh shuffling DataLoader: every engine's copy yields the same order."""
        return DataLoader(
            TensorDataset(self.inputs, self.targets),
            batch_size=self.batch_size,
            shuffle=True,
            drop_last=True,
            generator=torch.Generator().manual_seed(2),
            pin_memory=self.device.type == "cuda",
        )

    def batches(self, steps: int) -> list[Batch]:
        """The first ``steps`` batches of `loader`, precomputed on the device (the ``list`` feed)."""
        return [self.to_device(b) for b in itertools.islice(epochs(self.loader()), steps)]

    def steps_per_epoch(self) -> int:
        return len(self.inputs) // self.batch_size


def epochs(loader: Iterable[Batch]) -> Iterator[Batch]:
    """The loader's batches, epoch after epoch (``iter(loader)`` once per epoch)."""
    while True:
        yield from loader


def cross_entropy(model: nn.Module, batch: Batch) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


def next_token(model: nn.Module, batch: Batch) -> torch.Tensor:
    logits = model(batch[0])
    return F.cross_entropy(logits.flatten(0, 1), batch[1].flatten())


# ------------------------------------------------------------------ models
def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


def cnn() -> nn.Module:
    """The classify recipe's default ResNet-style net for 1x8x8 digits."""
    return ResNet(width=32, blocks=2)


class GPT(nn.Module):
    """A small causal transformer (pre-norm, no dropout: every engine computes the same bits)."""

    def __init__(self, vocab: int, block: int, dim: int, layers: int, heads: int) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, dim)
        self.positions = nn.Embedding(block, dim)
        layer = nn.TransformerEncoderLayer(
            dim, heads, 4 * dim, dropout=0.0, batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(block))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        x = self.tokens(idx) + self.positions(torch.arange(t, device=idx.device))
        x = self.blocks(x, mask=self.mask[:t, :t], is_causal=True)
        return self.head(self.norm(x))


# ------------------------------------------------------------------ data
def _synthetic(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 64, generator=g), torch.randint(0, 10, (n,), generator=g)


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    return x, torch.tensor(d.target, dtype=torch.int64)


def _text(block: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` windows of ``block + 1`` characters of this Python's own ``os.py`` (ships with Python)."""
    import os

    with open(os.__file__, encoding="utf-8") as f:
        text = f.read()
    codes = torch.tensor([min(ord(c), 127) for c in text], dtype=torch.int64)
    starts = torch.linspace(0, len(codes) - block - 2, n).long()
    windows = torch.stack([codes[s : s + block + 1] for s in starts.tolist()])
    return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()


GPT_BLOCK = 64


def workload(name: str, device: str = "cpu") -> Workload:
    """The workload ``name`` (mlp, cnn, gpt) with its model and batches on ``device``."""
    return dataclasses.replace(_workload(name), device=torch.device(device))


def _workload(name: str) -> Workload:
    if name == "mlp":
        x, y = _synthetic(64 * 500)
        return Workload("mlp", mlp, x, y, 64, cross_entropy)
    if name == "cnn":
        x, y = _digits()
        return Workload("cnn", cnn, x, y, 32, cross_entropy)
    if name == "gpt":
        x, y = _text(GPT_BLOCK, 2048)
        return Workload("gpt", lambda: GPT(128, GPT_BLOCK, 128, 2, 4), x, y, 16, next_token)
    raise ValueError(f"workload: unknown name {name!r}; choose mlp, cnn or gpt")


def epochs_for(steps: int, w: Workload) -> int:
    return math.ceil(steps / w.steps_per_epoch())
