"""Index samplers as pure functions of (seed, epoch | position, rank).

``epoch_indices`` is bit-exact with MMEngine's ``DefaultSampler``;
``stream_indices`` gives MMEngine's ``InfiniteSampler`` semantics (an endless
stream of permutations, sliced by rank) but derives permutation ``k`` from
``seed + k`` instead of drawing it from one long-lived generator, so any
position is reached by index arithmetic. Resuming therefore needs no RNG
snapshot and loads no data.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import KW_ONLY, dataclass
from typing import Any

import torch

from fengine.checks import check_bool


__all__ = [
    "InfiniteSampler",
    "Sampler",
    "epoch_indices",
    "samples_per_rank",
    "stream_indices",
]


def check_int(where: str, name: str, value: Any, low: int | None = None) -> None:
    """``value`` is an int (not a bool) ``>= low``: else a TypeError/ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, int):
        extra = " (MMEngine's seed=None, a random seed, is not supported)" if name == "seed" else ""
        raise TypeError(f"{where}: `{name}` must be an int, got {value!r}{extra}")
    if low is not None and value < low:
        raise ValueError(f"{where}: `{name}` must be >= {low}, got {value}")


def check_seed(where: str, seed: Any) -> None:
    """``seed`` is an int in ``[0, 2**63)``, as `TrainState`'s: epoch ``e``'s generator is seeded
    with ``seed + e``, which torch refuses from 2**64 on (before, at some later epoch)."""
    check_int(where, "seed", seed)
    if not 0 <= seed < 2**63:
        raise ValueError(f"{where}: `seed` must be a non-negative int below 2**63, got {seed}")


def _check_shard(rank: int, world_size: int) -> None:
    check_int("sampler", "rank", rank)
    check_int("sampler", "world_size", world_size)
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")


def _check_n(n: int) -> None:
    check_int("sampler", "n", n)
    if n < 0:
        raise ValueError(f"n (the dataset size) must be >= 0, got {n}")


def _permutation(n: int, seed: int, shuffle: bool) -> torch.Tensor:
    """``randperm(n)`` from a generator seeded with ``seed`` (MMEngine's recipe), or ``arange``."""
    if not shuffle:
        return torch.arange(n)
    g = torch.Generator()
    g.manual_seed(seed)
    return torch.randperm(n, generator=g)


