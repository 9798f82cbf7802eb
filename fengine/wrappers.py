"""Step wrappers: the pieces `fengine.train_step` composes around the gradient and the update.

A wrapper overrides the hooks of the stages it acts at (see `fengine.step`):
``forward(grad_fn, part)``, ``gradient(apply, part)``, ``after(step_fn)``.
Within a stage the first written is the outermost, so
``train_step(loss, tx, amp("float16"), accumulate(4), ema(0.999))`` runs:
autocast forward -> loss x scale -> backward (x 4 micro-batches) -> unscale once
-> skip on inf -> ``tx`` (clip, optimizer: true gradients) -> scale update -> EMA.

A wrapper that keeps state names it (``name``): it lives in ``state.extra[name]``,
is built by ``init`` when the step builds the state, and is read through the
wrapper (``ema.params(state)``, ``amp.scaler(state)``), never by key elsewhere.

Gradient accumulation is done *within one call* over a group of k micro-batches
(levanter style): nothing partial is ever left in the state, so a checkpoint at
any step resumes exactly, and schedules count *updates* (one per call).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch

from fengine.state import TrainState
from fengine.step import ApplyFn, GradFn, Grads, Metrics, Part, StepFn, selector


__all__ = [
    "EmaState",
    "MicroBatches",
    "ScalerState",
    "Wrapper",
    "accumulate",
    "amp",
    "check_finite",
    "ema",
    "forward_wrapper",
    "post_update",
]


class Wrapper:
    """Base of step wrappers: every hook defaults to "leave the stage alone"."""

    name: str | None = None
    """Key of this wrapper's state in ``state.extra`` (None: it keeps none)."""
    micro_batches: int = 1
    """Batches one update consumes (`accumulate` sets it)."""

    def init(self, state: TrainState, parts: tuple[Part, ...]) -> Any:
        raise NotImplementedError(
            f"{type(self).__name__} names a state ({self.name!r}) but defines no init"
        )

    def forward(self, grad_fn: GradFn, part: Part) -> GradFn:
        return grad_fn

    def gradient(self, apply: ApplyFn, part: Part) -> ApplyFn:
        return apply

    def after(self, step_fn: StepFn) -> StepFn:
        return step_fn

    def validate(self, before: Sequence[Wrapper]) -> None:
        """Refuse a meaningless combination with the wrappers written ``before`` this one."""


def check_wrappers(wrappers: Sequence[Any]) -> tuple[Wrapper, ...]:
    from fengine.optim.base import GradientTransformation

    for i, w in enumerate(wrappers):
        if isinstance(w, GradientTransformation):
            raise TypeError(
                f"step wrapper {i} is a gradient transformation; put it in tx, e.g. "
                "train_step(loss_fn, optim.chain(your_transform, optim.adamw(...)), ...)"
            )
        if not isinstance(w, Wrapper):
            raise TypeError(
                f"step wrapper {i} is {type(w).__name__}; expected fengine.amp, accumulate, ema, check_finite, "
                "forward_wrapper(fn) or post_update(fn)"
            )
        w.validate(wrappers[:i])
    names = [w.name for w in wrappers if w.name]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(
            f"step wrappers keep state under the same name {twice}; give each a distinct name="
        )
    return tuple(wrappers)


def _once(kind: type, what: str, before: Sequence[Wrapper]) -> None:
    if any(isinstance(w, kind) for w in before):
        raise ValueError(f"{what} is given twice; a step takes one")


# ----------------------------------------------------------------- user wrappers
class _Forward(Wrapper):
    def __init__(self, fn: Callable[[GradFn], GradFn]) -> None:
        self.fn = fn

    def forward(self, grad_fn: GradFn, part: Part) -> GradFn:
        return self.fn(grad_fn)

    def __repr__(self) -> str:
        return f"forward_wrapper({getattr(self.fn, '__name__', self.fn)})"


class _PostUpdate(Wrapper):
    def __init__(self, fn: Callable[[StepFn], StepFn]) -> None:
        self.fn = fn

    def after(self, step_fn: StepFn) -> StepFn:
        return self.fn(step_fn)

    def __repr__(self) -> str:
        return f"post_update({getattr(self.fn, '__name__', self.fn)})"


def forward_wrapper(fn: Callable[[GradFn], GradFn]) -> Wrapper:
    """A forward/backward wrapper from ``fn(grad_fn) -> grad_fn``; ``grad_fn(state, batch, **kw)``
    returns `fengine.Grads` (pass ``**kw`` through)."""
    return _Forward(fn)


def post_update(fn: Callable[[StepFn], StepFn]) -> Wrapper:
    """A post-update wrapper from ``fn(step_fn) -> step_fn``; ``step_fn(state, batch) -> (state, metrics)``."""
    return _PostUpdate(fn)


# ----------------------------------------------------------------- check_finite
class _CheckFinite(Wrapper):
    def gradient(self, apply: ApplyFn, part: Part) -> ApplyFn:
        def checked(state: TrainState, g: Grads) -> tuple[TrainState, Metrics]:
            if not bool(torch.isfinite(g.loss)):
                bad = {
                    k: float(v)
                    for k, v in g.metrics.items()
                    if isinstance(v, torch.Tensor) and v.numel() == 1 and not torch.isfinite(v)
                }
                raise FloatingPointError(
                    f"non-finite loss at step {state.step + 1}: "
                    + ", ".join(f"{k}={v}" for k, v in bad.items())
                    + ". The state before this step is intact (params not updated)."
                )
            return apply(state, g)

        return checked

    def __repr__(self) -> str:
        return "check_finite()"


