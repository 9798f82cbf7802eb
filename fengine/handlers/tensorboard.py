"""`TensorBoard`: scalars to a tensorboardX event file (MMEngine's ``TensorboardVisBackend``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fengine.events import Handler, Priority, Snapshot
from fengine.handlers.log import MEAN_PATTERN, ScalarHistory, _rank, should_log
from fengine.handlers.timing import Timer


__all__ = ["TensorBoard"]


class TensorBoard(Handler):
    """Write training and evaluation scalars for TensorBoard.

    Train scalars ``train/<key>`` (``train/loss``, ``train/lr``, ...; with a
    ``timer``, ``train/time`` and ``train/data_time``) are written at the same
    iterations and with the same smoothing as `Logger` (``interval``,
    ``window_size``, ``ignore_last``), at ``global_step = step``, the number of
    completed updates (MMEngine's ``iter + 1``). Evaluation results go to
    ``val/<key>`` / ``test/<key>`` at the current step. Only rank 0 writes.

    Args:
        log_dir: where the event file goes; default ``work_dir/tensorboard``.
        interval, window_size, ignore_last: as for `Logger`.
        timer: a `Timer` that is also in the handlers, to log time and data_time.
        flush_secs: how often tensorboardX flushes to disk.

    The writer is closed at ``after_run`` (or `close`, which is idempotent).
    """

    priority = Priority.BELOW_NORMAL

    def __init__(
        self,
        log_dir: str | Path | None = None,
        *,
        interval: int = 10,
        window_size: int = 10,
        ignore_last: bool = True,
        timer: Timer | None = None,
        flush_secs: int = 10,
        mean_pattern: str = MEAN_PATTERN,
        priority: int | str | None = None,
    ) -> None:
        super().__init__(priority=priority)
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f"TensorBoard: interval must be an int >= 1, got {interval!r}")
        if timer is not None and not isinstance(timer, Timer):
            raise TypeError(f"TensorBoard: timer must be a fengine.handlers.Timer or None, got {type(timer).__name__}")
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.interval = interval
        self.window_size = window_size
        self.ignore_last = ignore_last
        self.timer = timer
        self.flush_secs = flush_secs
        self.mean_pattern = mean_pattern
        self._history = ScalarHistory(window_size, (), mean_pattern)
        self._lr_key: str | None = None
        self._writer: Any = None
        self._active: bool | None = None

    # ------------------------------------------------------------------ writer
    def _open(self, snap: Snapshot) -> Any:
        if self._active is None:
            self._active = _rank() == 0
        if not self._active:
            return None
        if self._writer is None:
            log_dir = self.log_dir
            if log_dir is None:
                if snap.run.work_dir is None:
                    raise ValueError(
                        "TensorBoard: no log_dir and no work_dir; pass TensorBoard(log_dir=...) or fit(..., work_dir=...)"
                    )
                log_dir = Path(snap.run.work_dir) / "tensorboard"
            # imported here: only the rank that writes pays for it
            from tensorboardX import SummaryWriter

            log_dir.mkdir(parents=True, exist_ok=True)
            self.log_dir = log_dir
            self._writer = SummaryWriter(logdir=str(log_dir), flush_secs=self.flush_secs)
        return self._writer

    def close(self) -> None:
        """Flush and close the event file (idempotent)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def on_before_run(self, snap: Snapshot) -> None:
        self._active = _rank() == 0
        self._history = ScalarHistory(self.window_size, (), self.mean_pattern)
        self._lr_key = None
        self._open(snap)

    def on_after_run(self, snap: Snapshot) -> None:
        self.close()

    # ------------------------------------------------------------------ events
    def on_after_train_iter(self, snap: Snapshot) -> None:
        if self._active is False:
            return
        hist = self._history
        metrics = snap.metrics
        for key, value in metrics.items():
            if not isinstance(value, (torch.Tensor, float, int)):
                continue
            if key.endswith("/lr") and "lr" not in metrics:  # partitioned optimizer: group 0's lr
                if self._lr_key is None:
                    self._lr_key = key
                if key != self._lr_key:
                    continue
                key = "lr"
            hist.append(key, value)
        if self.timer is not None:
            last = self.timer.last("train")
            if last is not None:
                hist.append("time", last[0])
                hist.append("data_time", last[1])
        if not should_log(snap, self.interval, self.ignore_last):
            return
        writer = self._open(snap)
        if writer is None:
            return
        for key, value in hist.collect().items():
            writer.add_scalar(f"train/{key}", value, global_step=snap.step)

    def _after_eval_epoch(self, snap: Snapshot) -> None:
        writer = self._open(snap)
        if writer is None:
            return
        for key, value in snap.metrics.items():
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                value = value.item()  # once per evaluation pass
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                writer.add_scalar(f"{snap.phase}/{key}", float(value), global_step=snap.step)

    on_after_val_epoch = _after_eval_epoch
    on_after_test_epoch = _after_eval_epoch
