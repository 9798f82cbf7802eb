"""Per-parameter lr and weight decay as data: MMEngine's ``paramwise_cfg`` and MMDet's layer decay.

`paramwise` (MMEngine's ``DefaultOptimWrapperConstructor`` with a ``paramwise_cfg``) and
`layer_decay` (MMDet's ``LearningRateDecayOptimizerConstructor``) return a `ParamGroups`:
one row per param with its lr, weight decay, their mults and the rule that set them. Print
it to check before training; ``build`` makes a `fengine.optim.partition` with one optimizer
per distinct ``(lr_mult, decay_mult)``, which also reports the base lr of each update as
``base_lr`` where MMEngine's optimizer has several param groups (its OptimWrapper then
logs ``base_lr``). A scheduled base value is rebuilt per group on
``mult * base``, as MMEngine's schedulers run on each group's initial value: absolute
targets (``eta_min``, onecycle's ``eta_max``) are the same for every group (`Scaled`)::

    groups = paramwise(model, lr=0.01, weight_decay=1e-4, norm_decay_mult=0.0,
                       custom_keys={"backbone": dict(lr_mult=0.1)})
    print(groups)                      # one row per param
    tx = groups.build(optim.sgd, lr=schedules.cosine(0.01, end=1000), momentum=0.9)

The `paramwise` rules (MMEngine 0.10.7 source; its docs differ in places):

- ``custom_keys`` match by **substring** of the name (a top-level param as ``"." + name``);
  the longest key wins, ties go to the alphabetically first. A match sets ``lr_mult`` /
  ``decay_mult`` (default 1), gives its other entries (``momentum=...``) to that param's
  optimizer (a number over a scheduled ``build`` kwarg is the group's initial value, which
  the schedule is rebuilt on, as MMEngine's schedulers), and turns off the type-wise rules
  below.
- lr: ``bias_lr_mult`` for a ``bias`` outside norm layers and deformable convs;
  ``dcn_offset_lr_mult`` (which wins) for the ``conv_offset`` convs of mmcv's
  ``DeformConv2d`` / ``ModulatedDeformConv2d`` (found by class name; mmcv is not imported).
- weight decay, the first rule that applies: norm layer (``_BatchNorm``, ``_InstanceNorm``,
  ``GroupNorm``, ``LayerNorm``) > ``bias`` > depthwise ``Conv2d`` > 1-D param.
- params with ``requires_grad=False`` get no group (`ParamGroups.skipped`).

Deliberate deviations: a group with ``lr_mult=0`` (or ``decay_mult=0``) keeps 0 under a
schedule (MMEngine's schedulers move such a group towards an absolute ``eta_min`` or
onecycle's values, so a "frozen" group trains); a decay mult with a base ``weight_decay`` of 0 raises (MMEngine
raises only without any ``weight_decay``, and then ignores ``flat_decay_mult``); mults must
be numbers >= 0; ``custom_keys`` may not set ``lr`` / ``weight_decay`` (use the mults); a
param shared by two modules raises unless ``bypass_duplicate=True`` (MMEngine's optimizer
raises later, less clearly); ``layer_decay`` takes only ``decay_type`` ``"layer_wise"`` /
``"stage_wise"`` and checks the param names, not the backbone's class name.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from fengine.optim import base as optim_base
from fengine.optim.base import (
    GradientTransformation,
    Hyper,
    PartitionState,
    check_hyper,
    collect_metrics,
    partition,
    report_at,
    resolve,
    wrapping,
)
from fengine.optim.scaling import ScaledLR, ScaledSchedule
from fengine.schedules import Join, Schedule


__all__ = [
    "Group",
    "ParamGroups",
    "ParamGroupsState",
    "ParamSetting",
    "Scaled",
    "convnext_layer_id",
    "convnext_stage_id",
    "layer_decay",
    "paramwise",
]

_NORM_TYPES = (_BatchNorm, _InstanceNorm, nn.GroupNorm, nn.LayerNorm)
_DCN_NAMES = frozenset({"DeformConv2d", "ModulatedDeformConv2d"})


# ---------------------------------------------------------------- values
@dataclass(frozen=True)
class Scaled:
    """A group's share of a scheduled base value: the schedule MMEngine runs on that group.

    MMEngine sets a group's initial value to ``mult * base`` and builds each parameter
    scheduler on it, so what scales is the schedule's base, not its absolute targets:
    ``eta_min`` of `~fengine.schedules.cosine` / `~fengine.schedules.cosine_restart` /
    `~fengine.schedules.poly` stays as given (every group anneals to the same floor),
    ``eta_min_ratio`` follows the group's base, and `~fengine.schedules.onecycle`
    (absolute ``eta_max``) gives every group the same values. For a fengine schedule
    (`~fengine.schedules.Schedule`, a `~fengine.schedules.join` of them or an
    `fengine.optim.scale_lr` result) ``Scaled(mult, s)(step)`` is ``s`` rebuilt on
    ``mult * s.base``; any other callable is multiplied: ``mult * schedule(step)``.
    """

    mult: float
    schedule: Callable[[int], Any]
    _rebased: Callable[[int], Any] | None = dataclasses.field(
        init=False, repr=False, compare=False, default=None
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "_rebased", _rebase(self.schedule, self.mult))

    def __call__(self, step: int) -> Any:
        if self._rebased is not None:
            return self._rebased(step)
        return self.mult * self.schedule(step)

    def __repr__(self) -> str:
        return f"{self.mult!r} * {self.schedule!r}"


def _rebase(schedule: Any, mult: float) -> Callable[[int], Any] | None:
    """``schedule`` built on ``base * mult`` (MMEngine's scheduler on that group), or None if opaque.

    A hyper-parameter with a ``scaled_base(mult, rebase)`` method (`fengine.plateau`'s
    values) makes its group's value itself.
    """
    scaled_base = getattr(schedule, "scaled_base", None)
    if callable(scaled_base):
        return scaled_base(mult, _rebase)
    if isinstance(schedule, ScaledSchedule):  # scale_lr: already rebuilt on the scaled base
        return _rebase(schedule._rebased, mult)
    if isinstance(schedule, Join):
        parts = tuple(_rebase(p, mult) for p in schedule.parts)
        schedules = tuple(p for p in parts if isinstance(p, Schedule))
        if len(schedules) != len(parts):
            return None
        return Join(schedule.base * mult, schedules)
    if isinstance(schedule, Schedule) and dataclasses.is_dataclass(schedule):
        return dataclasses.replace(schedule, base=schedule.base * mult)
    return None


def _on_base(schedule: Any, value: float) -> Schedule | None:
    """``schedule`` rebuilt on the base ``value`` (its factors kept, absolute targets as given),
    or None if it is no fengine schedule (see `_option`)."""
    if isinstance(schedule, ScaledSchedule):
        return _on_base(schedule._rebased, value)
    if isinstance(schedule, Join):
        parts = [_on_base(p, value) for p in schedule.parts]
        kept = tuple(p for p in parts if p is not None)
        return Join(value, kept) if len(kept) == len(parts) else None
    if isinstance(schedule, Schedule) and dataclasses.is_dataclass(schedule):
        return dataclasses.replace(schedule, base=value)
    if callable(getattr(schedule, "scaled_base", None)):  # reduced on plateau (`fengine.plateau`)
        inner = _on_base(schedule.base, value) if callable(schedule.base) else value
        return None if inner is None else dataclasses.replace(schedule, base=inner)
    return None


def _option(shared: Any, value: Any) -> Any:
    """A group's ``custom_keys`` option ``value`` over the kwarg ``shared`` of `ParamGroups.build`.

    A number over a fengine schedule sets the group's initial value, which MMEngine's scheduler
    then runs on (``momentum=0.5`` under ``LinearMomentum``): the schedule rebuilt on that
    number. Otherwise the option replaces the kwarg.
    """
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        rebased = _on_base(shared, float(value))
        if rebased is not None:
            return rebased
    return value


def _scale(base: Hyper, mult: float) -> Hyper:
    """A group's value: ``base * mult`` for a number (MMEngine's product), a `Scaled` schedule otherwise.

    ``mult == 0`` gives 0.0 even for a schedule (the group stays frozen; see the module doc).
    """
    if callable(base):
        if mult == 1:
            return base
        if mult == 0:
            return 0.0
        return Scaled(float(mult), base)
    if (
        isinstance(base, ScaledLR) and mult != 1
    ):  # MMEngine scales each group's lr * mult after building it
        return base.lr * mult * base.factor
    return base * mult


def _show(value: Hyper) -> str:
    """A hyper-parameter for the table: a schedule by its base (MMEngine's ``base_lr``, not its
    warm-up's first value), or by its first value when it has none."""
    if not callable(value):
        return f"{value:.6g}"
    base = _base_of(value)
    return f"{base:.6g} (sched)" if base is not None else f"{value(0):.6g} (sched) at update 0"


def _base_of(value: Any) -> float | None:
    if isinstance(value, Scaled):
        if value._rebased is not None:
            return _base_of(value._rebased)
        inner = _base_of(value.schedule)
        return None if inner is None else value.mult * inner
    base = getattr(value, "base", None)
    return float(base) if isinstance(base, int | float) and not isinstance(base, bool) else None


@dataclass(frozen=True)
class ParamSetting:
    """How one trainable param is optimised.

    ``lr`` / ``weight_decay`` are absolute (``lr_mult`` / ``decay_mult`` times the
    constructor's base values, `Scaled` for a schedule); ``rule`` names what set them
    (``custom_keys['head']``, ``norm_decay_mult``); ``group`` is a name the constructor
    gives (``layer_3_decay``) or None; ``options`` are extra optimizer options (from
    ``custom_keys``); ``logged`` the keys MMEngine puts in the param's group, in order.
    """

    name: str
    shape: tuple[int, ...]
    lr_mult: float
    decay_mult: float
    lr: Hyper
    weight_decay: Hyper
    rule: str
    group: str | None = None
    options: tuple[tuple[str, Any], ...] = ()
    logged: tuple[tuple[str, Any], ...] = dataclasses.field(default=(), repr=False)


@dataclass(frozen=True)
class Group:
    """One optimizer group of `ParamGroups.build`: params sharing ``(lr_mult, decay_mult, options)``."""

    label: str
    names: tuple[str, ...]
    lr_mult: float
    decay_mult: float
    lr: Hyper
    weight_decay: Hyper
    options: tuple[tuple[str, Any], ...] = ()


@dataclass(frozen=True)
class ParamGroups:
    """Per-parameter lr and weight decay, made by `paramwise` or `layer_decay`.

    Iterate for `ParamSetting` rows (``named_parameters`` order), index by name,
    print for a table, `build` for an optimizer. ``skipped`` holds ``(name, reason)``
    of params without a group; ``lr`` / ``weight_decay`` are the constructor's base values;
    ``mmengine_groups`` the param groups MMEngine's constructor makes (more than one: its
    logs carry ``base_lr``, and so do those of `build`'s optimizer).
    """

    settings: tuple[ParamSetting, ...]
    skipped: tuple[tuple[str, str], ...]
    lr: Hyper
    weight_decay: Hyper
    source: str = "paramwise"
    mmengine_groups: int = 1
    _index: dict[str, ParamSetting] = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_index", {s.name: s for s in self.settings})

    # ------------------------------------------------------------ lookup
    def __iter__(self) -> Iterator[ParamSetting]:
        return iter(self.settings)

    def __len__(self) -> int:
        return len(self.settings)

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def __getitem__(self, name: str) -> ParamSetting:
        if name in self._index:
            return self._index[name]
        reason = next((r for n, r in self.skipped if n == name), None)
        if reason is not None:
            raise KeyError(f"param {name!r} has no group: {reason}")
        raise KeyError(f"no param named {name!r}; params are {list(self.names)}")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.settings)

    def lr_of(self, name: str) -> Hyper:
        return self[name].lr

    def weight_decay_of(self, name: str) -> Hyper:
        return self[name].weight_decay

    # ------------------------------------------------------------ groups
    def groups(self, *, lr: Hyper | None = None, weight_decay: Hyper | None = None) -> list[Group]:
        """The optimizer groups `build` makes, in order of first param.

        ``lr`` / ``weight_decay`` (number or schedule) replace the constructor's base values.
        """
        base_lr = self.lr if lr is None else lr
        base_wd = self.weight_decay if weight_decay is None else weight_decay
        check_hyper("lr", base_lr, where="ParamGroups")
        check_hyper("weight_decay", base_wd, where="ParamGroups")
        buckets: dict[tuple, list[ParamSetting]] = {}
        for s in self.settings:
            key = (s.lr_mult, s.decay_mult, tuple((k, repr(v)) for k, v in s.options))
            buckets.setdefault(key, []).append(s)
        out = []
        for (lm, dm, _), members in buckets.items():
            options = members[0].options
            named = {m.group for m in members}
            shared = named.pop() if len(named) == 1 else None  # the one group name all share
            if shared is not None:
                label = shared
            elif lm == 1 and dm == 1 and not options:
                label = "default"
            else:
                label = ",".join(
                    [f"lr_mult={lm!r}", f"decay_mult={dm!r}"] + [f"{k}={v!r}" for k, v in options]
                )
            out.append(
                Group(
                    label,
                    tuple(m.name for m in members),
                    lm,
                    dm,
                    _scale(base_lr, lm),
                    _scale(base_wd, dm),
                    options,
                )
            )
        return out

    def labels(self) -> dict[str, str]:
        """param name -> its group label in `build`."""
        return {n: g.label for g in self.groups() for n in g.names}

    def build(
        self,
        optimizer: Callable[..., GradientTransformation],
        *,
        lr: Hyper | None = None,
        weight_decay: Hyper | None = None,
        **kwargs: Any,
    ) -> GradientTransformation:
        """A `partition` of ``optimizer(lr=group_lr, weight_decay=group_wd, **kwargs)``, one per group.

        ``optimizer`` is e.g. `fengine.optim.sgd`; ``lr`` / ``weight_decay`` replace the
        base values; ``kwargs`` are shared by every group, overridden by a ``custom_keys``
        entry's options (a number over a fengine schedule: the schedule rebuilt on that
        number, as MMEngine schedules the group from its own initial value). A group with
        no gradient in a step is skipped that step. With ``mmengine_groups > 1`` its state is a `ParamGroupsState`, which also reports the
        base lr (MMEngine's ``base_lr``).
        """
        if not callable(optimizer):
            raise TypeError(
                f"ParamGroups.build: optimizer must be a function like fengine.optim.sgd, got {optimizer!r}"
            )
        plan = self.groups(lr=lr, weight_decay=weight_decay)
        if not plan:
            raise ValueError(
                f"ParamGroups.build: no trainable params (skipped: {[n for n, _ in self.skipped]})"
            )
        where = getattr(optimizer, "__name__", repr(optimizer))
        transforms: dict[str, GradientTransformation] = {}
        labels: dict[str, str] = {}
        for g in plan:
            kw = {**kwargs, **{k: _option(kwargs.get(k), v) for k, v in g.options}}
            try:
                tx = optimizer(lr=g.lr, weight_decay=g.weight_decay, **kw)
            except (TypeError, ValueError) as e:
                raise type(e)(
                    f"ParamGroups.build: {where}(lr={g.lr!r}, weight_decay={g.weight_decay!r}, "
                    f"{', '.join(f'{k}={v!r}' for k, v in kw.items())}) for group {g.label!r} "
                    f"({g.names[0]!r}, ...) failed: {e}"
                ) from e
            if not isinstance(tx, GradientTransformation):
                raise TypeError(
                    f"ParamGroups.build: {where}(...) returned {type(tx).__name__}, expected a GradientTransformation"
                )
            transforms[g.label] = tx
            labels.update(dict.fromkeys(g.names, g.label))
        tx = partition(transforms, labels)
        if self.mmengine_groups > 1:
            return _reporting_base_lr(tx, self.lr if lr is None else lr)
        return tx

    # ------------------------------------------------------------ display
    def table(self) -> str:
        """One row per param: name, shape, lr, weight decay, mults, rule; then the skipped params."""
        head = (
            f"{self.source}: {len(self.settings)} trainable params in {len(self.groups())} groups, "
            f"{len(self.skipped)} skipped (base lr={_show(self.lr)}, weight_decay={_show(self.weight_decay)})"
        )
        cols = ("name", "shape", "lr", "weight_decay", "lr_mult", "decay_mult", "rule")
        rows = [
            (
                s.name,
                "x".join(map(str, s.shape)) or "scalar",
                _show(s.lr),
                _show(s.weight_decay),
                f"{s.lr_mult:g}",
                f"{s.decay_mult:g}",
                s.rule + "".join(f", {k}={v!r}" for k, v in s.options),
            )
            for s in self.settings
        ]
        widths = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(cols)]
        lines = [head] + [
            "  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in [cols, *rows]
        ]
        lines += [f"skipped: {name} ({reason})" for name, reason in self.skipped]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def __repr__(self) -> str:
        return f"ParamGroups({self.source}: {len(self.settings)} params, {len(self.groups())} groups, {len(self.skipped)} skipped)"

    def log_lines(self) -> list[str]:
        """MMEngine's ``paramwise_options -- {name}:{key}={value}`` log lines, one per key it sets.

        For `paramwise`, exactly what ``DefaultOptimWrapperConstructor`` logs when the
        optimizer config has a ``weight_decay``.
        """
        return [
            f"paramwise_options -- {s.name}:{k}={v}" for s in self.settings for k, v in s.logged
        ]


