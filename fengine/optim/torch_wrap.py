"""`from_torch`: any ``torch.optim.Optimizer`` as a gradient transformation.

The escape hatch for optimizers fengine does not write itself (LAMB, Lion, a
user's own). The torch optimizer object is rebuilt whenever the param tensors
change identity and holds nothing between steps: its per-param state dicts are
the ones stored in the `TrainState`, which it fills on its first step (torch
initialises optimizer state lazily) and then updates in place.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from fengine.optim.base import GradientTransformation, resolve, update_via_apply


__all__ = ["TorchOptimizerState", "from_torch"]


class TorchOptimizerState(NamedTuple):
    num_updates: int
    per_param: dict[str, dict[str, Any]]
    """param name -> that param's ``optimizer.state[p]`` dict (empty until the first update)."""
    lr: float

    def metrics(self) -> dict[str, float]:
        return {"lr": self.lr}

    def hyperparams(self) -> dict[str, float]:
        return {"lr": self.lr}  # momentum is the wrapped optimizer's own (not kept here)


def from_torch(optimizer_cls: type[torch.optim.Optimizer], **hyper: Any) -> GradientTransformation:
    """Wrap ``optimizer_cls(params, **hyper)``; any hyper-parameter may be a schedule.

    Example: ``from_torch(torch.optim.NAdam, lr=schedules.cosine(1e-3, T_max=1000))``.
    """
    if not (isinstance(optimizer_cls, type) and issubclass(optimizer_cls, torch.optim.Optimizer)):
        raise TypeError(
            f"from_torch: expected a torch.optim.Optimizer subclass, got {optimizer_cls!r}"
        )
    scheduled = {k: v for k, v in hyper.items() if callable(v)}
    static = {k: v for k, v in hyper.items() if not callable(v)}
    cache: dict[str, Any] = {}

    def build(tensors: list[torch.Tensor]) -> torch.optim.Optimizer:
        key = tuple(id(t) for t in tensors)
        if cache.get("key") != key:
            kwargs = dict(static, **{k: resolve(v, 0) for k, v in scheduled.items()})
            cache["opt"] = optimizer_cls(tensors, **kwargs)
            cache["key"] = key
        return cache["opt"]

    def init_fn(params):
        # validate the hyper-parameters now, not at the first step, on the params themselves
        # (detached: no copy), as optimizers may check their shapes (Muon), devices or dtypes
        probe = [p.detach() for p in params.values()] or [torch.zeros(1, requires_grad=True)]
        try:
            optimizer_cls(probe, **dict(static, **{k: resolve(v, 0) for k, v in scheduled.items()}))
        except (TypeError, ValueError) as e:
            raise type(e)(f"from_torch({optimizer_cls.__name__}, ...): {e}") from None
        lr = resolve(hyper.get("lr", 0.0), 0)
        return TorchOptimizerState(0, {n: {} for n in params}, float(lr))

    def apply_fn(grads, state, params, *, step=None):
        t = state.num_updates if step is None else step
        names = list(grads)
        tensors = [params[n] for n in names]
        opt = build(tensors)
        group = opt.param_groups[0]
        for k, v in scheduled.items():
            group[k] = resolve(v, t)
        opt.state.clear()
        for n, p in zip(names, tensors):
            p.grad = grads[n]
            opt.state[p] = state.per_param[n]
        try:
            opt.step()
        finally:
            for p in tensors:
                p.grad = None
            opt.state.clear()
        return params, TorchOptimizerState(
            state.num_updates + 1, state.per_param, float(group.get("lr", 0.0))
        )

    report = None
    if "lr" in scheduled:

        def report(state, step):
            at = state.num_updates if step is None else step  # as apply_fn's own fallback
            return state._replace(lr=float(resolve(scheduled["lr"], at)))

    return GradientTransformation(init_fn, update_via_apply(apply_fn), apply_fn, report)
