"""Schedules in torch ops: a hyper-parameter's value at a 0-d step *tensor*, for the compiled step.

A compiled step (``train_step(..., compile=True)``) sees the step counter as a 0-d
tensor, so a moving schedule changes a tensor's value, not a constant baked into the
graph, and never recompiles (DESIGN principle 11). `value_at` evaluates a fengine
schedule with the same formulas as its ``__call__`` in float64 torch ops (equal to the
host values to the last bit or two: ``torch.cos`` vs ``math.cos``). Any other callable
hyper-parameter is called with the step tensor and must answer in torch ops; one that
reads the tensor as a Python number cannot be traced, and the compiled step falls back
to eager with a warning saying so.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from fengine.optim.paramwise import Scaled
from fengine.optim.scaling import ScaledSchedule
from fengine.schedules import (
    Constant,
    Cosine,
    Exponential,
    Join,
    Linear,
    MultiStep,
    Poly,
    Schedule,
    Step,
    _Windowed,
)


__all__ = ["value_at"]

_F64 = torch.float64


def value_at(value: Any, step: torch.Tensor) -> Any:
    """``value`` at ``step`` (a 0-d integer tensor): numbers as they are, schedules as 0-d float64 tensors."""
    if not callable(value):
        return value
    if isinstance(value, Schedule):
        return _value(value, step)
    if isinstance(value, Scaled):  # a paramwise group's share of a schedule (lr_mult, decay_mult)
        if value._rebased is not None:
            return value_at(value._rebased, step)
        return value.mult * value_at(value.schedule, step)
    return value(step)


def _value(s: Schedule, step: torch.Tensor) -> torch.Tensor:
    if isinstance(s, ScaledSchedule):
        return _value(s._rebased, step)
    if isinstance(s, Join):
        return s.base * _factor(s, step)
    if isinstance(s, _Windowed):
        k, before = _local(s, step)
        return torch.where(before, torch.tensor(s.base, dtype=_F64), _in_window(s, k, value=True))
    raise _no_torch_form(s)


def _factor(s: Schedule, step: torch.Tensor) -> torch.Tensor:
    if isinstance(s, ScaledSchedule):
        return _factor(s._rebased, step)
    if isinstance(s, Join):
        out = torch.ones((), dtype=_F64)
        for part in s.parts:
            out = out * _factor(part, step)
        return out
    if isinstance(s, _Windowed):
        k, before = _local(s, step)
        return torch.where(before, torch.ones((), dtype=_F64), _in_window(s, k, value=False))
    raise _no_torch_form(s)


def _local(s: _Windowed, step: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(local step ``k`` as float64, clamped into the window; whether ``step`` is before it)."""
    unit = step.to(torch.int64)
    if s.by_epoch:
        assert s.steps_per_epoch is not None
        unit = torch.div(unit, s.steps_per_epoch, rounding_mode="floor")
    k = unit - s.begin
    span = s._span()
    k = k.clamp(min=0) if span is None else k.clamp(min=0, max=span - 1)
    return k.to(_F64), unit < s.begin


def _in_window(s: _Windowed, k: torch.Tensor, *, value: bool) -> torch.Tensor:
    """The value (or factor) of ``s`` at in-window local step ``k``: the formulas of `fengine.schedules`."""
    if isinstance(s, Cosine | Poly):  # absolute targets: the factor is value / base
        v = _absolute(s, k)
        if value:
            return v
        if s.base == 0:
            raise ValueError(
                f"{s._name}: factor() is undefined for base=0 (its values are absolute)"
            )
        return v / s.base
    f = _relative(s, k)
    return s.base * f if value else f


def _relative(s: _Windowed, k: torch.Tensor) -> torch.Tensor:
    one = torch.ones((), dtype=_F64)
    if isinstance(s, Constant):
        window = s._window
        if window is not None and window > 1:
            return torch.where(k == window - 1, one, one * s.factor_)
        return one * s.factor_
    if isinstance(s, Linear):
        total = s._bounded_window - 1
        if total == 0:
            return one * s.start_factor
        return s.start_factor + (s.end_factor - s.start_factor) * k / total
    if isinstance(s, Step):
        return s.gamma ** torch.div(k, s.step_size, rounding_mode="floor")
    if isinstance(s, MultiStep):
        passed = torch.zeros((), dtype=_F64)
        for m in s.milestones:
            passed = passed + (k >= m).to(_F64)
        return s.gamma**passed
    if isinstance(s, Exponential):
        return s.gamma**k
    raise _no_torch_form(s)


def _absolute(s: Cosine | Poly, k: torch.Tensor) -> torch.Tensor:
    if isinstance(s, Cosine):
        t_max = s.T_max if s.T_max is not None else s._bounded_window
        floor = s.base * s.eta_min_ratio if s.eta_min_ratio is not None else (s.eta_min or 0.0)
        return floor + (s.base - floor) * (1 + torch.cos(math.pi * k / t_max)) / 2
    total = s._bounded_window - 1
    if total == 0:
        return torch.full((), s.base, dtype=_F64)
    return s.eta_min + (s.base - s.eta_min) * (1 - k / total) ** s.power


def _no_torch_form(s: Schedule) -> TypeError:
    return TypeError(
        f"compiled step: the schedule {type(s).__name__} has no torch form yet (supported: constant, linear, step, "
        "multistep, exponential, cosine, poly, join/warmup, scale_lr); use compile=False for it"
    )
