"""Averaged models as post-update wrappers: MMEngine's ``mmengine.model.averaged_model``.

`ema` (``ExponentialMovingAverage``, and ``MomentumAnnealingEMA`` with ``gamma=``) and `swa`
(``StochasticWeightAverage``) share one machinery: an `EmaState` in ``state.extra[name]``
holding the averaged params (and buffers with ``update_buffers``) and the number of
averaging updates done, the first of which copies the params. They differ only in the
averaging rule. Evaluation, checkpoints' published weights and `load_params` use the
averaged weights (`EmaState.eval_weights`, `TrainState.eval_weights`); the wrapper
reads them: ``ema.params(state)``.

When averaging starts is MMEngine's EMAHook rule: after ``begin`` updates
(``begin_iter``: the update that makes ``state.step >= begin``) or, with ``begin_epoch``,
from the first update of epoch ``begin_epoch - 1`` (0-based; ``runner.epoch + 1 >=
begin_epoch``); until then the average just tracks the params and counts nothing.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from fengine.sharding import foreach_copy_
from fengine.state import TrainState
from fengine.step import Metrics, Part, StepFn, selector
from fengine.step_check import counter, shaped_like
from fengine.wrappers.base import Wrapper


__all__ = ["EmaState", "ema", "swa"]


class EmaState(NamedTuple):
    """Averaged (some of) the params, and buffers with ``update_buffers``: `ema` and `swa`'s state."""

    params: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor]
    steps: int  # averaging updates performed (MMEngine's ``BaseAveragedModel.steps``)

    def eval_weights(
        self, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The weights to evaluate and publish: the averaged ones in place of the live ones."""
        return {**params, **self.params}, {**buffers, **self.buffers}

    def loaded_problems(
        self, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor]
    ) -> list[str]:
        """What a state read from a file must hold (see `fengine.step_check.loaded_problems`)."""
        return (
            counter("steps", self.steps)
            + shaped_like("params", self.params, params)
            + shaped_like("buffers", self.buffers, buffers, what="buffer")
        )


class _Averaged(Wrapper):
    """The shared machinery; subclasses define `_average` (MMEngine's ``avg_func``)."""

    def __init__(
        self,
        interval: int,
        update_buffers: bool,
        begin: int,
        begin_epoch: int,
        select: Any,
        name: str,
        spec: str | Callable[[str], bool] | None = None,
    ) -> None:
        self.interval, self.update_buffers = interval, update_buffers
        self.begin, self.begin_epoch = begin, begin_epoch
        self.select, self.name, self.key = select, name, name  # key: the name, typed str
        self.eval_params = spec  # the params= given: check_wrappers refuses two that overlap

    def init(self, state: TrainState, parts: tuple[Part, ...]) -> EmaState:
        sel = self.select
        params = {n: p.detach().clone() for n, p in state.params.items() if sel is None or sel(n)}
        if not params:
            modules = sorted({n.split(".")[0] for n in state.params})
            raise ValueError(
                f"{self.name}: params= selects none of the model's params; its top-level "
                f"submodules are {modules}"
            )
        # a submodule's EMA averages that submodule's buffers only: those ``params=`` selects by
        # name, and those of the modules whose params it selects (a predicate on param names)
        owners = {n.rpartition(".")[0] for n in params}
        buffers = {
            n: b.detach().clone()
            for n, b in state.buffers.items()
            if self.update_buffers and (sel is None or sel(n) or n.rpartition(".")[0] in owners)
        }
        return EmaState(params, buffers, 0)

    def params(self, state: TrainState) -> dict[str, torch.Tensor]:
        """All params, the averaged ones where this wrapper keeps them."""
        e: EmaState = state.extra[self.key]
        return {**state.params, **e.params}

    def state(self, state: TrainState) -> EmaState:
        """This wrapper's `EmaState` in ``state``."""
        return state.extra[self.key]

    def check_horizon(self, *, max_epochs: int | None, total_steps: int) -> None:
        """Refuse a ``begin``/``begin_epoch`` the run never reaches, as MMEngine's EMAHook does
        at ``before_train`` (the average would silently be the live weights); an iteration-based
        run is one epoch to it (``begin_epoch`` 1 at most)."""
        where = f"{self.name}(begin_epoch={self.begin_epoch}, begin={self.begin})"
        if self.begin_epoch > 0:
            if max_epochs is None and self.begin_epoch > 1:
                raise ValueError(
                    f"{where}: an iteration-based run is one epoch to MMEngine's EMAHook, which "
                    "refuses begin_epoch > 1 there; give begin= (updates) instead"
                )
            if max_epochs is not None and self.begin_epoch > max_epochs:
                raise ValueError(f"{where}: the run has {max_epochs} epochs; it never begins")
        elif self.begin > total_steps:
            raise ValueError(f"{where}: the run ends at update {total_steps}; it never begins")

    def _started(self, state: TrainState) -> bool:
        """MMEngine's ``EMAHook._ema_started`` after the update that produced ``state``."""
        if self.begin_epoch > 0:
            return state.epoch + 1 >= self.begin_epoch  # runner.epoch + 1 >= begin_epoch
        return state.step >= self.begin  # runner.iter + 1 >= begin_iter

    def _average(self, avg: list[torch.Tensor], src: list[torch.Tensor], steps: int) -> None:
        """Average ``src`` into ``avg`` in place; ``steps`` averaging updates were done before."""
        raise NotImplementedError

    def after(self, step_fn: StepFn) -> StepFn:
        interval, name = self.interval, self.key
        cache: dict[str, Any] = {}

        def with_average(state: TrainState, batch: Any) -> tuple[TrainState, Metrics]:
            if not cache:  # the first call (or a trace): before the step consumes the state
                self._refuse_shared(state)
            new, metrics = step_fn(state, batch)
            if isinstance(new.step, torch.Tensor):  # a compiled step: tensor counts, no branches
                return self._traced(new), metrics
            e: EmaState = new.extra[name]
            if cache.get("key") is not new.params:  # a donating step keeps the same dicts
                cache.update(
                    key=new.params,
                    src=[new.params[n] for n in e.params],
                    avg=list(e.params.values()),
                )
            if cache.get("buffers") is not new.buffers or cache.get("avg_buffers") is not e.buffers:
                cache.update(
                    buffers=new.buffers,
                    avg_buffers=e.buffers,
                    src_b=[new.buffers[n] for n in e.buffers],
                    avg_b=list(e.buffers.values()),
                )
                floats = [n for n, a in e.buffers.items() if a.is_floating_point()]
                cache.update(  # averaged; the others (step counters) are copied
                    src_fb=[new.buffers[n] for n in floats], avg_fb=[e.buffers[n] for n in floats]
                )
            src_b, avg_b = cache["src_b"], cache["avg_b"]
            started = self._started(new)
            with torch.no_grad():
                if not started or e.steps == 0:
                    foreach_copy_(cache["avg"], cache["src"])
                    if avg_b:
                        torch._foreach_copy_(avg_b, src_b)
                elif e.steps % interval == 0:
                    self._average(cache["avg"], cache["src"], e.steps)
                    if cache["avg_fb"]:
                        self._average(cache["avg_fb"], cache["src_fb"], e.steps)
            steps = e.steps + 1 if started else e.steps
            return new.replace(
                extra={**new.extra, name: EmaState(e.params, e.buffers, steps)}
            ), metrics

        return with_average

    def _refuse_shared(self, state: TrainState) -> None:
        """Refuse another averager over some of these params (``params=`` predicates, which
        `check_wrappers` cannot judge before the names are known): the eval weights are one set."""
        mine = state.extra[self.key].params
        for key, other in state.extra.items():
            if key == self.key or not isinstance(other, EmaState):
                continue
            shared = [n for n in mine if n in other.params]
            if shared:
                raise ValueError(
                    f"step wrappers with states {key!r} and {self.key!r} both average "
                    f"{', '.join(shared[:3])}{'...' if len(shared) > 3 else ''}, but evaluation, "
                    "published weights and load_params use one set (the last written's); keep "
                    "one averager, or give them disjoint params="
                )

    def _traced(self, new: TrainState) -> TrainState:
        """The averaging update of a compiled step: the eager rule as selections on 0-d tensors."""
        e: EmaState = new.extra[self.key]
        started, steps = torch.as_tensor(self._started(new)), torch.as_tensor(e.steps)
        copy = ~started | (steps == 0)
        average = started & (steps > 0) & (steps % self.interval == 0)
        pairs = [(e.params[n], new.params[n]) for n in e.params]
        pairs += [(e.buffers[n], new.buffers[n]) for n in e.buffers]
        with torch.no_grad():
            for avg, src in pairs:
                if avg.is_floating_point():
                    mixed = torch.where(average, self._mix(avg, src, steps), avg)
                else:  # step counters are copied, not averaged
                    mixed = avg
                avg.copy_(torch.where(copy, src, mixed))
        counted: Any = steps + started.to(steps.dtype)  # a tensor where the state holds an int
        return new.replace(extra={**new.extra, self.key: EmaState(e.params, e.buffers, counted)})

    def _mix(self, avg: torch.Tensor, src: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        """`_average` out of place, with ``steps`` a 0-d tensor (compiled steps)."""
        raise NotImplementedError

    def _begin_repr(self) -> str:
        """``update_buffers``, ``begin``/``begin_epoch`` and ``params`` where not the defaults."""
        out = ", update_buffers=True" if self.update_buffers else ""
        if self.begin_epoch:
            out += f", begin_epoch={self.begin_epoch}"
        elif self.begin:
            out += f", begin={self.begin}"
        spec = self.eval_params
        if spec is not None:
            out += f", params={spec!r}" if isinstance(spec, str) else f", params={_fn_name(spec)}"
        return out


def _fn_name(fn: Any) -> str:
    return str(getattr(fn, "__name__", fn))


class _Ema(_Averaged):
    def __init__(self, given: str, momentum: float, gamma: float | None, *args: Any) -> None:
        super().__init__(*args)
        self.momentum, self.gamma = momentum, gamma
        self.given = given  # "decay=0.99" or "momentum=0.01", as the user wrote it (for repr)

    def _average(self, avg: list[torch.Tensor], src: list[torch.Tensor], steps: int) -> None:
        m = self.momentum
        if self.gamma is not None:  # MomentumAnnealingEMA: max(momentum, gamma / (gamma + steps))
            m = max(m, self.gamma / (self.gamma + steps))
        torch._foreach_lerp_(avg, src, m)

    def _mix(self, avg: torch.Tensor, src: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        if self.gamma is None:
            return torch.lerp(avg, src, self.momentum)
        m = torch.clamp(self.gamma / (self.gamma + steps.to(torch.float64)), min=self.momentum)
        return torch.lerp(avg, src, m.to(avg.dtype))

    def __repr__(self) -> str:
        gamma = "" if self.gamma is None else f", gamma={self.gamma}"
        return (
            f"ema({self.given}{gamma}, interval={self.interval}"
            f"{self._begin_repr()}, name={self.name!r})"
        )


class _Swa(_Averaged):
    def _average(self, avg: list[torch.Tensor], src: list[torch.Tensor], steps: int) -> None:
        # MMEngine: averaged.add_(source - averaged, alpha=1 / float(steps // interval + 1))
        diff = torch._foreach_sub(src, avg)
        torch._foreach_add_(avg, diff, alpha=1 / float(steps // self.interval + 1))

    def _mix(self, avg: torch.Tensor, src: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        count = torch.div(steps, self.interval, rounding_mode="floor") + 1
        return avg + (src - avg) * (1 / count.to(torch.float64))

    def __repr__(self) -> str:
        return f"swa(interval={self.interval}{self._begin_repr()}, name={self.name!r})"


def _common(
    where: str,
    interval: int,
    begin: int,
    begin_epoch: int,
    params: Any,
    update_buffers: bool,
    name: str,
) -> Any:
    """Validate the shared arguments (MMEngine's EMAHook asserts); returns the param selector."""
    if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
        raise ValueError(f"{where}: interval must be an int >= 1, got {interval!r}")
    for arg, value in (("begin", begin), ("begin_epoch", begin_epoch)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{where}: {arg} must be an int >= 0, got {value!r}")
    if begin and begin_epoch:
        raise ValueError(
            f"{where}: give begin (updates) or begin_epoch, not both (MMEngine's EMAHook asserts it)"
        )
    if not isinstance(update_buffers, bool):
        raise TypeError(f"{where}: update_buffers must be a bool, got {update_buffers!r}")
    if not isinstance(name, str) or not name:
        raise TypeError(
            f"{where}: name must be a non-empty string (the key of its state), got {name!r}"
        )
    return None if params is None else selector(params, where)


def ema(
    decay: float | None = None,
    *,
    momentum: float | None = None,
    gamma: float | None = None,
    interval: int = 1,
    update_buffers: bool = False,
    begin: int = 0,
    begin_epoch: int = 0,
    params: str | Callable[[str], bool] | None = None,
    name: str = "ema",
) -> Any:
    """Keep an EMA of the params in ``state.extra[name]`` (MMEngine ExponentialMovingAverage).

    MMEngine's convention: ``ema = (1 - momentum) * ema + momentum * param``, so
    ``momentum = 1 - decay``; default momentum 0.0002 (decay 0.9998). A momentum in (0.5, 1)
    warns, as MMEngine does (a decay given as momentum, or the reverse); momentum 1 (decay 0)
    makes the average the live weights. With ``gamma``
    it is MMEngine's ``MomentumAnnealingEMA``: the momentum of averaging update ``t``
    is ``max(momentum, gamma / (gamma + t))``, large early and annealed to ``momentum``.
    The first update copies the params; later ones average every ``interval`` updates
    (counted in updates, not micro-batches). Until ``begin`` updates are done (MMEngine's
    ``begin_iter``), or before epoch ``begin_epoch`` (1-based, MMEngine's ``begin_epoch``),
    the EMA just tracks the params. ``params`` limits it to a submodule (``"gen"``) or a
    predicate on param names (a GAN's generator); with ``update_buffers`` the buffers averaged
    are that submodule's, or those of the modules whose params the predicate selects.
    Without ``update_buffers`` buffers are not averaged and evaluation uses the
    live ones (as MMEngine's EMA model mirrors them). It runs after the update and
    the loss-scaler update, so a skipped fp16 step still counts. Evaluation,
    checkpoints' published weights and `load_params` use the EMA weights
    (`TrainState.eval_weights`).
    """
    if decay is not None and momentum is not None:
        raise ValueError("ema: give decay or momentum, not both (momentum = 1 - decay)")
    for arg, value in (("decay", decay), ("momentum", momentum)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
            raise TypeError(f"ema: {arg} must be a number, got {value!r}")
    m = momentum if momentum is not None else 0.0002 if decay is None else 1.0 - decay
    given = f"decay={decay}" if decay is not None else f"momentum={m}"
    if not 0.0 < m <= 1.0:
        raise ValueError(
            f"ema: momentum must be in (0, 1] (decay = 1 - momentum in [0, 1)), got {given}"
        )
    if 0.5 < m < 1.0:  # MMEngine's ExponentialMovingAverage warns too; 1 (decay 0) is deliberate
        what = given if decay is None else f"{given} gives momentum={m:g}"
        warnings.warn(
            f"ema: {what} > 0.5: the weight of the new params in each update (ema = "
            "(1 - momentum) * ema + momentum * param, MMEngine's convention), so the average "
            "barely lags the live weights. The usual momentum is small (MMEngine's default "
            f"0.0002 = decay 0.9998); if you meant MMEngine's momentum, pass "
            f"momentum={1.0 - m:g} (decay={m:g})",
            UserWarning,
            stacklevel=2,
        )
    if gamma is not None and (
        isinstance(gamma, bool)
        or not isinstance(gamma, (int, float))
        or not 0 < gamma < math.inf  # inf: gamma / (gamma + t) is NaN, the annealing vanishes
    ):
        raise ValueError(
            f"ema: gamma must be a number > 0 and finite (MomentumAnnealingEMA), got {gamma!r}"
        )
    select = _common("ema", interval, begin, begin_epoch, params, update_buffers, name)
    return _Ema(given, m, gamma, interval, update_buffers, begin, begin_epoch, select, name, params)


def swa(
    *,
    interval: int = 1,
    update_buffers: bool = False,
    begin: int = 0,
    begin_epoch: int = 0,
    params: str | Callable[[str], bool] | None = None,
    name: str = "swa",
) -> Any:
    """Stochastic weight averaging (MMEngine's ``StochasticWeightAverage``) in ``state.extra[name]``.

    The equal-weight mean of the params after every ``interval``-th averaging update:
    the first update copies the params, update ``t`` (counted from 0) with ``t % interval
    == 0`` does ``avg += (param - avg) / (t // interval + 1)``. ``begin`` / ``begin_epoch``
    (when the averaging starts), ``update_buffers`` and ``params`` are as in `ema`; so
    ``swa(begin_epoch=76)`` averages the last epochs of a 100-epoch run. Evaluation,
    checkpoints' published weights and `load_params` use the averaged weights. Recompute
    BatchNorm statistics for the averaged weights yourself if you need them (as with
    MMEngine, which does not either); ``update_buffers=True`` averages them instead.
    """
    select = _common("swa", interval, begin, begin_epoch, params, update_buffers, name)
    return _Swa(interval, update_buffers, begin, begin_epoch, select, name, params)
