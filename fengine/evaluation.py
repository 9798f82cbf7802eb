"""Evaluation as a fold: metrics accumulated over a pass of the data, with the eval weights bound."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence, Sized
from typing import Any

import torch
from torch import nn

from fengine import distributed
from fengine.bind import bind
from fengine.data.gather import gathered
from fengine.devices import device_of, to_device
from fengine.events import Dispatcher, RunInfo
from fengine.metrics import Evaluator, Metric
from fengine.sharding import is_sharded
from fengine.state import TrainState


__all__ = ["default_predict", "evaluate", "weights_for"]


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


EVAL_PARAMS = ("auto", "ema", "live")
"""``params=`` of an evaluation: which weights it evaluates (`weights_for`)."""


def weights_for(
    state: TrainState, which: str
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(params, buffers)`` to evaluate: ``"auto"`` = `TrainState.eval_weights` (the EMA ones when
    the step keeps an EMA), ``"live"`` = the trained ones, ``"ema"`` = the eval weights, which must differ."""
    if which == "live":
        return state.params, state.buffers
    if which not in EVAL_PARAMS:
        raise ValueError(f"params must be 'auto', 'ema' or 'live', got {which!r}")
    params, buffers = state.eval_weights()
    if which == "ema" and params is state.params:
        raise ValueError("params='ema' but the state has no EMA; add fengine.ema(...) to the step")
    return params, buffers


def batches_of(
    data: Iterable,
    epoch: int,
    start: int,
    *,
    set_epoch: bool = True,
    on_skipped: Callable[[], None] | None = None,
) -> Iterator:
    """The batches of ``epoch`` from index ``start``: by arithmetic for fengine Loaders, by skipping
    otherwise (a DataLoader of a ``TensorDataset`` draws the skipped indices and gathers its
    batches: `fengine.data.gather`). ``set_epoch=False`` leaves a plain loader's sampler as it
    is (evaluation: MMEngine's val loop sets no epoch). ``on_skipped`` runs once the skipped
    batches are drawn and before batch ``start`` loads (a resume puts the generators back there:
    `fengine.data.loader_rng`)."""
    if hasattr(data, "epoch") and callable(data.epoch):
        return iter(data.epoch(epoch, start_batch=start))
    sampler: Any = getattr(data, "sampler", None)
    if set_epoch and hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    fast = gathered(data, start, on_skipped)
    return fast if fast is not None else _skipping(iter(data), start, on_skipped)


def _skipping(it: Iterator, start: int, on_skipped: Callable[[], None] | None) -> Iterator:
    for _ in itertools.islice(it, start):
        pass
    if on_skipped is not None:
        on_skipped()
    yield from it


AUTOCAST_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
"""``autocast=`` of an evaluation: the dtype names it takes."""


def _autocast(dtype: str | None, device: torch.device) -> Any:
    if dtype is None:
        return contextlib.nullcontext()
    if dtype not in AUTOCAST_DTYPES:
        raise ValueError(f"autocast must be None, 'float16' or 'bfloat16', got {dtype!r}")
    return torch.autocast(device_type=device.type, dtype=AUTOCAST_DTYPES[dtype])


def _dataset_size(data: Iterable) -> int | None:
    """The number of real samples, so gathered metrics drop a sharded sampler's padding
    (collect_results); None in one process, where nothing is padded (a sampler drawing more
    than the dataset, or a dataset of ready-made batches, would be cut or refused)."""
    if distributed.world_size() == 1:
        return None
    return data_length(getattr(data, "dataset", None))


def data_length(data: Any) -> int | None:
    """``len(data)``, or None when it has none (a DataLoader over an IterableDataset is Sized
    but raises)."""
    if not isinstance(data, Sized):
        return None
    try:
        return len(data)
    except TypeError:
        return None


def _check_same_length(batches: int | None) -> None:
    """A sharded model's forward is a collective (FSDP all-gathers its units): a rank with more
    batches than another would wait forever. Refused before the first batch, on every rank."""
    counts = distributed.unequal_counts(batches)
    if counts is not None:
        raise ValueError(
            f"evaluate: the ranks' data have different numbers of batches ({counts}, by rank) and "
            "the model is sharded (each forward all-gathers across ranks): give each rank as many, "
            "e.g. fengine.data.Loader(..., rank=, world_size=) with round_up=True (the default)"
        )


