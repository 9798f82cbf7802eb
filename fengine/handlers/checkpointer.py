"""`Checkpointer`: periodic, last, best and published checkpoints (MMEngine's CheckpointHook).

The handler decides what to save and when: it returns `Save` signals (a list when
one event needs several files) and `fit` writes them in order right after the
event, storing every handler's ``state_dict()`` in each file. MMEngine's rules,
with ``n`` the completed epoch / update count (MMEngine's ``epoch + 1`` / ``iter + 1``):

* **periodic** (``after_train_epoch``; ``after_train_iter`` with ``by_epoch=False``):
  save ``filename_tmpl.format(n)`` iff ``n >= save_begin and (n - save_begin) %
  interval == 0``, or ``save_last`` and ``n`` is the last (``interval=-1``: only
  then); ``work_dir/last_checkpoint`` points at it.
* **max_keep_ckpts** N: keep the newest N periodic files (preemption checkpoints
  ``step_N`` count too); re-saving the newest does not rotate, best files do not
  count. The kept names survive a resume (trimmed at the next save if N fell).
* **retention is data**: the handler never deletes. It returns `Retire` for the
  files it stops keeping, and `fit` deletes them only once the new file is durable
  and ``last_checkpoint`` has moved (MMEngine deletes the oldest first: a kill in
  between left no checkpoint). Names read back from a checkpoint are untrusted:
  anything but a plain file name is refused.
* **save_best** (``after_val_epoch``): for each key (``"auto"``: the first key of
  the first validation) whose score is strictly better (``rule``, or `infer_rule`),
  ``best_{key}_{filename_tmpl.format(n)}`` (``/`` -> ``_``) is saved and the key's
  previous best file retired. The event returns these saves, then a re-save of the
  periodic checkpoint of step ``n`` if there is one, so the best score and path it
  stores are current. Empty results warn and skip.
* **out_dir**: save to ``out_dir / basename(work_dir)`` (``out_dir`` itself without
  a work_dir), else to ``work_dir``.
* **published**: at ``after_train``, params-only ``<stem>-<sha256[:8]>.safetensors``
  copies of the last and best checkpoints (`fengine.checkpoint.publish`).
* **async_save**: every `Save` asks for the background (``Save(background=True)``): `fit`
  copies the state and writes the copy on a background thread while training goes on;
  the pointer moves and retired files go once the new file is durable (see
  ``fengine.loop._Background``).

Deviations from MMEngine, on purpose:

* after a new best MMEngine saves ``filename_tmpl.format(n)`` even when no periodic
  checkpoint was due (it then counts in the rotation); here only an existing
  periodic checkpoint of that step is re-saved;
* best checkpoints hold the whole training state (MMEngine's drop the optimizer and
  schedulers);
* ``interval=0`` or ``< -1`` and ``max_keep_ckpts=0`` are errors (MMEngine reads any
  value <= 0 as "never" / "unlimited"), and so is ``by_epoch=True`` in an
  iteration-based run (``fit(max_steps=...)``).
"""

from __future__ import annotations

import logging
import math
import numbers
import operator
import os
import string
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fengine import checkpoint, distributed
from fengine.checkpoint import CheckpointError
from fengine.checks import check_bool
from fengine.events import Handler, Priority, Retire, RunInfo, Save, Snapshot
from fengine.state import TrainState


__all__ = [
    "DEFAULT_GREATER_KEYS",
    "DEFAULT_LESS_KEYS",
    "Checkpointer",
    "every_n",
    "infer_rule",
    "should_save",
]

log = logging.getLogger("fengine")

DEFAULT_GREATER_KEYS = (
    "acc",
    "top",
    "AR@",
    "auc",
    "precision",
    "mAP",
    "mDice",
    "mIoU",
    "mAcc",
    "aAcc",
)
DEFAULT_LESS_KEYS = ("loss",)
_RULES = {"greater": operator.gt, "less": operator.lt}
_INIT = {"greater": -math.inf, "less": math.inf}