def samples_per_rank(n: int, *, rank: int = 0, world_size: int = 1, round_up: bool = True) -> int:
    """How many indices ``rank`` gets per epoch (MMEngine's ``DefaultSampler.__len__``).

    With ``round_up`` every rank gets ``ceil(n / world_size)``; without it the
    ranks split the ``n`` indices unevenly (lower ranks get one more).
    """
    _check_n(n)
    _check_shard(rank, world_size)
    check_bool("sampler", "round_up", round_up)
    if round_up:
        return -(-n // world_size)
    return max(0, -(-(n - rank) // world_size))


def epoch_index_tensor(
    n: int,
    *,
    seed: int,
    epoch: int,
    shuffle: bool = True,
    rank: int = 0,
    world_size: int = 1,
    round_up: bool = True,
) -> torch.Tensor:
    """:func:`epoch_indices` as an int64 tensor (no Python list is built)."""
    check_seed("sampler", seed)
    check_int("sampler", "epoch", epoch, 0)
    check_bool("sampler", "shuffle", shuffle)
    per_rank = samples_per_rank(n, rank=rank, world_size=world_size, round_up=round_up)
    indices = _permutation(n, seed + epoch, shuffle)
    total = per_rank * world_size if round_up else n
    if total > n:  # pad by repetition so that every rank gets the same count
        indices = indices.repeat(-(-total // n))[:total]
    return indices[rank:total:world_size]


def epoch_indices(
    n: int,
    *,
    seed: int,
    epoch: int,
    shuffle: bool = True,
    rank: int = 0,
    world_size: int = 1,
    round_up: bool = True,
) -> list[int]:
    """The dataset indices ``rank`` visits in ``epoch``, bit-exact with MMEngine's ``DefaultSampler``.

    The order is ``randperm(n)`` from ``torch.Generator().manual_seed(seed + epoch)``
    (``arange(n)`` without ``shuffle``). With ``round_up`` it is padded by
    repetition to a multiple of ``world_size`` (like PyTorch's
    ``DistributedSampler(drop_last=False)``); without it nothing is added or
    removed, so ranks may get unequal counts. Rank ``r`` takes every
    ``world_size``-th index starting at ``r``.
    """
    return epoch_index_tensor(
        n,
        seed=seed,
        epoch=epoch,
        shuffle=shuffle,
        rank=rank,
        world_size=world_size,
        round_up=round_up,
    ).tolist()


@dataclass(frozen=True)
class Sampler:
    """MMEngine's ``DefaultSampler`` without mutable epoch state.

    ``sampler.epoch(e, start=k)`` iterates the indices of epoch ``e`` from the
    ``k``-th one on: mid-epoch resume is index arithmetic, no data is loaded and
    no ``set_epoch`` can be forgotten.
    """

    n: int
    _: KW_ONLY
    seed: int
    shuffle: bool = True
    rank: int = 0
    world_size: int = 1
    round_up: bool = True

    def __post_init__(self) -> None:
        _check_n(self.n)
        _check_shard(self.rank, self.world_size)
        check_seed("Sampler", self.seed)
        check_bool("Sampler", "shuffle", self.shuffle)
        check_bool("Sampler", "round_up", self.round_up)

    def index_tensor(self, epoch: int) -> torch.Tensor:
        """This rank's indices for ``epoch`` as an int64 tensor."""
        return epoch_index_tensor(
            self.n,
            seed=self.seed,
            epoch=epoch,
            shuffle=self.shuffle,
            rank=self.rank,
            world_size=self.world_size,
            round_up=self.round_up,
        )

    def indices(self, epoch: int) -> list[int]:
        """This rank's indices for ``epoch`` (see :func:`epoch_indices`)."""
        return self.index_tensor(epoch).tolist()

    def epoch(self, epoch: int, start: int = 0) -> Iterator[int]:
        """Iterate the indices of ``epoch``, skipping the first ``start`` of them."""
        if not 0 <= start <= len(self):
            raise ValueError(f"start must be in [0, {len(self)}] (indices per epoch), got {start}")
        return iter(self.index_tensor(epoch)[start:].tolist())

    def __len__(self) -> int:
        return samples_per_rank(
            self.n, rank=self.rank, world_size=self.world_size, round_up=self.round_up
        )


def stream_positions(
    n: int,
    *,
    seed: int,
    start: int,
    count: int,
    shuffle: bool = True,
    rank: int = 0,
    world_size: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(passes, indices)`` for positions ``[start, start + count)`` of ``rank``'s endless stream.

    The global stream is permutation 0, then 1, ...; permutation ``k`` is
    ``randperm(n)`` seeded with ``seed + k`` (so it equals the order of
    ``epoch_indices(n, seed=seed, epoch=k)`` before padding and slicing). Rank
    ``r`` takes global positions ``r, r + world_size, ...``. ``passes[i]`` is the
    permutation that position ``start + i`` falls in (the per-sample "epoch").
    """
    _check_shard(rank, world_size)
    check_seed("sampler", seed)
    check_bool("sampler", "shuffle", shuffle)
    if n < 1:
        raise ValueError(f"an endless stream needs n >= 1 indices, got n={n}")
    if start < 0 or count < 0:
        raise ValueError(f"start and count must be >= 0, got start={start}, count={count}")
    if count == 0:
        empty = torch.empty(0, dtype=torch.int64)
        return empty, empty
    pos = rank + world_size * torch.arange(start, start + count, dtype=torch.int64)
    first = (rank + world_size * start) // n
    last = (rank + world_size * (start + count - 1)) // n
    perms = torch.cat([_permutation(n, seed + k, shuffle) for k in range(first, last + 1)])
    return pos // n, perms.index_select(0, pos - first * n)


def stream_indices(
    n: int,
    *,
    seed: int,
    start: int,
    count: int,
    shuffle: bool = True,
    rank: int = 0,
    world_size: int = 1,
) -> list[int]:
    """Indices at positions ``[start, start + count)`` of ``rank``'s endless stream (see :func:`stream_positions`)."""
    return stream_positions(
        n, seed=seed, start=start, count=count, shuffle=shuffle, rank=rank, world_size=world_size
    )[1].tolist()


@dataclass(frozen=True)
class InfiniteSampler:
    """MMEngine's ``InfiniteSampler`` (an endless stream of permutations, sliced by rank), resumable.

    ``sampler.stream(start=p)`` continues at position ``p`` of this rank's
    stream. The first permutation equals MMEngine's; later ones are seeded with
    ``seed + k`` rather than drawn from the same generator (which could only be
    resumed by replaying every earlier draw), so they equal the epoch orders of
    :class:`Sampler` instead.
    """

    n: int
    _: KW_ONLY
    seed: int
    shuffle: bool = True
    rank: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        check_int("InfiniteSampler", "n", self.n)
        if self.n < 1:
            raise ValueError(f"InfiniteSampler needs n >= 1, got n={self.n}")
        _check_shard(self.rank, self.world_size)
        check_seed("InfiniteSampler", self.seed)
        check_bool("InfiniteSampler", "shuffle", self.shuffle)

    def indices(self, start: int, count: int) -> list[int]:
        """The ``count`` indices from position ``start`` on (a pure function)."""
        return stream_indices(
            self.n,
            seed=self.seed,
            start=start,
            count=count,
            shuffle=self.shuffle,
            rank=self.rank,
            world_size=self.world_size,
        )

    def stream(self, start: int = 0) -> Iterator[int]:
        """Iterate this rank's endless stream from position ``start``."""
        chunk = max(self.n // self.world_size, 1)
        pos = start
        while True:
            yield from self.indices(pos, chunk)
            pos += chunk

    def __iter__(self) -> Iterator[int]:
        return self.stream(0)

    def __len__(self) -> int:
        """The dataset size (as MMEngine reports it; the stream itself is endless)."""
        return self.n
