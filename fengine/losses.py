"""What a loss function may return, and how it becomes the optimised loss and the logged terms."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


__all__ = ["Metrics", "parse_losses"]

Metrics = dict[str, Any]


def parse_losses(out: Any) -> tuple[torch.Tensor, Metrics]:
    """Turn what a loss function returned into ``(loss, metrics)``.

    Accepts a tensor; a dict of losses (MMEngine's ``parse_losses``: every value
    is ``mean()``-reduced, lists of tensors summed after that, and only keys
    containing ``"loss"`` are summed into the optimised loss, the others are just
    logged); or ``(loss, aux)`` with ``loss`` one of the above and ``aux`` a dict
    of extra values to log.
    """
    aux: Mapping[str, Any] = {}
    if isinstance(out, tuple):
        if len(out) != 2 or not isinstance(out[1], Mapping):
            raise TypeError(
                f"loss_fn returned a tuple of {len(out)} items; expected (loss, aux) with aux a dict of values to log"
            )
        out, aux = out
    if isinstance(out, torch.Tensor):
        loss = out if out.ndim == 0 else out.mean()
        metrics: Metrics = {"loss": loss.detach()}
    elif isinstance(out, Mapping):
        metrics, terms = {}, []
        for name, value in out.items():
            if isinstance(value, torch.Tensor):
                value = value.mean()
            elif (
                isinstance(value, (list, tuple))
                and value
                and all(isinstance(v, torch.Tensor) for v in value)
            ):
                value = sum(v.mean() for v in value)
            else:
                raise TypeError(
                    f"loss_fn returned {name}={type(value).__name__}; each value must be a tensor or a list of tensors"
                )
            if "loss" in name:
                terms.append(value)
            metrics[name] = value.detach()
        if not terms:
            raise ValueError(
                f"loss_fn returned a dict with no key containing 'loss' (keys: {list(out)}); nothing to optimise"
            )
        loss = terms[0]
        for t in terms[1:]:
            loss = loss + t
        metrics = {"loss": loss.detach(), **metrics}
    else:
        raise TypeError(
            f"loss_fn must return a tensor, a dict of losses or (loss, aux); got {type(out).__name__}"
        )
    for name, value in aux.items():
        metrics[name] = value.detach() if isinstance(value, torch.Tensor) else value
    return loss, metrics
