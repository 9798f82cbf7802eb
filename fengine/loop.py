"""Loops as folds: `fit` folds the step over the data and emits events; `evaluate` folds metrics.

Epoch-based (``max_epochs``) and iteration-based (``max_steps``) training are the
same fold with a different end. The loop position (epoch, batch index in the
epoch, step) lives in the `TrainState`, so a run continues from any state.

Validation follows MMEngine: after epoch ``e`` (or update ``i``) when
``e >= begin and (e % interval == 0 or e == last)`` — it always runs after the
last epoch/step, and the modulus is absolute, not counted from ``begin``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fengine import checkpoint
from fengine.bind import bind
from fengine.events import Dispatcher, RunInfo, Snapshot
from fengine.metrics import Evaluator, Metric
from fengine.state import DonatedStateError, TrainState
from fengine.step import Step
from fengine.transforms import MicroBatches, ema_params


__all__ = ["Val", "default_predict", "evaluate", "fit", "should_validate"]

log = logging.getLogger("fengine")


def default_predict(model: nn.Module, batch: Any) -> Any:
    """``model(inputs)`` where inputs are ``batch[0]`` (tuple/list) or ``batch["inputs"]`` (dict)."""
    if isinstance(batch, (tuple, list)) and batch:
        return model(batch[0])
    if isinstance(batch, Mapping) and "inputs" in batch:
        return model(batch["inputs"])
    raise TypeError(
        f"default_predict: cannot find the inputs in a batch of type {type(batch).__name__}; expected "
        "(inputs, ...) or {'inputs': ...}. Pass eval_fn=lambda model, batch: ... to Val/evaluate."
    )


@dataclasses.dataclass(frozen=True)
class Val:
    """Validation during `fit`: what to evaluate and when.

    ``interval`` defaults to 1 epoch (epoch-based runs) or 1000 steps
    (iteration-based), MMEngine's defaults. ``params``: "auto" validates with the
    EMA params when the step keeps an EMA, "live" or "ema" to force.
    """

    data: Iterable
    metrics: Sequence[Metric] | Evaluator
    eval_fn: Callable[[nn.Module, Any], Any] = default_predict
    interval: int | None = None
    begin: int = 1
    params: str = "auto"


def should_validate(done: int, *, interval: int, begin: int, last: int) -> bool:
    """MMEngine's rule: after ``done`` epochs/steps, validate if ``done >= begin`` and on the interval or last."""
    return done >= begin and (done % interval == 0 or done == last)


def _eval_params(state: TrainState, which: str) -> dict[str, torch.Tensor]:
    if which == "auto":
        return ema_params(state)
    ema = state.extra.get("ema")
    if which == "ema":
        if ema is None:
            raise ValueError(
                "params='ema' but the state has no EMA; add fengine.ema(...) to the step"
            )
        return ema.params
    if which == "live":
        return state.params
    raise ValueError(f"params must be 'auto', 'ema' or 'live', got {which!r}")


