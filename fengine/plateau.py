"""Reduce on plateau: MMEngine's ``ReduceOnPlateauLR`` / ``ReduceOnPlateauMomentum``, as state.

A schedule driven by validation results, not by the step. Its state, a `Plateau` (the
best monitored value, the count of bad validations, the cooldown left and the step of each
reduction made), lives in ``state.extra[name]``, so a resumed run continues exactly. It
is kept by a step wrapper and changed only by the pure function `observe`, which the
loop calls with each validation's results::

    rop = fe.reduce_on_plateau(monitor="loss", factor=0.5, patience=2)
    tx = optim.sgd(rop(0.1), momentum=0.9)         # the lr: 0.1, reduced on plateaus
    step = fe.train_step(loss_fn, tx, rop)         # the wrapper keeps the Plateau
    state = step.init(model)
    ...                                            # train an epoch
    metrics = fe.evaluate(state, predict, val, [MeanLoss()])
    state = fe.plateau.observe(state, metrics)     # what the loop does after validation

``rop(base)`` is a hyper-parameter for any optimizer argument (lr, SGD momentum, Adam's
``b1``: MMEngine's momentum variant is the same rule applied to the momentum). Inside a
step that has the wrapper it reads the state's `Plateau`: the value is ``base`` reduced
once per reduction by MMEngine's rule ``v = max(v * factor, min_value)``, a reduction
skipped when it changed the value at the step it was made by ``eps`` or less (MMEngine's
check, made once, when it reduces). Elsewhere (printing, the checks at construction) it
is the value before any reduction. ``base`` may be a schedule; the reductions then apply
to its value at each step (MMEngine's chained value when the schedule is constant, or
multiplicative like a warm-up or a cosine to 0, while no ``min_value`` is reached). With
`fengine.optim.paramwise` groups each group's value is reduced from its own ``mult *
base`` and floored at the same absolute ``min_value``, as MMEngine reduces each param
group.

`observe` follows ``ReduceOnPlateauParamScheduler.step(metrics)`` (MMEngine 0.10.7): a
validation counts only while ``begin <= state.epoch < end`` (MMEngine's ``_global_step``,
the train epochs completed); the monitored value is better than ``best`` when it is
below ``best * (1 - threshold)`` (``rule="less"``, ``threshold_rule="rel"``), below
``best - threshold`` (``"abs"``), or above ``best * (1 + threshold)`` / ``best +
threshold`` for ``rule="greater"``; during a cooldown bad validations are not counted;
after more than ``patience`` bad ones the values are reduced, the cooldown starts and
the count restarts. A missing monitor raises a ``KeyError`` naming the results' keys.

Deviations (deliberate): the monitored value is compared as a Python float (MMEngine
compares whatever the metric is; its metrics are floats); ``begin``/``end`` count
``state.epoch`` also in iteration-based runs (MMEngine's iteration loop never advances
the count, so there only ``begin=0`` has an effect); ``min_value`` is one number per
`reduce_on_plateau` or per ``rop(base, min_value=...)`` (MMEngine also takes a list, one
per param group).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import json
import math
import numbers
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch.utils._pytree as pytree

from fengine.state import TrainState
from fengine.step import ApplyFn, Grads, Metrics, Part
from fengine.wrappers.base import Wrapper


__all__ = [
    "Plateau",
    "PlateauConfig",
    "PlateauValue",
    "ReduceOnPlateau",
    "observe",
    "reduce_on_plateau",
    "value_in",
]


# ---------------------------------------------------------------- state
@dataclass(frozen=True)
class PlateauConfig:
    """The rule of a `reduce_on_plateau` (static: part of the step, not of the checkpoint)."""

    monitor: str = "loss"
    rule: Literal["less", "greater"] = "less"
    factor: float = 0.1
    patience: int = 10
    threshold: float = 1e-4
    threshold_rule: Literal["rel", "abs"] = "rel"
    cooldown: int = 0
    min_value: float = 0.0
    eps: float = 1e-8
    begin: int = 0
    end: int | None = None

    def is_better(self, value: float, best: float) -> bool:
        """MMEngine's ``_is_better``, operation for operation."""
        if self.rule == "less":
            if self.threshold_rule == "rel":
                return value < best * (1.0 - self.threshold)
            return value < best - self.threshold
        if self.threshold_rule == "rel":
            return value > best * (self.threshold + 1.0)
        return value > best + self.threshold

    def reduce(self, value: float, times: int, floor: float) -> float:
        """``value`` reduced ``times`` times (MMEngine's ``_get_value``)."""
        for _ in range(times):
            value = max(value * self.factor, floor)
        return value

    def taken(self, base: Any, reduced_at: tuple[int | None, ...], step: Any, floor: float) -> int:
        """How many of the reductions made at the steps ``reduced_at`` apply to ``base``: those
        that changed its value then by more than ``eps`` (MMEngine's check, made once, when it
        reduces; ``None``, a step not recorded, is checked at ``step``). O(reductions²)."""
        taken = 0
        for at in reduced_at:
            value = self.reduce(_at(base, step if at is None else at), taken, floor)
            if value - max(value * self.factor, floor) > self.eps:
                taken += 1
        return taken


