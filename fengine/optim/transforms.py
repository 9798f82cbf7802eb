"""Gradient preprocessing: clipping, weight decay, scaling.

Clipping reproduces ``torch.nn.utils.clip_grad_norm_`` / ``clip_grad_value_``
(foreach) exactly, without host syncs: the clip coefficient stays a tensor.
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import NamedTuple

import torch
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype

from fengine.optim.base import (
    EmptyState,
    GradientTransformation,
    Hyper,
    check_hyper,
    pick,
    resolve,
)


__all__ = [
    "ClipByGlobalNormState",
    "add_decayed_weights",
    "clip_by_global_norm",
    "clip_by_value",
    "global_norm",
    "scale",
    "scale_by_schedule",
]


def _real(value: object) -> bool:
    """A real number that is not a bool (True is no threshold); NaN fails the range checks."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def global_norm(tensors: list[torch.Tensor], norm_type: float = 2.0) -> torch.Tensor:
    """The norm of all ``tensors`` viewed as one vector, as ``clip_grad_norm_`` computes it.

    For sharded tensors (DTensors, `fengine.sharding`) it is the norm of the full tensors,
    computed as ``clip_grad_norm_`` does on them (each shard's norm, reduced across ranks),
    and returned as a plain tensor with the same value on every rank.
    """
    if not tensors:
        return torch.tensor(0.0)
    return _total_norm(_by_device_and_dtype(tensors), tensors[0].device, norm_type)


def _by_device_and_dtype(tensors: list[torch.Tensor]) -> list[tuple[torch.device, list]]:
    """``tensors`` grouped by (device, dtype) as ``clip_grad_norm_`` groups them (in the order
    the groups first appear): it stacks the per-tensor norms in that order."""
    if torch.compiler.is_compiling():  # dynamo knows torch's wrapper
        groups = _group_tensors_by_device_and_dtype([tensors])  # type: ignore[list-item]
    else:  # its C function: the wrapper's no_grad decorator costs more than the grouping
        groups = torch._C._group_tensors_by_device_and_dtype([tensors], False)  # type: ignore[list-item]
    return [(device, ts) for (device, _), ([ts], _) in groups.items()]


def _total_norm(groups, first: torch.device, norm_type: float) -> torch.Tensor:
    """``clip_grad_norm_``'s total norm of the (device, dtype) ``groups``, on device ``first``."""
    norms: list[torch.Tensor] = []
    for _, ts in groups:
        norms.extend(torch._foreach_norm(ts, norm_type))
    if any(device != first for device, _ in groups):
        norms = [n.to(first) for n in norms]
    total = torch.linalg.vector_norm(torch.stack(norms), norm_type)
    full = getattr(total, "full_tensor", None)  # a DTensor: replicated here, so no communication
    return full() if full is not None else total


class ClipByGlobalNormState(NamedTuple):
    grad_norm: torch.Tensor
    """Pre-clip global norm of the last update (reported as metric ``grad_norm``)."""

    def metrics(self) -> dict[str, torch.Tensor]:
        return {"grad_norm": self.grad_norm}


