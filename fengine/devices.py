"""Devices: where a state lives, moving batches there, and errors that name both sides.

`fit` and `evaluate` move every batch to the state's device before the step, as
MMEngine's data preprocessor does: nested tuples, lists, dicts and named tuples of
tensors are rebuilt with each tensor moved (``non_blocking`` when it is pinned, so
the copy overlaps the previous step on CUDA); anything else is left alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


__all__ = ["default_device", "device_of", "devices_in", "parse_device", "to_device"]


def parse_device(device: str | torch.device, where: str) -> torch.device:
    """``device`` as a `torch.device` that is present here; a ValueError naming ``where`` if not."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"{where}: device must be 'cpu', 'cuda' or 'cuda:N' (a torch device), got {device!r}"
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{where}: device {device!r} but CUDA is not available here")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(
            f"{where}: device {device!r} but this machine has {torch.cuda.device_count()} CUDA devices"
        )
    return dev


def default_device() -> torch.device:
    """``cuda`` when available (this process's current CUDA device), else ``cpu``."""
    return (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )


def device_of(tensors: Mapping[str, torch.Tensor]) -> torch.device:
    """The device of the first tensor (a state's params live on one device)."""
    for t in tensors.values():
        return t.device
    return torch.device("cpu")


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor on ``device``; the same object when nothing had to move."""
    if isinstance(batch, torch.Tensor):
        return batch if batch.device == device else batch.to(device, non_blocking=batch.is_pinned())
    if isinstance(batch, (tuple, list)):
        if all([type(b) is torch.Tensor and b.device == device for b in batch]):
            return batch  # the usual (inputs, targets) already there: no call per element
        moved = [to_device(b, device) for b in batch]
        if all(m is b for m, b in zip(moved, batch)):
            return batch
        if hasattr(batch, "_fields"):  # a NamedTuple
            return type(batch)(*moved)
        return _rebuild(type(batch), moved)
    if isinstance(batch, Mapping):
        moved_map = {k: to_device(v, device) for k, v in batch.items()}
        if all(moved_map[k] is v for k, v in batch.items()):
            return batch
        return moved_map if type(batch) is dict else _rebuild(type(batch), moved_map)
    return batch


def _rebuild(kind: type, content: Any) -> Any:
    """``kind(content)`` (tuple, list, MicroBatches, OrderedDict, ...), else ``content`` as it is."""
    try:
        return kind(content)
    except TypeError:
        return content


def devices_in(batch: Any) -> set[torch.device]:
    """Every device a tensor of ``batch`` is on (for error messages)."""
    if isinstance(batch, torch.Tensor):
        return {batch.device}
    if isinstance(batch, (tuple, list)):
        return set().union(*(devices_in(b) for b in batch)) if batch else set()
    if isinstance(batch, Mapping):
        return set().union(*(devices_in(v) for v in batch.values())) if batch else set()
    return set()
