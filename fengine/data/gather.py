"""Batches of a plain ``torch.utils.data.DataLoader`` over an in-memory ``TensorDataset``, gathered.

A single-process DataLoader builds each batch from ``batch_size`` calls of
``TensorDataset.__getitem__`` (one view per tensor per sample) and ``default_collate``'s
``torch.stack`` of them: for a 64-sample batch of an MLP that is ~1.7M CPU
instructions, as much as the training step itself. Those rows stacked are exactly
``tensor.index_select(0, indices)``, one call per tensor. `gathered` iterates the
loader the DataLoader's own way (its iterator draws the base seed and walks its
sampler, so the order and every RNG draw are the same) and gathers each batch that
way: the same values, dtypes, shapes and strides (both are contiguous copies), the
same list type ``default_collate`` returns for a tuple sample, pinned when the loader
pins. Anything else (workers, a custom collate or dataset, indices that are not a
list of in-range ints) goes the DataLoader's way, so errors are its own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset, dataloader as _dataloader, default_collate
from torch.utils.data._utils.pin_memory import pin_memory


__all__ = ["gathered"]


def gathered(
    data: Any, start: int = 0, on_skipped: Callable[[], None] | None = None
) -> Iterator | None:
    """The batches of one pass of ``data`` from batch ``start``, gathered (see the module), or None
    when ``data`` is not a single-process DataLoader of an unmodified CPU ``TensorDataset``
    collated by ``default_collate``. Skipped batches are not loaded (their indices are drawn);
    ``on_skipped`` runs after those draws, before batch ``start``'s."""
    if not _gatherable(data):
        return None
    it = iter(data)
    if type(it) is not _dataloader._SingleProcessDataLoaderIter:
        return None
    return _batches(it, data.dataset.tensors, start, on_skipped)


def _gatherable(data: Any) -> bool:
    dataset = getattr(data, "dataset", None)
    return (
        isinstance(data, DataLoader)
        and type(data).__iter__ is DataLoader.__iter__
        and type(data)._get_iterator is DataLoader._get_iterator
        and data.num_workers == 0
        and data.batch_sampler is not None  # batches of indices, collated
        and data.collate_fn is default_collate
        and type(dataset) is TensorDataset
        and all(t.device.type == "cpu" for t in dataset.tensors)
    )


def _batches(
    it: Any, tensors: tuple[torch.Tensor, ...], start: int, on_skipped: Callable[[], None] | None
) -> Iterator[Any]:
    for _ in range(start):  # drawn, not loaded
        try:
            it._next_index()
        except StopIteration:
            break
        it._num_yielded += 1
    if on_skipped is not None:
        on_skipped()
    while True:
        try:
            index = it._next_index()
        except StopIteration:
            return
        it._num_yielded += 1
        batch = _gather(tensors, index)
        if batch is None:  # not a list of in-range ints: the DataLoader's own fetch
            batch = it._dataset_fetcher.fetch(index)
        if it._pin_memory:
            batch = pin_memory(batch, it._pin_memory_device)
        yield batch


def _gather(tensors: tuple[torch.Tensor, ...], index: Any) -> list[torch.Tensor] | None:
    if type(index) is not list or not index:
        return None
    try:
        idx = torch.tensor(index)
        if idx.dtype != torch.int64:
            return None
        return [t.index_select(0, idx) for t in tensors]
    except (IndexError, TypeError, ValueError, RuntimeError):
        return None
