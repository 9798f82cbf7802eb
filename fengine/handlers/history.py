"""`History`: MMEngine's ``HistoryBuffer`` -- one logged quantity's values and counts.

A value is logged with a ``count`` (1 per iteration, or the batch size to average
per sample); the mean over a window is ``sum(values) / sum(counts)`` over its last
``window`` entries (MMEngine's count-weighted mean: ``History([1, 2, 3], [2, 2, 2]).mean()``
is 1). At most ``max_length`` entries are kept (the oldest are dropped). Statistics are
methods (``mean``, ``min``, ``max``, ``current``) or functions registered by name with
`History.register_statistics`, reachable by name through ``statistics(name, ...)`` and
from the logger's `fengine.handlers.Stat` (``Stat("loss", "weighted_mean", ...)``).

`fengine.handlers.ScalarHistory` is the logger's multi-key, device-lazy store built on
the same rules; this class is the plain host-side buffer, for your own bookkeeping.
"""

from __future__ import annotations

import collections
import itertools
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar

import numpy as np


__all__ = ["BUILTIN_STATISTICS", "History", "statistic"]

BUILTIN_STATISTICS = ("mean", "min", "max", "current")
DEFAULT_MAX_LENGTH = 1_000_000  # MMEngine's HistoryBuffer default


def _check_window(window: int | None, what: str) -> None:
    if window is not None and (
        isinstance(window, bool) or not isinstance(window, int) or window < 1
    ):
        raise ValueError(f"History.{what}: window must be None or an int >= 1, got {window!r}")


class History:
    """Values with their counts (MMEngine's ``HistoryBuffer``, same numbers).

    Args:
        values, counts: an initial history (equal lengths).
        max_length: entries kept; older ones are dropped (a longer initial history
            warns, as MMEngine does).

    ``mean/min/max(window=None)`` use the last ``window`` entries (all of them when
    None or longer than the history); ``mean`` is ``sum(values) / sum(counts)``.
    """

    _statistics: ClassVar[dict[str, Callable[..., Any]]] = {}

    def __init__(
        self,
        values: Sequence[float] = (),
        counts: Sequence[float] = (),
        max_length: int = DEFAULT_MAX_LENGTH,
    ) -> None:
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"History: max_length must be an int >= 1, got {max_length!r}")
        values, counts = list(values), list(counts)
        if len(values) != len(counts):
            raise ValueError(
                f"History: values and counts must have the same length, got {len(values)} and {len(counts)}"
            )
        if len(values) > max_length:
            warnings.warn(
                f"The length of history buffer({len(values)}) exceeds the max_length({max_length}), "
                "the first few elements will be ignored.",
                stacklevel=2,
            )
        self.max_length = max_length
        self._values: collections.deque = collections.deque(values, maxlen=max_length)
        self._counts: collections.deque = collections.deque(counts, maxlen=max_length)

    # ------------------------------------------------------------------ updating
    def update(self, value: float, count: float = 1) -> None:
        """Append ``value`` logged ``count`` times (the oldest entry goes past ``max_length``)."""
        for what, x in (("value", value), ("count", count)):
            if isinstance(x, bool) or not isinstance(x, (int, float, np.number)):
                raise TypeError(
                    f"History.update: {what} must be an int or float, got {type(x).__name__}"
                )
        self._values.append(value)
        self._counts.append(count)

    def __len__(self) -> int:
        return len(self._values)

    @property
    def data(self) -> tuple[np.ndarray, np.ndarray]:
        """``(values, counts)`` as arrays (MMEngine's ``HistoryBuffer.data``)."""
        return np.array(self._values), np.array(self._counts)

    # MMEngine's names, so statistics written for HistoryBuffer port unchanged
    @property
    def _log_history(self) -> np.ndarray:
        return np.array(self._values)

    @property
    def _count_history(self) -> np.ndarray:
        return np.array(self._counts)

    def _last(self, d: collections.deque, window: int | None) -> list:
        n = len(d) if window is None else min(window, len(d))
        return list(itertools.islice(reversed(d), n))[::-1]

    def _nonempty(self, what: str) -> None:
        if not self._values:
            raise ValueError(f"History.{what}: the history is empty; call update first")

    # ------------------------------------------------------------------ statistics
    def current(self) -> Any:
        """The latest value."""
        self._nonempty("current")
        return self._values[-1]

    def mean(self, window: int | None = None) -> float:
        """``sum(values) / sum(counts)`` over the last ``window`` entries (all when None)."""
        _check_window(window, "mean")
        self._nonempty("mean")
        return float(
            np.sum(self._last(self._values, window)) / np.sum(self._last(self._counts, window))
        )

    def max(self, window: int | None = None) -> Any:
        _check_window(window, "max")
        self._nonempty("max")
        return max(self._last(self._values, window))

    def min(self, window: int | None = None) -> Any:
        _check_window(window, "min")
        self._nonempty("min")
        return min(self._last(self._values, window))

    def statistics(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """The statistic ``name`` (built in, or registered) with its arguments."""
        if name in BUILTIN_STATISTICS:
            return getattr(self, name)(*args, **kwargs)
        fn = self._statistics.get(name)
        if fn is None:
            raise KeyError(
                f"History: no statistic {name!r}; built in: {list(BUILTIN_STATISTICS)}, "
                f"registered: {sorted(self._statistics)} (History.register_statistics)"
            )
        return fn(self, *args, **kwargs)

    @classmethod
    def register_statistics(cls, fn: Callable[..., Any]) -> Callable[..., Any]:
        """Register ``fn(history, *args, **kwargs)`` under its ``__name__`` (a decorator;
        MMEngine's ``HistoryBuffer.register_statistics``). A name is registered once."""
        name = getattr(fn, "__name__", None)
        if not callable(fn) or not name:
            raise TypeError(f"History.register_statistics: expected a named function, got {fn!r}")
        if name in BUILTIN_STATISTICS or name in cls._statistics:
            raise ValueError(f"History.register_statistics: {name!r} is already a statistic")
        cls._statistics[name] = fn
        return fn

    @classmethod
    def unregister_statistics(cls, name: str) -> None:
        """Remove a registered statistic (tests, notebooks)."""
        cls._statistics.pop(name, None)

    def __repr__(self) -> str:
        return f"History({list(self._values)}, {list(self._counts)}, max_length={self.max_length})"


def statistic(name: str) -> Callable[..., Any] | None:
    """The registered statistic ``name``, or None (built-ins are History methods)."""
    return History._statistics.get(name)


def known_statistics() -> Iterable[str]:
    return (*BUILTIN_STATISTICS, *sorted(History._statistics))
