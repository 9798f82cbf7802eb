"""Events, handlers and snapshots: MMEngine's hooks as read-only event handlers.

A handler is any object with ``on_<event>(snap)`` methods for the events below
(MMEngine's hook points, same names). It receives a `Snapshot` and may return
signals (one, or a list): `Stop` to end training, `Save` to have `fit` write a
checkpoint. It never changes the state: values a handler needs to
keep across a resume (best score, kept checkpoints) go in its own small
``state_dict()``, which `Checkpointer` stores in the checkpoint.

Handlers run in `Priority` order (smaller first, MMEngine's names and values),
then in registration order.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, NamedTuple

from fengine.state import TrainState


__all__ = ["EVENTS", "Dispatcher", "Handler", "Priority", "RunInfo", "Save", "Snapshot", "Stop"]

EVENTS = (
    "before_run",
    "after_load_checkpoint",
    "before_train",
    "before_train_epoch",
    "before_train_iter",
    "after_train_iter",
    "after_train_epoch",
    "before_val",
    "before_val_epoch",
    "before_val_iter",
    "after_val_iter",
    "after_val_epoch",
    "after_val",
    "before_save_checkpoint",
    "after_save_checkpoint",
    "before_test",
    "before_test_epoch",
    "before_test_iter",
    "after_test_iter",
    "after_test_epoch",
    "after_test",
    "after_train",
    "after_run",
)


class Priority(enum.IntEnum):
    """MMEngine's hook priorities: a smaller value runs first."""

    HIGHEST = 0
    VERY_HIGH = 10
    HIGH = 30
    ABOVE_NORMAL = 40
    NORMAL = 50
    BELOW_NORMAL = 60
    LOW = 70
    VERY_LOW = 90
    LOWEST = 100


@dataclasses.dataclass(frozen=True)
class Stop:
    """Returned by a handler to end training after the current event."""

    reason: str


@dataclasses.dataclass(frozen=True)
class Save:
    """Returned by a handler to have `fit` write a checkpoint of the current state to ``path``.

    `fit` is the only writer of checkpoints: it adds the handlers' ``state_dict()``s
    and the run config to the file, fires ``before/after_save_checkpoint``, and with
    ``latest=True`` moves ``work_dir/last_checkpoint`` to the file once it is complete.
    """

    path: Path
    latest: bool = True


@dataclasses.dataclass(frozen=True)
class RunInfo:
    """Facts about the run that do not change while it runs."""

    work_dir: Path | None
    by_epoch: bool
    max_epochs: int | None
    max_steps: int
    steps_per_epoch: int  # optimizer updates per epoch
    batches_per_epoch: int  # loader batches per epoch (micro-batches with accumulation)
    micro_batches: int
    start_step: int  # the step this process started (or resumed) at
    val_batches: int | None = None
    config: Mapping[str, Any] | None = None


_NO_METRICS: Mapping[str, Any] = MappingProxyType({})


class Snapshot(NamedTuple):
    """What a handler sees at an event. Read-only; ``state`` is valid during the call only
    (the next step consumes it): ``state.clone()`` to keep it. (A NamedTuple: it is
    built twice per training step.)"""

    event: str
    state: TrainState
    run: RunInfo
    phase: str = "train"  # train | val | test
    batch_idx: int | None = (
        None  # index of the batch (update) within the epoch / eval pass, 0-based
    )
    batch: Any = None
    metrics: Mapping[str, Any] = _NO_METRICS  # step metrics or evaluation results
    outputs: Any = None
    data_time: float | None = None  # seconds spent waiting for the batch (set at iter events)
    eval_len: int | None = None  # batches in the current val/test pass
    checkpoint: Path | None = None  # at save/load checkpoint events

    @property
    def step(self) -> int:
        return self.state.step

    @property
    def epoch(self) -> int:
        return self.state.epoch


class Handler:
    """Optional base class: gives ``priority`` (NORMAL) and empty ``state_dict``.

    Subclasses define any ``on_<event>(snap)`` methods. Set ``priority`` as a class
    attribute or pass ``priority=`` to ``__init__``.
    """

    priority: int = Priority.NORMAL

    def __init__(self, *, priority: int | str | None = None) -> None:
        if priority is not None:
            self.priority = _priority(priority)

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable values this handler must carry across a resume."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        del state


def _priority(p: int | str) -> int:
    if isinstance(p, str):
        try:
            return Priority[p.upper()]
        except KeyError:
            raise ValueError(
                f"unknown priority {p!r}; expected one of {[x.name for x in Priority]} or 0..100"
            ) from None
    if not isinstance(p, int) or not 0 <= p <= 100:
        raise ValueError(f"priority must be an int in 0..100 or a Priority name, got {p!r}")
    return int(p)


class Dispatcher:
    """Calls handlers' ``on_<event>`` methods in priority order; collects `Stop` signals."""

    def __init__(self, handlers: Iterable[Any]) -> None:
        self.handlers = list(handlers)
        for h in self.handlers:
            unknown = [
                m
                for m in dir(h)
                if m.startswith("on_") and m[3:] not in EVENTS and callable(getattr(h, m))
            ]
            if unknown:
                raise ValueError(
                    f"{type(h).__name__} defines {unknown}, which are not events; events are {list(EVENTS)}"
                )
        order = sorted(
            range(len(self.handlers)),
            key=lambda i: (_priority(getattr(self.handlers[i], "priority", Priority.NORMAL)), i),
        )
        self.handlers = [self.handlers[i] for i in order]
        self._table: dict[str, list[Callable]] = {
            event: [
                getattr(h, "on_" + event)
                for h in self.handlers
                if callable(getattr(h, "on_" + event, None))
            ]
            for event in EVENTS
        }
        self.stop: Stop | None = None
        self.saves: list[Save] = []

    def wants(self, event: str) -> bool:
        return bool(self._table[event])

    def __call__(self, event: str, snap_factory: Callable[[], Snapshot]) -> None:
        methods = self._table[event]
        if not methods:
            return
        snap = snap_factory()
        for method in methods:
            returned = method(snap)
            if returned is None:
                continue
            for signal in returned if isinstance(returned, (list, tuple)) else (returned,):
                if isinstance(signal, Stop) and self.stop is None:
                    self.stop = signal
                elif isinstance(signal, Save) and signal not in self.saves:
                    self.saves.append(signal)

    def state_dicts(self) -> dict[str, Any]:
        """``state_dict()`` of every handler that has one, keyed by class name (``Name#2`` for repeats)."""
        out: dict[str, Any] = {}
        for key, h in self._keyed():
            sd = h.state_dict() if callable(getattr(h, "state_dict", None)) else None
            if sd:
                out[key] = sd
        return out

    def load_state_dicts(self, states: Mapping[str, Any]) -> None:
        for key, h in self._keyed():
            if key in states and callable(getattr(h, "load_state_dict", None)):
                h.load_state_dict(states[key])

    def _keyed(self):
        seen: dict[str, int] = {}
        for h in self.handlers:
            name = type(h).__name__
            seen[name] = seen.get(name, 0) + 1
            yield (name if seen[name] == 1 else f"{name}#{seen[name]}"), h
