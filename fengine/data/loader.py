"""A deterministic, resumable data loader over a map-style dataset.

Every batch is a pure function of ``(seed, epoch, batch index)``: the index
order comes from :mod:`fengine.data.sampler`, and per-sample augmentation
draws from ``augment_generator(seed, epoch, index)`` instead of a worker's
global RNG. A dataset that draws from the global generators itself (torch's,
numpy's, Python's ``random``: a torchvision or albumentations transform in its
``__getitem__``) finds them seeded from the batch's key while the batch loads.
Batches are therefore identical whatever ``num_workers`` is, and a run resumed
at batch ``k`` of an epoch sees exactly the batches an uninterrupted run would
have seen, without loading the skipped ones.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Callable, Iterator, Sequence
from itertools import count
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.utils.data

from fengine import rng
from fengine.checks import check_bool
from fengine.data.collate import default_collate
from fengine.data.sampler import InfiniteSampler, Sampler, check_int, check_seed, stream_positions


__all__ = ["Loader", "augment_generator"]

Transform = Callable[[Any, torch.Generator], Any]

# Tags that separate the DataLoader's own worker seeds, and the global generators' seeds while a
# batch loads, from per-sample keys.
_WORKER_SEED_TAG = 0x5EED_0F_3011E5
_GLOBAL_RNG_TAG = 0x61_0BA1_5EED
# Tags augmentation keys, apart from dropout's fold_in(seed, step, micro): untagged, sample m of
# epoch e drew the very numbers of micro-batch m's dropout at step e.
_SAMPLE_TAG = zlib.crc32(b"fengine.data.augment")


def augment_generator(seed: int, *data: int) -> torch.Generator:
    """A fresh generator for data augmentation, ``fengine.rng.generator(seed, _SAMPLE_TAG, *data)``.

    The Loader hands sample ``index`` of ``epoch`` ``augment_generator(seed, epoch, index)``; a
    batch augmentation (`ImagePreprocessor`'s ``augment``) can take ``augment_generator(seed,
    step)``. The tag keeps these draws apart from dropout's (``fold_in(seed, step, micro)``).
    """
    return rng.generator(seed, _SAMPLE_TAG, *data)


class _Keys(NamedTuple):
    """What the batch sampler hands a worker: which samples, drawn in which epoch."""

    epochs: int | list[int]  # one epoch for the whole batch, or one per sample (stream)
    indices: list[int]


def _identity(batch: Any) -> Any:
    return batch


class _Fetch(torch.utils.data.Dataset):
    """Turns :class:`_Keys` into a collated batch (runs in the worker when there are workers)."""

    def __init__(
        self,
        dataset: Any,
        transform: Transform | None,
        collate_fn: Callable,
        seed: int,
        seed_globals: bool = True,
    ):
        self.dataset = dataset
        self.transform = transform
        self.collate_fn = collate_fn
        self.seed, self.seed_globals = seed, seed_globals
        # An unmodified TensorDataset collated by stacking is one gather per tensor.
        self.vectorised = (
            transform is None
            and collate_fn in (default_collate, torch.utils.data.default_collate)
            and isinstance(dataset, torch.utils.data.TensorDataset)
            and type(dataset).__getitem__ is torch.utils.data.TensorDataset.__getitem__
        )

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitems__(self, keys: _Keys) -> Any:
        if self.vectorised:
            idx = torch.tensor(keys.indices, dtype=torch.int64)
            # == default_collate of the sample tuples; index_select, since advanced indexing
            # (t[idx]) on a 2-D CPU tensor measured ~2000x slower for a 256-row gather.
            return [t.index_select(0, idx) for t in self.dataset.tensors]
        epochs = keys.epochs
        if isinstance(epochs, int):
            epochs = [epochs] * len(keys.indices)
        if not self.seed_globals:
            return self._load(epochs, keys.indices)
        first = (epochs[0], keys.indices[0]) if keys.indices else (0, 0)
        with _GlobalRngsSeeded(rng.fold_in(self.seed, _GLOBAL_RNG_TAG, *first)):
            return self._load(epochs, keys.indices)

    def _load(self, epochs: list[int], indices: list[int]) -> Any:
        if self.transform is None:
            samples = [self.dataset[i] for i in indices]
        else:
            samples = [
                self.transform(self.dataset[i], augment_generator(self.seed, e, i))
                for e, i in zip(epochs, indices)
            ]
        return self.collate_fn(samples)


class _GlobalRngsSeeded:
    """torch's default CPU, numpy's and Python's global generators seeded from ``key`` while one
    batch loads, so a dataset's own draws are the batch's whatever worker loads it and wherever
    the run (re)started. torch's is `fengine.rng.seeded_default_generators` (put back after); in
    the main process (``num_workers=0``) numpy's and Python's are put back too (~0.15 ms a batch,
    mostly numpy's state); a worker's are its own."""

    __slots__ = ("key", "torch", "saved")

    def __init__(self, key: int) -> None:
        self.key = key
        self.torch = rng.seeded_default_generators(key)

    def __enter__(self) -> None:
        main = torch.utils.data.get_worker_info() is None
        self.saved = (np.random.get_state(), random.getstate()) if main else None
        # a key of its own for each (numpy's and Python's Mersenne Twisters seeded alike give
        # one stream), each whole (numpy's int seed keeps only 32 bits)
        np_key, py_key = rng.fold_in(self.key, 1), rng.fold_in(self.key, 2)
        self.torch.__enter__()
        np.random.seed([np_key & 0xFFFF_FFFF, np_key >> 32])
        random.seed(py_key)

    def __exit__(self, *exc: object) -> None:
        self.torch.__exit__()
        if self.saved is not None:
            np_state, py_state = self.saved
            np.random.set_state(np_state)
            random.setstate(py_state)


class _Plan:
    """The batch sampler of the one DataLoader: replays whichever plan was set last.

    A single DataLoader (rather than one per epoch) keeps ``persistent_workers``
    alive across epochs; the plan is captured when the DataLoader's iterator is
    created, which :meth:`Loader.epoch` does right after setting it.
    """

    def __init__(self) -> None:
        self.batches: Callable[[], Iterator[_Keys]] = lambda: iter(())

    def __iter__(self) -> Iterator[_Keys]:
        return self.batches()


class Loader:
    """Batches of a map-style ``dataset``, by epoch and from any batch index.

    Args:
        dataset: supports ``len`` and ``dataset[i]``.
        batch_size: samples per batch on this rank.
        seed: the run's seed; index order is MMEngine's ``DefaultSampler`` with
            this seed, per-sample randomness is ``augment_generator(seed, epoch, index)``.
        shuffle: shuffle each epoch (else dataset order).
        drop_last: drop the last incomplete batch of each epoch.
        round_up: pad every rank to the same number of samples (MMEngine's default).
        collate_fn: list of samples -> batch (``default_collate`` stacks, and is what ``None``
            means, as in torch; see ``pseudo_collate``).
        transform: optional ``transform(sample, generator) -> sample`` for random
            per-sample augmentation; it must draw only from ``generator``.
        num_workers, pin_memory, persistent_workers, prefetch_factor: as for
            ``torch.utils.data.DataLoader``, which does the loading.
        rank, world_size: this process's shard.
        seed_globals: seed torch's, numpy's and Python's global generators from each batch's
            key while it loads (see the module; ~0.15 ms a batch without workers); False for a
            dataset that draws no random numbers itself.
    """

    def __init__(
        self,
        dataset: Any,
        batch_size: int,
        *,
        seed: int,
        shuffle: bool = True,
        drop_last: bool = False,
        round_up: bool = True,
        collate_fn: Callable[[list[Any]], Any] | None = default_collate,
        transform: Transform | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        prefetch_factor: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        seed_globals: bool = True,
    ) -> None:
        if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
            raise TypeError(
                f"Loader: `dataset` must be a map-style dataset (with __len__ and __getitem__), "
                f"got {type(dataset).__name__}"
            )
        if len(dataset) == 0:
            raise ValueError(
                "Loader: `dataset` is empty (len 0); expected a map-style dataset with at least one sample"
            )
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"Loader: `batch_size` must be an int >= 1, got {batch_size!r}")
        check_seed("Loader", seed)
        flags = dict(shuffle=shuffle, drop_last=drop_last, round_up=round_up, pin_memory=pin_memory,
                     persistent_workers=persistent_workers, seed_globals=seed_globals)  # fmt: skip
        for name, value in flags.items():
            check_bool("Loader", name, value)
        check_int("Loader", "num_workers", num_workers, 0)
        collate_fn = default_collate if collate_fn is None else collate_fn
        for name, fn in (("collate_fn", collate_fn), ("transform", transform)):
            if fn is not None and not callable(fn):  # else a TypeError at the first batch
                raise TypeError(
                    f"Loader: `{name}` must be a function (or None), got {type(fn).__name__} "
                    f"{fn!r:.80}"
                )
        if persistent_workers and num_workers == 0:
            raise ValueError("Loader: `persistent_workers=True` needs `num_workers` > 0")
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.drop_last = drop_last
        self.sampler = Sampler(
            len(dataset),
            seed=seed,
            shuffle=shuffle,
            rank=rank,
            world_size=world_size,
            round_up=round_up,
        )
        self.infinite_sampler = InfiniteSampler(
            len(dataset), seed=seed, shuffle=shuffle, rank=rank, world_size=world_size
        )
        per_rank = len(self.sampler)
        self._num_batches = per_rank // batch_size if drop_last else -(-per_rank // batch_size)
        if self._num_batches == 0 and drop_last:
            raise ValueError(
                f"Loader: drop_last=True with batch_size={batch_size} leaves zero batches: rank "
                f"{rank} of {world_size} gets {per_rank} samples per epoch; lower `batch_size` or "
                "set `drop_last=False`"
            )
        if self._num_batches == 0:
            raise ValueError(
                f"Loader: rank {rank} of {world_size} gets no sample of the {len(dataset)} with "
                "round_up=False; set round_up=True (the default: every rank gets as many, padded "
                "by repeating samples, which evaluation drops) or use fewer ranks"
            )
        self._plan = _Plan()
        self._worker_seed = torch.Generator()
        self._loader = torch.utils.data.DataLoader(
            _Fetch(dataset, transform, collate_fn, seed, seed_globals),
            # torch types batch samplers as yielding index lists, but it hands each batch
            # unchanged to the dataset's __getitems__, which takes our _Keys
            batch_sampler=self._plan,  # type: ignore[arg-type]
            collate_fn=_identity,
            num_workers=num_workers,
            pin_memory=pin_memory,
            persistent_workers=persistent_workers,
            prefetch_factor=prefetch_factor,
            # The DataLoader draws its workers' base seed from this generator, never from
            # torch's global one, so iterating leaves the caller's RNG untouched.
            generator=self._worker_seed,
        )

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        return self._num_batches

    def __iter__(self) -> Iterator[Any]:
        """Refused with the way to do it: each epoch has its own order, so a Loader is iterated
        one epoch at a time (``for batch in loader`` would repeat one epoch's order)."""
        raise TypeError(
            "a Loader is iterated one epoch at a time: loader.epoch(e) gives epoch e's batches "
            "(fit and evaluate call it for you); e.g. next(iter(loader.epoch(0))) for a look at "
            "one batch"
        )

    def _start(self, batches: Callable[[], Iterator[_Keys]], *key: int) -> Iterator[Any]:
        self._plan.batches = batches
        self._worker_seed.manual_seed(rng.fold_in(self.seed, _WORKER_SEED_TAG, *key))
        return iter(self._loader)

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Any]:
        """The batches of ``epoch`` from batch index ``start_batch`` on (``0 <= start_batch <= len(self)``).

        With ``persistent_workers`` only one epoch iterator may be live at a time
        (a new one resets the DataLoader's, as in PyTorch).
        """
        check_int("Loader.epoch", "epoch", epoch, 0)
        check_int("Loader.epoch", "start_batch", start_batch)
        if not 0 <= start_batch <= len(self):
            raise ValueError(
                f"Loader.epoch: `start_batch` must be in [0, {len(self)}] (batches per epoch), "
                f"got {start_batch}"
            )
        bs = self.batch_size
        indices = self.sampler.index_tensor(epoch)[start_batch * bs : len(self) * bs].tolist()
        chunks: Sequence[list[int]] = [indices[i : i + bs] for i in range(0, len(indices), bs)]
        return self._start(lambda: (_Keys(epoch, c) for c in chunks), epoch)

    def stream(self, start_batch: int = 0) -> Iterator[Any]:
        """Endless batches from :class:`InfiniteSampler`'s stream, from batch ``start_batch`` on.

        Batches run across permutation boundaries (nothing is dropped or padded);
        a sample's augmentation key uses the permutation number as its epoch.
        """
        check_int("Loader.stream", "start_batch", start_batch, 0)
        s, bs = self.infinite_sampler, self.batch_size
        per_call = max(len(self), 1)  # batches computed per pass over the index arithmetic

        def batches() -> Iterator[_Keys]:
            for first in count(start_batch, per_call):
                passes, idx = stream_positions(
                    s.n,
                    seed=s.seed,
                    start=first * bs,
                    count=per_call * bs,
                    shuffle=s.shuffle,
                    rank=s.rank,
                    world_size=s.world_size,
                )
                pass_list, idx_list = passes.tolist(), idx.tolist()
                for i in range(0, len(idx_list), bs):
                    yield _Keys(pass_list[i : i + bs], idx_list[i : i + bs])

        return self._start(batches, -1)
