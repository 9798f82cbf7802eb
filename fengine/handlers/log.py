"""`Logger`: MMEngine 0.10's ``LoggerHook`` + ``LogProcessor`` as an event handler.

Lines look like ``Epoch(train)  [1][ 10/1563]  lr: 1.0000e-03  eta: 0:05:12  time: 0.0123
data_time: 0.0011  loss: 2.3012``. Metric values stay on their device until a line
is due, then move to the host in one transfer per device (no per-step ``.item()``).
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import errno
import itertools
import json
import logging
import math
import os
import re
import stat
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch

from fengine.checkpoint._io import open_to_append
from fengine.checks import check_bool
from fengine.events import Handler, Priority, Snapshot
from fengine.handlers.banner import environment, format_banner, format_config
from fengine.handlers.history import History, known_statistics, statistic
from fengine.handlers.jsonl import is_eval_record, record_steps, supersede
from fengine.handlers.timing import Timer
from fengine.host import to_host


__all__ = [
    "LOGGER_NAME",
    "MEAN_PATTERN",
    "Logger",
    "ScalarHistory",
    "Stat",
    "exp_name_due",
    "get_logger",
    "should_log",
    "to_host",
]

LOGGER_NAME = "fengine"
MEAN_PATTERN = r".*(loss|time|data_time|grad_norm).*"
_FORMAT = "%(asctime)s - %(name)s - %(levelname)s - %(message)s"
_DATEFMT = "%Y/%m/%d %H:%M:%S"
_METHODS = ("mean", "min", "max", "current")


# ------------------------------------------------------------------ stdlib logging
class _StdoutHandler(logging.StreamHandler):
    """Writes to the current ``sys.stdout`` (so a rich progress bar and pytest capture see it)."""

    # mypy 1.10 rejects a property over StreamHandler's stream attribute (newer ones accept it)
    @property  # type: ignore[override, unused-ignore]
    def stream(self) -> TextIO:
        return sys.stdout

    @stream.setter
    def stream(self, value: Any) -> None:
        del value


class _OwnFileHandler(logging.FileHandler):
    """The run's text log, never opened through a link planted in the work dir (`open_to_append`)."""

    def _open(self) -> Any:  # typeshed: TextIOWrapper
        return open_to_append(Path(self.baseFilename))


def get_logger() -> logging.Logger:
    """The stdlib logger ``"fengine"``; on first use, if nobody configured it, it gets a
    stdout handler (MMEngine's ``2022/08/22 15:51:56 - mmengine - INFO - ...`` format)
    and stops propagating to the root logger (no duplicate lines); level INFO unless set."""
    logger = logging.getLogger(LOGGER_NAME)
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)
    if not logger.handlers:
        handler = _StdoutHandler()
        handler.setFormatter(logging.Formatter(_FORMAT, _DATEFMT))
        logger.addHandler(handler)
        logger.propagate = False
    return logger


