"""Dataset wrappers MMEngine users rely on, as plain index maps over map-style datasets.

``Subset`` (MMEngine's ``BaseDataset(indices=...)``), ``RepeatDataset``,
``ClassBalancedDataset`` and ``ConcatDataset`` follow MMEngine 0.10.7's
``mmengine/dataset/dataset_wrapper.py``: the same lengths and the same mapping
from a wrapper index to a sample of the wrapped dataset. Each mapping is fixed
when the wrapper is built, so a :class:`~fengine.data.Loader` over a wrapper
resumes by position like over any other map-style dataset, and per-sample
randomness is keyed by the *wrapper* index (two repeats of one sample are
augmented differently).

Unlike MMEngine's, the wrappers take any map-style dataset (no ``BaseDataset``,
no registry, no lazy init, no ``metainfo``), check indices (MMEngine's
``RepeatDataset`` wraps any index silently), and forward ``get_cat_ids`` when
the wrapped dataset has it, so they nest (e.g. class balancing a subset).
"""

from __future__ import annotations

import bisect
import math
import operator
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Any

import torch


__all__ = ["ClassBalancedDataset", "ConcatDataset", "RepeatDataset", "Subset", "repeat_factors"]

CatIds = Callable[[int], Iterable[Any]]


def _check_map_style(owner: str, dataset: Any, name: str = "dataset") -> None:
    if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
        raise TypeError(
            f"{owner}: `{name}` must be a map-style dataset (with __len__ and __getitem__), "
            f"got {type(dataset).__name__}"
        )


def _position(owner: str, idx: Any, n: int) -> int:
    """``idx`` as a position in ``[0, n)``; negative indices count from the end, as for lists."""
    try:
        if isinstance(idx, bool):
            raise TypeError
        i = operator.index(idx)
    except TypeError:
        raise TypeError(f"{owner}: index must be an integer, got {type(idx).__name__}") from None
    if not -n <= i < n:
        raise IndexError(f"{owner}: index {i} out of range for length {n}")
    return i + n if i < 0 else i


def _inner_cat_ids(owner: str, dataset: Any, i: int) -> list[Any]:
    get = getattr(dataset, "get_cat_ids", None)
    if get is None:
        raise TypeError(
            f"{owner}.get_cat_ids: the wrapped {type(dataset).__name__} has no `get_cat_ids(idx)`"
        )
    return list(get(i))


class Subset:
    """The samples of ``dataset`` at ``indices`` (MMEngine's ``BaseDataset(indices=...)``).

    ``indices=n`` (an int) keeps the first ``n`` samples (``-n``: the last ``n``),
    to shorten an epoch; a sequence (or 1-D integer tensor) keeps those
    positions in that order, repeats and negative indices allowed. Unlike
    MMEngine, an int beyond the dataset's length is an error (MMEngine's
    serialized path asserts ``n < len``, its unserialized one truncates).
    """

    def __init__(self, dataset: Any, indices: int | Sequence[int] | torch.Tensor) -> None:
        _check_map_style("Subset", dataset)
        n = len(dataset)
        if isinstance(indices, bool):
            raise TypeError("Subset: `indices` must be an int or a sequence of ints, got a bool")
        if isinstance(indices, int):
            if not -n <= indices <= n:
                raise ValueError(
                    f"Subset: `indices`={indices} keeps more samples than the dataset has ({n}); "
                    f"expected an int in [-{n}, {n}] (n: the first n samples, -n: the last n)"
                )
            self.indices = list(range(n))[:indices] if indices >= 0 else list(range(n))[indices:]
        elif isinstance(indices, torch.Tensor) or isinstance(indices, Sequence):
            if isinstance(indices, torch.Tensor):
                if indices.dim() != 1 or indices.dtype == torch.bool or indices.is_floating_point():
                    raise TypeError(
                        f"Subset: a tensor of `indices` must be 1-D with an integer dtype, got "
                        f"shape {tuple(indices.shape)} and {indices.dtype}"
                    )
                indices = indices.tolist()
            self.indices = [_position("Subset", i, n) for i in indices]
        else:
            raise TypeError(
                f"Subset: `indices` must be an int or a sequence of ints, got {type(indices).__name__}"
            )
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.indices)

    def source_index(self, idx: int) -> int:
        """The wrapped dataset's index behind ``self[idx]``."""
        return self.indices[_position("Subset", idx, len(self))]

    def __getitem__(self, idx: int) -> Any:
        return self.dataset[self.source_index(idx)]

    def get_cat_ids(self, idx: int) -> list[Any]:
        return _inner_cat_ids("Subset", self.dataset, self.source_index(idx))


