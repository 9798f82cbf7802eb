"""Schedules: pure functions ``step -> value`` for any optimizer hyper-parameter.

A schedule is a frozen dataclass. ``schedule(step)`` is the value of the
hyper-parameter (lr, momentum/beta1, weight decay, ...) used by optimizer update
number ``step``; ``schedule.factor(step)`` is that value divided by
``schedule.base``. Schedules hold their parameters, so they can be printed,
compared, stored in a config and converted (`convert_to_iter_based`).

Units
    ``step`` is the global optimizer-update count, 0-based. ``schedule(t)`` equals
    the value that torch / MMEngine put in ``param_groups[i]`` for iteration ``t``:
    the value after the constructor's implicit ``scheduler.step()`` plus ``t`` more
    steps. (With gradient accumulation MMEngine counts micro-batches; fengine counts
    updates: divide MMEngine's iteration counts by the accumulation factor.)

    With ``by_epoch=True`` the schedule's unit is the epoch, ``epoch =
    step // steps_per_epoch``: the value changes only at epoch boundaries, as
    MMEngine's by-epoch schedulers stepped by ``ParamSchedulerHook`` after each
    epoch. ``begin``, ``end`` and period arguments (``milestones``, ``step_size``,
    ``T_max``, ``periods``, ``total_steps``) are then in epochs.

Windows
    Each schedule is active in the half-open window ``[begin, end)`` of its own unit
    (``end=None`` is infinity); the local step ``k = unit - begin`` drives the
    formula, so milestones and ``T_max`` count from ``begin``. Before the window the
    value is ``base`` (factor 1); after it the last in-window value is held.

Joins
    ``join(*schedules)`` reproduces a list in MMEngine's ``param_scheduler``:
    ``value = base * product of the parts' factors``. Parts may mix units. Because a
    part contributes 1 before its window and holds after it, a gap between windows
    keeps the last value, and overlapping windows compound multiplicatively in list
    order. This equals MMEngine's chained values (MMEngine schedulers multiply the
    *current* value) when each part is multiplicative -- constant, linear, step,
    multistep, exponential, and cosine (within ``T_max``) / poly with ``eta_min=0`` --
    overlapping or not, and for any part entered at factor 1 with no overlap
    (linear warm-up, then cosine). It differs where a floor (``eta_min`` /
    ``eta_min_ratio`` of cosine, cosine_restart, poly), cosine_restart's restart value
    or onecycle's absolute values meet a held factor other than 1 from another part:
    MMEngine anneals towards / restarts at the absolute value, fengine scales the
    whole part by that factor.

Deviations from MMEngine (each deliberate)
    - ``by_epoch`` defaults to False (MMEngine: True): fengine's clock is the update
      count, and epoch units need ``steps_per_epoch`` up front.
    - `linear` and `poly` require ``end``, and `cosine` / `onecycle` require ``end`` or
      ``T_max`` / ``total_steps``: MMEngine's default ``end=INF`` (1e9) silently makes
      a ramp 1e9 steps long.
    - `onecycle` holds its final value after ``total_steps`` (torch and MMEngine raise
      when stepped past it) and rejects a window longer than ``total_steps``.
    - `cosine_restart` defaults to ``eta_min=0`` (MMEngine asserts one is given).
    - Validation is up front: ``gamma > 0``, factors in [0, 1], positive periods; a
      `linear` ``start_factor=0`` works (MMEngine's recursion divides by zero).
    - `join` is a product of factors, not a recursion (see above).

``ReduceOnPlateau`` is not a schedule of the step alone (it needs validation
metrics), so it is not here.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
import numbers
import operator
from collections.abc import Callable, Iterable, Sequence
from dataclasses import KW_ONLY, dataclass
from typing import Any, ClassVar, Literal, NoReturn


__all__ = [
    "Constant",
    "Cosine",
    "CosineRestart",
    "Exponential",
    "Join",
    "Linear",
    "MultiStep",
    "OneCycle",
    "Poly",
    "Schedule",
    "Step",
    "constant",
    "convert_to_iter_based",
    "cosine",
    "cosine_restart",
    "exponential",
    "join",
    "linear",
    "multistep",
    "onecycle",
    "poly",
    "step",
    "warmup",
]


# ------------------------------------------------------------------ validation
def _fail(where: str, arg: str, value: Any, expected: str) -> NoReturn:
    raise ValueError(f"{where}: {arg} must be {expected}, got {value!r}")


def _int(where: str, arg: str, value: Any, *, minimum: int) -> int:
    """``value`` as an int >= ``minimum`` (bools rejected), else a ValueError naming ``arg``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        _fail(where, arg, value, f"an int >= {minimum}")
    return int(value)


