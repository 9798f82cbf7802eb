"""`TensorBoard`: scalars to a tensorboardX event file (MMEngine's ``TensorboardVisBackend``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fengine.events import Snapshot
from fengine.handlers.log import (
    MEAN_PATTERN,
    _host_items,
    _is_number,
    _rank as _rank,  # the base class's rank check; tests patch it here too
    _TrainScalars,
)
from fengine.handlers.timing import Timer


__all__ = ["TensorBoard"]


class TensorBoard(_TrainScalars):
    """Write training and evaluation scalars for TensorBoard (rank 0 only).

    ``train/<key>`` (with a ``timer``, also ``train/time`` and ``train/data_time``)
    at the iterations and with the smoothing `Logger` uses, at ``global_step = step``
    (MMEngine's ``iter + 1``); evaluation results as ``val/<key>`` / ``test/<key>``.

    Args:
        log_dir: where the event file goes; default ``work_dir/tensorboard``.
        interval, window_size, ignore_last, mean_pattern: as for `Logger`.
        timer: a `Timer` that is also in the handlers, to log time and data_time.
        flush_secs: how often tensorboardX flushes to disk.
    """

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
        if timer is not None and not isinstance(timer, Timer):
            raise TypeError(
                f"TensorBoard: timer must be a fengine.handlers.Timer or None, got {type(timer).__name__}"
            )
        super().__init__(interval, window_size, ignore_last, timer, (), mean_pattern, priority)
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.flush_secs = flush_secs
        self._writer: Any = None

    def _open(self, snap: Snapshot) -> Any:
        if self._writer is None:
            if self.log_dir is None:
                if snap.run.work_dir is None:
                    raise ValueError(
                        "TensorBoard: no log_dir and no work_dir; pass TensorBoard(log_dir=...) or fit(..., work_dir=...)"
                    )
                self.log_dir = Path(snap.run.work_dir) / "tensorboard"
            from tensorboardX import SummaryWriter  # here: only the rank that writes pays for it

            self.log_dir.mkdir(parents=True, exist_ok=True)
            self._writer = SummaryWriter(logdir=str(self.log_dir), flush_secs=self.flush_secs)
        return self._writer

    def _write(self, snap: Snapshot, prefix: str, scalars: dict[str, float]) -> None:
        writer = self._open(snap)
        for key, value in scalars.items():
            writer.add_scalar(f"{prefix}/{key}", value, global_step=snap.step)

    def close(self) -> None:
        """Flush and close the event file (idempotent)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def on_before_run(self, snap: Snapshot) -> None:
        super().on_before_run(snap)
        if self._active:
            self._open(snap)

    def on_after_run(self, snap: Snapshot) -> None:
        self.close()

    def on_after_train_iter(self, snap: Snapshot) -> None:
        tag = self._train_scalars(snap)
        if tag is not None:
            self._write(snap, "train", tag)

    def _after_eval_epoch(self, snap: Snapshot) -> None:
        if self._is_active():
            self._write(
                snap,
                snap.phase,
                {k: float(v) for k, v in _host_items(snap.metrics).items() if _is_number(v)},
            )

    on_after_val_epoch = _after_eval_epoch
    on_after_test_epoch = _after_eval_epoch
