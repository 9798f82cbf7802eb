"""Schedules: pure functions ``step -> value`` for any optimizer hyper-parameter.

A schedule is a frozen dataclass (printable, comparable, storable in a config):
``schedule(step)`` is the value (lr, momentum/beta1, weight decay, ...) used by optimizer
update number ``step``; ``schedule.factor(step)`` is that value divided by ``schedule.base``.

Units
    ``step`` is the global optimizer-update count, 0-based. ``schedule(t)`` equals the
    value torch / MMEngine put in ``param_groups[i]`` for iteration ``t`` (after the
    constructor's implicit ``scheduler.step()`` plus ``t`` more). With gradient
    accumulation MMEngine counts micro-batches, fengine counts updates: divide MMEngine's
    iteration counts by the accumulation factor.

    With ``by_epoch=True`` the unit is the epoch, ``step // steps_per_epoch``: the value
    changes only at epoch boundaries (as MMEngine's by-epoch schedulers), and ``begin``,
    ``end`` and the periods (``milestones``, ``step_size``, ``T_max``, ``periods``,
    ``total_steps``) are in epochs.

Windows
    A schedule is active in the half-open window ``[begin, end)`` of its own unit
    (``end=None`` is infinity); its formula sees the local step ``k = unit - begin``, so
    milestones and ``T_max`` count from ``begin``. Before the window the value is ``base``
    (factor 1); after it the last in-window value is held.

Joins
    ``join(*schedules)`` reproduces a list in MMEngine's ``param_scheduler``: ``value =
    base * product of the parts' factors``; parts may mix units. So a gap between windows
    keeps the last value and overlapping windows compound in list order. This equals
    MMEngine's chained values (which multiply the *current* value) when each part is
    multiplicative -- constant, linear, step, multistep, exponential, and cosine (within
    ``T_max``) / poly with ``eta_min=0`` -- and for any part entered at factor 1 with no
    overlap (linear warm-up, then cosine). It differs where a floor (``eta_min`` /
    ``eta_min_ratio``), cosine_restart's restart value or onecycle's absolute values meet
    another part's held factor other than 1: MMEngine anneals towards / restarts at the
    absolute value, fengine scales the whole part by that factor.

Deviations from MMEngine (each deliberate)
    - ``by_epoch`` defaults to False (MMEngine: True): fengine's clock is the update
      count, and epoch units need ``steps_per_epoch`` up front.
    - `linear` and `poly` require ``end``; `cosine` / `onecycle` require ``end`` or
      ``T_max`` / ``total_steps`` (MMEngine's default ``end=1e9`` silently makes a ramp
      1e9 steps long).
    - `onecycle` holds its final value after ``total_steps`` (torch and MMEngine raise)
      and rejects a window longer than ``total_steps``.
    - `cosine_restart` defaults to ``eta_min=0`` (MMEngine asserts one is given).
    - Validation is up front (``gamma > 0``, factors in [0, 1], positive periods); a
      `linear` ``start_factor=0`` works (MMEngine's recursion divides by zero).
    - `join` is a product of factors, not a recursion (see Joins).

``ReduceOnPlateau`` needs validation metrics, not just the step, so it is not here.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import math
import numbers
import operator
import types
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
# Each check returns the normalised value or raises a ValueError naming the argument.
def _fail(where: str, arg: str, value: Any, expected: str) -> NoReturn:
    raise ValueError(f"{where}: {arg} must be {expected}, got {value!r}")


def _int(where: str, arg: str, value: Any, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        _fail(where, arg, value, f"an int >= {minimum}")
    return int(value)


_COMPARE = {">": operator.gt, ">=": operator.ge, "<=": operator.le}


def _real(
    where: str,
    arg: str,
    value: Any,
    *,
    gt: float | None = None,
    ge: float | None = None,
    le: float | None = None,
) -> float:
    bounds = [(op, b) for op, b in zip(_COMPARE, (gt, ge, le)) if b is not None]
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(value)
        or not all(_COMPARE[op](value, b) for op, b in bounds)
    ):
        expected = " and ".join(f"{op} {b}" for op, b in bounds)
        _fail(where, arg, value, f"a finite number {expected}".rstrip())
    return float(value)


def _bool(where: str, arg: str, value: Any) -> bool:
    if not isinstance(value, bool):
        _fail(where, arg, value, "a bool")
    return value


def _items(
    where: str,
    arg: str,
    value: Any,
    *,
    item: Callable[..., Any],
    nonempty: bool = True,
    **bounds: Any,
) -> tuple:
    """``value`` (any iterable but a string) as a tuple of items checked by ``item``."""
    expected = "a non-empty sequence" if nonempty else "a sequence"
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        _fail(where, arg, value, expected)
    items = tuple(item(where, arg, v, **bounds) for v in value)
    if nonempty and not items:
        _fail(where, arg, value, expected)
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
    """

    base: float

    _name: ClassVar[str] = "schedule"  # names the schedule in error messages

    def __call__(self, step: int) -> float:
        """The value used by optimizer update number ``step`` (0-based)."""
        raise NotImplementedError

    def factor(self, step: int) -> float:
        """``self(step) / self.base``: the multiplier this schedule applies at ``step``."""
        raise NotImplementedError

    def _check(self, field: str, check: Callable[..., Any], arg: str = "", **kw: Any) -> None:
        """Validate and normalise ``field`` with ``check``; errors name ``arg`` (default: field)."""
        _set(self, field, check(self._name, arg or field, getattr(self, field), **kw))


