"""Events, handlers and snapshots: MMEngine's hooks as read-only event handlers.

A handler is any object with ``on_<event>(snap)`` methods for the events below
(MMEngine's hook points, same names). It receives a `Snapshot` and may return
signals (one, or a list): `Stop` to end training, `Save` to have `fit` write a
checkpoint, `Retire` to have it delete checkpoints it no longer keeps. It never changes the state: values a handler needs to
keep across a resume (best score, kept checkpoints) go in its own small
``state_dict()``, which `Checkpointer` stores in the checkpoint.

Handlers run in `Priority` order (smaller first, MMEngine's names and values),
then in registration order.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, NamedTuple

from fengine.state import TrainState


__all__ = [
    "EVENTS",
    "Dispatcher",
    "Handler",
    "Priority",
    "RunInfo",
    "Save",
    "Snapshot",
    "Stop",
    "on",
]

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
    ``background=True``: `fit` copies the state's tensors and writes the copy on a
    background thread while training goes on; the pointer moves and retired files go
    once the file is durable (see ``fengine.loop._Background``).
    """

    path: Path
    latest: bool = True
    background: bool = False  # `fit` writes a snapshot on a background thread and goes on


@dataclasses.dataclass(frozen=True)
class Retire:
    """Returned by a handler: checkpoint files it no longer keeps (rotation, a replaced best).

    Retention is data, not deletion: `fit` deletes them only after every `Save` of the
    same event is durable and ``last_checkpoint`` has moved, never the file the pointer
    names and never a file that is not a fengine checkpoint. A kill at any moment
    therefore leaves at least the old or the new file.
    """

    paths: tuple[Path, ...]


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
    rank: int = 0  # this process in torch.distributed's default group
    world_size: int = 1
    devices: tuple[str, ...] = ()  # every rank's device, in rank order


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
        """Completed epochs (at ``after_train_epoch``: including the one that just ended)."""
        return self.state.epoch

    @property
    def runner_epoch(self) -> int:
        """MMEngine's ``runner.epoch`` here, for ported hooks: the 0-based epoch in progress, not yet
        incremented at ``after_train_epoch``; 0 throughout an iteration-based run."""
        if not self.run.by_epoch:
            return 0
        return self.state.epoch - 1 if self.event == "after_train_epoch" else self.state.epoch

    @property
    def runner_iter(self) -> int:
        """MMEngine's ``runner.iter`` here: updates done before this one (at ``after_train_iter``
        MMEngine has not counted the current one yet)."""
        return self.state.step - 1 if self.event == "after_train_iter" else self.state.step


class Handler:
    """Optional base class: gives ``priority`` (NORMAL), ``name`` and an empty ``state_dict``.

    Subclasses define any ``on_<event>(snap)`` methods. Set ``priority`` as a class
    attribute or pass ``priority=`` to ``__init__``. A handler whose state must
    survive a resume (``state_dict``) is stored in the checkpoint under its
    ``name``: a stable, explicit key (class default, or ``name=``), so two
    handlers of one class can both persist.
    """

    priority: int = Priority.NORMAL
    name: str | None = None
    collective: bool = False
    """Acts on every rank at the same points (saves a checkpoint, stops the run): under torchrun
    `fit` refuses ranks that differ in such handlers or their cadence (a rank saving or
    stopping alone would wait for the others forever). A handler only rank 0 has (a logger,
    a tracker) leaves it False."""

    def __init__(self, *, priority: int | str | None = None, name: str | None = None) -> None:
        if priority is not None:
            self.priority = _priority(priority)
        if name is not None:
            if not isinstance(name, str) or not name:
                raise ValueError(
                    f"{type(self).__name__}: name must be a non-empty str, got {name!r}"
                )
            self.name = name

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
    if not isinstance(p, int) or isinstance(p, bool) or not 0 <= p <= 100:
        raise ValueError(f"priority must be an int in 0..100 or a Priority name, got {p!r}")
    return int(p)


_POSITION = {  # the 1-based count `on(every=, once=)` filters on, per event
    "before_train_iter": lambda s: s.state.step + 1,
    "after_train_iter": lambda s: s.state.step,
    "before_train_epoch": lambda s: s.state.epoch + 1,
    "after_train_epoch": lambda s: s.state.epoch,
}


