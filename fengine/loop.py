"""Training as a fold: `train_steps` yields the loop's ticks, `fit` consumes them.

`train_steps` owns the position: it groups batches for accumulation, runs the
step (which donates the state), advances ``batch_in_epoch``/``epoch`` and yields a
`Tick` at each of MMEngine's four train-loop points. It does nothing else, so a
custom loop or a test can iterate it directly. `fit` is its consumer: handlers'
events, validation cadence, checkpoint requests, resume and preemption. A consumer
may send a state back (``ticks.send(state)``) to continue from it: `fit` sends the
state its validation results changed (`fengine.plateau.observe`).

Epoch-based (``max_epochs``) and iteration-based (``max_steps``) training are the
same fold with a different end (`plan` does the arithmetic, once). Validation
follows MMEngine: after epoch ``e`` (or update ``i``) when ``e >= begin and
(e % interval == 0 or e == last)`` — always after the last epoch/step, and the
modulus is absolute, not counted from ``begin``.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import functools
import itertools
import logging
import math
import re
import signal
import threading
import time
import types
import warnings
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any, NamedTuple

from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from fengine import checkpoint, distributed, plateau, schedules, sharding
from fengine.checkpoint._background import Snapshots, Writer
from fengine.checkpoint._format import read_header
from fengine.data.loader_rng import LoaderRng, persistent_workers_note
from fengine.devices import device_of, to_device
from fengine.evaluation import (
    AUTOCAST_DTYPES,
    EVAL_PARAMS,
    batches_of,
    data_length,
    default_predict,
    evaluate,
    run_eval,
    weights_for,
)
from fengine.events import Dispatcher, RunInfo
from fengine.finite import FiniteWatch
from fengine.metrics import Evaluator, Metric
from fengine.optim.paramwise import with_base_lr, without_base_lr
from fengine.state import DonatedStateError, TrainState
from fengine.step import Step
from fengine.workdir import lock_work_dir
from fengine.wrappers import MicroBatches


__all__ = [
    "Plan",
    "retire",
    "save",
    "Preempted",
    "Tick",
    "Val",
    "default_predict",
    "evaluate",
    "fit",
    "plan",
    "should_validate",
    "train_steps",
]

log = logging.getLogger("fengine")


@dataclasses.dataclass(frozen=True)
class Val:
    """Validation during `fit`: what to evaluate and when.

    ``interval`` defaults to 1 epoch (epoch-based runs) or 1000 steps
    (iteration-based), MMEngine's defaults. ``params``: "auto" validates with
    `TrainState.eval_weights` (the EMA ones when the step keeps an EMA), "live"
    or "ema" to force. ``autocast``: run the evaluation under autocast of that dtype
    (MMEngine's ``val_cfg=dict(fp16=True)`` is ``"float16"``). ``dynamic_intervals``:
    ``[(milestone, interval), ...]``, MMEngine's: from epoch (step) ``milestone`` on,
    validate every ``interval``.
    """

    data: Iterable
    metrics: Sequence[Metric] | Evaluator
    eval_fn: Callable[[nn.Module, Any], Any] = default_predict
    interval: int | None = None
    begin: int = 1
    params: str = "auto"
    autocast: str | None = None
    dynamic_intervals: Sequence[tuple[int, int]] = ()

    def __post_init__(self) -> None:
        """Refuse what would otherwise fail only at the first validation, after training."""
        loader = callable(getattr(self.data, "epoch", None))  # a fengine Loader
        if isinstance(self.data, Iterator) or not (loader or isinstance(self.data, Iterable)):
            raise TypeError(
                f"Val: data must be re-iterable (a list, DataLoader or fengine Loader): validation "
                f"runs several times; got a {type(self.data).__name__}"
            )
        if data_length(self.data) == 0:  # it failed after the first epoch of training
            raise ValueError(
                "Val: data is empty (no batch to validate on); give it the validation set"
            )
        if not isinstance(self.metrics, Evaluator):  # no metrics is fine: a pass for handlers
            object.__setattr__(self, "metrics", Evaluator(self.metrics))  # checks each metric
        if not callable(self.eval_fn):
            raise TypeError(
                f"Val: eval_fn must be a function (model, batch) -> outputs, got {self.eval_fn!r}"
            )
        for what, value, low in (("interval", self.interval, 1), ("begin", self.begin, 1)):
            if value is not None and not _is_int(value, low):
                raise ValueError(f"Val: {what} must be >= {low}, got {value!r}; expected an int")
        for pair in self.dynamic_intervals:
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and _is_int(pair[0], 0)
                    and _is_int(pair[1], 1)):  # fmt: skip
                raise ValueError(
                    "Val: dynamic_intervals must be [(milestone, interval), ...] with ints "
                    f"milestone >= 0 and interval >= 1, got {pair!r} in {self.dynamic_intervals!r}"
                )
        milestones = [pair[0] for pair in self.dynamic_intervals]
        for before, after in zip(milestones, milestones[1:]):
            if after <= before:  # bisect over them would pick intervals nobody meant
                raise ValueError(
                    "Val: dynamic_intervals' milestones must increase, got milestone "
                    f"{after} after {before} in {self.dynamic_intervals!r}"
                )
        if self.params not in EVAL_PARAMS:
            raise ValueError(f"Val: params must be 'auto', 'live' or 'ema', got {self.params!r}")
        if self.autocast is not None and self.autocast not in AUTOCAST_DTYPES:
            raise ValueError(
                f"Val: autocast must be None, 'float16' or 'bfloat16', got {self.autocast!r}"
            )


def _is_int(value: Any, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def should_validate(
    done: int,
    *,
    interval: int,
    begin: int,
    last: int,
    dynamic_intervals: Sequence[tuple[int, int]] = (),
) -> bool:
    """MMEngine's rule: after ``done`` epochs/steps, validate if ``done >= begin`` and on the interval
    or last; with ``dynamic_intervals`` the interval is the one whose milestone ``done + 1`` has reached
    (MMEngine's ``_decide_current_val_interval``)."""
    if dynamic_intervals:
        milestones = [0, *(m for m, _ in dynamic_intervals)]
        interval = [interval, *(i for _, i in dynamic_intervals)][
            bisect.bisect(milestones, done + 1) - 1
        ]
    return done >= begin and (done % interval == 0 or done == last)


class Plan(NamedTuple):
    """The loop's arithmetic, computed once (`plan`): recipes size their schedules from it."""

    batches_per_epoch: int  # loader batches (micro-batches with accumulation)
    steps_per_epoch: int  # optimizer updates per epoch
    total_steps: int  # the update the run ends at
    max_epochs: int | None  # None: iteration-based
    micro_batches: int

    @property
    def by_epoch(self) -> bool:
        return self.max_epochs is not None

    def done(self, state: TrainState) -> bool:
        """Epoch-based runs end by epochs (a resume at another world size changes the updates per
        epoch), iteration-based ones by updates."""
        if self.max_epochs is not None:
            return state.epoch >= self.max_epochs
        return state.step >= self.total_steps


def plan(
    train_data: Iterable | int,
    *,
    micro_batches: int = 1,
    max_epochs: int | None = None,
    max_steps: int | None = None,
    where: str = "plan",
) -> Plan:
    """Steps per epoch and total steps for ``train_data`` (or its number of batches), grouped
    ``micro_batches`` to an update, run for ``max_epochs`` or ``max_steps`` (exactly one)."""
    if (max_epochs is None) == (max_steps is None):
        raise ValueError(
            f"{where}: give exactly one of max_epochs (epoch-based) or max_steps (iteration-based); "
            f"got max_epochs={max_epochs}, max_steps={max_steps}"
        )
    for name, value in (
        ("max_epochs", max_epochs),
        ("max_steps", max_steps),
        ("micro_batches", micro_batches),
    ):
        if value is not None and (
            not isinstance(value, int) or isinstance(value, bool) or value < 1
        ):
            raise ValueError(f"{where}: {name} must be an int >= 1, got {value!r}")
    batches = train_data if isinstance(train_data, int) else _length(train_data, "train_data")
    if batches < 1:
        raise ValueError("train_data is empty: expected at least one batch per epoch")
    steps_per_epoch = math.ceil(batches / micro_batches)
    total = max_epochs * steps_per_epoch if max_epochs is not None else max_steps
    assert total is not None
    return Plan(batches, steps_per_epoch, total, max_epochs, micro_batches)


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


_NO_METRICS: Mapping[str, Any] = MappingProxyType({})


class Tick(NamedTuple):
    """One of the train loop's points, with the state there (valid until the next tick)."""

    event: str  # before_train_epoch | before_train_iter | after_train_iter | after_train_epoch
    state: TrainState
    batch_idx: int | None = None  # update index within the epoch
    batch: Any = None
    metrics: Mapping[str, Any] = _NO_METRICS
    data_time: float | None = None  # seconds spent waiting for the batch


def train_steps(
    state: TrainState,
    step: Step,
    train_data: Iterable,
    plan: Plan,
    *,
    stop: Callable[[], bool] = lambda: False,
    data_rng: LoaderRng | None = None,
) -> Generator[Tick, TrainState | None, None]:
    """Run ``step`` over ``train_data`` from ``state``'s position until ``plan`` is done (or ``stop()``),
    yielding a `Tick` at MMEngine's train-loop points: before/after each update, and before/after
    each epoch (epoch-based), or once around the whole run (iteration-based, as MMEngine's
    IterBasedTrainLoop: passes over the data are silent there, ``state.epoch`` still counts them).
    Batches are moved to the state's device for the step; ticks carry them as the data gave them.
    A state sent at a tick (``ticks.send(state)``) replaces the tick's state from there on.
    ``data_rng`` (`fengine.data.loader_rng.LoaderRng`) records and restores a DataLoader's
    generators around each pass."""
    if not plan.by_epoch:
        state = _sent((yield Tick("before_train_epoch", state)), state)
        while not stop() and not plan.done(state):
            if state.batch_in_epoch >= plan.batches_per_epoch:
                state = _next_epoch(state)
            state = yield from _updates(state, step, train_data, plan, stop, data_rng)
        if state.batch_in_epoch >= plan.batches_per_epoch:
            state = _next_epoch(state)
        yield Tick("after_train_epoch", state)  # the end: nothing follows to use a sent state
        return
    while True:
        if (
            state.batch_in_epoch >= plan.batches_per_epoch
        ):  # every batch done (also when resumed there)
            state = _next_epoch(state)
            state = _sent((yield Tick("after_train_epoch", state)), state)
        if stop() or plan.done(state):
            return
        state = _sent((yield Tick("before_train_epoch", state)), state)
        if stop():
            return
        state = yield from _updates(state, step, train_data, plan, stop, data_rng)
        if state.batch_in_epoch < plan.batches_per_epoch:
            return  # stopped inside the epoch: the position stays mid-epoch


def _sent(sent: TrainState | None, state: TrainState) -> TrainState:
    """The state a consumer sent at a tick, else the tick's own."""
    return state if sent is None else sent


def _next_epoch(state: TrainState) -> TrainState:
    return state.replace(epoch=state.epoch + 1, batch_in_epoch=0)


def _updates(
    state: TrainState,
    step: Step,
    train_data: Iterable,
    plan: Plan,
    stop: Callable[[], bool],
    data_rng: LoaderRng | None = None,
) -> Generator[Tick, TrainState | None, TrainState]:
    """The rest of the current pass over the data, one update per group of micro-batches."""
    k, device = plan.micro_batches, device_of(state.params)
    if data_rng is not None:
        data_rng.before_pass(mid_pass=state.batch_in_epoch > 0)
    on_skipped = data_rng.after_skip if data_rng is not None else None
    batches = batches_of(train_data, state.epoch, state.batch_in_epoch, on_skipped=on_skipped)
    try:
        t = time.perf_counter()
        group = _take(batches, k)
        while group:
            batch = MicroBatches(group) if k > 1 else group[0]
            # batch_idx as MMEngine gives it: in the epoch, or the global iteration
            idx, data_time = (
                state.batch_in_epoch // k if plan.by_epoch else state.step,
                time.perf_counter() - t,
            )
            # `_sent` written out: these two run on every update
            sent = yield Tick("before_train_iter", state, idx, batch, _NO_METRICS, data_time)
            if sent is not None:
                state = sent
            if stop():
                return state
            state, metrics = _run(step, state, to_device(batch, device))
            state = state.replace(batch_in_epoch=state.batch_in_epoch + len(group))
            ended = state.batch_in_epoch >= plan.batches_per_epoch
            if ended:
                # the pass's end is read before the tick: a RandomSampler draws one more permutation
                # there, which a checkpoint written at this tick must already hold
                t = time.perf_counter()
                group = [] if plan.done(state) else _take(batches, k)
            sent = yield Tick("after_train_iter", state, idx, batch, metrics, data_time)
            if sent is not None:
                state = sent
            if stop() or plan.done(state):
                return state
            if not ended:
                t = time.perf_counter()
                group = _take(batches, k)
        return state
    except BaseException:
        # the error's traceback keeps this frame, and with it a DataLoader's workers: end them
        del batches
        raise


def _take(batches: Iterator[Any], k: int) -> list[Any]:
    """The next ``k`` batches (fewer at the pass's end). `fit` tells an error of fetching a batch
    from the step's or a handler's by this function in its traceback (`_fetch_failed`)."""
    return list(itertools.islice(batches, k))


def _fetch_failed(error: BaseException) -> bool:
    """Was ``error`` raised while `train_steps` fetched the next batches (`_take`)?"""
    tb = error.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code is _take.__code__:
            return True
        tb = tb.tb_next
    return False


def _run(step: Step, state: TrainState, batch: Any) -> tuple[TrainState, Any]:
    try:
        return step(state, batch)
    except DonatedStateError:
        raise
    except (TypeError, ValueError, IndexError, KeyError, RuntimeError) as e:
        hint = (
            ""
            if type(e) is RuntimeError
            else "; check that the loss function matches the batch structure"
        )
        note = f"fit: while running the step on batch {state.batch_in_epoch} of epoch {state.epoch} (a {type(batch).__name__}){hint}"
        if hasattr(e, "add_note"):  # Python >= 3.11
            e.add_note(note)
        raise


class Preempted(Exception):
    """`fit` received SIGTERM/SIGINT, saved ``checkpoint`` at a step boundary and stopped.

    A recipe turns it into the conventional exit status: ``sys.exit(e.exit_code)`` (128 + signal).
    """

    def __init__(self, signum: int, checkpoint: Path, state: TrainState) -> None:
        self.signum, self.checkpoint, self.state = signum, checkpoint, state
        self.exit_code = 128 + signum
        super().__init__(
            f"{signal.Signals(signum).name} received: saved {checkpoint} at step {state.step}"
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
    check_nonfinite: bool = True,
) -> TrainState:
    """Train: fold ``step`` over ``train_data`` until ``max_epochs`` or ``max_steps``; returns the final state.

    ``train_data`` is a `fengine.data.Loader` (resumes mid-epoch by index
    arithmetic) or any re-iterable with a length (resumes by skipping batches).
    With `fengine.accumulate` (k), each update consumes a group of k batches;
    the last group of an epoch may be shorter. ``handlers=None`` uses
    `fengine.handlers.default_handlers` (Timer, Logger) and, with a ``work_dir``, a
    `Checkpointer` every epoch (iteration-based: at the end), as MMEngine's defaults. ``resume=True`` continues from
    ``work_dir``'s latest checkpoint (from scratch if there is none),
    ``resume=PATH`` from that file, handlers' own state included, and finishes
    what the uninterrupted run did at that position (its validation); with a donating step the
    file is read into ``state``'s own tensors (`checkpoint.load` ``into=True``), consuming it
    as the first update would. SIGTERM/SIGINT
    (with a ``work_dir``) save a checkpoint at the next step boundary and raise
    `Preempted`. The ``work_dir`` is locked for the run (`fengine.lock_work_dir`).
    ``check_nonfinite`` raises `FloatingPointError` on the first non-finite loss
    (`fengine.finite.FiniteWatch`: read every 50 updates, no per-step host sync).
    An error (or Ctrl-C) that stops the run carries its last whole state as
    ``error.fengine_state``: the given state is donated, and without checkpoints nothing else
    holds the training.
    """
    _check_fit_args(state, step, resume, work_dir, handlers)
    p = plan(
        train_data,
        micro_batches=step.micro_batches,
        max_epochs=max_epochs,
        max_steps=max_steps,
        where="fit",
    )
    _check_epoch_schedules(step, p)
    interval = _val_interval(val, p)
    for w in step.wrappers:  # e.g. an EMA that would begin after the run's end
        check = getattr(w, "check_horizon", None)
        if callable(check):
            check(max_epochs=p.max_epochs, total_steps=p.total_steps)
    if val is not None and val.params == "ema":
        try:  # the state has an EMA to validate with (it failed at the first validation)
            weights_for(state, "ema")
        except ValueError as e:
            raise ValueError(f"fit: Val(params='ema'): {e}") from None
    work_dir = Path(work_dir) if work_dir is not None else None
    world, main, device = _check_distributed(step), distributed.is_main(), device_of(state.params)
    # a DataLoader's order comes from torch generators: carried in checkpoints (one process)
    data_rng = LoaderRng(train_data) if world == 1 else None
    dispatch = Dispatcher(_default_handlers(work_dir, p.by_epoch) if handlers is None else handlers,
                          also=[data_rng] if data_rng and data_rng.generators else [])  # fmt: skip
    if world > 1:
        _check_same_length(p.batches_per_epoch)
        _check_ranks_agree(state, step, p, train_data, world, val, interval, dispatch.handlers,
                           bool(resume))  # fmt: skip
        start_replicas(state, step)
    if work_dir is not None and (note := persistent_workers_note(train_data)):
        log.warning("fit: %s", note)
    val_batches = None if val is None else data_length(val.data)
    held = contextlib.ExitStack()  # the checkpoint directories' locks, once they are known
    with lock_work_dir(work_dir if main else None), held:  # rank 0 writes the work dir
        run = RunInfo(work_dir, p.by_epoch, p.max_epochs, p.total_steps, p.steps_per_epoch,
                      p.batches_per_epoch, p.micro_batches, state.step, val_batches, config,
                      distributed.rank(), world, tuple(distributed.gather_objects(str(device))))  # fmt: skip
        save_dirs = _save_dirs(dispatch, run)
        if main:
            for d in dict.fromkeys([*([work_dir] if work_dir is not None else []), *save_dirs]):
                held.enter_context(lock_work_dir(d))  # another run saving there is refused
                _remove_stale_temps(d)
        bg = _Background()
        ticks: Generator[Tick, TrainState | None, None] | None = None
        try:
            dispatch("before_run", state, run)
            moment = None
            if resume:
                state, run, moment, resumed = _resume_on_every_rank(
                    state, step, resume, run, dispatch, save_dirs
                )
                _check_not_past(state, p)  # (refused: the loaded state is the error's)
                if resumed is not None:
                    _resumed(resumed, resume is not True, state, run, dispatch, save_dirs)
            elif main:
                _warn_if_saving_over(save_dirs)
            dispatch("before_train", state, run)
            _flush(state, run, dispatch, "before_train", bg)
            if val is None and any(isinstance(x, plateau.Plateau) for x in state.extra.values()):
                log.warning("fit: no val, so reduce_on_plateau never reduces; pass val=fe.Val(...)")
            watch = FiniteWatch(enabled=check_nonfinite, device=device)
            with _signals(enabled=work_dir is not None) as received:
                if (
                    val is not None
                    and moment is not None
                    and _validation_due(moment, state, p, val, interval)
                ):
                    # the checkpoint preceded it (at an epoch end, after that epoch's buffer sync)
                    state = _validate(state, val, dispatch, run, bg,
                                      sync=world > 1 and moment != "after_train_epoch")  # fmt: skip
                    if _signalled(received, None, world, device):  # preempted in that validation
                        _preempt(received, state, run, dispatch, "after_val", bg)
                ticks = train_steps(state, step, train_data, p,
                                    stop=lambda: dispatch.stop is not None, data_rng=data_rng)  # fmt: skip
                sent: TrainState | None = None  # the state validation changed, for the next tick
                at = "before_train"  # the loop moment `state` is at
                # runs between every two updates: each check costs nothing when there is nothing to do
                while True:
                    try:
                        tick = _next(ticks, sent)
                    except Exception as fetch_error:
                        # a signal to the process group ended a DataLoader's workers too, and the
                        # batch after `state` failed: still the preemption, of the state before it
                        # (the error is the Preempted's __context__)
                        if (received and world == 1 and _fetch_failed(fetch_error)
                                and not state.is_donated):  # fmt: skip
                            _preempt(received, state, run, dispatch, at, bg, watch)
                        raise
                    if tick is None:
                        break
                    event, state, batch_idx, batch, metrics, data_time = tick
                    sent, at = None, event
                    if bg.used:
                        bg.poll(run, dispatch)  # a finished background save: its events, or error
                    if event == "after_train_iter":
                        watch.record(state.step, metrics)
                    elif event == "after_train_epoch" and world > 1:
                        distributed.sync_buffers(state.buffers)  # MMEngine's SyncBuffersHook
                    if dispatch.wants(event):
                        dispatch(event, state, run, batch_idx=batch_idx, batch=batch,
                                 metrics=metrics, data_time=data_time)  # fmt: skip
                        if dispatch.saves or dispatch.retires:
                            _flush(state, run, dispatch, event, bg, watch)
                    if (received or world > 1) and _signalled(received, tick, world, device):
                        _preempt(received, state, run, dispatch, event, bg, watch)
                    if val is not None and _validation_due(event, state, p, val, interval):
                        state = sent = _validate(state, val, dispatch, run, bg, watch,
                                                 sync=world > 1 and event != "after_train_epoch")  # fmt: skip
                        at = "after_val"
                        if _signalled(received, tick, world, device):
                            _preempt(received, state, run, dispatch, "after_val", bg, watch)
                watch.check()
                if _signalled(
                    received, None, world, device
                ):  # e.g. in the final validation: still a preemption
                    _preempt(received, state, run, dispatch, "after_val", bg)
                # the last checkpoint is durable before after_train (which may publish it)
                bg.finish(run, dispatch)
                reason = {"stop": dispatch.stop.reason} if dispatch.stop else {}
                dispatch("after_train", state, run, metrics=reason)
                _flush(state, run, dispatch, "after_train", bg)
                bg.finish(run, dispatch)  # a save asked for at after_train
            dispatch("after_run", state, run)
        except BaseException as e:
            if ticks is not None:  # its DataLoader iterator ends its workers (the error's
                ticks.close()  # traceback holds this frame, and so the paused generator)
            bg.abandon()
            dispatch.close()  # files and tracker runs closed, their data flushed
            _keep_state(e, state)
            raise
    return state


def _check_epoch_schedules(step: Step, p: Plan) -> None:
    """A ``by_epoch`` schedule counts epochs of its own ``steps_per_epoch`` updates: one that is
    not this run's would move its milestones to other epochs, silently (MMEngine reads the
    epoch's length from the loader)."""
    for s in schedules.epoch_schedules(step):
        if s.steps_per_epoch != p.steps_per_epoch:
            per = f"{p.batches_per_epoch} batches"
            per += f", {p.micro_batches} per update" if p.micro_batches > 1 else ""
            raise ValueError(
                f"fit: the schedule {s!r} has steps_per_epoch="
                f"{s.steps_per_epoch}, but this run's epoch is {p.steps_per_epoch} updates "
                f"({per}), so its epochs would not be the loop's; build it with "
                "steps_per_epoch=fe.plan(train_data, ...).steps_per_epoch"
            )


def _check_not_past(state: TrainState, p: Plan) -> None:
    """A resume from beyond the run's horizon would return that later state as this run's end,
    silently (the recipes' CLI refuses it too)."""
    if p.max_epochs is not None:
        past = state.epoch > p.max_epochs or (
            state.epoch == p.max_epochs and state.batch_in_epoch > 0
        )
        horizon = f"max_epochs={p.max_epochs}"
    else:
        past, horizon = state.step > p.total_steps, f"max_steps={p.total_steps}"
    if past:
        raise ValueError(
            f"fit: the resumed checkpoint is at step {state.step} (epoch {state.epoch}, batch "
            f"{state.batch_in_epoch}), past this run's horizon ({horizon}); give a larger one to "
            "go on from it, or resume from an earlier checkpoint"
        )


def start_replicas(state: TrainState, step: Step) -> None:
    """DDP's start, under `data_parallel`: every rank from rank 0's weights and buffers (models
    seeded per rank would otherwise train apart). A collective; nothing in one process."""
    if any(type(w).__name__ == "_DataParallel" for w in step.wrappers):
        distributed.broadcast_from_main([*state.params.values(), *state.buffers.values()])


def _keep_state(error: BaseException, state: TrainState) -> None:
    """The last whole state on the error as ``error.fengine_state``: the state given to `fit` is
    donated, so a failure (a validation's error, Ctrl-C) would otherwise lose the training where
    no checkpoint holds it. A state consumed by a step that failed midway is not whole: none then."""
    if not state.is_donated:
        error.fengine_state = state  # type: ignore[attr-defined]
        if hasattr(error, "add_note"):  # Python 3.11+
            error.add_note(
                f"fit: the state at step {state.step} is kept as the error's .fengine_state (except ... as e: e.fengine_state)"
            )


def _check_distributed(step: Step) -> int:
    """The world size; several ranks need a step that averages gradients across them."""
    distributed.check_launch()
    world = distributed.world_size()
    if world > 1 and not any(type(w).__name__ in ("_DataParallel", "_Fsdp") for w in step.wrappers):
        raise ValueError(
            f"fit: {world} processes but the step does not average gradients across them, so each "
            "would train its own model; add fengine.data_parallel() to the step (before amp), or "
            "fengine.fsdp() for a model sharded with fengine.distributed.shard"
        )
    return world


def _check_same_length(batches: int) -> None:
    """Every rank must take the same number of batches per epoch: each update is a collective, so
    a rank with one batch more would wait forever (NCCL) or meet another collective (gloo)."""
    counts = distributed.unequal_counts(batches)
    if counts is not None:
        raise ValueError(
            f"fit: the ranks' train_data have different numbers of batches per epoch ({counts}, "
            "by rank); every update averages gradients across ranks, so each must take as many: "
            "shard with fengine.data.Loader(..., rank=, world_size=) and round_up=True (the "
            "default), or torch's DistributedSampler (which pads every rank to the same count)"
        )


def _check_ranks_agree(
    state: TrainState,
    step: Step,
    p: Plan,
    train_data: Iterable,
    world: int,
    val: Val | None = None,
    interval: int = 0,
    handlers: Sequence[Any] = (),
    resume: bool = False,
) -> None:
    """The ranks run one training: the same plan, wrappers, param layout, seed, optimizer
    hyper-parameters, validation schedule and handlers' cadence, and data sharded for this world
    size (each rank its own shard, in one order; validation data too). A difference was a hang,
    a gloo abort ("data size doesn't match"), replicas drifting apart or samples read twice and
    others never; it is one error naming the field, on every rank. One gather, once per `fit`."""
    # a train loader without a sharding sampler may read a per-rank dataset: not told apart;
    # a validation one is the whole set on every rank, which the metrics would count N times
    val_data = None if val is None else val.data
    train, held_out = _sharding(train_data), _sharding(val_data, whole=True)
    mine = {
        "data shards": None if train is None else train["world_size"],
        "data order (seed, shuffle, padding)": None if train is None else train["order"],
        "validation data shards": None if held_out is None else held_out["world_size"],
        "plan": tuple(p),
        "wrappers": [_described(w) for w in step.wrappers],
        "params": [(n, tuple(t.shape), str(t.dtype)) for n, t in state.params.items()],
        "buffers": [(n, tuple(t.shape), str(t.dtype)) for n, t in state.buffers.items()],
        "seed (step.init(model, seed=))": state.seed,
        "position (step, epoch, batch_in_epoch)": (state.step, state.epoch, state.batch_in_epoch),
        "optimizer hyper-parameters": {
            f"{part.name}: {k}" if part.name else k: v
            for part in step.parts
            for k, v in _hyperparameters(part.tx).items()
        },
        "validation (interval, begin, dynamic_intervals, params, autocast)": _val_schedule(
            val, interval
        ),
        "handlers (cadence)": _cadences(handlers),
        "resume": resume,
    }
    everyone = distributed.gather_objects(
        {**mine, "shard": None if train is None else train["rank"]}
    )
    for field, value in mine.items():
        for r, theirs in enumerate(everyone):
            if theirs[field] != value:
                hint = f" ({_RANK_HINTS[field]})" if field in _RANK_HINTS else ""
                ours, other = _difference(value, theirs[field])
                raise ValueError(
                    f"fit: the ranks differ in {field}: rank {distributed.rank()} has {ours}, "
                    f"rank {r} has {other}; every rank must run the same training "
                    f"(config, model, step) on its own shard of the data{hint}"
                )
    # the same on every rank by now
    for what, found in (("train_data", train), ("val data", held_out)):
        if found is not None and found["world_size"] != world:
            raise ValueError(
                f"fit: {world} processes but the {what}'s sampler shards the data "
                f"{found['world_size']} way(s), so ranks read the same samples; build it with "
                "rank= and world_size= (fengine.data.Loader) or DistributedSampler(num_replicas=) "
                "for this run"
            )
    shards = [theirs["shard"] for theirs in everyone]  # each rank's sampler rank
    if all(isinstance(r, int) for r in shards) and sorted(shards) != list(range(world)):
        raise ValueError(
            f"fit: the ranks read shards {shards} of train_data (rank r must read shard r, each "
            "once); build each rank's loader with rank=fe.distributed.rank()"
        )


def _sharding(data: Any, whole: bool = False) -> dict[str, Any] | None:
    """How ``data``'s sampler shards it: ``world_size``, this ``rank``'s shard, and the ``order``
    every rank must share; None when it cannot be told (a list of batches; a DataLoader without
    a sharding sampler, unless ``whole``: then it is one shard)."""
    sampler = getattr(data, "sampler", None)
    world = getattr(sampler, "world_size", getattr(sampler, "num_replicas", None))
    if isinstance(world, int):
        padding = getattr(sampler, "round_up", None)
        padding = padding if padding is not None else not getattr(sampler, "drop_last", False)
        shuffle = getattr(sampler, "shuffle", None)
        seed = getattr(sampler, "seed", None) if shuffle is not False else None  # unused then
        return {"world_size": world, "rank": getattr(sampler, "rank", None),
                "order": (seed, shuffle, padding)}  # fmt: skip
    if (
        whole
        and isinstance(data, DataLoader)
        and not isinstance(data.dataset, IterableDataset)  # it may shard itself
    ):
        return {"world_size": 1, "rank": 0, "order": None}
    return None


def _val_schedule(val: Val | None, interval: int) -> tuple[Any, ...] | None:
    """When and how ``val`` validates (``interval`` resolved): a rank validating at other updates
    met the others' all-reduce with its evaluation's gather."""
    if val is None:
        return None
    dynamic = [tuple(pair) for pair in val.dynamic_intervals]
    return (interval, val.begin, dynamic, val.params, val.autocast)


_RANK_HINTS = {
    "data order (seed, shuffle, padding)": "a per-rank seed from "
    "seed_everything(diff_rank_seed=True) is for dropout, not the data's order",
    "seed (step.init(model, seed=))": "give step.init one seed on every rank: the checkpoint "
    "keeps rank 0's; per-rank dropout is fe.data_parallel(diff_rank_seed=True)",
    "resume": "pass the same resume= on every rank",
}


def _difference(ours: Any, theirs: Any, limit: int = 300) -> tuple[str, str]:
    """Two ranks' values of a field, shortened: of a dict (the optimizer's hyper-parameters),
    only the entries that differ."""
    if isinstance(ours, dict) and isinstance(theirs, dict):
        keys = [k for k in {**ours, **theirs} if ours.get(k) != theirs.get(k)]
        ours = {k: ours.get(k, "(none)") for k in keys}
        theirs = {k: theirs.get(k, "(none)") for k in keys}
    return _shortened(repr(ours), limit), _shortened(repr(theirs), limit)


def _shortened(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


_CADENCE = ("interval", "by_epoch", "every", "once", "save_begin", "save_last", "save_best",
            "async_save", "monitor", "patience", "min_delta", "stopping_threshold")  # fmt: skip
"""The attributes that say when a `collective` handler acts (a save is a collective; a stop ends
the loop): compared across ranks. Its other attributes may hold per-rank values (times, files)."""


def _cadences(handlers: Sequence[Any]) -> list[str]:
    """The `fengine.events.Handler.collective` handlers (Checkpointer, EarlyStopping: they act on
    every rank at once) as the ranks can compare them: the type (or its own repr, without memory
    addresses) and their `_CADENCE` attributes, ``Checkpointer(interval=2, ...)``. The others
    (a Logger, a tracker, a Timer, one of your own only rank 0 has) are not compared."""
    out = []
    for h in handlers:
        if not getattr(h, "collective", False):
            continue
        attrs = [(a, getattr(h, a)) for a in _CADENCE if hasattr(h, a)]
        own = type(h).__repr__ is not object.__repr__
        shown = ", ".join(f"{a}={v!r}" for a, v in attrs if _plain(v))
        out.append(f"{_described(h) if own else type(h).__qualname__}({shown})")
    return out


_PLAIN = (bool, int, float, complex, str)


def _plain(value: Any) -> bool:
    """A number, string or None, or a short list/tuple of them: compared by its repr."""
    if value is None or isinstance(value, _PLAIN):
        return True
    return (
        isinstance(value, (list, tuple))
        and len(value) <= 64
        and all(v is None or isinstance(v, _PLAIN) for v in value)
    )


def _hyperparameters(tx: Any) -> dict[str, str]:
    """``tx``'s hyper-parameters as the ranks can compare them: a `GradientTransformation`'s
    repr shows only its functions, so the numbers their closures captured (``sgd.lr``,
    ``sgd.weight_decay``; a schedule by its repr), found as `fengine.schedules.reachable` walks
    them. A name captured several times with one value counts once. Tensors, modules and other
    libraries' objects (a device: per rank) are not entered."""
    found: dict[str, list[str]] = {}
    seen: set[int] = set()

    def walk(x: Any, name: str, depth: int) -> None:
        if x is None or depth > 16:
            return
        ours = type(x).__module__.split(".")[0] == "fengine"
        if _plain(x) or (ours and not isinstance(x, tuple) and (  # a schedule: by its fields
                dataclasses.is_dataclass(x) or type(x).__repr__ is not object.__repr__)):  # fmt: skip
            found.setdefault(name, []).append(_described(x))
            return
        if id(x) in seen:  # (a shared object is entered once: the ranks share alike)
            return
        seen.add(id(x))
        if isinstance(x, types.FunctionType):
            owner = x.__qualname__.split(".<locals>")[0]
            for var, cell in zip(x.__code__.co_freevars, x.__closure__ or ()):
                with contextlib.suppress(ValueError):  # an empty cell
                    walk(cell.cell_contents, f"{owner}.{var}", depth + 1)
        elif isinstance(x, functools.partial):
            for v in (x.func, *x.args, *x.keywords.values()):
                walk(v, name, depth + 1)
        elif isinstance(x, (list, tuple)) and len(x) <= 256:  # more: a closure's data
            for v in x:
                walk(v, name, depth + 1)
        elif isinstance(x, dict) and len(x) <= 256:
            for k, v in x.items():
                walk(v, f"{name}[{_described(k)}]", depth + 1)
        elif ours and hasattr(x, "__dict__"):
            for k, v in vars(x).items():
                walk(v, f"{type(x).__name__}.{k}", depth + 1)

    walk(tx, "tx", 0)
    return {k: v[0] if len(set(v)) == 1 else ", ".join(v) for k, v in found.items()}


def _described(wrapper: Any) -> str:
    """A wrapper as the ranks can compare it: its repr without memory addresses (a partial's or
    a callable object's repr has one, which differs between processes)."""
    return _ADDRESS.sub("", repr(wrapper))


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def _remove_stale_temps(directory: Path) -> None:
    """Temp files of killed saves: safe to remove, since this run holds the directory's lock."""
    removed = checkpoint.clean_stale_temps(directory, locked=True)
    if removed:
        log.info("removed %d temp file(s) left by interrupted saves in %s", len(removed), directory)


def _warn_if_saving_over(save_dirs: list[Path]) -> None:
    """A fresh run saving where checkpoints already are replaces those of the same names (as
    MMEngine's; Lightning warns too): say so before the first save, naming them."""
    for d in save_dirs:
        found = checkpoint.list_checkpoints(d)
        if found:
            names = ", ".join(p.name for p, _ in found[-3:])
            log.warning("fit: %s already holds %d checkpoint(s) (%s); this run "
                        "(resume=False) replaces those of the same names: resume=True continues "
                        "that run, another work_dir keeps both", d, len(found), names)  # fmt: skip


def _save_dirs(dispatch: Dispatcher, run: RunInfo) -> list[Path]:
    """Where the handlers save checkpoints (a `Checkpointer`'s ``directory``); one that has
    nowhere to save is left to say so at ``before_train``."""
    dirs = []
    for h in dispatch.handlers:
        if callable(getattr(h, "directory", None)):
            try:
                dirs.append(Path(h.directory(run)))
            except ValueError:
                continue
    return dirs


def _check_fit_args(state: Any, step: Any, resume: Any, work_dir: Any, handlers: Any) -> None:
    if not isinstance(state, TrainState):
        raise TypeError(f"fit: state must be a TrainState, got {type(state).__name__}")
    if not isinstance(step, Step):
        raise TypeError(
            f"fit: step must be a Step from fengine.train_step, got {type(step).__name__}"
        )
    if resume is True and work_dir is None:
        raise ValueError(
            "fit: resume=True continues from work_dir's latest checkpoint; pass work_dir=..."
        )
    if handlers is not None and not isinstance(handlers, Iterable):
        raise TypeError(
            f"fit: handlers must be a list of handlers (e.g. [fe.handlers.Timer()]) or None, "
            f"got a single {type(handlers).__name__}; wrap it in a list"
        )
    if work_dir is not None:
        _check_work_dir(Path(work_dir))


def _check_work_dir(work_dir: Path) -> None:
    """``work_dir`` (or the nearest of its parents that exists) is a directory: the run creates
    it, and a file there would fail later with a bare ``FileExistsError``."""
    for d in (work_dir, *work_dir.parents):
        if d.exists():
            if not d.is_dir():
                where = "" if d == work_dir else f" (its parent {d} is not a directory)"
                raise NotADirectoryError(
                    f"fit: work_dir={str(work_dir)!r} names a file{where}; expected a directory "
                    "(existing, or one to create)"
                )
            return


def _default_handlers(work_dir: Path | None, by_epoch: bool) -> list[Any]:
    """`fengine.handlers.default_handlers`, and with a work dir MMEngine's default CheckpointHook: a
    checkpoint every epoch (iteration-based runs: at the end, as its interval=1 epoch gives there)."""
    from fengine.handlers import Checkpointer, default_handlers  # handlers import the loop's types

    handlers = default_handlers()
    if work_dir is not None:
        handlers.append(Checkpointer(1) if by_epoch else Checkpointer(-1, by_epoch=False))
    return handlers


def _val_interval(val: Val | None, p: Plan) -> int:
    if val is None:
        return 0
    if not isinstance(val, Val):
        raise TypeError(
            f"fit: val must be a fengine.Val(data, metrics, ...), got {type(val).__name__}"
        )
    interval = val.interval if val.interval is not None else (1 if p.by_epoch else 1000)
    if interval < 1:
        raise ValueError(f"Val: interval must be >= 1, got {interval}")
    return interval


def _validation_due(event: str, state: TrainState, p: Plan, val: Val, interval: int) -> bool:
    """After each epoch (epoch-based) or update (iteration-based), by `should_validate`."""
    if event != ("after_train_epoch" if p.by_epoch else "after_train_iter"):
        return False
    done = state.epoch if p.by_epoch else state.step
    return should_validate(done, interval=interval, begin=val.begin, last=p.max_epochs or p.total_steps,
                           dynamic_intervals=val.dynamic_intervals)  # fmt: skip


def _next(ticks: Generator[Tick, TrainState | None, None], sent: TrainState | None) -> Tick | None:
    """The next tick (``sent``: the state to continue from), None at the end."""
    try:
        return ticks.send(sent)  # the first send is None, as a new generator needs
    except StopIteration:
        return None


def _validate(state: TrainState, val: Val, dispatch: Dispatcher, run: RunInfo,
              bg: _Background | None = None, watch: FiniteWatch | None = None, *,
              sync: bool = False) -> TrainState:  # fmt: skip
    """Validate; the state after its results. ``sync``: average the ranks' buffers first, where no
    epoch end just did (MMEngine's SyncBuffersHook.before_val_epoch). Once the ``after_val_epoch``
    handlers have run, reduce_on_plateau observes the results and the checkpoints asked for are
    written, before ``after_val`` (MMEngine's ParamSchedulerHook, then CheckpointHook)."""
    if sync:
        distributed.sync_buffers(state.buffers)
    observed = state

    def checkpoints(results: dict[str, Any]) -> TrainState:
        nonlocal observed
        observed = plateau.observe(state, results)
        _flush(observed, run, dispatch, "after_val", bg, watch)
        return observed

    run_eval(state, val.data, val.metrics, val.eval_fn, params=val.params, dispatch=dispatch,
             run=run, phase="val", autocast=val.autocast, after_epoch=checkpoints)  # fmt: skip
    return observed


def _resume(
    state: TrainState,
    step: Step,
    resume: bool | str | Path,
    run: RunInfo,
    dispatch: Dispatcher,
    save_dirs: list[Path],
) -> tuple[TrainState, RunInfo, str | None, Path | None]:
    """Load the checkpoint and the handlers' state; also the loop moment it was saved at and
    the file (None: nothing to resume from) (``save_dirs``: where the handlers save checkpoints).
    Nothing is written yet: `fit` checks the loaded state, then `_resumed` goes on."""
    if resume is True:
        assert run.work_dir is not None
        with warnings.catch_warnings(
            record=True
        ) as said:  # a fallback is news for the log, not an error
            warnings.simplefilter("always")
            path = checkpoint.latest(run.work_dir, save_dir=save_dirs[0] if save_dirs else None)
        for w in said:
            log.warning("resume: %s", w.message)
    else:
        path = Path(resume)  # type: ignore[arg-type]  # fit only resumes when resume is truthy
    if path is None:
        log.info("resume: no checkpoint in %s; starting from scratch", run.work_dir)
        return state, run, None, None
    # the metadata first: a file refused for it leaves the given state as it was
    info = checkpoint.read_meta(path)
    meta = info["meta"] if isinstance(info["meta"], Mapping) else {}
    handler_states, saved_run = meta.get("handlers") or {}, meta.get("run") or {}
    for what, value in (("handler state", handler_states), ("run record", saved_run)):
        if not isinstance(value, Mapping):
            raise checkpoint.CheckpointError(
                f"{path}: its {what} is a {type(value).__name__}, expected a dict"
            )
    _check_batch_in_epoch(path, info["batch_in_epoch"], saved_run, run)
    try:
        dispatch.load_state_dicts(handler_states)
    except ValueError as e:  # CheckpointError included
        raise checkpoint.CheckpointError(f"{path}: {e}") from e
    # a donating step consumes the state it is given: the file is read into its tensors
    given = state
    state = load_as_resumed(path, state, step)
    if step.donate and not given.is_donated:
        given._mark_donated("fit(resume=...)")
    state = repartition(state, saved_run.get("world_size", 1), run.world_size, path,
                         saved_run.get("batches_per_epoch"), run.batches_per_epoch)  # fmt: skip
    run = dataclasses.replace(run, start_step=state.step)
    moment = meta.get("moment")
    return state, run, moment if moment in _MOMENTS else None, path


def _resume_on_every_rank(
    state: TrainState,
    step: Step,
    resume: bool | str | Path,
    run: RunInfo,
    dispatch: Dispatcher,
    save_dirs: list[Path],
) -> tuple[TrainState, RunInfo, str | None, Path | None]:
    """`_resume`, then (several ranks) one gather of what each rank loaded: ranks that resumed
    from different checkpoints or positions (a work dir on each node's local disk: rank 1 finds
    none) would train on with mismatched collectives (a gloo abort, an NCCL hang) or replicas
    that differ; one error on every rank names each rank's file and position instead. A rank
    that failed to resume says so to the others, which raise too."""
    if run.world_size == 1:
        return _resume(state, step, resume, run, dispatch, save_dirs)
    try:
        out = _resume(state, step, resume, run, dispatch, save_dirs)
        loaded, path = out[0], out[3]
        mine: tuple[Any, ...] = (
            None if path is None else _header_digest(path),
            loaded.step,
            loaded.epoch,
            loaded.batch_in_epoch,
            None if path is None else str(path),
            None if run.work_dir is None else str(run.work_dir),
        )
    except Exception as e:
        distributed.gather_objects(("failed", f"{type(e).__name__}: {_shortened(str(e), 300)}"))
        raise
    everyone = distributed.gather_objects(mine)
    for r, theirs in enumerate(everyone):
        if theirs[0] == "failed":
            raise RuntimeError(
                f"fit: rank {r} could not resume ({theirs[1]}); every rank stops: each must "
                "load the same checkpoint"
            )
    if any(theirs[:4] != mine[:4] for theirs in everyone):
        where = "; ".join(_resumed_at(r, theirs) for r, theirs in enumerate(everyone))
        raise ValueError(
            f"fit: the ranks resumed from different checkpoints or positions: {where}; every rank "
            "must resume from the same checkpoint: put work_dir on storage every rank reads (rank "
            "0 alone writes the checkpoints), or give each rank a copy of one file (resume=PATH)"
        )
    return out


def _resumed_at(rank: int, record: tuple[Any, ...]) -> str:
    """One rank's resume as `_resume_on_every_rank` names it."""
    digest, step, epoch, batch, path, work_dir = record
    where = f"no checkpoint found (in {work_dir})" if path is None else _shortened(path, 160)
    digest = "" if digest is None else f", header digest {digest[:12]}"
    return f"rank {rank}: {where} at step {step} (epoch {epoch}, batch {batch}{digest})"


def _header_digest(path: Path) -> str | None:
    """The checkpoint's recorded header digest (SHA-256 of its tensor table and metadata, the
    data's block digests included): two files with one digest hold the same state; a header
    read, no tensor data."""
    return read_header(Path(path)).metadata.get("fengine.header_digest")


def _resumed(path: Path, rewind: bool, state: TrainState, run: RunInfo, dispatch: Dispatcher,
             save_dirs: list[Path]) -> None:  # fmt: skip
    """A resume from ``path`` that loaded and passed every check: a ``rewind`` (``resume=PATH``)
    sets the later checkpoints aside only now, so a refused one leaves the directory and its
    ``last_checkpoint`` as they were; then ``after_load_checkpoint`` (its handlers write)."""
    if rewind:
        _set_aside_later_checkpoints(path, save_dirs)
    log.info("resumed from %s at step %d (epoch %d, batch %d)",
             path, state.step, state.epoch, state.batch_in_epoch)  # fmt: skip
    dispatch("after_load_checkpoint", state, run, checkpoint=path)


def _check_batch_in_epoch(
    path: Path, batch: int, saved_run: Mapping[str, Any], run: RunInfo
) -> None:
    """A checkpoint's ``batch_in_epoch`` (loader batches, micro-batches included) is at most its
    run's batches per epoch (equal after the epoch's last update): a larger one, from an edited
    file, would resume silently as the epoch's end. The bound is the one the file records, else
    (a file saved outside `fit`) this run's, when the world size is the same."""
    recorded = saved_run.get("batches_per_epoch")
    if isinstance(recorded, int) and not isinstance(recorded, bool) and recorded >= 1:
        bound, whose = recorded, "as its run record says"
    elif saved_run.get("world_size", 1) == run.world_size:
        bound, whose = run.batches_per_epoch, "as this run's data has"
    else:
        return
    if batch > bound:
        raise checkpoint.CheckpointError(
            f"{path}: its position batch_in_epoch={batch} is past the end of an epoch of {bound} "
            f"batches ({whose}); a checkpoint fit wrote is never past it (an edited position?)"
        )
    if (
        whose.startswith("as its run")
        and saved_run.get("world_size", 1) == run.world_size
        and bound != run.batches_per_epoch
        and 0 < batch < bound
    ):  # another batch size or dataset: batch b is other samples, in another order
        raise ValueError(
            f"{path} was saved at batch {batch} of an epoch of {bound} batches; this run's data "
            f"has {run.batches_per_epoch} batches per epoch (another batch size or dataset), so "
            "resuming mid-epoch would skip some of the epoch's samples and repeat others; resume "
            "with the run's data, or from the end of an epoch"
        )


def _set_aside_later_checkpoints(path: Path, save_dirs: list[Path]) -> None:
    """A run continued from an earlier checkpoint of its directory (a rewind; the run log records
    the path taken) would replace the abandoned path's checkpoints of the same names: they move
    aside first (`checkpoint.set_aside_later`). ``resume=True`` never rewinds (a newer file whose
    pointer move a crash prevented is written again, bit for bit)."""
    if not distributed.is_main():
        return  # rank 0 writes the checkpoints
    for d in save_dirs:
        moved = checkpoint.set_aside_later(path, d)
        if moved is not None:
            aside, names = moved
            log.warning("resume: %s rewinds the run in %s; the %d checkpoint(s) of later steps "
                        "(%s) moved to %s", path.name, d, len(names), ", ".join(names), aside)  # fmt: skip


_MOMENTS = ("before_train", "before_train_epoch", "before_train_iter", "after_train_iter", "after_train_epoch",
            "after_val", "after_train")  # fmt: skip
"""Where in the loop a checkpoint was written (its ``moment``): resuming from one written before a
position's validation runs that validation first, as the uninterrupted run did."""


def load_as_resumed(
    path: Path, like: TrainState, step: Step, *, shown: str | None = None
) -> TrainState:
    """``path`` read like ``like`` as `fit` resumes from it (into its tensors with a donating
    step): a checkpoint that predates ``base_lr`` or lacks a wrapper's state (an EMA added) is
    completed (``shown``: the name `load_adding_wrappers` gives a temporary copy); any other
    difference is a `CheckpointMismatchError`."""
    try:
        return checkpoint.load(path, like=like, into=step.donate)
    except checkpoint.CheckpointMismatchError as e:
        return _load_without_base_lr(path, like, step, e) or load_adding_wrappers(
            path, like, step, e, shown=shown
        )


def _load_without_base_lr(
    path: Path, like: TrainState, step: Step, error: checkpoint.CheckpointMismatchError
) -> TrainState | None:
    """A checkpoint saved before `ParamGroups.build` kept ``base_lr`` (which every update
    recomputes): read with the old layout and given this run's; None for any other mismatch."""
    names = [m.split(" ")[0] for m in error.missing]  # "opt_state/base_lr (non-tensor)"
    if not names or not all(n.startswith("opt_state/") and n.endswith("/base_lr") for n in names):
        return None
    if error.unexpected or error.shape or error.dtype or error.kind:
        return None
    old = like.replace(opt_state=without_base_lr(like.opt_state))
    try:
        loaded = checkpoint.load(path, like=old, into=step.donate)
    except checkpoint.CheckpointMismatchError:
        return None
    log.info("resume: %s predates base_lr in the optimizer state; it is recomputed", path)
    return loaded.replace(opt_state=with_base_lr(loaded.opt_state, like.opt_state))


def load_adding_wrappers(
    path: Path,
    like: TrainState,
    step: Step,
    error: checkpoint.CheckpointMismatchError,
    *,
    shown: str | None = None,
) -> TrainState:
    """A checkpoint lacking only some wrappers' state (an EMA added to a resumed run): load the rest
    and start those wrappers from the loaded weights, with a warning (MMEngine's EMAHook does so)
    naming the file (``shown``: the name to give a temporary copy). A wrapper the file has some
    state for was not added but reconfigured (an EMA given ``update_buffers=True``): ``error``,
    which names the missing entries."""
    names = {m.split(" ")[0].split("/")[1] for m in error.missing if m.startswith("extra/")}
    if (
        not names
        or any(not m.startswith("extra/") for m in error.missing)
        or (error.unexpected or error.shape or error.dtype or error.kind)
    ):
        raise error
    structure = checkpoint.read_meta(path)["structure"]
    if names & {e[0].split("/")[1] for e in structure if e[0].startswith("extra/")}:
        raise error
    state = checkpoint.load(
        path,
        like=like.replace(extra={k: v for k, v in like.extra.items() if k not in names}),
        into=step.donate,
    )
    added = {str(w.name): w.init(state, step.parts) for w in step.wrappers if w.name in names}
    if distributed.is_main():  # one line, not one per rank
        log.warning("resume: %s has no state for %s; starting it from the loaded weights",
                    shown or path, sorted(added))  # fmt: skip
    return state.replace(
        extra={k: state.extra[k] if k in state.extra else added[k] for k in like.extra}
    )


def repartition(
    state: TrainState,
    saved: Any,
    world: int,
    path: Path,
    saved_batches: Any = None,
    batches: int | None = None,
) -> TrainState:
    """The position in the epoch, in this world size's batches: a run saved by N processes (each at
    batch b of its shard) is at sample b * N * batch_size of the epoch, i.e. batch b * N / M for M.
    At the end of an epoch (b = the saving run's ``saved_batches`` per epoch) it stays at the end,
    this run's ``batches`` per epoch, whatever M: a checkpoint saved at the epoch's last update
    precedes that epoch's end events (validation, epoch checkpoint), which the resume runs first
    as in the same world size (without ``batches``: the next epoch's start, the same updates)."""
    if not isinstance(saved, int) or isinstance(saved, bool) or saved < 1:
        raise checkpoint.CheckpointError(
            f"{path}: its run world_size is {saved!r}, expected an int >= 1"
        )
    if saved == world or state.batch_in_epoch == 0:
        return state
    if isinstance(saved_batches, int) and state.batch_in_epoch >= saved_batches > 0:
        if batches is None:
            return _next_epoch(state)
        log.info("resume: %d -> %d processes: the end of epoch %d (batch %d) is batch %d",
                 saved, world, state.epoch + 1, state.batch_in_epoch, batches)  # fmt: skip
        return state.replace(batch_in_epoch=batches)
    if (state.batch_in_epoch * saved) % world:
        raise ValueError(
            f"{path} was saved by {saved} process{'es' * (saved > 1)} at batch {state.batch_in_epoch} of the epoch "
            f"({state.batch_in_epoch * saved} batches of all ranks); {world} processes cannot continue at "
            f"that sample; resume with a world size that divides {state.batch_in_epoch * saved}, or from an "
            "epoch boundary"
        )
    log.info("resume: %d -> %d processes: batch %d of the epoch becomes %d", saved, world,
             state.batch_in_epoch, state.batch_in_epoch * saved // world)  # fmt: skip
    return state.replace(batch_in_epoch=state.batch_in_epoch * saved // world)


def save(path: Path, state: TrainState, run: RunInfo, dispatch: Dispatcher, *, latest: bool = True,
         moment: str = "after_train", stop: str | None = None) -> None:  # fmt: skip
    """Write ``state`` with the handlers' state, the run config and the loop ``moment``; fire the
    save events (``stop``: the signal a preemption save is for, their ``metrics["stop"]``, as
    at ``after_train``); move the pointer."""
    why = {"stop": stop} if stop is not None else _NO_METRICS
    dispatch("before_save_checkpoint", state, run, checkpoint=path, metrics=why)
    meta = _meta(run, dispatch, moment)
    full = sharding.gather_state(state)  # a sharded state is gathered by every rank, for rank 0
    if run.rank == 0:  # the state is the same on every rank: rank 0 writes it
        _write(path, full, meta, latest, run.work_dir)
    distributed.barrier()  # on disk before any rank goes on
    dispatch("after_save_checkpoint", state, run, checkpoint=path, metrics=why)


def _meta(run: RunInfo, dispatch: Dispatcher, moment: str) -> dict[str, Any]:
    """What a checkpoint stores beside the state: the config, every handler's state, the run, the moment."""
    return {
        "config": dict(run.config) if run.config else None,
        "handlers": dispatch.state_dicts(),
        "run": {
            "by_epoch": run.by_epoch,
            "max_epochs": run.max_epochs,
            "max_steps": run.max_steps,
            "world_size": run.world_size,
            "batches_per_epoch": run.batches_per_epoch,
        },  # fmt: skip
        "moment": moment,
    }


def _write(
    path: Path, full: TrainState, meta: dict[str, Any], latest: bool, work_dir: Path | None
) -> None:
    """Rank 0's part of a save: the file, durable, then (``latest``) the pointer moved to it."""
    checkpoint.save(path, full, meta)
    if latest:
        checkpoint.mark_latest(work_dir if work_dir is not None else path.parent, path)


class _Background:
    """`fit`'s asynchronous saves (``Save(background=True)``, e.g. ``Checkpointer(async_save=True)``).

    A flush hands a snapshot of the state to the writer thread with the whole job: the files,
    then the pointer, then the retired files' deletion, each only once what came before is
    durable; a kill at any moment leaves the previous checkpoint as the latest. At most one job
    is pending: the next save (async or not), a retirement, a preemption and the end of `fit`
    wait for it first, and raise its error there. ``after_save_checkpoint`` fires on the main
    thread once the files are durable (at the first tick after, or at that wait), with the
    snapshot as its state.
    """

    def __init__(self) -> None:
        self.writer = Writer()
        self.snapshots = Snapshots()
        # the after_save_checkpoint events the pending job owes: (path, the state it saved)
        self.owed: list[tuple[Path, TrainState]] = []
        self.used = False  # a background save was asked for (on every rank alike)
        # (step, moment, path) of the last checkpoint marked latest, async or not
        self.latest: tuple[int, str, Path] | None = None

    def saved(self, path: Path, step: int, moment: str, latest: bool) -> None:
        """Remember a save marked latest (a preemption at that step and moment stops on it)."""
        if latest:
            self.latest = (step, moment, path)

    def collect(self, run: RunInfo, dispatch: Dispatcher) -> None:
        """Wait for the pending job (raising its error), then fire the events it owes."""
        owed, self.owed = self.owed, []
        self.writer.wait()
        for path, copy in owed:
            dispatch("after_save_checkpoint", copy, run, checkpoint=path)

    def poll(self, run: RunInfo, dispatch: Dispatcher) -> None:
        if self.writer.done():
            self.collect(run, dispatch)

    def flush(self, state: TrainState, run: RunInfo, dispatch: Dispatcher, moment: str) -> None:
        """Snapshot the state, hand the requested saves and retirements to the writer, and go on."""
        self.collect(run, dispatch)  # at most one pending save: this one waits for the last
        self.used = True
        jobs: list[tuple[Path, dict[str, Any], bool]] = []
        while dispatch.saves:
            request = dispatch.saves.pop(0)
            path = Path(request.path)
            dispatch("before_save_checkpoint", state, run, checkpoint=path)
            jobs.append((path, _meta(run, dispatch, moment), request.latest))
            self.saved(path, state.step, moment, request.latest)
        retired, work_dir = list(dispatch.retires), run.work_dir
        dispatch.retires.clear()
        full = sharding.gather_state(state)  # a collective: every rank, as in `save`
        if run.rank == 0:
            # copied now, before the next step updates the tensors in place
            copy, ready = self.snapshots.take(full)

            def job() -> None:
                ready()
                for path, meta, latest in jobs:
                    _write(path, copy, meta, latest, work_dir)
                if retired:
                    retire(retired, work_dir)

            self.writer.submit(job)
            self.owed = [(path, copy) for path, _, _ in jobs]
        distributed.barrier()  # the ranks stay in step as with a synchronous save
        if run.rank != 0:  # nothing to wait for here: rank 0 writes
            for path, _, _ in jobs:
                dispatch("after_save_checkpoint", state, run, checkpoint=path)

    def finish(self, run: RunInfo, dispatch: Dispatcher) -> None:
        """The end of `fit`: the pending save is durable on rank 0 before any rank returns."""
        self.collect(run, dispatch)
        if self.used:
            distributed.barrier()

    def abandon(self) -> None:
        """`fit` is failing: still let the pending write finish (it stays atomic), and log its error."""
        self.owed = []
        try:
            self.writer.wait()
        except BaseException as e:  # noqa: B036 - the run's own error is the one raised
            log.error("a background checkpoint save failed too: %s: %s", type(e).__name__, e)


def _flush(state: TrainState, run: RunInfo, dispatch: Dispatcher, moment: str,
           bg: _Background | None = None, watch: FiniteWatch | None = None) -> None:  # fmt: skip
    """Write the checkpoints handlers asked for, then delete what they retired (once the new
    files are durable and the pointer has moved). Saves that all ask for the background go to
    ``bg``; anything else first waits for its pending save (order on disk is order asked).
    ``watch``'s losses are checked first: a non-finite one raises before its weights are saved
    (and before a rotation retires the last good checkpoint)."""
    if watch is not None and dispatch.saves:
        watch.check()
    if bg is not None and dispatch.saves and all(r.background for r in dispatch.saves):
        bg.flush(state, run, dispatch, moment)
        return
    if bg is not None and (dispatch.saves or dispatch.retires):
        bg.collect(run, dispatch)
    while dispatch.saves:
        request = dispatch.saves.pop(0)
        save(Path(request.path), state, run, dispatch, latest=request.latest, moment=moment)
        if bg is not None:
            bg.saved(Path(request.path), state.step, moment, request.latest)
    if dispatch.retires:
        if run.rank == 0:
            retire(dispatch.retires, run.work_dir)
        dispatch.retires.clear()


def retire(paths: Iterable[Path], work_dir: Path | None) -> None:
    """Delete retired checkpoints: never the file ``last_checkpoint`` names, never a file that is
    not a fengine checkpoint; the directory is fsynced after each, so a deletion is durable."""
    paths = [Path(p) for p in paths]
    pointed = _pointed(work_dir, paths)
    for path in paths:
        if not path.exists() or path.resolve() in pointed:
            continue
        try:
            checkpoint.read_meta(path)
        except (checkpoint.CheckpointError, OSError) as e:
            log.warning("not deleting %s: it is not a readable fengine checkpoint (%s)", path, e)
            continue
        checkpoint.remove(path)


def _pointed(work_dir: Path | None, paths: list[Path]) -> set[Path]:
    """The files the pointers name (read safely: they are untrusted; a FIFO hung here): the work
    dir's (naming a file there or where the retired files are: a Checkpointer's out_dir), or
    without a work dir the one beside the retired files (`save` writes it there)."""
    dirs = list(dict.fromkeys(p.parent for p in paths))
    homes = [work_dir] if work_dir is not None else dirs
    return {t for home in homes if (t := checkpoint.pointed(home, dirs)) is not None}


def _signalled(received: list[int], tick: Tick | None, world: int, device: Any) -> bool:
    """Did SIGTERM/SIGINT arrive? With several ranks all agree (a tiny all-reduce every 10 updates,
    at epoch ends and at the end), so every rank saves at the same step."""
    if world == 1:
        return bool(received)
    if tick is not None and not (
        tick.event == "after_train_epoch"
        or (tick.event == "after_train_iter" and tick.state.step % 10 == 0)
    ):
        return False
    return distributed.agree(bool(received), device)


def _preempt(
    received: list[int],
    state: TrainState,
    run: RunInfo,
    dispatch: Dispatcher,
    moment: str,
    bg: _Background | None = None,
    watch: FiniteWatch | None = None,
) -> None:
    assert run.work_dir is not None
    if watch is not None:
        watch.check()  # a non-finite loss is raised, not saved as the run's latest
    if bg is not None:
        bg.finish(run, dispatch)  # a pending background save completes first
    signum = received[0] if received else signal.SIGTERM  # another rank received it
    name = signal.Signals(signum).name
    latest = None if bg is None else bg.latest
    if latest is not None and latest[:2] == (state.step, moment):
        # a handler's checkpoint of this very state is the latest: stop on it (a second copy
        # would take the grace period's time and, under max_keep_ckpts, an older file's slot)
        path = latest[2]
        if run.rank == 0:
            log.warning("%s received: stopping on %s, saved at this step", name, path)
    else:
        path = run.work_dir / f"step_{state.step}.safetensors"
        if run.rank == 0:  # one line, not one per rank
            log.warning("%s received: saving %s and stopping", name, path)
        save(path, state, run, dispatch, moment=moment, stop=name)
        _flush(state, run, dispatch, moment, bg)  # what handlers retired because of it (rotation)
    # "preempted": the run is not over (a Checkpointer publishes nothing now)
    dispatch("after_train", state, run, metrics={"stop": name, "preempted": True})
    dispatch("after_run", state, run)
    raise Preempted(signum, path, state)


@contextlib.contextmanager
def _signals(enabled: bool) -> Iterator[list[int]]:
    """Turn SIGTERM/SIGINT into a flag the loop checks at step boundaries (main thread only)."""
    received: list[int] = []
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield received
        return

    def on_signal(signum: int, frame: Any) -> None:
        received.append(signum)
        signal.signal(signum, previous[signum])  # a second signal acts immediately

    previous: dict[int, Any] = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    for s in previous:
        signal.signal(s, on_signal)
    try:
        yield received
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
