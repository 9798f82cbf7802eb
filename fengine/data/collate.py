"""Collate functions: turn a list of samples into one batch.

``default_collate`` stacks (PyTorch's behaviour, which fengine uses by default);
``pseudo_collate`` is MMEngine's default for config-built loaders and does not
stack: a list of samples becomes a dict/tuple of per-field sequences.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch.utils.data


__all__ = ["default_collate", "pseudo_collate"]


def default_collate(batch: Sequence[Any]) -> Any:
    """Stack tensors (and numbers/arrays) along a new batch dimension, recursing into containers.

    Delegates to ``torch.utils.data.default_collate``; MMEngine's ``default_collate``
    agrees with it on everything but MMEngine's own ``BaseDataElement``.
    """
    # torch annotates ``batch`` as a list, but any sequence of samples works
    return torch.utils.data.default_collate(batch)  # type: ignore[arg-type]


def pseudo_collate(batch: Sequence[Any]) -> Any:
    """MMEngine's ``pseudo_collate``: transpose a list of samples without stacking anything.

    Mappings become a mapping of lists, tuples become a list of per-position
    tuples (as MMEngine and PyTorch do), named tuples keep their type, and leaves
    (tensors, arrays, numbers, strings) are returned as the sequence of samples.
    Useful when samples differ in shape (detection boxes, variable-size images).
    """
    if len(batch) == 0:
        raise ValueError("pseudo_collate: `batch` is empty; expected at least one sample")
    elem = batch[0]
    if isinstance(elem, (str, bytes)):
        return batch
    if isinstance(elem, tuple) and hasattr(elem, "_fields"):  # named tuple
        return type(elem)(*(pseudo_collate(field) for field in zip(*batch)))
    if isinstance(elem, Mapping):  # as MMEngine: the mapping type is built from a dict
        mapping_type: Any = type(elem)
        return mapping_type({key: pseudo_collate([d[key] for d in batch]) for key in elem})
    if isinstance(elem, Sequence):
        size = len(elem)
        if any(len(sample) != size for sample in batch):
            raise RuntimeError(
                "pseudo_collate: every sample in the batch must have the same length"
            )
        fields = [pseudo_collate(field) for field in zip(*batch)]
        if isinstance(elem, tuple):
            return fields
        sequence_type: Any = type(elem)
        try:
            return sequence_type(fields)
        except TypeError:  # sequence types such as `range` cannot be built from a list
            return fields
    return batch