def _real(
    where: str,
    arg: str,
    value: Any,
    *,
    gt: float | None = None,
    ge: float | None = None,
    le: float | None = None,
) -> float:
    """``value`` as a finite float within the given bounds, else a ValueError naming ``arg``."""
    bounds = (
        [f"> {gt}"] * (gt is not None)
        + [f">= {ge}"] * (ge is not None)
        + [f"<= {le}"] * (le is not None)
    )
    expected = "a finite number" + (" " + " and ".join(bounds) if bounds else "")
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        _fail(where, arg, value, expected)
    if (
        (gt is not None and not value > gt)
        or (ge is not None and not value >= ge)
        or (le is not None and not value <= le)
    ):
        _fail(where, arg, value, expected)
    return float(value)


def _items(
    where: str, arg: str, value: Any, item: Callable[[Any], Any], *, nonempty: bool = True
) -> tuple:
    """``value`` (any iterable but a string) as a tuple of validated items."""
    expected = "a non-empty sequence" if nonempty else "a sequence"
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        _fail(where, arg, value, expected)
    items = tuple(item(v) for v in value)
    if nonempty and not items:
        _fail(where, arg, value, "a non-empty sequence")
    return items


def _check_step(step: Any) -> int:
    try:
        index = operator.index(step)
    except TypeError:
        raise TypeError(
            f"schedule: step must be an int (the optimizer-update count), got {step!r}"
        ) from None
    if index < 0:
        raise ValueError(f"schedule: step must be >= 0 (0-based update count), got {index}")
    return index


def _set(obj: Any, name: str, value: Any) -> None:
    """Normalise a field of a frozen dataclass (only in ``__post_init__``)."""
    object.__setattr__(obj, name, value)


# ------------------------------------------------------------------ base classes
@dataclass(frozen=True)
class Schedule:
    """A hyper-parameter as a function of the update count: ``value = base * factor(step)``.

    ``base`` is the nominal value (torch's initial ``lr`` / MMEngine's ``initial_lr``).
    Subclasses implement ``__call__`` and ``factor``.
    """

    base: float

    def __call__(self, step: int) -> float:
        """The value used by optimizer update number ``step`` (0-based)."""
        raise NotImplementedError

    def factor(self, step: int) -> float:
        """``self(step) / self.base``: the multiplier this schedule applies at ``step``."""
        raise NotImplementedError


@dataclass(frozen=True)
class _Windowed(Schedule):
    """A schedule active in ``[begin, end)`` of its unit (steps, or epochs when ``by_epoch``).

    Subclasses define the in-window curve by overriding exactly one of ``_factor(k)``
    (multiplicative schedules) or ``_value(k)`` (schedules with absolute targets),
    where ``k`` is the local step ``unit - begin``, clamped to the last in-window step.
    """

    _: KW_ONLY
    begin: int = 0
    end: int | None = None
    by_epoch: bool = False
    steps_per_epoch: int | None = None

    _name: ClassVar[str] = "schedule"
    _period_fields: ClassVar[tuple[str, ...]] = ()  # scaled by convert_to_iter_based

    def __post_init__(self) -> None:
        where = self._name
        _set(self, "base", _real(where, "base", self.base))
        _set(self, "begin", _int(where, "begin", self.begin, minimum=0))
        if self.end is not None:
            end = _int(where, "end", self.end, minimum=0)
            if end <= self.begin:
                _fail(where, "end", end, f"> begin ({self.begin}); the window is [begin, end)")
            _set(self, "end", end)
        if not isinstance(self.by_epoch, bool):
            _fail(where, "by_epoch", self.by_epoch, "a bool")
        if self.by_epoch and self.steps_per_epoch is None:
            _fail(where, "steps_per_epoch", None, "an int >= 1 when by_epoch=True")
        if self.steps_per_epoch is not None:  # kept but unused when by_epoch=False
            spe = _int(where, "steps_per_epoch", self.steps_per_epoch, minimum=1)
            _set(self, "steps_per_epoch", spe)
        self._validate()

    def _validate(self) -> None:
        """Check and normalise the schedule-specific fields (ValueError naming the argument)."""

    @property
    def _window(self) -> int | None:
        """Number of in-window units, ``end - begin`` (None = unbounded)."""
        return None if self.end is None else self.end - self.begin

    def _span(self) -> int | None:
        """Number of local steps with their own value; the value is held afterwards."""
        return self._window

    def _local(self, step: int) -> int | None:
        """Local step for global ``step``: None before the window, clamped to the last in-window step."""
        step = _check_step(step)
        unit = step // self.steps_per_epoch if self.by_epoch else step
        if unit < self.begin:
            return None
        span = self._span()
        k = unit - self.begin
        return k if span is None else min(k, span - 1)

    def __call__(self, step: int) -> float:
        k = self._local(step)
        return self.base if k is None else self._value(k)

    def factor(self, step: int) -> float:
        k = self._local(step)
        return 1.0 if k is None else self._factor(k)

    def _value(self, k: int) -> float:
        return self.base * self._factor(k)

    def _factor(self, k: int) -> float:
        if self.base == 0:
            raise ValueError(
                f"{self._name}: factor() is undefined for base=0 (its values are absolute)"
            )
        return self._value(k) / self.base

    def _require_window(self, what: str) -> int:
        if self.end is None:
            _fail(self._name, "end", None, f"an int > begin ({what})")
        return self.end - self.begin


