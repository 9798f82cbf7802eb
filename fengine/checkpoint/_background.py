"""Asynchronous saves: a snapshot of the state's tensors, written by one background thread.

The step updates the state's tensors in place (it donates the state), so a background
write must not read them: `Snapshots.take` copies every tensor into one CPU buffer first
(pinned, with a non-blocking copy and a CUDA event, when the tensor is on a GPU), laid out
as the file's data, which the writer sends to the disk by direct I/O; the training loop goes
on while `Writer` runs the job that writes the copy. The buffers are
reused by the next snapshot, which `Writer` allows only once the previous job is done: at
most one save is pending, the next one waits for it.

A job's exception (``BaseException`` included) is kept and raised on the caller's thread
by the next `Writer.wait` (`fit` calls it at the next save, at a preemption and at the end),
so a failed background save is never silently lost.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from typing import Any

import torch
import torch.utils._pytree as pytree

from fengine.checkpoint._format import DTYPE_NAMES
from fengine.checkpoint._io import PAGE
from fengine.checkpoint._tree import is_empty_dict
from fengine.sharding import is_dtensor
from fengine.state import TrainState


class Snapshots:
    """Copies of a state's tensors in one CPU buffer that is reused from one snapshot to the next.

    The copies lie back to back from a page boundary in the order `checkpoint.save` writes
    them (by element size, largest first; then in the state's order), so the writer sends the
    buffer to the disk by direct I/O, without another copy (`fengine.checkpoint._data`).
    """

    def __init__(self) -> None:
        self._layout: tuple = ()  # ((shape, dtype) per view, pinned)
        self._views: list[torch.Tensor] = []  # one per distinct tensor, in layout order

    def take(self, state: TrainState) -> tuple[TrainState, Callable[[], None]]:
        """``(copy, ready)``: a state like ``state`` whose tensors are CPU copies, and a function that
        returns once the copies are complete (GPU copies run asynchronously until then).

        Non-tensor leaves are shared (they are immutable); tensors that are one object in
        ``state`` (EMA weights aliasing live ones) are one object in the copy. The copy is
        valid until the next `take`.
        """
        leaves, spec = pytree.tree_flatten(state, is_leaf=is_empty_dict)
        distinct: dict[int, torch.Tensor] = {}
        for x in leaves:
            if isinstance(x, torch.Tensor) and not _unsupported(x):
                distinct.setdefault(id(x), x)
        order = sorted(distinct.values(), key=lambda t: -t.element_size())  # stable: save's order
        layout = (tuple((t.shape, t.dtype) for t in order), any(t.is_cuda for t in order))
        if layout != self._layout:
            self._views, self._layout = _allocate(*layout), layout
        copies: dict[int, torch.Tensor] = {}
        gpus: set[torch.device] = set()
        for x, buf in zip(order, self._views):
            gpu = x.device.type == "cuda"
            buf.copy_(x.detach(), non_blocking=gpu)  # on x's stream: before later updates of x
            copies[id(x)] = buf
            if gpu:
                gpus.add(x.device)
        # unsupported tensors stay: the writer raises save's error naming them
        copy = pytree.tree_unflatten([copies.get(id(x), x) for x in leaves], spec)
        events = []
        for device in gpus:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(device))
            events.append(event)

        def ready() -> None:
            for event in events:
                event.synchronize()

        return copy, ready


def _allocate(shapes: tuple, pinned: bool) -> list[torch.Tensor]:
    """Views of one page-aligned buffer (pinned for GPU copies), back to back, one per
    ``(shape, dtype)`` of ``shapes``."""
    sizes = [math.prod(shape) * dtype.itemsize for shape, dtype in shapes]
    # pinned blocks usually start on a page and are rounded up to a power of two: no slack that
    # would double a 2**k-byte state, unless the block is not page-aligned (seen: 512 bytes off,
    # torch 2.11 on an H200); CPU memory is 64-byte aligned: a page of slack
    raw = torch.empty(sum(sizes) + (0 if pinned else PAGE), dtype=torch.uint8, pin_memory=pinned)
    if pinned and raw.data_ptr() % PAGE:
        raw = torch.empty(sum(sizes) + PAGE, dtype=torch.uint8, pin_memory=True)
    at = -raw.data_ptr() % PAGE
    views = []
    for (shape, dtype), n in zip(shapes, sizes):
        views.append(raw[at : at + n].view(dtype).view(shape))
        at += n
    return views


def _unsupported(t: torch.Tensor) -> bool:
    """Tensors `checkpoint.save` refuses (it names them): left in place, not copied."""
    return (
        is_dtensor(t)
        or t.layout != torch.strided
        or t.is_quantized
        or t.device.type == "meta"
        or t.dtype not in DTYPE_NAMES
    )


class Writer:
    """Runs one background job at a time; its result or error is collected by `wait`."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._result: Any = None
        self._error: BaseException | None = None

    @property
    def pending(self) -> bool:
        """A job was submitted and not yet collected by `wait`."""
        return self._thread is not None

    def done(self) -> bool:
        """The pending job has finished (`wait` would not block); False when none is pending."""
        return self._thread is not None and not self._thread.is_alive()

    def submit(self, job: Callable[[], Any]) -> None:
        """Start ``job`` on a background thread; the previous job must have been collected (`wait`)."""
        if self._thread is not None:
            raise RuntimeError(
                "Writer.submit: the previous job is still pending; call wait() first"
            )

        def run() -> None:
            try:
                self._result = job()
            except BaseException as e:  # noqa: B036 - kept and raised on the caller's thread by wait()
                self._error = e

        self._result = self._error = None
        self._thread = threading.Thread(target=run, name="fengine-checkpoint-writer")
        self._thread.start()

    def wait(self) -> Any:
        """Wait for the pending job and return its result (None when nothing is pending); raise its error."""
        if self._thread is None:
            return None
        self._thread.join()
        self._thread = None
        error, result = self._error, self._result
        self._error = self._result = None
        if error is not None:
            raise error
        return result