class RepeatDataset:
    """``dataset`` repeated ``times`` times: index ``i`` is ``dataset[i % len(dataset)]`` (MMEngine's).

    One long epoch of ``times`` passes, in MMEngine's use to save the per-epoch
    overhead on small datasets (the sampler shuffles across all the copies).
    """

    def __init__(self, dataset: Any, times: int) -> None:
        _check_map_style("RepeatDataset", dataset)
        if isinstance(times, bool) or not isinstance(times, int) or times < 1:
            raise ValueError(f"RepeatDataset: `times` must be an int >= 1, got {times!r}")
        self.dataset = dataset
        self.times = times
        self._ori_len = len(dataset)

    def __len__(self) -> int:
        return self.times * self._ori_len

    def source_index(self, idx: int) -> int:
        """The wrapped dataset's index behind ``self[idx]``."""
        return _position("RepeatDataset", idx, len(self)) % self._ori_len

    def __getitem__(self, idx: int) -> Any:
        return self.dataset[self.source_index(idx)]

    def get_cat_ids(self, idx: int) -> list[Any]:
        return _inner_cat_ids("RepeatDataset", self.dataset, self.source_index(idx))


def _category(c: Any) -> Hashable:
    """An integer-like category id (numpy integer, 0-d integer tensor) as an ``int``; others as they are."""
    if isinstance(c, torch.Tensor) and not (c.dim() == 0 and not c.is_floating_point()):
        raise TypeError(
            f"ClassBalancedDataset: get_cat_ids gave the tensor {c!r}; a category is an int (a "
            "0-d integer tensor is read as one)"
        )
    return operator.index(c) if hasattr(c, "__index__") else c


def _categories(cats: Any, index: int) -> Iterable[Any]:
    """``get_cat_ids(index)``'s categories: an iterable of ids, not a bare id or a string (whose
    characters would be taken as ids)."""
    if isinstance(cats, (str, bytes)) or not isinstance(cats, Iterable):
        raise TypeError(
            f"ClassBalancedDataset: get_cat_ids({index}) must return the sample's category ids "
            f"(a list, e.g. [{cats!r}]), got {type(cats).__name__} {cats!r}"
        )
    return cats


def repeat_factors(num_samples: int, cat_ids: CatIds, oversample_thr: float) -> list[float]:
    """MMEngine's per-sample repeat factors (LVIS repeat-factor sampling, arXiv:1908.03195).

    ``f(c)``: the fraction of samples whose category set holds ``c``;
    ``r(c) = max(1, sqrt(oversample_thr / f(c)))``; a sample's factor is the
    largest ``r(c)`` over its categories, ``1.0`` when it has none. The
    arithmetic is MMEngine's, operation for operation, so the floats are equal.
    """
    sets = [{_category(c) for c in _categories(cat_ids(i), i)} for i in range(num_samples)]
    category_freq: defaultdict[Hashable, float] = defaultdict(float)
    for cats in sets:
        for c in cats:
            category_freq[c] += 1
    for c, count in category_freq.items():
        category_freq[c] = count / num_samples
    category_repeat = {
        c: max(1.0, math.sqrt(oversample_thr / freq)) for c, freq in category_freq.items()
    }
    return [max({category_repeat[c] for c in cats}) if cats else 1.0 for cats in sets]


