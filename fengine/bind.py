"""Run a module with a state's tensors in place of its own (a cheap ``functional_call``).

``torch.func.functional_call`` re-walks the module and swaps every tensor through
generic accessors on each call (~5 us per tensor). The slots a module keeps its
tensors in do not change between steps, so `Binding` finds them once and then
swaps by plain dict assignment. Tied weights (one tensor in several modules) are
bound everywhere they appear.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping

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

    def __call__(
        self, params: Mapping[str, torch.Tensor], buffers: Mapping[str, torch.Tensor]
    ) -> _Bound:
        return _Bound(self.slots, params, buffers)


class _Bound:
    """The context a `Binding` returns: the state's tensors in the slots inside, the module's own after.

    A class rather than a ``contextlib`` generator: it is entered on every step."""

    __slots__ = ("slots", "params", "buffers", "saved")

    def __init__(
        self,
        slots: list[tuple[dict, str, bool, str]],
        params: Mapping[str, torch.Tensor],
        buffers: Mapping[str, torch.Tensor],
    ) -> None:
        self.slots, self.params, self.buffers = slots, params, buffers

    def __enter__(self) -> None:
        params, buffers = self.params, self.buffers
        self.saved = [store[key] for store, key, _, _ in self.slots]
        try:
            for store, key, is_param, name in self.slots:
                store[key] = params[name] if is_param else buffers[name]
        except KeyError:
            self.__exit__()
            missing = next(
                (p, n) for _, _, p, n in self.slots if n not in (params if p else buffers)
            )
            kind = "params" if missing[0] else "buffers"
            raise KeyError(
                f"the state has no {kind}[{missing[1]!r}], which the model uses; was the state built from this model?"
            ) from None

    def __exit__(self, *exc: object) -> None:
        for (store, key, _, _), original in zip(self.slots, self.saved):
            store[key] = original


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
