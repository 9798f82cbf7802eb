"""`ema`: an exponential moving average of (some of) the params, MMEngine's ExponentialMovingAverage."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from fengine.sharding import foreach_copy_
from fengine.state import TrainState
from fengine.step import Metrics, Part, StepFn, selector
from fengine.wrappers.base import Wrapper


__all__ = ["EmaState", "ema"]


class EmaState(NamedTuple):
    """Exponential moving average of (some of) the params, and buffers with ``update_buffers``."""

    params: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor]
    steps: int  # EMA updates performed (MMEngine's ``BaseAveragedModel.steps``)

    def eval_weights(
        self, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The weights to evaluate and publish: the averaged ones in place of the live ones."""
        return {**params, **self.params}, {**buffers, **self.buffers}


class _Ema(Wrapper):
    def __init__(
        self,
        momentum: float,
        interval: int,
        update_buffers: bool,
        begin: int,
        select: Any,
        name: str,
    ) -> None:
        self.momentum, self.interval, self.update_buffers, self.begin = (
            momentum,
            interval,
            update_buffers,
            begin,
        )
        self.select, self.name, self.key = select, name, name  # key: the name, typed str

    def init(self, state: TrainState, parts: tuple[Part, ...]) -> EmaState:
        sel = self.select
        params = {n: p.detach().clone() for n, p in state.params.items() if sel is None or sel(n)}
        buffers = (
            {n: b.detach().clone() for n, b in state.buffers.items()} if self.update_buffers else {}
        )
        return EmaState(params, buffers, 0)

    def params(self, state: TrainState) -> dict[str, torch.Tensor]:
        """All params, the averaged ones where this EMA keeps them."""
        e: EmaState = state.extra[self.key]
        return {**state.params, **e.params}

    def after(self, step_fn: StepFn) -> StepFn:
        m, interval, begin, name = self.momentum, self.interval, self.begin, self.key
        cache: dict[str, Any] = {}

        def with_ema(state: TrainState, batch: Any) -> tuple[TrainState, Metrics]:
            new, metrics = step_fn(state, batch)
            e: EmaState = new.extra[name]
            if cache.get("key") is not new.params:  # a donating step keeps the same dicts
                cache.update(
                    key=new.params,
                    src=[new.params[n] for n in e.params],
                    avg=list(e.params.values()),
                )
            src_b = list(new.buffers.values()) if self.update_buffers else []
            avg_b = list(e.buffers.values())
            started = new.step >= begin  # MMEngine: runner.iter + 1 >= begin_iter
            with torch.no_grad():
                if not started or e.steps == 0:
                    foreach_copy_(cache["avg"], cache["src"])
                    if avg_b:
                        torch._foreach_copy_(avg_b, src_b)
                elif e.steps % interval == 0:
                    torch._foreach_lerp_(cache["avg"], cache["src"], m)
                    floats = [
                        (a, b) for a, b in zip(avg_b, src_b) if a.is_floating_point()
                    ]  # not step counters
                    if floats:
                        torch._foreach_lerp_([a for a, _ in floats], [b for _, b in floats], m)
            steps = e.steps + 1 if started else e.steps
            return new.replace(
                extra={**new.extra, name: EmaState(e.params, e.buffers, steps)}
            ), metrics

        return with_ema

    def __repr__(self) -> str:
        return f"ema(momentum={self.momentum}, interval={self.interval}, name={self.name!r})"


def ema(
    decay: float | None = None,
    *,
    momentum: float | None = None,
    interval: int = 1,
    update_buffers: bool = False,
    begin: int = 0,
    params: str | Callable[[str], bool] | None = None,
    name: str = "ema",
) -> Any:
    """Keep an EMA of the params in ``state.extra[name]`` (MMEngine ExponentialMovingAverage).

    MMEngine's convention: ``ema = (1 - momentum) * ema + momentum * param``, so
    ``momentum = 1 - decay``; default momentum 0.0002 (decay 0.9998). The first
    update copies the params; later ones average every ``interval`` updates
    (counted in updates, not micro-batches). Until ``begin`` updates are done the
    EMA just tracks the params (MMEngine's ``begin_iter``). ``params`` limits it to a
    submodule (``"gen"``) or a predicate on param names (a GAN's generator).
    Without ``update_buffers`` buffers are not averaged and evaluation uses the
    live ones (as MMEngine's EMA model mirrors them). It runs after the update and
    the loss-scaler update, so a skipped fp16 step still counts. Evaluation,
    checkpoints' published weights and `load_params` use the EMA weights
    (`TrainState.eval_weights`).
    """
    if decay is not None and momentum is not None:
        raise ValueError("ema: give decay or momentum, not both (momentum = 1 - decay)")
    m = momentum if momentum is not None else 0.0002 if decay is None else 1.0 - decay
    if not 0.0 < m <= 1.0:
        raise ValueError(f"ema: momentum must be in (0, 1] (decay in [0, 1)), got momentum={m}")
    if not isinstance(interval, int) or interval < 1:
        raise ValueError(f"ema: interval must be an int >= 1, got {interval!r}")
    if begin < 0:
        raise ValueError(f"ema: begin must be >= 0, got {begin}")
    select = None if params is None else selector(params, "ema")
    return _Ema(m, interval, update_buffers, begin, select, name)
