"""`scale_lr`: MMEngine's ``auto_scale_lr`` (the linear scaling rule), as a pure function.

MMEngine's ``auto_scale_lr = dict(enable=True, base_batch_size=N)`` multiplies every
optimizer learning rate by ``real_bs / N`` with ``real_bs = world_size x
train_dataloader.batch_size`` (``Runner.scale_lr`` in MMEngine 0.10.7), before the
parameter schedulers are built. Here the same rule is a function of the numbers,
applied to the lr you then hand to the optimizer::

    lr = optim.scale_lr(schedules.cosine(0.1, T_max=total), base_batch_size=256,
                        batch_size=train.batch_size, world_size=world_size)
    tx = optim.sgd(lr, momentum=0.9)
    print(lr)   # scaled(Cosine(base=0.1, ...), x0.5 = batch 1x128 / base 256)
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import KW_ONLY, dataclass
from typing import Any, ClassVar

from fengine.schedules import Join, OneCycle, Schedule


__all__ = ["ScaledLR", "ScaledSchedule", "scale_lr"]


def _how(factor: float, batch_size: int, world_size: int, base_batch_size: int) -> str:
    return f"x{factor!r} = batch {world_size}x{batch_size} / base {base_batch_size}"


class ScaledLR(float):
    """A learning rate scaled by `scale_lr`: a plain float whose ``repr`` says how.

    Arithmetic, ``str``, f-strings and ``json`` see the number; ``repr`` shows the
    original lr and the factor, for logs and printed configs.
    """

    lr: float
    factor: float
    batch_size: int
    world_size: int
    base_batch_size: int

    def __new__(
        cls, value: float, lr: float, factor: float, sizes: tuple[int, int, int]
    ) -> ScaledLR:
        self = super().__new__(cls, value)
        self.lr, self.factor = lr, factor
        self.batch_size, self.world_size, self.base_batch_size = sizes
        return self

    def __reduce__(self) -> tuple[Any, ...]:
        sizes = (self.batch_size, self.world_size, self.base_batch_size)
        return (ScaledLR, (float(self), self.lr, self.factor, sizes))

    def __str__(self) -> str:
        return float.__repr__(self)

    def __repr__(self) -> str:
        how = _how(self.factor, self.batch_size, self.world_size, self.base_batch_size)
        return f"scaled({self.lr!r} -> {float(self)!r}, {how})"


@dataclass(frozen=True, repr=False)
class ScaledSchedule(Schedule):
    """A schedule under the linear scaling rule, as MMEngine builds it after ``scale_lr``.

    MMEngine scales the optimizer's lr, then builds the schedulers, which take that
    scaled lr as their base: so the values relative to the base scale (warm-up, steps,
    cosine towards ``eta_min_ratio * base``), while absolute targets given in the
    config (``eta_min`` of `cosine`, `cosine_restart` and `poly`) stay as written.
    This is ``schedule`` with its ``base`` (and, in a `join`, every part's) multiplied
    by ``scale``. Build it with `scale_lr`; `schedules.convert_to_iter_based` converts its
    epoch units before or after scaling (the scaled schedule's inner one is converted).
    """

    _: KW_ONLY
    schedule: Schedule
    scale: float
    batch_size: int
    world_size: int
    base_batch_size: int
    _rebased: Schedule = dataclasses.field(init=False, compare=False)
    _name: ClassVar[str] = "scale_lr"

    def __post_init__(self) -> None:
        rebased = _rebase(self.schedule, self.scale)
        if rebased.base != self.base:
            raise ValueError(
                f"scale_lr: base must be schedule.base * scale ({rebased.base}), got {self.base}"
            )
        object.__setattr__(self, "_rebased", rebased)

    def __call__(self, step: int) -> float:
        return self._rebased(step)

    def factor(self, step: int) -> float:
        return self._rebased.factor(step)

    def __repr__(self) -> str:
        how = _how(self.scale, self.batch_size, self.world_size, self.base_batch_size)
        return f"scaled({self.schedule!r}, {how})"


def _rebase(schedule: Schedule, scale: float) -> Schedule:
    """``schedule`` built on ``base * scale`` (see `ScaledSchedule`)."""
    if isinstance(schedule, ScaledSchedule):
        return _rebase(schedule._rebased, scale)
    if isinstance(schedule, Join):
        return Join(schedule.base * scale, tuple(_rebase(p, scale) for p in schedule.parts))
    if isinstance(schedule, OneCycle):
        raise ValueError(
            "scale_lr: onecycle's values are absolute (eta_max, as in torch and MMEngine), so "
            "scaling its base would change nothing -- MMEngine's auto_scale_lr silently leaves "
            "OneCycleLR unscaled. Scale eta_max instead: "
            "onecycle(base, eta_max=scale_lr(eta_max, ...), ...)"
        )
    if not isinstance(schedule, Schedule) or not dataclasses.is_dataclass(schedule):
        raise TypeError(f"scale_lr: expected a fengine schedule, got {schedule!r}")
    return dataclasses.replace(schedule, base=schedule.base * scale)


def _size(arg: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"scale_lr: {arg} must be an int >= 1, got {value!r}")
    return int(value)


def scale_lr(
    lr: float | Schedule, *, base_batch_size: int, batch_size: int, world_size: int = 1
) -> ScaledLR | ScaledSchedule:
    """The linear scaling rule of MMEngine's ``auto_scale_lr``: ``lr x (world_size x batch_size) / base_batch_size``.

    Args:
      lr: a number, or a fengine schedule (its base is scaled and absolute floors are
        kept, as MMEngine does by building its schedulers from the scaled lr; see
        `ScaledSchedule`). `schedules.onecycle` is refused: its values do not depend on
        the base (MMEngine leaves it unscaled without a word).
      base_batch_size: the total batch size ``lr`` was tuned for (MMEngine's
        ``auto_scale_lr.base_batch_size``).
      batch_size: the batch size per process (the train loader's ``batch_size``).
      world_size: the number of processes.

    As in MMEngine 0.10.7 (``real_bs = world_size * train_dataloader.batch_size``), the
    factor does not count gradient accumulation: with `fengine.accumulate` (k) each update
    sees k times more samples, but the factor is the same; pass ``batch_size=k * b`` to
    count them. Returns a `ScaledLR` (a float) or a `ScaledSchedule`, whose ``repr``
    says the factor and where it came from.
    """
    sizes = (
        _size("batch_size", batch_size),
        _size("world_size", world_size),
        _size("base_batch_size", base_batch_size),
    )
    factor = float(sizes[1] * sizes[0]) / float(sizes[2])  # MMEngine's ratio, same floats
    if isinstance(lr, Schedule):
        bs, ws, base = sizes
        return ScaledSchedule(
            lr.base * factor,
            schedule=lr,
            scale=factor,
            batch_size=bs,
            world_size=ws,
            base_batch_size=base,
        )
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not math.isfinite(lr):
        raise TypeError(f"scale_lr: lr must be a finite number or a fengine schedule, got {lr!r}")
    return ScaledLR(float(lr) * factor, float(lr), factor, sizes)