class ParamGroupsState(NamedTuple):
    """The state of a `ParamGroups.build` optimizer where MMEngine has several param groups:
    the groups' states (as `fengine.optim.PartitionState`'s) and the base lr of the last
    update (of step 0 before any), reported as ``base_lr`` before the groups' lrs, as
    MMEngine's ``OptimWrapper.get_lr()`` reports its ``base_param_settings``."""

    inner: dict[str, Any]
    base_lr: float

    def metrics(self) -> dict[str, Any]:
        return {"base_lr": self.base_lr, **collect_metrics(PartitionState(self.inner))}

    def hyperparams(self) -> dict[str, Any]:
        return {"base_lr": self.base_lr, **optim_base.hyperparams(PartitionState(self.inner))}


def without_base_lr(opt_state: Any) -> Any:
    """``opt_state`` as it was laid out before `ParamGroupsState` kept ``base_lr`` (a plain
    `PartitionState`): the template that reads a checkpoint saved then. ``base_lr`` is
    recomputed at every update, so such a checkpoint resumes exactly (`with_base_lr`)."""
    if isinstance(opt_state, ParamGroupsState):
        return PartitionState(opt_state.inner)
    return _map_nodes(without_base_lr, opt_state)


def with_base_lr(loaded: Any, like: Any) -> Any:
    """``loaded`` (read with `without_base_lr`'s template) in ``like``'s layout, ``base_lr`` from ``like``."""
    if isinstance(like, ParamGroupsState):
        return ParamGroupsState(loaded.inner, like.base_lr)
    if isinstance(like, dict):
        return {k: with_base_lr(loaded[k], v) for k, v in like.items()}
    if isinstance(like, (tuple, list)) and not isinstance(like, str):
        items = [with_base_lr(a, b) for a, b in zip(loaded, like)]
        return type(like)(*items) if hasattr(like, "_fields") else type(like)(items)
    return loaded


