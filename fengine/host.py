"""Metric values to the host: one stacked device -> host copy per device, not one per value.

Shared by the Logger (every ``interval`` updates) and `fengine.finite.FiniteWatch`
(every 50): each reads many one-element tensors, and a read per value would cost a
host sync (and several small ops) each.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


__all__ = ["to_host"]


def to_host(values: Sequence[Any]) -> list[float]:
    """Python floats of ``values`` (tensors, numbers; tensors averaged on their device),
    with one stacked transfer per device."""
    out: list[float] = [0.0] * len(values)
    groups: dict[torch.device, list[int]] = {}
    for i, v in enumerate(values):
        if isinstance(v, torch.Tensor):
            groups.setdefault(v.device, []).append(i)
        else:
            out[i] = float(v)
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
            if len(by_dtype) == 1:  # the usual case: no cast, no concatenation (float() is exact)
                ((order, parts),) = by_dtype.values()
                host = torch.stack(parts).tolist()
            else:  # one stack and cast per dtype (the values of per-element casts), one copy
                host = torch.cat([torch.stack(p).to(dtype) for _, p in by_dtype.values()]).tolist()
                order = [i for o, _ in by_dtype.values() for i in o]
            for i, x in zip(order, host):
                out[i] = float(x)
    return out