def check_finite() -> Wrapper:
    """Raise `FloatingPointError` on a NaN/Inf loss before the update, naming the step and the loss terms.

    Costs one host sync per step (reading the loss). Write it after an fp16
    `amp`: there a non-finite value means the loss scale is too high, the scaler
    skips the update and backs off, and this check never sees it.
    """
    return _CheckFinite()


# ----------------------------------------------------------------- accumulate
class MicroBatches(tuple):
    """A group of micro-batches for one accumulated update (`fit` builds these)."""


class _Accumulate(Wrapper):
    def __init__(self, k: int, weight: Callable[[Any], float] | None) -> None:
        self.micro_batches, self.weight = k, weight

    def validate(self, before: Sequence[Wrapper]) -> None:
        _once(_Accumulate, "accumulate (micro-batching)", before)

    def forward(self, grad_fn: GradFn, part: Part) -> GradFn:
        k, share_of = self.micro_batches, self.weight

        def grad_sum(state: TrainState, batch: Any, *, weight: Any = None, micro: int = 0) -> Grads:
            group = batch
            if not isinstance(group, MicroBatches):
                raise TypeError(
                    f"an accumulate({k}) step takes fengine.MicroBatches([batch, ...]) of 1..{k} micro-batches, "
                    f"got {type(group).__name__}; fit() groups batches for you"
                )
            r = len(group)
            if not 1 <= r <= k:
                raise ValueError(f"accumulate({k}): got {r} micro-batches, expected 1..{k}")
            shares = _shares(group, share_of)
            total: dict[str, torch.Tensor] = {}
            loss: Any = None
            metrics: Metrics = {}
            for i, (mb, w_i) in enumerate(zip(group, shares)):
                res = grad_fn(state, mb, weight=w_i if weight is None else weight * w_i, micro=i)
                if res.grads.keys() == total.keys():
                    torch._foreach_add_(list(total.values()), list(res.grads.values()))
                else:  # first micro-batch, or a param unused by some micro-batches
                    for n, g in res.grads.items():
                        if n in total:
                            total[n].add_(g)
                        else:
                            total[n] = g
                loss = res.loss * w_i if loss is None else loss + res.loss * w_i
                for name, v in res.metrics.items():
                    if isinstance(v, torch.Tensor) and v.is_floating_point():
                        metrics[name] = v * w_i if name not in metrics else metrics[name] + v * w_i
                    else:
                        metrics[name] = v
            return Grads(loss, total, metrics)

        return grad_sum

    def __repr__(self) -> str:
        return f"accumulate({self.micro_batches})"


def _shares(group: Sequence[Any], weight: Callable[[Any], float] | None) -> list[float]:
    if weight is None:
        return [1.0 / len(group)] * len(group)
    w = [float(weight(mb)) for mb in group]
    total = sum(w)
    if total <= 0:
        raise ValueError(f"accumulate: micro-batch weights sum to {total}; expected > 0")
    return [x / total for x in w]


def accumulate(k: int, weight: Callable[[Any], float] | None = None) -> Wrapper:
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
    return _Accumulate(k, weight)


# ----------------------------------------------------------------- amp
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
        _once(_Amp, "amp (autocast and loss scaling)", before)
        if self.scaling and any(isinstance(w, _CheckFinite) for w in before):
            raise ValueError(
                "check_finite() is written before amp('float16'): it would raise on the loss scaler's routine "
                "overflows, which amp skips. Write it after amp."
            )

    def init(self, state: TrainState, parts: tuple[Part, ...]) -> Any:
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
                return grad_fn(state, batch, weight=weight, micro=micro)

        return autocast

    def gradient(self, apply: ApplyFn, part: Part) -> ApplyFn:
        if self.name is None:
            return apply
        name, dynamic = self.name, self.loss_scale == "dynamic"
        factors = (self.growth_factor, self.backoff_factor, self.growth_interval)

        def unscaled(state: TrainState, g: Grads) -> tuple[TrainState, Metrics]:
            scaler = part.get(state.extra[name])
            found_inf = _unscale_(g.grads, scaler.scale)
            if bool(found_inf):  # the one host read: skip the update, as GradScaler.step does
                new_state, metrics = state, dict(g.metrics)
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
    has its own scaler, as each of MMEngine's AmpOptimWrappers does. Skipping
    needs one host read of the overflow flag per step, as GradScaler does.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"amp: dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    if not (
        loss_scale is None
        or loss_scale == "dynamic"
        or (
            isinstance(loss_scale, (int, float))
            and not isinstance(loss_scale, bool)
            and loss_scale > 0
        )
    ):
        raise ValueError(
            f"amp: loss_scale must be 'dynamic', a positive number or None, got {loss_scale!r}"
        )
    return _Amp(dtype, loss_scale, (init_scale, growth_factor, backoff_factor, growth_interval))


# ----------------------------------------------------------------- ema
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
                    torch._foreach_copy_(cache["avg"], cache["src"])
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
