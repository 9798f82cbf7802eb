"""`fengine.allocator.steady_cpu_allocations`: a large buffer freed and allocated again every step
comes from malloc's heap and stays there (glibc), instead of a fresh mapping each time; a process
whose environment chose keeps its choice."""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys

import pytest

from fengine.allocator import steady_cpu_allocations


# a "step"'s 48 MB buffer: above glibc's largest dynamic mmap threshold (32 MB), so by default it
# is a fresh mmap (its pages faulted in again every time). glibc's own accounting says where it
# went: mallinfo2's hblkhd (bytes in mmapped chunks) while it lives, arena (heap bytes) after
_WORKER = """
import ctypes, json, sys, torch
from fengine.allocator import steady_cpu_allocations
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
applied = steady_cpu_allocations() if sys.argv[1] == "steady" else None
buffer = torch.empty(12 << 20, dtype=torch.float32).fill_(1.0)
mmapped = libc.mallinfo2().hblkhd
del buffer
heap = libc.mallinfo2().arena
print(json.dumps({"mmapped": mmapped, "heap_after_free": heap, "applied": applied}))
"""


def _run(mode: str, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    done = subprocess.run([sys.executable, "-c", _WORKER, mode], capture_output=True, text=True,
                          env={**clean, **env}, check=True)  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])


def _has_mallinfo2() -> bool:
    try:
        return hasattr(ctypes.CDLL(None), "mallinfo2")  # glibc >= 2.33
    except OSError:
        return False


@pytest.mark.skipif(not _has_mallinfo2(), reason="glibc >= 2.33's mallinfo2")
def test_a_buffer_allocated_every_step_stays_in_the_heap():
    default, steady = _run("default"), _run("steady")
    assert steady["applied"] is True
    size = 48 << 20
    assert default["mmapped"] >= size  # by default: its own mapping, unmapped on free
    assert steady["mmapped"] < size and steady["heap_after_free"] >= size  # heap, kept


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_a_choice_made_in_the_environment_is_kept():
    chosen = _run("steady", MALLOC_TRIM_THRESHOLD_="131072")
    assert chosen["applied"] is False
    assert _run("steady", GLIBC_TUNABLES="glibc.malloc.mmap_threshold=1048576")["applied"] is False


@pytest.mark.parametrize("bad", [-1, 2**31, 1.5, True, "64M"])
def test_thresholds_are_checked(bad):
    with pytest.raises(ValueError, match="mmap_threshold must be an int"):
        steady_cpu_allocations(mmap_threshold=bad)
