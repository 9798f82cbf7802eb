"""fengine's collectives in a world of one against torch's DDP and FSDP2, bit for bit
(tests/nccl_check.py in a fresh process): gloo on CPU here, NCCL on a GPU machine, where two
NCCL ranks cannot share the one device. Seen on an H200 (torch 2.11): every check OK."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


CHECK = Path(__file__).resolve().parent / "nccl_check.py"
LINES = [
    "OK   data_parallel sgd == DDP",
    "OK   data_parallel {half} accumulate(2) == DDP + GradScaler + no_sync",
    "OK   fsdp adamw + clip == FSDP2 + torch.optim",
    "OK   fsdp fit's gathered checkpoint == its params",
]


def run_check(*args: str) -> list[str]:
    out = subprocess.run([sys.executable, str(CHECK), *args], capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout.splitlines()


@pytest.mark.slow
def test_data_parallel_and_fsdp_on_gloo_equal_ddp_and_fsdp2():
    assert run_check("--device", "cpu", "--backend", "gloo") == [
        line.format(half="torch.bfloat16") for line in LINES
    ]


@pytest.mark.gpu
@pytest.mark.slow
def test_data_parallel_and_fsdp_on_nccl_equal_ddp_and_fsdp2():
    assert run_check("--device", "cuda", "--backend", "nccl") == [
        line.format(half="torch.float16") for line in LINES
    ]