def _eta_min(where: str, obj: Any) -> None:
    """Shared eta_min / eta_min_ratio validation (MMEngine: give at most one; default eta_min=0)."""
    if obj.eta_min is not None and obj.eta_min_ratio is not None:
        raise ValueError(
            f"{where}: give eta_min or eta_min_ratio, not both; got eta_min={obj.eta_min!r}, "
            f"eta_min_ratio={obj.eta_min_ratio!r}"
        )
    if obj.eta_min is not None:
        _set(obj, "eta_min", _real(where, "eta_min", obj.eta_min))
    if obj.eta_min_ratio is not None:
        _set(obj, "eta_min_ratio", _real(where, "eta_min_ratio", obj.eta_min_ratio))


def _floor(obj: Any) -> float:
    if obj.eta_min_ratio is not None:
        return obj.base * obj.eta_min_ratio
    return 0.0 if obj.eta_min is None else obj.eta_min


# ------------------------------------------------------------------ schedules
@dataclass(frozen=True)
class Constant(_Windowed):
    """MMEngine ``ConstantLR``: ``base * factor`` in the window, back to ``base`` on its last step.

    As in MMEngine, ``total_iters = end - begin - 1``: the factor applies on local steps
    ``0 .. end-begin-2`` and the value returns to ``base`` at local step ``end-begin-1``
    (torch's ``ConstantLR(total_iters=T)`` is ``end = begin + T + 1``). A one-step window
    keeps the factor. ``end=None``: the factor applies forever. The field is named
    ``factor_`` because ``factor`` is the method; the `constant` factory takes ``factor=``.
    """

    factor_: float = 1.0 / 3
    _name: ClassVar[str] = "constant"

    def _validate(self) -> None:
        _set(self, "factor_", _real(self._name, "factor", self.factor_, ge=0.0, le=1.0))

    def _factor(self, k: int) -> float:
        window = self._window
        if window is not None and k == window - 1 and k > 0:
            return 1.0
        return self.factor_


@dataclass(frozen=True)
class Linear(_Windowed):
    """MMEngine ``LinearLR``: factor moves linearly from ``start_factor`` to ``end_factor``.

    It reaches ``end_factor`` at local step ``end - begin - 1`` (MMEngine's
    ``total_iters``) and holds it; ``end`` is required. torch's
    ``LinearLR(total_iters=T)`` is ``end = begin + T + 1``.
    """

    start_factor: float = 1.0 / 3
    end_factor: float = 1.0
    _name: ClassVar[str] = "linear"

    def _validate(self) -> None:
        _set(
            self,
            "start_factor",
            _real(self._name, "start_factor", self.start_factor, ge=0.0, le=1.0),
        )
        _set(self, "end_factor", _real(self._name, "end_factor", self.end_factor, ge=0.0, le=1.0))
        self._require_window("the ramp spans [begin, end)")

    def _factor(self, k: int) -> float:
        total = self._window - 1
        if total == 0:
            return self.start_factor
        return self.start_factor + (self.end_factor - self.start_factor) * k / total


