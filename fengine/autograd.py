"""Gradients of a scalar loss without ``torch.autograd.grad``'s per-call Python.

``torch.autograd.grad`` normalises its arguments, checks every input for
``__torch_function__`` overrides and builds the loss's unit cotangent in Python on
each call: ~400 bytecodes, a fifth of an eager step's own Python on a small model.
A training step's call is always the same shape (one scalar, a fixed tuple of
plain tensors), so `scalar_grads` hands it to the same C++ engine call directly
(``torch.autograd.graph._engine_run_backward``, what ``grad`` ends in) and leaves
every other case (tensor subclasses such as DTensor, a non-scalar or grad-less
loss, a torch without that function) to ``torch.autograd.grad`` itself. The
gradients are the same tensors either way: the same engine runs the same graph.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.overrides import has_torch_function


__all__ = ["scalar_grads"]

_run_backward = getattr(torch.autograd.graph, "_engine_run_backward", None)


def scalar_grads(
    loss: torch.Tensor, inputs: Sequence[torch.Tensor]
) -> tuple[torch.Tensor | None, ...]:
    """``torch.autograd.grad(loss, inputs, allow_unused=True)`` for a 0-d floating-point ``loss``."""
    if (
        _run_backward is None
        or type(loss) is not torch.Tensor
        or not loss.requires_grad
        or loss.dim() != 0
        or not loss.is_floating_point()
        or has_torch_function(inputs)
    ):
        return torch.autograd.grad(loss, inputs, allow_unused=True)
    ones = torch.ones_like(loss, memory_format=torch.preserve_format)
    return _run_backward((loss,), (ones,), False, False, inputs, True, accumulate_grad=False)
