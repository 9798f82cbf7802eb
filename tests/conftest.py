"""Shared pytest setup: the ``gpu`` and ``slow`` markers (registered in pyproject.toml).

* ``@pytest.mark.gpu``: needs CUDA; skipped automatically when it is unavailable.
* ``@pytest.mark.slow``: a long test; runs by default, deselect with ``-m "not slow"``.
"""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA (marked gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def device() -> torch.device:
    """The device tests should run on: CUDA when available, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