@dataclass(frozen=True)
class Step(_Windowed):
    """MMEngine/torch ``StepLR``: factor ``gamma ** (k // step_size)``."""

    step_size: int
    gamma: float = 0.1
    _name: ClassVar[str] = "step"
    _period_fields: ClassVar[tuple[str, ...]] = ("step_size",)

    def _validate(self) -> None:
        _set(self, "step_size", _int(self._name, "step_size", self.step_size, minimum=1))
        _set(self, "gamma", _real(self._name, "gamma", self.gamma, gt=0.0))

    def _factor(self, k: int) -> float:
        return self.gamma ** (k // self.step_size)


@dataclass(frozen=True)
class MultiStep(_Windowed):
    """MMEngine/torch ``MultiStepLR``: factor ``gamma ** (number of milestones <= k)``.

    Milestones count from ``begin``; repeated milestones decay repeatedly, a milestone 0
    applies from the first in-window step (both as in torch and MMEngine).
    """

    milestones: Sequence[int]
    gamma: float = 0.1
    _name: ClassVar[str] = "multistep"
    _period_fields: ClassVar[tuple[str, ...]] = ("milestones",)

    def _validate(self) -> None:
        where = self._name
        ms = _items(
            where,
            "milestones",
            self.milestones,
            lambda m: _int(where, "milestones", m, minimum=0),
            nonempty=False,
        )
        _set(self, "milestones", tuple(sorted(ms)))
        _set(self, "gamma", _real(self._name, "gamma", self.gamma, gt=0.0))

    def _factor(self, k: int) -> float:
        return self.gamma ** bisect.bisect_right(self.milestones, k)


@dataclass(frozen=True)
class Exponential(_Windowed):
    """MMEngine/torch ``ExponentialLR``: factor ``gamma ** k``.

    `convert_to_iter_based` does not rescale ``gamma`` (MMEngine behaviour), so the
    converted schedule decays by ``gamma`` per step instead of per epoch.
    """

    gamma: float
    _name: ClassVar[str] = "exponential"

    def _validate(self) -> None:
        _set(self, "gamma", _real(self._name, "gamma", self.gamma, gt=0.0))

    def _factor(self, k: int) -> float:
        return self.gamma**k


@dataclass(frozen=True)
class Cosine(_Windowed):
    """MMEngine/torch ``CosineAnnealingLR``: ``eta_min + (base - eta_min) * (1 + cos(pi k / T_max)) / 2``.

    ``T_max`` defaults to ``end - begin``; past ``T_max`` the curve continues
    periodically, as torch's and MMEngine's recursion does. The floor is ``eta_min``
    (absolute, default 0) or ``eta_min_ratio * base``.
    """

    T_max: int | None = None
    eta_min: float | None = None
    eta_min_ratio: float | None = None
    _name: ClassVar[str] = "cosine"
    _period_fields: ClassVar[tuple[str, ...]] = ("T_max",)

    def _validate(self) -> None:
        if self.T_max is None:
            self._require_window("or give T_max; T_max defaults to end - begin")
        else:
            _set(self, "T_max", _int(self._name, "T_max", self.T_max, minimum=1))
        _eta_min(self._name, self)

    def _value(self, k: int) -> float:
        t_max = self.T_max if self.T_max is not None else self._window
        eta_min = _floor(self)
        return eta_min + (self.base - eta_min) * (1 + math.cos(math.pi * k / t_max)) / 2


@dataclass(frozen=True)
class CosineRestart(_Windowed):
    """MMEngine ``CosineRestartLR``: cosine annealing restarted after each of ``periods``.

    Cycle ``i`` starts at ``base * restart_weights[i]`` and anneals towards the floor
    (``eta_min``, or ``eta_min_ratio * base``; default 0, where MMEngine requires one
    of them). After ``sum(periods)`` local steps the last value is held. torch's
    ``CosineAnnealingWarmRestarts(T_0, T_mult)`` is ``periods=(T_0, T_0*T_mult, ...)``.
    """

    periods: Sequence[int]
    restart_weights: Sequence[float] = (1.0,)
    eta_min: float | None = None
    eta_min_ratio: float | None = None
    _name: ClassVar[str] = "cosine_restart"
    _period_fields: ClassVar[tuple[str, ...]] = ("periods",)

    def _validate(self) -> None:
        where = self._name
        periods = _items(
            where, "periods", self.periods, lambda p: _int(where, "periods", p, minimum=1)
        )
        weights = _items(
            where,
            "restart_weights",
            self.restart_weights,
            lambda w: _real(where, "restart_weights", w, ge=0.0),
        )
        _set(self, "periods", periods)
        _set(self, "restart_weights", weights)
        if len(self.periods) != len(self.restart_weights):
            _fail(
                where,
                "restart_weights",
                self.restart_weights,
                f"of the same length as periods ({len(self.periods)})",
            )
        _eta_min(where, self)

    def _span(self) -> int | None:
        total = sum(self.periods)
        return total if self._window is None else min(total, self._window)

    def _value(self, k: int) -> float:
        i, start = 0, 0
        while k >= start + self.periods[i]:  # k < sum(periods) by _span
            start += self.periods[i]
            i += 1
        period, eta_max = self.periods[i], self.base * self.restart_weights[i]
        s = k - start
        if s == 0:
            return eta_max
        eta_min = _floor(self)
        return eta_min + (eta_max - eta_min) * (1 + math.cos(math.pi * s / period)) / 2


@dataclass(frozen=True)
class Poly(_Windowed):
    """MMEngine ``PolyLR``: ``eta_min + (base - eta_min) * (1 - k / T) ** power``, ``T = end - begin - 1``.

    Reaches ``eta_min`` at the last in-window step; ``end`` is required. torch's
    ``PolynomialLR(total_iters=T, power)`` is ``end = begin + T + 1, eta_min=0``.
    """

    eta_min: float = 0.0
    power: float = 1.0
    _name: ClassVar[str] = "poly"

    def _validate(self) -> None:
        _set(self, "eta_min", _real(self._name, "eta_min", self.eta_min))
        _set(self, "power", _real(self._name, "power", self.power, gt=0.0))
        self._require_window("the decay spans [begin, end)")

    def _value(self, k: int) -> float:
        total = self._window - 1
        if total == 0:
            return self.base
        return self.eta_min + (self.base - self.eta_min) * (1 - k / total) ** self.power


@dataclass(frozen=True)
class OneCycle(_Windowed):
    """MMEngine/torch ``OneCycleLR`` (1cycle policy), values independent of ``base``.

    Starts at ``eta_max / div_factor``, rises to ``eta_max`` over ``pct_start`` of
    ``total_steps`` (default ``end - begin``) and anneals (``'cos'`` or ``'linear'``) to
    ``eta_max / div_factor / final_div_factor`` at local step ``total_steps - 1``;
    ``three_phase`` adds the symmetric descent of the original paper. As in torch and
    MMEngine the optimizer's own value is ignored: ``base`` is only the reference for
    ``factor`` and `join`. After ``total_steps`` the final value is held (torch and
    MMEngine raise once stepped past it).
    """

    eta_max: float
    total_steps: int | None = None
    pct_start: float = 0.3
    anneal_strategy: Literal["cos", "linear"] = "cos"
    div_factor: float = 25.0
    final_div_factor: float = 1e4
    three_phase: bool = False
    _name: ClassVar[str] = "onecycle"
    _period_fields: ClassVar[tuple[str, ...]] = ("total_steps",)

    def _validate(self) -> None:
        where = self._name
        _set(self, "eta_max", _real(where, "eta_max", self.eta_max, gt=0.0))
        if self.total_steps is None:
            self._require_window("or give total_steps; total_steps defaults to end - begin")
        else:
            _set(self, "total_steps", _int(where, "total_steps", self.total_steps, minimum=1))
            if self._window is not None and self._window > self.total_steps:
                _fail(
                    where,
                    "end",
                    self.end,
                    f"<= begin + total_steps ({self.begin + self.total_steps}); "
                    "torch/MMEngine cannot step past total_steps",
                )
        _set(self, "pct_start", _real(where, "pct_start", self.pct_start, ge=0.0, le=1.0))
        if self.anneal_strategy not in ("cos", "linear"):
            _fail(where, "anneal_strategy", self.anneal_strategy, "'cos' or 'linear'")
        _set(self, "div_factor", _real(where, "div_factor", self.div_factor, gt=0.0))
        _set(
            self,
            "final_div_factor",
            _real(where, "final_div_factor", self.final_div_factor, gt=0.0),
        )
        if not isinstance(self.three_phase, bool):
            _fail(where, "three_phase", self.three_phase, "a bool")
        start = 0.0
        for end_step, _, _ in self._phases():
            if not end_step > start:
                _fail(
                    where,
                    "pct_start",
                    self.pct_start,
                    f"such that every phase spans > 0 steps (total_steps={self._total})",
                )
            start = end_step

    @property
    def _total(self) -> int:
        return self.total_steps if self.total_steps is not None else self._window

    def _span(self) -> int | None:
        return self._total

    def _phases(self) -> list[tuple[float, float, float]]:
        """(end_step, start_value, end_value) of each phase, with torch's float boundaries."""
        total, pct = self._total, self.pct_start
        initial = self.eta_max / self.div_factor
        minimum = initial / self.final_div_factor
        if self.three_phase:
            return [
                (float(pct * total) - 1, initial, self.eta_max),
                (float(2 * pct * total) - 2, self.eta_max, initial),
                (total - 1, initial, minimum),
            ]
        return [(float(pct * total) - 1, initial, self.eta_max), (total - 1, self.eta_max, minimum)]

    def _value(self, k: int) -> float:
        phases = self._phases()
        start_step = 0.0
        for i, (end_step, start, end) in enumerate(phases):
            if k <= end_step or i == len(phases) - 1:
                pct = (k - start_step) / (end_step - start_step)
                if self.anneal_strategy == "cos":
                    return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)
                return (end - start) * pct + start
            start_step = end_step
        raise AssertionError("unreachable")


