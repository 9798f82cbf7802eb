"""Weight initialisers with MMEngine's ``init_cfg`` semantics, drawn from the run's seed.

Call `apply` on the module before building the state; it fills the module's params
in place and returns an `InitReport` of which initialiser wrote which parameter::

    report = init.apply(model, [init.Kaiming(layer=nn.Conv2d), init.Normal(layer="Linear", std=0.01)], seed=0)
    print(report)                      # MMEngine's "name - shape: initialiser" listing
    state = step.init(model, seed=0)   # the state copies the initialised params

Initialise once, when the run starts; a resumed run takes its weights from the
checkpoint (MMEngine's runner also initialises before it loads).

Specs are frozen dataclasses named as MMEngine's ``type`` strings: `Constant`,
`Xavier`, `Normal`, `TruncNormal`, `Uniform`, `Kaiming`, `Caffe2Xavier`,
`Pretrained`. MMEngine dicts (``dict(type="Kaiming", layer="Conv2d")``) are accepted
too (`from_cfg`). Semantics, as MMEngine 0.10.7's ``initialize``:

* ``layer=`` (a class name, a class, or a list of them) selects every submodule whose
  class, or one of its direct bases, matches; a spec without ``layer`` initialises
  nothing by itself (only its ``override``s). A ``layer`` that selects no module (a typo,
  ``"linear"``) raises before anything is written (MMEngine skips it silently); in a
  scope of a mapping (below) it warns, as a nested module's default ``init_cfg`` may name
  a layer that module lacks.
* a selected module's ``weight`` gets the distribution and its ``bias`` the constant
  ``bias`` (``bias_prob=p`` sets it to ``-log((1 - p) / p)``, `bias_init_with_prob`).
* ``override={"name": spec}`` then re-initialises the whole submodule ``name`` (every
  module in it with a weight / bias, ``layer`` ignored); ``{"name": None}`` reuses the
  parent spec. Specs apply in order, each followed by its overrides.
* `Pretrained` loads weights with `fengine.checkpoint.load_params` (safetensors,
  fengine checkpoints, ``.pth`` read with ``weights_only=True``; non-strict, ``prefix``
  selects and strips a submodule's keys) and runs after the other specs of its scope.
* ``apply(model, {"": [...], "backbone": [...]})`` gives specs per submodule, like
  ``init_cfg`` on nested BaseModules: a scope's specs, then its sub-scopes', then its
  `Pretrained` specs (BaseModule.init_weights' order).

Randomness: each weight is drawn on the CPU from its own generator, seeded with
``fold_in(seed, tag, crc32(parameter name))``, then copied to the param's device. The name
is the one ``named_parameters()`` gives (a shared module's first), less torch.compile's
``_orig_mod.`` or DDP's ``module.``. A weight's draws thus depend only on the seed and its
name: not on the device, a wrapper, a second parent, nor on the other layers (adding a
layer changes no other). ``generator=`` draws everything from one
generator in MMEngine's order instead; with ``torch.Generator().manual_seed(k)`` the
values equal MMEngine's ``initialize`` after ``torch.manual_seed(k)``, bit for bit.

`TruncNormal` uses MMEngine's inverse-CDF sampler (``mmengine...trunc_normal_``, one
uniform draw per element), not torch 2.13's rejection sampler: same distribution,
MMEngine's bits for float32 / float64 weights except at the uniform's endpoint -1 (about 1
in 2**24 float32 draws when ``a`` is far below the mean): MMEngine's ``erfinv(-1) = -inf``
puts the weight at ``a`` (-2: 100 std at std=0.02), here the uniform stays inside (-1, 1)
(-5.4 std). bf16 / fp16 weights get the float32 draw, rounded: MMEngine draws in their
dtype, which rounds values near ±1 to ±1, putting thousands of a layer's weights at ``a``
or ``b`` (``generator=`` differs from MMEngine there).

The report is exact (it records every write), where MMEngine infers it from a change of
the parameter's mean: a bias reset to the same 0 by an override is reported as MMEngine's
earlier initialiser there, as the override here.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import sys
import warnings
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn

from fengine.checkpoint import CheckpointError, load_params
from fengine.rng import fold_in


log = logging.getLogger("fengine")

__all__ = [
    "Caffe2Xavier",
    "Constant",
    "InitReport",
    "Kaiming",
    "Normal",
    "Pretrained",
    "Spec",
    "TruncNormal",
    "Uniform",
    "Xavier",
    "apply",
    "bias_init_with_prob",
    "from_cfg",
    "trunc_normal_",
]

_TAG = zlib.crc32(b"fengine.init")
LayerSel = str | type | Sequence[str | type]


def bias_init_with_prob(prior_prob: float) -> float:
    """The bias whose sigmoid is ``prior_prob`` (MMEngine's ``bias_init_with_prob``)."""
    if not 0 < prior_prob < 1:
        raise ValueError(f"bias_prob must be in (0, 1), got {prior_prob!r}")
    return float(-math.log((1 - prior_prob) / prior_prob))


def trunc_normal_(
    t: torch.Tensor,
    mean: float = 0.0,
    std: float = 1.0,
    a: float = -2.0,
    b: float = 2.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """MMEngine's truncated normal: uniform in CDF space, inverse CDF, clamp to ``[a, b]``.

    Unlike MMEngine's, the uniform is drawn in float32 at least and kept strictly inside
    (-1, 1): ``erfinv(±1) = ±inf``, clamped, put weights at ``a`` / ``b`` (-2 / 2: 100 std at
    std=0.02); a float32 draw hits -1 about once in 2**24, a bf16 / fp16 one rounds thousands
    of values near ±1 to ±1. A float32 / float64 tensor gets MMEngine's bits except at that
    endpoint; a bf16 / fp16 one the float32 draw, rounded.
    """

    def cdf(x: float) -> float:
        return (1.0 + math.erf(x / math.sqrt(2.0))) / 2.0

    if not t.is_floating_point():
        raise ValueError(f"trunc_normal_: needs a floating-point tensor, got {t.dtype}")
    lo, hi = cdf((a - mean) / std), cdf((b - mean) / std)
    work = torch.promote_types(t.dtype, torch.float32)  # float64 stays float64
    edge = 1 - torch.finfo(work).eps / 2  # the largest float below 1
    with torch.no_grad():
        u = t if work == t.dtype else torch.empty_like(t, dtype=work)  # keeps the layout
        u.uniform_(2 * lo - 1, 2 * hi - 1, generator=generator).clamp_(-edge, edge)
        u.erfinv_().mul_(std * math.sqrt(2.0)).add_(mean).clamp_(min=a, max=b)
        if u is not t:
            t.copy_(u)
    return t


# ---------------------------------------------------------------------------- specs


@dataclass(frozen=True, kw_only=True)
class _Init:
    """Fields every weight initialiser takes (MMEngine's BaseInit)."""

    bias: float = 0
    bias_prob: float | None = None
    layer: LayerSel = ()
    override: Mapping[str, Spec | None] = field(default_factory=dict)

    def __post_init__(self) -> None:
        name = type(self).__name__
        for f in dataclasses.fields(self):  # the numbers: checked here, not at the first apply
            value = getattr(self, f.name)
            if f.type != "float":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name}: {f.name} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"{name}: {f.name} must be finite, got {value!r}")
        if self.bias_prob is not None:
            bias_init_with_prob(self.bias_prob)  # validates
        sel = () if self.layer is None else self.layer  # MMEngine: layer=None selects no class
        layers = (sel,) if isinstance(sel, (str, type)) else tuple(cast(Sequence, sel))
        for x in layers:
            if not isinstance(x, (str, type)):
                raise TypeError(
                    f"{name}: layer must be a class name, a module class or a list of them, got {x!r}"
                )
        object.__setattr__(self, "layer", layers)
        if not isinstance(self.override, Mapping):
            raise TypeError(
                f"{name}: override must be a mapping submodule name -> spec (or None), got {self.override!r}"
            )
        for key, sub in self.override.items():
            if sub is not None and not isinstance(sub, (_Init, Pretrained)):
                raise TypeError(f"{name}: override[{key!r}] must be a spec or None, got {sub!r}")
            if isinstance(sub, _Init) and sub.override:
                raise ValueError(f"{name}: override[{key!r}] has its own override (not allowed)")

    @property
    def bias_value(self) -> float:
        return self.bias if self.bias_prob is None else bias_init_with_prob(self.bias_prob)

    def matches(self, m: nn.Module) -> bool:
        """MMEngine's rule: the module's class or one of its direct bases is in ``layer``."""
        cls = type(m)
        for x in cast(tuple, self.layer):  # a tuple after __post_init__
            if isinstance(x, str):
                if x == cls.__name__ or any(x == b.__name__ for b in cls.__bases__):
                    return True
            elif x is cls or x in cls.__bases__:
                return True
        return False

    def fill(self, w: torch.Tensor, g: torch.Generator | None) -> None:
        raise NotImplementedError

    def info(self) -> str:
        """MMEngine's init-info string for this initialiser."""
        raise NotImplementedError


