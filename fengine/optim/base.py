"""Gradient transformations: the optax protocol, adapted to eager PyTorch.

A `GradientTransformation` is a pair of functions

    init(params) -> state
    update(grads, state, params=None, *, step=None) -> (updates, state)

over ordered ``name -> tensor`` dicts. Optimizers add a third, ``apply``, which
writes the update into the params in place with the exact op sequence of the
matching ``torch.optim`` foreach kernel (``addcdiv_`` and friends), so results
are bitwise those of torch; a separate ``update`` + ``params += updates`` would
round differently.

Like JAX donation, these functions may update ``state`` (and, for ``apply``,
``params``) in place and return them: callers that need the old values pass
copies (`TrainState` steps built with ``donate=False`` do). They run under
``torch.no_grad()``. ``step`` is the global step (counted even when an fp16
update is skipped), so schedules follow it the way torch/MMEngine schedulers do.
"""

from __future__ import annotations

import functools
import inspect
import operator
import weakref
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, Protocol

import torch


__all__ = [
    "EmptyState",
    "GradientTransformation",
    "Hyper",
    "PartitionState",
    "apply_updates",
    "chain",
    "collect_metrics",
    "hyperparams",
    "identity",
    "missing_optimizer",
    "partition",
    "report_at",
    "resolve",
    "set_to_zero",
    "step_params",
]

Params = dict[str, torch.Tensor]
Updates = dict[str, torch.Tensor]
Hyper = float | Callable[[int], float]
"""A hyper-parameter: a number, or a schedule ``step -> value`` (see `fengine.schedules`)."""


class UpdateFn(Protocol):
    def __call__(
        self, grads: Updates, state: Any, params: Params | None = None, *, step: int | None = None
    ) -> tuple[Updates, Any]: ...


class ApplyFn(Protocol):
    def __call__(
        self, grads: Updates, state: Any, params: Params, *, step: int | None = None
    ) -> tuple[Params, Any]: ...


class GradientTransformation(NamedTuple):
    """``init`` and ``update`` (and, for optimizers, a fused in-place ``apply``).

    ``report(state, step)``: the state with the hyper-parameters it reports (``lr``,
    ``momentum``) at ``step`` and nothing else changed (None: it reports none that move). An
    update that is skipped (a param group without gradients, an fp16 overflow) still reports
    the scheduled values, as MMEngine's schedulers set a group's lr whether or not it steps.
    """

    init: Callable[[Params], Any]
    update: UpdateFn
    apply: ApplyFn | None = None
    report: Callable[[Any, Any], Any] | None = None

    def as_optimizer(self) -> GradientTransformation:
        """This transformation as an optimizer: its ``update`` already returns what to add to the
        params (optax's convention: the negated, lr-scaled step), so a step may end with it.

        A step refuses a ``tx`` that does not end in an optimizer (its output would be added to
        the params as is: a gradient trains uphill); a chain ending in ``scale(-lr)`` needs no
        mark. The result has an ``apply`` (``update``, then ``params += updates``), so nothing
        may follow it in a `chain`.
        """
        if self.apply is not None:
            return self
        update = with_step(self.update)

        def apply_fn(grads, state, params, *, step=None):
            updates, state = update(grads, state, params, step=step)
            return apply_updates(params, updates), state

        _marked.add(apply_fn)  # (its update may be a chain's: `missing_optimizer` asks this first)
        return self._replace(apply=apply_fn)


def report_at(tx: GradientTransformation, state: Any, step: Any) -> Any:
    """``tx``'s state with its reported hyper-parameters at ``step`` (`GradientTransformation`)."""
    return state if tx.report is None else tx.report(state, step)


class EmptyState(NamedTuple):
    """State of a stateless transformation."""


def resolve(value: Hyper, step: int | torch.Tensor | None) -> Any:
    """The value of a hyper-parameter at ``step`` (schedules are called, numbers returned).

    In a compiled step ``step`` is a 0-d tensor and a schedule's value is one too
    (`fengine.schedule_ops`); eager steps get Python floats.
    """
    if isinstance(step, torch.Tensor):
        from fengine.schedule_ops import value_at

        return value_at(value, step)
    if callable(value):
        if step is None:
            raise ValueError(
                "a scheduled hyper-parameter needs the global step: pass step=... to update/apply"
            )
        return float(value(step))
    return value