@dataclass(frozen=True)
class _Windowed(Schedule):
    """A schedule active in ``[begin, end)`` of its unit (steps, or epochs when ``by_epoch``).

    Subclasses validate their fields in ``_validate`` and define the curve by overriding
    ``_factor(k)`` (multiplicative) or ``_value(k)`` (absolute targets), where ``k`` is the
    local step ``unit - begin``, clamped to the last in-window step.
    """

    _: KW_ONLY
    begin: int = 0
    end: int | None = None
    by_epoch: bool = False
    steps_per_epoch: int | None = None

    _period_fields: ClassVar[tuple[str, ...]] = ()  # scaled by convert_to_iter_based

    def __post_init__(self) -> None:
        self._check("base", _real)
        self._check("begin", _int, minimum=0)
        if self.end is not None:
            self._check("end", _int, minimum=0)
            if self.end <= self.begin:
                _fail(
                    self._name,
                    "end",
                    self.end,
                    f"> begin ({self.begin}); the window is [begin, end)",
                )
        self._check("by_epoch", _bool)
        if self.by_epoch and self.steps_per_epoch is None:
            _fail(self._name, "steps_per_epoch", None, "an int >= 1 when by_epoch=True")
        if self.steps_per_epoch is not None:  # kept but unused when by_epoch=False
            self._check("steps_per_epoch", _int, minimum=1)
        self._validate()

    def _validate(self) -> None:
        """Check and normalise the schedule-specific fields."""

    def _require_window(self, why: str) -> None:
        if self.end is None:
            _fail(self._name, "end", None, f"an int > begin ({why})")

    @property
    def _window(self) -> int | None:
        """Number of in-window units, ``end - begin`` (None = unbounded)."""
        return None if self.end is None else self.end - self.begin

    @property
    def _bounded_window(self) -> int:
        """``end - begin`` of a schedule whose ``_validate`` called `_require_window`."""
        window = self._window
        assert window is not None, f"{self._name}: end was required at construction"
        return window

    def _span(self) -> int | None:
        """Number of local steps with their own value; the value is held afterwards."""
        return self._window

    def _local(self, step: int) -> int | None:
        """Local step for global ``step``: None before the window, clamped to the span."""
        step = _check_step(step)
        if self.by_epoch:
            assert self.steps_per_epoch is not None  # __post_init__ requires it when by_epoch
            unit = step // self.steps_per_epoch
        else:
            unit = step
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


