"""Initialise MKL's vector math on one thread, so that a parallel first call cannot race.

On PyTorch's x86 CPU builds, ``torch.sqrt``, ``exp``, ``log`` and friends on large tensors run
MKL's vector-math library (VML) on the intra-op threads. VML initialises itself lazily, on
its first call, and when that first call runs on two threads at once one of them can end up
computing in another accuracy mode for the rest of the process. Measured here (torch 2.13,
2 threads): in 26 of 150 fresh processes the worker thread's half of the first parallel
``torch.sqrt`` of 8192 floats differed from the other processes' by up to ~1000 ulps; in a
training run this showed as one in ~30 processes of the same AdamW step ending with other
final weights (the first step's ``sqrt`` of ``exp_avg_sq``), i.e. a resume or a replay that
disagrees in its bits. One tiny call made first, on the importing thread, initialises VML
before any parallel call (0 of 330 processes differed afterwards).

Importing this module (``import fengine`` does, first) runs `initialise`; a program that runs parallel vector math
before importing fengine should import it first (or call ``torch.exp(torch.zeros(1))``).
"""

from __future__ import annotations

import torch


def initialise() -> None:
    """One serial VML call on this thread (a one-element ``torch.exp``): VML's lazy set-up
    happens here, before any call split across the intra-op threads."""
    torch.exp(torch.zeros(1))


initialise()