def resolver(*values: Hyper) -> Callable[[int | torch.Tensor | None], tuple[Any, ...]]:
    """``step -> tuple(resolve(v, step) for v in values)``, cheaper when none is a schedule (an
    eager step then gets the numbers themselves; they are resolved on every update)."""

    def every(step: int | torch.Tensor | None) -> tuple[Any, ...]:
        return tuple([resolve(v, step) for v in values])

    if any(callable(v) for v in values):
        return every
    constants = tuple(values)
    return lambda step: every(step) if isinstance(step, torch.Tensor) else constants


def check_hyper(
    name: str,
    value: Hyper,
    *,
    low: float = 0.0,
    high: float | None = None,
    where: str,
    schedule: bool = True,
) -> None:
    """Validate a number-or-schedule hyper-parameter up front (schedules are checked at step 0).

    ``schedule=False``: one the optimizer cannot schedule, which must be a plain number.
    """
    if callable(value) and not schedule:
        raise TypeError(
            f"{where}: {name} cannot be scheduled; expected a number, got the callable {value!r}"
        )
    probe = value(0) if callable(value) else value
    if not isinstance(probe, (int, float)) or isinstance(probe, bool):
        if callable(value):
            raise TypeError(
                f"{where}: the {name} schedule {value!r} returned {type(probe).__name__} "
                f"{probe!r} at step 0; a schedule returns a Python number (float(...) of a tensor)"
            )
        expected = "a number or a schedule step -> number" if schedule else "a number"
        raise TypeError(f"{where}: {name} must be {expected}, got {value!r}")
    # written so that NaN fails too (every comparison with it is False), as torch.optim refuses it
    if not probe >= low or (high is not None and not probe < high):
        bound = f"in [{low}, {high})" if high is not None else f">= {low}"
        raise ValueError(f"{where}: invalid {name} {probe!r}; expected a value {bound}")


@functools.lru_cache(maxsize=64)
def picker(names: tuple[str, ...]) -> Callable[[Mapping[str, Any]], list]:
    """``d -> [d[n] for n in names]`` in C (``operator.itemgetter``): optimizers pick their
    per-param lists from several dicts on every update."""
    if not names:
        return lambda d: []
    get = operator.itemgetter(*names)
    if len(names) == 1:
        return lambda d: [get(d)]
    return lambda d: list(get(d))


def pick(d: Mapping[str, Any], names: tuple[str, ...]) -> list:
    """``[d[n] for n in names]``, by a cached `picker` (a plain loop while dynamo traces: it
    calls no itemgetter, nor, quietly, an lru_cache)."""
    if torch.compiler.is_compiling():
        return [d[n] for n in names]
    return picker(names)(d)


