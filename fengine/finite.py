"""Non-finite losses, caught by default without a per-step host sync.

`FiniteWatch` keeps each update's loss terms (the metrics whose name contains
"loss", as MMEngine's parse_losses sums them) and fp16 skip flags as the device
tensors they are, and reads them to the host in one transfer every ``every``
updates (and at the end). An update whose loss is NaN/Inf and that was not skipped
by the fp16 loss scaler raises `FloatingPointError` naming its step and terms.
The exact, per-step alternative is the `fengine.check_finite` wrapper, which stops
before the update (one host read per step).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

import torch

from fengine import distributed
from fengine.host import to_host


__all__ = ["FiniteWatch"]


class FiniteWatch:
    """Under several processes every check is agreed across ranks (one all-reduce): a rank whose
    own losses are finite still trains on the NaN gradients another rank averaged in, so all
    raise, and none saves those weights."""

    def __init__(
        self, every: int = 50, *, enabled: bool = True, device: torch.device | None = None
    ) -> None:
        self.every, self.enabled = every, enabled
        self.device = device if device is not None else torch.device("cpu")
        self.rows: list[tuple[int, Mapping[str, Any]]] = []

    def record(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Keep update ``step``'s metrics (references only); check once ``every`` are kept."""
        if self.enabled:
            self.rows.append((step, metrics))
            if len(self.rows) >= self.every:
                self.check()

    def check(self) -> None:
        """Read the kept values to the host (one transfer) and raise on the first non-finite loss
        (of any rank: see the class)."""
        if not self.enabled:
            return
        rows, self.rows = self.rows, []
        found = _first_non_finite(rows)
        if distributed.agree(found is not None, self.device) and found is None:
            raise FloatingPointError(
                "non-finite loss on another rank (this rank's losses are finite, but the update "
                "averaged its gradients in); see that rank's error. " + _ADVICE
            )
        if found is not None:
            step, bad = found
            raise FloatingPointError(
                f"non-finite loss at step {step}: "
                + ", ".join(f"{k}={v}" for k, v in bad.items())
                + ". "
                + _ADVICE
            )


_ADVICE = (
    "The parameters are not finite from this update on; resume from a checkpoint before it. "
    "fengine.check_finite() stops before the update instead (one host read per step); "
    "fit(check_nonfinite=False) trains on."
)


def _first_non_finite(rows: list[tuple[int, Mapping[str, Any]]]) -> tuple[int, dict] | None:
    """The first update of ``rows`` with a non-finite loss its fp16 scaler did not skip, and
    those terms; None when there is none. One host transfer."""
    picked = [
        (step, key, v)
        for step, metrics in rows
        for key in _watched(tuple(metrics))
        if isinstance(v := metrics[key], torch.Tensor) and v.numel() == 1
    ]
    if not picked:
        return None
    values = to_host([v for _, _, v in picked])  # one transfer, not one per value
    if all(map(math.isfinite, values)):
        return None
    by_step: dict[int, dict[str, float]] = {}
    for (step, key, _), value in zip(picked, values):
        by_step.setdefault(step, {})[key] = value
    for step, terms in by_step.items():
        bad = {
            k: v
            for k, v in terms.items()
            if "loss" in k and not math.isfinite(v) and not _skipped(k, terms)
        }
        if bad:
            return step, bad
    return None


@functools.lru_cache(maxsize=256)
def _watched(keys: tuple[str, ...]) -> tuple[str, ...]:
    """Of an update's metric names, the loss terms and fp16 skip flags (the same few every update)."""
    return tuple(k for k in keys if "loss" in k or k.endswith("update_skipped"))


def _skipped(key: str, terms: Mapping[str, float]) -> bool:
    """Was this loss's update skipped by an fp16 loss scaler (then a non-finite loss is routine)?"""
    # the flag of the longest prefix that has one: a multi_step part's ("gen/update_skipped"
    # for "gen/loss/cls"), else the step's; a "/" inside a loss's own name is no part
    prefix = key
    while prefix:
        prefix = prefix.rpartition("/")[0]
        flag = terms.get(f"{prefix}/update_skipped" if prefix else "update_skipped")
        if flag is not None:
            return bool(flag)
    return False