@dataclass(frozen=True)
class Join(Schedule):
    """Several schedules as one (MMEngine's ``param_scheduler`` list): ``base * prod(factors)``.

    See the module docstring for where this equals MMEngine's chained values.
    """

    parts: tuple[Schedule, ...] = ()

    def __post_init__(self) -> None:
        _set(self, "base", _real("join", "base", self.base))
        parts = tuple(self.parts)
        if not parts:
            _fail("join", "schedules", parts, "at least one schedule")
        for i, p in enumerate(parts):
            if not isinstance(p, Schedule):
                raise TypeError(f"join: every part must be a Schedule, got {p!r}")
            if p.base != self.base:
                raise ValueError(
                    f"join: every part must have the same base ({self.base}), "
                    f"but part {i} has base={p.base}: {p!r}"
                )
        _set(self, "parts", parts)

    def __call__(self, step: int) -> float:
        return self.base * self.factor(step)

    def factor(self, step: int) -> float:
        result = 1.0
        for part in self.parts:
            result *= part.factor(step)
        return result


# ------------------------------------------------------------------ factories
def constant(
    base: float,
    factor: float = 1.0 / 3,
    *,
    begin: int = 0,
    end: int | None = None,
    by_epoch: bool = False,
    steps_per_epoch: int | None = None,
) -> Constant:
    """MMEngine ``ConstantLR``: ``base * factor`` in ``[begin, end)``, back to ``base`` at ``end - 1``."""
    return Constant(
        base, factor, begin=begin, end=end, by_epoch=by_epoch, steps_per_epoch=steps_per_epoch
    )