def _check_positive(value: Any, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be an int >= 1, got {value!r}")


_SCALARS = (torch.Tensor, float, int)  # the metric values the train history keeps
_ROWS_KEPT = 100  # updates a train logger keeps as rows before moving them into its history


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _host_item(value: Any) -> Any:
    """A one-element tensor or array, or a numpy number, as a Python number; else ``value``."""
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value
    if isinstance(value, np.ndarray):
        return value.item() if value.size == 1 else value
    return value.item() if isinstance(value, np.generic) else value


def _host_items(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Evaluation results with one-element tensors/arrays as Python numbers (once per pass)."""
    return {k: _host_item(v) for k, v in metrics.items()}


def _rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


def _batch_number(snap: Snapshot) -> int:
    """``batch_idx + 1`` of an iteration event (the loop always sets ``batch_idx`` there)."""
    if snap.batch_idx is None:
        raise ValueError(f"{snap.event}: a {snap.phase} iteration event needs batch_idx")
    return snap.batch_idx + 1


# ------------------------------------------------------------------ statistics
@dataclasses.dataclass(frozen=True)
class Stat:
    """A custom statistic of a logged value (MMEngine ``LogProcessor.custom_cfg`` entry).

    Args:
        src: the metric key (``"loss"``, ``"time"``, ...; MMEngine's ``data_src``).
        method: ``"mean"`` (count-weighted), ``"min"``, ``"max"``, ``"current"``, or the
            name of a statistic registered with `History.register_statistics`
            (MMEngine's ``method_name``).
        window: iterations: an int, ``"epoch"`` (since the epoch began), ``"global"``
            (since this process started), or None for the whole history (MMEngine's
            ``custom_cfg`` without ``window_size``: ``Stat("loss", "max")`` is the
            largest loss logged so far).
        name: the key to log it under; None replaces ``src`` itself (MMEngine's ``log_name``).
        options: extra keyword arguments for a registered statistic (the other keys
            of an MMEngine ``custom_cfg`` entry). A registered statistic is called as
            MMEngine calls it: ``fn(history, window_size=window, **options)`` (no
            ``window_size`` when ``window`` is None), ``history`` a `History`.
    """

    src: str
    method: str = "mean"
    window: int | str | None = None
    name: str | None = None
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if self.method not in _METHODS and statistic(self.method) is None:
            raise ValueError(
                f"Stat({self.src!r}): method must be one of {list(known_statistics())} "
                f"(History.register_statistics adds more), got {self.method!r}"
            )
        w = self.window
        if not (
            w is None
            or w in ("epoch", "global")
            or (isinstance(w, int) and not isinstance(w, bool) and w >= 1)
        ):
            raise ValueError(
                f"Stat({self.src!r}): window must be an int >= 1, 'epoch', 'global' or None, got {w!r}"
            )
        if self.options and self.method in _METHODS:
            raise ValueError(
                f"Stat({self.src!r}): options are for registered statistics, not {self.method!r}"
            )
        if self.method not in _METHODS and isinstance(w, str):
            raise ValueError(
                f"Stat({self.src!r}): a registered statistic takes an int window or None, got {w!r}"
            )

    @classmethod
    def from_mmengine(cls, cfg: Mapping[str, Any]) -> Stat:
        """From an MMEngine ``custom_cfg`` dict: ``data_src``, ``method_name``, ``window_size``,
        ``log_name``; other keys are the options of a registered statistic."""
        if "data_src" not in cfg:
            raise ValueError(
                f"Stat.from_mmengine: expected keys data_src (required), method_name, window_size, log_name; got {sorted(cfg)}"
            )
        known = {"data_src", "method_name", "window_size", "log_name"}
        method = cfg.get("method_name", "mean")
        options = {k: v for k, v in cfg.items() if k not in known}
        if options and method in _METHODS:
            raise ValueError(
                f"Stat.from_mmengine: unknown keys {sorted(options)} for method {method!r}; "
                f"expected data_src, method_name, window_size, log_name"
            )
        return cls(cfg["data_src"], method, cfg.get("window_size"), cfg.get("log_name"), options)

    @property
    def key(self) -> str:
        return self.name if self.name is not None else self.src


class _Series:
    """One scalar's history: raw values not yet on the host (``pending``), then host floats.

    ``values``/``counts`` keep the last ``cap`` entries (``cap=None``: all); ``g``/``e``
    are running ``[sum of values, sum of counts, min, max]`` since this process started
    and since the epoch began (kept when ``running``)."""

    __slots__ = (
        "pending",
        "pending_counts",
        "weighted",
        "values",
        "counts",
        "running",
        "epoch_cut",
        "g",
        "e",
    )

    def __init__(self, cap: int | None, running: bool) -> None:
        self.pending: collections.deque = collections.deque(maxlen=None if running else cap)
        self.pending_counts: collections.deque = collections.deque(maxlen=self.pending.maxlen)
        self.weighted = False  # a pending count is not the int 1 (else counts skip the transfer)
        self.values: collections.deque = collections.deque(maxlen=cap)
        self.counts: collections.deque = collections.deque(maxlen=cap)
        self.running = running
        self.epoch_cut = 0  # pending[:epoch_cut] belong to an earlier epoch
        self.g = [0.0, 0.0, math.inf, -math.inf]
        self.e = [0.0, 0.0, math.inf, -math.inf]

    def absorb(self, host: list[float], counts: list[float]) -> None:
        self.values.extend(host)
        self.counts.extend(counts)
        if self.running:
            for j, (x, c) in enumerate(zip(host, counts)):
                accs = (self.g, self.e) if j >= self.epoch_cut else (self.g,)
                for acc in accs:
                    acc[0] += x
                    acc[1] += c
                    acc[2] = min(acc[2], x)
                    acc[3] = max(acc[3], x)
        self.pending.clear()
        self.pending_counts.clear()
        self.weighted = False
        self.epoch_cut = 0

    def stat(self, method: str, window: int | str | None, options: Mapping[str, Any]) -> Any:
        if not self.values:
            return None
        if method == "current":
            return self.values[-1]
        if method not in _METHODS:  # a registered statistic sees the kept history
            # called as MMEngine calls it: fn(history, window_size=w, **options), no window_size for None
            hist = History(self.values, self.counts, max_length=max(len(self.values), 1))
            sized = {} if window is None else {"window_size": window}
            return hist.statistics(method, **sized, **options)
        if isinstance(window, str):
            acc = self.g if window in ("global", None) else self.e
            if acc[2] == math.inf and acc[3] == -math.inf:  # nothing yet
                return None
            if method == "mean":
                return acc[0] / acc[1] if acc[1] else math.nan
            return acc[2] if method == "min" else acc[3]
        n = len(self.values) if window is None else min(window, len(self.values))
        vals = list(itertools.islice(reversed(self.values), n))[::-1]
        if method == "mean":  # MMEngine's HistoryBuffer.mean, with numpy's summation order
            counts = list(itertools.islice(reversed(self.counts), n))[::-1]
            if counts.count(1.0) == n and n <= _PAIRWISE_MAX:  # each logged once (the usual)
                return _numpy_sum(vals) / n
            return float(np.sum(vals) / np.sum(counts))
        return min(vals) if method == "min" else max(vals)


def _exact(x: Any) -> Any:
    """A logged number for JSON: an int as it is, a float as its hex string (exact, inf, nan)."""
    return x if type(x) is int else float(x).hex()


def _numbers(saved: Mapping[str, Any], field: str, key: str) -> list[Any]:
    items = saved.get(field)
    if not isinstance(items, list):
        raise ValueError(f"series {key!r}: {field} must be a list, got {type(items).__name__}")
    out: list[Any] = []
    for x in items:
        if type(x) is int:
            out.append(x)
        elif isinstance(x, str):
            out.append(float.fromhex(x))  # ValueError for anything but a float's hex
        else:
            raise ValueError(f"series {key!r}: {field} holds a {type(x).__name__}")
    return out


_PAIRWISE_MAX = 1024  # the lengths `_numpy_sum` is checked against numpy for (tests)


def _numpy_sum(values: list[float]) -> float:
    """``float(np.sum(values))`` of a list of floats, bit for bit, in Python: numpy's pairwise
    summation (8 running sums per block of up to 128, halves above), added to numpy's initial 0.0.
    The log line's window means call it several times per line; numpy's call costs more than
    the sum of ten numbers."""
    return 0.0 + _pairwise(values, 0, len(values))


def _pairwise(a: list[float], lo: int, n: int) -> float:
    if n < 8:
        res = 0.0
        for i in range(lo, lo + n):
            res += a[i]
        return res
    if n <= 128:
        r = a[lo : lo + 8]
        i, whole = lo + 8, lo + n - n % 8
        while i < whole:
            for j in range(8):
                r[j] += a[i + j]
            i += 8
        res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]))
        for k in range(i, lo + n):
            res += a[k]
        return res
    half = n // 2
    half -= half % 8
    return _pairwise(a, lo, half) + _pairwise(a, lo + half, n - half)


class ScalarHistory:
    """MMEngine's ``HistoryBuffer`` per key (the logger's store), kept on the device until `sync`.

    A key keeps as many values as its statistics need (``window_size`` for keys
    matching ``mean_pattern``, else 1; more for `Stat` windows, running sums for
    ``"epoch"`` / ``"global"`` and whole-history statistics). Values may be logged
    with a ``count`` (MMEngine's ``update(value, count)``): means are
    ``sum(values) / sum(counts)``.

    ``max_length``: None (default) keeps whole-history statistics exact as running
    sums, never dropping a value; an int bounds them to the last ``max_length``
    values, as MMEngine's buffers (1,000,000 there) do. Registered statistics see the
    last ``max_length`` values (all of them when None).
    """

    def __init__(
        self,
        window_size: int = 10,
        stats: Iterable[Stat] = (),
        mean_pattern: str = MEAN_PATTERN,
        max_length: int | None = None,
    ) -> None:
        _check_positive(window_size, "window_size")
        if max_length is not None:
            _check_positive(max_length, "max_length")
        self.window_size = window_size
        self.max_length = max_length
        self.stats = tuple(stats)
        self.pattern = re.compile(mean_pattern)
        self._series: dict[str, _Series] = {}

    def _new(self, key: str) -> _Series:
        cap: int | None = self.window_size if self.pattern.search(key) else 1
        running = False
        for st in self.stats:
            if st.src != key or st.method == "current":
                continue
            w = st.window
            if isinstance(w, str) or (
                w is None and st.method in _METHODS and self.max_length is None
            ):
                running = True
            elif w is None:
                cap = None if self.max_length is None or cap is None else max(cap, self.max_length)
            elif cap is not None:
                cap = max(cap, w)
        if cap is not None and self.max_length is not None:
            cap = min(cap, self.max_length)
        s = _Series(cap, running)
        self._series[key] = s
        return s

    def _series_of(self, key: str) -> _Series:
        s = self._series.get(key)
        return self._new(key) if s is None else s

    def append(self, key: str, value: Any, count: Any = 1) -> None:
        """Record ``value`` (a tensor stays on its device until `sync`) logged ``count`` times."""
        s = self._series_of(key)
        s.pending.append(value)
        s.pending_counts.append(count)
        if type(count) is not int or count != 1:  # the type first: a tensor's != would sync
            s.weighted = True

    def extend(self, key: str, values: list[Any]) -> None:
        """`append` each of ``values`` (count 1) in order; nothing when empty."""
        if values:
            s = self._series_of(key)
            s.pending.extend(values)
            s.pending_counts.extend(itertools.repeat(1, len(values)))

    def new_epoch(self) -> None:
        for s in self._series.values():
            s.epoch_cut = len(s.pending)
            s.e = [0.0, 0.0, math.inf, -math.inf]

    def sync(self) -> None:
        """Move every pending value (and count) to the host in one transfer per device."""
        flat: list[Any] = []
        spans = []
        for s in self._series.values():
            if s.pending:
                n = len(s.pending)
                spans.append((s, len(flat), n, s.weighted))
                flat.extend(s.pending)
                if s.weighted:
                    flat.extend(s.pending_counts)
        if not flat:
            return
        host = to_host(flat)
        for s, start, n, weighted in spans:
            counts = host[start + n : start + 2 * n] if weighted else [1.0] * n
            s.absorb(host[start : start + n], counts)

    def state(self) -> dict[str, Any]:
        """Every key's kept values and counts and its running sums, JSON-ready and exact (floats
        as hex strings); syncs first."""
        self.sync()
        return {
            key: {
                "values": [_exact(x) for x in s.values],
                "counts": None if all(c == 1 for c in s.counts) else [_exact(c) for c in s.counts],
                "g": [_exact(x) for x in s.g],
                "e": [_exact(x) for x in s.e],
            }  # fmt: skip
            for key, s in self._series.items()
        }

    def load_state(self, state: Mapping[str, Any]) -> None:
        """Restore `state` (from a checkpoint: untrusted, so every entry is checked)."""
        for key, saved in state.items():
            if not isinstance(key, str) or not isinstance(saved, Mapping):
                raise ValueError(f"a series must be a str key and a dict, got {key!r}")
            values = _numbers(saved, "values", key)
            logged_once = saved.get("counts") is None  # every count 1: not written
            counts = [1.0] * len(values) if logged_once else _numbers(saved, "counts", key)
            g, e = _numbers(saved, "g", key), _numbers(saved, "e", key)
            if len(values) != len(counts) or len(g) != 4 or len(e) != 4:
                raise ValueError(f"series {key!r}: values/counts of unequal lengths or bad sums")
            series = self._series_of(key)
            series.values.extend(values)
            series.counts.extend(counts)
            series.g, series.e = g, e

    def stat(
        self, key: str, method: str = "mean", window: int | str | None = None, **options: Any
    ) -> Any:
        """A statistic of ``key`` over what was synced (call `sync` first); None if unknown.
        ``window=None``: the whole history (MMEngine's ``HistoryBuffer.mean()``)."""
        s = self._series.get(key)
        return None if s is None else s.stat(method, self._window(method, window), options)

    def _window(self, method: str, window: int | str | None) -> int | str | None:
        """The whole history of a built-in statistic is its running sums when nothing is dropped."""
        if window is None and method in _METHODS and self.max_length is None:
            return "global"
        return window

    def history(self, key: str) -> History:
        """The values and counts ``key`` keeps, as a host-side `History` (syncs first)."""
        self.sync()
        s = self._series.get(key)
        if s is None:
            raise KeyError(f"ScalarHistory: no key {key!r}; keys: {sorted(self._series)}")
        return History(s.values, s.counts, max_length=max(len(s.values), 1))

    def collect(self) -> dict[str, Any]:
        """Sync, then MMEngine's ``_collect_scalars``: default statistic per key, then the `Stat`s."""
        self.sync()
        tag: dict[str, Any] = {}
        for key, s in self._series.items():
            value = (
                s.stat("mean", self.window_size, {})
                if self.pattern.search(key)
                else s.stat("current", 1, {})
            )
            if value is not None:
                tag[key] = value
        for st in self.stats:
            src = self._series.get(st.src)
            if src is not None:
                value = src.stat(st.method, self._window(st.method, st.window), st.options)
                if value is not None:
                    tag[st.key] = value
        return tag


def should_log(snap: Snapshot, interval: int, ignore_last: bool = True) -> bool:
    """MMEngine's LoggerHook rule for a train iteration.

    Every ``interval`` updates, counted within the epoch (epoch-based runs: ``batch_idx +
    1``) or on the global step (iteration-based runs); and at the end of an epoch's last,
    partial interval, unless ``ignore_last`` (then only when the whole epoch is shorter
    than ``interval``). MMEngine's iteration-based loop passes the global step as
    ``batch_idx``, so there "the end of an epoch" is the end of the first pass over the
    loader only, and the run's own last, partial interval is never logged.
    """
    run = snap.run
    i = _batch_number(snap) if run.by_epoch else snap.step
    n = run.steps_per_epoch
    if i % interval == 0:
        return True
    return i == n and (not ignore_last or n <= interval)


def exp_name_due(snap: Snapshot, interval: int) -> bool:
    """MMEngine's LoggerHook rule for its ``Exp name: ...`` line after a train iteration:
    every ``interval`` updates (global step), and when ``batch_idx + 1`` equals the
    updates per epoch. (MMEngine's iteration-based loop passes the global step as
    ``batch_idx``, so an iteration-based run prints it at the end of its first epoch only.)
    """
    end = snap.step if not snap.run.by_epoch else _batch_number(snap)
    return snap.step % interval == 0 or end == snap.run.steps_per_epoch


def _fmt(value: Any, digits: int) -> str:
    """A value as MMEngine's LogProcessor prints it: floats with ``digits`` decimals, ints
    as they are, tensors and arrays (non-scalar results, e.g. a confusion matrix) on their
    own lines."""
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return f"\n{value}\n"
    return str(value)


def _to_json(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return repr(x)  # 'nan', 'inf', '-inf': strict-JSON safe
    return x


def _epoch_label(snap: Snapshot) -> int:
    """1-based epoch of the latest completed update (the epoch MMEngine prints)."""
    return snap.state.epoch + (1 if snap.state.batch_in_epoch > 0 else 0)


# ------------------------------------------------------------------ the handlers
class _TrainScalars(Handler):
    """What `Logger` and `TensorBoard` share: rank 0 only, and the train metrics
    smoothed and picked at the iterations MMEngine logs (`_train_scalars`)."""

    priority = Priority.BELOW_NORMAL

    def __init__(
        self,
        interval: int,
        window_size: int,
        ignore_last: bool,
        timer: Timer | None,
        stats: tuple[Stat, ...],
        mean_pattern: str,
        priority: int | str | None,
        name: str | None = None,
    ) -> None:
        # its smoothing windows are checkpointed (state_dict), under a name: the class's
        # (logger, tensorboard, ...) or, for a Tracker of your own, its class name in lower case
        default = getattr(type(self), "name", None) or type(self).__name__.lower()
        super().__init__(priority=priority, name=default if name is None else name)
        name = type(self).__name__
        _check_positive(interval, f"{name}: interval")
        if not isinstance(ignore_last, bool):
            raise TypeError(f"{name}: ignore_last must be a bool, got {ignore_last!r}")
        self.interval = interval
        self.window_size = window_size
        self.ignore_last = ignore_last
        self.timer = timer
        self.stats = stats
        self.mean_pattern = mean_pattern
        self._train = ScalarHistory(window_size, stats, mean_pattern)
        self._results: dict[str, ScalarHistory] = {}  # per eval phase: one value per pass
        self._rows: list[tuple[Mapping[str, Any], tuple[float, float] | None]] = []
        self._rename: dict[str, str | None] = {}
        self._parts: frozenset[str] | None = None  # a multi_step's part names (its lrs' names)
        self._continues = False  # resumed: the next before_train_epoch may continue an epoch
        self._active: bool | None = None

    def _is_active(self) -> bool:
        if self._active is None:
            self._active = _rank() == 0
        return self._active

    def on_before_run(self, snap: Snapshot) -> None:
        self._active = _rank() == 0
        self._train = ScalarHistory(self.window_size, self.stats, self.mean_pattern)
        self._results = {}
        self._rows = []
        self._rename = {}
        self._parts = None
        self._continues = False

    def on_after_load_checkpoint(self, snap: Snapshot) -> None:
        self._continues = True

    def _new_epoch(self, snap: Snapshot) -> None:
        """Start the epoch's statistics, unless this resumes in the middle of one (or of an
        iteration-based run) whose statistics the checkpoint restored."""
        continuing = self._continues and (snap.state.batch_in_epoch > 0 or not snap.run.by_epoch)
        self._continues = False
        if not continuing:
            self._train.new_epoch()

    def state_dict(self) -> dict[str, Any]:
        """The train history's smoothing windows and running sums (MMEngine checkpoints its
        MessageHub's scalars): a resumed run logs the values the straight run logs."""
        if not self._is_active():
            return {}
        self._absorb()
        return {"train": self._train.state(),
                **{phase: hist.state() for phase, hist in self._results.items()}}  # fmt: skip

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not isinstance(state, Mapping) or not isinstance(state.get("train"), Mapping):
            raise ValueError(f"expected {{'train': {{key: series}}}}, got {type(state).__name__}")
        self._train.load_state(state["train"])
        for phase in ("val", "test"):  # checkpoints before these were kept have none
            saved = state.get(phase)
            if saved is not None:
                if not isinstance(saved, Mapping):
                    raise ValueError(f"expected {{'{phase}': {{key: series}}}}, got {saved!r}")
                self._results_of(phase).load_state(saved)

    def _results_of(self, phase: str) -> ScalarHistory:
        hist = self._results.get(phase)
        if hist is None:
            hist = self._results[phase] = ScalarHistory(
                self.window_size, self.stats, self.mean_pattern
            )
        return hist

    def _eval_scalars(self, phase: str, results: Mapping[str, Any]) -> dict[str, Any]:
        """A pass's scalar results as MMEngine's LogProcessor gives them (its ``_collect_scalars``
        in val/test mode): each pass adds one value per key; keys matching ``mean_pattern`` (a
        ``loss``) are averaged over the last ``window_size`` passes, the others are this pass's,
        and the custom `Stat`s apply to the keys they name."""
        hist = self._results_of(phase)
        for key, value in results.items():
            hist.append(key, value)
        tag = hist.collect()
        for key, value in results.items():  # this pass's own value, as given (an int stays one)
            if not hist.pattern.search(key):
                tag[key] = value
        return tag

    def _key(self, key: str, metrics: Mapping[str, Any]) -> str | None:
        """The name a metric of an update's ``metrics`` is logged under (None drops it): the lr of
        param group 0 of each optimizer (and its ``base_lr``), named as MMEngine's
        RuntimeInfoHook names ``optim_wrapper.get_lr()``.

        One optimizer: ``lr``, or with `fengine.optim.partition` the first ``<group>/lr``.
        A `fengine.multi_step` (MMEngine's OptimWrapperDict): ``<part>.lr`` for each part, from
        its ``<part>/lr`` (or its first ``<part>/<group>/lr``). The other groups' lrs are dropped.
        ``base_lr`` (a `fengine.optim.ParamGroups.build` optimizer's) likewise: ``base_lr`` or
        ``<part>.base_lr``.
        """
        if key not in self._rename:
            leaf = key.rsplit("/", 1)[-1]
            self._rename[key] = (
                self._lr_name(key, leaf, metrics) if leaf in ("lr", "base_lr") else key
            )
        return self._rename[key]

    def _lr_name(self, key: str, leaf: str, metrics: Mapping[str, Any]) -> str | None:
        part = key.split("/", 1)[0]
        if part in (self._parts or ()):  # a multi_step part
            plain, name = f"{part}/{leaf}", f"{part}.{leaf}"
        else:
            plain, name = leaf, leaf
        if key == plain:
            return name
        if leaf == "base_lr":
            return None  # only an optimizer reports its base lr, not a group
        if plain in metrics or name in self._rename.values():
            return None  # the optimizer's own lr, or an earlier group's, is the one logged
        return name

    def _timing(self, phase: str, hist: ScalarHistory) -> bool:
        """Append the timer's latest ``time`` / ``data_time``; False if it has none."""
        last = self.timer.last(phase) if self.timer is not None else None
        if last is not None:
            hist.append("time", last[0])
            hist.append("data_time", last[1])
        return last is not None

    def _untimed(self) -> None:
        """Called when the timer had measured nothing for a train update (`Logger` warns)."""

    def _train_scalars(self, snap: Snapshot) -> dict[str, float] | None:
        """Record this iteration; the smoothed scalars when it is one to log, else None.

        An update is kept as its metrics and timing (one append) and moved into the history
        when the history is read (`_absorb`): this runs after every update."""
        if not self._is_active():
            return None
        if self._parts is None:  # before a row is absorbed (a checkpoint may absorb first)
            opt_state = getattr(snap.state, "opt_state", None)
            self._parts = frozenset(opt_state) if isinstance(opt_state, dict) else frozenset()
        timing = self.timer.last("train") if self.timer is not None else None
        self._rows.append((snap.metrics, timing))
        if not should_log(snap, self.interval, self.ignore_last):
            if len(self._rows) >= _ROWS_KEPT:  # rare lines: the rows are not kept for all of them
                self._absorb()
            return None
        self._absorb()
        return self._train.collect()

    def _absorb(self) -> None:
        """Move the kept updates into the history, in order: each run of updates with the same
        metric names key by key (the numbers and tensors of each), then their timing."""
        rows, self._rows = self._rows, []
        hist = self._train
        start = 0
        while start < len(rows):
            metrics = rows[start][0]
            end = start + 1
            while end < len(rows) and rows[end][0].keys() == metrics.keys():
                end += 1
            group = rows[start:end]
            for key in metrics:
                values = [v for m, _ in group if isinstance(v := m[key], _SCALARS)]
                name = self._key(key, metrics) if values else None
                if name is not None:
                    hist.extend(name, values)
            timed = [t for _, t in group if t is not None]
            hist.extend("time", [t for t, _ in timed])
            hist.extend("data_time", [d for _, d in timed])
            if len(timed) < len(group) and self.timer is not None:
                self._untimed()
            start = end


class Logger(_TrainScalars):
    """Log training and evaluation to the console, ``work_dir/<timestamp>.log`` and
    ``work_dir/scalars.jsonl`` (MMEngine's LoggerHook with the default LogProcessor).

    Args:
        interval: log every ``interval`` updates (within the epoch for epoch-based
            runs, on the global step otherwise; see `should_log`) and every
            ``interval`` evaluation batches.
        window_size: iterations averaged for keys matching ``mean_pattern``.
        ignore_last: skip the last, partial interval of an epoch (MMEngine's default).
        timer: the `Timer` (also in the handlers) to read ``time``/``data_time``/``eta``
            from. None: the logger runs a private Timer. False: no timing fields.
        json_file: JSON-lines file in ``work_dir`` (None: none), one object per train
            line (``{"step", "epoch", "lr", "loss", ...}`` as printed) and per
            evaluation (``{"step", "epoch", "val/<key>", ...}``).
        log_file: write ``work_dir/<timestamp>.log`` too.
        custom: extra statistics (`Stat`, or MMEngine ``custom_cfg`` dicts).
        num_digits: decimals printed (MMEngine's ``num_digits``).
        mean_pattern: which keys are window-averaged.
        exp_name: the experiment name of the ``Exp name: <name>`` lines; default
            ``<work_dir name>_<timestamp>`` (the log file's timestamp; MMEngine:
            ``<config name>_<timestamp>``), or the timestamp without a work dir.
        interval_exp_name: print ``Exp name: ...`` every this many updates (global step)
            and at the end of each epoch (MMEngine's rule, see `exp_name_due`); 0: never.
        env: log the environment at the start of a run (MMEngine's ``System environment``
            / ``Runtime environment`` banner: versions, devices, seed, deterministic flags).
        log_config: log the run's resolved config (``fit(config=...)``) at the start,
            ``Config:`` and the config as MMEngine's ``pretty_text`` writes it.

    The lr printed is the step metric ``lr`` (with `fengine.optim.partition`, the
    first group's ``<group>/lr``, as MMEngine logs param group 0); a `fengine.multi_step`
    prints each part's as ``<part>.lr`` (MMEngine's OptimWrapperDict: ``gen.lr``,
    ``disc.lr``). Before it comes ``base_lr`` (``<part>.base_lr``) where the optimizer
    reports one (`fengine.optim.ParamGroups.build` where MMEngine has several param
    groups). Only rank 0 logs.
    """

    name = "logger"  # its smoothing windows are checkpointed (state_dict); two Loggers: name=

    def __init__(
        self,
        interval: int = 10,
        *,
        window_size: int = 10,
        ignore_last: bool = True,
        timer: Timer | None | bool = None,
        json_file: str | None = "scalars.jsonl",
        log_file: bool = True,
        custom: Iterable[Stat | Mapping[str, Any]] = (),
        num_digits: int = 4,
        mean_pattern: str = MEAN_PATTERN,
        exp_name: str | None = None,
        interval_exp_name: int = 1000,
        env: bool = True,
        log_config: bool = True,
        priority: int | str | None = None,
        name: str | None = None,
    ) -> None:
        if isinstance(interval_exp_name, bool) or not isinstance(interval_exp_name, int):
            raise TypeError(f"Logger: interval_exp_name must be an int, got {interval_exp_name!r}")
        if interval_exp_name < 0:
            raise ValueError(f"Logger: interval_exp_name must be >= 0, got {interval_exp_name}")
        if exp_name is not None and (not isinstance(exp_name, str) or not exp_name):
            raise ValueError(f"Logger: exp_name must be a non-empty str, got {exp_name!r}")
        for flag, value in (("log_file", log_file), ("env", env), ("log_config", log_config)):
            check_bool("Logger", flag, value)
        if timer is True:
            timer = None
        if not (timer is None or timer is False or isinstance(timer, Timer)):
            raise TypeError(
                f"Logger: timer must be a fengine.handlers.Timer, None or False, got {type(timer).__name__}"
            )
        stats = tuple(s if isinstance(s, Stat) else Stat.from_mmengine(s) for s in custom)
        names = [s.key for s in stats]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(
                f"Logger: custom statistics {dup} are defined twice; give each Stat a distinct name= "
                "(a Stat without a name replaces its src, which can happen once)"
            )
        own = Timer() if timer is None else (timer or None)
        super().__init__(
            interval, window_size, ignore_last, own, stats, mean_pattern, priority, name
        )
        if isinstance(num_digits, bool) or not isinstance(num_digits, int) or num_digits < 0:
            raise ValueError(f"Logger: num_digits must be an int >= 0, got {num_digits!r}")
        if json_file is not None and (not isinstance(json_file, str) or not json_file):
            raise TypeError(
                f"Logger: json_file must be a file name (str) or None, got {json_file!r}"
            )
        self.json_file = json_file
        self.log_file = log_file
        self.num_digits = num_digits
        self.exp_name = exp_name
        self.interval_exp_name = interval_exp_name
        self.env = env
        self.log_config = log_config
        self.timestamp: str | None = None  # of this run's log file, set at before_run
        self.experiment_name: str | None = None  # what the Exp name lines print
        self._own_timer = timer is None
        self._eval: dict[str, ScalarHistory] = {}
        self._json_path: Path | None = None
        self._resumed_at: int | None = None  # until the first record after a resume is written
        self._first_record = True  # the run's first record is not written yet (see _write_json)
        self._file_handler: logging.FileHandler | None = None
        self._warned_timer = False
        self.logger = get_logger()
        if (
            not self._own_timer
        ):  # a shared Timer times the iterations: keep these no-ops out of the dispatch
            for event in ("before_train_iter", "before_val_iter", "before_test_iter"):
                setattr(self, "on_" + event, None)

    # ------------------------------------------------------------------ setup
    def on_before_run(self, snap: Snapshot) -> None:
        super().on_before_run(snap)
        if not self._active:
            return
        self.logger = get_logger()
        self.timestamp = time.strftime("%Y%m%d_%H%M%S")
        self._first_record, self._resumed_at = True, None
        self._start_step = snap.state.step  # a fresh run's records are of the steps after it
        work_dir = snap.run.work_dir
        if self.exp_name is not None:
            self.experiment_name = self.exp_name
        elif work_dir is not None and Path(work_dir).resolve().name:
            self.experiment_name = f"{Path(work_dir).resolve().name}_{self.timestamp}"
        else:
            self.experiment_name = self.timestamp
        if work_dir is not None:
            self._open_files(Path(work_dir))
        run = snap.run
        if run.world_size > 1:  # a distributed run says so first
            self.logger.info("world_size: %d", run.world_size)
            self.logger.info(
                "devices: %s", ", ".join(f"rank {r}: {d}" for r, d in enumerate(run.devices))
            )
        if self.env:
            self.logger.info(format_banner(*environment(snap)))
        if self.log_config and run.config:
            self.logger.info("Config:\n%s", format_config(run.config))

    def _open_files(self, work_dir: Path) -> None:
        work_dir = Path(work_dir)
        work_dir.mkdir(parents=True, exist_ok=True)
        for stale in [h for h in self.logger.handlers if getattr(h, "_fengine_run_log", False)]:
            # left by a run that raised before after_run: do not write this run into its file
            self.logger.removeHandler(stale)
            stale.close()
        self._file_handler = None
        if self.log_file:
            stamp = self.timestamp or time.strftime("%Y%m%d_%H%M%S")
            path, n = work_dir / f"{stamp}.log", 1
            # another run started in this second: its own file (a planted link is not stepped
            # around: opening it is refused, naming it)
            while path.exists() and not path.is_symlink():
                n += 1
                path = work_dir / f"{stamp}_{n}.log"
            self._file_handler = _OwnFileHandler(path, encoding="utf-8")
            self._file_handler.setFormatter(logging.Formatter(_FORMAT, _DATEFMT))
            self._file_handler._fengine_run_log = True  # type: ignore[attr-defined]
            self.logger.addHandler(self._file_handler)
        if self.json_file is not None:
            self._json_path = work_dir / self.json_file

    def on_after_run(self, snap: Snapshot) -> None:
        self.close()

    def close(self) -> None:
        """Stop writing the JSON-lines file and close the log file (idempotent)."""
        self._json_path = None
        if self._file_handler is not None:
            self.logger.removeHandler(self._file_handler)
            self._file_handler.close()
            self._file_handler = None

    def on_after_load_checkpoint(self, snap: Snapshot) -> None:
        """A resume writes the steps after its checkpoint again: their old records move aside
        when the first new one is written (a validation at the checkpoint's step, if the resume
        runs it again, replaces the old one)."""
        super().on_after_load_checkpoint(snap)
        if self._active:
            self._resumed_at = snap.step

    def _write_json(self, record: Mapping[str, Any]) -> None:
        # opened per record (as MMEngine's LocalVisBackend does): a run that raises, and so
        # never reaches after_run, leaves no open file behind
        if self._json_path is not None and self._first_record:
            self._first_record = False
            if self._resumed_at is None:
                self._move_aside_an_earlier_run(self._json_path)
        if self._json_path is not None and self._resumed_at is not None:
            at, self._resumed_at = self._resumed_at, None
            again = record["step"] == at and is_eval_record(dict(record))
            moved = supersede(self._json_path, at, eval_at_step=again)
            if moved:
                self.logger.info("Logger: %d record(s) of %s after step %d, written again by this "
                                 "resume, moved to its .superseded file", moved, self._json_path.name, at)  # fmt: skip
        if self._json_path is not None:
            try:
                f = open_to_append(self._json_path)
            except FileNotFoundError:
                if self._json_path.parent.is_dir():
                    raise
                raise FileNotFoundError(
                    errno.ENOENT, f"Logger: cannot write {self._json_path.name}: the work dir "
                    f"{self._json_path.parent} was deleted or moved during the run",
                    str(self._json_path),
                ) from None  # fmt: skip
            with f:
                f.write(json.dumps({k: _to_json(v) for k, v in record.items()}) + "\n")

    def _move_aside_an_earlier_run(self, path: Path) -> None:
        """A fresh run (no resume) into a work dir with another run's records of the steps it
        writes: theirs move to ``<name>.before_<timestamp>`` (renamed, not deleted), so no step
        appears twice. Records up to its first step (the run it continues, ``fit`` called
        again with the state it returned) stay."""
        try:
            st = path.lstat()
        except FileNotFoundError:
            return
        if not stat.S_ISREG(st.st_mode) or st.st_size == 0:
            return  # a planted link or other non-file: the append refuses it, naming it
        if not any(at > self._start_step for at in record_steps(path)):
            return
        aside = path.with_name(f"{path.stem}.before_{self.timestamp}{path.suffix}")
        n = 1
        while aside.exists():  # two runs started in one second: never over an earlier one
            n += 1
            aside = path.with_name(f"{path.stem}.before_{self.timestamp}_{n}{path.suffix}")
        os.replace(path, aside)
        self.logger.info("Logger: %s holds an earlier run's records (this run did not resume): "
                         "moved to %s", path.name, aside.name)  # fmt: skip

    # ------------------------------------------------------------------ timing
    def _tick(self, event: str, snap: Snapshot) -> None:
        if self._own_timer and self.timer is not None:
            handle = getattr(self.timer, "on_" + event, None)  # a Timer listens to some events only
            if handle is not None:
                handle(snap)

    def _timing(self, phase: str, hist: ScalarHistory) -> bool:
        measured = super()._timing(phase, hist)
        if not measured and self.timer is not None:
            self._untimed()
        return measured

    def _untimed(self) -> None:
        if not self._warned_timer:
            self._warned_timer = True
            self.logger.warning(
                "Logger: its Timer has measured nothing; pass the same Timer in handlers=[...] "
                "(or build the Logger with timer=None to let it time by itself)"
            )

    def on_before_train(self, snap: Snapshot) -> None:
        self._tick("before_train", snap)

    def on_before_train_epoch(self, snap: Snapshot) -> None:
        self._tick("before_train_epoch", snap)
        self._absorb()  # the kept updates belong to the epoch that ended
        self._new_epoch(snap)

    def on_before_train_iter(self, snap: Snapshot) -> None:
        self._tick("before_train_iter", snap)

    def _before_eval_epoch(self, snap: Snapshot) -> None:
        self._tick(f"before_{snap.phase}_epoch", snap)
        hist = self._eval.get(snap.phase)
        if hist is None:
            # running means over the pass for the closing line (not printed on the progress lines)
            stats = (
                Stat("time", window="epoch", name="_pass_time"),
                Stat("data_time", window="epoch", name="_pass_data_time"),
            )
            hist = self._eval[snap.phase] = ScalarHistory(
                self.window_size, stats, self.mean_pattern
            )
        hist.new_epoch()

    def _before_eval_iter(self, snap: Snapshot) -> None:
        self._tick(f"before_{snap.phase}_iter", snap)

    on_before_val_epoch = _before_eval_epoch
    on_before_test_epoch = _before_eval_epoch
    on_before_val_iter = _before_eval_iter
    on_before_test_iter = _before_eval_iter

    # ------------------------------------------------------------------ train
    def on_after_train_iter(self, snap: Snapshot) -> None:
        if self._own_timer:
            self._tick("after_train_iter", snap)
        tag = self._train_scalars(snap)  # first: it also tells whether this rank logs
        if self.interval_exp_name and self._active and exp_name_due(snap, self.interval_exp_name):
            self.logger.info("Exp name: %s", self.experiment_name)
        if tag is None:
            return
        memory = self._memory(snap)
        run = snap.run
        if run.by_epoch:
            epoch = _epoch_str(snap.epoch + 1, run.max_epochs)
            head = _head("Epoch(train)", epoch, _batch_number(snap), run.steps_per_epoch)
        else:
            head = _head("Iter(train)", " ", snap.step, run.max_steps)
        self.logger.info(self._line(head, snap, tag, memory, rest=True))
        record: dict[str, Any] = {"step": snap.step, "epoch": snap.epoch + 1}
        record.update((k, v) for k, v in tag.items() if k.endswith("lr"))  # lr first, as printed
        record.update(tag)
        if memory is not None:
            record["memory"] = memory
        self._write_json(record)

    def _line(
        self, head: str, snap: Snapshot, tag: Mapping[str, float], memory: int | None, *, rest: bool
    ) -> str:
        """MMEngine's ``get_log_after_iter`` body: lr, eta/time/data_time, memory, the rest."""
        d = self.num_digits
        tag = dict(tag)
        lrs = [f"{k}: {tag.pop(k):.{d}e}" for k in list(tag) if k.endswith("lr")]
        s = head + " ".join(lrs) + "  "
        eta = self.timer.eta(snap) if self.timer is not None else None
        if "time" in tag and "data_time" in tag and eta is not None:
            s += f"eta: {datetime.timedelta(seconds=int(eta))}  "
            s += f"time: {tag.pop('time'):.{d}f}  data_time: {tag.pop('data_time'):.{d}f}  "
        if memory is not None:
            s += f"memory: {memory}  "
        if rest:
            s += "  ".join(f"{k}: {_fmt(v, d)}" for k, v in tag.items())
        return s.rstrip()

    @staticmethod
    def _memory(snap: Snapshot) -> int | None:
        """Peak CUDA memory in MB since the last line (MMEngine resets the peak each time)."""
        device = next((p.device for p in snap.state.params.values()), None)
        if device is None or device.type != "cuda":
            return None
        mb = torch.cuda.max_memory_allocated(device) // (1024 * 1024)
        torch.cuda.reset_peak_memory_stats(device)
        return int(mb)

    def on_after_train(self, snap: Snapshot) -> None:
        if self._is_active() and "stop" in snap.metrics:
            self.logger.info(f"Training stopped at step {snap.step}: {snap.metrics['stop']}")

    # ------------------------------------------------------------------ evaluation
    def _after_eval_iter(self, snap: Snapshot) -> None:
        self._tick(f"after_{snap.phase}_iter", snap)
        if not self._is_active():
            return
        hist = self._eval[snap.phase]
        self._timing(snap.phase, hist)
        done = _batch_number(snap)
        if done % self.interval != 0:
            return
        tag = hist.collect()
        self.logger.info(
            self._line(self._eval_head(snap, done), snap, tag, self._memory(snap), rest=False)
        )

    on_after_val_iter = _after_eval_iter
    on_after_test_iter = _after_eval_iter

    def _eval_head(self, snap: Snapshot, i: int | str, *, last: bool = False) -> str:
        run, phase = snap.run, snap.phase
        n: int | str = snap.eval_len if snap.eval_len is not None else "?"
        standalone = (
            run.steps_per_epoch == 0
        )  # fengine.evaluate(): MMEngine's by-epoch test loop format
        if not (run.by_epoch or standalone):
            return _head(f"Iter({phase})", " ", i, n)
        if phase != "val" or standalone:
            return _head(f"Epoch({phase})", " ", i, n)
        # MMEngine does not right-align the epoch on the closing line
        return _head(
            f"Epoch({phase})",
            f" [{snap.epoch}]" if last else _epoch_str(snap.epoch, run.max_epochs),
            i,
            n,
        )

    def _after_eval_epoch(self, snap: Snapshot) -> None:
        self._tick(f"after_{snap.phase}_epoch", snap)
        if not self._is_active():
            return
        n: int | str = snap.eval_len if snap.eval_len is not None else "?"
        results = _host_items(snap.metrics)
        # MMEngine's order: scalar results, then the others (a confusion matrix on its own
        # lines), then the pass's mean data_time and time
        items = self._eval_scalars(snap.phase, {k: v for k, v in results.items() if _is_number(v)})
        items.update((k, v) for k, v in results.items() if not _is_number(v))
        hist = self._eval.get(snap.phase)
        if hist is not None:
            hist.sync()
            for key in ("data_time", "time"):
                v = hist.stat(key, "mean", "epoch")
                if v is not None:
                    items[key] = v
        d = self.num_digits
        head = self._eval_head(snap, n, last=True)
        self.logger.info(
            (head + "  " + "  ".join(f"{k}: {_fmt(v, d)}" for k, v in items.items())).rstrip()
        )
        record: dict[str, Any] = {"step": snap.step, "epoch": _epoch_label(snap)}
        record.update((f"{snap.phase}/{k}", v) for k, v in items.items() if _is_number(v))
        self._write_json(record)

    on_after_val_epoch = _after_eval_epoch
    on_after_test_epoch = _after_eval_epoch


def _head(kind: str, epoch: str, i: int | str, n: int | str) -> str:
    """``Epoch(train)  [1][ 10/1563]  ``: ``i`` right-aligned to the width of ``n``."""
    return f"{kind}{epoch}[{str(i).rjust(len(str(n)))}/{n}]  "


def _epoch_str(epoch: int, max_epochs: int | None) -> str:
    """``" [1]"`` right-aligned to the width of ``max_epochs`` (MMEngine: ``len(str(max_epochs)) + 3``)."""
    return f"[{epoch}]".rjust(len(str(max_epochs if max_epochs is not None else epoch)) + 3)