def _check_floor(s: Cosine | CosineRestart) -> None:
    """Give at most one of eta_min / eta_min_ratio (as MMEngine); the floor defaults to 0."""
    if s.eta_min is not None and s.eta_min_ratio is not None:
        raise ValueError(
            f"{s._name}: give eta_min or eta_min_ratio, not both; got eta_min={s.eta_min!r}, "
            f"eta_min_ratio={s.eta_min_ratio!r}"
        )
    for field in ("eta_min", "eta_min_ratio"):
        if getattr(s, field) is not None:
            s._check(field, _real)


def _floor(s: Cosine | CosineRestart) -> float:
    if s.eta_min_ratio is not None:
        return s.base * s.eta_min_ratio
    return 0.0 if s.eta_min is None else s.eta_min


def _cosine(eta_min: float, eta_max: float, k: int, period: int) -> float:
    return eta_min + (eta_max - eta_min) * (1 + math.cos(math.pi * k / period)) / 2


# ------------------------------------------------------------------ schedules
@dataclass(frozen=True)
class Constant(_Windowed):
    """MMEngine ``ConstantLR``: ``base * factor`` in the window, back to ``base`` on its last step.

    As in MMEngine the factor applies on local steps ``0 .. end-begin-2`` (torch's
    ``ConstantLR(total_iters=T)`` is ``end = begin + T + 1``); a one-step window keeps the
    factor, ``end=None`` keeps it forever. The field is ``factor_`` because ``factor`` is
    the method; the `constant` factory takes ``factor=``.
    """

    factor_: float = 1.0 / 3
    _name: ClassVar[str] = "constant"

    def _validate(self) -> None:
        self._check("factor_", _real, arg="factor", ge=0.0, le=1.0)

    def _factor(self, k: int) -> float:
        window = self._window
        if window is not None and k == window - 1 and k > 0:
            return 1.0
        return self.factor_