linear = Linear
"""``linear(base, start_factor=1/3, end_factor=1.0, *, begin=0, end, ...)``."""
step = Step
"""``step(base, step_size, gamma=0.1, *, begin=0, end=None, ...)``."""
multistep = MultiStep
"""``multistep(base, milestones, gamma=0.1, *, begin=0, end=None, ...)``."""
exponential = Exponential
"""``exponential(base, gamma, *, begin=0, end=None, ...)``."""
cosine = Cosine
"""``cosine(base, T_max=None, eta_min=None, eta_min_ratio=None, *, begin=0, end=None, ...)``."""
cosine_restart = CosineRestart
"""``cosine_restart(base, periods, restart_weights=(1,), eta_min=None, eta_min_ratio=None, *, ...)``."""
poly = Poly
"""``poly(base, eta_min=0.0, power=1.0, *, begin=0, end, ...)``."""
onecycle = OneCycle
"""``onecycle(base, eta_max, total_steps=None, pct_start=0.3, anneal_strategy='cos', div_factor=25.0,
final_div_factor=1e4, three_phase=False, *, begin=0, end=None, ...)``."""


def join(*schedules: Schedule) -> Join:
    """Combine schedules like a list in MMEngine's ``param_scheduler`` (nested joins are flattened).

    Each part is active in its own ``[begin, end)`` window and unit, contributes a
    factor 1 before it and holds its last factor after it; the value is
    ``base * product of factors``. All parts must have the same ``base``.
    """
    parts: list[Schedule] = []
    for s in schedules:
        parts.extend(s.parts if isinstance(s, Join) else [s])
    if not parts:
        _fail("join", "schedules", (), "at least one schedule")
    return Join(parts[0].base, tuple(parts))


