"""`fengine.allocator.steady_cpu_allocations`: large buffers freed and allocated again every step
stop faulting in fresh pages (glibc), and a process whose environment chose keeps its choice."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fengine.allocator import steady_cpu_allocations


# a "step" that allocates, touches and frees a 48 MB buffer: above glibc's largest dynamic mmap
# threshold (32 MB), so by default every allocation is a fresh mmap whose pages fault in
_WORKER = """
import json, resource, sys, torch
from fengine.allocator import steady_cpu_allocations
applied = steady_cpu_allocations() if sys.argv[1] == "steady" else None
for _ in range(3):
    torch.empty(12 << 20, dtype=torch.float32).fill_(1.0)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    torch.empty(12 << 20, dtype=torch.float32).fill_(1.0)
print(json.dumps({"faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, "applied": applied}))
"""


def _run(mode: str, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    done = subprocess.run([sys.executable, "-c", _WORKER, mode], capture_output=True, text=True,
                          env={**clean, **env}, check=True)  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_a_buffer_allocated_every_step_stops_faulting_in_fresh_pages():
    default, steady = _run("default"), _run("steady")
    assert steady["applied"] is True
    pages = 48 << 20 >> 12  # one buffer's 4 KiB pages
    assert default["faults"] > 9 * pages  # fresh pages all 10 times
    # the heap's pages, reused (the VM's memory reclaim may take a buffer's pages back now and then)
    assert steady["faults"] <= 3 * pages, steady


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_a_choice_made_in_the_environment_is_kept():
    chosen = _run("steady", MALLOC_TRIM_THRESHOLD_="131072")
    assert chosen["applied"] is False
    assert _run("steady", GLIBC_TUNABLES="glibc.malloc.mmap_threshold=1048576")["applied"] is False


@pytest.mark.parametrize("bad", [-1, 2**31, 1.5, True, "64M"])
def test_thresholds_are_checked(bad):
    with pytest.raises(ValueError, match="mmap_threshold must be an int"):
        steady_cpu_allocations(mmap_threshold=bad)