def _at(base: Any, step: Any) -> float:
    """A number, or a schedule's value at ``step``."""
    return float(base(step)) if callable(base) else float(base)


@dataclass(frozen=True)
class Plateau:
    """The state of a `reduce_on_plateau`, in ``state.extra[name]``.

    ``best`` is the best monitored value so far (``inf`` / ``-inf`` before any),
    ``num_bad`` the bad validations since then, ``cooldown_left`` the validations of the
    cooldown still to go, ``reduced_at`` the step (``state.step``) of each reduction made,
    for its eps check (``None``: a checkpoint from before steps were recorded) and
    ``observed`` the validations counted. ``config`` is the rule: static (a checkpoint
    stores the counters; the rule comes from the step that loads it).
    """

    best: float
    num_bad: int
    cooldown_left: int
    reduced_at: tuple[int | None, ...]
    observed: int
    config: PlateauConfig = dataclasses.field(repr=False)

    @property
    def reductions(self) -> int:
        """The number of reductions made."""
        return len(self.reduced_at)

    def observe(self, metrics: Mapping[str, Any], epoch: int, step: int) -> Plateau:
        """This state after one validation whose results are ``metrics``, at ``epoch`` completed
        epochs and ``step`` updates (the step a reduction made now is recorded at)."""
        c = self.config
        if not (c.begin <= epoch and (c.end is None or epoch < c.end)):
            return self
        if c.monitor not in metrics:
            raise KeyError(
                f"reduce_on_plateau: monitor {c.monitor!r} is not in the validation results "
                f"(keys: {sorted(metrics)}); pass monitor= one of them"
            )
        value = float(metrics[c.monitor])
        best, num_bad = self.best, self.num_bad
        if c.is_better(value, best):
            best, num_bad = value, 0
        else:
            num_bad += 1
        cooldown_left, reduced_at = self.cooldown_left, self.reduced_at
        if cooldown_left > 0:
            cooldown_left -= 1
            num_bad = 0  # bad validations in the cooldown do not count
        if num_bad > c.patience:
            reduced_at += (int(step),)
            cooldown_left, num_bad = c.cooldown, 0
        return Plateau(best, num_bad, cooldown_left, reduced_at, self.observed + 1, c)

    def value(
        self,
        base: float | Callable[[int], Any],
        step: Any,
        min_value: float | None = None,
        memo: dict[Any, int] | None = None,
    ) -> float:
        """``base`` (a number or a schedule) at ``step`` after this state's reductions
        (``min_value`` default: the config's). ``memo`` keeps how many apply to ``base``, so
        that a step finds it in one look-up."""
        c, key = self.config, (self.config, self.reduced_at)
        floor = c.min_value if min_value is None else min_value
        taken = None if memo is None else memo.get(key)
        if taken is None:
            taken = c.taken(base, self.reduced_at, step, floor)
            if memo is not None and None not in self.reduced_at:
                memo[key] = taken
        return c.reduce(_at(base, step), taken, floor)


# The pytree children: one leaf each, so a checkpoint's layout never changes. ``reductions``
# holds the steps as a JSON list; a checkpoint written before they were recorded holds their
# number, read as that many reductions at unknown steps (eps checked at each step, as then).
_CHILDREN = ("best", "num_bad", "cooldown_left", "reductions", "observed")


def _children(p: Plateau) -> list[Any]:
    return [p.best, p.num_bad, p.cooldown_left, json.dumps(list(p.reduced_at)), p.observed]


def _flatten(p: Plateau) -> tuple[list[Any], PlateauConfig]:
    return _children(p), p.config


