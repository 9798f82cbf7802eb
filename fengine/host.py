"""Metric values to the host: one stacked device -> host copy per device, not one per value.

Shared by the Logger (every ``interval`` updates) and `fengine.finite.FiniteWatch`
(every 50): each reads many one-element tensors, and a read per value would cost a
host sync (and several small ops) each.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Sequence
from typing import Any

import torch


__all__ = ["to_host"]


def to_host(values: Sequence[Any]) -> list[float]:
    """Python floats of ``values`` (tensors, numbers; tensors averaged on their device),
    with one stacked transfer per device."""
    # map/compress rather than comprehensions: no bytecode per value (this reads every
    # logged value, and the finite check's 50 losses)
    is_tensor = list(map(isinstance, values, itertools.repeat(torch.Tensor)))
    if not any(is_tensor):
        return list(map(float, values))
    if all(is_tensor):
        fast = _one_element_tensors(values)
        if fast is not None:
            return fast
    where = list(itertools.compress(range(len(values)), is_tensor))
    out = [0.0 if t else v for v, t in zip(values, is_tensor)]  # 0.0: a tensor's place
    out = list(map(float, out))
    fast = _one_element_tensors([values[i] for i in where])
    if fast is not None:
        for i, x in zip(where, fast):
            out[i] = x
        return out
    groups: dict[torch.device, list[int]] = {}
    for i in where:
        groups.setdefault(values[i].device, []).append(i)
    with torch.no_grad():
        for device, idx in groups.items():
            dtype = torch.float32 if device.type == "mps" else torch.float64
            by_dtype: dict[torch.dtype, tuple[list[int], list[torch.Tensor]]] = {}
            for i in idx:
                t = values[i]
                if t.dim():  # a one-element tensor, or the mean of a larger one
                    t = t.reshape(()) if t.numel() == 1 else t.float().mean()
                order, parts = by_dtype.setdefault(t.dtype, ([], []))
                order.append(i)
                parts.append(t)
            if len(by_dtype) == 1:  # no cast, no concatenation (float() is exact)
                ((order, parts),) = by_dtype.values()
                host = torch.stack(parts).tolist()
            else:  # one stack and cast per dtype (the values of per-element casts), one copy
                host = torch.cat([torch.stack(p).to(dtype) for _, p in by_dtype.values()]).tolist()
                order = [i for o, _ in by_dtype.values() for i in o]
            for i, x in zip(order, host):
                out[i] = float(x)
    return out


def _one_element_tensors(tensors: Sequence[torch.Tensor]) -> list[float] | None:
    """The usual case in one stack and one copy: one-element tensors of one dtype on one device
    (a step's loss terms); None for anything else (the general path sorts it out)."""
    if len(set(map(_dtype, tensors))) != 1:
        return None
    try:
        with torch.no_grad():
            stacked = torch.stack(list(tensors))
    except RuntimeError:  # shapes or devices differ
        return None
    if stacked.numel() != len(tensors):
        return None
    return list(map(float, stacked.reshape(-1).tolist()))


_dtype = operator.attrgetter("dtype")
