"""`EarlyStopping`: end training when a validation metric stops improving (MMEngine EarlyStoppingHook).

Same rule, defaults and messages as ``mmengine.hooks.EarlyStoppingHook``:

* after each validation (``after_val_epoch``) the monitored value is compared
  with the best so far: with ``rule="greater"`` it counts as an improvement when
  ``not (best + min_delta > value)``, with ``rule="less"`` when
  ``not (best - min_delta < value)`` (an improvement of exactly ``min_delta``
  counts); an improvement resets the wait counter, anything else increments it,
  and training stops once it reaches ``patience``;
* a NaN/Inf value stops at once (``check_finite``), and so does a value past
  ``stopping_threshold``;
* ``rule=None`` is inferred from the name (case-insensitive exact match, then
  substring, against ``acc, top, AR@, auc, precision, mAP, mDice, mIoU, mAcc,
  aAcc`` -> greater and ``loss`` -> less);
* a metric missing from the results raises (`MissingMetricError`, a ``KeyError``
  that is also a ``RuntimeError``, MMEngine's type) naming it and the available
  keys; ``strict=False`` warns and skips the check instead, MMEngine's default
  (fengine defaults to strict: a misspelt monitor must not silently disable
  early stopping).

MMEngine sets ``runner.train_loop.stop_training``; here the handler returns
`Stop` (``fit`` then ends after the validation, as MMEngine's epoch loop checks
the flag only before the next epoch). The wait counter and best score are in
``state_dict()``, so a resumed run keeps counting.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any

import torch

from fengine.events import Handler, Priority, Snapshot, Stop
from fengine.handlers.checkpointer import infer_rule as _infer_rule


__all__ = ["EarlyStopping", "MissingMetricError", "infer_rule"]

_RULES = {"greater": lambda x, y: x > y, "less": lambda x, y: x < y}


class MissingMetricError(KeyError, RuntimeError):
    """The monitored metric is not among the evaluation results."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


def infer_rule(monitor: str) -> str:
    """'greater' or 'less' for a metric name, MMEngine's rule (exact match first, then substring)."""
    return _infer_rule(monitor, who="EarlyStopping", arg="monitor")


def _to_json(x: float) -> float | str:
    return x if math.isfinite(x) else repr(x)  # 'inf', '-inf', 'nan': strict-JSON safe


def _score(x: Any) -> float | None:
    """What `_to_json` wrote, as a float: a number or the repr of a non-finite one; else None."""
    if isinstance(x, bool):
        return None
    if isinstance(x, (int, float)) or x in ("inf", "-inf", "nan"):
        return float(x)
    return None