def _unflatten(children: Any, config: PlateauConfig) -> Plateau:
    best, num_bad, cooldown_left, reductions, observed = children
    if isinstance(reductions, str):
        reduced_at = tuple(json.loads(reductions))
    else:  # the number of reductions (an older checkpoint)
        reduced_at = (None,) * int(reductions)
    return Plateau(best, num_bad, cooldown_left, reduced_at, observed, config)


def _flatten_with_keys(p: Plateau) -> tuple[list[tuple[Any, Any]], PlateauConfig]:
    return [(pytree.GetAttrKey(f), v) for f, v in zip(_CHILDREN, _children(p))], p.config


pytree.register_pytree_node(
    Plateau,
    _flatten,
    _unflatten,
    serialized_type_name="fengine.Plateau",
    flatten_with_keys_fn=_flatten_with_keys,
)


def observe(state: TrainState, metrics: Mapping[str, Any]) -> TrainState:
    """``state`` after a validation with results ``metrics``: every `Plateau` in ``state.extra`` observes them.

    Pure: returns a new state (sharing every tensor) and leaves ``state`` as it is; a
    state without a `Plateau` is returned unchanged. The loop calls it once per
    validation, before the checkpoints of that validation are written.
    """
    if not isinstance(state, TrainState):
        raise TypeError(f"plateau.observe: expected a TrainState, got {type(state).__name__}")
    if not isinstance(metrics, Mapping):
        raise TypeError(
            f"plateau.observe: metrics must be the validation results (a dict), got {type(metrics).__name__}"
        )
    changed = {
        name: sub.observe(metrics, state.epoch, state.step)
        for name, sub in state.extra.items()
        if isinstance(sub, Plateau)
    }
    if not changed:
        return state
    return state.replace(extra={**state.extra, **changed})


# ---------------------------------------------------------------- the hyper-parameter
_ACTIVE: contextvars.ContextVar[Mapping[str, Plateau] | None] = contextvars.ContextVar(
    "fengine_plateaus", default=None
)


@dataclass(frozen=True)
class PlateauValue:
    """A hyper-parameter reduced on plateaus: ``step -> value`` (see the module docstring).

    Made by ``rop(base)``. ``base`` is a number or a schedule; ``min_value`` None takes
    the `reduce_on_plateau`'s.
    """

    name: str
    base: float | Callable[[int], float]
    config: PlateauConfig = dataclasses.field(repr=False)
    min_value: float | None = None
    _taken: dict[Any, int] = dataclasses.field(
        default_factory=dict, init=False, repr=False, compare=False
    )  # Plateau.value's memo: the reductions that apply to this value

    def __call__(self, step: int) -> float:
        active = _ACTIVE.get()
        if active is None:  # outside a step: the value before any reduction
            return _at(self.base, step)
        plateau = active.get(self.name)
        if plateau is None:
            raise ValueError(
                f"a hyper-parameter reduced on plateau {self.name!r} is used by a step without "
                f"that reduce_on_plateau wrapper (it has {sorted(active)}); add it to the step's wrappers"
            )
        return plateau.value(self.base, step, self.min_value, self._taken)

    def scaled_base(self, mult: float, rebase: Callable[[Any, float], Any]) -> PlateauValue:
        """The value of a param group whose base is ``mult`` times this one's (`fengine.optim.paramwise`).

        The reductions apply to the group's own value, floored at the same ``min_value``.
        """
        if callable(self.base):
            base = rebase(self.base, mult)
            if base is None:  # an opaque schedule: multiplied
                inner = self.base
                base = _Times(mult, inner)
        else:
            base = self.base * mult
        return dataclasses.replace(self, base=base)


@dataclass(frozen=True)
class _Times:
    mult: float
    schedule: Callable[[int], float]

    def __call__(self, step: int) -> float:
        return self.mult * self.schedule(step)


@contextlib.contextmanager
def lent(state: TrainState) -> Iterator[None]:
    """Inside: hyper-parameters reduced on plateaus take ``state``'s reductions (as inside the
    step's update; `fengine.step.skipped_update` reports them outside it)."""
    plateaus = {n: s for n, s in state.extra.items() if isinstance(s, Plateau)}
    token = _ACTIVE.set({**(_ACTIVE.get() or {}), **plateaus})
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def value_in(state: TrainState, hyper: Any, step: int | None = None) -> float:
    """The value ``hyper`` takes in ``state`` (at ``state.step`` by default): what the next update uses."""
    with lent(state):
        return float(hyper(state.step if step is None else step)) if callable(hyper) else hyper


