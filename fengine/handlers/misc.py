"""Small handlers: `EmptyCache` (MMEngine EmptyCacheHook), `Profiler` (ProfilerHook), `ScheduleRecorder`."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from fengine.checks import check_bool
from fengine.events import Handler, Priority, Snapshot


__all__ = ["EmptyCache", "Profiler", "ScheduleRecorder"]


def _empty_cache(snap: Snapshot | None = None) -> None:
    del snap
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class EmptyCache(Handler):
    """Release the CUDA caching allocator's unused blocks (``torch.cuda.empty_cache()``).

    MMEngine's EmptyCacheHook: the flags apply to train, val and test alike
    (``after_epoch`` means after every train/val/test epoch, ``after_iter`` after
    every train/val/test iteration). A no-op without CUDA. Only the enabled
    events are registered, so disabled points cost nothing.
    """

    priority = Priority.NORMAL

    def __init__(
        self,
        before_epoch: bool = False,
        after_epoch: bool = True,
        after_iter: bool = False,
        *,
        priority: int | str | None = None,
    ) -> None:
        super().__init__(priority=priority)
        self.before_epoch = check_bool("EmptyCache", "before_epoch", before_epoch)
        self.after_epoch = check_bool("EmptyCache", "after_epoch", after_epoch)
        self.after_iter = check_bool("EmptyCache", "after_iter", after_iter)
        for phase in ("train", "val", "test"):
            if self.before_epoch:
                setattr(self, f"on_before_{phase}_epoch", _empty_cache)
            if self.after_epoch:
                setattr(self, f"on_after_{phase}_epoch", _empty_cache)
            if self.after_iter:
                setattr(self, f"on_after_{phase}_iter", _empty_cache)

    def __repr__(self) -> str:
        return (
            f"EmptyCache(before_epoch={self.before_epoch}, after_epoch={self.after_epoch}, "
            f"after_iter={self.after_iter})"
        )


_ACTIVITIES = {
    "cpu": torch.profiler.ProfilerActivity.CPU,
    "cuda": torch.profiler.ProfilerActivity.CUDA,
}


class Profiler(Handler):
    """Profile a window of training steps with ``torch.profiler`` and write Chrome traces.

    The profiler starts at ``before_run`` and is stepped after every training
    update (``after_train_iter``) through ``torch.profiler.schedule(wait, warmup,
    active, repeat)``: with the defaults the first update is skipped, the second
    warms up and updates 3-5 are recorded. Each finished window is written to
    ``out_dir`` (default ``work_dir/profiler``) as ``trace_step{N}.json`` (``N``: the
    updates done when it was written; ``_rank{r}`` added in multi-process runs), viewable in
    ``chrome://tracing`` or Perfetto; the paths are in ``.traces``. The profiler is
    closed as soon as the last window is written, or at ``after_train``/``after_run``
    if training ends first (a window cut short while recording is still written;
    one still in wait/warm-up writes nothing).

    Args:
      wait, warmup, active, repeat: ``torch.profiler.schedule`` arguments, in updates
        (``repeat=0``: repeat the cycle until training ends).
      activities: ``"cpu"``/``"cuda"`` or ``torch.profiler.ProfilerActivity`` values;
        default CPU, plus CUDA when it is available.
      record_shapes, profile_memory, with_stack, with_flops: as ``torch.profiler.profile``.
      out_dir: where traces go; default ``work_dir/profiler`` (``fit(work_dir=...)`` or this is required).
      priority: default VERY_LOW (MMEngine ProfilerHook).
    """

    priority = Priority.VERY_LOW

    def __init__(
        self,
        wait: int = 1,
        warmup: int = 1,
        active: int = 3,
        *,
        repeat: int = 1,
        activities: Iterable[str | torch.profiler.ProfilerActivity] | None = None,
        record_shapes: bool = False,
        profile_memory: bool = False,
        with_stack: bool = False,
        with_flops: bool = False,
        out_dir: str | Path | None = None,
        priority: int | str | None = None,
    ) -> None:
        super().__init__(priority=priority)
        for name, value, low in (
            ("wait", wait, 0),
            ("warmup", warmup, 0),
            ("active", active, 1),
            ("repeat", repeat, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"Profiler: {name} must be an int >= {low}, got {value!r}")
        self.wait, self.warmup, self.active, self.repeat = wait, warmup, active, repeat
        if activities is None:
            acts = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                acts.append(torch.profiler.ProfilerActivity.CUDA)
        else:
            acts = []
            for a in activities:
                if isinstance(a, str):
                    if a.lower() not in _ACTIVITIES:
                        raise ValueError(
                            f"Profiler: unknown activity {a!r}; expected one of {sorted(_ACTIVITIES)}"
                        )
                    a = _ACTIVITIES[a.lower()]
                elif not isinstance(a, torch.profiler.ProfilerActivity):
                    raise ValueError(
                        f"Profiler: activities must be 'cpu'/'cuda' or ProfilerActivity, got {a!r}"
                    )
                acts.append(a)
            if not acts:
                raise ValueError("Profiler: activities is empty")
        self.activities = acts
        self.record_shapes = check_bool("Profiler", "record_shapes", record_shapes)
        self.profile_memory = check_bool("Profiler", "profile_memory", profile_memory)
        self.with_stack = check_bool("Profiler", "with_stack", with_stack)
        self.with_flops = check_bool("Profiler", "with_flops", with_flops)
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.traces: list[Path] = []
        self._prof: torch.profiler.profile | None = None
        self._out: Path | None = None
        self._step = 0
        self._windows_left: int | None = None

    @property
    def active_now(self) -> bool:
        """Whether the profiler is open (a window is pending or being recorded)."""
        return self._prof is not None

    def _trace_ready(self, prof: torch.profiler.profile) -> None:
        assert self._out is not None
        rank = (
            f"_rank{dist.get_rank()}"
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
            else ""
        )
        path = self._out / f"trace_step{self._step}{rank}.json"
        prof.export_chrome_trace(str(path))
        self.traces.append(path)
        if self._windows_left is not None:
            self._windows_left -= 1

    def on_before_run(self, snap: Snapshot) -> None:
        self.close()  # a profiler left open by an earlier run that raised
        out = (
            self.out_dir
            if self.out_dir is not None
            else (snap.run.work_dir / "profiler" if snap.run.work_dir is not None else None)
        )
        if out is None:
            raise ValueError(
                "Profiler: no directory for the traces; pass fit(..., work_dir=...) or Profiler(out_dir=...)"
            )
        out.mkdir(parents=True, exist_ok=True)
        self._out = out
        self._step = snap.step
        self._windows_left = self.repeat if self.repeat > 0 else None
        prof = torch.profiler.profile(
            activities=self.activities,
            schedule=torch.profiler.schedule(
                wait=self.wait, warmup=self.warmup, active=self.active, repeat=self.repeat
            ),
            on_trace_ready=self._trace_ready,
            record_shapes=self.record_shapes,
            profile_memory=self.profile_memory,
            with_stack=self.with_stack,
            with_flops=self.with_flops,
        )
        prof.__enter__()
        self._prof = prof

    def on_after_train_iter(self, snap: Snapshot) -> None:
        if self._prof is None:
            return
        self._step = snap.step
        self._prof.step()
        if self._windows_left == 0:
            self.close()  # every window written: stop paying for the profiler

    def on_after_train(self, snap: Snapshot) -> None:
        self._step = snap.step
        self.close()

    def on_after_run(self, snap: Snapshot) -> None:
        self.close()

    def close(self) -> None:
        """Stop profiling now (writes the window being recorded, if any). Safe to call twice."""
        prof, self._prof = self._prof, None
        if prof is not None:
            prof.__exit__(None, None, None)


class ScheduleRecorder(Handler):
    """Record hyper-parameter values at every training update (for plots and tests).

    ``ScheduleRecorder(lr=cosine, wd=schedules.linear(...))`` appends to
    ``.history``, at each ``after_train_iter``, a dict with

    * ``"step"``: the 0-based index of the update just applied (``snap.step - 1``),
    * each named schedule's value at that step (``entry[name] == schedule(entry["step"])``),
    * the step metrics named ``lr`` or ``<group>/lr`` (the lr that update used,
      as the optimizer reported it; absent on an fp16-skipped update).

    A schedule named like a metric (``lr=...``) replaces the metric's value in the
    entry. ``values(key)`` is the column ``[entry[key] for entry in history]``.
    The history is not checkpointed: after a resume it holds the new steps only.
    """

    priority = Priority.NORMAL

    def __init__(
        self, *, priority: int | str | None = None, **schedules: Callable[[int], float]
    ) -> None:
        super().__init__(priority=priority)
        for name, s in schedules.items():
            if not callable(s):
                raise TypeError(
                    f"ScheduleRecorder: {name} must be a schedule step -> value, got {type(s).__name__}"
                )
        self.schedules = dict(schedules)
        self.history: list[dict[str, Any]] = []

    def on_after_train_iter(self, snap: Snapshot) -> None:
        step = snap.step - 1
        entry: dict[str, Any] = {"step": step}
        for k, v in snap.metrics.items():
            if k == "lr" or k.endswith("/lr"):
                entry[k] = float(v)
        for name, s in self.schedules.items():
            entry[name] = float(s(step))
        self.history.append(entry)

    def values(self, key: str) -> list[Any]:
        """``[entry[key] for entry in history]`` (KeyError naming the recorded keys if absent)."""
        out = []
        for entry in self.history:
            if key not in entry:
                raise KeyError(
                    f"ScheduleRecorder: {key!r} not recorded at step {entry['step']}; keys: {sorted(entry)}"
                )
            out.append(entry[key])
        return out