def _map_nodes(fn: Callable[[Any], Any], node: Any) -> Any:
    """``fn`` on each child of a dict / tuple / NamedTuple / list node; leaves as they are."""
    if isinstance(node, dict):
        return {k: fn(v) for k, v in node.items()}
    if isinstance(node, (tuple, list)):
        items = [fn(v) for v in node]
        return type(node)(*items) if hasattr(node, "_fields") else type(node)(items)
    return node


def _reporting_base_lr(tx: GradientTransformation, base_lr: Hyper) -> GradientTransformation:
    """``tx`` (a `partition`) with a `ParamGroupsState`: its state also keeps ``base_lr``'s value
    at each update (one number; in a compiled step a 0-d tensor, as the optimizers' lrs)."""

    def value(step: Any) -> Any:
        v = resolve(base_lr, step)
        if not isinstance(step, torch.Tensor):
            return float(v)
        return v if isinstance(v, torch.Tensor) else torch.tensor(v, dtype=torch.float64)

    def init_fn(params):
        return ParamGroupsState(tx.init(params).inner, float(resolve(base_lr, 0)))

    def update_fn(grads, state, params=None, *, step=None):
        updates, new = tx.update(grads, PartitionState(state.inner), params, step=step)
        return updates, ParamGroupsState(new.inner, value(step))

    apply_fn = None
    if tx.apply is not None:
        apply = tx.apply

        def apply_fn(grads, state, params, *, step=None):
            params, new = apply(grads, PartitionState(state.inner), params, step=step)
            return params, ParamGroupsState(new.inner, value(step))

    def report(state, step):
        inner = report_at(tx, PartitionState(state.inner), step).inner
        return ParamGroupsState(inner, state.base_lr if step is None else value(step))

    return wrapping(GradientTransformation(init_fn, update_fn, apply_fn, report), tx)