def infer_rule(
    key: str,
    greater_keys: Sequence[str] = DEFAULT_GREATER_KEYS,
    less_keys: Sequence[str] = DEFAULT_LESS_KEYS,
    *,
    who: str = "Checkpointer",
    arg: str = "save_best key",
) -> str:
    """``'greater'`` or ``'less'`` for a metric key, MMEngine's rule (case-insensitive):
    exact match in ``greater_keys``, then in ``less_keys``, then substring of the key in
    ``greater_keys``, then in ``less_keys``; otherwise ValueError naming ``who`` and
    ``arg`` (the handler and its argument). Shared by `Checkpointer` and `EarlyStopping`."""
    name = key.lower()
    greater = {k.lower() for k in greater_keys}
    less = {k.lower() for k in less_keys}
    if name in greater:
        return "greater"
    if name in less:
        return "less"
    if any(k in name for k in greater):
        return "greater"
    if any(k in name for k in less):
        return "less"
    raise ValueError(
        f"{who}: cannot infer the rule for {arg} {key!r}: none of the 'greater' keys "
        f"{list(greater_keys)} nor the 'less' keys {list(less_keys)} occurs in it; pass rule='greater' "
        "or rule='less' (a list of rules for a list of keys), or extend greater_keys/less_keys"
    )


def every_n(count: int, n: int, start: int = 0) -> bool:
    """MMEngine's ``every_n_epochs`` / ``every_n_train_iters`` on a completed count
    (``count`` = its ``epoch + 1`` / ``iter + 1``): ``count >= start and (count - start) % n == 0``;
    never for ``n <= 0``."""
    d = count - start
    return n > 0 and d >= 0 and d % n == 0


def should_save(
    count: int,
    *,
    interval: int,
    save_begin: int = 0,
    last: int | None = None,
    save_last: bool = True,
) -> bool:
    """The periodic-save predicate after ``count`` completed epochs / updates (see the module doc)."""
    return every_n(count, interval, save_begin) or (
        save_last and last is not None and count == last
    )


# ---------------------------------------------------------------------- argument checks
def _check_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"Checkpointer: {name} must be an int, got {value!r}")
    return value


def _check_bool(name: str, value: Any) -> bool:
    return check_bool("Checkpointer", name, value)


def _str_list(name: str, value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    raise TypeError(f"Checkpointer: {name} must be a str or a list of str, got {value!r}")


def _check_tmpl(tmpl: Any) -> str:
    """``tmpl`` if it formats an int into a plain file name (resume reads back only those)."""
    if not isinstance(tmpl, str):
        raise TypeError(f"Checkpointer: filename_tmpl must be a str with one '{{}}', got {tmpl!r}")
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(tmpl) if f is not None]
    except ValueError as e:
        raise ValueError(
            f"Checkpointer: filename_tmpl={tmpl!r} is not a valid format string ({e}); "
            "it needs exactly one '{}', filled with the epoch / step count"
        ) from None
    if len(fields) != 1 or fields[0] != "":
        raise ValueError(
            f"Checkpointer: filename_tmpl={tmpl!r} must contain exactly one '{{}}' (optionally with a "
            f"format spec, e.g. 'epoch_{{:03d}}.safetensors'), filled with the epoch / step count; "
            f"it has {len(fields)} replacement field(s) {fields}"
        )
    try:
        name = tmpl.format(1)
    except (ValueError, TypeError, IndexError, KeyError) as e:
        raise ValueError(
            f"Checkpointer: filename_tmpl={tmpl!r} cannot format an int: {e}"
        ) from None
    seps = "/" + os.sep + (os.altsep or "") + "\0"
    if not name or any(c in tmpl for c in seps) or name[0] == "." or name != Path(name).name:
        raise ValueError(
            f"Checkpointer: filename_tmpl={tmpl!r} must give a plain file name, without a directory "
            "part, '..' or a leading '.' (resume reads back only such names); to save in another "
            "directory pass out_dir=..."
        )
    if not name.endswith(".safetensors"):  # what resume, rewinds and retention look for
        raise ValueError(
            f"Checkpointer: filename_tmpl={tmpl!r} gives {name!r}; a checkpoint's name ends in "
            "'.safetensors' (resume without a pointer, a rewind's setting aside and the "
            "rotation find checkpoints by it), e.g. 'epoch_{}.safetensors'"
        )
    return tmpl