@dataclass(frozen=True, kw_only=True)
class Constant(_Init):
    """Weight = ``val``, bias = ``bias``."""

    val: float

    def fill(self, w: torch.Tensor, g: torch.Generator | None) -> None:
        nn.init.constant_(w, self.val)

    def info(self) -> str:
        return f"ConstantInit: val={self.val}, bias={self.bias_value}"


def _check_choice(spec: object, name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{type(spec).__name__}: {name} must be one of {choices}, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class Xavier(_Init):
    """Glorot & Bengio (2010): ``xavier_normal_`` / ``xavier_uniform_`` with ``gain``."""

    gain: float = 1
    distribution: str = "normal"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_choice(self, "distribution", self.distribution, ("normal", "uniform"))

    def fill(self, w: torch.Tensor, g: torch.Generator | None) -> None:
        f = nn.init.xavier_uniform_ if self.distribution == "uniform" else nn.init.xavier_normal_
        f(w, gain=self.gain, generator=g)

    def info(self) -> str:
        return (
            f"XavierInit: gain={self.gain}, distribution={self.distribution}, "
            f"bias={self.bias_value}"
        )


@dataclass(frozen=True, kw_only=True)
class Normal(_Init):
    """Weight ~ N(mean, std²)."""

    mean: float = 0
    std: float = 1

    def fill(self, w: torch.Tensor, g: torch.Generator | None) -> None:
        nn.init.normal_(w, self.mean, self.std, generator=g)

    def info(self) -> str:
        return f"NormalInit: mean={self.mean}, std={self.std}, bias={self.bias_value}"


@dataclass(frozen=True, kw_only=True)
class TruncNormal(_Init):
    """Weight ~ N(mean, std²) truncated to ``[a, b]`` (MMEngine's sampler, `trunc_normal_`)."""

    mean: float = 0
    std: float = 1
    a: float = -2
    b: float = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (self.std > 0 and self.a < self.b):
            raise ValueError(f"TruncNormal: need std > 0 and a < b, got {self}")
        if self.mean < self.a - 2 * self.std or self.mean > self.b + 2 * self.std:
            warnings.warn(  # MMEngine's warning
                "TruncNormal: mean is more than 2 std from [a, b]; "
                "the distribution of values may be incorrect.",
                stacklevel=3,
            )

    def fill(self, w: torch.Tensor, g: torch.Generator | None) -> None:
        trunc_normal_(w, self.mean, self.std, self.a, self.b, generator=g)

    def info(self) -> str:
        return (
            f"TruncNormalInit: a={self.a}, b={self.b}, mean={self.mean}, std={self.std}, "
            f"bias={self.bias_value}"
        )


@dataclass(frozen=True, kw_only=True)
class Uniform(_Init):
    """Weight ~ U(a, b)."""

    a: float = 0
    b: float = 1

    def fill(self, w: torch.Tensor, g: torch.Generator | None) -> None:
        nn.init.uniform_(w, self.a, self.b, generator=g)

    def info(self) -> str:
        return f"UniformInit: a={self.a}, b={self.b}, bias={self.bias_value}"


@dataclass(frozen=True, kw_only=True)
class Kaiming(_Init):
    """He et al. (2015): ``kaiming_normal_`` / ``kaiming_uniform_`` (MMEngine's defaults:
    ``mode="fan_out"``, ``nonlinearity="relu"``, normal)."""

    a: float = 0
    mode: str = "fan_out"
    nonlinearity: str = "relu"
    distribution: str = "normal"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_choice(self, "mode", self.mode, ("fan_in", "fan_out"))
        _check_choice(self, "distribution", self.distribution, ("normal", "uniform"))
        try:  # torch's own list of nonlinearities (it raised only at the first apply)
            nn.init.calculate_gain(self.nonlinearity, self.a)  # type: ignore[arg-type]
        except ValueError as e:
            raise ValueError(f"{type(self).__name__}: nonlinearity: {e}") from None

    def fill(self, w: torch.Tensor, g: torch.Generator | None) -> None:
        f = nn.init.kaiming_uniform_ if self.distribution == "uniform" else nn.init.kaiming_normal_
        f(w, a=self.a, mode=self.mode, nonlinearity=self.nonlinearity, generator=g)  # type: ignore[arg-type]

    def info(self) -> str:
        return (
            f"{type(self).__name__}Init: a={self.a}, mode={self.mode}, "
            f"nonlinearity={self.nonlinearity}, distribution ={self.distribution}, "
            f"bias={self.bias_value}"
        )


@dataclass(frozen=True, kw_only=True)
class Caffe2Xavier(Kaiming):
    """Caffe2's XavierFill = ``kaiming_uniform_(a=1, mode="fan_in", nonlinearity="leaky_relu")``."""

    a: float = 1
    mode: str = "fan_in"
    nonlinearity: str = "leaky_relu"
    distribution: str = "uniform"


@dataclass(frozen=True)
class Pretrained:
    """Load weights from ``checkpoint`` (non-strict; ``prefix="backbone."`` loads the file's
    ``backbone.*`` keys, stripped, into the module). Local files only (no URLs)."""

    checkpoint: str | os.PathLike
    prefix: str | None = None

    def __post_init__(self) -> None:
        if "://" in str(self.checkpoint):
            raise ValueError(
                f"Pretrained: {self.checkpoint!r} is a URL; fengine downloads nothing: download "
                "the file and give its path"
            )

    def info(self) -> str:
        return f"PretrainedInit: load from {self.checkpoint}"


Spec = Constant | Xavier | Normal | TruncNormal | Uniform | Kaiming | Caffe2Xavier | Pretrained
_TYPES: dict[str, type] = {
    c.__name__: c
    for c in (Constant, Xavier, Normal, TruncNormal, Uniform, Kaiming, Caffe2Xavier, Pretrained)
}


# ------------------------------------------------------------------ MMEngine dicts


def from_cfg(cfg: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> list[Spec]:
    """Specs from an MMEngine ``init_cfg`` (a dict or a list of dicts), for porting configs."""
    cfgs = [cfg] if isinstance(cfg, Mapping) else list(cfg)
    return [_one_cfg(c, where="init_cfg") for c in cfgs]


def _one_cfg(cfg: Mapping[str, Any], where: str) -> Spec:
    if not isinstance(cfg, Mapping):
        raise TypeError(f"{where}: expected a dict, got {cfg!r}")
    args = dict(cfg)
    kind = args.pop("type", None)
    cls = _TYPES.get(kind.removesuffix("Init") if isinstance(kind, str) else "")
    if cls is None:
        raise ValueError(f"{where}: type must be one of {sorted(_TYPES)}, got {kind!r} in {cfg}")
    if cls is Pretrained:
        args.pop("map_location", None)  # values go to the module's device
    override = args.pop("override", None)
    if override is not None:
        args["override"] = _override_cfg(override, cfg, where)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(args) - names)
    if unknown:
        raise TypeError(f"{where}: {kind} takes {sorted(names)}, got unknown keys {unknown}")
    try:
        return cls(**args)
    except TypeError as e:
        raise TypeError(f"{where}: {kind}{args}: {e}") from None


def _override_cfg(override: Any, parent: Mapping[str, Any], where: str) -> dict[str, Spec | None]:
    items = [override] if isinstance(override, Mapping) else override
    if not isinstance(items, Sequence):
        raise TypeError(f"{where}: override must be a dict or a list of dicts, got {override!r}")
    out: dict[str, Spec | None] = {}
    for o in items:
        if not isinstance(o, Mapping):
            raise TypeError(
                f"{where}: override must be a dict or a list of dicts, got {override!r}"
            )
        o = dict(o)
        name = o.pop("name", None)
        if name is None:
            raise ValueError(f'{where}: override must contain the key "name", got {o}')
        if not o:
            out[name] = None  # MMEngine: only a name reuses the parent's args
        elif "type" not in o:
            raise ValueError(f'{where}: override {name!r} needs a "type" key, got {o}')
        else:
            out[name] = _one_cfg(o, where=f"{where}.override[{name!r}]")
    return out


# ----------------------------------------------------------------------- the report


@dataclass(frozen=True)
class InitReport:
    """Which initialiser wrote each parameter, in order (empty: left as it was)."""

    writes: dict[str, tuple[str, ...]]
    shapes: dict[str, tuple[int, ...]]

    def last(self, name: str) -> str | None:
        """The initialiser that wrote ``name`` last (None: untouched)."""
        w = self.writes[name]
        return w[-1] if w else None

    def __str__(self) -> str:
        lines = ["Name of parameter - Initialization information"]
        for name, w in self.writes.items():
            lines.append(f"\n{name} - {torch.Size(self.shapes[name])}: ")
            lines.append(w[-1] if w else "The value is the same before and after init.apply")
        return "\n".join(lines)


# --------------------------------------------------------------------- application


class _Run:
    """One `apply`: the root's parameter names, the generators and the write log."""

    def __init__(self, model: nn.Module, seed: int, generator: torch.Generator | None):
        self.seed, self.generator = seed, generator
        self.writes: dict[str, list[str]] = {n: [] for n, _ in model.named_parameters()}
        # a param reached through another path (a shared submodule) is reported under its name
        self.names = {id(p): n for n, p in model.named_parameters()}
        self.wrapper = _wrapper_prefix(model)

    def gen(self, w: torch.Tensor, path: str) -> torch.Generator:
        """The weight's generator: keyed by its canonical name (its first name in
        ``named_parameters()``, less a torch.compile / DDP wrapper's prefix), not by the path
        that reached it, so neither a second parent of a shared module nor a wrapper changes it."""
        if self.generator is not None:
            return self.generator
        name = self.names.get(id(w), path).removeprefix(self.wrapper)
        g = torch.Generator()
        g.manual_seed(fold_in(self.seed, _TAG, zlib.crc32(name.encode())))
        return g

    def record(self, tensor: torch.Tensor, info: str) -> None:
        name = self.names.get(id(tensor))
        if name is not None:
            self.writes[name].append(info)


def _wrapper_prefix(model: nn.Module) -> str:
    """The prefix wrappers add to every name: ``_orig_mod.`` (torch.compile), ``module.`` (DDP)."""
    # torch.compile's class, only if torch.compile ran (importing torch._dynamo takes seconds)
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    compiled = getattr(eval_frame, "OptimizedModule", ())
    prefix = ""
    while True:
        if isinstance(model, compiled):
            prefix, model = prefix + "_orig_mod.", model._orig_mod
        elif isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            prefix, model = prefix + "module.", model.module
        else:
            return prefix


def _post_order(m: nn.Module, prefix: str) -> Iterator[tuple[str, nn.Module]]:
    """Modules in ``nn.Module.apply``'s order (children first), with their full names."""
    for name, child in m.named_children():
        yield from _post_order(child, f"{prefix}{name}.")
    yield prefix, m


def _fill_module(spec: _Init, m: nn.Module, prefix: str, run: _Run) -> None:
    w, b = getattr(m, "weight", None), getattr(m, "bias", None)
    if isinstance(w, torch.Tensor):
        name = prefix + "weight"
        # drawn on the CPU: the same on every device. With one generator (MMEngine's order) in
        # the weight's own layout, as MMEngine draws in place (a channels_last conv differs);
        # per-name keys draw contiguously, so their values do not depend on the layout
        if run.generator is not None:
            tmp = torch.empty_like(w, device="cpu")
        else:
            tmp = torch.empty(w.shape, dtype=w.dtype)
        try:
            spec.fill(tmp, run.gen(w, name))
        except (ValueError, RuntimeError) as e:
            raise ValueError(f"init: {type(spec).__name__} on {name} {tuple(w.shape)}: {e}") from e
        w.copy_(tmp)
        run.record(w, spec.info())
    if isinstance(b, torch.Tensor):
        nn.init.constant_(b, spec.bias_value)
        run.record(b, spec.info())


def _run_spec(spec: Spec, module: nn.Module, prefix: str, run: _Run, whole: bool) -> None:
    if isinstance(spec, Pretrained):
        _load(spec, module, prefix, run)
        return
    for name, m in _post_order(module, prefix):
        if whole or spec.matches(m):
            _fill_module(spec, m, name, run)
    for sub_name, sub in spec.override.items():
        try:
            target = module.get_submodule(sub_name)
        except AttributeError:
            raise ValueError(
                f"init: override names {sub_name!r}, which {prefix or 'the model'} does not have "
                f"(its children: {[n for n, _ in module.named_children()]})"
            ) from None
        if sub is None:  # the parent's args, on the whole submodule
            sub = dataclasses.replace(spec, layer=(), override={})
        _run_spec(sub, target, f"{prefix}{sub_name}.", run, whole=True)


def _check_selects(spec: Spec, module: nn.Module, scope: str, strict: bool) -> None:
    """A ``layer`` that matches no module initialised nothing, silently. A name no module class
    has (a typo, ``"linear"``) raises before anything is written (``strict``; a scope of a
    mapping warns); a class this model lacks warns (MMEngine skips it: a model's default
    ``init_cfg`` may name ``_BatchNorm`` for a variant built without one)."""
    if not isinstance(spec, _Init) or not spec.layer:
        return
    if any(spec.matches(m) for m in module.modules()):
        return
    given = cast(tuple, spec.layer)
    layers = [x if isinstance(x, str) else x.__name__ for x in given]
    unknown = [x for x in given if isinstance(x, str) and x not in _module_class_names()]
    msg = (
        f"init: {type(spec).__name__}(layer={layers}) selects no module of "
        f"{scope or 'the model'}: layer names a module class or a direct base (case-sensitive); "
        f"its module classes are {sorted({type(m).__name__ for m in module.modules()})}"
    )
    if strict and unknown:
        raise ValueError(f"{msg}; no module class is named {unknown}")
    warnings.warn(msg, UserWarning, stacklevel=3)


def _module_class_names() -> set[str]:
    """The names of every `nn.Module` subclass defined so far (torch's and the user's)."""
    seen: set[type] = set()
    todo = [nn.Module]
    while todo:
        for sub in todo.pop().__subclasses__():
            if sub not in seen:
                seen.add(sub)
                todo.append(sub)
    return {cls.__name__ for cls in seen}


def _load(spec: Pretrained, module: nn.Module, at: str, run: _Run) -> None:
    prefix = spec.prefix
    if prefix and not prefix.endswith("."):
        prefix += "."  # MMEngine: "backbone" means "backbone."
    prefix_map = {prefix: ""} if prefix else None
    state_dict, report = load_params(
        spec.checkpoint, module, prefix_map=prefix_map, allow_empty=True
    )
    if not report.loaded:
        raise CheckpointError(
            f"init: Pretrained({str(spec.checkpoint)!r}, prefix={spec.prefix!r}) into "
            f"{at or 'the model'} loads nothing: no weight of the file"
            f"{' under ' + repr(prefix) if prefix else ''} is named as one of the module's; "
            f"{report}"
        )
    module.load_state_dict(cast(dict, state_dict))
    if not report.ok:  # MMEngine logs the size mismatches and missing keys of a Pretrained
        log.warning(
            "init: Pretrained(%r) into %s: %s", str(spec.checkpoint), at or "the model", report
        )
    params = dict(module.named_parameters(remove_duplicate=False))
    for n in report.loaded:
        if n in params:
            run.record(params[n], spec.info())


SpecLike = Spec | Mapping[str, Any]


def _specs(x: SpecLike | Sequence[SpecLike], where: str) -> list[Spec]:
    items = [x] if isinstance(x, (Mapping, _Init, Pretrained)) else list(x)
    out: list[Spec] = []
    for i, s in enumerate(items):
        if isinstance(s, Mapping):
            out.append(_one_cfg(s, where=f"{where}[{i}]"))
        elif isinstance(s, (_Init, Pretrained)):
            out.append(s)
        else:
            raise TypeError(f"{where}[{i}]: expected an init spec or an init_cfg dict, got {s!r}")
    return out


def apply(
    model: nn.Module,
    specs: SpecLike | Sequence[SpecLike] | Mapping[str, SpecLike | Sequence[SpecLike]],
    *,
    seed: int = 0,
    generator: torch.Generator | None = None,
) -> InitReport:
    """Initialise ``model``'s params in place by ``specs``; return who wrote what.

    Args:
      model: the module (its params are filled in place, under ``no_grad``).
      specs: a spec, an MMEngine ``init_cfg`` dict, a list of them, or a mapping
        submodule name -> those (``""``: the model itself) for per-submodule specs.
      seed: the run's seed; each weight's values derive from it and the weight's name.
      generator: draw everything from this CPU generator, in MMEngine's order
        (bitwise MMEngine after ``torch.manual_seed``) instead of per-name keys.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"init.apply: model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
        raise ValueError(  # 1.5, "7", True, 2**64 were folded into the same keys as 1, 7, 1, 0
            f"init.apply: seed must be a non-negative int below 2**63, got {seed!r}"
        )
    if generator is not None and generator.device.type != "cpu":
        raise ValueError(f"init.apply: generator must be a CPU generator, got {generator.device}")
    if isinstance(specs, Mapping) and "type" not in specs:
        odd = [k for k, v in specs.items() if isinstance(v, (str, bytes, int, float))]
        if odd:  # e.g. dict(layer="Linear", val=1): an init_cfg dict that lost its "type"
            raise ValueError(
                f"init.apply: specs {dict(specs)} has no 'type', so it reads as submodule name -> "
                f"specs, but specs[{odd[0]!r}] is {specs[odd[0]]!r}; an init_cfg dict needs "
                f"'type' (one of {sorted(_TYPES)})"
            )
        scopes = {k: _specs(v, where=f"init.apply specs[{k!r}]") for k, v in specs.items()}
        strict = False  # nested init_cfg: a default may name a layer its scope lacks
    else:
        scopes = {"": _specs(specs, where="init.apply specs")}
        strict = True
    for name, scope_specs in scopes.items():
        try:
            scope = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"init.apply: the model has no submodule {name!r}") from None
        for s in scope_specs:
            _check_selects(s, scope, name, strict)
    run = _Run(model, seed, generator)

    def visit(module: nn.Module, name: str) -> None:
        own = scopes.get(name, [])
        prefix = f"{name}." if name else ""
        for s in own:
            if not isinstance(s, Pretrained):
                _run_spec(s, module, prefix, run, whole=False)
        for child_name, child in module.named_children():
            visit(child, f"{prefix}{child_name}")
        for s in own:
            if isinstance(s, Pretrained):
                _run_spec(s, module, prefix, run, whole=False)

    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    with torch.no_grad():
        visit(model, "")
    return InitReport({n: tuple(w) for n, w in run.writes.items()}, shapes)