def _check_mult(
    where: str, option: str, value: Any, scales_zero_wd: bool = False, drop: str | None = None
) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{where}: {option} must be a number, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{where}: {option} must be a finite number >= 0, got {value!r}")
    if scales_zero_wd:
        raise ValueError(
            f"{where}: {option}={value!r} scales the weight decay, but weight_decay is 0; "
            f"give the base weight_decay (e.g. weight_decay=1e-4) or drop {drop or option}"
        )


def _check_base(where: str, model: Any, lr: Any, weight_decay: Any) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{where}: model must be an nn.Module, got {type(model).__name__}")
    check_hyper("lr", lr, where=where)
    check_hyper("weight_decay", weight_decay, where=where)


def _aligned(key: str, name: str) -> bool:
    """Whether ``key`` occurs in ``name`` as whole dot-separated components (no surprise)."""
    start = name.find(key)
    while start != -1:
        end = start + len(key)
        left = start == 0 or name[start - 1] == "." or key.startswith(".")
        right = end == len(name) or name[end] == "." or key.endswith(".")
        if left and right:
            return True
        start = name.find(key, start + 1)
    return False


# ---------------------------------------------------------------- paramwise
def paramwise(
    model: nn.Module,
    *,
    lr: Hyper,
    weight_decay: Hyper = 0.0,
    bias_lr_mult: float | None = None,
    bias_decay_mult: float | None = None,
    norm_decay_mult: float | None = None,
    dwconv_decay_mult: float | None = None,
    flat_decay_mult: float | None = None,
    custom_keys: Mapping[str, Mapping[str, Any]] | None = None,
    bypass_duplicate: bool = False,
    dcn_offset_lr_mult: float | None = None,
) -> ParamGroups:
    """Per-param lr / weight decay by MMEngine's ``paramwise_cfg`` rules (see the module doc).

    ``lr`` / ``weight_decay`` are the base values (numbers or schedules); ``custom_keys``
    is ``{substring: dict(lr_mult=..., decay_mult=..., **optimizer_options)}``;
    ``bypass_duplicate`` keeps only the first occurrence of a param shared by several
    modules (else such a param raises). ``print`` the result to see each param's values.
    """
    where = "paramwise"
    _check_base(where, model, lr, weight_decay)
    no_wd = not callable(weight_decay) and weight_decay == 0
    mults = {
        "bias_lr_mult": bias_lr_mult,
        "bias_decay_mult": bias_decay_mult,
        "norm_decay_mult": norm_decay_mult,
        "dwconv_decay_mult": dwconv_decay_mult,
        "flat_decay_mult": flat_decay_mult,
        "dcn_offset_lr_mult": dcn_offset_lr_mult,
    }
    for option, value in mults.items():
        if value is not None:
            _check_mult(where, option, value, no_wd and option.endswith("decay_mult"))
    if not isinstance(bypass_duplicate, bool):
        raise TypeError(f"{where}: bypass_duplicate must be a bool, got {bypass_duplicate!r}")

    custom: dict[str, dict[str, Any]] = {}
    if custom_keys is not None and not isinstance(custom_keys, Mapping):
        raise TypeError(
            f"{where}: custom_keys must be a dict {{name substring: dict(lr_mult=..., decay_mult=...)}}, got {custom_keys!r}"
        )
    for key, cfg in (custom_keys or {}).items():
        opt = f"custom_keys[{key!r}]"
        if not isinstance(key, str):
            raise TypeError(
                f"{where}: custom_keys keys must be strings (substrings of param names), got {key!r}"
            )
        if not isinstance(cfg, Mapping):
            raise TypeError(
                f"{where}: {opt} must be a dict like dict(lr_mult=0.1, decay_mult=0.0), got {cfg!r}"
            )
        for bad, hint in (
            ("lr", "give lr_mult (relative to the base lr) instead"),
            ("weight_decay", "give decay_mult (relative to the base weight_decay) instead"),
            ("params", "it names params by key, not by a list"),
        ):
            if bad in cfg:
                raise ValueError(f"{where}: {opt} sets {bad!r}={cfg[bad]!r}; {hint}")
        for m in ("lr_mult", "decay_mult"):
            if m in cfg:
                _check_mult(where, f"{opt}[{m!r}]", cfg[m], no_wd and m == "decay_mult", m)
        custom[key] = dict(cfg)
    sorted_keys = sorted(sorted(custom), key=len, reverse=True)

    settings: list[ParamSetting] = []
    skipped: list[tuple[str, str]] = []
    seen: dict[int, str] = {}

    def visit(module: nn.Module, prefix: str, under_dcn: bool) -> None:
        for local, param in module.named_parameters(recurse=False):
            full = f"{prefix}.{local}" if prefix else local
            first = seen.get(id(param))
            if first is not None:
                if bypass_duplicate:
                    skipped.append((full, f"the same tensor as {first!r} (bypass_duplicate=True)"))
                    continue
                raise ValueError(
                    f"{where}: param {full!r} is the same tensor as {first!r} (shared by two modules); "
                    f"pass bypass_duplicate=True to optimise it once, under {first!r}"
                )
            if not param.requires_grad:
                skipped.append((full, "requires_grad=False"))
                continue
            seen[id(param)] = full
            settings.append(setting(full, local, param, module, prefix, under_dcn))
        is_dcn = any(c.__name__ in _DCN_NAMES for c in type(module).__mro__)
        for child_name, child in module.named_children():
            visit(child, f"{prefix}.{child_name}" if prefix else child_name, is_dcn)

    def setting(
        full: str, local: str, param: nn.Parameter, module: nn.Module, prefix: str, under_dcn: bool
    ) -> ParamSetting:
        shape, match_name = tuple(param.shape), f"{prefix}.{local}"
        key = next((k for k in sorted_keys if k in match_name), None)
        if key is not None:
            cfg = custom[key]
            lm, dm = cfg.get("lr_mult", 1.0), cfg.get("decay_mult", 1.0)
            p_lr, p_wd = _scale(lr, lm), _scale(weight_decay, dm)
            rule = f"custom_keys[{key!r}]" + (
                "" if _aligned(key, match_name) else " (substring inside a name component)"
            )
            options = tuple((k, v) for k, v in cfg.items() if k not in ("lr_mult", "decay_mult"))
            custom_logged = {"lr": p_lr, "weight_decay": p_wd, **cfg}
            return ParamSetting(
                full,
                shape,
                float(lm),
                float(dm),
                p_lr,
                p_wd,
                rule,
                None,
                options,
                tuple(custom_logged.items()),
            )
        is_norm = isinstance(module, _NORM_TYPES)
        lm, dm, lr_rule, wd_rule = 1.0, 1.0, None, None
        if local == "bias" and not (is_norm or under_dcn) and bias_lr_mult is not None:
            lm, lr_rule = bias_lr_mult, "bias_lr_mult"
        if (
            "conv_offset" in prefix
            and under_dcn
            and dcn_offset_lr_mult is not None
            and isinstance(module, nn.Conv2d)
        ):
            lm, lr_rule = dcn_offset_lr_mult, "dcn_offset_lr_mult"
        if is_norm and norm_decay_mult is not None:
            dm, wd_rule = norm_decay_mult, "norm_decay_mult"
        elif local == "bias" and not under_dcn and bias_decay_mult is not None:
            dm, wd_rule = bias_decay_mult, "bias_decay_mult"
        elif (
            isinstance(module, nn.Conv2d)
            and module.in_channels == module.groups
            and dwconv_decay_mult is not None
        ):
            dm, wd_rule = dwconv_decay_mult, "dwconv_decay_mult"
        elif param.ndim == 1 and not under_dcn and flat_decay_mult is not None:
            dm, wd_rule = flat_decay_mult, "flat_decay_mult"
        p_lr = _scale(lr, lm) if lr_rule else lr
        p_wd = _scale(weight_decay, dm) if wd_rule else weight_decay
        logged = tuple(
            (k, v) for k, v, r in (("lr", p_lr, lr_rule), ("weight_decay", p_wd, wd_rule)) if r
        )
        rule = " + ".join(r for r in (lr_rule, wd_rule) if r) or "default"
        return ParamSetting(full, shape, float(lm), float(dm), p_lr, p_wd, rule, None, (), logged)

    visit(model, "", False)
    # MMEngine: one param group per param given any paramwise_cfg, else one for the model
    configured = (
        custom_keys is not None or bypass_duplicate or any(v is not None for v in mults.values())
    )
    groups = len(settings) if configured else 1
    return ParamGroups(tuple(settings), tuple(skipped), lr, weight_decay, "paramwise", groups)