class _On(Handler):
    """A plain function as a handler of one event (built by `on`)."""

    def __init__(
        self,
        event: str,
        fn: Callable[[Snapshot], Any],
        every: int | None,
        once: int | None,
        **kw: Any,
    ) -> None:
        super().__init__(**kw)
        self.event, self.fn, self.every, self.once, self.fired = event, fn, every, once, 0
        setattr(self, "on_" + event, self._call)

    def _call(self, snap: Snapshot) -> Any:
        self.fired += 1
        position = _POSITION.get(self.event)
        n = position(snap) if position is not None else self.fired
        if (self.every is None or n % self.every == 0) and (self.once is None or n == self.once):
            return self.fn(snap)
        return None

    def __repr__(self) -> str:
        return f"on({self.event!r}, {getattr(self.fn, '__name__', self.fn)})"


def on(
    event: str,
    *,
    every: int | None = None,
    once: int | None = None,
    priority: int | str | None = None,
    name: str | None = None,
) -> Callable[[Callable[[Snapshot], Any]], Handler]:
    """Make a plain function ``fn(snap)`` a handler of ``event`` (Ignite-style filters).

    ``every=n`` calls it when the event's count is a multiple of ``n``, ``once=n``
    only when it equals ``n``. The count is the update number for train-iteration
    events (``after_train_iter``: updates done; ``before_train_iter``: the update
    about to run), the epoch number for train-epoch events, and the number of
    times the event fired in this process for the others. The function may
    return signals (`Stop`, `Save`) like a handler method::

        @fe.on("after_train_iter", every=100)
        def show(snap):
            print(snap.step, float(snap.metrics["loss"]))
    """
    if event not in EVENTS:
        raise ValueError(f"on: unknown event {event!r}; events are {list(EVENTS)}")
    for what, value in (("every", every), ("once", once)):
        if value is not None and (
            not isinstance(value, int) or isinstance(value, bool) or value < 1
        ):
            raise ValueError(f"on: {what} must be an int >= 1, got {value!r}")

    def register(fn: Callable[[Snapshot], Any]) -> Handler:
        if not callable(fn):
            raise TypeError(
                f"on({event!r}): expected a function of the snapshot, got {type(fn).__name__}"
            )
        return _On(event, fn, every, once, priority=priority, name=name)

    return register


def _keeps_state(h: Any) -> bool:
    method = getattr(type(h), "state_dict", None)
    return callable(method) and method is not Handler.state_dict


def _check_handler(h: Any, events: tuple[str, ...]) -> None:
    """Refuse a handler that would never be called, or be called wrongly: a class instead of an
    instance, a bare function, MMEngine's hook method names, ``on_`` methods that are not events."""
    what = type(h).__name__
    if isinstance(h, type):
        raise TypeError(f"handlers: {h.__name__} is a class; pass an instance, {h.__name__}(...)")
    methods = [m for m in dir(h) if m.startswith("on_") and callable(getattr(h, m))]
    unknown = [m for m in methods if m[3:] not in events]
    if unknown:
        raise ValueError(
            f"{what} defines {unknown}, which are not events; events are {list(events)}"
        )
    if any(getattr(h, "on_" + e, None) is not None for e in events):
        return
    mmengine = [e for e in events if callable(getattr(h, e, None))]
    if mmengine:
        raise ValueError(
            f"{what} defines {mmengine}, MMEngine's hook method names; fengine calls on_<event>(snap) "
            f"methods: rename them ({', '.join('on_' + e for e in mmengine)})"
        )
    if isinstance(h, Handler):  # every event switched off (EmptyCache(False, False, False))
        return
    if callable(h):
        raise TypeError(
            f"handlers: {getattr(h, '__name__', what)} is a plain function, which no event calls; "
            "register it for an event with fe.on('after_train_iter')(fn) (or @fe.on(...))"
        )
    raise TypeError(f"handlers: a {what} has no on_<event> method; events are {list(events)}")