def _batches(data: Iterable, epoch: int, start: int) -> Iterator:
    """The batches of ``epoch`` from index ``start``: by arithmetic for fengine Loaders, by skipping otherwise."""
    if hasattr(data, "epoch") and callable(data.epoch):
        return iter(data.epoch(epoch, start_batch=start))
    sampler = getattr(data, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    return itertools.islice(iter(data), start, None)


def _length(data: Iterable, name: str) -> int:
    try:
        n = len(data)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(
            f"{name} must have a length (batches per epoch); got {type(data).__name__}"
        ) from None
    if n == 0:
        raise ValueError(f"{name} is empty: expected at least one batch per epoch")
    return n


def _evaluate(state, data, metrics, eval_fn, *, params, dispatch, run, phase) -> dict[str, float]:
    evaluator = metrics if isinstance(metrics, Evaluator) else Evaluator(list(metrics))
    model = state.model
    if model is None:
        raise ValueError("the state has no model; build it with TrainState.create(model, tx, ...)")
    n = len(data) if hasattr(data, "__len__") else None
    snap = lambda event, **kw: lambda: Snapshot(event, state, run, phase=phase, eval_len=n, **kw)  # noqa: E731
    dispatch(f"before_{phase}", snap(f"before_{phase}"))
    dispatch(f"before_{phase}_epoch", snap(f"before_{phase}_epoch"))
    was_training = model.training
    model.eval()
    eval_params = _eval_params(state, params)
    acc = evaluator.init()
    try:
        batches = _batches(data, 0, 0) if hasattr(data, "epoch") else iter(data)
        for i, batch in enumerate(batches):
            dispatch(f"before_{phase}_iter", snap(f"before_{phase}_iter", batch_idx=i, batch=batch))
            with torch.no_grad(), bind(model, eval_params, state.buffers):
                outputs = eval_fn(model, batch)
            acc = evaluator.update(acc, batch, outputs)
            dispatch(
                f"after_{phase}_iter",
                snap(f"after_{phase}_iter", batch_idx=i, batch=batch, outputs=outputs),
            )
    finally:
        model.train(was_training)
    results = evaluator.compute(acc)
    dispatch(f"after_{phase}_epoch", snap(f"after_{phase}_epoch", metrics=results))
    dispatch(f"after_{phase}", snap(f"after_{phase}", metrics=results))
    return results


def evaluate(
    state: TrainState,
    eval_fn: Callable[[nn.Module, Any], Any],
    data: Iterable,
    metrics: Sequence[Metric] | Evaluator,
    *,
    params: str = "auto",
    handlers: Iterable[Any] = (),
    phase: str = "test",
) -> dict[str, float]:
    """Evaluate ``metrics`` over ``data``: ``eval_fn(model, batch) -> outputs`` with the state's
    params bound (EMA params if the state keeps them, unless ``params="live"``), in eval mode,
    without gradients. Handlers get the ``test`` events (MMEngine's TestLoop)."""
    if phase not in ("val", "test"):
        raise ValueError(f"evaluate: phase must be 'val' or 'test', got {phase!r}")
    run = RunInfo(
        work_dir=None,
        by_epoch=False,
        max_epochs=None,
        max_steps=state.step,
        steps_per_epoch=0,
        batches_per_epoch=0,
        micro_batches=1,
        start_step=state.step,
    )
    return _evaluate(
        state,
        data,
        metrics,
        eval_fn,
        params=params,
        dispatch=Dispatcher(handlers),
        run=run,
        phase=phase,
    )


def fit(
    state: TrainState,
    step: Step,
    train_data: Iterable,
    *,
    max_epochs: int | None = None,
    max_steps: int | None = None,
    val: Val | None = None,
    handlers: Iterable[Any] | None = None,
    work_dir: str | Path | None = None,
    resume: bool | str | Path = False,
    config: Mapping[str, Any] | None = None,
) -> TrainState:
    """Train: fold ``step`` over ``train_data`` until ``max_epochs`` or ``max_steps``.

    ``train_data`` is a `fengine.data.Loader` (resumes mid-epoch by index
    arithmetic) or any re-iterable with a length (resumes by skipping batches).
    With `fengine.accumulate` (k), each update consumes a group of k batches;
    the last group of an epoch may be shorter. ``handlers=None`` uses
    `fengine.handlers.default_handlers`.

    ``resume=True`` continues from ``work_dir``'s latest checkpoint (from scratch
    if there is none), ``resume=PATH`` from that file: the state, and the
    handlers' own state (best score, kept checkpoints, patience), continue
    exactly where they were. SIGTERM/SIGINT during training (with a
    ``work_dir``) save a checkpoint at the next step boundary and exit with
    status 128 + signal number. Returns the final state.
    """
    if not isinstance(state, TrainState):
        raise TypeError(f"fit: state must be a TrainState, got {type(state).__name__}")
    if not isinstance(step, Step):
        raise TypeError(
            f"fit: step must be a Step from fengine.train_step, got {type(step).__name__}"
        )
    if (max_epochs is None) == (max_steps is None):
        raise ValueError(
            f"fit: give exactly one of max_epochs (epoch-based) or max_steps (iteration-based); "
            f"got max_epochs={max_epochs}, max_steps={max_steps}"
        )
    for name, value in (("max_epochs", max_epochs), ("max_steps", max_steps)):
        if value is not None and (
            not isinstance(value, int) or isinstance(value, bool) or value < 1
        ):
            raise ValueError(f"fit: {name} must be an int >= 1, got {value!r}")
    batches_per_epoch = _length(train_data, "train_data")
    k = step.micro_batches
    steps_per_epoch = math.ceil(batches_per_epoch / k)
    by_epoch = max_epochs is not None
    total = max_epochs * steps_per_epoch if by_epoch else max_steps
    interval = 0
    if val is not None:
        if not isinstance(val, Val):
            raise TypeError(
                f"fit: val must be a fengine.Val(data, metrics, ...), got {type(val).__name__}"
            )
        interval = val.interval if val.interval is not None else (1 if by_epoch else 1000)
        if interval < 1:
            raise ValueError(f"Val: interval must be >= 1, got {interval}")
    work_dir = Path(work_dir) if work_dir is not None else None
    if resume is True and work_dir is None:
        raise ValueError(
            "fit: resume=True continues from work_dir's latest checkpoint; pass work_dir=..."
        )
    if handlers is None:
        from fengine.handlers import default_handlers

        handlers = default_handlers()
    if work_dir is not None:
        work_dir.mkdir(parents=True, exist_ok=True)

    state = step.init_state(state)
    dispatch = Dispatcher(handlers)
    current = {"state": state, "run": None}

    def at(event: str, **kw: Any) -> Callable[[], Snapshot]:
        return lambda: Snapshot(event, current["state"], current["run"], **kw)

    def run_info(start_step: int) -> RunInfo:
        return RunInfo(
            work_dir=work_dir,
            by_epoch=by_epoch,
            max_epochs=max_epochs,
            max_steps=total,
            steps_per_epoch=steps_per_epoch,
            batches_per_epoch=batches_per_epoch,
            micro_batches=k,
            start_step=start_step,
            config=config,
            val_batches=len(val.data) if val is not None and hasattr(val.data, "__len__") else None,
        )

    def save(path: Path, latest: bool) -> None:
        path = Path(path)
        dispatch("before_save_checkpoint", at("before_save_checkpoint", checkpoint=path))
        meta = {
            "config": dict(config) if config else None,
            "handlers": dispatch.state_dicts(),
            "run": {"by_epoch": by_epoch, "max_epochs": max_epochs, "max_steps": total},
        }
        checkpoint.save(path, current["state"], meta)
        if latest:
            checkpoint.mark_latest(work_dir if work_dir is not None else path.parent, path)
        dispatch("after_save_checkpoint", at("after_save_checkpoint", checkpoint=path))

    def flush_saves() -> None:
        while dispatch.saves:
            request = dispatch.saves.pop(0)
            save(request.path, request.latest)

    def validate() -> None:
        _evaluate(
            current["state"],
            val.data,
            val.metrics,
            val.eval_fn,
            params=val.params,
            dispatch=dispatch,
            run=current["run"],
            phase="val",
        )
        flush_saves()

    current["run"] = run_info(state.step)
    dispatch("before_run", at("before_run"))
    if resume:
        path = checkpoint.latest(work_dir) if resume is True else Path(resume)
        if path is None:
            log.info("resume: no checkpoint in %s; starting from scratch", work_dir)
        else:
            state = checkpoint.load(path, like=state)
            dispatch.load_state_dicts(
                (checkpoint.read_meta(path)["meta"] or {}).get("handlers") or {}
            )
            current.update(state=state, run=run_info(state.step))
            log.info(
                "resumed from %s at step %d (epoch %d, batch %d)",
                path,
                state.step,
                state.epoch,
                state.batch_in_epoch,
            )
            dispatch("after_load_checkpoint", at("after_load_checkpoint", checkpoint=path))
    dispatch("before_train", at("before_train"))
    with _preemption(enabled=work_dir is not None) as interrupted:
        while (
            dispatch.stop is None
            and state.step < total
            and not (by_epoch and state.epoch >= max_epochs)
        ):
            dispatch("before_train_epoch", at("before_train_epoch"))
            if dispatch.stop is not None:
                break
            batches = _batches(train_data, state.epoch, state.batch_in_epoch)
            t_last = time.perf_counter()
            while True:
                group = list(itertools.islice(batches, k))
                if not group:
                    break
                batch = MicroBatches(group) if k > 1 else group[0]
                data_time = time.perf_counter() - t_last
                idx = state.batch_in_epoch // k
                dispatch(
                    "before_train_iter",
                    at("before_train_iter", batch_idx=idx, batch=batch, data_time=data_time),
                )
                if dispatch.stop is not None:
                    break
                at_epoch, at_batch = state.epoch, state.batch_in_epoch
                try:
                    state, metrics = step(state, batch)
                except DonatedStateError:
                    raise
                except (TypeError, ValueError, IndexError, KeyError, RuntimeError) as e:
                    if hasattr(e, "add_note"):
                        hint = (
                            ""
                            if type(e) is RuntimeError
                            else "; check that the loss function matches the batch structure"
                        )
                        e.add_note(
                            f"fit: while running the step on batch {at_batch} of epoch {at_epoch} "
                            f"(a {type(batch).__name__}){hint}"
                        )
                    raise
                state = state.replace(batch_in_epoch=state.batch_in_epoch + len(group))
                current["state"] = state
                dispatch(
                    "after_train_iter",
                    at(
                        "after_train_iter",
                        batch_idx=idx,
                        batch=batch,
                        metrics=metrics,
                        data_time=data_time,
                    ),
                )
                flush_saves()
                if interrupted:
                    _exit_preempted(interrupted[0], save, work_dir, state, dispatch, at)
                if (
                    not by_epoch
                    and val is not None
                    and should_validate(state.step, interval=interval, begin=val.begin, last=total)
                ):
                    validate()
                t_last = time.perf_counter()
                if dispatch.stop is not None or state.step >= total:
                    break
            if state.batch_in_epoch < batches_per_epoch:
                break  # stopped or reached max_steps inside the epoch: the position stays mid-epoch
            state = state.replace(epoch=state.epoch + 1, batch_in_epoch=0)
            current["state"] = state
            dispatch("after_train_epoch", at("after_train_epoch"))
            flush_saves()
            if (
                by_epoch
                and val is not None
                and should_validate(
                    state.epoch, interval=interval, begin=val.begin, last=max_epochs
                )
            ):
                validate()
        dispatch(
            "after_train",
            at("after_train", metrics={"stop": dispatch.stop.reason} if dispatch.stop else {}),
        )
        flush_saves()
    dispatch("after_run", at("after_run"))
    return current["state"]


@contextlib.contextmanager
def _preemption(enabled: bool):
    """Turn SIGTERM/SIGINT into a flag the loop checks at step boundaries (main thread only)."""
    received: list[int] = []
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield received
        return

    def on_signal(signum, frame):
        received.append(signum)
        signal.signal(signum, previous[signum])  # a second signal acts immediately

    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    for s in previous:
        signal.signal(s, on_signal)
    try:
        yield received
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _exit_preempted(signum, save, work_dir, state, dispatch, at) -> None:
    name = signal.Signals(signum).name
    path = work_dir / f"step_{state.step}.safetensors"
    log.warning("%s received: saving %s and exiting", name, path)
    save(path, True)
    dispatch("after_train", at("after_train", metrics={"stop": name}))
    dispatch("after_run", at("after_run"))
    raise SystemExit(128 + signum)