# ---------------------------------------------------------------- layer decay
_CONVNEXT_TOKENS = ("backbone.cls_token", "backbone.mask_token", "backbone.pos_embed")


def _convnext_index(name: str, index: int, where: str) -> int:
    try:
        return int(name.split(".")[index])
    except (IndexError, ValueError):
        raise ValueError(
            f"{where}: cannot read a ConvNeXt stage/block index from {name!r}"
        ) from None


def convnext_layer_id(name: str, num_layers: int) -> int:
    """MMDet's ``get_layer_id_for_convnext``: the layer id of a param of a ConvNeXt-backboned model.

    ``num_layers`` is the max id of the backbone; the neck/head get ``num_layers + 1``.
    """
    where = "layer_decay(layer_id='convnext')"
    if name in _CONVNEXT_TOKENS:
        return 0
    if name.startswith("backbone.downsample_layers"):
        stage = _convnext_index(name, 2, where)
        ids = {0: 0, 1: 2, 2: 3, 3: num_layers}
    elif name.startswith("backbone.stages"):
        stage = _convnext_index(name, 2, where)
        ids = {0: 1, 1: 2, 2: 3 + _convnext_index(name, 3, where) // 3, 3: num_layers}
    else:
        return num_layers + 1
    if stage not in ids:
        raise ValueError(f"{where}: {name!r} is in stage {stage}, but ConvNeXt has stages 0-3")
    return ids[stage]


def convnext_stage_id(name: str, max_stage_id: int) -> int:
    """MMDet's ``get_stage_id_for_convnext`` (``max_stage_id`` is ``num_layers + 2``)."""
    if name in _CONVNEXT_TOKENS or name.startswith("backbone.downsample_layers"):
        return 0
    if name.startswith("backbone.stages"):
        return (
            _convnext_index(name, 2, "layer_decay(layer_id='convnext', decay_type='stage_wise')")
            + 1
        )
    return max_stage_id - 1


def layer_decay(
    model: nn.Module,
    *,
    lr: Hyper,
    weight_decay: Hyper,
    decay_rate: float,
    num_layers: int,
    layer_id: Callable[[str], int] | str = "convnext",
    decay_type: str = "layer_wise",
) -> ParamGroups:
    """Layer-wise lr decay: MMDet's ``LearningRateDecayOptimizerConstructor``.

    With ``n = num_layers + 2``, a param in layer ``i`` gets
    ``lr = decay_rate ** (n - i - 1) * lr`` (the head, id ``num_layers + 1``, gets
    the base lr). Weight decay is 0 for 1-D params, names ending in ``.bias`` and
    params named exactly ``pos_embed`` / ``cls_token`` (MMDet compares the
    unqualified name, so ``backbone.pos_embed`` is decayed), else the base value.
    ``layer_id`` is ``"convnext"`` (MMDet's ConvNeXt rules, ``decay_type``
    ``"layer_wise"`` by block or ``"stage_wise"``) or a function ``name -> layer id``.
    """
    where = "layer_decay"
    _check_base(where, model, lr, weight_decay)
    if (
        isinstance(decay_rate, bool)
        or not isinstance(decay_rate, numbers.Real)
        or not (0 < decay_rate < math.inf)
    ):
        raise ValueError(f"{where}: decay_rate must be a number > 0, got {decay_rate!r}")
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 0:
        raise ValueError(f"{where}: num_layers must be an int >= 0, got {num_layers!r}")
    if decay_type not in ("layer_wise", "stage_wise"):
        raise ValueError(
            f"{where}: decay_type must be 'layer_wise' or 'stage_wise', got {decay_type!r}"
        )
    n = num_layers + 2
    if callable(layer_id):
        if decay_type != "layer_wise":
            raise ValueError(
                f"{where}: decay_type={decay_type!r} picks a built-in layer_id rule; a layer_id function gives the ids itself"
            )
        id_fn, id_name = layer_id, getattr(layer_id, "__name__", repr(layer_id))
    elif layer_id == "convnext":
        if decay_type == "layer_wise":
            id_fn = partial(convnext_layer_id, num_layers=num_layers)
        else:
            id_fn = partial(convnext_stage_id, max_stage_id=n)
        id_name = f"convnext {decay_type}"
    else:
        raise ValueError(
            f"{where}: layer_id must be 'convnext' or a function name -> int, got {layer_id!r}"
        )

    settings: list[ParamSetting] = []
    skipped: list[tuple[str, str]] = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            skipped.append((name, "requires_grad=False"))
            continue
        lid = id_fn(name)
        if isinstance(lid, bool) or not isinstance(lid, int):
            raise TypeError(
                f"{where}: layer_id {id_name}({name!r}) returned {lid!r}, expected an int"
            )
        scale = decay_rate ** (n - lid - 1)
        if not 0 <= lid <= n - 1:
            warnings.warn(
                f"{where}: {name!r} has layer id {lid}, outside 0..{n - 1} (num_layers + 1), so its lr scale "
                f"{decay_rate}**{n - lid - 1} = {scale:.6g}; MMDet does the same. "
                "Is num_layers right for this model?",
                stacklevel=2,
            )
        if param.ndim == 1:
            no_decay = "no_decay: 1-D"
        elif name.endswith(".bias"):
            no_decay = "no_decay: .bias"
        elif name in ("pos_embed", "cls_token"):
            no_decay = f"no_decay: {name}"
        else:
            no_decay = None
        p_lr = _scale(lr, scale)  # MMDet's scale * base_lr: the same float product
        p_wd = 0.0 if no_decay else weight_decay
        group = f"layer_{lid}_{'no_decay' if no_decay else 'decay'}"
        rule = f"layer {lid}: lr_scale={decay_rate}**{n - lid - 1}, {no_decay or 'decay'}"
        logged = (("lr", p_lr), ("weight_decay", p_wd), ("lr_scale", scale), ("group_name", group))
        settings.append(
            ParamSetting(
                name,
                tuple(param.shape),
                float(scale),
                0.0 if no_decay else 1.0,
                p_lr,
                p_wd,
                rule,
                group,
                (),
                logged,
            )
        )

    if (
        layer_id == "convnext"
        and settings
        and not any(
            s.name in _CONVNEXT_TOKENS
            or s.name.startswith(("backbone.downsample_layers", "backbone.stages"))
            for s in settings
        )
    ):
        raise ValueError(
            f"{where}: layer_id='convnext' expects ConvNeXt param names (backbone.downsample_layers.S..., "
            f"backbone.stages.S.B...), but none of the model's params match (e.g. {settings[0].name!r}); "
            "pass layer_id=<function name -> int> for other models"
        )
    return ParamGroups(
        tuple(settings),
        tuple(skipped),
        lr,
        weight_decay,
        f"layer_decay({id_name}, decay_rate={decay_rate}, num_layers={num_layers})",
        len({s.group for s in settings}),  # MMDet: one param group per group name
    )
