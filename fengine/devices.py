"""Devices: where a state lives, moving batches there, and errors that name both sides.

`fit` and `evaluate` move every batch to the state's device before the step, as
MMEngine's data preprocessor does: nested tuples, lists, dicts and named tuples of
tensors are rebuilt with each tensor moved (``non_blocking`` when it is pinned, so
the copy overlaps the previous step on CUDA); any other object with a ``.to`` method
(MMEngine's ``BaseDataElement`` data samples) is moved with it; anything else is left alone.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch


__all__ = ["default_device", "device_of", "devices_in", "move_leaf", "parse_device", "to_device"]


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


_TAKES_NON_BLOCKING: dict[type, bool] = {}


def _to_takes_non_blocking(kind: type) -> bool:
    """Whether ``kind.to`` accepts ``non_blocking=`` (BaseDataElement's ``to(*args, **kwargs)``
    does); looked up once per type, as a batch may hold hundreds of data samples."""
    if kind not in _TAKES_NON_BLOCKING:
        try:
            params = list(inspect.signature(kind.to).parameters.values())  # type: ignore[attr-defined]
        except (AttributeError, TypeError, ValueError):  # an instance's own `to`, a builtin's
            params = []
        _TAKES_NON_BLOCKING[kind] = any(
            p.name == "non_blocking" or p.kind is p.VAR_KEYWORD for p in params
        )
    return _TAKES_NON_BLOCKING[kind]


def move_leaf(leaf: Any, device: torch.device | str, non_blocking: bool = False) -> Any:
    """A non-tensor leaf moved with its own ``.to(device)`` (an MMEngine ``BaseDataElement``, as
    MMEngine's ``cast_data`` moves it), passing ``non_blocking`` only where ``to`` takes it;
    a leaf without a ``.to`` method (a string, a number) as it is."""
    to = getattr(leaf, "to", None)
    if isinstance(leaf, type) or not callable(to):  # a class's unbound `to` moves nothing
        return leaf
    if _to_takes_non_blocking(type(leaf)):
        return to(device, non_blocking=non_blocking)
    return to(device)


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor on ``device``, and every other leaf with a ``.to`` method moved
    by it (see `move_leaf`); the same object when nothing had to move."""
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
    return move_leaf(batch, device)


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
