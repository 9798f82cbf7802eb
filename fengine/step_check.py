"""Does a state fit a step? Errors that name what differs, instead of an AttributeError deep inside."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from fengine.state import TrainState


if TYPE_CHECKING:
    from fengine.step import Step

__all__ = [
    "StepMismatchError",
    "check_fits",
    "check_ownership",
    "counter",
    "counts_within",
    "loaded_problems",
    "shaped_like",
]

_FIX = "Build the state with this step: state = step.init(model, seed=...)"


class StepMismatchError(ValueError):
    """The state was not built for this step (other optimizer, missing wrapper state)."""


def check_fits(step: Step, state: TrainState) -> None:
    """Compare ``state`` with what ``step.init`` would build (optimizer state on meta tensors)."""
    if state.model is None:
        raise StepMismatchError(f"the state has no model. {_FIX}")
    meta = {
        n: torch.empty_like(p, device="meta").requires_grad_(p.requires_grad)
        for n, p in state.params.items()
    }
    try:
        expected = step._init_opt(meta)
    except (RuntimeError, ValueError, NotImplementedError):  # e.g. a fused optimizer refuses meta
        expected = step._init_opt(state.params)
    where = first_difference(expected, state.opt_state, "state.opt_state")
    if where:
        raise StepMismatchError(f"the state does not fit this step's optimizer: {where}. {_FIX}")
    wanted = [w.name for w in step.wrappers if w.name]
    problems = [
        f"state.extra lacks {n!r} (a wrapper of this step keeps it)"
        for n in wanted
        if n not in state.extra
    ]
    problems += [
        f"state.extra has {n!r}, which no wrapper of this step keeps"
        for n in state.extra
        if n not in wanted
    ]
    if problems:
        raise StepMismatchError(
            f"the state does not fit this step's wrappers: {'; '.join(problems)}. {_FIX}"
        )


def first_difference(expected: Any, actual: Any, path: str) -> str | None:
    """Where two state trees differ in container types or keys (tensors and empty dicts match anything)."""
    if isinstance(expected, torch.Tensor) or (isinstance(expected, dict) and not expected):
        return None
    if type(expected) is not type(actual):
        return f"{path} is {type(actual).__name__}, this step makes {type(expected).__name__}"
    if isinstance(expected, dict):
        if expected.keys() != actual.keys():
            return f"{path} has keys {sorted(actual)[:6]}, this step makes {sorted(expected)[:6]}"
        items = [(f"{path}[{k!r}]", expected[k], actual[k]) for k in expected]
    elif isinstance(expected, tuple):
        if len(expected) != len(actual):
            return f"{path} has {len(actual)} entries, this step makes {len(expected)}"
        fields = getattr(expected, "_fields", None)
        items = [
            (f"{path}.{fields[i]}" if fields else f"{path}[{i}]", e, a)
            for i, (e, a) in enumerate(zip(expected, actual))
        ]
    else:
        return None
    return next((d for d in (first_difference(e, a, sub) for sub, e, a in items) if d), None)


def check_ownership(
    owned: Mapping[Any, list[str] | Mapping[str, Any]], params: Mapping[str, torch.Tensor]
) -> None:
    """Every trainable param belongs to exactly one part of a multi step, and every part owns some."""
    claims: dict[str, list[Any]] = {}
    for part_name, names in owned.items():
        for n in names:
            claims.setdefault(n, []).append(part_name)
    problems = [
        f"param {n!r} is selected by several parts {o}" for n, o in claims.items() if len(o) > 1
    ]
    problems += [f"part {n!r} selects no trainable params" for n, o in owned.items() if not o]
    problems += [
        f"trainable param {n!r} belongs to no part"
        for n, p in params.items()
        if p.requires_grad and n not in claims
    ]
    if problems:
        raise ValueError(
            f"multi_step: {'; '.join(problems[:5])} (parts: {list(owned)}); every trainable param "
            "must belong to exactly one part (or set requires_grad=False)"
        )


# ----------------------------------------------------------------- a state read from a file
# A checkpoint's per-param dicts are taken as the file has them where the template's are still
# empty (momentum buffers start at the first update, ``missed`` counts when a param first sits
# one out); the state classes that keep such dicts say what their entries must be, through
# ``loaded_problems(params, buffers)``, so an edited file is refused at load, not mid-training.


def loaded_problems(
    tree: Any, params: Mapping[str, torch.Tensor], buffers: Mapping[str, torch.Tensor]
) -> list[str]:
    """What is wrong with a loaded state tree: every node's ``loaded_problems``, if it has one."""
    out: list[str] = []
    check = getattr(tree, "loaded_problems", None)
    if callable(check) and not isinstance(tree, type):
        out += check(params, buffers)
    if isinstance(tree, (tuple, list)):
        for x in tree:
            out += loaded_problems(x, params, buffers)
    elif isinstance(tree, dict):
        for x in tree.values():
            out += loaded_problems(x, params, buffers)
    return out


def shaped_like(
    field: str, entries: Mapping[str, Any], like: Mapping[str, torch.Tensor], what: str = "param"
) -> list[str]:
    """Per-name tensors: each names an entry of ``like`` and has its shape and dtype."""
    out = []
    for name, t in entries.items():
        ref = like.get(name)
        if ref is None:
            out.append(f"{field}[{name!r}] names no {what} of the model")
        elif not isinstance(t, torch.Tensor):
            out.append(f"{field}[{name!r}] is a {type(t).__name__}, not a tensor")
        elif t.shape != ref.shape or t.dtype != ref.dtype:
            out.append(
                f"{field}[{name!r}] is {t.dtype} {list(t.shape)}, the {what} {ref.dtype} {list(ref.shape)}"
            )
    return out


def counts_within(
    field: str, counts: Mapping[str, Any], high: Any, like: Mapping[str, torch.Tensor]
) -> list[str]:
    """Per-param counts: each names a param and is an int in ``[0, high]``."""
    out = []
    for name, k in counts.items():
        if name not in like:
            out.append(f"{field}[{name!r}] names no param of the model")
        elif type(k) is not int or type(high) is not int or not 0 <= k <= high:
            out.append(f"{field}[{name!r}] is {k!r}, expected an int in [0, {high!r}]")
    return out


def counter(field: str, value: Any) -> list[str]:
    """A count of updates: an int >= 0."""
    if type(value) is int and value >= 0:
        return []
    return [f"{field} is {value!r}, expected an int >= 0"]
