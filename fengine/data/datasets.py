"""Small built-in datasets for recipes and tests; nothing is downloaded.

Both return ``torch.utils.data.TensorDataset`` (which :class:`~fengine.data.Loader`
batches with one gather per tensor) and are pure functions of their seed.
"""

from __future__ import annotations

import functools

import torch
from torch.utils.data import TensorDataset

from fengine import rng


__all__ = ["digits", "synthetic_classification"]


@functools.lru_cache(maxsize=1)
def _digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits  # ships with scikit-learn; no download

    data = load_digits()
    images = torch.from_numpy(data.images).to(torch.float32).div_(16.0).unsqueeze(1)
    labels = torch.from_numpy(data.target).to(torch.int64)
    return images, labels


def digits(split: str = "train", val_fraction: float = 0.2, seed: int = 0) -> TensorDataset:
    """scikit-learn's 1797 handwritten digits as ``(image, label)``: ``(1, 8, 8)`` float32 in [0, 1], int64.

    The split is a seeded random permutation: the first ``round(n * val_fraction)``
    indices are ``"val"``, the rest ``"train"``; each split keeps the original
    order. The same ``seed`` always gives the same, disjoint splits.
    """
    if split not in ("train", "val"):
        raise ValueError(f"digits: `split` must be 'train' or 'val', got {split!r}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"digits: `val_fraction` must be in (0, 1), got {val_fraction}")
    images, labels = _digits_tensors()
    n = labels.shape[0]
    perm = torch.randperm(n, generator=rng.generator(seed))
    n_val = round(n * val_fraction)
    chosen = perm[:n_val] if split == "val" else perm[n_val:]
    chosen = chosen.sort().values
    return TensorDataset(images.index_select(0, chosen), labels.index_select(0, chosen))


def synthetic_classification(
    n: int = 1024, num_features: int = 16, num_classes: int = 4, seed: int = 0
) -> TensorDataset:
    """Gaussian blobs: ``n`` float32 feature vectors with balanced int64 labels in ``[0, num_classes)``.

    Class centres are drawn with spread 2 and samples add unit noise, so the
    classes overlap a little: learnable, but not trivially.
    """
    if n < 1 or num_features < 1 or num_classes < 1:
        raise ValueError(
            "synthetic_classification: `n`, `num_features` and `num_classes` must be >= 1, got "
            f"{n}, {num_features}, {num_classes}"
        )
    g = rng.generator(seed)
    centres = 2.0 * torch.randn(num_classes, num_features, generator=g)
    labels = (torch.arange(n) % num_classes)[torch.randperm(n, generator=g)]
    features = centres[labels] + torch.randn(n, num_features, generator=g)
    return TensorDataset(features, labels)
