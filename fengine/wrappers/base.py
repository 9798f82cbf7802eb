"""The wrapper protocol, its checks, plain-function wrappers and `check_finite`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from fengine import distributed
from fengine.state import TrainState
from fengine.step import ApplyFn, GradFn, Grads, Metrics, Part, StepFn


__all__ = ["Wrapper", "check_finite", "check_wrappers", "forward_wrapper", "once", "post_update"]


class Wrapper:
    """Base of step wrappers: every hook defaults to "leave the stage alone"."""

    name: str | None = None
    """Key of this wrapper's state in ``state.extra`` (None: it keeps none)."""
    micro_batches: int = 1
    """Batches one update consumes (`accumulate` sets it)."""
    eval_params: str | Callable[[str], bool] | None | bool = False
    """The params whose eval weights its state substitutes (`TrainState.eval_weights`): False
    none; None all; a submodule name or a predicate on param names (`ema`, `swa` ``params=``)."""

    def init(self, state: TrainState, parts: tuple[Part, ...]) -> Any:
        raise NotImplementedError(
            f"{type(self).__name__} names a state ({self.name!r}) but defines no init"
        )

    def forward(self, grad_fn: GradFn, part: Part) -> GradFn:
        return grad_fn

    def gradient(self, apply: ApplyFn, part: Part) -> ApplyFn:
        return apply

    def after(self, step_fn: StepFn) -> StepFn:
        return step_fn

    def validate(self, before: Sequence[Wrapper]) -> None:
        """Refuse a meaningless combination with the wrappers written ``before`` this one."""


def check_wrappers(wrappers: Sequence[Any]) -> tuple[Wrapper, ...]:
    from fengine.optim.base import GradientTransformation

    for i, w in enumerate(wrappers):
        if isinstance(w, GradientTransformation):
            raise TypeError(
                f"step wrapper {i} is a gradient transformation; put it in tx, e.g. "
                "train_step(loss_fn, optim.chain(your_transform, optim.adamw(...)), ...)"
            )
        if not isinstance(w, Wrapper):
            raise TypeError(
                f"step wrapper {i} is {type(w).__name__}; expected fengine.amp, accumulate, ema, check_finite, "
                "forward_wrapper(fn) or post_update(fn)"
            )
        w.validate(wrappers[:i])
    names = [w.name for w in wrappers if w.name]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(
            f"step wrappers keep state under the same name {twice}; give each a distinct name="
        )
    averagers = [w for w in wrappers if w.eval_params is not False]
    for i, w in enumerate(averagers):
        for v in averagers[:i]:
            if _overlap(v.eval_params, w.eval_params):
                raise ValueError(
                    f"step wrappers {v!r} and {w!r} both average the same params, but evaluation, "
                    "published weights and load_params use one set (the last written's, "
                    "evaluate(params='ema') too); keep one averager, or give them disjoint "
                    "params= (one submodule each)"
                )
    return tuple(wrappers)


def _overlap(a: Any, b: Any) -> bool:
    """Whether two ``params=`` specs surely select common params: None selects all, a submodule
    name its own and its submodules'; a predicate is judged on the names (the averager's first step)."""
    if a is None or b is None:
        return True
    if isinstance(a, str) and isinstance(b, str):
        return a == b or a.startswith(b + ".") or b.startswith(a + ".")
    return False


def once(kind: type, what: str, before: Sequence[Wrapper]) -> None:
    if any(isinstance(w, kind) for w in before):
        raise ValueError(f"{what} is given twice; a step takes one")


# ----------------------------------------------------------------- user wrappers
class _Forward(Wrapper):
    def __init__(self, fn: Callable[[GradFn], GradFn]) -> None:
        self.fn = fn

    def forward(self, grad_fn: GradFn, part: Part) -> GradFn:
        return self.fn(grad_fn)

    def __repr__(self) -> str:
        return f"forward_wrapper({getattr(self.fn, '__name__', self.fn)})"


class _PostUpdate(Wrapper):
    def __init__(self, fn: Callable[[StepFn], StepFn]) -> None:
        self.fn = fn

    def after(self, step_fn: StepFn) -> StepFn:
        return self.fn(step_fn)

    def __repr__(self) -> str:
        return f"post_update({getattr(self.fn, '__name__', self.fn)})"


def forward_wrapper(fn: Callable[[GradFn], GradFn]) -> Wrapper:
    """A forward/backward wrapper from ``fn(grad_fn) -> grad_fn``; ``grad_fn(state, batch, **kw)``
    returns `fengine.Grads` (pass ``**kw`` through)."""
    return _Forward(fn)


def post_update(fn: Callable[[StepFn], StepFn]) -> Wrapper:
    """A post-update wrapper from ``fn(step_fn) -> step_fn``; ``step_fn(state, batch) -> (state, metrics)``."""
    return _PostUpdate(fn)


# ----------------------------------------------------------------- check_finite
class _CheckFinite(Wrapper):
    def gradient(self, apply: ApplyFn, part: Part) -> ApplyFn:
        def checked(state: TrainState, g: Grads) -> tuple[TrainState, Metrics]:
            finite = bool(torch.isfinite(g.loss))
            if distributed.world_size() > 1 and distributed.agree(not finite, g.loss.device):
                if finite:  # the averaged gradients hold another rank's NaN: all raise together
                    raise FloatingPointError(
                        f"non-finite loss on another rank at step {state.step + 1} (this rank's "
                        "is finite); see that rank's error. Params and optimizer state are as "
                        "before this step."
                    )
            if not finite:
                bad = {
                    k: float(v)
                    for k, v in g.metrics.items()
                    if isinstance(v, torch.Tensor) and v.numel() == 1 and not torch.isfinite(v)
                }
                where, before = "", "Params and optimizer state are as before this step"
                if part.name is not None:
                    where = f" in part {part.name!r}"
                    if part.position > 0:  # the parts before it in a multi_step have updated
                        before = (
                            f"The params and optimizer state of part {part.name!r} are as before "
                            "this step; the parts updated before it in this step changed theirs"
                        )
                raise FloatingPointError(
                    f"non-finite loss{where} at step {state.step + 1}: "
                    + ", ".join(f"{k}={v}" for k, v in bad.items())
                    + f". {before}; buffers the forward updates in place (BatchNorm statistics) "
                    "already took this batch: resume from a checkpoint to go on."
                )
            return apply(state, g)

        return checked

    def __repr__(self) -> str:
        return "check_finite()"


def check_finite() -> Wrapper:
    """Raise `FloatingPointError` on a NaN/Inf loss before the update, naming the step and the loss terms.

    Params and optimizer state are left as they were (in a `fengine.multi_step`, those of the
    failing part: the parts updated before it in that step have changed theirs, and the message
    says so); buffers the forward updates in place (BatchNorm running statistics) are not
    restored (that would copy them every step).
    Costs one host sync per step (reading the loss). Write it after an fp16
    `amp`: there a non-finite value means the loss scale is too high, the scaler
    skips the update and backs off, and this check never sees it.
    """
    return _CheckFinite()