class EarlyStopping(Handler):
    """Stop training when ``monitor`` has not improved for ``patience`` validations.

    Args:
      monitor: key of the validation results (with its prefix, e.g. ``"accuracy/top1"``).
      rule: ``"greater"`` or ``"less"``; ``None`` infers it from the name (see `infer_rule`).
      patience: validations without improvement before stopping (0 acts as 1, as in MMEngine).
      min_delta: smallest change that counts as an improvement (MMEngine's
        signature default 0.1; its docstring says 0.01).
      stopping_threshold: stop as soon as the value is better than this.
      check_finite: stop when the value is NaN or infinite.
      strict: raise `MissingMetricError` when ``monitor`` is not in the results
        (default); ``False`` warns and skips, as MMEngine's default does.
      priority: default LOWEST (runs after checkpointing/logging of the same validation).
      name: the key its state is checkpointed under (default ``"early_stopping"``): give two
        EarlyStoppings in one run distinct names.
    """

    collective = True  # saves / stops on every rank at once

    priority = Priority.LOWEST
    name = "early_stopping"

    def __init__(
        self,
        monitor: str,
        *,
        rule: str | None = None,
        patience: int = 5,
        min_delta: float = 0.1,
        stopping_threshold: float | None = None,
        check_finite: bool = True,
        strict: bool = True,
        priority: int | str | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(priority=priority, name=name)
        if not isinstance(monitor, str) or not monitor:
            raise ValueError(
                f"EarlyStopping: monitor must be a metric name (non-empty str), got {monitor!r}"
            )
        if rule is None:
            rule = infer_rule(monitor)
        elif rule not in _RULES:
            raise ValueError(f"EarlyStopping: rule must be 'greater' or 'less', got {rule!r}")
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 0:
            raise ValueError(f"EarlyStopping: patience must be an int >= 0, got {patience!r}")
        if (
            isinstance(min_delta, bool)
            or not isinstance(min_delta, (int, float))
            or not math.isfinite(min_delta)
        ):
            raise ValueError(f"EarlyStopping: min_delta must be a finite number, got {min_delta!r}")
        if stopping_threshold is not None and (
            isinstance(stopping_threshold, bool)
            or not isinstance(stopping_threshold, (int, float))
            or not math.isfinite(stopping_threshold)  # NaN could never be reached
        ):
            raise ValueError(
                "EarlyStopping: stopping_threshold must be a finite number or None, got "
                f"{stopping_threshold!r}"
            )
        for flag, value in (("check_finite", check_finite), ("strict", strict)):
            if not isinstance(value, bool):  # "False" is a true string
                raise TypeError(f"EarlyStopping: {flag} must be True or False, got {value!r}")
        self.monitor = monitor
        self.rule = rule
        # MMEngine stores the delta signed by the rule and compares best + delta with the value.
        self.min_delta = min_delta if rule == "greater" else -1 * min_delta
        self.patience = patience
        self.stopping_threshold = stopping_threshold
        self.check_finite = check_finite
        self.strict = strict
        self.wait_count = 0
        self.best_score = -math.inf if rule == "greater" else math.inf

    # ------------------------------------------------------------------ rule
    def update(self, value: float) -> str | None:
        """Fold one validation result in; the reason to stop, or None to go on."""
        compare = _RULES[self.rule]
        if self.check_finite and not math.isfinite(value):
            return (
                f"Monitored metric {self.monitor} = {value} is infinite. "
                f"Previous best value was {self.best_score:.3f}."
            )
        if self.stopping_threshold is not None and compare(value, self.stopping_threshold):
            self.best_score = value
            return (
                f"Stopping threshold reached: `{self.monitor}` = {value} is "
                f"{self.rule} than {self.stopping_threshold}."
            )
        if compare(self.best_score + self.min_delta, value):
            self.wait_count += 1
            if self.wait_count >= self.patience:
                return (
                    f"the monitored metric did not improve in the last {self.wait_count} records. "
                    f"best score: {self.best_score:.3f}. "
                )
            return None
        self.best_score = value
        self.wait_count = 0
        return None

    def on_after_val_epoch(self, snap: Snapshot) -> Stop | None:
        metrics: Mapping[str, Any] = snap.metrics
        if self.monitor not in metrics:
            msg = (
                f"EarlyStopping: monitor={self.monitor!r} is not in the validation results; "
                f"available keys: {sorted(metrics)}"
            )
            if self.strict:
                raise MissingMetricError(
                    msg + " (or set strict=False to skip the check with a warning)"
                )
            warnings.warn(msg + "; skipping the early-stopping check", UserWarning, stacklevel=2)
            return None
        value = metrics[self.monitor]
        value = float(value.item() if isinstance(value, torch.Tensor) else value)
        reason = self.update(value)
        return Stop(f"EarlyStopping: {reason}") if reason is not None else None

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        return {
            "monitor": self.monitor,
            "rule": self.rule,
            "wait_count": self.wait_count,
            "best_score": _to_json(self.best_score),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the count and the best score from a checkpoint's metadata (untrusted: checked)."""
        if not isinstance(state, Mapping):
            raise ValueError(f"EarlyStopping state is a {type(state).__name__}, expected a dict")
        wait, best = state.get("wait_count"), _score(state.get("best_score"))
        if not isinstance(wait, int) or isinstance(wait, bool) or wait < 0:
            raise ValueError(f"EarlyStopping wait_count must be an int >= 0, got {wait!r}")
        if best is None:
            raise ValueError(
                "EarlyStopping best_score must be a number or 'inf'/'-inf'/'nan', "
                f"got {state.get('best_score')!r}"
            )
        if (
            state.get("monitor", self.monitor) != self.monitor
            or state.get("rule", self.rule) != self.rule
        ):
            warnings.warn(
                f"EarlyStopping: the checkpoint's state is for monitor={state.get('monitor')!r} "
                f"rule={state.get('rule')!r}, this handler monitors {self.monitor!r} ({self.rule}); "
                "starting the count afresh",
                UserWarning,
                stacklevel=2,
            )
            return
        self.wait_count = wait
        self.best_score = best
