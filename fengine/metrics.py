"""Evaluation metrics as pure folds (MMEngine's ``BaseMetric``/``Evaluator``, functional).

A metric is a fold over the evaluation data::

    acc = metric.init()
    for batch in loader:                      # the RAW loader batch, not preprocessed
        acc = metric.update(acc, batch, eval_fn(state, batch))
    results = metric.compute(metric.reduce(acc), size=len(dataset))

``update`` never mutates ``acc``; it returns a new accumulator. Accumulators are
*sufficient statistics* (sums and counts as tensors, a few numbers per metric whatever
the number of batches), not stored predictions, so evaluation memory is constant and
an accumulator can be checkpointed like any other pytree. Tensors stay on the device
the outputs are on; the host transfer happens once, in ``compute`` (``update`` does no
``.item()`` and no blocking copy).

MMEngine correspondence:

=====================================  ==========================================
MMEngine                               fengine
=====================================  ==========================================
``BaseMetric.process(batch, samples)``  ``update(acc, batch, outputs) -> acc``
``self.results``                       the explicit accumulator ``acc``
``collect_results`` (all ranks)        ``reduce(acc)``
``compute_metrics(results)``           ``compute(acc, size=None)``
``BaseMetric.evaluate(size)``          ``Evaluator.compute(acc, size)`` (reduce + compute)
``default_prefix`` / ``prefix=``       same; keys become ``f"{prefix}/{name}"``
``Evaluator.offline_evaluate``         ``Evaluator.offline(predictions, data, chunk_size)``
=====================================  ==========================================

Distributed evaluation. Every `SumMetric` accumulator is a dict of tensors::

    {"n":          int64 (R,)    samples seen, per rank (R = 1 before reduce)
     "total":      (S,)          per-sample statistics summed over samples
     "last":       (R, S)        statistics of the last sample seen, per rank
     "last_known": int64 (R,)    1 where ``last`` is known exactly}

``reduce`` is the identity unless ``torch.distributed`` is initialised with more than
one rank; then it all-reduces (sums) ``total`` and all-gathers ``n``, ``last`` and
``last_known`` in rank order, so every rank computes the same result (MMEngine
broadcasts rank 0's). ``compute(acc, size)`` then drops the padded duplicates that
``round_up=True`` sampling adds (MMEngine ``DefaultSampler``, torch
``DistributedSampler``): those repeat the first indices to fill the last slot of the
*last* ``n - size`` ranks, so the padding is exactly the last sample of each of those
ranks, which ``last`` records. This is what MMEngine's ``collect_results(results,
size)`` does when each result is one sample (interleave ranks, keep the first
``size``). ``size`` larger than the samples seen (a ``drop_last`` loader) or padding of
more than one sample per rank is an error rather than a silently wrong number.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar, NamedTuple, Protocol, runtime_checkable

import torch
import torch.distributed as dist
from torch.utils.data import default_collate


__all__ = [
    "Accuracy",
    "BatchStats",
    "Evaluator",
    "MeanLoss",
    "Metric",
    "SumMetric",
    "add_prefix",
]


def add_prefix(prefix: str | None, results: Mapping[str, float]) -> dict[str, float]:
    """``{f"{prefix}/{k}": v}`` when ``prefix`` is set, else a plain copy (MMEngine rule)."""
    if not prefix:
        return dict(results)
    return {f"{prefix}/{k}": v for k, v in results.items()}


@runtime_checkable
class Metric(Protocol):
    """What `Evaluator` (and ``fengine.evaluate``) needs from a metric.

    * ``init() -> acc``: the empty accumulator (a pytree, preferably of tensors).
    * ``update(acc, batch, outputs) -> acc``: fold one batch in, without mutating
      ``acc``. ``batch`` is the raw loader batch, ``outputs`` whatever the eval
      function returned for it (MMEngine's ``data_batch`` / ``data_samples``).
    * ``reduce(acc) -> acc``: combine the accumulators of all ranks (identity in a
      single process; the default here).
    * ``compute(acc, size=None) -> dict[str, float]``: the results, keys already
      prefixed with ``prefix``. ``size`` is the dataset length, used to drop padded
      duplicates (see the module docstring); the evaluator passes it only when it is
      not None, so a metric that ignores padding may define ``compute(acc)``.
    * ``prefix``: ``None`` or the string prepended as ``f"{prefix}/{name}"``;
      ``default_prefix`` is the class default, used when ``prefix`` is not given.

    Any object with these methods works; subclassing is optional (it gives the
    identity ``reduce``). For sums over samples, subclass `SumMetric`.
    """

    default_prefix: ClassVar[str | None] = None
    prefix: str | None

    def init(self) -> Any: ...

    def update(self, acc: Any, batch: Any, outputs: Any) -> Any: ...

    def compute(self, acc: Any, size: int | None = None) -> dict[str, float]: ...

    def reduce(self, acc: Any) -> Any:
        return acc


class BatchStats(NamedTuple):
    """What `SumMetric.batch_stats` returns for one batch.

    ``n``: samples in the batch (a Python int, known from shapes without a sync);
    ``total``: (S,) tensor, the per-sample statistics summed over the batch;
    ``last``: (S,) tensor, the statistics of the batch's last sample, or ``None`` when
    they cannot be known (then padded duplicates cannot be dropped exactly).
    """

    n: int
    total: torch.Tensor
    last: torch.Tensor | None


def _dist_world() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def _gather_cat(t: torch.Tensor, world: int) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


class SumMetric(Metric):
    """Base for metrics that are functions of per-sample statistics summed over samples.

    Subclasses set ``names`` (result names, unprefixed), ``num_stats`` (S),
    ``stat_dtype`` (the accumulator dtype before the first update) and implement
    `batch_stats` and `finalize`. The accumulator layout and the padding rule are in
    the module docstring.
    """

    default_prefix: ClassVar[str | None] = None
    names: tuple[str, ...] = ()
    num_stats: int = 1
    stat_dtype: ClassVar[torch.dtype] = torch.int64

    def __init__(self, prefix: str | None = None) -> None:
        # `or`, as MMEngine: an empty prefix falls back to the class default.
        self.prefix = prefix or self.default_prefix

    @property
    def keys(self) -> tuple[str, ...]:
        """The result keys `compute` returns (prefixed); used for early clash checks."""
        return tuple(add_prefix(self.prefix, dict.fromkeys(self.names, 0.0)))

    def batch_stats(self, batch: Any, outputs: Any) -> BatchStats:  # pragma: no cover
        raise NotImplementedError

    def finalize(self, n: int, totals: list[float]) -> dict[str, float]:  # pragma: no cover
        """Unprefixed results from the sample count and the summed statistics."""
        raise NotImplementedError

    # -- the fold ---------------------------------------------------------------------

    def init(self) -> dict[str, torch.Tensor]:
        s = self.num_stats
        return {
            "n": torch.zeros(1, dtype=torch.int64),
            "total": torch.zeros(s, dtype=self.stat_dtype),
            "last": torch.zeros(1, s, dtype=self.stat_dtype),
            "last_known": torch.zeros(1, dtype=torch.int64),
        }

    def update(self, acc: Mapping[str, torch.Tensor], batch: Any, outputs: Any) -> dict:
        st = self.batch_stats(batch, outputs)
        if st.n == 0:
            return dict(acc)
        dev, dt = st.total.device, st.total.dtype
        known = st.last is not None
        last = st.last if known else torch.zeros_like(st.total)
        return {
            # non_blocking: the first update moves the CPU init values to the device;
            # a blocking copy would synchronise the host with the device.
            "n": acc["n"].to(dev, non_blocking=True) + st.n,
            "total": acc["total"].to(dev, dt, non_blocking=True) + st.total,
            "last": last.reshape(1, -1).to(dt),
            "last_known": torch.full((1,), int(known), dtype=torch.int64, device=dev),
        }

    def reduce(self, acc: Mapping[str, torch.Tensor]) -> dict:
        """Sum ``total`` and gather ``n``/``last`` across ranks; identity in one process.

        Collective: every rank must call it. Uses the default process group; the
        accumulator tensors must live where the backend wants them (CUDA for NCCL).
        """
        world = _dist_world()
        if world == 1:
            return dict(acc)
        if acc["n"].numel() != 1:
            raise ValueError(
                f"{type(self).__name__}.reduce: the accumulator is already reduced "
                f"(it holds {acc['n'].numel()} ranks); reduce it once, then compute."
            )
        total = acc["total"].clone()
        dist.all_reduce(total)
        return {
            "n": _gather_cat(acc["n"], world),
            "total": total,
            "last": _gather_cat(acc["last"], world),
            "last_known": _gather_cat(acc["last_known"], world),
        }

    def compute(self, acc: Mapping[str, torch.Tensor], size: int | None = None) -> dict:
        name = type(self).__name__
        # The only host transfers of the fold.
        n_ranks = [int(v) for v in acc["n"].cpu().tolist()]
        totals = acc["total"].cpu().tolist()
        n = sum(n_ranks)
        if size is not None:
            totals = self._drop_padding(acc, n_ranks, totals, size)
            n = size
        if n == 0:
            raise ValueError(
                f"{name}: no samples were seen (empty accumulator); run at least one "
                "update with a non-empty batch before compute."
            )
        return add_prefix(self.prefix, self.finalize(n, totals))

    def _drop_padding(self, acc, n_ranks: list[int], totals: list, size: int) -> list:
        name = type(self).__name__
        n, ranks = sum(n_ranks), len(n_ranks)
        pad = n - size
        if size < 0 or pad < 0:
            raise ValueError(
                f"{name}: size={size} but {n} samples were seen; samples are missing "
                "(a drop_last loader?). Pass size=None to skip this check."
            )
        if pad == 0:
            return totals
        if pad > ranks:
            raise ValueError(
                f"{name}: {n} samples were seen for size={size}, i.e. {pad} padded "
                f"duplicates, but round_up padding adds at most one per rank and there "
                f"{'is' if ranks == 1 else 'are'} {ranks} rank(s) in the accumulator "
                "(was reduce called?)."
            )
        last = acc["last"].cpu().tolist()
        known = acc["last_known"].cpu().tolist()
        totals = list(totals)
        for r in range(ranks - pad, ranks):  # padding is the last sample of the last ranks
            if n_ranks[r] == 0 or not known[r]:
                raise ValueError(
                    f"{name}: cannot drop the padded duplicate of rank {r}: the statistics "
                    "of its last sample are unknown"
                    + (" (it saw no samples)." if n_ranks[r] == 0 else
                       f" ({self._unknown_last_hint()}).")
                )
            totals = [t - v for t, v in zip(totals, last[r])]
        return totals

    def _unknown_last_hint(self) -> str:
        return "per-sample statistics were not available"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(prefix={self.prefix!r})"


# -- Accuracy -----------------------------------------------------------------------


def _default_logits(batch: Any, outputs: Any) -> Any:
    if isinstance(outputs, Mapping) and "logits" in outputs:
        return outputs["logits"]
    return outputs


def _label_from(container: Mapping, where: str, metric: str) -> Any:
    for key in ("label", "labels"):
        if key in container:
            return container[key]
    raise KeyError(
        f"{metric}: {where} is a dict without a 'label' or 'labels' key (keys: "
        f"{sorted(map(str, container))}); pass target=lambda batch, outputs: ... to say "
        "where the labels are."
    )


def _default_target(batch: Any, outputs: Any, metric: str = "Accuracy") -> Any:
    if batch is None:
        if isinstance(outputs, Mapping):
            return _label_from(outputs, "the batch is None and the outputs", metric)
        raise ValueError(
            f"{metric}: the batch is None (offline evaluation without data?) and the "
            f"outputs are a {type(outputs).__name__}, not a dict with a 'label' key; pass "
            "data=..., dict predictions with a 'label', or target=lambda batch, outputs: ...."
        )
    if isinstance(batch, Mapping):
        return _label_from(batch, "the batch", metric)
    if isinstance(batch, (tuple, list)):
        if len(batch) < 2:
            raise ValueError(
                f"{metric}: expected a batch (inputs, labels, ...) with the labels at "
                f"index 1, got a {type(batch).__name__} of length {len(batch)}; pass "
                "target=lambda batch, outputs: ...."
            )
        return batch[1]
    raise TypeError(
        f"{metric}: cannot find labels in a batch of type {type(batch).__name__}; "
        "expected a tuple/list (labels at index 1) or a dict with 'label'/'labels', "
        "or pass target=lambda batch, outputs: ...."
    )


class Accuracy(SumMetric):
    """Top-k classification accuracy, in percent (``100 * correct / samples``).

    Result names: ``accuracy`` for k=1 (MMEngine's quick-start metric and its
    ``accuracy: 35.7000`` log line) and ``accuracy_top{k}`` for k>1; with ``prefix``
    they become ``f"{prefix}/accuracy"``, ... ``default_prefix`` is None.

    A sample is correct at k when its label is the arg-max of its logits (top-1; ties
    go to the lowest class index, as ``argmax``) or among the ``torch.topk`` k
    highest; so the top-k accuracy never decreases with k.

    Args:
      topk: an int or a tuple of distinct positive ints.
      prefix: key prefix (see `Metric`).
      logits: ``(batch, outputs) -> Tensor (N, C)``. Default: ``outputs`` itself, or
        ``outputs["logits"]`` when the outputs are a dict.
      target: ``(batch, outputs) -> Tensor (N,)`` of integer class indices. Default:
        ``batch[1]`` for tuple/list batches, ``batch["label"]`` or ``batch["labels"]``
        for dict batches; when the batch is None (offline evaluation without data),
        ``outputs["label"]``/``outputs["labels"]``.
    """

    def __init__(
        self,
        topk: int | Sequence[int] = (1,),
        prefix: str | None = None,
        *,
        logits: Callable[[Any, Any], Any] | None = None,
        target: Callable[[Any, Any], Any] | None = None,
    ) -> None:
        super().__init__(prefix)
        ks = (topk,) if isinstance(topk, int) else tuple(topk)
        if not ks or any(not isinstance(k, int) or isinstance(k, bool) or k < 1 for k in ks):
            raise ValueError(f"Accuracy: topk must be positive ints, got {topk!r}")
        if len(set(ks)) != len(ks):
            raise ValueError(f"Accuracy: topk has duplicates: {topk!r}")
        self.topk = ks
        self.names = tuple("accuracy" if k == 1 else f"accuracy_top{k}" for k in ks)
        self.num_stats = len(ks)
        self._logits = logits or _default_logits
        self._target = target or _default_target

    def batch_stats(self, batch: Any, outputs: Any) -> BatchStats:
        scores = self._logits(batch, outputs)
        if not isinstance(scores, torch.Tensor):
            raise TypeError(
                f"Accuracy: expected logits as a tensor of shape (N, C), got a "
                f"{type(scores).__name__}; pass logits=lambda batch, outputs: ...."
            )
        if scores.ndim != 2:
            raise ValueError(
                f"Accuracy: expected logits of shape (N, C), got shape {tuple(scores.shape)}"
            )
        labels = self._target(batch, outputs)
        if not isinstance(labels, torch.Tensor):
            labels = torch.as_tensor(labels)
        n, c = scores.shape
        if labels.shape != (n,) or labels.is_floating_point() or labels.is_complex() \
                or labels.dtype == torch.bool:
            raise ValueError(
                f"Accuracy: expected integer labels of shape ({n},) matching logits of "
                f"shape {tuple(scores.shape)}, got {labels.dtype} labels of shape "
                f"{tuple(labels.shape)}"
            )
        maxk = max(self.topk)
        if maxk > c:
            raise ValueError(
                f"Accuracy: topk={self.topk} asks for the top {maxk} of logits with only "
                f"{c} classes (shape {tuple(scores.shape)})"
            )
        dev = scores.device
        if n == 0:
            z = torch.zeros(self.num_stats, dtype=torch.int64, device=dev)
            return BatchStats(0, z, None)
        scores = scores.detach()
        labels = labels.to(dev, non_blocking=True)
        top1 = scores.argmax(dim=1) == labels
        if maxk > 1:
            hit = scores.topk(maxk, dim=1).indices == labels[:, None]  # (N, maxk)
            cols = [top1 if k == 1 else hit[:, :k].any(dim=1) | top1 for k in self.topk]
        else:
            cols = [top1]
        correct = torch.stack(cols, dim=1).to(torch.int64)  # (N, K)
        return BatchStats(n, correct.sum(dim=0), correct[-1])

    def finalize(self, n: int, totals: list[float]) -> dict[str, float]:
        return {name: 100.0 * c / n for name, c in zip(self.names, totals)}

    def _unknown_last_hint(self) -> str:  # pragma: no cover - Accuracy always knows it
        return "no per-sample statistics"

    def __repr__(self) -> str:
        return f"Accuracy(topk={self.topk}, prefix={self.prefix!r})"


# -- MeanLoss -----------------------------------------------------------------------


def _float_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def _infer_batch_size(batch: Any) -> int | None:
    if isinstance(batch, torch.Tensor):
        return batch.shape[0] if batch.ndim else None
    if isinstance(batch, Mapping):
        items: Iterable = batch.values()
    elif isinstance(batch, (tuple, list)):
        items = batch
    else:
        return None
    for item in items:
        found = _infer_batch_size(item)
        if found is not None:
            return found
    return None


class MeanLoss(SumMetric):
    """Sample-weighted mean of a loss over the evaluation set.

    ``sum_b n_b * loss_b / sum_b n_b`` for batch-mean losses, ``sum_i loss_i / N`` for
    per-sample losses: the mean over *samples*, so a short last batch weighs what its
    samples weigh (not ``mean over batches``, which FashionMnistMetric in MMEngine's
    docs computes; FEATURES B.4 item 26). Sums are kept in float64.

    Args:
      key: where the loss is when the outputs are a dict (``outputs[key]``); tensor
        or number outputs are the loss itself.
      name: the result name (default: ``key``).
      loss: ``(batch, outputs) -> Tensor | float`` overriding the extraction. A 0-d
        value is a batch mean; a 1-d value holds per-sample losses
        (``reduction="none"``).
      batch_size: ``(batch, outputs) -> int`` giving the sample count for batch-mean
        losses. Default: dim 0 of the first tensor found in the batch.
      prefix: key prefix (see `Metric`).

    Padded duplicates (``compute(acc, size)``) can be dropped only when the losses are
    per-sample; with batch-mean losses the last sample's loss is unknown and
    ``compute`` raises instead of guessing.
    """

    stat_dtype: ClassVar[torch.dtype] = torch.float64

    def __init__(
        self,
        key: str = "loss",
        *,
        name: str | None = None,
        loss: Callable[[Any, Any], Any] | None = None,
        batch_size: Callable[[Any, Any], int] | None = None,
        prefix: str | None = None,
    ) -> None:
        super().__init__(prefix)
        self.key = key
        self.names = (name or key,)
        self.num_stats = 1
        self._loss = loss
        self._batch_size = batch_size

    def _extract(self, batch: Any, outputs: Any) -> torch.Tensor:
        if self._loss is not None:
            value = self._loss(batch, outputs)
        elif isinstance(outputs, Mapping):
            if self.key not in outputs:
                raise KeyError(
                    f"MeanLoss: the outputs are a dict without the key {self.key!r} "
                    f"(keys: {sorted(map(str, outputs))}); set key=... or "
                    "loss=lambda batch, outputs: ...."
                )
            value = outputs[self.key]
        else:
            value = outputs
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return torch.tensor(float(value), dtype=torch.float64)
        if not isinstance(value, torch.Tensor):
            raise TypeError(
                f"MeanLoss: expected the loss as a tensor or a number, got a "
                f"{type(value).__name__}; pass key=... or loss=lambda batch, outputs: ...."
            )
        return value.detach()

    def batch_stats(self, batch: Any, outputs: Any) -> BatchStats:
        value = self._extract(batch, outputs)
        dt = _float_dtype(value.device)
        if value.ndim == 1:
            n = value.shape[0]
            if self._batch_size is not None and self._batch_size(batch, outputs) != n:
                raise ValueError(
                    f"MeanLoss: batch_size says {self._batch_size(batch, outputs)} samples "
                    f"but the per-sample loss has shape {tuple(value.shape)}"
                )
            v = value.to(dt)
            if n == 0:
                return BatchStats(0, v.sum().reshape(1), None)
            return BatchStats(n, v.sum().reshape(1), v[-1:])
        if value.ndim != 0:
            raise ValueError(
                f"MeanLoss: expected a scalar (batch-mean) or 1-d per-sample loss, got "
                f"shape {tuple(value.shape)}"
            )
        if self._batch_size is not None:
            n = int(self._batch_size(batch, outputs))
        else:
            found = _infer_batch_size(batch)
            if found is None:
                raise ValueError(
                    f"MeanLoss: cannot weight a batch-mean loss: no tensor with a batch "
                    f"dimension in a batch of type {type(batch).__name__}; pass "
                    "batch_size=lambda batch, outputs: ... or per-sample losses."
                )
            n = found
        return BatchStats(n, (value.to(dt) * n).reshape(1), None)

    def finalize(self, n: int, totals: list[float]) -> dict[str, float]:
        return {self.names[0]: totals[0] / n}

    def _unknown_last_hint(self) -> str:
        return "the losses were batch means; return per-sample losses (reduction='none')"

    def __repr__(self) -> str:
        return f"MeanLoss(key={self.key!r}, name={self.names[0]!r}, prefix={self.prefix!r})"


# -- Evaluator ----------------------------------------------------------------------


def _metric_label(m: Any) -> str:
    return repr(m) if isinstance(m, SumMetric) else type(m).__name__


class Evaluator:
    """Several metrics folded together; the result dicts are merged.

    The accumulator is a tuple with one entry per metric. Two metrics producing the
    same result key is an error (MMEngine raises ``ValueError`` too): raised at
    construction when the metrics declare their ``keys`` (all `SumMetric` do), else by
    `compute`. Give one of them a ``prefix=``.
    """

    def __init__(self, metrics: Metric | Sequence[Metric]) -> None:
        if not isinstance(metrics, Sequence):
            metrics = [metrics]
        for m in metrics:
            missing = [a for a in ("init", "update", "compute") if not callable(getattr(m, a, None))]
            if missing:
                raise TypeError(
                    f"Evaluator: {m!r} is not a metric: it lacks {', '.join(missing)} "
                    "(see fengine.metrics.Metric)"
                )
        self.metrics: tuple[Metric, ...] = tuple(metrics)
        seen: dict[str, Any] = {}
        for m in self.metrics:
            keys = getattr(m, "keys", None)
            if keys is None or callable(keys):
                continue
            for key in keys:
                if key in seen:
                    raise ValueError(self._clash(key, seen[key], m))
                seen[key] = m

    @staticmethod
    def _clash(key: str, first: Any, second: Any) -> str:
        return (
            f"Evaluator: two metrics produce the result key {key!r} ({_metric_label(first)} "
            f"and {_metric_label(second)}); give them different prefixes, e.g. "
            f"{type(second).__name__}(..., prefix='other')."
        )

    def init(self) -> tuple:
        return tuple(m.init() for m in self.metrics)

    def update(self, acc: Sequence[Any], batch: Any, outputs: Any) -> tuple:
        if len(acc) != len(self.metrics):
            raise ValueError(
                f"Evaluator: the accumulator has {len(acc)} entries for "
                f"{len(self.metrics)} metrics; use Evaluator.init()."
            )
        return tuple(m.update(a, batch, outputs) for m, a in zip(self.metrics, acc))

    def reduce(self, acc: Sequence[Any]) -> tuple:
        """Each metric's ``reduce`` (identity for metrics without one)."""
        return tuple(
            getattr(m, "reduce", lambda a: a)(a) for m, a in zip(self.metrics, acc)
        )

    def compute(self, acc: Sequence[Any], size: int | None = None) -> dict[str, float]:
        """Reduce across ranks, compute every metric, merge (MMEngine ``evaluate(size)``)."""
        return self._merge(self.reduce(acc), size)

    def _merge(self, acc: Sequence[Any], size: int | None) -> dict[str, float]:
        results: dict[str, float] = {}
        owner: dict[str, Any] = {}
        for m, a in zip(self.metrics, acc):
            out = m.compute(a) if size is None else m.compute(a, size)
            for key, value in out.items():
                if key in results:
                    raise ValueError(self._clash(key, owner[key], m))
                results[key] = value
                owner[key] = m
        return results

    def offline(
        self,
        predictions: Iterable[Any],
        data: Iterable[Any] | None = None,
        chunk_size: int = 1,
        *,
        collate: Callable[[list], Any] = default_collate,
    ) -> dict[str, float]:
        """Evaluate saved per-sample predictions (MMEngine ``offline_evaluate``).

        ``predictions`` holds one entry per sample (e.g. a logits row, or a dict with
        ``logits`` and ``label``); ``data`` the matching dataset samples, or None. They
        are cut into chunks of ``chunk_size`` samples, each chunk collated (stacked, by
        ``default_collate``) into the ``(batch, outputs)`` of one `update`: the same
        fold as online evaluation, so the result equals it (bitwise for counts; for
        float sums, up to float64 rounding unless the chunks match the online batches).
        Local: no cross-rank reduce, the size is the number of predictions.
        """
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"Evaluator.offline: chunk_size must be an int >= 1, got {chunk_size!r}")
        if data is not None and hasattr(predictions, "__len__") and hasattr(data, "__len__"):
            if len(predictions) != len(data):  # type: ignore[arg-type]
                raise ValueError(
                    "Evaluator.offline: predictions and data must have the same length, got "
                    f"{len(predictions)} predictions and {len(data)} data samples"  # type: ignore[arg-type]
                )
        preds = iter(predictions)
        samples = iter(data) if data is not None else None
        acc = self.init()
        size = 0
        while chunk := list(itertools.islice(preds, chunk_size)):
            batch = None
            if samples is not None:
                dchunk = list(itertools.islice(samples, len(chunk)))
                if len(dchunk) != len(chunk):
                    raise ValueError(
                        "Evaluator.offline: data ran out after "
                        f"{size + len(dchunk)} samples, before the predictions did"
                    )
                batch = collate(dchunk)
            acc = self.update(acc, batch, collate(chunk))
            size += len(chunk)
        if samples is not None and next(samples, _END) is not _END:
            raise ValueError(
                f"Evaluator.offline: data has more samples than the {size} predictions"
            )
        return self._merge(acc, size)

    def __repr__(self) -> str:
        return f"Evaluator({list(self.metrics)!r})"


_END = object()