class Dispatcher:
    """Calls handlers' ``on_<event>`` methods in priority order; collects `Stop` and `Save` signals."""

    def __init__(
        self, handlers: Iterable[Any], *, extra_events: Iterable[str] = (), also: Iterable[Any] = ()
    ) -> None:
        """``extra_events``: names a custom loop fires besides MMEngine's (as MMEngine lets a custom loop
        call new hook names); handlers may define ``on_<name>`` for them. ``also``: handlers the
        caller adds to the user's (`fit`'s DataLoader generator record)."""
        self.events = (*EVENTS, *extra_events)
        if isinstance(handlers, (str, bytes)):
            raise TypeError(
                f"handlers must be handler objects (e.g. [fe.handlers.Logger()]), got the string {handlers!r}"
            )
        self.handlers = [*handlers, *also]
        for h in self.handlers:
            _check_handler(h, self.events)
        names = [getattr(h, "name", None) for h in self.handlers if _keeps_state(h)]
        if None in names:
            h = next(
                h for h in self.handlers if _keeps_state(h) and getattr(h, "name", None) is None
            )
            raise ValueError(
                f"{type(h).__name__} keeps state across resumes (state_dict) but has no name; "
                "give it one (name=...) so its checkpointed state has a stable key"
            )
        twice = sorted({str(n) for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(
                f"several handlers keeping state are named {twice}; pass name=... to tell them apart"
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
            for event in self.events
        }
        self.stop: Stop | None = None
        self.saves: list[Save] = []
        self.retires: list[Path] = []

    def wants(self, event: str) -> bool:
        return bool(self._table[event])

    def __call__(self, event: str, state: TrainState, run: RunInfo, **fields: Any) -> None:
        """Build the event's `Snapshot` (only if a handler listens) and call the handlers."""
        methods = self._table[event]
        if not methods:
            return
        metrics = fields.get("metrics")
        if type(metrics) is dict:  # read-only: one handler's edit would reach the next ones
            fields["metrics"] = MappingProxyType(metrics)
        snap = Snapshot(event, state, run, **fields)
        for method in methods:
            returned = method(snap)
            if returned is None:
                continue
            for signal in returned if isinstance(returned, (list, tuple)) else (returned,):
                if isinstance(signal, Stop) and self.stop is None:
                    self.stop = signal
                elif isinstance(signal, Save) and signal not in self.saves:
                    self.saves.append(signal)
                elif isinstance(signal, Retire):
                    self.retires.extend(p for p in signal.paths if p not in self.retires)

    def state_dicts(self) -> dict[str, Any]:
        """``state_dict()`` of every handler that keeps one, by handler name."""
        out: dict[str, Any] = {}
        for h in self.handlers:
            if _keeps_state(h):
                sd = h.state_dict()
                if sd:
                    out[h.name] = sd
        return out

    def close(self) -> None:
        """Call ``close()`` on the handlers that have one (a run or pass ending without
        ``after_run``: files and tracker runs closed, their data flushed); a handler's failure to
        close is logged, not raised over the error that may be ending the run."""
        for h in self.handlers:
            close = getattr(h, "close", None)
            if callable(close):
                try:
                    close()
                except Exception as e:  # noqa: BLE001 - the run's own error is the one to raise
                    logging.getLogger("fengine").error(
                        "closing %s failed: %s: %s", type(h).__name__, type(e).__name__, e
                    )

    def load_state_dicts(self, states: Mapping[str, Any]) -> None:
        """Each handler's saved state, by name. The states come from a file: a handler that cannot
        load its own raises ``ValueError`` naming the handler (the caller adds the file); that
        includes a number out of range (``OverflowError``: a hex float ``'0x1p+99999'``) and
        data nested too deep to walk (``RecursionError``)."""
        for h in self.handlers:
            if _keeps_state(h) and h.name in states:
                try:
                    h.load_state_dict(states[h.name])
                except (
                    TypeError, ValueError, KeyError, AttributeError, IndexError, ArithmeticError,
                    RecursionError,
                ) as e:  # fmt: skip
                    raise ValueError(
                        f"handler {h.name!r} cannot load its saved state: {type(e).__name__}: {e}"
                    ) from e
