"""Step transforms: ``Step -> Step`` wrappers for what touches forward/backward.

`compose` applies them in one fixed order whatever order they are listed in,
the order people keep getting wrong:

    autocast forward -> loss x scale -> backward (x k micro-batches)
    -> unscale once -> finite check -> clip (in the tx chain) -> update
    (skipped on inf) -> loss-scaler update -> EMA

Gradient accumulation is done *within one call* over a group of k micro-batches
(levanter style): nothing partial is ever left in the state, so a checkpoint at
any step resumes exactly, and schedules count *updates* (one per call).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from fengine.state import TrainState
from fengine.step import GradResult, Step


__all__ = [
    "EmaState",
    "MicroBatches",
    "ScalerState",
    "StepTransform",
    "accumulate",
    "amp",
    "check_finite",
    "compose",
    "ema",
]


@dataclasses.dataclass(frozen=True)
class StepTransform:
    """A named ``Step -> Step`` function with its place in the canonical order."""

    name: str
    order: int
    fn: Callable[[Step], Step]

    def __call__(self, step: Step) -> Step:
        if self.name in step.transforms:
            raise ValueError(f"{self.name} is applied twice to the same step")
        return dataclasses.replace(self.fn(step), transforms=(*step.transforms, self.name))


def compose(*transforms: StepTransform) -> Callable[[Step], Step]:
    """``compose(amp("bfloat16"), accumulate(4), ema(0.999))(step)``; listing order does not matter."""
    for t in transforms:
        if not isinstance(t, StepTransform):
            raise TypeError(
                f"compose: expected step transforms (fengine.amp, accumulate, ema, check_finite), got {t!r}"
            )
    names = [t.name for t in transforms]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"compose: {dupes} given more than once")
    ordered = sorted(transforms, key=lambda t: t.order)

    def apply(step: Step) -> Step:
        if not isinstance(step, Step):
            raise TypeError(
                f"compose(...) expects a Step from fengine.train_step, got {type(step).__name__}"
            )
        for t in ordered:
            step = t(step)
        return step

    return apply


def _extra(step: Step, name: str, init: Callable[[TrainState], Any]) -> tuple:
    return (*step.extra_init, (name, init))


# ----------------------------------------------------------------- check_finite
def check_finite() -> StepTransform:
    """Raise `FloatingPointError` on a NaN/Inf loss, naming the step and the loss terms.

    Costs one host sync per micro-batch (reading the loss). Under fp16 dynamic
    loss scaling it stays quiet: there a non-finite value means the loss scale is
    too high, and the scaler skips the update and backs off instead.
    """

    def fn(step: Step) -> Step:
        inner = step.grads

        def grads(s: Step, state: TrainState, batch: Any, scale: Any, micro: int) -> GradResult:
            result = inner(s, state, batch, scale, micro)
            if not s.loss_scaling and not bool(torch.isfinite(result.loss)):
                bad = {
                    k: float(v)
                    for k, v in result.metrics.items()
                    if isinstance(v, torch.Tensor) and v.numel() == 1 and not torch.isfinite(v)
                }
                where = f" (micro-batch {micro})" if s.micro_batches > 1 else ""
                raise FloatingPointError(
                    f"non-finite loss at step {state.step + 1}{where}: "
                    + ", ".join(f"{k}={v}" for k, v in bad.items())
                    + ". The state before this step is intact (params not updated)."
                )
            return result

        return step.with_(grads=grads)

    return StepTransform("check_finite", 10, fn)


# ----------------------------------------------------------------- accumulate
class MicroBatches(tuple):
    """A group of micro-batches for one accumulated update (`fit` builds these)."""


def accumulate(k: int, weight: Callable[[Any], float] | None = None) -> StepTransform:
    """``k`` micro-batches per update, inside one step call.

    The step takes ``MicroBatches([b1, ..., br])`` with ``1 <= r <= k``. Each
    micro-batch loss is multiplied by ``1/r`` so the gradient is the mean, and a
    last group that is short (the data ran out mid-window: ``r < k``) is divided
    by ``r``, not ``k``, as MMEngine's OptimWrapper does for its final window.
    Unlike MMEngine, a window never straddles an epoch boundary: `fit` groups the
    batches of each epoch, and its last group may be short.

    ``weight(micro_batch) -> number`` (e.g. the sample or valid-token count)
    replaces the count: micro-batch i is then weighted ``w_i / sum(w)``, which
    gives the exact mean over samples/tokens when micro-batches differ in size.
    Schedules count updates, not micro-batches. Dropout in micro-batch i draws
    from ``fold_in(seed, step, i)``.
    """
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"accumulate: k must be an int >= 1, got {k!r}")

    def fn(step: Step) -> Step:
        inner = step.grads

        def grads(s: Step, state: TrainState, group: Any, scale: Any, micro: int) -> GradResult:
            if not isinstance(group, MicroBatches):
                raise TypeError(
                    f"an accumulate({k}) step takes fengine.MicroBatches([batch, ...]) of 1..{k} micro-batches, "
                    f"got {type(group).__name__}; fit() groups batches for you"
                )
            r = len(group)
            if not 1 <= r <= k:
                raise ValueError(f"accumulate({k}): got {r} micro-batches, expected 1..{k}")
            if weight is None:
                weights = [1.0 / r] * r
            else:
                w = [float(weight(mb)) for mb in group]
                total = sum(w)
                if total <= 0:
                    raise ValueError(
                        f"accumulate: micro-batch weights sum to {total}; expected > 0"
                    )
                weights = [x / total for x in w]
            grads_sum: dict[str, torch.Tensor] = {}
            loss = None
            metrics: dict[str, Any] = {}
            for i, (mb, w_i) in enumerate(zip(group, weights)):
                res = inner(s, state, mb, w_i if scale is None else scale * w_i, i)
                if res.grads.keys() == grads_sum.keys():
                    torch._foreach_add_(list(grads_sum.values()), list(res.grads.values()))
                else:  # first micro-batch, or a param unused by some micro-batches
                    for n, g in res.grads.items():
                        if n in grads_sum:
                            grads_sum[n].add_(g)
                        else:
                            grads_sum[n] = g
                loss = res.loss * w_i if loss is None else loss + res.loss * w_i
                for name, v in res.metrics.items():
                    if isinstance(v, torch.Tensor) and v.is_floating_point():
                        metrics[name] = v * w_i if name not in metrics else metrics[name] + v * w_i
                    else:
                        metrics[name] = v
            return GradResult(loss, grads_sum, metrics)

        return step.with_(grads=grads, micro_batches=k)

    return StepTransform("accumulate", 20, fn)


# ----------------------------------------------------------------- amp
class ScalerState(NamedTuple):
    """fp16 loss scaler (torch.amp.GradScaler's ``_scale`` and ``_growth_tracker``)."""

    scale: torch.Tensor
    growth_tracker: torch.Tensor


_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def amp(
    dtype: str = "float16",
    loss_scale: str | float | None = "dynamic",
    *,
    init_scale: float = 2.0**16,
    growth_factor: float = 2.0,
    backoff_factor: float = 0.5,
    growth_interval: int = 2000,
) -> StepTransform:
    """Mixed precision: autocast the forward; for float16, scale the loss.

    ``loss_scale="dynamic"`` follows ``torch.amp.GradScaler`` exactly (same
    defaults and the same ``_amp_foreach_non_finite_check_and_unscale_`` /
    ``_amp_update_scale_`` kernels): grads are unscaled once, before the tx chain
    (so clipping sees true gradients); an update with inf/nan gradients is
    skipped (the step counter still advances, as schedulers do in torch); the
    scale backs off by 0.5 and grows by 2.0 after 2000 good steps. A number is a
    static scale (overflowing steps are still skipped). ``None`` disables
    scaling. bfloat16 never scales. The scaler lives in ``state.extra["amp"]``.
    Skipping needs one host read of the overflow flag per step, as GradScaler does.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"amp: dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    if not (
        loss_scale is None
        or loss_scale == "dynamic"
        or (isinstance(loss_scale, (int, float)) and loss_scale > 0)
    ):
        raise ValueError(
            f"amp: loss_scale must be 'dynamic', a positive number or None, got {loss_scale!r}"
        )
    torch_dtype = _DTYPES[dtype]
    scaling = dtype == "float16" and loss_scale is not None
    dynamic = loss_scale == "dynamic"
    first_scale = init_scale if dynamic else float(loss_scale or 1.0)

    def device_of(state: TrainState) -> torch.device:
        return next(iter(state.params.values())).device

    def autocast(state: TrainState):
        return torch.autocast(device_type=device_of(state).type, dtype=torch_dtype)

    def init(state: TrainState) -> ScalerState:
        dev = device_of(state)
        return ScalerState(
            torch.full((), first_scale, dtype=torch.float32, device=dev),
            torch.full((), 0, dtype=torch.int32, device=dev),
        )

    def fn(step: Step) -> Step:
        step = step.with_(forward_contexts=(*step.forward_contexts, autocast))
        if not scaling:
            return step
        inner_grads, inner_update = step.grads, step.update

        def grads(s: Step, state: TrainState, batch: Any, scale: Any, micro: int) -> GradResult:
            factor = state.extra["amp"].scale
            return inner_grads(s, state, batch, factor if scale is None else scale * factor, micro)

        def update(s: Step, state: TrainState, result: GradResult):
            scaler = state.extra["amp"]
            inv_scale = scaler.scale.double().reciprocal().float()
            home = scaler.scale.device
            by_device: dict[tuple, list[torch.Tensor]] = {}
            for g in result.grads.values():
                by_device.setdefault((g.device, g.dtype), []).append(g)
            flags = {}  # one overflow flag per device, as GradScaler keeps them
            for (dev, _), gs in by_device.items():
                flag = flags.setdefault(dev, torch.zeros((), dtype=torch.float32, device=dev))
                torch._amp_foreach_non_finite_check_and_unscale_(gs, flag, inv_scale.to(dev))
            found_inf = flags.pop(home, torch.zeros((), dtype=torch.float32, device=home))
            for flag in flags.values():
                found_inf = found_inf + flag.to(home)
            if bool(found_inf):  # the one host read: skip the update, as GradScaler.step does
                new_state, metrics = state.replace(step=state.step + 1), dict(result.metrics)
            else:
                new_state, metrics = inner_update(s, state, result)
            if dynamic:
                torch._amp_update_scale_(
                    scaler.scale,
                    scaler.growth_tracker,
                    found_inf,
                    growth_factor,
                    backoff_factor,
                    growth_interval,
                )
            metrics["loss_scale"] = scaler.scale.clone()
            metrics["update_skipped"] = found_inf
            return new_state, metrics

        return step.with_(
            grads=grads, update=update, loss_scaling=True, extra_init=_extra(step, "amp", init)
        )

    return StepTransform("amp", 30, fn)


# ----------------------------------------------------------------- ema
class EmaState(NamedTuple):
    """Exponential moving average of the params (and buffers with ``update_buffers``)."""

    params: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor]
    steps: int  # EMA updates performed (MMEngine's ``BaseAveragedModel.steps``)


def ema(
    decay: float | None = None,
    *,
    momentum: float | None = None,
    interval: int = 1,
    update_buffers: bool = False,
    begin: int = 0,
) -> StepTransform:
    """Keep an EMA of the params in ``state.extra["ema"]`` (MMEngine ExponentialMovingAverage).

    MMEngine's convention: ``ema = (1 - momentum) * ema + momentum * param``, so
    ``momentum = 1 - decay``; default momentum 0.0002 (decay 0.9998). The first
    update copies the params; later ones average every ``interval`` updates
    (counted in updates, not micro-batches). Until ``begin`` updates are done the
    EMA just tracks the params (MMEngine's ``begin_iter``). Without ``update_buffers`` buffers are not averaged and
    evaluation uses the live ones (as MMEngine's EMA model mirrors them).
    It runs after the loss-scaler update, so a skipped fp16 step still counts.
    """
    if decay is not None and momentum is not None:
        raise ValueError("ema: give decay or momentum, not both (momentum = 1 - decay)")
    m = (
        0.0002
        if decay is None and momentum is None
        else (momentum if momentum is not None else 1.0 - decay)
    )
    if not 0.0 < m <= 1.0:
        raise ValueError(f"ema: momentum must be in (0, 1] (decay in [0, 1)), got momentum={m}")
    if not isinstance(interval, int) or interval < 1:
        raise ValueError(f"ema: interval must be an int >= 1, got {interval!r}")
    if begin < 0:
        raise ValueError(f"ema: begin must be >= 0, got {begin}")

    def init(state: TrainState) -> EmaState:
        params = {n: p.detach().clone() for n, p in state.params.items()}
        buffers = (
            {n: b.detach().clone() for n, b in state.buffers.items()} if update_buffers else {}
        )
        return EmaState(params, buffers, 0)

    def fn(step: Step) -> Step:
        inner = step.update

        def update(s: Step, state: TrainState, result: GradResult):
            new_state, metrics = inner(s, state, result)
            e = new_state.extra["ema"]
            with torch.no_grad():
                src_p, avg_p = list(new_state.params.values()), list(e.params.values())
                src_b = [b for b in new_state.buffers.values()] if update_buffers else []
                avg_b = list(e.buffers.values())
                started = new_state.step >= begin  # MMEngine: runner.iter + 1 >= begin_iter
                if not started or e.steps == 0:
                    torch._foreach_copy_(avg_p, src_p)
                    if avg_b:
                        torch._foreach_copy_(avg_b, src_b)
                elif e.steps % interval == 0:
                    torch._foreach_lerp_(avg_p, src_p, m)
                    floats = [
                        (a, b) for a, b in zip(avg_b, src_b) if a.is_floating_point()
                    ]  # not step counters
                    if floats:
                        torch._foreach_lerp_([a for a, _ in floats], [b for _, b in floats], m)
            steps = e.steps + 1 if started else e.steps
            extra = dict(new_state.extra)
            extra["ema"] = EmaState(e.params, e.buffers, steps)
            return new_state.replace(extra=extra), metrics

        return step.with_(update=update, extra_init=_extra(step, "ema", init))

    return StepTransform("ema", 40, fn)


def ema_params(state: TrainState) -> dict[str, torch.Tensor]:
    """The params evaluation should use: the EMA ones if the run keeps an EMA, else the live ones."""
    e = state.extra.get("ema")
    return e.params if e is not None else state.params