# ---------------------------------------------------------------- the wrapper
class ReduceOnPlateau(Wrapper):
    """The step wrapper of `reduce_on_plateau`: keeps the `Plateau`, lends it to the optimizers."""

    def __init__(self, config: PlateauConfig, name: str) -> None:
        self.config, self.name, self.key = config, name, name  # key: the name, typed str

    def __call__(self, base: Any, *, min_value: float | None = None) -> PlateauValue:
        """``base`` (a number or a schedule) reduced on this plateau: an optimizer hyper-parameter."""
        if not callable(base):
            base = _number("base", base)
        if min_value is not None:
            min_value = _number("min_value", min_value)
        return PlateauValue(self.key, base, self.config, min_value)

    def init(self, state: TrainState, parts: tuple[Part, ...]) -> Plateau:
        worst = math.inf if self.config.rule == "less" else -math.inf
        return Plateau(worst, 0, 0, (), 0, self.config)

    def state(self, state: TrainState) -> Plateau:
        """This wrapper's `Plateau` in ``state``."""
        return state.extra[self.key]

    def gradient(self, apply: ApplyFn, part: Part) -> ApplyFn:
        name = self.key

        def with_plateau(state: TrainState, g: Grads) -> tuple[TrainState, Metrics]:
            active = _ACTIVE.get()
            token = _ACTIVE.set({**(active or {}), name: state.extra[name]})
            try:
                return apply(state, g)
            finally:
                _ACTIVE.reset(token)

        return with_plateau

    def __repr__(self) -> str:
        c = self.config
        fields = ", ".join(
            f"{f.name}={getattr(c, f.name)!r}"
            for f in dataclasses.fields(c)
            if getattr(c, f.name) != f.default
        )
        return f"reduce_on_plateau({fields}{', ' if fields else ''}name={self.name!r})"


def _number(arg: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"reduce_on_plateau: {arg} must be a finite number, got {value!r}")
    return float(value)


def _count(arg: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"reduce_on_plateau: {arg} must be an int >= 0, got {value!r}")
    return value


def reduce_on_plateau(
    monitor: str = "loss",
    *,
    rule: Literal["less", "greater"] = "less",
    factor: float = 0.1,
    patience: int = 10,
    threshold: float = 1e-4,
    threshold_rule: Literal["rel", "abs"] = "rel",
    cooldown: int = 0,
    min_value: float = 0.0,
    eps: float = 1e-8,
    begin: int = 0,
    end: int | None = None,
    name: str = "plateau",
) -> ReduceOnPlateau:
    """MMEngine's ``ReduceOnPlateauLR`` / ``ReduceOnPlateauMomentum`` (same arguments and defaults).

    Returns a step wrapper; ``wrapper(base)`` is the reduced hyper-parameter to give the
    optimizer, and `observe` feeds it the validation results (see the module docstring).
    ``monitor`` is a key of the validation results (``accuracy``, ``loss``, or
    ``ACC/accuracy`` with a prefix). ``begin``/``end`` are completed epochs.
    """
    where = "reduce_on_plateau"
    if not isinstance(monitor, str) or not monitor:
        raise ValueError(f"{where}: monitor must be a metric name, got {monitor!r}")
    if rule not in ("less", "greater"):
        raise ValueError(f"{where}: rule must be 'less' or 'greater', got {rule!r}")
    if threshold_rule not in ("rel", "abs"):
        raise ValueError(f"{where}: threshold_rule must be 'rel' or 'abs', got {threshold_rule!r}")
    factor = _number("factor", factor)
    if not 0.0 <= factor < 1.0:
        raise ValueError(f"{where}: factor must be in [0, 1) (MMEngine: < 1.0), got {factor!r}")
    threshold = _number("threshold", threshold)
    if threshold < 0:
        raise ValueError(f"{where}: threshold must be >= 0, got {threshold!r}")
    if end is not None:
        end = _count("end", end)
        if end <= begin:
            raise ValueError(f"{where}: end must be > begin ({begin}), got {end!r}")
    config = PlateauConfig(
        monitor,
        rule,
        factor,
        _count("patience", patience),
        threshold,
        threshold_rule,
        _count("cooldown", cooldown),
        _number("min_value", min_value),
        _number("eps", eps),
        _count("begin", begin),
        end,
    )
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}: name must be a non-empty str, got {name!r}")
    return ReduceOnPlateau(config, name)