def subset(d: Mapping[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    """``{n: d[n] for n in names}``, built in C (`pick`)."""
    return dict(zip(names, pick(d, names)))


def apply_updates(params: Params, updates: Updates) -> Params:
    """``params += updates`` in place (one foreach op); returns ``params``."""
    with torch.no_grad():
        torch._foreach_add_(pick(params, tuple(updates)), list(updates.values()))
    return params


def step_params(
    tx: GradientTransformation,
    grads: Updates,
    state: Any,
    params: Params,
    *,
    step: int | None = None,
) -> tuple[Params, Any]:
    """Update ``params`` with ``tx``: the fused ``apply`` when it has one, else update + add.

    With no gradient at all (``grads`` empty: a `fengine.multi_step` part whose loss reached
    none of its params) nothing is updated, as ``torch.optim``'s ``step()`` when every
    ``.grad`` is None: params and state as they were, no update counted (so no param's own
    count moves either), only the reported hyper-parameters moved to ``step`` (`report_at`).

    Grad mode is switched off by the flag itself, not a ``torch.no_grad()`` object: this
    runs on every step, and the object costs ~70 bytecodes to build, enter and leave."""
    if not grads:
        return params, report_at(tx, state, step)
    was_enabled = torch.is_grad_enabled()
    torch._C._set_grad_enabled(False)
    try:
        if tx.apply is not None:
            return tx.apply(grads, state, params, step=step)
        updates, state = tx.update(grads, state, params, step=step)
        return apply_updates(params, updates), state
    finally:
        torch._C._set_grad_enabled(was_enabled)


def update_via_apply(apply: ApplyFn) -> UpdateFn:
    """An ``update`` for an optimizer defined by its fused ``apply``: run it on copies, return the delta.

    Used only when an optimizer is not last in a chain; the delta is exact up to
    one rounding of ``new - old``.
    """

    def update_fn(grads, state, params=None, *, step=None):
        if params is None:
            raise ValueError("this optimizer needs params to compute updates")
        new = {n: params[n].detach().clone() for n in grads}
        new, state = apply(grads, state, new, step=step)
        return {n: new[n] - params[n] for n in grads}, state

    return update_fn


def with_step(update: Callable[..., Any]) -> UpdateFn:
    """``update`` as this module calls it, ``update(grads, state, params, step=step)``: itself
    when it takes ``step``, else a call without it (DESIGN's and optax's ``update(grads, state,
    params)``). Inspected once, when a transformation is composed, not at each update."""
    try:
        accepted = inspect.signature(update).parameters
    except (TypeError, ValueError):  # no signature to read (a builtin): assume it takes step
        return update
    step = accepted.get("step")
    if any(p.kind is p.VAR_KEYWORD for p in accepted.values()) or (
        step is not None and step.kind in (step.KEYWORD_ONLY, step.POSITIONAL_OR_KEYWORD)
    ):
        return update

    def without_step(grads, state, params=None, *, step=None):
        del step
        return update(grads, state, params)

    return without_step


# the parts of each `chain` / `partition`, by its update function (a NamedTuple holds no
# attributes): `missing_optimizer` follows them to what ends each path through a tx
_composed: weakref.WeakKeyDictionary[Callable[..., Any], tuple[str, Any]] = (
    weakref.WeakKeyDictionary()
)


# the ``apply`` of each `GradientTransformation.as_optimizer` result: an optimizer as marked
_marked: weakref.WeakSet[Callable[..., Any]] = weakref.WeakSet()


def _describe(tx: GradientTransformation) -> str:
    """``tx`` for an error message: the function that built it (``sgd(...)``), as far as known."""
    fn = tx.apply or tx.update
    name = getattr(fn, "__qualname__", type(fn).__name__).split(".<locals>")[0].lstrip("_")
    return f"{name}(...)" if name.isidentifier() else repr(fn)


def _ends_hand_made(tx: GradientTransformation) -> bool:
    """Whether ``tx`` is `fengine.optim.scale` / ``scale_by_schedule``: ``scale(-lr)`` last is
    a hand-made optimizer (optax's convention; its docstring says so)."""
    from fengine.optim.transforms import scale_by_schedule

    code = scale_by_schedule(1.0).update.__code__  # type: ignore[attr-defined]
    return getattr(tx.update, "__code__", None) is code


def missing_optimizer(tx: GradientTransformation) -> str | None:
    """What ends ``tx`` without an optimizer (one with ``apply``, or ``scale(-lr)`` last), or
    None when every path through it ends in one: a chain by its last transformation, a
    `partition` by each group's. A step adds what such a ``tx`` returns to the params as it
    is, which for a gradient (a clipped one, say) trains uphill."""
    if tx.apply is not None and tx.apply in _marked:
        return None
    kind, parts = _composed.get(tx.update, ("", ()))
    if kind == "wrap":  # a transformation around another (paramwise's base-lr report)
        return missing_optimizer(parts)
    if kind == "chain":
        return missing_optimizer(parts[-1]) if parts else "an empty chain()"
    if kind == "partition":
        missing = [(label, missing_optimizer(t)) for label, t in parts.items()]
        return ", ".join(f"group {label!r}: {m}" for label, m in missing if m) or None
    if tx.apply is not None or _ends_hand_made(tx):
        return None
    return _describe(tx)


def wrapping(
    outer: GradientTransformation, inner: GradientTransformation
) -> GradientTransformation:
    """``outer``, recorded as a transformation around ``inner`` (which decides whether it is an
    optimizer: `missing_optimizer`); for transformations that add to another's state."""
    _composed[outer.update] = ("wrap", inner)
    return outer


def _zeroes_only(tx: GradientTransformation) -> bool:
    """Whether ``tx`` is `set_to_zero` or a `partition` of them: it has ``apply`` (a frozen
    group of an optimizer's partition) but moves nothing, so a chain may go on after it."""
    kind, parts = _composed.get(tx.update, ("", ()))
    if kind == "partition":
        return all(_zeroes_only(t) for t in parts.values())
    return getattr(tx.update, "__code__", None) is _ZEROS_CODE


def identity() -> GradientTransformation:
    """Pass gradients through unchanged."""

    def init_fn(params):
        del params
        return EmptyState()

    def update_fn(grads, state, params=None, *, step=None):
        del params, step
        return grads, state

    return GradientTransformation(init_fn, update_fn)


def set_to_zero() -> GradientTransformation:
    """Zero updates: freezes the params it is applied to (e.g. one group of a `partition`)."""

    def init_fn(params):
        del params
        return EmptyState()

    def update_fn(grads, state, params=None, *, step=None):
        del params, step
        return {n: torch.zeros_like(g) for n, g in grads.items()}, state

    def apply_fn(grads, state, params, *, step=None):
        del grads, step
        return params, state

    return GradientTransformation(init_fn, update_fn, apply_fn)


_ZEROS_CODE = getattr(set_to_zero().update, "__code__", None)


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Apply ``transforms`` in order; the state is the tuple of their states.

    If the last one is an optimizer (has ``apply``), the chain has ``apply`` too,
    so ``chain(clip_by_global_norm(1.0), adamw(1e-3))`` updates params with
    torch's exact AdamW kernel sequence. An optimizer anywhere else is refused: what
    follows it would transform its update (new - old params), not the gradient. An
    ``update`` without a ``step`` argument (optax's ``update(grads, state, params)``) is
    called without one.
    """
    for i, t in enumerate(transforms):
        if not isinstance(t, GradientTransformation):
            raise TypeError(
                f"chain: argument {i} is {type(t).__name__}, expected a GradientTransformation"
            )
    for i, t in enumerate(transforms[:-1]):
        # an optimizer (a partition of zeroing and pass-through groups is none: it moves nothing)
        if missing_optimizer(t) is None and not _zeroes_only(t):
            raise ValueError(
                f"chain: argument {i + 1} ({_describe(transforms[i + 1])}) comes after the "
                f"optimizer {_describe(t)} (argument {i}), so it would transform the optimizer's "
                "update, not the gradient: put it before the optimizer, e.g. "
                "chain(clip_by_global_norm(1.0), adamw(1e-3)); a chain ends in its one optimizer"
            )
    updates = [with_step(t.update) for t in transforms]

    def init_fn(params):
        return tuple(t.init(params) for t in transforms)

    def _check(state):
        if not isinstance(state, tuple) or len(state) != len(transforms):
            raise ValueError(
                f"chain of {len(transforms)} transformations got a state of "
                f"{len(state) if isinstance(state, tuple) else type(state).__name__}; "
                "was it made by this chain's init?"
            )

    def update_fn(grads, state, params=None, *, step=None):
        _check(state)
        new_state = []
        for update, s in zip(updates, state):
            grads, s = update(grads, s, params, step=step)
            new_state.append(s)
        return grads, tuple(new_state)

    apply_fn = None
    last_apply = transforms[-1].apply if transforms else None
    if last_apply is not None:
        head = updates[:-1]

        def apply_fn(grads, state, params, *, step=None):
            _check(state)
            new_state = []
            for update, s in zip(head, state):
                grads, s = update(grads, s, params, step=step)
                new_state.append(s)
            params, s = last_apply(grads, state[-1], params, step=step)
            new_state.append(s)
            return params, tuple(new_state)

    report = None
    if any(t.report is not None for t in transforms):

        def report(state, step):
            return tuple(report_at(t, s, step) for t, s in zip(transforms, state))

    _composed[update_fn] = ("chain", transforms)
    return GradientTransformation(init_fn, update_fn, apply_fn, report)


class PartitionState(NamedTuple):
    """Per-label states of a `partition`."""

    inner: dict[str, Any]


_GROUPINGS_KEPT = 64  # a partition's cached groupings (by the set of params with a gradient)


def partition(
    transforms: Mapping[str, GradientTransformation],
    labels: Mapping[str, str] | Callable[[str, torch.Tensor], str],
) -> GradientTransformation:
    """Apply a different transformation to each group of params (optax ``multi_transform``).

    Args:
      transforms: label -> transformation (use `set_to_zero` to freeze a group).
      labels: param name -> label, or a function ``(name, tensor) -> label``.

    Every trainable param must get a label that ``transforms`` has; the error
    names the first that does not. A partition whose every group ends in an optimizer is one
    (a step's ``tx`` may end in it); nothing may follow one with ``apply`` in a `chain`.
    """
    transforms = dict(transforms)
    group_updates = {label: with_step(t.update) for label, t in transforms.items()}
    label_of: dict[str, str] = {}  # each param labelled once
    # groups by the names that got a gradient, which vary from update to update with a mixture
    # of experts or a head used on some batches: bounded, oldest dropped first
    cache: dict[tuple[str, ...], dict[str, tuple[str, ...]]] = {}

    def groups_of(params: Mapping[str, torch.Tensor]) -> dict[str, tuple[str, ...]]:
        key = tuple(params)
        found = cache.get(key)
        if found is None:
            members: dict[str, list[str]] = {label: [] for label in transforms}
            for name, tensor in params.items():
                label = label_of.get(name)
                if label is None:
                    label = labels(name, tensor) if callable(labels) else labels.get(name)
                    if label not in transforms:
                        raise KeyError(
                            f"partition: param {name!r} has label {label!r}, but transforms has "
                            f"labels {sorted(transforms)}"
                        )
                    label_of[name] = label
                members[label].append(name)
            found = {label: tuple(names) for label, names in members.items()}
            if len(cache) >= _GROUPINGS_KEPT:
                del cache[next(iter(cache))]
            cache[key] = found
        return found

    def init_fn(params):
        groups = groups_of(params)
        return PartitionState(
            {
                label: transforms[label].init(subset(params, names))
                for label, names in groups.items()
            }
        )

    def update_fn(grads, state, params=None, *, step=None):
        groups = groups_of(grads)
        updates: dict[str, torch.Tensor] = {}
        inner = {}
        for label, names in groups.items():
            if not names:  # no param of this group got a gradient: its state as it was, but
                inner[label] = report_at(transforms[label], state.inner[label], step)  # its lr
                continue
            sub = subset(grads, names)
            sub_params = None if params is None else subset(params, names)
            u, inner[label] = group_updates[label](sub, state.inner[label], sub_params, step=step)
            updates.update(u)
        return subset(updates, tuple(grads)), PartitionState(inner)

    apply_fn = None
    if any(t.apply is not None for t in transforms.values()):

        def apply_fn(grads, state, params, *, step=None):
            """Each group's fused ``apply``; a group without one: its update, added."""
            groups = groups_of(grads)
            inner = {}
            for label, names in groups.items():
                tx = transforms[label]
                if not names:
                    inner[label] = report_at(tx, state.inner[label], step)
                    continue
                sub = subset(grads, names)
                sub_params = subset(params, names)
                if tx.apply is not None:
                    _, inner[label] = tx.apply(sub, state.inner[label], sub_params, step=step)
                else:
                    u, inner[label] = group_updates[label](
                        sub, state.inner[label], sub_params, step=step
                    )
                    apply_updates(sub_params, u)
            return params, PartitionState(inner)

    report = None
    if any(t.report is not None for t in transforms.values()):

        def report(state, step):
            return PartitionState(
                {label: report_at(transforms[label], s, step) for label, s in state.inner.items()}
            )

    _composed[update_fn] = ("partition", transforms)
    return GradientTransformation(init_fn, update_fn, apply_fn, report)


def collect_metrics(opt_state: Any) -> dict[str, torch.Tensor]:
    """Scalars a transformation reported in its state (e.g. ``grad_norm``), by name.

    A state reports by defining ``metrics() -> dict``. Only chain tuples and
    partitions are walked, never the per-parameter tensors.
    """
    report = getattr(opt_state, "metrics", None)
    if report is not None and callable(report):  # one optimizer's state: nothing to walk
        return dict(report())
    return _collect(opt_state, "metrics")


def hyperparams(opt_state: Any) -> dict[str, float]:
    """The hyper-parameters the optimizers of ``opt_state`` used in their last update, by name.

    MMEngine's ``optim_wrapper.get_lr()`` / ``get_momentum()`` as a pure read: ``lr`` and
    ``momentum`` (SGD / RMSprop momentum, Adam / AdamW ``b1``), one entry per
    `partition` group as ``<label>/lr`` and per part of a `fengine.multi_step` as
    ``<part>/lr`` (the names of the step metrics), and ``base_lr`` where MMEngine's has it
    (a `fengine.optim.ParamGroups.build` optimizer, several param groups). Before the first
    update they are the step-0 values. A state takes part by defining
    ``hyperparams() -> dict``. The step metrics (and so the logs) carry only ``lr`` (and
    ``base_lr``), as MMEngine's logs do; a handler that wants momentum reads it here from
    ``snap.state.opt_state``.
    """
    if type(opt_state) is dict:  # a multi step's states by part name: "gen/lr", as its metrics
        return {
            f"{part}/{k}": v
            for part, inner in opt_state.items()
            for k, v in _collect(inner, "hyperparams").items()
        }
    return _collect(opt_state, "hyperparams")


def _collect(opt_state: Any, method: str) -> dict[str, Any]:
    out: dict[str, Any] = {}

    def walk(s: Any, prefix: str) -> None:
        report = getattr(s, method, None)
        if callable(report):
            for k, v in report().items():
                out[prefix + k] = v
        elif isinstance(s, PartitionState):
            for label, inner in s.inner.items():
                walk(inner, f"{prefix}{label}/")
        elif isinstance(s, tuple) and not hasattr(s, "_fields"):
            for inner in s:
                walk(inner, prefix)

    walk(opt_state, "")
    return out
