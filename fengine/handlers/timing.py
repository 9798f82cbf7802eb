"""`Timer`: per-iteration wall time, data-loading time and ETA (MMEngine's ``IterTimerHook``).

Timing is an effect of running, not part of the state: the timer keeps its
measurements to itself and other handlers (`Logger`, `TensorBoard`,
`ProgressBar`) read them from the `Timer` instance they were given.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Callable

from fengine.events import Handler, Priority, Snapshot


__all__ = ["Timer"]

PHASES = ("train", "val", "test")


@dataclasses.dataclass(slots=True)  # slots: its fields are updated after every iteration
class _Phase:
    """Measurements of one phase: a window of recent iterations plus running sums."""

    times: collections.deque
    data_times: collections.deque
    epoch_time: float = 0.0  # since the current train epoch / eval pass began
    epoch_data_time: float = 0.0
    epoch_n: int = 0
    total_time: float = 0.0  # since this process's `before_train` (train) or ever (val/test)
    total_data_time: float = 0.0
    total_n: int = 0
    pending_data_time: float | None = None
    latest: tuple[float, float] | None = None  # (time, data_time) of the last iteration

    def add(self, t: float, d: float) -> None:
        self.latest = (t, d)
        self.times.append(t)
        self.data_times.append(d)
        self.epoch_time += t
        self.epoch_data_time += d
        self.epoch_n += 1
        self.total_time += t
        self.total_data_time += d
        self.total_n += 1

    def new_epoch(self) -> None:
        self.epoch_time = self.epoch_data_time = 0.0
        self.epoch_n = 0


class Timer(Handler):
    """Measure ``time`` and ``data_time`` of every train/val/test iteration; estimate the ETA.

    ``time`` runs from the end of the previous iteration (or the start of the
    epoch / evaluation pass) to the end of this one, so it includes data loading
    and the handlers that ran after the previous iteration; ``data_time`` is the
    wait for the batch (the loop measures it for training iterations; for
    evaluation the timer measures up to ``before_*_iter``). As in MMEngine, time
    spent in a validation pass is not charged to the next training iteration.

    Args:
        window_size: how many recent iterations `mean` averages over by default.
        clock: seconds as a float (``time.perf_counter``); tests pass a fake clock.

    Priority NORMAL (MMEngine's IterTimerHook), so at ``after_*_iter`` it runs
    before `Logger` (BELOW_NORMAL) and the logger sees this iteration's time.
    """

    priority = Priority.NORMAL

    def __init__(
        self,
        window_size: int = 10,
        *,
        clock: Callable[[], float] = time.perf_counter,
        priority: int | str | None = None,
    ) -> None:
        super().__init__(priority=priority)
        if isinstance(window_size, bool) or not isinstance(window_size, int) or window_size < 1:
            raise ValueError(f"Timer: window_size must be an int >= 1, got {window_size!r}")
        self.window_size = window_size
        self.clock = clock
        self._phases = {p: self._new_phase() for p in PHASES}
        self._t: float | None = None  # end of the last iteration / start of the epoch

    def _new_phase(self) -> _Phase:
        return _Phase(
            collections.deque(maxlen=self.window_size), collections.deque(maxlen=self.window_size)
        )

    # ------------------------------------------------------------------ events
    def on_before_train(self, snap: Snapshot) -> None:
        # The ETA averages over this process's iterations only (restart-aware).
        self._phases["train"] = self._new_phase()
        self._t = self.clock()

    def _before_epoch(self, phase: str) -> None:
        self._phases[phase].new_epoch()
        self._t = self.clock()

    def _before_iter(self, snap: Snapshot) -> None:
        last = self._t
        own = self.clock() - last if last is not None else 0.0
        # The loop's measurement when it gives one, bounded by the time since the last
        # iteration ended (after a validation pass the loop's clock also counts the pass).
        loop = snap.data_time
        self._phases[snap.phase].pending_data_time = own if loop is None else min(float(loop), own)

    def _after_iter(self, snap: Snapshot) -> None:
        now, last = self.clock(), self._t
        ph = self._phases[snap.phase]
        t = now - last if last is not None else 0.0
        d = ph.pending_data_time
        if d is None:  # no before_*_iter seen
            d = float(snap.data_time) if snap.data_time is not None else 0.0
        ph.pending_data_time = None
        ph.add(t, t if t < d else d)  # min(d, t) without the call
        self._t = now

    def on_before_train_epoch(self, snap: Snapshot) -> None:
        self._before_epoch("train")

    def on_before_val_epoch(self, snap: Snapshot) -> None:
        self._before_epoch("val")

    def on_before_test_epoch(self, snap: Snapshot) -> None:
        self._before_epoch("test")

    on_before_train_iter = _before_iter
    on_before_val_iter = _before_iter
    on_before_test_iter = _before_iter
    on_after_train_iter = _after_iter
    on_after_val_iter = _after_iter
    on_after_test_iter = _after_iter

    # ------------------------------------------------------------------ reading
    def count(self, phase: str = "train") -> int:
        """Iterations measured in ``phase`` (train: since ``before_train`` of this process)."""
        return self._phases[_check_phase(phase)].total_n

    def last(self, phase: str = "train") -> tuple[float, float] | None:
        """``(time, data_time)`` of the latest iteration of ``phase``, or None before the first."""
        ph = self._phases.get(phase)  # read after every iteration: the check only on a miss
        return (ph if ph is not None else self._phases[_check_phase(phase)]).latest

    def mean(
        self, key: str = "time", phase: str = "train", window: int | str | None = None
    ) -> float | None:
        """Mean ``time`` or ``data_time`` of ``phase``.

        ``window``: None (the last ``window_size`` iterations), an int ``n <= window_size``
        (the last ``n``), ``"epoch"`` (since the current train epoch / evaluation pass
        began) or ``"global"`` (train: since this process started training; val/test:
        all passes). None when nothing was measured.
        """
        if key not in ("time", "data_time"):
            raise ValueError(f"Timer.mean: key must be 'time' or 'data_time', got {key!r}")
        ph = self._phases[_check_phase(phase)]
        if window == "epoch":
            n, s = ph.epoch_n, (ph.epoch_time if key == "time" else ph.epoch_data_time)
            return s / n if n else None
        if window == "global":
            n, s = ph.total_n, (ph.total_time if key == "time" else ph.total_data_time)
            return s / n if n else None
        if window is None:
            window = self.window_size
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(
                f"Timer.mean: window must be None, an int >= 1, 'epoch' or 'global', got {window!r}"
            )
        if window > self.window_size:
            raise ValueError(
                f"Timer.mean: window {window} is longer than the {self.window_size} iterations this timer "
                f"keeps; build it with Timer(window_size={window})"
            )
        values = list(ph.times if key == "time" else ph.data_times)[-window:]
        return sum(values) / len(values) if values else None

    def eta(self, snap: Snapshot) -> float | None:
        """Seconds left, as MMEngine estimates it, after the iteration ``snap`` describes.

        Train: mean iteration time since this process started (iterations before a
        resume do not count: ``run.start_step``) times the updates left,
        ``max_steps - step``. Val/test: mean time of this pass times the batches left.
        None when it cannot be estimated yet.
        """
        phase = _check_phase(snap.phase)
        ph = self._phases[phase]
        if phase == "train":
            done = snap.step - snap.run.start_step
            if done <= 0 or ph.total_n == 0:
                return None
            return ph.total_time / done * max(snap.run.max_steps - snap.step, 0)
        if snap.batch_idx is None or snap.eval_len is None or ph.epoch_n == 0:
            return None
        return ph.epoch_time / (snap.batch_idx + 1) * max(snap.eval_len - snap.batch_idx - 1, 0)


def _check_phase(phase: str) -> str:
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
    return phase