def _best_keys(save_best: Any) -> list[str]:
    if save_best is None:
        return []
    keys = _str_list("save_best", save_best)
    if not keys or any(not k for k in keys):
        raise ValueError(
            f"Checkpointer: save_best must name at least one metric key (non-empty), got {save_best!r}"
        )
    if "auto" in keys and len(keys) > 1:
        raise ValueError(
            f"Checkpointer: save_best={keys}: 'auto' (the first validation key) cannot be "
            "combined with other keys or repeated"
        )
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:
        raise ValueError(f"Checkpointer: save_best={keys} lists {dup} more than once")
    return keys


def _given_rules(rule: Any, keys: list[str]) -> list[str | None]:
    """One rule (or None: infer it) per save_best key."""
    if rule is not None and not keys:
        raise ValueError(
            f"Checkpointer: rule={rule!r} is only used with save_best=...; pass save_best or drop rule"
        )
    if rule is None or isinstance(rule, str):
        rules = [rule] * len(keys)
    elif isinstance(rule, (list, tuple)):
        if len(rule) not in (1, len(keys)):
            raise ValueError(
                f"Checkpointer: rule={list(rule)} must have 1 entry or one per save_best key "
                f"({len(keys)}: {keys})"
            )
        rules = list(rule) * len(keys) if len(rule) == 1 else list(rule)
    else:
        raise TypeError(
            f"Checkpointer: rule must be 'greater', 'less', None or a list of them, got {rule!r}"
        )
    for r in rules:
        if r is not None and r not in _RULES:
            raise ValueError(
                f"Checkpointer: rule must be 'greater' or 'less' (or None to infer it), got {r!r}"
            )
    return rules


def _score(key: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, torch.Tensor | np.ndarray):
        if value.size != 1 if isinstance(value, np.ndarray) else value.numel() != 1:
            raise TypeError(
                f"Checkpointer: the validation result {key!r} is a {type(value).__name__} of shape "
                f"{tuple(value.shape)}; save_best needs a scalar"
            )
        value = value.item()
    # a Python or numpy number (np.float32 from a metric), as MMEngine's CheckpointHook compares it
    if isinstance(value, numbers.Real) and not isinstance(value, bool | np.bool_):
        return float(value)
    raise TypeError(
        f"Checkpointer: the validation result {key!r} is a {type(value).__name__} ({value!r}); "
        "save_best needs a number"
    )


