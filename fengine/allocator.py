"""Steady CPU allocations: keep a training step's large buffers in malloc's heap between steps.

A CPU step allocates and frees the same buffers every update (activations, gradients, a
compiled graph's outputs). PyTorch's CPU allocator is glibc's malloc, whose *dynamic* mmap
threshold serves a buffer from ``mmap`` (fresh pages, faulted in on first touch, given back
to the OS on free) or from the heap depending on the process's allocation history, and which
gives the heap's top back to the OS past a trim threshold. So the same step can fault in
fresh pages every update in one process and none in the next: the compiled CNN step of
``bench/run.py`` ran at ~165-175 steps/s in 2 of 7 fresh processes and ~220-245 in the other
five, and at ~215-245 in all of 7 + 7 with both thresholds fixed, at start-up or by this
module, interleaved (same bits in every process). Fixing the mmap threshold alone made it
slower: the heap's top was then given back and faulted in again every update.

`steady_cpu_allocations` fixes both for this process (glibc's ``mallopt``; the environment
variables ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` do the same at start-up;
jemalloc or tcmalloc via ``LD_PRELOAD`` are the alternatives). The price: up to
``trim_threshold`` bytes of freed memory stay with the process instead of going back to the
OS. The recipes call it for CPU runs; nothing else in fengine does. A process whose
environment already chose (those variables, a glibc tunable, a preloaded allocator) keeps
its choice.
"""

from __future__ import annotations

import ctypes
import os
import sys
from typing import Any


__all__ = ["steady_cpu_allocations"]

_M_TRIM_THRESHOLD = -1  # glibc's <malloc.h>
_M_MMAP_THRESHOLD = -3


def steady_cpu_allocations(mmap_threshold: int = 64 << 20, trim_threshold: int = 256 << 20) -> bool:
    """Serve allocations up to ``mmap_threshold`` bytes from the heap, and give the heap's top back
    to the OS only past ``trim_threshold`` free bytes (glibc). True when applied; False on another
    libc or allocator, or when the environment already chose."""
    for name, value in (("mmap_threshold", mmap_threshold), ("trim_threshold", trim_threshold)):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**31:
            raise ValueError(
                f"steady_cpu_allocations: {name} must be an int in [0, 2**31), got {value!r}"
            )
    if not sys.platform.startswith("linux") or _environment_chose():
        return False
    mallopt = _mallopt()
    if mallopt is None:
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(
        mallopt(_M_TRIM_THRESHOLD, trim_threshold)
    )


def _environment_chose() -> bool:
    """The thresholds were set at start-up, or malloc is not glibc's."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    preload = os.environ.get("LD_PRELOAD", "")
    return (
        any(name in os.environ for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"))
        or any(t in tunables for t in ("malloc.mmap_threshold", "malloc.trim_threshold"))
        or any(other in preload for other in ("jemalloc", "tcmalloc", "mimalloc"))
    )


def _mallopt() -> Any:
    """glibc's ``mallopt(int, int) -> int``, or None (musl, another libc)."""
    try:
        libc = ctypes.CDLL(None)  # the process's own symbols: its libc
        fn = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018 - glibc only: there mallopt means what this says
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return fn
