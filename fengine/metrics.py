"""Evaluation metrics as pure folds (MMEngine's ``BaseMetric``/``Evaluator``, functional).

A metric is a fold over the evaluation data::

    acc = metric.init()
    for batch in loader:                      # the RAW loader batch, not preprocessed
        acc = metric.update(acc, batch, eval_fn(state, batch))
    results = metric.compute(metric.reduce(acc), size=len(dataset))

``update`` returns a new accumulator and never mutates ``acc``. Accumulators hold
sufficient statistics (sums and counts), not predictions: constant memory, checkpointable
as a pytree. They stay on the outputs' device; the one host transfer is in ``compute``.

MMEngine: ``process`` -> ``update``, ``self.results`` -> ``acc``, ``collect_results`` ->
``reduce``, ``compute_metrics`` -> ``compute``, ``evaluate(size)`` ->
``Evaluator.compute(acc, size)``, ``offline_evaluate`` -> ``Evaluator.offline``;
``default_prefix``/``prefix=`` are the same (keys become ``f"{prefix}/{name}"``).

A `SumMetric` accumulator is ``{"n": (R,) samples seen, "total": (S,) summed statistics,
"last": (R, S) statistics of the last sample, "last_known": (R,) 1 where ``last`` is
exact}``, R = 1 before ``reduce``. In a multi-rank ``torch.distributed`` run, ``reduce``
sums ``total`` and gathers the rest in rank order, so every rank gets the same result.
``compute(acc, size)`` then drops the padding of ``round_up=True`` samplers
(``DefaultSampler``, ``DistributedSampler``): one duplicate at the end of each of the last
``n - size`` ranks, i.e. their ``last``. More padding than that raises instead of giving a
wrong number. Fewer samples than ``size`` (a sampler over a subset, a ``drop_last`` loader)
are all kept, as MMEngine's ``collect_results`` keeps them (it only truncates to ``size``).
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar, NamedTuple, Protocol, TypeVar, runtime_checkable

import torch
import torch.distributed as dist
from torch.utils.data import default_collate

from fengine import distributed


__all__ = [
    "Accuracy",
    "BatchStats",
    "Evaluator",
    "MeanLoss",
    "Metric",
    "SumMetric",
    "add_prefix",
    "collect_results",
]

_V = TypeVar("_V")  # a result value (float), or None where only the keys matter


def add_prefix(prefix: str | None, results: Mapping[str, _V]) -> dict[str, _V]:
    """``{f"{prefix}/{k}": v}`` when ``prefix`` is set, else a plain copy (MMEngine rule)."""
    return {f"{prefix}/{k}" if prefix else k: v for k, v in results.items()}


@runtime_checkable
class Metric(Protocol):
    """What `Evaluator` needs from a metric; subclassing is optional.

    ``init()`` the empty accumulator; ``update(acc, batch, outputs)`` folds in one raw
    batch and what the eval function returned for it; ``reduce(acc)`` combines ranks
    (by default `collect_results`: a list of per-sample results gathered in the sampler's
    order); ``compute(acc, size=None)`` the prefixed results. In a multi-rank run ``reduce`` is
    a collective (every rank evaluates, not rank 0 alone) and ``compute`` runs on rank 0 only
    (no collectives in it): its results are sent to every rank. ``size`` (the dataset's length,
    to drop a sharded sampler's padding) is passed only when given and only to a ``compute``
    that takes it: ``compute(acc)`` suffices for a list of per-sample results (`Evaluator` cuts
    the padding), while a metric with its own ``reduce`` must take ``size`` to be given one.
    """

    default_prefix: ClassVar[str | None] = None
    prefix: str | None

    def init(self) -> Any: ...

    def update(self, acc: Any, batch: Any, outputs: Any) -> Any: ...

    def compute(self, acc: Any, size: int | None = None) -> dict[str, float]: ...

    def reduce(self, acc: Any) -> Any:
        return collect_results(acc, self)


def collect_results(acc: Any, metric: Any) -> Any:
    """The default ``reduce``: MMEngine's ``collect_results`` for a list of per-sample results.

    In one process, ``acc`` as it is. In a multi-rank run every rank's list, interleaved in the
    sampler's order (rank r holds samples r, r + world, ...; `Evaluator.compute` then cuts the
    ``round_up`` padding at the end to ``size``); ``None`` entries are dropped as MMEngine drops
    them. Any other accumulator needs the metric's own ``reduce``: refused, not computed on one
    rank's share of the data.
    """
    world = distributed.world_size()
    if world == 1:
        return acc
    if not isinstance(acc, list):
        raise TypeError(
            f"{type(metric).__name__}: a {world}-process evaluation must combine the ranks' "
            f"accumulators, and a {type(acc).__name__} accumulator has no default way: define "
            "reduce(acc) (e.g. all_reduce its sums), or keep a list of per-sample results "
            "(gathered in the sampler's order, as MMEngine's collect_results)"
        )
    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, acc)
    return [
        x for x in itertools.chain.from_iterable(itertools.zip_longest(*parts)) if x is not None
    ]


def _cut(results: list, size: int, metric: Any) -> list:
    """The gathered per-sample ``results`` without a sharded sampler's padding (at most one
    duplicate per rank but one, at the end), as MMEngine's ``collect_results``; more than that
    is no per-sample list (a per-token one, say), which the cut would silently shorten."""
    world = distributed.world_size()
    if len(results) > size + world - 1:
        raise ValueError(
            f"{type(metric).__name__}: its list accumulator holds {len(results)} entries for "
            f"{size} samples on {world} ranks: a list holds one entry per sample (MMEngine's "
            "results, cut to the dataset's size); keep one per sample, or define reduce(acc)"
        )
    return results[:size]


def _takes_size(metric: Any) -> bool:
    """True when ``metric.compute(acc, size)`` is a valid call (by its signature; True when
    it has none that Python can read, as the protocol says)."""
    try:
        signature = inspect.signature(metric.compute)
    except ValueError:
        return True
    try:
        signature.bind(None, 0)
    except TypeError:
        return False
    return True


def _reduces_by_default(metric: Any) -> bool:
    """True when ``metric`` has no ``reduce`` of its own (it gets `collect_results`)."""
    return getattr(type(metric), "reduce", Metric.reduce) is Metric.reduce


class BatchStats(NamedTuple):
    """One batch for `SumMetric`: sample count, (S,) sums, (S,) last sample or None if unknown."""

    n: int
    total: torch.Tensor
    last: torch.Tensor | None


def _gather_cat(t: torch.Tensor, world: int) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


class SumMetric(Metric):
    """Base for metrics computed from per-sample statistics summed over samples.

    Subclasses set ``names`` (unprefixed results), ``num_stats`` (S) and ``stat_dtype``,
    and implement `batch_stats` and `finalize`.
    """

    names: tuple[str, ...] = ()
    num_stats: int = 1
    stat_dtype: ClassVar[torch.dtype] = torch.int64
    _unknown_last_hint = "per-sample statistics were not available"

    def __init__(self, prefix: str | None = None) -> None:
        self.prefix = prefix or self.default_prefix  # as MMEngine: "" falls back too

    @property
    def keys(self) -> tuple[str, ...]:
        """The prefixed result keys, known before `compute` (for early clash checks)."""
        return tuple(add_prefix(self.prefix, dict.fromkeys(self.names)))

    def batch_stats(self, batch: Any, outputs: Any) -> BatchStats:  # pragma: no cover
        raise NotImplementedError

    def finalize(self, n: int, totals: list[float]) -> dict[str, float]:  # pragma: no cover
        """Unprefixed results from the sample count and the summed statistics."""
        raise NotImplementedError

    def init(self) -> dict[str, torch.Tensor]:
        s, dt = self.num_stats, self.stat_dtype
        return {
            "n": torch.zeros(1, dtype=torch.int64),
            "total": torch.zeros(s, dtype=dt),
            "last": torch.zeros(1, s, dtype=dt),
            "last_known": torch.zeros(1, dtype=torch.int64),
        }

    def update(self, acc: Mapping[str, torch.Tensor], batch: Any, outputs: Any) -> dict:
        st = self.batch_stats(batch, outputs)
        if st.n == 0:
            return dict(acc)
        dev, dt = st.total.device, st.total.dtype
        known = st.last is not None
        last = st.last if st.last is not None else torch.zeros_like(st.total)
        return {  # non_blocking: moving the CPU init values must not sync with the device
            "n": acc["n"].to(dev, non_blocking=True) + st.n,
            "total": acc["total"].to(dev, dt, non_blocking=True) + st.total,
            "last": last.reshape(1, -1).to(dt),
            "last_known": torch.full((1,), int(known), dtype=torch.int64, device=dev),
        }

    def reduce(self, acc: Mapping[str, torch.Tensor]) -> dict:
        """Sum ``total``, gather the rest across ranks (a collective on the default group)."""
        world = distributed.world_size()
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
        n_ranks, totals = acc["n"].tolist(), acc["total"].tolist()  # the host transfers
        n = sum(n_ranks)
        if size is not None and size < n:
            totals = self._drop_padding(acc, n_ranks, totals, size)
            n = size
        if n == 0:
            raise ValueError(
                f"{type(self).__name__}: no samples were seen (empty accumulator): the "
                "evaluation data yielded none, or no metric update was run before compute."
            )
        return add_prefix(self.prefix, self.finalize(n, totals))

    def _drop_padding(self, acc, n_ranks: list[int], totals: list, size: int) -> list:
        name, n, ranks = type(self).__name__, sum(n_ranks), len(n_ranks)
        pad = n - size
        if size < 0:
            raise ValueError(f"{name}: size must be >= 0 (the dataset's length), got {size}")
        if pad > ranks and ranks > 1 and n == size * ranks:
            raise ValueError(
                f"{name}: each of the {ranks} ranks saw all {size} samples: the evaluation data "
                "is not sharded; build it with rank= and world_size= (fengine.data.Loader) or a "
                "DistributedSampler"
            )
        if pad > ranks:
            raise ValueError(
                f"{name}: {n} samples were seen for size={size}, i.e. {pad} padded "
                f"duplicates, but round_up padding adds at most one per rank and there "
                f"{'is' if ranks == 1 else 'are'} {ranks} rank(s) in the accumulator "
                "(was reduce called?)."
            )
        last, known = acc["last"].tolist(), acc["last_known"].tolist()
        for r in range(ranks - pad, ranks):
            if n_ranks[r] == 0 or not known[r]:
                why = "it saw no samples" if n_ranks[r] == 0 else self._unknown_last_hint
                raise ValueError(
                    f"{name}: cannot drop the padded duplicate of rank {r}: the statistics "
                    f"of its last sample are unknown ({why})."
                )
            totals = [t - v for t, v in zip(totals, last[r])]
        return totals

    def __repr__(self) -> str:
        return f"{type(self).__name__}(prefix={self.prefix!r})"


# -- Accuracy -----------------------------------------------------------------------


def _default_logits(batch: Any, outputs: Any) -> Any:
    return outputs["logits"] if isinstance(outputs, Mapping) and "logits" in outputs else outputs


def _label_from(container: Mapping, where: str) -> Any:
    for key in ("label", "labels"):
        if key in container:
            return container[key]
    raise KeyError(
        f"Accuracy: {where} is a dict without a 'label' or 'labels' key (keys: "
        f"{sorted(map(str, container))}); pass target=lambda batch, outputs: ... to say "
        "where the labels are."
    )


def _default_target(batch: Any, outputs: Any) -> Any:
    if batch is None:
        if isinstance(outputs, Mapping):
            return _label_from(outputs, "the batch is None and the outputs")
        raise ValueError(
            "Accuracy: the batch is None (offline evaluation without data?) and the "
            f"outputs are a {type(outputs).__name__}, not a dict with a 'label' key; pass "
            "data=..., dict predictions with a 'label', or target=lambda batch, outputs: ...."
        )
    if isinstance(batch, Mapping):
        return _label_from(batch, "the batch")
    if isinstance(batch, (tuple, list)):
        if len(batch) < 2:
            raise ValueError(
                "Accuracy: expected a batch (inputs, labels, ...) with the labels at "
                f"index 1, got a {type(batch).__name__} of length {len(batch)}; pass "
                "target=lambda batch, outputs: ...."
            )
        return batch[1]
    raise TypeError(
        f"Accuracy: cannot find labels in a batch of type {type(batch).__name__}; "
        "expected a tuple/list (labels at index 1) or a dict with 'label'/'labels', "
        "or pass target=lambda batch, outputs: ...."
    )


_RANK_CHUNK = 2**20  # scores compared per chunk of rows: bounded temporaries, cache-sized


def _label_rank(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(N,) how many classes rank before each label: ``scores.sort(descending=True,
    stable=True)``'s order (ties to the lowest index as ``argmax``, NaN above every number as
    in ``sort`` and ``topk``), counted in O(N C) by chunks of rows (a sort is some 10x slower at
    C = 1000; whole (N, C) masks were several times the logits' memory at a 50k vocabulary).
    A label outside [0, C) is in no top k (rank C)."""
    n, c = scores.shape
    labels = labels.long()  # gather's index (uint8 / int16 labels are valid ones)
    inside = (labels >= 0) & (labels < c)
    own = scores.gather(1, labels.clamp(0, c - 1)[:, None])  # (N, 1) the label's score
    rows = max(1, _RANK_CHUNK // max(c, 1))
    ranks = [
        _chunk_rank(scores[i : i + rows], own[i : i + rows], labels[i : i + rows])
        for i in range(0, n, rows)
    ]
    rank = torch.cat(ranks) if len(ranks) != 1 else ranks[0]
    return torch.where(inside, rank, c)


def _chunk_rank(s: torch.Tensor, own: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """`_label_rank` of some rows. On the CPU, two passes count the classes above each label
    (``not s <= own``: a NaN too) and its ties; the rows with a tie or a NaN label score are
    then counted exactly (picking them reads the counts: no sync on the CPU); on a GPU every row
    is counted exactly, with no host read."""
    if s.device.type != "cpu":
        return _exact_rank(s, own, labels)
    c = s.shape[1]
    rank = c - (s <= own).sum(dim=1)
    odd = ((s == own).sum(dim=1) > 1) | own[:, 0].isnan()  # a tie (or no number) to break
    if odd.any():
        at = odd.nonzero()[:, 0]
        rank[at] = _exact_rank(s[at], own[at], labels[at])
    return rank


def _exact_rank(s: torch.Tensor, own: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Classes above each label, ties before it by index, NaN above every number."""
    lower = torch.arange(s.shape[1], device=s.device) < labels[:, None]
    rank = (s > own).sum(dim=1) + ((s == own) & lower).sum(dim=1)
    if s.is_floating_point():  # NaN: above every number, tied with another NaN
        nan, own_nan = s.isnan(), own[:, 0].isnan()
        rank += torch.where(own_nan, (nan & lower).sum(dim=1), nan.sum(dim=1))
    return rank


class Accuracy(SumMetric):
    """Top-k classification accuracy in percent, results ``accuracy`` (k=1), ``accuracy_top{k}``.

    A sample is correct at k when its label is among the first k classes of one ranking of its
    logits (highest first, ties to the lowest index as ``argmax``): every k reads a prefix of it,
    so accuracy never drops with k and tied logits count exactly k classes (mmpretrain's rule).

    Args:
      topk: an int or a tuple of distinct positive ints.
      prefix: key prefix (see `Metric`).
      logits: ``(batch, outputs) -> Tensor (N, C)``; default ``outputs`` or
        ``outputs["logits"]``.
      target: ``(batch, outputs) -> Tensor (N,)`` of class indices; default ``batch[1]``,
        ``batch["label"|"labels"]``, or ``outputs["label"|"labels"]`` when the batch is None.
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
        labels = torch.as_tensor(self._target(batch, outputs))
        n, c = scores.shape
        bad_dtype = labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool
        if labels.shape != (n,) or bad_dtype:
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
        if n == 0:
            return BatchStats(0, scores.new_zeros(0), None)  # ignored by update
        # non_blocking only towards an accelerator: a device-to-host copy would return before
        # the labels arrived, and the comparison below reads them on the host
        to_host = scores.device.type == "cpu"
        scores, labels = scores.detach(), labels.to(scores.device, non_blocking=not to_host)
        if self.topk == (1,):  # the ranking's first class is argmax's: found without ranking
            correct = (scores.argmax(dim=1) == labels)[:, None].to(torch.int64)
        else:  # one ranking for every k: tied logits fill exactly k places
            rank = _label_rank(scores, labels)
            correct = torch.stack([rank < k for k in self.topk], dim=1).to(torch.int64)  # (N, K)
        return BatchStats(n, correct.sum(dim=0), correct[-1])

    def finalize(self, n: int, totals: list[float]) -> dict[str, float]:
        return {name: 100.0 * c / n for name, c in zip(self.names, totals)}

    def __repr__(self) -> str:
        return f"Accuracy(topk={self.topk}, prefix={self.prefix!r})"


# -- MeanLoss -----------------------------------------------------------------------


def _infer_batch_size(batch: Any) -> int | None:
    """The number of samples in ``batch``: the one size all its fields agree on (None when no field
    has one; a ValueError when they disagree). A field's possible sizes are a tensor's dim 0, or
    for a list, its length (per-sample items, as `pseudo_collate` gives them) or its items'
    common size (fields of a nested sample, as ``default_collate`` gives them)."""
    fields = list(batch.values()) if isinstance(batch, Mapping) else batch
    if not isinstance(fields, (tuple, list)):
        fields = [fields]
    common = _agreed([_sizes(f) for f in fields])
    if common is None:
        return None
    if len(common) != 1:
        raise ValueError(
            f"MeanLoss: cannot tell a batch-mean loss's batch size: the batch's fields have sizes "
            f"{sorted(_sizes_by_field(fields))}; pass batch_size=lambda batch, outputs: ... "
            "or per-sample losses"
        )
    return next(iter(common))


def _batch_size_or_none(batch: Any) -> int | None:
    """`_infer_batch_size`, None where the fields disagree (a check that cannot be made)."""
    try:
        return _infer_batch_size(batch)
    except ValueError:
        return None


def _sizes(field: Any) -> set[int]:
    if isinstance(field, torch.Tensor):
        return {field.shape[0]} if field.ndim else set()
    if isinstance(field, Mapping):
        return _agreed([_sizes(v) for v in field.values()]) or set()
    if isinstance(field, (tuple, list)) and field:
        return {len(field)} | (_agreed([_sizes(v) for v in field]) or set())
    return set()


def _agreed(candidates: list[set[int]]) -> set[int] | None:
    """The sizes every field that has any allows (None when none has any)."""
    common: set[int] | None = None
    for c in candidates:
        if c:
            common = set(c) if common is None else common & c
    return common


def _sizes_by_field(fields: Any) -> list[tuple[int, ...]]:
    return [tuple(sorted(s)) for s in map(_sizes, fields) if s]


class MeanLoss(SumMetric):
    """Mean of a loss over *samples* (not over batches), summed in float64.

    Args:
      key: where the loss is in dict outputs; tensor or number outputs are the loss.
      name: the result name (default: ``key``).
      loss: ``(batch, outputs) -> Tensor | float`` overriding the extraction: 0-d is a
        batch mean, 1-d per-sample losses (``reduction="none"``).
      batch_size: ``(batch, outputs) -> int``, the sample count of a batch-mean loss;
        default dim 0 of the first tensor in the batch.
      prefix: key prefix (see `Metric`).

    Padding (``compute(acc, size)``) can be dropped only for per-sample losses.
    """

    stat_dtype: ClassVar[torch.dtype] = torch.float64
    _unknown_last_hint = "the losses were batch means; return per-sample losses (reduction='none')"

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
        value = value.to(torch.float32 if value.device.type == "mps" else torch.float64)
        if value.ndim == 1:
            n = value.shape[0]
            if self._batch_size is not None and (bs := self._batch_size(batch, outputs)) != n:
                raise ValueError(
                    f"MeanLoss: batch_size says {bs} samples "
                    f"but the per-sample loss has shape {tuple(value.shape)}"
                )
            if self._batch_size is None and (seen := _batch_size_or_none(batch)) not in (None, n):
                raise ValueError(  # e.g. a batch mean as shape (1,), or per-token losses
                    f"MeanLoss: a 1-d loss is one value per sample, but it has {n} values for a "
                    f"batch of {seen} samples; pass a scalar batch-mean loss, or "
                    "batch_size=lambda batch, outputs: ... to say what it counts"
                )
            return BatchStats(n, value.sum().reshape(1), value[-1:])
        if value.ndim != 0:
            raise ValueError(
                f"MeanLoss: expected a scalar (batch-mean) or 1-d per-sample loss, got "
                f"shape {tuple(value.shape)}"
            )
        if self._batch_size is not None:
            n = int(self._batch_size(batch, outputs))
        else:
            inferred = _infer_batch_size(batch)
            if inferred is None:
                raise ValueError(
                    f"MeanLoss: cannot weight a batch-mean loss: no tensor with a batch "
                    f"dimension in a batch of type {type(batch).__name__}; pass "
                    "batch_size=lambda batch, outputs: ... or per-sample losses."
                )
            n = inferred
        return BatchStats(n, (value * n).reshape(1), None)

    def finalize(self, n: int, totals: list[float]) -> dict[str, float]:
        return {self.names[0]: totals[0] / n}

    def __repr__(self) -> str:
        return f"MeanLoss(key={self.key!r}, name={self.names[0]!r}, prefix={self.prefix!r})"


# -- Evaluator ----------------------------------------------------------------------


def _label(m: Any) -> str:
    return repr(m) if isinstance(m, SumMetric) else type(m).__name__


def _merge_unique(results: Iterable[tuple[Any, Mapping[str, _V]]]) -> dict[str, _V]:
    """Merge ``(metric, results)`` pairs; a key produced twice is a ``ValueError``."""
    merged: dict[str, _V] = {}
    owner: dict[str, Any] = {}
    for m, out in results:
        for key, value in out.items():
            if key in merged:
                raise ValueError(
                    f"Evaluator: two metrics produce the result key {key!r} "
                    f"({_label(owner[key])} and {_label(m)}); give them different prefixes, "
                    f"e.g. {type(m).__name__}(..., prefix='other')."
                )
            merged[key], owner[key] = value, m
    return merged


class Evaluator:
    """Several metrics folded together (the accumulator is a tuple); results are merged.

    Two metrics producing the same key is a ``ValueError`` (as in MMEngine): at
    construction for metrics that declare ``keys`` (all `SumMetric`), else in `compute`.
    """

    def __init__(self, metrics: Metric | Sequence[Metric]) -> None:
        if not isinstance(metrics, Sequence):
            metrics = [metrics]
        for m in metrics:
            missing = [
                a for a in ("init", "update", "compute") if not callable(getattr(m, a, None))
            ]
            if missing:
                raise TypeError(
                    f"Evaluator: {m!r} is not a metric: it lacks {', '.join(missing)} "
                    "(see fengine.metrics.Metric)"
                )
        self.metrics: tuple[Metric, ...] = tuple(metrics)
        self._takes_size = tuple(_takes_size(m) for m in self.metrics)  # once, not per call
        declared = [(m, getattr(m, "keys", None)) for m in self.metrics]
        _merge_unique(
            (m, dict.fromkeys(k)) for m, k in declared if k is not None and not callable(k)
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
        """Each metric's ``reduce`` (`collect_results` for metrics without one)."""
        return tuple(
            collect_results(a, m) if _reduces_by_default(m) else m.reduce(a)
            for m, a in zip(self.metrics, acc)
        )

    def compute(self, acc: Sequence[Any], size: int | None = None) -> dict[str, float]:
        """Reduce across ranks, compute every metric on rank 0 and send its results to every
        rank, so all act alike on them (MMEngine ``evaluate(size)``); the per-sample lists of
        metrics without their own ``reduce`` are cut to ``size`` (the sampler's padding), and
        any other accumulator goes with ``size`` to a ``compute`` that must take it."""
        reduced = []
        for m, a, takes_size in zip(self.metrics, self.reduce(acc), self._takes_size):
            if size is not None and isinstance(a, list) and _reduces_by_default(m):
                a = _cut(a, size, m)
            elif size is not None and not takes_size:
                name = type(m).__name__
                raise TypeError(
                    f"{name}: Evaluator.compute got size={size} (the dataset's length, to drop a "
                    f"sharded sampler's padding) but {name}.compute{inspect.signature(m.compute)} "
                    "takes no size, and only a list accumulator without a reduce of its own is "
                    "cut for it; define compute(self, acc, size=None) (ignore size if your reduce "
                    "already drops the padding)"
                )
            reduced.append(a)
        return distributed.computed_by_main(lambda: self._merge(reduced, size))

    def _merge(self, acc: Sequence[Any], size: int | None) -> dict[str, float]:
        """Every metric's results; ``size`` goes to those whose ``compute`` takes it."""
        return _merge_unique(
            (m, m.compute(a, size) if size is not None and takes_size else m.compute(a))
            for m, a, takes_size in zip(self.metrics, acc, self._takes_size)
        )

    def offline(
        self,
        predictions: Iterable[Any],
        data: Iterable[Any] | None = None,
        chunk_size: int = 1,
        *,
        collate: Callable[[list], Any] = default_collate,
    ) -> dict[str, float]:
        """Evaluate saved per-sample predictions (MMEngine ``offline_evaluate``).

        ``predictions`` (one entry per sample) and the matching ``data`` samples (or
        None) are cut into chunks of ``chunk_size``, each collated into the ``(batch,
        outputs)`` of one `update`: the online fold, so the same results. Local: no
        cross-rank reduce; the size is the number of predictions.
        """
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(
                f"Evaluator.offline: chunk_size must be an int >= 1, got {chunk_size!r}"
            )
        if data is not None and hasattr(predictions, "__len__") and hasattr(data, "__len__"):
            if len(predictions) != len(data):  # type: ignore[arg-type]
                raise ValueError(
                    "Evaluator.offline: predictions and data must have the same length, got "
                    f"{len(predictions)} predictions and {len(data)} data samples"  # type: ignore[arg-type]
                )
        preds, samples = iter(predictions), None if data is None else iter(data)
        acc, size, end = self.init(), 0, object()
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
        if samples is not None and next(samples, end) is not end:
            raise ValueError(
                f"Evaluator.offline: data has more samples than the {size} predictions"
            )
        return self._merge(acc, size)

    def __repr__(self) -> str:
        return f"Evaluator({list(self.metrics)!r})"