class Checkpointer(Handler):
    """Save checkpoints periodically, the last one, and the best ones (MMEngine's CheckpointHook).

    Args:
      interval: save every ``interval`` epochs (``by_epoch``) or updates; ``-1``: never
        periodically (only the last with ``save_last``, and the best with ``save_best``).
      by_epoch: count epochs (``after_train_epoch``) or updates (``after_train_iter``).
      max_keep_ckpts: keep only the newest N periodic checkpoints; ``-1`` keeps all.
      save_last: always save after the last epoch / update, whatever the interval.
      save_best: a validation result key, a list of keys (one best file each), or ``"auto"``
        (the first key of the first validation's results; a resume follows the key the
        checkpoint says, unless the results lack it: then, with a warning, their first key).
      rule: ``"greater"`` or ``"less"``, or a list (one rule for all keys, or one per key);
        ``None`` infers it from the key (`infer_rule`).
      greater_keys, less_keys: the names `infer_rule` matches (MMEngine's defaults).
      out_dir: save to ``out_dir / basename(work_dir)`` instead of ``work_dir``.
      save_begin: the first epoch / update count that may be saved periodically.
      filename_tmpl: a plain file name (no directory: use ``out_dir``) with one ``{}``
        (the epoch / update count); default
        ``"epoch_{}.safetensors"`` / ``"iter_{}.safetensors"``.
      published: after training, also write params-only ``<stem>-<sha256[:8]>.safetensors``
        copies of the last and best checkpoints (needs ``save_last`` or ``save_best``).
      published_params: which weights ``published=True`` publishes (another value without it
        is refused): ``"auto"`` (the checkpoint's eval weights,
        `TrainState.eval_weights`: the EMA ones when the run keeps an EMA, as MMEngine's
        EMAHook puts them in ``state_dict``), ``"live"`` or ``"ema"`` (eval weights, required).
      async_save: write each checkpoint on a background thread from a copy of the state's
        tensors and train on meanwhile (`fit` moves ``last_checkpoint`` and deletes retired
        files once the copy is durable, waits for a pending save before the next one, at a
        preemption and at the end, and raises its error there). Costs one CPU copy of the
        state in memory; a synchronous save costs the whole write in training time.
      name: the key of this handler's state in checkpoints (default ``"checkpointer"``).
      priority: default VERY_LOW (after the schedulers and the logger, as MMEngine).
    """

    collective = True  # saves / stops on every rank at once

    priority = Priority.VERY_LOW
    name = "checkpointer"

    def __init__(
        self,
        interval: int = 1,
        *,
        by_epoch: bool = True,
        max_keep_ckpts: int = -1,
        save_last: bool = True,
        save_best: str | Sequence[str] | None = None,
        rule: str | Sequence[str | None] | None = None,
        greater_keys: str | Sequence[str] | None = None,
        less_keys: str | Sequence[str] | None = None,
        out_dir: str | os.PathLike | None = None,
        save_begin: int = 0,
        filename_tmpl: str | None = None,
        published: bool = False,
        published_params: str = "auto",
        async_save: bool = False,
        priority: int | str | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(priority=priority, name=name)
        self.interval = _check_int("interval", interval)
        if interval < 1 and interval != -1:
            raise ValueError(
                f"Checkpointer: interval must be >= 1, or -1 for no periodic checkpoints "
                f"(only the last with save_last and the best with save_best), got {interval}"
            )
        self.by_epoch = _check_bool("by_epoch", by_epoch)
        self.max_keep_ckpts = (
            -1 if max_keep_ckpts is None else _check_int("max_keep_ckpts", max_keep_ckpts)
        )
        if self.max_keep_ckpts < 1 and self.max_keep_ckpts != -1:
            raise ValueError(
                f"Checkpointer: max_keep_ckpts must be >= 1 (how many periodic checkpoints to keep) "
                f"or -1 (keep all), got {max_keep_ckpts}"
            )
        self.save_begin = _check_int("save_begin", save_begin)
        if save_begin < 0:
            raise ValueError(f"Checkpointer: save_begin must be >= 0, got {save_begin}")
        self.save_last = _check_bool("save_last", save_last)
        self.async_save = _check_bool("async_save", async_save)
        default_tmpl = ("epoch_{}" if by_epoch else "iter_{}") + ".safetensors"
        self.filename_tmpl = _check_tmpl(default_tmpl if filename_tmpl is None else filename_tmpl)
        self.greater_keys = tuple(
            DEFAULT_GREATER_KEYS
            if greater_keys is None
            else _str_list("greater_keys", greater_keys)
        )
        self.less_keys = tuple(
            DEFAULT_LESS_KEYS if less_keys is None else _str_list("less_keys", less_keys)
        )
        self.save_best = _best_keys(save_best)
        # one rule per key; None only for an unresolved "auto" without a given rule
        self.rules = [
            r or (None if k == "auto" else self._infer(k))
            for k, r in zip(self.save_best, _given_rules(rule, self.save_best))
        ]
        self._auto_rule = self.rules[0] if self.save_best == ["auto"] else None  # as given
        # the key "auto" followed before a resume, as the checkpoint says (untrusted: checked
        # against the first validation's results), and that checkpoint
        self._adopted: str | None = None
        self._resumed_from: Path | None = None
        self.published = _check_bool("published", published)
        if published and not save_last and not self.save_best:
            raise ValueError(
                "Checkpointer: published=True publishes the last and/or the best checkpoint; "
                "set save_last=True or save_best=..."
            )
        if published_params not in ("auto", "live", "ema"):
            raise ValueError(
                f"Checkpointer: published_params must be 'auto', 'live' or 'ema', got {published_params!r}"
            )
        if published_params != "auto" and not published:
            raise ValueError(
                f"Checkpointer: published_params={published_params!r} picks the weights "
                "published=True writes, but published is False (nothing is published); "
                "set published=True"
            )
        self.published_params = published_params
        self.out_dir = None if out_dir is None else Path(out_dir)
        # what survives a resume (state_dict)
        self.kept: list[str] = []  # periodic (and preemption) files kept, oldest first
        self.last_ckpt: str | None = (
            None  # the latest periodic file, relative to the checkpoint directory
        )
        self.last_step: int | None = None  # its epoch / update count
        self.best: dict[str, dict[str, Any]] = {}  # key -> {"score": float, "path": str}
        self.retiring: list[
            str
        ] = []  # files retired by the latest saves (deleted by fit once they are durable)
        # the update the latest periodic file holds (a preemption's file replaces it there)
        self.last_update: int | None = None

    def directory(self, run: RunInfo | None) -> Path:
        """Where the checkpoints go: ``out_dir / basename(work_dir)``, ``work_dir``, or ``out_dir``."""
        work_dir = None if run is None or run.work_dir is None else Path(run.work_dir)
        if self.out_dir is None:
            if work_dir is None:
                raise ValueError(
                    "Checkpointer: nowhere to save checkpoints: pass fit(..., work_dir=...) "
                    "or Checkpointer(out_dir=...)"
                )
            return work_dir
        if work_dir is None:
            return self.out_dir
        if self.out_dir.resolve() == work_dir.resolve():
            return work_dir
        return self.out_dir / (work_dir.name or work_dir.resolve().name)

    # ------------------------------------------------------------------ events
    def on_before_train(self, snap: Snapshot) -> Retire | None:
        if self.by_epoch and snap.run.max_epochs is None:
            raise ValueError(
                "Checkpointer(by_epoch=True) counts epochs, but this run is iteration-based "
                "(fit(max_steps=...)); pass Checkpointer(by_epoch=False, interval=<updates>)"
            )
        directory = self.directory(snap.run)
        log.info("Checkpoints will be saved to %s.", directory)
        leftovers = [directory / n for n in self.retiring if (directory / n).is_file()]
        return (
            Retire(tuple(leftovers)) if leftovers else None
        )  # a kill came before fit deleted them

    def on_after_train_epoch(self, snap: Snapshot) -> Save | list[Save | Retire] | None:
        return self._maybe_periodic(snap) if self.by_epoch else None

    def on_after_train_iter(self, snap: Snapshot) -> Save | list[Save | Retire] | None:
        return None if self.by_epoch else self._maybe_periodic(snap)

    def on_before_save_checkpoint(self, snap: Snapshot) -> Retire | None:
        """`fit`'s preemption checkpoint (its save events carry ``metrics["stop"]``) in this
        handler's directory counts as kept; any other save (another handler's, a best file, a
        user's file of any name) is not this handler's to retire."""
        path, directory = snap.checkpoint, self.directory(snap.run)
        if path is None or self.max_keep_ckpts < 1 or Path(path).parent != directory:
            return None
        name = Path(path).name
        if not snap.metrics.get("stop") or name in self.kept:
            return None
        if self.last_update == snap.state.step and self.kept[-1:] == [self.last_ckpt]:
            # this update's periodic file, written before what ran since (a validation): the
            # preemption's file takes its place, not an older, distinct checkpoint's
            stale = self.kept.pop()
            self.kept.append(name)
            self.last_ckpt = name
            self.retiring += [stale]
            return Retire((directory / stale,))
        return self._keep(directory, name)

    def on_after_val_epoch(self, snap: Snapshot) -> list[Save | Retire] | None:
        """One `Save` per new best, then the re-save of this step's periodic checkpoint."""
        if not self.save_best:
            return None
        metrics: Mapping[str, Any] = snap.metrics or {}
        if not metrics:
            warnings.warn(
                "Checkpointer: the validation results are empty; the best checkpoint is not "
                "updated in this evaluation",
                UserWarning,
                stacklevel=2,
            )
            return None
        self._check_adopted(metrics)
        if self.save_best == ["auto"]:
            self._resolve_auto(next(iter(metrics)))
            log.info(
                "Checkpointer: save_best='auto' follows %r (rule %r)",
                self.save_best[0],
                self.rules[0],
            )
        directory, n = self.directory(snap.run), self._count(snap)
        saves: list[Save | Retire] = []
        self.retiring = []
        for key, rule in zip(self.save_best, self.rules):
            if key not in metrics:
                raise KeyError(
                    f"Checkpointer: save_best key {key!r} is not in the validation results; "
                    f"available keys: {list(metrics)}"
                )
            score = _score(key, metrics[key])
            assert rule is not None  # "auto" was resolved above
            if score is not None and self._is_new_best(key, rule, score):
                saves.extend(self._replace_best(directory, key, score, n))
        if saves and self.last_step == n:
            saves.extend(
                _as_list(self._periodic(directory, n))
            )  # so the best info it stores is current
        return saves

    def on_after_save_checkpoint(self, snap: Snapshot) -> None:
        """MMEngine's log line for a best checkpoint, once `fit` has written it."""
        for key, best in self.best.items():
            if snap.checkpoint == self.directory(snap.run) / best["path"]:
                log.info(
                    "The best checkpoint with %.4f %s at %d %s is saved to %s.",
                    best["score"],
                    key,
                    self._count(snap),
                    "epoch" if self.by_epoch else "iter",
                    best["path"],
                )

    def on_after_train(self, snap: Snapshot) -> None:
        if not self.published or snap.metrics.get("preempted"):
            return  # a preempted run is not over: its resume publishes at the real end
        directory = self.directory(snap.run)
        sources = (
            [directory / self.last_ckpt] if self.save_last and self.last_ckpt is not None else []
        )
        sources += [directory / best["path"] for best in self.best.values()]
        for src in sources:
            if not src.is_file():
                warnings.warn(
                    f"Checkpointer: cannot publish {src}: the file is missing",
                    UserWarning,
                    stacklevel=2,
                )
                continue
            self.publish(src, snap.state)

    def publish(self, path: str | os.PathLike, like: Any) -> Path:
        """Publish the params (and buffers) of checkpoint ``path`` as ``<stem>-<sha256[:8]>.safetensors``.

        ``like`` is a `TrainState` of the run (its structure names what to read)."""
        path = Path(path)
        if self.published_params == "ema" and like.eval_weights()[0] is like.params:
            raise ValueError(
                "Checkpointer(published_params='ema'): the run keeps no EMA; add fengine.ema(...) to the step"
            )
        weights = "live" if self.published_params == "live" else "eval"
        loaded, _ = checkpoint.load_params(path, like, strict=True, weights=weights)
        assert isinstance(loaded, TrainState)
        out = checkpoint.publish(
            loaded, path, weights="live", meta={"published_from": path.name, "weights": weights}
        )
        log.info("The checkpoint (%s) is published to %s.", path, out)
        return out

    # ------------------------------------------------------------------ periodic
    def _count(self, snap: Snapshot) -> int:
        return snap.state.epoch if self.by_epoch else snap.state.step

    def _maybe_periodic(self, snap: Snapshot) -> Save | list[Save | Retire] | None:
        n = self._count(snap)
        last = snap.run.max_epochs if self.by_epoch else snap.run.max_steps
        if not should_save(
            n,
            interval=self.interval,
            save_begin=self.save_begin,
            last=last,
            save_last=self.save_last,
        ):
            return None
        log.info("Saving checkpoint at %d %s", n, "epochs" if self.by_epoch else "iterations")
        self.retiring, self.last_update = [], snap.state.step
        return self._periodic(self.directory(snap.run), n)

    def _periodic(self, directory: Path, n: int) -> Save | list[Save | Retire]:
        """Ask for ``filename_tmpl.format(n)`` and retire the oldest kept files beyond max_keep_ckpts."""
        self.last_ckpt, self.last_step = self.filename_tmpl.format(n), n
        save = Save(directory / self.last_ckpt, latest=True, background=self.async_save)
        retire = self._keep(directory, self.last_ckpt) if self.max_keep_ckpts > 0 else None
        return save if retire is None else [save, retire]

    def _keep(self, directory: Path, name: str) -> Retire | None:
        """Add ``name`` as the newest kept file; `Retire` the oldest beyond max_keep_ckpts."""
        if self.kept[-1:] == [name]:
            return None  # re-saving the newest does not rotate
        self.kept = [k for k in self.kept if k != name] + [name]
        old, self.kept = self.kept[: -self.max_keep_ckpts], self.kept[-self.max_keep_ckpts :]
        self.retiring += old
        return Retire(tuple(directory / k for k in old)) if old else None

    # ------------------------------------------------------------------ best
    def _infer(self, key: str) -> str:
        return infer_rule(key, self.greater_keys, self.less_keys)

    def _resolve_auto(self, key: str) -> None:
        """``save_best="auto"`` follows ``key`` from now on."""
        self.save_best, self.rules = [key], [self._auto_rule or self._infer(key)]

    def _check_adopted(self, metrics: Mapping[str, Any]) -> None:
        """The first validation after a resume: a key ``"auto"`` adopted from the checkpoint that
        the results do not have (an edited file, or another evaluator) is dropped with a warning,
        and ``"auto"`` takes the first key of these results, as in a fresh run."""
        adopted, self._adopted = self._adopted, None
        if adopted is None or adopted in metrics:
            return
        first = next(iter(metrics))
        source = "the checkpoint" if self._resumed_from is None else str(self._resumed_from)
        warnings.warn(
            f"Checkpointer: {source} says save_best='auto' followed {adopted!r}, but the "
            f"validation results have no {adopted!r} (keys: {list(metrics)[:10]}); its best "
            f"record is ignored and 'auto' follows {first!r}, the first key, from now on",
            UserWarning,
            stacklevel=3,
        )
        self.best.pop(adopted, None)
        self.save_best = ["auto"]

    def _is_new_best(self, key: str, rule: str, score: float | None) -> bool:
        """Strictly better than every earlier validation of ``key``."""
        best = self.best[key]["score"] if key in self.best else _INIT[rule]
        return score is not None and _RULES[rule](score, best)

    def _replace_best(self, directory: Path, key: str, score: float, n: int) -> list[Save | Retire]:
        """Record the new best of ``key``, ask for its file and retire the previous one."""
        name = f"best_{key}_{self.filename_tmpl.format(n)}".replace("/", "_")
        old = self.best[key]["path"] if key in self.best else None
        self.best[key] = {"score": score, "path": name}
        save = Save(directory / name, latest=False, background=self.async_save)
        if old is None or old == name:
            return [save]
        if (directory / old).exists():  # a rewind's record may name a file its path removed
            log.info("The previous best checkpoint %s is removed", directory / old)
        self.retiring.append(old)
        return [save, Retire((directory / old,))]

    # ------------------------------------------------------------------ resume
    def on_after_load_checkpoint(self, snap: Snapshot) -> None:
        self._resumed_from = snap.checkpoint  # named if its adopted best key proves unknown
        if not self.best:
            return
        directory = self.directory(snap.run)
        # rank 0 holds the files: every rank drops the same records (a best save is collective)
        for key in distributed.computed_by_main(lambda: self._missing_best(directory, snap)):
            self.best.pop(key, None)

    def _missing_best(self, directory: Path, snap: Snapshot) -> list[str]:
        """The best records whose file is not in ``directory`` (a rewind: a later best of the
        abandoned path deleted it, and that best moved aside), with a warning each: dropped, so
        the next validation writes a best file again instead of the run having none."""
        missing = [k for k, v in self.best.items() if not (directory / v["path"]).is_file()]
        for key in missing:
            warnings.warn(
                f"Checkpointer: {snap.checkpoint} records the best {key!r} "
                f"({self.best[key]['score']:.6g}) as {self.best[key]['path']}, which is not in "
                f"{directory}; that record is dropped and the next validation saves a best file",
                UserWarning,
                stacklevel=2,
            )
        return missing

    def state_dict(self) -> dict[str, Any]:
        return {
            "kept": list(self.kept),
            "retiring": list(self.retiring),
            "last_ckpt": self.last_ckpt,
            "last_step": self.last_step,
            "last_update": self.last_update,
            "best": {k: dict(v) for k, v in self.best.items()},
            "save_best": list(self.save_best),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore from a checkpoint's metadata: untrusted, so every name must be a plain file name."""
        where = f"Checkpointer({self.name!r}) state in the checkpoint"
        if not isinstance(state, Mapping):
            raise CheckpointError(f"{where} is a {type(state).__name__}, expected a dict")
        if self.max_keep_ckpts > 0:
            self.kept = [
                _plain_name(n, f"{where}: kept") for n in _list(state.get("kept"), f"{where}: kept")
            ]
        self.retiring = [
            _plain_name(n, f"{where}: retiring")
            for n in _list(state.get("retiring"), f"{where}: retiring")
        ]
        last = state.get("last_ckpt")
        self.last_ckpt = None if last is None else _plain_name(last, f"{where}: last_ckpt")
        step = state.get("last_step")
        if step is not None and (not isinstance(step, int) or isinstance(step, bool) or step < 0):
            raise CheckpointError(f"{where}: last_step must be a non-negative int, got {step!r}")
        self.last_step = step
        update = state.get("last_update")  # absent in checkpoints written before it was kept
        if update is not None and (
            not isinstance(update, int) or isinstance(update, bool) or update < 0
        ):
            raise CheckpointError(
                f"{where}: last_update must be a non-negative int, got {update!r}"
            )
        self.last_update = update
        saved_keys = [str(k) for k in _list(state.get("save_best"), f"{where}: save_best")]
        if self.save_best == ["auto"] and len(saved_keys) == 1 and saved_keys[0] != "auto":
            self._resolve_auto(saved_keys[0])  # the key 'auto' followed before the resume
            self._adopted = saved_keys[0]
        best = state.get("best") or {}
        if not isinstance(best, Mapping):
            raise CheckpointError(f"{where}: best must be a dict, got {type(best).__name__}")
        self.best = {}
        for k, v in best.items():
            if k not in self.save_best:
                continue
            score = v.get("score") if isinstance(v, Mapping) else None
            if not isinstance(score, (int, float)) or isinstance(score, bool):
                raise CheckpointError(f"{where}: best[{k!r}] must hold a numeric score, got {v!r}")
            self.best[k] = {
                "score": float(score),
                "path": _plain_name(v.get("path"), f"{where}: best[{k!r}].path"),
            }


def _as_list(signals: Save | list[Save | Retire]) -> list[Save | Retire]:
    return signals if isinstance(signals, list) else [signals]


def _list(value: Any, where: str) -> list:
    if value is None:
        return []
    if not isinstance(value, list):
        raise CheckpointError(f"{where} must be a list, got {type(value).__name__}")
    return value


def _plain_name(value: Any, where: str) -> str:
    """A file name inside the checkpoint directory: no directory part, no '..', not hidden."""
    if (
        not isinstance(value, str)
        or not value
        or value != Path(value).name
        or value.startswith(".")
    ):
        raise CheckpointError(
            f"{where} must be a plain file name inside the checkpoint directory, got {value!r}; "
            "the checkpoint's metadata may have been tampered with"
        )
    return value