@dataclass(frozen=True)
class Linear(_Windowed):
    """MMEngine ``LinearLR``: factor moves linearly from ``start_factor`` to ``end_factor``.

    It reaches ``end_factor`` at local step ``end - begin - 1`` and holds it; ``end`` is
    required. torch's ``LinearLR(total_iters=T)`` is ``end = begin + T + 1``.
    """

    start_factor: float = 1.0 / 3
    end_factor: float = 1.0
    _name: ClassVar[str] = "linear"

    def _validate(self) -> None:
        self._check("start_factor", _real, ge=0.0, le=1.0)
        self._check("end_factor", _real, ge=0.0, le=1.0)
        self._require_window("the ramp spans [begin, end)")

    def _factor(self, k: int) -> float:
        total = self._bounded_window - 1
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
        self._check("step_size", _int, minimum=1)
        self._check("gamma", _real, gt=0.0)

    def _factor(self, k: int) -> float:
        return self.gamma ** (k // self.step_size)


@dataclass(frozen=True)
class MultiStep(_Windowed):
    """MMEngine/torch ``MultiStepLR``: factor ``gamma ** (number of milestones <= k)``.

    As in torch and MMEngine, repeated milestones decay repeatedly and a milestone 0
    applies from the first in-window step.
    """

    milestones: Sequence[int]
    gamma: float = 0.1
    _name: ClassVar[str] = "multistep"
    _period_fields: ClassVar[tuple[str, ...]] = ("milestones",)

    def _validate(self) -> None:
        self._check("milestones", _items, item=_int, minimum=0, nonempty=False)
        _set(self, "milestones", tuple(sorted(self.milestones)))
        self._check("gamma", _real, gt=0.0)

    def _factor(self, k: int) -> float:
        return self.gamma ** bisect.bisect_right(self.milestones, k)


@dataclass(frozen=True)
class Exponential(_Windowed):
    """MMEngine/torch ``ExponentialLR``: factor ``gamma ** k``."""

    gamma: float
    _name: ClassVar[str] = "exponential"

    def _validate(self) -> None:
        self._check("gamma", _real, gt=0.0)

    def _factor(self, k: int) -> float:
        return self.gamma**k


@dataclass(frozen=True)
class Cosine(_Windowed):
    """MMEngine/torch ``CosineAnnealingLR``: ``eta_min + (base - eta_min) * (1 + cos(pi k / T_max)) / 2``.

    ``T_max`` defaults to ``end - begin``; past ``T_max`` the curve continues periodically,
    as torch's and MMEngine's recursion does. The floor is ``eta_min`` (absolute, default
    0) or ``eta_min_ratio * base``.
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
            self._check("T_max", _int, minimum=1)
        _check_floor(self)

    def _value(self, k: int) -> float:
        t_max = self.T_max if self.T_max is not None else self._bounded_window
        return _cosine(_floor(self), self.base, k, t_max)


@dataclass(frozen=True)
class CosineRestart(_Windowed):
    """MMEngine ``CosineRestartLR``: cosine annealing restarted after each of ``periods``.

    Cycle ``i`` starts at ``base * restart_weights[i]`` and anneals towards the floor
    (``eta_min``, or ``eta_min_ratio * base``; default 0). After ``sum(periods)`` local
    steps the last value is held. torch's ``CosineAnnealingWarmRestarts(T_0, T_mult)`` is
    ``periods=(T_0, T_0*T_mult, ...)``.
    """

    periods: Sequence[int]
    restart_weights: Sequence[float] = (1.0,)
    eta_min: float | None = None
    eta_min_ratio: float | None = None
    _name: ClassVar[str] = "cosine_restart"
    _period_fields: ClassVar[tuple[str, ...]] = ("periods",)

    def _validate(self) -> None:
        self._check("periods", _items, item=_int, minimum=1)
        self._check("restart_weights", _items, item=_real, ge=0.0)
        if len(self.periods) != len(self.restart_weights):
            _fail(
                self._name,
                "restart_weights",
                self.restart_weights,
                f"of the same length as periods ({len(self.periods)})",
            )
        _check_floor(self)

    def _span(self) -> int | None:
        total = sum(self.periods)
        return total if self._window is None else min(total, self._window)

    def _value(self, k: int) -> float:
        i, start = 0, 0
        while k >= start + self.periods[i]:  # k < sum(periods) by _span
            start += self.periods[i]
            i += 1
        eta_max = self.base * self.restart_weights[i]
        if k == start:
            return eta_max
        return _cosine(_floor(self), eta_max, k - start, self.periods[i])


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
        self._check("eta_min", _real)
        self._check("power", _real, gt=0.0)
        self._require_window("the decay spans [begin, end)")

    def _value(self, k: int) -> float:
        total = self._bounded_window - 1
        if total == 0:
            return self.base
        return self.eta_min + (self.base - self.eta_min) * (1 - k / total) ** self.power


@dataclass(frozen=True)
class OneCycle(_Windowed):
    """MMEngine/torch ``OneCycleLR`` (1cycle policy); values independent of ``base``.

    Starts at ``eta_max / div_factor``, rises to ``eta_max`` over ``pct_start`` of
    ``total_steps`` (default ``end - begin``) and anneals (``'cos'`` or ``'linear'``) to
    ``eta_max / div_factor / final_div_factor`` at local step ``total_steps - 1``;
    ``three_phase`` adds the paper's symmetric descent. As in torch and MMEngine the
    optimizer's value is ignored: ``base`` is only the reference for ``factor`` and `join`.
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
        self._check("eta_max", _real, gt=0.0)
        if self.total_steps is None:
            self._require_window("or give total_steps; total_steps defaults to end - begin")
        else:
            self._check("total_steps", _int, minimum=1)
            if self._window is not None and self._window > self.total_steps:
                _fail(
                    self._name,
                    "end",
                    self.end,
                    f"<= begin + total_steps ({self.begin + self.total_steps}); "
                    "torch/MMEngine cannot step past total_steps",
                )
        self._check("pct_start", _real, ge=0.0, le=1.0)
        if self.anneal_strategy not in ("cos", "linear"):
            _fail(self._name, "anneal_strategy", self.anneal_strategy, "'cos' or 'linear'")
        self._check("div_factor", _real, gt=0.0)
        self._check("final_div_factor", _real, gt=0.0)
        self._check("three_phase", _bool)
        ends = [0.0] + [end_step for end_step, _, _ in self._phases()]
        if any(not b > a for a, b in zip(ends, ends[1:])):
            _fail(
                self._name,
                "pct_start",
                self.pct_start,
                f"such that every phase spans > 0 steps (total_steps={self._total})",
            )

    @property
    def _total(self) -> int:
        return self.total_steps if self.total_steps is not None else self._bounded_window

    def _span(self) -> int | None:
        """Past ``end`` (a window shorter than ``total_steps``) the last in-window value is held."""
        return self._total if self._window is None else min(self._total, self._window)

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
        phases, i, start_step = self._phases(), 0, 0.0
        while i < len(phases) - 1 and k > phases[i][0]:  # the last phase holds k beyond it
            start_step = phases[i][0]
            i += 1
        end_step, start, end = phases[i]
        pct = (k - start_step) / (end_step - start_step)
        if self.anneal_strategy == "cos":
            return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)
        return (end - start) * pct + start


