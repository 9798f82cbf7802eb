"""Derived randomness: every random draw is a pure function of the run's seed.

Per-step randomness (dropout) uses ``fold_in(seed, step, micro_step)``;
per-sample data randomness uses ``fold_in(seed, tag, epoch, index)``
(`fengine.data.augment_generator`: the tag keeps it apart from dropout's keys). Resume and
replay therefore need no RNG snapshots, and the number of DataLoader workers
cannot change what a sample sees.
"""

from __future__ import annotations

import functools
import logging
import os
import random

import numpy as np
import torch


__all__ = ["fold_in", "generator", "seed_everything", "seeded_default_generators"]

_MASK64 = (1 << 64) - 1


def _mix64(z: int) -> int:
    """SplitMix64 finaliser: a bijective avalanche on 64-bit integers."""
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


@functools.lru_cache(maxsize=64)
def _mixed(value: int) -> int:
    """``_mix64`` of a value that recurs call after call (a run's seed, a micro-batch index)."""
    return _mix64(value & _MASK64)


def fold_in(seed: int, *data: int) -> int:
    """A 63-bit key derived from ``seed`` and ``data`` (like ``jax.random.fold_in``).

    Distinct inputs give unrelated keys; the same inputs always give the same key,
    on every machine and Python version.
    """
    key = _mixed(int(seed))
    for d in data:
        key = _mix64(key ^ _mixed(int(d)))
    return key >> 1  # torch seeds must fit in a signed 64-bit int


def generator(seed: int, *data: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A fresh ``torch.Generator`` seeded with ``fold_in(seed, *data)``."""
    g = torch.Generator(device=device)
    g.manual_seed(fold_in(seed, *data))
    return g


class seeded_default_generators:  # noqa: N801 - used like a function: `with seeded_default_generators(key):`
    """Seed torch's default CPU (and given CUDA) generators with ``key``; restore them after.

    Modules such as ``nn.Dropout`` draw from the default generator, so the step
    seeds it from a derived key inside this scope; the caller's generator state is
    left exactly as it was (cheaper than ``torch.random.fork_rng``: ~3 us on CPU;
    a class, not a generator function, because it runs on every step).
    """

    __slots__ = ("key", "devices", "saved", "cuda_saved")

    def __init__(self, key: int, devices: tuple[torch.device, ...] = ()) -> None:
        self.key, self.devices = key, devices

    def __enter__(self) -> None:
        cpu = torch.default_generator
        self.saved = cpu.get_state()
        self.cuda_saved = []
        cpu.manual_seed(self.key)
        try:
            for dev in self.devices:
                if dev.type == "cuda":
                    g = torch.cuda.default_generators[
                        dev.index if dev.index is not None else torch.cuda.current_device()
                    ]
                    self.cuda_saved.append((g, g.get_state()))
                    g.manual_seed(self.key)
        except BaseException:
            self.__exit__()
            raise

    def __exit__(self, *exc) -> None:
        torch.default_generator.set_state(self.saved)
        for g, state in self.cuda_saved:
            g.set_state(state)


def seed_everything(
    seed: int | None = None, *, deterministic: bool = False, diff_rank_seed: bool = False
) -> int:
    """MMEngine's ``randomness=dict(seed=..., deterministic=..., diff_rank_seed=...)``: seed Python's
    ``random``, NumPy and torch (CPU and every CUDA device) before the model is built, since weight
    init is the one draw a run takes from the global generators (training draws from derived keys).

    ``seed=None`` draws one (rank 0's, shared by every rank) and logs it; ``diff_rank_seed`` adds
    the rank; ``deterministic`` turns on torch's deterministic algorithms and turns cudnn's
    benchmark off. Returns the seed used, the rank's with ``diff_rank_seed`` (record the base
    seed in the state, ``step.init(model, seed=...)``, the same on every rank: `fit` refuses
    ranks that differ in it; per-rank dropout is ``fe.data_parallel(diff_rank_seed=True)``).
    """
    from fengine import distributed  # distributed imports nothing from here; keep rng import-light

    if seed is None:
        drawn = [int.from_bytes(os.urandom(4), "little")]
        seed = int(distributed.gather_objects(drawn[0])[0])  # rank 0's draw, everywhere
        logging.getLogger("fengine").info("seed_everything: no seed given, drew %d", seed)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed_everything: seed must be a non-negative int or None, got {seed!r}")
    if diff_rank_seed:
        seed += distributed.rank()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    return seed
