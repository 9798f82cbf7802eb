"""fengine.vector_math: MKL's vector math initialised serially, so two processes compute the same bits.

Without it, the first ``torch.sqrt`` split across two intra-op threads left one thread in
another accuracy mode in ~17 % of fresh processes run one after another (measured: 26 of
150; fewer when processes run side by side); 20 processes then all miss it with
probability ~2 %. Each process loads only torch and the module (by path).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch


MODULE = Path(__file__).resolve().parents[1] / "fengine" / "vector_math.py"

CHECK = """
import importlib.util, sys, torch
torch.set_num_threads(2)
if sys.argv[1] == "init":
    spec = importlib.util.spec_from_file_location("vector_math", sys.argv[2])
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
x = torch.rand(8192, generator=torch.Generator().manual_seed(0)) * 1e-6
parallel = torch.sqrt(x)         # 2 threads, 4096 elements each: the first VML call of the process
torch.set_num_threads(1)
serial = torch.sqrt(x)           # the same call on this thread alone
print(int((parallel != serial).sum()))
"""


def _differing_elements(mode: str, processes: int) -> list[int]:
    """Per fresh process, one after another (a busy machine hides the race): elements of the
    parallel sqrt that differ from the serial one."""
    cmd = [sys.executable, "-c", CHECK, mode, str(MODULE)]
    runs = (
        subprocess.run(cmd, capture_output=True, text=True, check=True) for _ in range(processes)
    )
    return [int(done.stdout.split()[-1]) for done in runs]


@pytest.mark.skipif(
    not torch.backends.mkl.is_available() or (torch.get_num_threads() < 2),
    reason="MKL's vector math (x86 CPU builds) on >= 2 intra-op threads",
)
def test_parallel_vector_math_is_the_same_in_every_process_after_initialise():
    differing = _differing_elements("init", 20)
    assert differing == [0] * 20, differing
