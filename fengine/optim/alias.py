"""Optimizers as gradient transformations, bitwise equal to ``torch.optim`` (foreach).

Each optimizer's ``apply`` replays the op sequence of torch's ``_multi_tensor_*``
kernel for one param group: the same ``torch._foreach_*`` calls with the same
scalars, so params and moments match ``torch.optim.X(foreach=True)`` bit for bit.
Hyper-parameters may be numbers or schedules ``step -> value``; the step count
used for bias correction is the optimizer's own ``num_updates`` (updates applied), the
schedule step is the global step (see `fengine.optim.base`).

Params with no gradient (unused in the forward) are skipped, as torch does: their
moments stay as they are, and they do not count the update. Torch keeps a step count
per param; here one count serves all, and a state's ``missed`` holds, for the params
that sat out any update, how many (empty in the usual case, every param with a gradient
every step, which costs nothing more). A param's own count, ``num_updates - missed[name]``,
drives its bias corrections (Adam / AdamW), its lr decay (Adagrad) and whether its
momentum buffer starts as its first gradient (SGD); RMSprop reads no count. (A compiled
step's gradients are zeros for unused params: there, no param misses one.)

Each state reports, by `fengine.optim.collect_metrics`, the ``lr`` of its last update
(the step metrics, logged as MMEngine logs ``lr``), and by `fengine.optim.hyperparams`
also its ``momentum`` (SGD / RMSprop momentum, Adam / AdamW ``b1``, 0 for Adagrad):
MMEngine's ``get_lr()`` / ``get_momentum()``. An update that is skipped (a `partition` group
without gradients, an fp16 overflow) still moves them to its step (``report``), as MMEngine's
schedulers set a group's lr whether or not it steps.

``fused=True`` (sgd, adam, adamw, adagrad) instead calls torch's fused kernel
(``torch._fused_adam_`` and friends) the way ``torch.optim.X(fused=True)`` does:
once per (device, dtype) group, with the step count as float32 ``state_steps``
tensors, so results are bitwise those of ``torch.optim.X(fused=True)`` (which
differ from the foreach results in the last bits).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any, NamedTuple, cast

import torch
from torch.utils._foreach_utils import (
    _get_fused_kernels_supported_devices,
    _group_tensors_by_device_and_dtype,
)

from fengine.optim.base import (
    GradientTransformation,
    Hyper,
    Params,
    check_hyper,
    pick,
    picker,
    resolve,
    resolver,
    update_via_apply,
)
from fengine.schedules import Schedule
from fengine.sharding import foreach_copy_
from fengine.step_check import counter, counts_within, shaped_like


__all__ = [
    "AdagradState",
    "AdamState",
    "RMSpropState",
    "SgdState",
    "adagrad",
    "adam",
    "adamw",
    "rmsprop",
    "sgd",
]


# the foreach kernels take lists; their out-of-place forms (``_foreach_neg``...) return tuples
_Tensors = list[torch.Tensor] | tuple[torch.Tensor, ...]


def _zeros(params, names=None):
    return {n: torch.zeros_like(p, memory_format=torch.preserve_format) for n, p in params.items()}


def _pick(d, grads):
    return pick(d, tuple(grads))


def _optimizer(init_fn, apply_fn, **reported: Hyper) -> GradientTransformation:
    """The transformation of an optimizer whose state reports ``reported`` (state field ->
    hyper-parameter, e.g. ``lr=lr``): its ``report`` moves the scheduled ones to a step."""
    scheduled = {field: h for field, h in reported.items() if callable(h)}
    report = None
    if scheduled:

        def report(state, step):
            at = state.num_updates if step is None else step  # as the update's own fallback
            values = {field: resolve(h, at) for field, h in scheduled.items()}
            if isinstance(step, torch.Tensor):  # a compiled step's state holds tensors
                return state._replace(**{f: _t(v) for f, v in values.items()})
            return state._replace(**{f: float(v) for f, v in values.items()})

    return GradientTransformation(init_fn, update_via_apply(apply_fn), apply_fn, report)


# torch keeps a fused optimizer's step as a float32 tensor bumped by 1 each update,
# which stops growing at 2**24; the kernels only read it (``.item()`` on CPU)
_FUSED_MAX_STEP = 2**24


def _foreach_max_step() -> float:
    """Where torch's foreach Adam / Adagrad step stops growing: its ``state['step']`` is a
    float32 tensor (stuck at 2**24) unless the default dtype is float64 when the state is made
    (`torch.optim.optimizer._get_scalar_dtype`; read here at each update, as the state's
    making is torch's first step)."""
    return math.inf if torch.get_default_dtype() == torch.float64 else float(_FUSED_MAX_STEP)


def _check_fused(params, where):
    """``torch.optim``'s fused precondition (`_device_dtype_check_for_fused`), as a ValueError at init."""
    devices = _get_fused_kernels_supported_devices()
    for n, p in params.items():
        if p.device.type not in devices or not torch.is_floating_point(p):
            raise ValueError(
                f"{where}: fused=True needs floating-point params on one of {devices}, "
                f"but param {n!r} is {p.dtype} on {p.device.type}; use fused=False"
            )


def _check_real(params, where):
    """Refuse complex params (``torch.optim`` updates them as real pairs, ``view_as_real``; this
    optimizer does not): a ValueError at init naming the first."""
    for n, p in params.items():
        if p.is_complex():
            raise ValueError(
                f"{where}: param {n!r} is {p.dtype}, but complex params are not supported; "
                "use sgd, from_torch(torch.optim.X, ...), or real params (torch.view_as_real)"
            )


def _fused_call(kernel, tensors, num_updates=None, counts=None, **kwargs):
    """Run torch's fused ``kernel`` once per (device, dtype) group, as ``torch.optim``'s ``_fused_*``.

    ``tensors`` are the per-param lists (params first; an empty list stays empty).
    With ``num_updates`` (the count after this update), one shared float32 0-d step tensor
    per device is appended as ``state_steps``; with ``counts`` (`_counts`), one per param.
    """
    if not tensors[0]:
        return
    if counts is not None:
        steps = [_step_tensor(c, p.device) for c, p in zip(counts, tensors[0])]
        tensors, num_updates = [*tensors, steps], None
    for (device, _), (lists, _) in _group_tensors_by_device_and_dtype(
        tensors, with_indices=False
    ).items():
        if num_updates is not None:
            lists = [*lists, [_step_tensor(num_updates, device)] * len(lists[0])]
        kernel(*lists, **kwargs)


def _step_tensor(count, device):
    return torch.full((), float(min(count, _FUSED_MAX_STEP)), dtype=torch.float32, device=device)


# ---------------------------------------------------------------- params without a gradient
def _counts(missed: dict[str, int], grads, num_updates: int) -> list[float] | None:
    """Each param's own step count after this update (torch's ``state[p]['step']``), in the
    order of ``grads``; None when all are at ``num_updates`` (none has missed an update)."""
    if not missed:
        return None
    return [float(num_updates - missed.get(n, 0)) for n in grads]


def _per_param(fn, num_updates, counts, n: int) -> list:
    """``fn`` of each param's count as torch's foreach kernels read it (stuck at
    `_foreach_max_step`): ``[fn(count) for count in counts]``, computed once when they are all
    ``num_updates``."""
    cap = _foreach_max_step()
    if counts is None:
        return [fn(min(float(num_updates), cap))] * n
    return [fn(min(c, cap)) for c in counts]


def _missed(missed: dict[str, int], grads, every: Mapping[str, Any]) -> dict[str, int]:
    """``missed`` after an update of the params in ``grads``: one more for each param of
    ``every`` (all the optimizer holds) that got no gradient. Kept in the order params first
    miss one, so a state's layout is a function of its history."""
    if len(grads) == len(every):
        return missed
    missed = dict(missed)
    for n in every:
        if n not in grads:
            missed[n] = missed.get(n, 0) + 1
    return missed


# ---------------------------------------------------------------- SGD
class SgdState(NamedTuple):
    num_updates: int
    momentum_buffer: dict[str, torch.Tensor]
    lr: float  # the lr of the last update (of step 0 before any): what the logs report
    momentum: float = 0.0  # the momentum of the last update, likewise
    # updates a param sat out (module doc), kept with momentum only; an update with momentum 0
    # (a schedule's) counts as one for all, as torch keeps no buffer then
    missed: dict[str, int] = {}

    def metrics(self) -> dict[str, float]:
        return {"lr": self.lr}

    def hyperparams(self) -> dict[str, float]:
        return {"lr": self.lr, "momentum": self.momentum}

    def loaded_problems(self, params: Params, buffers: Params) -> list[str]:
        """What a state read from a file must hold (see `fengine.step_check.loaded_problems`)."""
        return (
            counter("num_updates", self.num_updates)
            + shaped_like("momentum_buffer", self.momentum_buffer, params)
            + counts_within("missed", self.missed, self.num_updates, params)
        )


def _starting(state: SgdState, grads) -> bool | set[str]:
    """Whether this update is the first with a gradient (torch starts the momentum buffer as
    a copy of it) for every param of ``grads``, for none, or else for which of them."""
    if state.num_updates == 0:
        return True
    if state.num_updates not in state.missed.values():  # (C-level scan, no param starts)
        return False
    new = {n for n, k in state.missed.items() if k == state.num_updates and n in grads}
    return True if len(new) == len(grads) else new or False


def _no_momentum(momentum: Hyper) -> bool:
    """Whether torch's SGD constructor would see momentum <= 0: a number <= 0, or a fengine
    schedule whose base (MMEngine's initial momentum) is and which starts there. (Another
    schedule may start at 0 under MMEngine with a positive initial value: not refused.)"""
    if isinstance(momentum, Schedule):
        return momentum.base <= 0 and momentum(0) <= 0
    return not callable(momentum) and momentum <= 0


def sgd(
    lr: Hyper,
    momentum: Hyper = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
    weight_decay: Hyper = 0.0,
    maximize: bool = False,
    fused: bool = False,
) -> GradientTransformation:
    """SGD with momentum/Nesterov and coupled weight decay, as ``torch.optim.SGD`` (``fused``: its fused kernel)."""
    where = "sgd"
    check_hyper("lr", lr, where=where)
    check_hyper("momentum", momentum, where=where)
    check_hyper("weight_decay", weight_decay, where=where)
    check_hyper("dampening", dampening, low=-math.inf, where=where, schedule=False)
    if nesterov and (dampening != 0 or _no_momentum(momentum)):
        raise ValueError(
            "sgd: nesterov=True requires momentum > 0 and dampening = 0 (torch: Nesterov "
            f"momentum requires a momentum and zero dampening), got momentum={momentum!r}, "
            f"dampening={dampening!r}"
        )
    uses_momentum = callable(momentum) or momentum != 0
    # torch starts the buffers at the first update with momentum != 0: the compiled step starts
    # them at update 0, so a schedule from 0 runs eagerly (the traced branch raises)
    momentum_from_zero = callable(momentum) and float(resolve(momentum, 0)) == 0

    def init_fn(params):
        if fused:
            _check_fused(params, where)
        return SgdState(
            0,
            _zeros(params) if uses_momentum else {},
            float(resolve(lr, 0)),
            float(resolve(momentum, 0)),
            {},
        )

    hypers = resolver(lr, momentum, weight_decay)

    def apply_fn(grads, state, params, *, step=None):
        lr_t, mom, wd = hypers(state.num_updates if step is None else step)
        if isinstance(state.num_updates, torch.Tensor):  # a compiled step: tensor counters
            if momentum_from_zero:
                raise TypeError(
                    "compiled step: sgd's momentum schedule starts at 0 (torch starts the "
                    "buffers at its first non-zero value, which the compiled step does not track "
                    "yet); use compile=False for it"
                )
            wd_on = callable(weight_decay) or weight_decay != 0
            _sgd_traced(
                grads,
                state,
                params,
                lr_t,
                mom,
                wd if wd_on else None,
                dampening,
                nesterov,
                maximize,
            )
            counted = state.num_updates + 1  # tensors where the state holds numbers
            return params, state._replace(num_updates=counted, lr=_t(lr_t), momentum=_t(mom))
        missed = state.missed
        if uses_momentum:  # an update with momentum 0 keeps no buffer, as torch: all miss it
            missed = _missed(missed, grads if mom != 0 else {}, state.momentum_buffer)
        p = _pick(params, grads)
        g: _Tensors = list(grads.values())
        if fused:
            bufs = _pick(state.momentum_buffer, grads) if mom != 0 else []
            first = mom != 0 and _starting(state, grads)
            kernel = functools.partial(
                torch._fused_sgd_,
                weight_decay=wd,
                momentum=mom,
                lr=lr_t,
                dampening=dampening,
                nesterov=nesterov,
                maximize=maximize,
            )
            if isinstance(first, set):  # torch's fused SGD raises here: one call for each kind
                starts = [n in first for n in grads]
                for flag in (True, False):
                    part = [[x for x, s in zip(xs, starts) if s is flag] for xs in (p, g, bufs)]
                    _fused_call(kernel, part, is_first_step=flag)
            else:
                _fused_call(kernel, [p, g, bufs], is_first_step=first)
            return params, SgdState(
                state.num_updates + 1, state.momentum_buffer, float(lr_t), float(mom), missed
            )
        if maximize:
            g = torch._foreach_neg(g)
        if wd != 0:
            if maximize:
                torch._foreach_add_(g, p, alpha=wd)
            else:
                g = torch._foreach_add(g, p, alpha=wd)
        if mom != 0:
            bufs = _pick(state.momentum_buffer, grads)
            first = _starting(state, grads)
            if isinstance(first, set):
                _sgd_momentum_starting(list(grads), bufs, g, first, mom, dampening)
            elif first:  # torch starts the buffer as a clone of the first gradient
                foreach_copy_(bufs, g)
            else:
                torch._foreach_mul_(bufs, mom)
                torch._foreach_add_(bufs, g, alpha=1 - dampening)
            if nesterov:
                torch._foreach_add_(g, bufs, alpha=mom)
            else:
                g = bufs
        torch._foreach_add_(p, g, alpha=-lr_t)
        return params, SgdState(
            state.num_updates + 1, state.momentum_buffer, float(lr_t), float(mom), missed
        )

    return _optimizer(init_fn, apply_fn, lr=lr, momentum=momentum)


def _sgd_momentum_starting(names, bufs, g, first: set[str], mom, dampening) -> None:
    """The momentum buffers of an update where the params ``first`` start theirs (a copy of the
    gradient) and the others do not: as torch, per (device, dtype) group, its foreach kernels
    for a group where none starts and its loop, one param at a time, for the others."""
    groups = _group_tensors_by_device_and_dtype([bufs, list(g)], with_indices=True)
    for lists, indices in groups.values():
        group_bufs, group_g = cast(list[list[torch.Tensor]], lists)
        if not any(names[i] in first for i in indices):
            torch._foreach_mul_(group_bufs, mom)
            torch._foreach_add_(group_bufs, group_g, alpha=1 - dampening)
            continue
        for i, buf, d in zip(indices, group_bufs, group_g):
            if names[i] in first:
                buf.copy_(d)
            else:
                buf.mul_(mom).add_(d, alpha=1 - dampening)


# ---------------------------------------------------------------- Adam / AdamW
class AdamState(NamedTuple):
    num_updates: int
    exp_avg: dict[str, torch.Tensor]
    exp_avg_sq: dict[str, torch.Tensor]
    max_exp_avg_sq: dict[str, torch.Tensor]
    lr: float  # the lr of the last update (of step 0 before any): what the logs report
    momentum: float = (
        0.9  # beta1 of the last update, reported as ``momentum`` (MMEngine's get_momentum)
    )
    missed: dict[str, int] = {}  # updates a param sat out without a gradient (module doc)

    def metrics(self) -> dict[str, float]:
        return {"lr": self.lr}

    def hyperparams(self) -> dict[str, float]:
        return {"lr": self.lr, "momentum": self.momentum}

    def loaded_problems(self, params: Params, buffers: Params) -> list[str]:
        """What a state read from a file must hold (see `fengine.step_check.loaded_problems`)."""
        return (
            counter("num_updates", self.num_updates)
            + shaped_like("exp_avg", self.exp_avg, params)
            + shaped_like("exp_avg_sq", self.exp_avg_sq, params)
            + shaped_like("max_exp_avg_sq", self.max_exp_avg_sq, params)
            + counts_within("missed", self.missed, self.num_updates, params)
        )


def _adam(
    lr, b1, b2, eps, weight_decay, amsgrad, maximize, decoupled, fused, where
) -> GradientTransformation:
    check_hyper("lr", lr, where=where)
    check_hyper("b1", b1, high=1.0, where=where)
    check_hyper("b2", b2, high=1.0, where=where)
    check_hyper("eps", eps, where=where, schedule=False)
    check_hyper("weight_decay", weight_decay, where=where)

    def init_fn(params):
        if fused:
            _check_fused(params, where)
        _check_real(params, where)
        return AdamState(
            0,
            _zeros(params),
            _zeros(params),
            _zeros(params) if amsgrad else {},
            float(resolve(lr, 0)),
            float(resolve(b1, 0)),
            {},
        )

    hypers = resolver(lr, b1, b2, weight_decay)

    def apply_fn(grads, state, params, *, step=None):
        lr_t, beta1, beta2, wd = hypers(state.num_updates if step is None else step)
        num_updates = state.num_updates + 1
        if isinstance(num_updates, torch.Tensor):  # a compiled step: tensor counters
            wd_on = callable(weight_decay) or weight_decay != 0
            hyper = (lr_t, beta1, beta2, wd if wd_on else None, eps)
            _adam_traced(grads, state, params, hyper, num_updates, amsgrad, maximize, decoupled)
            return params, state._replace(num_updates=num_updates, lr=_t(lr_t), momentum=_t(beta1))
        counts = _counts(state.missed, grads, num_updates)
        missed = _missed(state.missed, grads, state.exp_avg)
        pick = picker(tuple(grads))
        p = pick(params)
        g: _Tensors = list(grads.values())
        m = pick(state.exp_avg)
        v = pick(state.exp_avg_sq)
        if fused:
            _fused_call(
                torch._fused_adamw_ if decoupled else torch._fused_adam_,
                [p, g, m, v, _pick(state.max_exp_avg_sq, grads) if amsgrad else []],
                num_updates,
                counts,
                amsgrad=amsgrad,
                lr=lr_t,
                beta1=beta1,
                beta2=beta2,
                weight_decay=wd,
                eps=eps,
                maximize=maximize,
            )
            return params, state._replace(
                num_updates=num_updates, lr=float(lr_t), momentum=float(beta1), missed=missed
            )
        if maximize:
            g = torch._foreach_neg(g)
        if wd != 0:
            if decoupled:
                torch._foreach_mul_(p, 1 - lr_t * wd)
            elif maximize:
                torch._foreach_add_(g, p, alpha=wd)
            else:
                g = torch._foreach_add(g, p, alpha=wd)
        torch._foreach_lerp_(m, g, 1 - beta1)
        torch._foreach_mul_(v, beta2)
        torch._foreach_addcmul_(v, g, g, 1 - beta2)
        del g
        n = len(p)
        # torch's per-param lists: [(lr / (1 - beta1**step)) * -1], [(1 - beta2**step) ** 0.5]
        step_size = _per_param(lambda c: (lr_t / (1 - beta1**c)) * -1, num_updates, counts, n)
        bias_correction2_sqrt = _per_param(lambda c: (1 - beta2**c) ** 0.5, num_updates, counts, n)
        if amsgrad:
            vmax = pick(state.max_exp_avg_sq)
            torch._foreach_maximum_(vmax, v)
            denom = torch._foreach_sqrt(vmax)
        else:
            denom = torch._foreach_sqrt(v)
        torch._foreach_div_(denom, bias_correction2_sqrt)
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(p, m, denom, step_size)
        return params, state._replace(
            num_updates=num_updates, lr=float(lr_t), momentum=float(beta1), missed=missed
        )

    return _optimizer(init_fn, apply_fn, lr=lr, momentum=b1)


def adam(
    lr: Hyper = 1e-3,
    b1: Hyper = 0.9,
    b2: Hyper = 0.999,
    eps: float = 1e-8,
    weight_decay: Hyper = 0.0,
    amsgrad: bool = False,
    maximize: bool = False,
    fused: bool = False,
) -> GradientTransformation:
    """Adam with L2 (coupled) weight decay, as ``torch.optim.Adam`` (``fused``: its fused kernel).

    ``b1`` may be scheduled (MMEngine momentum schedulers).
    """
    return _adam(
        lr, b1, b2, eps, weight_decay, amsgrad, maximize, decoupled=False, fused=fused, where="adam"
    )


def adamw(
    lr: Hyper = 1e-3,
    b1: Hyper = 0.9,
    b2: Hyper = 0.999,
    eps: float = 1e-8,
    weight_decay: Hyper = 1e-2,
    amsgrad: bool = False,
    maximize: bool = False,
    fused: bool = False,
) -> GradientTransformation:
    """AdamW (decoupled weight decay), as ``torch.optim.AdamW`` (``fused``: its fused kernel)."""
    return _adam(
        lr, b1, b2, eps, weight_decay, amsgrad, maximize, decoupled=True, fused=fused, where="adamw"
    )


def _t(x: float | torch.Tensor) -> torch.Tensor:
    """A reported hyper-parameter as a 0-d float64 tensor (a compiled step's state holds tensors)."""
    return x if isinstance(x, torch.Tensor) else torch.tensor(x, dtype=torch.float64)


def _adam_traced(grads, state, params, hyper, num_updates, amsgrad, maximize, decoupled) -> None:
    """Adam / AdamW for a compiled step: hyper-parameters and the count are 0-d tensors.

    The formulas of torch.optim's capturable Adam, one param at a time (inductor fuses
    them); within a stated tolerance of the foreach kernel, not bitwise.
    """
    lr_t, beta1, beta2, wd, eps = hyper

    def corrections(count):
        n = count.to(torch.float64)
        return lr_t / (1 - beta1**n), (1 - beta2**n) ** 0.5

    shared = corrections(num_updates)
    for name, g in grads.items():
        p, m, v = params[name], state.exp_avg[name], state.exp_avg_sq[name]
        missed = state.missed.get(name)
        step_size, bias_correction2_sqrt = (
            shared if missed is None else corrections(num_updates - missed)
        )
        if maximize:
            g = -g
        if wd is not None:
            if decoupled:
                p.mul_(1 - lr_t * wd)
            else:
                g = g + p * wd
        w = 1 - beta1
        m.lerp_(g, w.to(m.dtype) if isinstance(w, torch.Tensor) else w)
        v.mul_(beta2).add_(g * g * (1 - beta2))
        if amsgrad:
            vmax = state.max_exp_avg_sq[name]
            vmax.copy_(torch.maximum(vmax, v))
            v = vmax
        denom = v.sqrt() / bias_correction2_sqrt + eps
        p.sub_(m / denom * step_size)


def _sgd_traced(grads, state, params, lr_t, mom, wd, dampening, nesterov, maximize) -> None:
    """SGD for a compiled step (``wd`` None: no weight decay); torch.optim.SGD's formulas."""
    first = state.num_updates == 0
    for name, g in grads.items():
        p = params[name]
        d = -g if maximize else g
        if wd is not None:
            d = d + p * wd
        if name in state.momentum_buffer:
            buf = state.momentum_buffer[name]
            starts = state.num_updates == state.missed[name] if name in state.missed else first
            moving = torch.where(starts, d, buf * mom + d * (1 - dampening))
            if isinstance(mom, torch.Tensor):  # scheduled: an update with momentum 0 leaves the
                on = mom != 0  # buffer as it is and steps by d (as torch)
                buf.copy_(torch.where(on, moving, buf))
                d = torch.where(on, d + buf * mom if nesterov else buf, d)
            else:  # a constant momentum (a buffer exists: it is not 0)
                buf.copy_(moving)
                d = d + buf * mom if nesterov else buf
        p.sub_(d * lr_t)


# ---------------------------------------------------------------- RMSprop
class RMSpropState(NamedTuple):
    num_updates: int
    square_avg: dict[str, torch.Tensor]
    grad_avg: dict[str, torch.Tensor]
    momentum_buffer: dict[str, torch.Tensor]
    lr: float  # the lr of the last update (of step 0 before any): what the logs report
    momentum: float = 0.0  # the momentum of the last update, likewise

    def metrics(self) -> dict[str, float]:
        return {"lr": self.lr}

    def hyperparams(self) -> dict[str, float]:
        return {"lr": self.lr, "momentum": self.momentum}

    def loaded_problems(self, params: Params, buffers: Params) -> list[str]:
        """What a state read from a file must hold (see `fengine.step_check.loaded_problems`)."""
        return (
            counter("num_updates", self.num_updates)
            + shaped_like("square_avg", self.square_avg, params)
            + shaped_like("grad_avg", self.grad_avg, params)
            + shaped_like("momentum_buffer", self.momentum_buffer, params)
        )


def rmsprop(
    lr: Hyper = 1e-2,
    alpha: float = 0.99,
    eps: float = 1e-8,
    weight_decay: Hyper = 0.0,
    momentum: Hyper = 0.0,
    centered: bool = False,
    maximize: bool = False,
) -> GradientTransformation:
    """RMSprop, as ``torch.optim.RMSprop``."""
    where = "rmsprop"
    for name, value in (("lr", lr), ("weight_decay", weight_decay), ("momentum", momentum)):
        check_hyper(name, value, where=where)
    for name, value in (("alpha", alpha), ("eps", eps)):
        check_hyper(name, value, where=where, schedule=False)
    uses_momentum = callable(momentum) or momentum > 0

    def init_fn(params):
        _check_real(params, where)
        return RMSpropState(
            0,
            _zeros(params),
            _zeros(params) if centered else {},
            _zeros(params) if uses_momentum else {},
            float(resolve(lr, 0)),
            float(resolve(momentum, 0)),
        )

    def apply_fn(grads, state, params, *, step=None):
        t = state.num_updates if step is None else step
        lr_t, wd, mom = resolve(lr, t), resolve(weight_decay, t), resolve(momentum, t)
        p = _pick(params, grads)
        g: _Tensors = list(grads.values())
        sq = _pick(state.square_avg, grads)
        if maximize:
            g = torch._foreach_neg(g)
        if wd != 0:
            if maximize:
                torch._foreach_add_(g, p, alpha=wd)
            else:
                g = torch._foreach_add(g, p, alpha=wd)
        torch._foreach_mul_(sq, alpha)
        torch._foreach_addcmul_(sq, g, g, value=1 - alpha)
        if centered:
            ga = _pick(state.grad_avg, grads)
            torch._foreach_lerp_(ga, g, 1 - alpha)
            avg = torch._foreach_addcmul(sq, ga, ga, value=-1)
            torch._foreach_sqrt_(avg)
            torch._foreach_add_(avg, eps)
        else:
            avg = torch._foreach_sqrt(sq)
            torch._foreach_add_(avg, eps)
        if mom > 0:
            buf = _pick(state.momentum_buffer, grads)
            torch._foreach_mul_(buf, mom)
            torch._foreach_addcdiv_(buf, g, avg)
            torch._foreach_add_(p, buf, alpha=-lr_t)
        else:
            torch._foreach_addcdiv_(p, g, avg, value=-lr_t)
        return params, state._replace(
            num_updates=state.num_updates + 1, lr=float(lr_t), momentum=float(mom)
        )

    return _optimizer(init_fn, apply_fn, lr=lr, momentum=momentum)


# ---------------------------------------------------------------- Adagrad
class AdagradState(NamedTuple):
    num_updates: int
    sum: dict[str, torch.Tensor]
    lr: float
    missed: dict[str, int] = {}  # updates a param sat out without a gradient (module doc)

    def metrics(self) -> dict[str, float]:
        return {"lr": self.lr}

    def hyperparams(self) -> dict[str, float]:
        return {"lr": self.lr, "momentum": 0.0}  # MMEngine's get_momentum: 0 without one

    def loaded_problems(self, params: Params, buffers: Params) -> list[str]:
        """What a state read from a file must hold (see `fengine.step_check.loaded_problems`)."""
        return (
            counter("num_updates", self.num_updates)
            + shaped_like("sum", self.sum, params)
            + counts_within("missed", self.missed, self.num_updates, params)
        )


def adagrad(
    lr: Hyper = 1e-2,
    lr_decay: float = 0.0,
    weight_decay: Hyper = 0.0,
    initial_accumulator_value: float = 0.0,
    eps: float = 1e-10,
    maximize: bool = False,
    fused: bool = False,
) -> GradientTransformation:
    """Adagrad, as ``torch.optim.Adagrad`` (``fused``: its fused kernel)."""
    where = "adagrad"
    check_hyper("lr", lr, where=where)
    check_hyper("weight_decay", weight_decay, where=where)
    for name, value in (
        ("lr_decay", lr_decay),
        ("initial_accumulator_value", initial_accumulator_value),
        ("eps", eps),
    ):
        check_hyper(name, value, where=where, schedule=False)

    def init_fn(params):
        if fused:
            _check_fused(params, where)
        _check_real(params, where)
        sums = {
            n: torch.full_like(p, initial_accumulator_value, memory_format=torch.preserve_format)
            for n, p in params.items()
        }
        return AdagradState(0, sums, float(resolve(lr, 0)), {})

    def apply_fn(grads, state, params, *, step=None):
        t = state.num_updates if step is None else step
        lr_t, wd = resolve(lr, t), resolve(weight_decay, t)
        num_updates = state.num_updates + 1
        counts = _counts(state.missed, grads, num_updates)
        missed = _missed(state.missed, grads, state.sum)
        p = _pick(params, grads)
        g: _Tensors = list(grads.values())
        sums = _pick(state.sum, grads)
        if fused:
            _fused_call(
                torch._fused_adagrad_,
                [p, g, sums],
                num_updates,
                counts,
                lr=lr_t,
                lr_decay=lr_decay,
                weight_decay=wd,
                eps=eps,
                maximize=maximize,
            )
            return params, AdagradState(num_updates, state.sum, float(lr_t), missed)
        if maximize:
            g = torch._foreach_neg(g)
        if wd != 0:
            if maximize:
                torch._foreach_add_(g, p, alpha=wd)
            else:
                g = torch._foreach_add(g, p, alpha=wd)
        minus_clr = _per_param(
            lambda c: -lr_t / (1 + (c - 1) * lr_decay), num_updates, counts, len(p)
        )
        torch._foreach_addcmul_(sums, g, g, value=1)
        std = torch._foreach_sqrt(sums)
        torch._foreach_add_(std, eps)
        numerator: _Tensors
        if wd != 0 or maximize:
            torch._foreach_mul_(g, minus_clr)
            numerator = g
        else:
            numerator = torch._foreach_mul(g, minus_clr)
        torch._foreach_addcdiv_(p, numerator, std)
        return params, AdagradState(num_updates, state.sum, float(lr_t), missed)

    return _optimizer(init_fn, apply_fn, lr=lr)