def clip_by_global_norm(max_norm: float, norm_type: float = 2.0) -> GradientTransformation:
    """Scale gradients so their global norm is at most ``max_norm`` (``clip_grad_norm_``).

    The pre-clip norm is reported in the step metrics as ``grad_norm``, as
    MMEngine logs it. Under fp16 AMP the step unscales gradients before this runs.
    """
    if not _real(max_norm) or not max_norm > 0:
        raise ValueError(
            "clip_by_global_norm: max_norm must be a positive number (inf: report grad_norm without "
            f"clipping), got {max_norm!r}"
        )
    if not _real(norm_type) or not norm_type > 0:
        raise ValueError(
            f"clip_by_global_norm: norm_type must be a number > 0 (inf: max norm), got {norm_type!r}"
        )
    norm_type = float(norm_type)
    max_norm = float(max_norm)

    def init_fn(params):
        if not params:
            return ClipByGlobalNormState(torch.zeros(()))
        # the dtype the norm of gradients like ``params`` has (torch.stack promotes the norms),
        # so that a checkpoint of an updated state loads into a fresh one
        dtypes = {p.dtype.to_real() for p in params.values()}
        dtype = functools.reduce(torch.promote_types, dtypes)
        device = next(iter(params.values())).device
        return ClipByGlobalNormState(torch.zeros((), dtype=dtype, device=device))

    def update_fn(grads, state, params=None, *, step=None):
        del params, step
        if not grads:  # a norm of 0, in the state's own dtype and device (a checkpoint loads)
            return grads, ClipByGlobalNormState(torch.zeros_like(state.grad_norm))
        groups = _by_device_and_dtype(list(grads.values()))
        total = _total_norm(groups, next(iter(grads.values())).device, norm_type)
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for device, g in groups:  # per group, as clip_grad_norm_ (one kernel per dtype)
            torch._foreach_mul_(g, coef.to(device))
        # kept in the state's dtype: the grads present this step (a wider param without one)
        # may give the norm another, and a checkpoint of the state must load into a fresh one
        kept = state.grad_norm
        if total.dtype != kept.dtype or total.device != kept.device:
            total = total.to(kept.device, kept.dtype)
        return grads, ClipByGlobalNormState(total)

    return GradientTransformation(init_fn, update_fn)


def clip_by_value(clip_value: float) -> GradientTransformation:
    """Clamp every gradient element to ``[-clip_value, clip_value]`` (``clip_grad_value_``)."""
    if not _real(clip_value) or not 0 < clip_value < math.inf:
        raise ValueError(
            f"clip_by_value: clip_value must be a positive number below inf, got {clip_value!r}"
        )
    clip_value = float(clip_value)

    def init_fn(params):
        del params
        return EmptyState()

    def update_fn(grads, state, params=None, *, step=None):
        del params, step
        g = list(grads.values())
        torch._foreach_clamp_min_(g, -clip_value)
        torch._foreach_clamp_max_(g, clip_value)
        return grads, state

    return GradientTransformation(init_fn, update_fn)


def add_decayed_weights(weight_decay: Hyper) -> GradientTransformation:
    """``updates = grads + weight_decay * params`` (L2 regularisation as a gradient term)."""
    check_hyper("weight_decay", weight_decay, where="add_decayed_weights")

    def init_fn(params):
        del params
        return EmptyState()

    def update_fn(grads, state, params=None, *, step=None):
        if params is None:
            raise ValueError("add_decayed_weights needs params")
        wd = resolve(weight_decay, step if step is not None else 0)
        names = tuple(grads)
        ps = pick(params, names)
        if isinstance(wd, torch.Tensor):  # a schedule under the compiled step: a 0-d tensor
            out = torch._foreach_add(list(grads.values()), torch._foreach_mul(ps, wd))
        elif wd == 0:
            return grads, state
        else:
            out = torch._foreach_add(list(grads.values()), ps, alpha=wd)
        return dict(zip(names, out)), state

    return GradientTransformation(init_fn, update_fn)


def scale(factor: float) -> GradientTransformation:
    """Multiply updates by a constant (e.g. ``scale(-lr)`` ends a hand-made SGD chain): a finite
    number or a 0-d tensor; a schedule goes to `scale_by_schedule`."""
    if callable(factor):
        raise TypeError(
            f"scale: factor must be a number; for a schedule use scale_by_schedule, got {factor!r}"
        )
    if not (_real(factor) or isinstance(factor, torch.Tensor) and factor.dim() == 0):
        raise TypeError(f"scale: factor must be a finite number or a 0-d tensor, got {factor!r}")
    if not math.isfinite(factor):
        raise ValueError(f"scale: factor must be a finite number or a 0-d tensor, got {factor!r}")
    return scale_by_schedule(lambda _: factor)


def scale_by_schedule(schedule: Hyper) -> GradientTransformation:
    """Multiply updates by ``schedule(step)`` (global step)."""

    def init_fn(params):
        del params
        return EmptyState()

    def update_fn(grads, state, params=None, *, step=None):
        del params
        factor = resolve(schedule, step if step is not None else 0)
        g = list(grads.values())
        torch._foreach_mul_(g, factor)
        return grads, state

    return GradientTransformation(init_fn, update_fn)
