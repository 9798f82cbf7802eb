"""`ProgressBar`: a rich progress bar for training epochs and evaluation passes."""

from __future__ import annotations

from typing import Any

from fengine.events import Handler, Priority, Snapshot
from fengine.handlers.log import _batch_number, _rank


__all__ = ["ProgressBar"]


class ProgressBar(Handler):
    """Show the progress of the current epoch (or of the whole run, iteration-based)
    and of each validation/test pass with ``rich``.

    Quiet unless the console is a terminal: when stdout is redirected to a file or a
    pipe it prints nothing at all. Only rank 0 draws. Log lines printed through the
    ``"fengine"`` logger appear above the bar. Per iteration it only moves a counter;
    rich redraws on its own clock.

    Args:
        console: a ``rich.console.Console`` to draw on (default: stdout).
        transient: remove the bars when done.
    """

    priority = Priority.LOW

    def __init__(
        self, *, console: Any = None, transient: bool = True, priority: int | str | None = None
    ) -> None:
        super().__init__(priority=priority)
        self.console = console
        if not isinstance(transient, bool):
            raise TypeError(f"ProgressBar: transient must be a bool, got {transient!r}")
        self.transient = transient
        self._progress: Any = None
        self._enabled: bool | None = None
        self._train_task: Any = None
        self._eval_task: Any = None
        self._training = False  # inside fit's training: an evaluation pass does not end the bar

    def _start(self) -> Any:
        if self._enabled is None:
            from rich.console import Console

            if self.console is None:
                self.console = Console()
            self._enabled = _rank() == 0 and self.console.is_terminal
        if not self._enabled:
            return None
        if self._progress is None:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._progress = Progress(
                TextColumn("[progress.description]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=self.console,
                transient=self.transient,
            )
            self._progress.start()
        return self._progress

    def _stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
            self._train_task = self._eval_task = None

    def close(self) -> None:
        """Stop drawing (`fit` or an evaluation that failed: rich's live display kept its
        refresh thread, the hidden cursor and the redirected output)."""
        self._training = False
        self._stop()

    # ------------------------------------------------------------------ train
    def on_before_train(self, snap: Snapshot) -> None:
        self._training = True
        progress = self._start()
        if progress is not None and not snap.run.by_epoch:
            self._train_task = progress.add_task(
                "Train", total=snap.run.max_steps, completed=snap.step
            )

    def on_before_train_epoch(self, snap: Snapshot) -> None:
        progress = self._start()
        if progress is None or not snap.run.by_epoch:
            return
        run = snap.run
        done = snap.state.batch_in_epoch // max(run.micro_batches, 1)  # resumed mid-epoch
        self._train_task = progress.add_task(
            f"Epoch {snap.epoch + 1}/{run.max_epochs}", total=run.steps_per_epoch, completed=done
        )

    def on_after_train_iter(self, snap: Snapshot) -> None:
        if self._progress is not None and self._train_task is not None:
            done = _batch_number(snap) if snap.run.by_epoch else snap.step
            self._progress.update(self._train_task, completed=done)

    def on_after_train_epoch(self, snap: Snapshot) -> None:
        if self._progress is not None and self._train_task is not None and snap.run.by_epoch:
            self._progress.remove_task(self._train_task)
            self._train_task = None

    def on_after_train(self, snap: Snapshot) -> None:
        self.close()

    def on_after_run(self, snap: Snapshot) -> None:
        self.close()

    # ------------------------------------------------------------------ evaluation
    def _before_eval_epoch(self, snap: Snapshot) -> None:
        progress = self._start()
        if progress is not None:
            self._eval_task = progress.add_task(snap.phase.capitalize(), total=snap.eval_len)

    def _after_eval_iter(self, snap: Snapshot) -> None:
        if self._progress is not None and self._eval_task is not None:
            self._progress.update(self._eval_task, completed=_batch_number(snap))

    def _after_eval_epoch(self, snap: Snapshot) -> None:
        if self._progress is not None and self._eval_task is not None:
            self._progress.remove_task(self._eval_task)
            self._eval_task = None

    def _after_eval(self, snap: Snapshot) -> None:
        if not self._training:  # a standalone evaluate(): nothing else is drawing
            self._stop()

    on_after_val = _after_eval
    on_after_test = _after_eval

    on_before_val_epoch = _before_eval_epoch
    on_before_test_epoch = _before_eval_epoch
    on_after_val_iter = _after_eval_iter
    on_after_test_iter = _after_eval_iter
    on_after_val_epoch = _after_eval_epoch
    on_after_test_epoch = _after_eval_epoch