def warmup(
    schedule: Schedule,
    *,
    steps: int,
    start_factor: float = 0.001,
    kind: Literal["linear", "constant"] = "linear",
) -> Join:
    """Warm-up over update steps ``[0, steps)`` in front of ``schedule`` (joined, so they compound).

    ``kind='linear'``: factor ``start_factor + (1 - start_factor) * t / steps``;
    ``kind='constant'``: factor ``start_factor``; both are exactly 1 from step ``steps``
    on. This is torch's ``LinearLR``/``ConstantLR(total_iters=steps)`` and MMCV's
    ``warmup='linear'|'constant'``; in MMEngine terms it is ``LinearLR``/``ConstantLR``
    with ``by_epoch=False, begin=0, end=steps + 1`` (MMEngine's ``end=steps`` would
    reach 1 one step earlier). ``schedule`` keeps its own window (not shifted).
    """
    steps = _int("warmup", "steps", steps, minimum=1)
    if not isinstance(schedule, Schedule):
        raise TypeError(f"warmup: schedule must be a Schedule, got {schedule!r}")
    if kind == "linear":
        head: Schedule = Linear(schedule.base, start_factor, 1.0, begin=0, end=steps + 1)
    elif kind == "constant":
        head = Constant(schedule.base, start_factor, begin=0, end=steps + 1)
    else:
        _fail("warmup", "kind", kind, "'linear' or 'constant'")
    return join(head, schedule)


def convert_to_iter_based(schedule: Schedule, steps_per_epoch: int | None = None) -> Schedule:
    """MMEngine's ``convert_to_iter_based`` / ``build_iter_from_epoch``: epoch units to step units.

    Multiplies ``begin``, ``end`` (if finite) and the period arguments (``milestones``,
    ``step_size``, ``T_max``, ``periods``, ``total_steps``) by ``steps_per_epoch`` and
    sets ``by_epoch=False``, so the value moves every step instead of at epoch ends.
    Factors are not rescaled: a converted `exponential` decays by ``gamma`` per
    *step* (MMEngine does the same), and `linear`/`poly` ramp over the scaled window.
    ``steps_per_epoch`` defaults to the schedule's own. For a `join`, the by-epoch parts
    are converted and the step-unit parts kept.
    """
    where = "convert_to_iter_based"
    if isinstance(schedule, Join):
        if not any(getattr(p, "by_epoch", False) for p in schedule.parts):
            _fail(where, "schedule", schedule, "a join with at least one by_epoch=True part")
        parts = tuple(
            convert_to_iter_based(p, steps_per_epoch) if getattr(p, "by_epoch", False) else p
            for p in schedule.parts
        )
        return Join(schedule.base, parts)
    if not isinstance(schedule, _Windowed):
        raise TypeError(f"{where}: schedule must be a fengine schedule, got {schedule!r}")
    if not schedule.by_epoch:
        _fail(
            where, "schedule.by_epoch", False, "True (only epoch-based schedules can be converted)"
        )
    n = schedule.steps_per_epoch
    if steps_per_epoch is not None:
        n = _int(where, "steps_per_epoch", steps_per_epoch, minimum=1)
        if n != schedule.steps_per_epoch:
            _fail(
                where,
                "steps_per_epoch",
                n,
                f"equal to the schedule's steps_per_epoch ({schedule.steps_per_epoch})",
            )
    changes: dict[str, Any] = {
        "begin": schedule.begin * n,
        "end": None if schedule.end is None else schedule.end * n,
        "by_epoch": False,
        "steps_per_epoch": None,
    }
    for name in schedule._period_fields:
        value = getattr(schedule, name)
        if value is not None:
            changes[name] = tuple(v * n for v in value) if isinstance(value, tuple) else value * n
    return dataclasses.replace(schedule, **changes)
