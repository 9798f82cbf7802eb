"""`amp`: autocast the forward; for float16, torch.amp.GradScaler's loss scaling around ``tx``."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.utils._pytree as pytree

from fengine.state import TrainState
from fengine.step import (
    ApplyFn,
    GradFn,
    Grads,
    Metrics,
    Part,
    autocast_device,
    reported_opt_state,
    skipped_update,
)
from fengine.wrappers.base import Wrapper, _CheckFinite, once


__all__ = ["ScalerState", "amp"]


class ScalerState(NamedTuple):
    """fp16 loss scaler (torch.amp.GradScaler's ``_scale`` and ``_growth_tracker``)."""

    scale: torch.Tensor
    growth_tracker: torch.Tensor


_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


class _Amp(Wrapper):
    def __init__(
        self, dtype: str, loss_scale: str | float | None, scaler: tuple[float, float, float, int]
    ) -> None:
        self.dtype, self.loss_scale = _DTYPES[dtype], loss_scale
        self.init_scale, self.growth_factor, self.backoff_factor, self.growth_interval = scaler
        self.scaling = dtype == "float16" and loss_scale is not None
        self.name = "amp" if self.scaling else None

    def validate(self, before: Sequence[Wrapper]) -> None:
        once(_Amp, "amp (autocast and loss scaling)", before)
        if self.scaling and any(isinstance(w, _CheckFinite) for w in before):
            raise ValueError(
                "check_finite() is written before amp('float16'): it would raise on the loss scaler's routine "
                "overflows, which amp skips. Write it after amp."
            )

    def init(self, state: TrainState, parts: tuple[Part, ...]) -> Any:
        if self.scaling:
            half = [
                n for n, p in state.params.items() if p.requires_grad and p.dtype == torch.float16
            ]
            if half:  # GradScaler refuses them too ("Attempting to unscale FP16 gradients")
                raise ValueError(
                    f"amp('float16') scales the loss of a float32 model that autocast runs in "
                    f"float16, but params are float16 already ({', '.join(half[:3])}...): their "
                    "gradients cannot be unscaled exactly; keep the model float32 (or use "
                    "amp('float16', loss_scale=None) for no scaling)"
                )
        dev = next(iter(state.params.values())).device
        first = self.init_scale if self.loss_scale == "dynamic" else float(self.loss_scale or 1.0)

        def one() -> ScalerState:
            return ScalerState(
                torch.full((), first, dtype=torch.float32, device=dev),
                torch.full((), 0, dtype=torch.int32, device=dev),
            )

        return one() if parts[0].name is None else {p.name: one() for p in parts}

    def scaler(self, state: TrainState, part: str | None = None) -> ScalerState:
        """The loss scaler in ``state`` (of ``part`` for a multi step: each part has its own)."""
        if self.name is None:
            raise ValueError(f"{self!r} keeps no loss scaler")
        sub = state.extra[self.name]
        return sub if isinstance(sub, ScalerState) else sub[part]

    def forward(self, grad_fn: GradFn, part: Part) -> GradFn:
        dtype, name = self.dtype, self.name

        def autocast(state: TrainState, batch: Any, *, weight: Any = None, micro: int = 0) -> Grads:
            if name is not None:
                scale = part.get(state.extra[name]).scale
                weight = scale if weight is None else weight * scale
            device = next(iter(state.params.values())).device.type
            with torch.autocast(device_type=device, dtype=dtype):
                if isinstance(state.step, torch.Tensor):  # compiled: dynamo traces no ContextVar
                    return grad_fn(state, batch, weight=weight, micro=micro)
                token = autocast_device.set(device)  # the backward without it: see the step's
                try:
                    return grad_fn(state, batch, weight=weight, micro=micro)
                finally:
                    autocast_device.reset(token)

        return autocast

    def gradient(self, apply: ApplyFn, part: Part) -> ApplyFn:
        if self.name is None:
            return apply
        name, dynamic = self.name, self.loss_scale == "dynamic"
        factors = (self.growth_factor, self.backoff_factor, self.growth_interval)

        def unscaled(state: TrainState, g: Grads) -> tuple[TrainState, Metrics]:
            scaler = part.get(state.extra[name])
            if not g.grads:  # the loss reached none of the part's params: no update happens, so
                # the scaler neither grows nor backs off (GradScaler refuses: no inf checks recorded)
                new_state, metrics = apply(state, g)
                metrics["loss_scale"] = scaler.scale.clone()
                metrics["update_skipped"] = torch.zeros((), device=scaler.scale.device)
                return new_state, metrics
            found_inf = _unscale_(g.grads, scaler.scale)
            if isinstance(
                state.step, torch.Tensor
            ):  # a compiled step: skip by selection, no host read
                new_state, metrics = _unless(found_inf > 0, state, g, apply)
                # the selection restored the old lr too: report the scheduled one, as eager does
                new_state = new_state.replace(
                    opt_state=reported_opt_state(new_state.opt_state, part, state)
                )
            elif bool(found_inf):  # the one host read: skip the update, as GradScaler.step does
                new_state, metrics = skipped_update(state, g, part)
            else:
                new_state, metrics = apply(state, g)
            if dynamic:
                torch._amp_update_scale_(scaler.scale, scaler.growth_tracker, found_inf, *factors)
            metrics["loss_scale"] = scaler.scale.clone()
            metrics["update_skipped"] = found_inf
            return new_state, metrics

        return unscaled

    def __repr__(self) -> str:
        return f"amp({str(self.dtype).removeprefix('torch.')!r}, loss_scale={self.loss_scale!r})"


def _unless(
    skip: torch.Tensor, state: TrainState, g: Grads, apply: ApplyFn
) -> tuple[TrainState, Metrics]:
    """``apply``, with params and optimizer state kept as they were where ``skip`` (a compiled
    step's form of GradScaler's skipped update: no data-dependent branch)."""
    before = pytree.tree_leaves((state.params, state.opt_state))
    saved = [x.detach().clone() if isinstance(x, torch.Tensor) else x for x in before]
    new, metrics = apply(state, g)
    after, spec = pytree.tree_flatten((new.params, new.opt_state))
    kept = []
    with torch.no_grad():
        for prev, old, cur in zip(before, saved, after):
            if isinstance(cur, torch.Tensor):
                chosen = torch.where(skip, old, cur)
                if cur is prev:  # updated in place: restore in place
                    cur.copy_(chosen)
                    chosen = cur
                cur = chosen
            kept.append(cur)
    params, opt_state = pytree.tree_unflatten(kept, spec)
    return new.replace(params=params, opt_state=opt_state), metrics


def _unscale_(grads: dict[str, torch.Tensor], scale: torch.Tensor) -> torch.Tensor:
    """Divide ``grads`` by ``scale`` in place; the summed overflow flags (one per device, as GradScaler)."""
    inv_scale = scale.double().reciprocal().float()
    home = scale.device
    by_device: dict[tuple, list[torch.Tensor]] = {}
    for g in grads.values():
        by_device.setdefault((g.device, g.dtype), []).append(g)
    flags: dict[torch.device, torch.Tensor] = {}
    for (dev, _), gs in by_device.items():
        flag = flags.setdefault(dev, torch.zeros((), dtype=torch.float32, device=dev))
        torch._amp_foreach_non_finite_check_and_unscale_(gs, flag, inv_scale.to(dev))
    found_inf = flags.pop(home, torch.zeros((), dtype=torch.float32, device=home))
    for flag in flags.values():
        found_inf = found_inf + flag.to(home)
    return found_inf


def _number(value: Any, low: float, high: float) -> bool:
    """Whether ``value`` is a real number (not a bool) strictly between ``low`` and ``high``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    return low < float(value) < high


def amp(
    dtype: str = "float16",
    loss_scale: str | float | None = "dynamic",
    *,
    init_scale: float = 2.0**16,
    growth_factor: float = 2.0,
    backoff_factor: float = 0.5,
    growth_interval: int = 2000,
) -> Wrapper:
    """Mixed precision: autocast the forward; for float16, scale the loss.

    ``loss_scale="dynamic"`` follows ``torch.amp.GradScaler`` exactly (same
    defaults and the same ``_amp_foreach_non_finite_check_and_unscale_`` /
    ``_amp_update_scale_`` kernels): grads are unscaled once, before ``tx`` (so
    clipping and any transformation in it see true gradients); an update with
    inf/nan gradients is skipped (the step counter still advances, as schedulers
    do in torch); the scale backs off by 0.5 and grows by 2.0 after 2000 good
    steps. A number is a static scale (overflowing steps are still skipped).
    ``None`` disables scaling; bfloat16 never scales. In a multi step each part
    has its own scaler, as each of MMEngine's AmpOptimWrappers does; a part whose loss reached
    none of its params on a batch makes no update, and its scaler stays as it was. Skipping
    needs one host read of the overflow flag per step, as GradScaler does. Scales must be
    finite and > 0, ``growth_factor > 1`` and ``0 < backoff_factor < 1`` (GradScaler's rule).
    """
    if dtype not in _DTYPES:
        raise ValueError(f"amp: dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    if not (loss_scale is None or loss_scale == "dynamic" or _number(loss_scale, 0.0, math.inf)):
        raise ValueError(
            f"amp: loss_scale must be 'dynamic', a finite number > 0 or None, got {loss_scale!r}"
        )
    # GradScaler asserts growth_factor > 1 and backoff_factor < 1; the rest would train silently wrong
    for arg, value, low, high, expected in (
        ("init_scale", init_scale, 0.0, math.inf, "a finite number > 0"),
        ("growth_factor", growth_factor, 1.0, math.inf, "a finite number > 1 (as GradScaler)"),
        ("backoff_factor", backoff_factor, 0.0, 1.0, "a number in (0, 1) (as GradScaler)"),
    ):
        if not _number(value, low, high):
            raise ValueError(f"amp: {arg} must be {expected}, got {value!r}")
    if (
        isinstance(growth_interval, bool)
        or not isinstance(growth_interval, int)
        or growth_interval < 1
    ):
        raise ValueError(f"amp: growth_interval must be an int >= 1, got {growth_interval!r}")
    return _Amp(dtype, loss_scale, (init_scale, growth_factor, backoff_factor, growth_interval))