class ClassBalancedDataset:
    """Oversamples samples of rare categories (MMEngine's ``ClassBalancedDataset``).

    Sample ``j`` appears ``ceil(r_j)`` times in a row, ``r_j`` its repeat factor
    from :func:`repeat_factors` (``self.repeat_factors``); ``self.repeat_indices``
    is the resulting index map. Categories come from ``get_cat_ids(idx)`` if
    given, else from the dataset's own ``get_cat_ids`` method (MMEngine's hook);
    e.g. for a ``TensorDataset(x, labels)``:
    ``get_cat_ids=lambda i: [int(labels[i])]``. The callable is used only here,
    while building, and is not kept (so the wrapper stays picklable for workers).

    Args:
        dataset: a map-style dataset.
        oversample_thr: frequency below which a category is oversampled (>= 0);
            a category with ``f(c) >= oversample_thr`` is not.
        get_cat_ids: ``idx -> iterable of category ids`` of sample ``idx``.
    """

    def __init__(
        self, dataset: Any, oversample_thr: float, *, get_cat_ids: CatIds | None = None
    ) -> None:
        _check_map_style("ClassBalancedDataset", dataset)
        if (
            isinstance(oversample_thr, bool)
            or not isinstance(oversample_thr, (int, float))
            or not math.isfinite(oversample_thr)
            or oversample_thr < 0
        ):
            raise ValueError(
                "ClassBalancedDataset: `oversample_thr` must be a finite number >= 0 (a category "
                f"frequency), got {oversample_thr!r}"
            )
        if get_cat_ids is None:
            get_cat_ids = getattr(dataset, "get_cat_ids", None)
            if get_cat_ids is None:
                raise TypeError(
                    f"ClassBalancedDataset: {type(dataset).__name__} has no `get_cat_ids(idx)`; "
                    "give the dataset that method or pass `get_cat_ids=` (idx -> category ids)"
                )
        self.dataset = dataset
        self.oversample_thr = oversample_thr
        self.repeat_factors = repeat_factors(len(dataset), get_cat_ids, oversample_thr)
        self.repeat_indices = [
            j for j, r in enumerate(self.repeat_factors) for _ in range(math.ceil(r))
        ]

    def __len__(self) -> int:
        return len(self.repeat_indices)

    def source_index(self, idx: int) -> int:
        """The wrapped dataset's index behind ``self[idx]``."""
        return self.repeat_indices[_position("ClassBalancedDataset", idx, len(self))]

    def __getitem__(self, idx: int) -> Any:
        return self.dataset[self.source_index(idx)]

    def get_cat_ids(self, idx: int) -> list[Any]:
        return _inner_cat_ids("ClassBalancedDataset", self.dataset, self.source_index(idx))


class ConcatDataset:
    """The samples of ``datasets`` one after another (MMEngine's / torch's ``ConcatDataset``).

    Index ``i`` falls in the first dataset whose cumulative size exceeds it
    (``self.cumulative_sizes``, as torch's); negative indices count from the end.
    """

    def __init__(self, datasets: Sequence[Any]) -> None:
        if isinstance(datasets, (str, bytes)) or not isinstance(datasets, Sequence):
            raise TypeError(
                "ConcatDataset: `datasets` must be a sequence of map-style datasets, got "
                f"{type(datasets).__name__}"
            )
        if len(datasets) == 0:
            raise ValueError("ConcatDataset: `datasets` is empty; expected at least one dataset")
        for k, d in enumerate(datasets):
            _check_map_style("ConcatDataset", d, f"datasets[{k}]")
        self.datasets = list(datasets)
        self.cumulative_sizes: list[int] = []
        total = 0
        for d in self.datasets:
            total += len(d)
            self.cumulative_sizes.append(total)

    def __len__(self) -> int:
        return self.cumulative_sizes[-1]

    def source_index(self, idx: int) -> tuple[int, int]:
        """``(dataset number, index in that dataset)`` behind ``self[idx]``."""
        i = _position("ConcatDataset", idx, len(self))
        k = bisect.bisect_right(self.cumulative_sizes, i)
        return k, i - (self.cumulative_sizes[k - 1] if k else 0)

    def __getitem__(self, idx: int) -> Any:
        k, i = self.source_index(idx)
        return self.datasets[k][i]

    def get_cat_ids(self, idx: int) -> list[Any]:
        k, i = self.source_index(idx)
        return _inner_cat_ids("ConcatDataset", self.datasets[k], i)
