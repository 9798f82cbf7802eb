"""Per-parameter learning rates and weight decay: MMEngine's ``paramwise_cfg``, as data.

Two constructors turn a model into a `ParamGroups` value, an immutable table of
``param name -> (lr_mult, decay_mult, lr, weight_decay, rule)``:

- `paramwise` follows MMEngine's ``DefaultOptimWrapperConstructor`` with a
  ``paramwise_cfg`` (``custom_keys``, ``bias_lr_mult``, ``bias_decay_mult``,
  ``norm_decay_mult``, ``dwconv_decay_mult``, ``flat_decay_mult``,
  ``dcn_offset_lr_mult``, ``bypass_duplicate``), rule for rule;
- `layer_decay` follows MMDet's ``LearningRateDecayOptimizerConstructor``
  (layer-wise lr decay for ConvNeXt, or any ``layer_id(name)`` function).

Print the result to see every param's lr and weight decay before training, then
``groups.build(fengine.optim.adamw, ...)`` gives one gradient transformation: a
`fengine.optim.partition` with one optimizer per distinct ``(lr_mult, decay_mult)``.
A schedule given as the base lr (or weight decay) is scaled per group::

    groups = paramwise(model, lr=0.01, weight_decay=1e-4, norm_decay_mult=0.0,
                       custom_keys={"backbone": dict(lr_mult=0.1)})
    print(groups)                      # one row per param
    tx = groups.build(optim.sgd, lr=schedules.cosine(0.01, end=1000), momentum=0.9)

The rules (MMEngine 0.10.7 source; its docs differ in places):

- ``custom_keys`` match by **substring** of the param's name, not by prefix: the
  longest matching key wins, ties go to the alphabetically first. A top-level param
  is matched as ``"." + name`` (MMEngine matches ``f"{prefix}.{name}"`` with an empty
  prefix). A match sets ``lr = base * lr_mult`` and ``wd = base * decay_mult`` (both
  default 1) and turns off every type-wise rule below for that param. Other entries
  of the key's dict (``momentum=...``) become optimizer options of that param's group.
- otherwise ``bias_lr_mult`` scales the lr of every ``bias`` not in a norm layer or
  under a deformable conv; ``dcn_offset_lr_mult`` sets the lr of the ``conv_offset``
  convs of mmcv's ``DeformConv2d`` / ``ModulatedDeformConv2d`` (found by class name;
  mmcv is not imported) and wins over ``bias_lr_mult``.
- the weight decay takes the first rule that applies: norm layer (``_BatchNorm``,
  ``_InstanceNorm``, ``GroupNorm``, ``LayerNorm``: weight and bias) >
  ``bias`` > depthwise ``Conv2d`` (``in_channels == groups``) > 1-D param.
- params with ``requires_grad=False`` get no group (`ParamGroups.skipped` lists them).

Deviations from MMEngine, each deliberate: a decay mult given while the base
``weight_decay`` is 0 raises (MMEngine raises only when no ``weight_decay`` is
given at all, and ignores ``flat_decay_mult`` then); mults must be numbers >= 0;
``custom_keys`` may not set ``lr``/``weight_decay`` directly (use the mults); a
param shared by two modules raises unless ``bypass_duplicate=True`` (MMEngine's
optimizer raises the same way, later and less clearly); ``layer_decay`` accepts
only ``decay_type`` ``"layer_wise"`` / ``"stage_wise"`` and does not require the
backbone class to be named ``ConvNeXt`` (it checks the param names instead).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from fengine.optim.base import GradientTransformation, Hyper, check_hyper, partition


__all__ = [
    "Group",
    "ParamGroups",
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
    """The schedule ``step -> mult * schedule(step)``: a group's share of a scheduled base value."""

    mult: float
    schedule: Callable[[int], Any]

    def __call__(self, step: int) -> Any:
        return self.mult * self.schedule(step)

    def __repr__(self) -> str:
        return f"{self.mult!r} * {self.schedule!r}"


