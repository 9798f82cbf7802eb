"""`accumulate`: k micro-batches per update, inside one step call (levanter style).

Nothing partial is ever left in the state, so a checkpoint at any step resumes
exactly, and schedules count *updates* (one per call).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from typing import Any

import torch

from fengine.state import TrainState
from fengine.step import GradFn, Grads, Metrics, Part
from fengine.wrappers.base import Wrapper, once


__all__ = ["MicroBatches", "accumulate", "micro_batch_position"]

_position: ContextVar[tuple[int, int] | None] = ContextVar("fengine_micro_batch", default=None)


def micro_batch_position() -> tuple[int, int] | None:
    """``(i, r)`` while an `accumulate` step computes micro-batch ``i`` of a group of ``r``; None
    outside one (`fengine.fsdp` syncs gradients on the last micro-batch only, on request)."""
    return _position.get()


class MicroBatches(tuple):
    """A group of micro-batches for one accumulated update (`fit` builds these)."""


class _Accumulate(Wrapper):
    def __init__(self, k: int, weight: Callable[[Any], Any] | None) -> None:
        self.micro_batches, self.weight = k, weight

    def validate(self, before: Sequence[Wrapper]) -> None:
        once(_Accumulate, "accumulate (micro-batching)", before)

    def forward(self, grad_fn: GradFn, part: Part) -> GradFn:
        k, share_of = self.micro_batches, self.weight

        def grad_sum(state: TrainState, batch: Any, *, weight: Any = None, micro: int = 0) -> Grads:
            group = batch
            if not isinstance(group, MicroBatches):
                raise TypeError(
                    f"an accumulate({k}) step takes fengine.MicroBatches([batch, ...]) of 1..{k} micro-batches, "
                    f"got {type(group).__name__}; fit() groups batches for you"
                )
            r = len(group)
            if not 1 <= r <= k:
                raise ValueError(f"accumulate({k}): got {r} micro-batches, expected 1..{k}")
            shares, group_weight = _shares(group, share_of)
            total: dict[str, torch.Tensor] = {}
            reorder = False  # a param first seen after the first micro-batch: back in param order
            loss: Any = None
            metrics: Metrics = {}
            seen: dict[str, int] = {}  # averaged metric -> micro-batches that gave it
            keys: list[Any] = []  # each micro-batch's metric names
            traced = isinstance(state.step, torch.Tensor)  # a compiled step: no ContextVar (fsdp's)
            for i, (mb, w_i) in enumerate(zip(group, shares)):
                token = None if traced else _position.set((i, r))
                try:
                    res = grad_fn(  # micro: after data_parallel(diff_rank_seed)'s rank offset
                        state, mb, weight=w_i if weight is None else weight * w_i, micro=micro + i
                    )
                finally:
                    if token is not None:
                        _position.reset(token)
                if total and res.grads.keys() == total.keys():  # paired by name, not position:
                    # a param first used by a later micro-batch was appended to total's end
                    torch._foreach_add_([total[n] for n in res.grads], list(res.grads.values()))
                else:  # first micro-batch, a param unused by some micro-batches, or none yet (fsdp's deferred reduce)
                    late = bool(total)
                    for n, g in res.grads.items():
                        if n in total:
                            total[n].add_(g)
                        else:
                            total[n], reorder = g, late
                loss = res.loss * w_i if loss is None else loss + res.loss * w_i
                keys.append(res.metrics.keys())
                for name, v in res.metrics.items():
                    if _averaged(v):  # counts too: MMEngine logs the mean over micro-iterations
                        if name in seen:
                            metrics[name], seen[name] = metrics[name] + v * w_i, seen[name] + 1
                        else:
                            metrics[name], seen[name] = v * w_i, 1
                    else:
                        metrics[name] = v
            for name, count in seen.items():
                if count < r:  # the mean over the micro-batches that have it, as MMEngine's logger
                    present = sum(w for w, ks in zip(shares, keys) if name in ks)
                    metrics[name] = _renormalised(metrics[name], present)
            if reorder:  # in the params' order, as the gradients of one pass (clip sums in it)
                total = {n: total[n] for n in state.params if n in total}
            return Grads(loss, total, metrics, group_weight)

        return grad_sum

    def __repr__(self) -> str:
        return f"accumulate({self.micro_batches})"


def _renormalised(total: Any, present: Any) -> Any:
    """``total`` (a sum of shares times values) over ``present`` (the sum of those shares); as
    it was where the shares sum to 0 (a tensor share is not read on the host)."""
    if isinstance(present, torch.Tensor):
        return torch.where(present > 0, total / present, total)
    return total / present if present > 0 else total


def _averaged(v: Any) -> bool:
    """Whether a metric is a number averaged over the micro-batches (as a float); others keep the last."""
    if isinstance(v, torch.Tensor):
        return not v.is_complex()
    return isinstance(v, numbers.Real)


def _shares(group: Sequence[Any], weight: Callable[[Any], Any] | None) -> tuple[list[Any], Any]:
    """Each micro-batch's share of the mean, and the group's total weight (None: counted by
    micro-batch). Tensor weights (a valid-token count, ``mask.sum()``) stay on their device: no
    host read per micro-batch, and no check of their values (a NaN shows as a non-finite loss)."""
    if weight is None:
        return [1.0 / len(group)] * len(group), None
    given = [weight(mb) for mb in group]
    if any(isinstance(x, torch.Tensor) for x in given):
        device = next(x.device for x in given if isinstance(x, torch.Tensor))
        t = torch.stack([torch.as_tensor(x, dtype=torch.float64, device=device).reshape(())
                         for x in given])  # fmt: skip
        summed = t.sum()
        return list(t / summed), summed
    w = [float(x) for x in given]
    for i, x in enumerate(w):
        if not (math.isfinite(x) and x >= 0):  # NaN turned every param NaN in one update
            raise ValueError(
                f"accumulate: micro-batch {i}'s weight is {x}; expected a finite number >= 0"
            )
    total = sum(w)
    if total <= 0:
        raise ValueError(f"accumulate: micro-batch weights sum to {total}; expected > 0")
    return [x / total for x in w], total


def accumulate(k: int, weight: Callable[[Any], Any] | None = None) -> Wrapper:
    """``k`` micro-batches per update, inside one step call.

    The step takes ``MicroBatches([b1, ..., br])`` with ``1 <= r <= k``. Each
    micro-batch loss is multiplied by ``1/r`` so the gradient is the mean, and a
    last group that is short (the data ran out mid-window: ``r < k``) is divided
    by ``r``, not ``k``, as MMEngine's OptimWrapper does for its final window.
    Unlike MMEngine, a window never straddles an epoch boundary: `fit` groups the
    batches of each epoch, and its last group may be short.

    ``weight(micro_batch) -> number`` (e.g. the sample or valid-token count; a 0-d tensor
    stays on its device, without a host read) replaces the count: micro-batch i is then weighted ``w_i / sum(w)``, which
    gives the exact mean over samples/tokens when micro-batches differ in size.
    Metrics are averaged with the same shares, integer counts too (as floats: MMEngine
    logs the mean over micro-iterations); a metric some micro-batches lack (an auxiliary loss
    term only some batches have) over those that have it, its shares renormalised there.
    Schedules count updates, not micro-batches.
    Dropout in micro-batch i draws from ``fold_in(seed, step, i)``. With `fengine.data_parallel`, the total weight of
    each rank's group weights its share of the global mean (ranks may hold different
    sample or token counts).
    """
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"accumulate: k must be an int >= 1, got {k!r}")
    if weight is not None and not callable(weight):
        raise TypeError(
            f"accumulate: weight must be a function micro_batch -> number (or None), "
            f"got {weight!r:.60} ({type(weight).__name__})"
        )
    return _Accumulate(k, weight)