@dataclass(frozen=True)
class Join(Schedule):
    """Several schedules as one (MMEngine's ``param_scheduler`` list): ``base * prod(factors)``.

    See the module docstring for where this equals MMEngine's chained values.
    """

    parts: tuple[Schedule, ...] = ()
    _name: ClassVar[str] = "join"

    def __post_init__(self) -> None:
        self._check("base", _real)
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
        return math.prod((part.factor(step) for part in self.parts), start=1.0)


def epoch_schedules(root: Any) -> list[_Windowed]:
    """The ``by_epoch=True`` schedules reachable from ``root``, for `fengine.fit`'s check that
    each counts the loop's epochs."""
    return [s for s in reachable(root, _Windowed) if s.by_epoch]


def reachable(root: Any, kinds: type | tuple[type, ...]) -> list[Any]:
    """The objects of ``kinds`` reachable from ``root`` (a step: its transformations, wrappers
    and the closures and partials they were built from), for checks made once when a run is
    set up. Tensors, modules and other libraries' objects are not entered."""
    found: list[Any] = []
    seen: set[int] = set()
    todo = [root]
    while todo:
        x = todo.pop()
        if id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, kinds):
            found.append(x)
        if isinstance(x, (list, tuple, set, frozenset)):
            todo.extend(x if len(x) <= _BIG else ())  # a closure's data, not a step's parts
        elif isinstance(x, dict):
            todo.extend(x.values() if len(x) <= _BIG else ())
        elif isinstance(x, types.FunctionType):
            todo.extend(c.cell_contents for c in x.__closure__ or () if _filled(c))
        elif isinstance(x, types.MethodType):
            todo.extend((x.__func__, x.__self__))
        elif isinstance(x, functools.partial):
            todo.extend((x.func, *x.args, *x.keywords.values()))
        elif type(x).__module__.split(".")[0] == "fengine" and hasattr(x, "__dict__"):
            todo.extend(vars(x).values())
    return found


_BIG = 10_000  # containers this large hold data (a loss closure's table), not schedules


def _filled(cell: types.CellType) -> bool:
    try:
        cell.cell_contents  # noqa: B018 - an empty cell raises
    except ValueError:
        return False
    return True


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
    """`Constant` with its factor passed as ``factor``."""
    return Constant(
        base, factor, begin=begin, end=end, by_epoch=by_epoch, steps_per_epoch=steps_per_epoch
    )


