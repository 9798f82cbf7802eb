"""Run a module with a state's tensors in place of its own (a cheap ``functional_call``).

``torch.func.functional_call`` re-walks the module and swaps every tensor through
generic accessors on each call (~5 us per tensor). The slots a module keeps its
tensors in do not change between steps, so `Binding` finds them once and then
swaps by plain dict assignment. Tied weights (one tensor in several modules) are
bound everywhere they appear.
"""

from __future__ import annotations

import operator
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from fengine.sharding import bind_values, is_sharded


__all__ = ["Binding", "bind"]


class Binding:
    """The (dict, key) slots of a module's parameters and buffers, by canonical name."""

    def __init__(self, model: nn.Module) -> None:
        canonical = {id(p): ("p", n) for n, p in model.named_parameters()}
        canonical.update({id(b): ("b", n) for n, b in model.named_buffers()})
        self.slots: list[tuple[dict, str, bool, str]] = []
        for module in model.modules():
            for store in (module._parameters, module._buffers):
                for key, tensor in store.items():
                    if tensor is not None and id(tensor) in canonical:
                        kind, name = canonical[id(tensor)]
                        self.slots.append((store, key, kind == "p", name))
        self.sharded = is_sharded(model)
        if (
            self.sharded
        ):  # FSDP sets its parameters into their slots itself: only buffers are swapped
            self.slots = [s for s in self.slots if not s[2]]
        # the params' slots first, then the buffers': the columns `_Bound` swaps in C
        self.slots.sort(key=lambda slot: not slot[2])
        self.stores = [store for store, _, _, _ in self.slots]
        self.keys = [key for _, key, _, _ in self.slots]
        self.pick_params = _picker([n for _, _, is_param, n in self.slots if is_param])
        self.pick_buffers = _picker([n for _, _, is_param, n in self.slots if not is_param])

    def __call__(
        self, params: Mapping[str, torch.Tensor], buffers: Mapping[str, torch.Tensor]
    ) -> _Bound:
        return _Bound(self, params, buffers)


def _picker(names: list[str]) -> Callable[[Mapping[str, Any]], tuple]:
    """``d -> tuple(d[n] for n in names)``, in C."""
    if not names:
        return lambda d: ()
    get = operator.itemgetter(*names)
    return (lambda d: (get(d),)) if len(names) == 1 else get


class _Bound:
    """The context a `Binding` returns: the state's tensors in the slots inside, the module's own after.

    A class rather than a ``contextlib`` generator: it is entered on every step. Each slot is
    swapped by ``map(operator.setitem, ...)``: a C loop, no Python per tensor."""

    __slots__ = ("binding", "params", "buffers", "saved")

    def __init__(
        self,
        binding: Binding,
        params: Mapping[str, torch.Tensor],
        buffers: Mapping[str, torch.Tensor],
    ) -> None:
        self.binding, self.params, self.buffers = binding, params, buffers

    def __enter__(self) -> None:
        b = self.binding
        if torch.compiler.is_compiling():  # dynamo traces plain loops, not itemgetter and map
            self.saved = [store[key] for store, key, _, _ in b.slots]
            for store, key, is_param, name in b.slots:
                store[key] = self.params[name] if is_param else self.buffers[name]
            return
        try:
            values = b.pick_params(self.params) + b.pick_buffers(self.buffers)
        except KeyError:  # nothing swapped yet
            params, buffers = self.params, self.buffers
            missing = next((p, n) for _, _, p, n in b.slots if n not in (params if p else buffers))
            kind = "params" if missing[0] else "buffers"
            raise KeyError(
                f"the state has no {kind}[{missing[1]!r}], which the model uses; was the state built from this model?"
            ) from None
        self.saved = list(map(operator.getitem, b.stores, b.keys))
        any(map(operator.setitem, b.stores, b.keys, values))  # setitem returns None: runs all

    def __exit__(self, *exc: object) -> None:
        b = self.binding
        if torch.compiler.is_compiling():
            for store, key, value in zip(b.stores, b.keys, self.saved):
                store[key] = value
            return
        any(map(operator.setitem, b.stores, b.keys, self.saved))


_cache: weakref.WeakKeyDictionary[nn.Module, Binding] = weakref.WeakKeyDictionary()


def bind(model: nn.Module, params: Mapping[str, torch.Tensor], buffers: Mapping[str, torch.Tensor]):
    """Context manager: inside it, ``model`` computes with ``params`` and ``buffers``."""
    binding = _cache.get(model)
    if binding is None:
        binding = _cache[model] = Binding(model)
    if binding.sharded:
        return bind_values(model, params, buffers, binding)
    return binding(params, buffers)


def forget(model: nn.Module) -> None:
    """Drop ``model``'s cached binding (`fengine.sharding.shard` replaced its parameters)."""
    _cache.pop(model, None)