def run_eval(
    state: TrainState,
    data: Iterable,
    metrics: Sequence[Metric] | Evaluator,
    eval_fn: Callable[[nn.Module, Any], Any],
    *,
    params: str,
    dispatch: Dispatcher,
    run: RunInfo,
    phase: str,
    autocast: str | None = None,
    after_epoch: Callable[[dict[str, Any]], TrainState] | None = None,
) -> dict[str, Any]:
    """One val/test pass with its events (MMEngine's ValLoop/TestLoop), under ``autocast`` if given.

    ``after_epoch(results)``, called between the ``after_<phase>_epoch`` handlers and
    ``after_<phase>``, returns the state from there on: `fit` observes the results for
    reduce_on_plateau and writes the checkpoints asked for, where MMEngine's ParamSchedulerHook
    and CheckpointHook act (inside ``after_val_epoch``)."""
    evaluator = metrics if isinstance(metrics, Evaluator) else Evaluator(metrics)
    model = state.model
    if model is None:
        raise ValueError("the state has no model; build it with step.init(model, seed=...)")
    n = data_length(data)
    if is_sharded(model) and distributed.world_size() > 1:
        _check_same_length(n)

    def emit(
        when: str, unit: str = "", **fields: Any
    ) -> None:  # ("before", "_iter") -> before_val_iter
        dispatch(f"{when}_{phase}{unit}", state, run, phase=phase, eval_len=n, **fields)

    emit("before")
    emit("before", "_epoch")
    # each module's own mode, restored after: a submodule the user keeps in eval mode (a frozen
    # BatchNorm) stays so (model.train(was) turned every submodule back to training)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    eval_params, eval_buffers = weights_for(state, params)
    device = device_of(eval_params)
    acc = evaluator.init()
    try:
        for i, raw in enumerate(batches_of(data, 0, 0, set_epoch=False)):
            batch = to_device(raw, device)  # the same object when it is there already
            emit("before", "_iter", batch_idx=i, batch=batch)
            with (
                torch.no_grad(),
                _autocast(autocast, device),
                bind(model, eval_params, eval_buffers),
            ):
                outputs = eval_fn(model, batch)
            acc = evaluator.update(acc, batch, outputs)
            emit("after", "_iter", batch_idx=i, batch=batch, outputs=outputs)
    finally:
        for m, mode in modes:
            m.training = mode
    results = evaluator.compute(acc, _dataset_size(data))  # padding of a sharded sampler dropped
    emit("after", "_epoch", metrics=results)
    if after_epoch is not None:
        state = after_epoch(results)
    emit("after", metrics=results)
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
    autocast: str | None = None,
) -> dict[str, Any]:
    """Evaluate ``metrics`` over ``data``: ``eval_fn(model, batch) -> outputs`` with the state's
    eval weights bound (`TrainState.eval_weights`: the EMA ones if the step keeps an EMA,
    unless ``params="live"``), in eval mode, without gradients. Handlers get the ``test``
    events (MMEngine's TestLoop)."""
    if phase not in ("val", "test"):
        raise ValueError(f"evaluate: phase must be 'val' or 'test', got {phase!r}")
    if isinstance(state, TrainState):
        state.check_live()  # an alias of a consumed state holds another step's weights
    if not callable(eval_fn) or isinstance(eval_fn, nn.Module):  # before any handler runs
        raise TypeError(
            f"evaluate: eval_fn must be a function (model, batch) -> outputs, got "
            f"{type(eval_fn).__name__}; the order is evaluate(state, eval_fn, data, metrics)"
        )
    if callable(data) and not isinstance(data, Iterable):
        raise TypeError(
            f"evaluate: data must be batches (a list, DataLoader or Loader), got the callable "
            f"{data!r}; the order is evaluate(state, eval_fn, data, metrics)"
        )
    run = RunInfo(
        work_dir=None,
        by_epoch=False,
        max_epochs=None,
        max_steps=state.step,
        steps_per_epoch=0,
        batches_per_epoch=0,
        micro_batches=1,
        start_step=state.step,
        rank=distributed.rank(),
        world_size=distributed.world_size(),
    )
    dispatch = Dispatcher(handlers)
    try:
        return run_eval(state, data, metrics, eval_fn, params=params, dispatch=dispatch, run=run,
                        phase=phase, autocast=autocast)  # fmt: skip
    finally:
        dispatch.close()  # a tracker opened by the pass: flushed and its run ended