# The other factories are the classes under their MMEngine-config-like lower-case names.
linear = Linear
step = Step
multistep = MultiStep
exponential = Exponential
cosine = Cosine
cosine_restart = CosineRestart
poly = Poly
onecycle = OneCycle


def join(*schedules: Schedule) -> Join:
    """Combine schedules like a list in MMEngine's ``param_scheduler`` (see Joins above).

    Nested joins are flattened; all parts must have the same ``base``.
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
    """Warm-up over update steps ``[0, steps)`` joined in front of ``schedule`` (they compound).

    ``kind='linear'``: factor ``start_factor + (1 - start_factor) * t / steps``;
    ``kind='constant'``: factor ``start_factor``; both are exactly 1 from step ``steps``.
    This is torch's ``LinearLR``/``ConstantLR(total_iters=steps)``, MMCV's ``warmup=``, and
    MMEngine's ``LinearLR``/``ConstantLR`` with ``by_epoch=False, begin=0, end=steps + 1``
    (MMEngine's ``end=steps`` reaches 1 one step earlier). ``schedule`` is not shifted.
    """
    steps = _int("warmup", "steps", steps, minimum=1)
    if not isinstance(schedule, Schedule):
        raise TypeError(f"warmup: schedule must be a Schedule, got {schedule!r}")
    if kind == "linear":
        head: Schedule = Linear(schedule.base, start_factor, 1.0, begin=0, end=steps + 1)
    elif kind == "constant":
        _real("warmup", "start_factor", start_factor, ge=0.0, le=1.0)  # not Constant's "factor"
        head = Constant(schedule.base, start_factor, begin=0, end=steps + 1)
    else:
        _fail("warmup", "kind", kind, "'linear' or 'constant'")
    return join(head, schedule)


def convert_to_iter_based(schedule: Schedule, steps_per_epoch: int | None = None) -> Schedule:
    """MMEngine's ``convert_to_iter_based`` / ``build_iter_from_epoch``: epoch units to steps.

    Multiplies ``begin``, ``end`` and the period arguments by ``steps_per_epoch`` (default:
    the schedule's own; if given it must match) and sets ``by_epoch=False``. Factors are
    not rescaled: a converted `exponential` decays by ``gamma`` per *step*, as in MMEngine.
    In a `join`, the by-epoch parts are converted and the others kept. A
    `fengine.optim.scale_lr` schedule is converted inside and scaled as before (the order
    of the two does not matter).
    """
    from fengine.optim.scaling import ScaledSchedule  # (it builds on this module)

    where = "convert_to_iter_based"
    if isinstance(schedule, Join):
        by_epoch = [bool(epoch_schedules(p)) for p in schedule.parts]
        if not any(by_epoch):
            _fail(where, "schedule", schedule, "a join with at least one by_epoch=True part")
        parts = tuple(
            convert_to_iter_based(p, steps_per_epoch) if e else p
            for p, e in zip(schedule.parts, by_epoch)
        )
        return Join(schedule.base, parts)
    if isinstance(schedule, ScaledSchedule):  # the base stays schedule.base * scale
        inner = convert_to_iter_based(schedule.schedule, steps_per_epoch)
        return dataclasses.replace(schedule, schedule=inner)
    if not isinstance(schedule, _Windowed):
        raise TypeError(f"{where}: schedule must be a fengine schedule, got {schedule!r}")
    if not schedule.by_epoch:
        _fail(
            where, "schedule.by_epoch", False, "True (only epoch-based schedules can be converted)"
        )
    n = schedule.steps_per_epoch
    assert n is not None  # __post_init__ requires it when by_epoch
    if steps_per_epoch is not None:
        given = _int(where, "steps_per_epoch", steps_per_epoch, minimum=1)
        if given != n:
            _fail(where, "steps_per_epoch", given, f"equal to the schedule's steps_per_epoch ({n})")
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