def _scale(base: Hyper, mult: float) -> Hyper:
    """``base * mult`` for a number (the product MMEngine computes); a `Scaled` schedule otherwise."""
    if callable(base):
        if mult == 1:
            return base
        if mult == 0:
            return 0.0
        return Scaled(float(mult), base)
    return base * mult


def _show(value: Hyper) -> str:
    if callable(value):
        return f"{value(0):.6g} (sched)"
    return f"{value:.6g}"


@dataclass(frozen=True)
class ParamSetting:
    """How one trainable param is optimised."""

    name: str
    """``model.named_parameters()`` name."""
    shape: tuple[int, ...]
    lr_mult: float
    """lr relative to the base lr."""
    decay_mult: float
    """Weight decay relative to the base weight decay."""
    lr: Hyper
    """Absolute lr from the base lr given to the constructor (a `Scaled` schedule if that was a schedule)."""
    weight_decay: Hyper
    """Absolute weight decay from the base weight decay given to the constructor."""
    rule: str
    """The rule that set lr/weight decay, e.g. ``custom_keys['head']`` or ``norm_decay_mult``."""
    group: str | None = None
    """A group name the constructor gives (``layer_3_decay`` for `layer_decay`), else None."""
    options: tuple[tuple[str, Any], ...] = ()
    """Extra optimizer options for this param's group (from a ``custom_keys`` entry)."""
    logged: tuple[tuple[str, Any], ...] = dataclasses.field(default=(), repr=False)
    """The keys MMEngine's constructor puts in this param's group, in its order (see `ParamGroups.log_lines`)."""


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
    print for a table, `build` for an optimizer.
    """

    settings: tuple[ParamSetting, ...]
    skipped: tuple[tuple[str, str], ...]
    """``(name, reason)`` of params that get no group (frozen, or duplicates)."""
    lr: Hyper
    """The base lr given to the constructor."""
    weight_decay: Hyper
    """The base weight decay given to the constructor."""
    source: str = "paramwise"
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
        found = self._index.get(name)
        if found is not None:
            return found
        for skipped, reason in self.skipped:
            if skipped == name:
                raise KeyError(f"param {name!r} has no group: {reason}")
        raise KeyError(f"no param named {name!r}; params are {[s.name for s in self.settings]}")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.settings)

    def lr_of(self, name: str) -> Hyper:
        """The absolute lr of ``name`` (from the constructor's base lr)."""
        return self[name].lr

    def weight_decay_of(self, name: str) -> Hyper:
        """The absolute weight decay of ``name`` (from the constructor's base weight decay)."""
        return self[name].weight_decay

    # ------------------------------------------------------------ groups
    def groups(self, *, lr: Hyper | None = None, weight_decay: Hyper | None = None) -> list[Group]:
        """The optimizer groups `build` makes, in order of first param.

        ``lr`` / ``weight_decay`` replace the constructor's base values (a number or a
        schedule); each group gets ``lr_mult * lr`` and ``decay_mult * weight_decay``
        (a `Scaled` schedule when the base is a schedule; mult 1 keeps it as is).
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
            if len(named) == 1 and None not in named:
                label = named.pop()
            elif lm == 1 and dm == 1 and not options:
                label = "default"
            else:
                label = ",".join([f"lr_mult={lm!r}", f"decay_mult={dm!r}"] + [f"{k}={v!r}" for k, v in options])
            out.append(Group(label, tuple(m.name for m in members), lm, dm, _scale(base_lr, lm), _scale(base_wd, dm), options))
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
        """One ``optimizer(lr=group_lr, weight_decay=group_wd, **kwargs)`` per group, as a `partition`.

        Args:
          optimizer: e.g. `fengine.optim.sgd` / `adamw` (any function taking ``lr`` and
            ``weight_decay`` and returning a `GradientTransformation`).
          lr, weight_decay: base values (number or schedule) replacing the constructor's.
          kwargs: the other hyper-parameters, shared by every group (``momentum=0.9``);
            a ``custom_keys`` entry's extra options override them for its params.

        Frozen params get no label: they take no gradients. A group none of whose
        params has a gradient in a step (unused in the forward) is skipped that step.
        """
        if not callable(optimizer):
            raise TypeError(f"ParamGroups.build: optimizer must be a function like fengine.optim.sgd, got {optimizer!r}")
        plan = self.groups(lr=lr, weight_decay=weight_decay)
        if not plan:
            raise ValueError(f"ParamGroups.build: no trainable params (skipped: {[n for n, _ in self.skipped]})")
        where = getattr(optimizer, "__name__", repr(optimizer))
        transforms: dict[str, GradientTransformation] = {}
        labels: dict[str, str] = {}
        for g in plan:
            kw = {**kwargs, **dict(g.options)}
            try:
                tx = optimizer(lr=g.lr, weight_decay=g.weight_decay, **kw)
            except (TypeError, ValueError) as e:
                raise type(e)(
                    f"ParamGroups.build: {where}(lr={g.lr!r}, weight_decay={g.weight_decay!r}, "
                    f"{', '.join(f'{k}={v!r}' for k, v in kw.items())}) for group {g.label!r} "
                    f"({g.names[0]!r}, ...) failed: {e}"
                ) from e
            if not isinstance(tx, GradientTransformation):
                raise TypeError(f"ParamGroups.build: {where}(...) returned {type(tx).__name__}, expected a GradientTransformation")
            transforms[g.label] = tx
            labels.update(dict.fromkeys(g.names, g.label))
        return partition(transforms, labels)

    # ------------------------------------------------------------ display
    def table(self) -> str:
        """One row per param: name, shape, lr, weight decay, mults, rule; then the skipped params."""
        groups = self.groups()
        head = (
            f"{self.source}: {len(self.settings)} trainable params in {len(groups)} groups, "
            f"{len(self.skipped)} skipped (base lr={_show(self.lr)}, weight_decay={_show(self.weight_decay)})"
        )
        cols = ("name", "shape", "lr", "weight_decay", "lr_mult", "decay_mult", "rule")
        rows = [
            (s.name, "x".join(map(str, s.shape)) or "scalar", _show(s.lr), _show(s.weight_decay),
             f"{s.lr_mult:g}", f"{s.decay_mult:g}",
             s.rule + "".join(f", {k}={v!r}" for k, v in s.options))
            for s in self.settings
        ]
        widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(cols)]
        lines = [head, "  ".join(c.ljust(w) for c, w in zip(cols, widths)).rstrip()]
        lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
        lines += [f"skipped: {name} ({reason})" for name, reason in self.skipped]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def __repr__(self) -> str:
        return f"ParamGroups({self.source}: {len(self.settings)} params, {len(self.groups())} groups, {len(self.skipped)} skipped)"

    def log_lines(self) -> list[str]:
        """MMEngine's log lines, ``paramwise_options -- {name}:{key}={value}``, one per key it sets.

        For `paramwise` these are exactly the lines ``DefaultOptimWrapperConstructor``
        logs when the optimizer config has a ``weight_decay`` (params left at the base
        values print nothing).
        """
        return [f"paramwise_options -- {s.name}:{k}={v}" for s in self.settings for k, v in s.logged]


def _check_mult(where: str, option: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{where}: {option} must be a number, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{where}: {option} must be a finite number >= 0, got {value!r}")
    return value


def _check_base(where: str, lr: Any, weight_decay: Any) -> None:
    for name, value in (("lr", lr), ("weight_decay", weight_decay)):
        if not callable(value) and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
            raise TypeError(f"{where}: {name} must be a number or a schedule step -> number, got {value!r}")
        check_hyper(name, value, where=where)


def _is_dcn(module: nn.Module) -> bool:
    return any(c.__name__ in _DCN_NAMES for c in type(module).__mro__)


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

    Args:
      model: the module whose ``named_parameters()`` are grouped.
      lr, weight_decay: the base values (numbers, or schedules ``step -> value``).
      bias_lr_mult: lr mult of biases outside norm layers and deformable convs.
      bias_decay_mult: weight decay mult of biases outside norm layers and deformable convs.
      norm_decay_mult: weight decay mult of the weight and bias of norm layers.
      dwconv_decay_mult: weight decay mult of depthwise ``Conv2d`` params.
      flat_decay_mult: weight decay mult of other 1-D params.
      custom_keys: ``{substring: dict(lr_mult=..., decay_mult=..., **optimizer_options)}``;
        the longest key contained in a param's name wins (ties: alphabetical) and
        overrides every rule above.
      bypass_duplicate: keep only the first occurrence of a param shared by several
        modules (else such a param raises).
      dcn_offset_lr_mult: lr mult of the ``conv_offset`` convs of mmcv deformable convs.

    Returns:
      a `ParamGroups`; ``print`` it to see each param's lr and weight decay.
    """
    where = "paramwise"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{where}: model must be an nn.Module, got {type(model).__name__}")
    _check_base(where, lr, weight_decay)
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
        if value is None:
            continue
        _check_mult(where, option, value)
        if no_wd and option.endswith("decay_mult"):
            raise ValueError(
                f"{where}: {option}={value!r} scales the weight decay, but weight_decay is 0; "
                f"give the base weight_decay (e.g. weight_decay=1e-4) or drop {option}"
            )
    if not isinstance(bypass_duplicate, bool):
        raise TypeError(f"{where}: bypass_duplicate must be a bool, got {bypass_duplicate!r}")

    custom: dict[str, dict[str, Any]] = {}
    if custom_keys is not None:
        if not isinstance(custom_keys, Mapping):
            raise TypeError(f"{where}: custom_keys must be a dict {{name substring: dict(lr_mult=..., decay_mult=...)}}, got {custom_keys!r}")
        for key, cfg in custom_keys.items():
            opt = f"custom_keys[{key!r}]"
            if not isinstance(key, str):
                raise TypeError(f"{where}: custom_keys keys must be strings (substrings of param names), got {key!r}")
            if not isinstance(cfg, Mapping):
                raise TypeError(f"{where}: {opt} must be a dict like dict(lr_mult=0.1, decay_mult=0.0), got {cfg!r}")
            for bad in ("lr", "weight_decay", "params"):
                if bad in cfg:
                    hint = {"lr": "lr_mult", "weight_decay": "decay_mult"}.get(bad)
                    raise ValueError(
                        f"{where}: {opt} sets {bad!r}={cfg[bad]!r}; "
                        + (f"give {hint} (relative to the base {bad}) instead" if hint else "it names params by key, not by a list")
                    )
            for m in ("lr_mult", "decay_mult"):
                if m in cfg:
                    _check_mult(where, f"{opt}[{m!r}]", cfg[m])
            if "decay_mult" in cfg and no_wd:
                raise ValueError(
                    f"{where}: {opt}['decay_mult']={cfg['decay_mult']!r} scales the weight decay, but weight_decay "
                    "is 0; give the base weight_decay (e.g. weight_decay=1e-4) or drop decay_mult"
                )
            custom[key] = dict(cfg)
    sorted_keys = sorted(sorted(custom), key=len, reverse=True)

    settings: list[ParamSetting] = []
    skipped: list[tuple[str, str]] = []
    seen: dict[int, str] = {}

    def visit(module: nn.Module, prefix: str, under_dcn: bool) -> None:
        is_norm = isinstance(module, _NORM_TYPES)
        is_dwconv = isinstance(module, nn.Conv2d) and module.in_channels == module.groups
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
            settings.append(one(full, f"{prefix}.{local}", local, param, module, prefix, is_norm, is_dwconv, under_dcn))
        child_under_dcn = _is_dcn(module)
        for child_name, child in module.named_children():
            visit(child, f"{prefix}.{child_name}" if prefix else child_name, child_under_dcn)

    def one(full, match_name, local, param, module, prefix, is_norm, is_dwconv, under_dcn) -> ParamSetting:
        shape = tuple(param.shape)
        for key in sorted_keys:
            if key in match_name:
                cfg = custom[key]
                lm = cfg.get("lr_mult", 1.0)
                dm = cfg.get("decay_mult", 1.0)
                p_lr, p_wd = _scale(lr, lm), _scale(weight_decay, dm)
                logged = {"lr": p_lr, "weight_decay": p_wd, **cfg}
                rule = f"custom_keys[{key!r}]"
                if not _aligned(key, match_name):
                    rule += " (substring inside a name component)"
                options = tuple((k, v) for k, v in cfg.items() if k not in ("lr_mult", "decay_mult"))
                return ParamSetting(full, shape, float(lm), float(dm), p_lr, p_wd, rule, None, options, tuple(logged.items()))
        lm, dm = 1.0, 1.0
        lr_rule, wd_rule = None, None
        logged: dict[str, Any] = {}
        if local == "bias" and not (is_norm or under_dcn) and bias_lr_mult is not None:
            lm, lr_rule = bias_lr_mult, "bias_lr_mult"
            logged["lr"] = _scale(lr, lm)
        if "conv_offset" in prefix and under_dcn and dcn_offset_lr_mult is not None and isinstance(module, nn.Conv2d):
            lm, lr_rule = dcn_offset_lr_mult, "dcn_offset_lr_mult"
            logged["lr"] = _scale(lr, lm)
        if is_norm and norm_decay_mult is not None:
            dm, wd_rule = norm_decay_mult, "norm_decay_mult"
        elif local == "bias" and not under_dcn and bias_decay_mult is not None:
            dm, wd_rule = bias_decay_mult, "bias_decay_mult"
        elif is_dwconv and dwconv_decay_mult is not None:
            dm, wd_rule = dwconv_decay_mult, "dwconv_decay_mult"
        elif param.ndim == 1 and not under_dcn and flat_decay_mult is not None:
            dm, wd_rule = flat_decay_mult, "flat_decay_mult"
        if wd_rule is not None:
            logged["weight_decay"] = _scale(weight_decay, dm)
        p_lr = _scale(lr, lm) if lr_rule else lr
        p_wd = _scale(weight_decay, dm) if wd_rule else weight_decay
        rule = " + ".join(r for r in (lr_rule, wd_rule) if r) or "default"
        return ParamSetting(full, shape, float(lm), float(dm), p_lr, p_wd, rule, None, (), tuple(logged.items()))

    visit(model, "", False)
    return ParamGroups(tuple(settings), tuple(skipped), lr, weight_decay, "paramwise")


# ---------------------------------------------------------------- layer decay
_CONVNEXT_TOKENS = ("backbone.cls_token", "backbone.mask_token", "backbone.pos_embed")


def _convnext_stage(name: str, index: int, where: str) -> int:
    parts = name.split(".")
    try:
        value = int(parts[index])
    except (IndexError, ValueError):
        raise ValueError(f"{where}: cannot read a ConvNeXt stage/block index from {name!r}") from None
    return value


def convnext_layer_id(name: str, num_layers: int) -> int:
    """MMDet's ``get_layer_id_for_convnext``: the layer id of a param of a ConvNeXt-backboned model.

    ``num_layers`` is the configured number (the max id of the backbone); the
    neck/head get ``num_layers + 1``.
    """
    where = "layer_decay(layer_id='convnext')"
    if name in _CONVNEXT_TOKENS:
        return 0
    if name.startswith("backbone.downsample_layers"):
        stage = _convnext_stage(name, 2, where)
        ids = {0: 0, 1: 2, 2: 3, 3: num_layers}
    elif name.startswith("backbone.stages"):
        stage = _convnext_stage(name, 2, where)
        block = _convnext_stage(name, 3, where)
        ids = {0: 1, 1: 2, 2: 3 + block // 3, 3: num_layers}
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
        return _convnext_stage(name, 2, "layer_decay(layer_id='convnext', decay_type='stage_wise')") + 1
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

    Args:
      layer_id: ``"convnext"`` (MMDet's ConvNeXt rules, by ``decay_type``), or a
        function ``name -> layer id`` for any other model.
      decay_type: ``"layer_wise"`` (ids 0 .. num_layers+1 by block) or
        ``"stage_wise"`` (id = stage + 1); only for ``layer_id="convnext"``.
    """
    where = "layer_decay"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{where}: model must be an nn.Module, got {type(model).__name__}")
    _check_base(where, lr, weight_decay)
    if isinstance(decay_rate, bool) or not isinstance(decay_rate, numbers.Real) or not (0 < decay_rate < math.inf):
        raise ValueError(f"{where}: decay_rate must be a number > 0, got {decay_rate!r}")
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 0:
        raise ValueError(f"{where}: num_layers must be an int >= 0, got {num_layers!r}")
    if decay_type not in ("layer_wise", "stage_wise"):
        raise ValueError(f"{where}: decay_type must be 'layer_wise' or 'stage_wise', got {decay_type!r}")
    n = num_layers + 2
    if callable(layer_id):
        if decay_type != "layer_wise":
            raise ValueError(f"{where}: decay_type={decay_type!r} picks a built-in layer_id rule; a layer_id function gives the ids itself")
        id_fn = layer_id
        id_name = getattr(layer_id, "__name__", repr(layer_id))
    elif layer_id == "convnext":
        if decay_type == "layer_wise":
            def id_fn(name):
                return convnext_layer_id(name, num_layers)
        else:
            def id_fn(name):
                return convnext_stage_id(name, n)
        id_name = f"convnext {decay_type}"
    else:
        raise ValueError(f"{where}: layer_id must be 'convnext' or a function name -> int, got {layer_id!r}")

    settings: list[ParamSetting] = []
    skipped: list[tuple[str, str]] = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            skipped.append((name, "requires_grad=False"))
            continue
        lid = id_fn(name)
        if isinstance(lid, bool) or not isinstance(lid, int):
            raise TypeError(f"{where}: layer_id {id_name}({name!r}) returned {lid!r}, expected an int")
        if not 0 <= lid <= n - 1:
            warnings.warn(
                f"{where}: {name!r} has layer id {lid}, outside 0..{n - 1} (num_layers + 1), so its lr scale "
                f"{decay_rate}**{n - lid - 1} = {decay_rate ** (n - lid - 1):.6g}; MMDet does the same. "
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
        scale = decay_rate ** (n - lid - 1)
        p_lr = _scale(lr, scale) if callable(lr) else scale * lr  # MMDet: scale * base_lr
        dm = 0.0 if no_decay else 1.0
        p_wd = 0.0 if no_decay else weight_decay
        group = f"layer_{lid}_{'no_decay' if no_decay else 'decay'}"
        rule = f"layer {lid}: lr_scale={decay_rate}**{n - lid - 1}, {no_decay or 'decay'}"
        logged = (("lr", p_lr), ("weight_decay", p_wd), ("lr_scale", scale), ("group_name", group))
        settings.append(ParamSetting(name, tuple(param.shape), float(scale), dm, p_lr, p_wd, rule, group, (), logged))

    if layer_id == "convnext" and settings and not any(
        s.name in _CONVNEXT_TOKENS or s.name.startswith(("backbone.downsample_layers", "backbone.stages")) for s in settings
    ):
        raise ValueError(
            f"{where}: layer_id='convnext' expects ConvNeXt param names (backbone.downsample_layers.S..., "
            f"backbone.stages.S.B...), but none of the model's params match (e.g. {settings[0].name!r}); "
            "pass layer_id=<function name -> int> for other models"
        )
    return ParamGroups(tuple(settings), tuple(skipped), lr, weight_decay, f"layer_decay({id_name}, decay_rate={decay_rate}, num_layers={num_layers})")
