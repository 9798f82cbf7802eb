"""`TensorBoard`: scalars to a tensorboardX event file (MMEngine's ``TensorboardVisBackend``)."""

from __future__ import annotations

import itertools
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fengine.events import Snapshot
from fengine.handlers.banner import format_config
from fengine.handlers.log import (
    MEAN_PATTERN,
    _rank as _rank,  # the base class's rank check; tests patch it here too
)
from fengine.handlers.timing import Timer
from fengine.handlers.trackers import Tracker


_OPENED = itertools.count(1)  # writers this process opened: part of each event file's name


__all__ = ["TensorBoard"]


class TensorBoard(Tracker):
    """Write training and evaluation scalars for TensorBoard (rank 0 only).

    ``train/<key>`` (with a ``timer``, also ``train/time`` and ``train/data_time``)
    at the iterations and with the smoothing `Logger` uses, at ``global_step = step``
    (MMEngine's ``iter + 1``); validation results as ``val/<key>`` at the epoch in
    epoch-based runs (``log_metric_by_epoch=True``, MMEngine's default) or at the step;
    ``test/<key>`` at the step. The resolved config (``fit(config=...)``) as the text
    ``config`` (MMEngine's ``add_config``).

    Args:
        log_dir: where the event file goes; default ``work_dir/tensorboard``.
        interval, window_size, ignore_last, mean_pattern: as for `Logger`.
        timer: a `Timer` that is also in the handlers, to log time and data_time.
        log_metric_by_epoch, log_config: as for `fengine.handlers.Tracker`.
        flush_secs: how often tensorboardX flushes to disk.
    """

    name = "tensorboard"  # its smoothing windows are checkpointed (state_dict)

    def __init__(
        self,
        log_dir: str | Path | None = None,
        *,
        interval: int = 10,
        window_size: int = 10,
        ignore_last: bool = True,
        timer: Timer | None = None,
        log_metric_by_epoch: bool = True,
        log_config: bool = True,
        flush_secs: int = 10,
        mean_pattern: str = MEAN_PATTERN,
        priority: int | str | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(
            interval=interval,
            window_size=window_size,
            ignore_last=ignore_last,
            timer=timer,
            log_metric_by_epoch=log_metric_by_epoch,
            log_config=log_config,
            mean_pattern=mean_pattern,
            priority=priority,
            name=name,
        )
        if (
            isinstance(flush_secs, bool)
            or not isinstance(flush_secs, (int, float))
            or flush_secs <= 0
        ):
            raise ValueError(f"TensorBoard: flush_secs must be a number > 0, got {flush_secs!r}")
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.flush_secs = flush_secs
        self._writer: Any = None
        # the writer opens at the first point, so that a resume first sets its purge step (one
        # event file per run); the config waits for it
        self._purge_step: int | None = None
        self._config: Mapping[str, Any] | None = None

    def _start(self, snap: Snapshot) -> None:
        if self.log_dir is None:
            if snap.run.work_dir is None:
                raise ValueError(
                    "TensorBoard: no log_dir and no work_dir; pass TensorBoard(log_dir=...) or fit(..., work_dir=...)"
                )
            self.log_dir = Path(snap.run.work_dir) / "tensorboard"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._purge_step, self._config = None, None

    def _opened(self) -> Any:
        """The writer, opened with its own event file: tensorboardX names files by the second and
        opens them with 'wb', so a second run in the same second would erase the first's."""
        if self._writer is None:
            from tensorboardX import SummaryWriter  # here: only the rank that writes pays for it

            self._writer = SummaryWriter(logdir=str(self.log_dir), flush_secs=self.flush_secs,
                                         filename_suffix=f".{os.getpid()}.{next(_OPENED)}",
                                         purge_step=self._purge_step)  # fmt: skip
            if self._config is not None:
                self._writer.add_text("config", format_config(self._config))
        return self._writer

    def on_after_load_checkpoint(self, snap: Snapshot) -> None:
        """A resumed run rewrites the steps after its checkpoint: TensorBoard hides the earlier
        files' points from there on (``purge_step``), so no training step shows two values.
        The purge counts steps: validation points logged by epoch after the checkpoint, or a
        validation the resume runs again at the checkpoint's own step, show twice (equal
        values: the resume is bitwise; MMEngine purges nothing)."""
        super().on_after_load_checkpoint(snap)
        self._purge_step = snap.step + 1
        if self._writer is not None:  # already writing (a load after points): a new file purges
            self._writer.close()
            self._writer = None

    def _log_config(self, config: Mapping[str, Any], snap: Snapshot) -> None:
        self._config = config  # written when the writer opens

    def _log(self, scalars: Mapping[str, float], step: int, snap: Snapshot) -> None:
        writer = self._opened()
        for key, value in scalars.items():
            writer.add_scalar(key, value, global_step=step)

    def _finish(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
