"""Several optimizers in one step: MMEngine's ``OptimWrapperDict`` (GANs), the functional way.

MMEngine trains a GAN with one optimizer wrapper per submodule and a model
``train_step`` that updates them in turn (discriminator, then generator). Here
that is `multi_step`: a `Step` built from named ``(loss_fn, tx, params)`` parts,
updated one after the other within one call, each part seeing the params the
parts before it just updated::

    step = multi_step({
        "disc": (disc_loss, optim.adam(2e-4, b1=0.5), "disc"),   # params under model.disc
        "gen": (gen_loss, optim.adam(2e-4, b1=0.5), "gen"),
    })
    state = TrainState.create(model, step.tx)     # opt_state == {"disc": ..., "gen": ...}
    state, metrics = step(state, batch)           # metrics: disc/loss, disc/lr, gen/loss, gen/lr

Each part's gradient is taken with respect to its own params only, and its
optimizer state is ``state.opt_state[name]``. Metrics are the part's loss terms
and optimizer metrics prefixed ``"<name>/"`` (MMEngine logs ``gen.lr``/``disc.lr``).
One call is one step: ``state.step`` advances by one whatever the number of
parts, and every part's schedule sees the same step. Dropout in part ``i``
draws from ``fold_in(seed, step, i)``.

Step transforms (`fengine.amp`, `accumulate`, `ema`) do not apply to a multi
step yet; composing one raises.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
from torch import nn

from fengine.optim.base import GradientTransformation, collect_metrics, step_params
from fengine.rng import fold_in
from fengine.state import TrainState
from fengine.step import Step, loss_and_grads


__all__ = ["MultiStep", "Part", "multi_step"]

Selector = Callable[[str], bool] | str


class Part(NamedTuple):
    """One optimizer of a `multi_step`: its loss, its transformation and which params it owns."""

    loss_fn: Callable[[nn.Module, Any], Any]
    tx: GradientTransformation
    select: Callable[[str], bool]


def _selector(name: str, select: Selector) -> Callable[[str], bool]:
    if isinstance(select, str):
        prefix = select

        def by_prefix(param: str) -> bool:
            return param == prefix or param.startswith(prefix + ".")

        return by_prefix
    if callable(select):
        return select
    raise TypeError(
        f"multi_step: part {name!r}: params must be a submodule name (str) or a function "
        f"param_name -> bool, got {type(select).__name__}"
    )


def _groups(
    parts: tuple[tuple[str, Part], ...], params: Mapping[str, torch.Tensor]
) -> dict[str, list[str]]:
    """Trainable param names of each part; every trainable param must belong to exactly one part."""
    groups: dict[str, list[str]] = {name: [] for name, _ in parts}
    for pname, p in params.items():
        if not p.requires_grad:
            continue
        owners = [name for name, part in parts if part.select(pname)]
        if len(owners) > 1:
            raise ValueError(
                f"multi_step: param {pname!r} is selected by several parts {owners}; each must have one owner"
            )
        if not owners:
            raise ValueError(
                f"multi_step: trainable param {pname!r} belongs to no part (parts: {[n for n, _ in parts]}); "
                "select it in one part or set requires_grad=False"
            )
        groups[owners[0]].append(pname)
    empty = [name for name, names in groups.items() if not names]
    if empty:
        raise ValueError(f"multi_step: parts {empty} select no trainable params")
    return groups


def _multi_tx(parts: tuple[tuple[str, Part], ...]) -> GradientTransformation:
    def init_fn(params):
        groups = _groups(parts, params)
        return {name: part.tx.init({n: params[n] for n in groups[name]}) for name, part in parts}

    def update_fn(grads, state, params=None, *, step=None):
        raise TypeError(
            "the tx of a multi_step only initialises the per-part states; call the step itself"
        )

    return GradientTransformation(init_fn, update_fn)


def _no_grads(*args: Any) -> Any:
    raise TypeError("a multi_step computes gradients per part inside __call__")


@dataclasses.dataclass(frozen=True, eq=False)
class MultiStep(Step):
    """A `Step` that updates several parts in turn (see the module docstring). Built by `multi_step`."""

    parts: tuple[tuple[str, Part], ...] = ()

    def __call__(self, state: TrainState, batch: Any) -> tuple[TrainState, dict[str, Any]]:
        if not isinstance(state, TrainState):
            raise TypeError(f"step: expected a TrainState, got {type(state).__name__}")
        given = state
        names = [n for n, _ in self.parts]
        opt = state.opt_state
        if not isinstance(opt, Mapping) or sorted(opt) != sorted(names):
            raise ValueError(
                f"multi_step: state.opt_state must be the dict of part states {names} "
                f"(build the state with TrainState.create(model, step.tx)); got {type(opt).__name__}"
                + (f" with keys {list(opt)}" if isinstance(opt, Mapping) else "")
            )
        if not self.donate:
            state = state.clone()
        params = state.params
        groups = _groups(self.parts, params)
        devices = self.devices(state)
        new_opt = dict(state.opt_state)
        metrics: dict[str, Any] = {}
        for i, (name, part) in enumerate(self.parts):
            owned = groups[name]
            res = loss_and_grads(
                state,
                part.loss_fn,
                batch,
                owned,
                key=fold_in(state.seed, state.step, i),
                devices=devices,
            )
            grads, part_metrics = res.grads, res.metrics
            new_params, new_opt[name] = step_params(
                part.tx, grads, new_opt[name], {n: params[n] for n in owned}, step=state.step
            )
            for n, t in new_params.items():
                if (
                    params[n] is not t
                ):  # a transformation that returned new tensors instead of updating in place
                    params[n] = t
            for k, v in part_metrics.items():
                metrics[f"{name}/{k}"] = v
            for k, v in collect_metrics(new_opt[name]).items():
                metrics[f"{name}/{k}"] = v
        new_state = state.replace(step=state.step + 1, params=params, opt_state=new_opt)
        if self.donate:
            given._mark_donated(f"step {given.step + 1}")
        return new_state, metrics

    def with_(self, **changes: Any) -> Step:
        raise TypeError(
            "step transforms (amp, accumulate, ema, check_finite) are not supported on a multi_step; "
            "apply them per part by hand or train without them"
        )


def multi_step(
    parts: Mapping[str, tuple[Callable[[nn.Module, Any], Any], GradientTransformation, Selector]],
    *,
    order: tuple[str, ...] | list[str] | None = None,
    donate: bool = True,
) -> MultiStep:
    """A step that updates each named part with its own loss and optimizer, in ``order``.

    Args:
      parts: name -> ``(loss_fn, tx, params)``. ``loss_fn(model, batch)`` as for
        `fengine.train_step` (it sees the whole model); ``params`` is a submodule
        name (``"gen"`` owns ``gen.*``) or a function ``param_name -> bool``. Every
        trainable param must belong to exactly one part.
      order: the update order (default: the order of ``parts``). For a GAN list
        the discriminator first, as MMEngine's GAN models do.
      donate: as for `fengine.train_step`.
    """
    if not isinstance(parts, Mapping) or not parts:
        raise TypeError("multi_step: parts must be a non-empty dict name -> (loss_fn, tx, params)")
    order = list(parts) if order is None else list(order)
    if sorted(order) != sorted(parts):
        raise ValueError(
            f"multi_step: order {order} must list each part once; parts are {list(parts)}"
        )
    built = []
    for name in order:
        spec = parts[name]
        if not isinstance(spec, (tuple, list)) or len(spec) != 3:
            raise TypeError(
                f"multi_step: part {name!r} must be (loss_fn, tx, params), got {spec!r}"
            )
        loss_fn, tx, select = spec
        if not callable(loss_fn):
            raise TypeError(
                f"multi_step: part {name!r}: loss_fn must be callable, got {type(loss_fn).__name__}"
            )
        if not isinstance(tx, GradientTransformation):
            raise TypeError(
                f"multi_step: part {name!r}: tx must be a GradientTransformation, got {type(tx).__name__}"
            )
        built.append((name, Part(loss_fn, tx, _selector(name, select))))
    built_parts = tuple(built)
    return MultiStep(loss_fn=_no_grads, tx=_multi_tx(built_parts), donate=donate, parts=built_parts)
