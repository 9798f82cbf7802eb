"""`TrainState`: everything a run needs to continue, as one immutable value.

A state is a frozen dataclass registered as a pytree. Steps built with donation
(the default) update its tensors in place and hand them to the state they return;
the input state is then *consumed*, and touching any of its fields raises
`DonatedStateError`, the way JAX refuses a donated buffer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn

from fengine.sharding import is_sharded, shared_tensors


__all__ = ["DonatedStateError", "TrainState", "clone_tree"]


class DonatedStateError(RuntimeError):
    """Raised when a state that was donated to a step is used again."""


STATE_FIELDS = (
    "step",
    "params",
    "buffers",
    "opt_state",
    "extra",
    "seed",
    "epoch",
    "batch_in_epoch",
)
"""A TrainState's pytree children, in order (the model rides along as context)."""
_ALL = (*STATE_FIELDS, "model")
_ALL_SET = frozenset(_ALL)
# torch before 2.13 (2.11 seen): dynamo cannot trace `replace`'s dict copy; 2.13 needs no check
_OLD_DYNAMO = torch.__version__ < torch.torch_version.TorchVersion("2.13")
_GUARDED = _ALL_SET | {"replace", "clone", "eval_weights", "load_into"}


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class TrainState:
    """The whole training state.

    Attributes:
      step: optimizer updates applied so far (a fp16 step skipped for inf/nan
        gradients counts too, as schedulers do in torch and MMEngine).
      params: parameter name -> tensor, in ``module.named_parameters()`` order.
        Trainable ones have ``requires_grad=True``; they are leaves, never
        ``nn.Parameter``, except for a model sharded by FSDP, whose params are the
        module's own sharded parameters (`fengine.sharding`).
      buffers: buffer name -> tensor (BatchNorm statistics and the like).
      opt_state: the state of the gradient transformation (moments, counts); a
        dict by part name for a `fengine.multi_step`.
      extra: the states of the step's wrappers, by their names (`fengine.Wrapper.name`).
      seed: the run's seed; every random draw is derived from it (see `fengine.rng`).
      epoch: completed epochs.
      batch_in_epoch: batches consumed in the current epoch.
    """

    step: int = 0
    params: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor]
    opt_state: Any = ()
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    seed: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    model: nn.Module | None = dataclasses.field(default=None, repr=False, compare=False)
    """The module the params belong to: static structure, not state (never checkpointed)."""

    @classmethod
    def create(
        cls,
        model: nn.Module,
        *unexpected: Any,
        seed: int = 0,
        device: str | torch.device | None = None,
        copy: bool = True,
    ) -> TrainState:
        """Take params and buffers from ``model`` (copied, to ``device`` if given); no optimizer or wrapper state.

        ``copy=False``: the state holds the module's own tensors where they already are on
        ``device`` (no second copy of the weights in memory); training updates them in place,
        so the module holds the live weights as it trains, as in a hand-written loop.
        A model sharded by FSDP (`fengine.distributed.shard`) is never copied: the state holds
        the module's own sharded parameters and buffers, which FSDP all-gathers from.

        The low-level constructor behind `fengine.Step.init`, which is how a
        state for training is built (``state = step.init(model, seed=0)``).
        Parameters with ``requires_grad=False`` are kept (the forward needs them)
        but are not trainable.
        """
        if unexpected:
            raise TypeError(
                "TrainState.create(model, seed=...) takes no gradient transformation: the step builds "
                "the state it trains, with the tx given once: state = step.init(model, seed=...)"
            )
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"TrainState.create: model must be an nn.Module, got {type(model).__name__}"
            )
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
            raise ValueError(
                f"TrainState.create: seed must be a non-negative int below 2**63 (the compiled "
                f"step carries it in an int64 tensor), got {seed!r}"
            )
        if not isinstance(copy, bool):
            raise TypeError(f"TrainState.create: copy must be a bool, got {copy!r}")
        if is_sharded(model):  # FSDP all-gathers from the module's own params: share, never copy
            params, buffers = shared_tensors(model, device)
            return cls(params=params, buffers=buffers, seed=seed, model=model)
        to = None if device is None else torch.device(device)
        params = {
            name: p.detach().to(to or p.device, copy=copy).requires_grad_(p.requires_grad)
            for name, p in model.named_parameters()
        }
        buffers = {
            name: b.detach().to(to or b.device, copy=copy) for name, b in model.named_buffers()
        }
        return cls(step=0, params=params, buffers=buffers, seed=seed, model=model)

    def eval_weights(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The weights to evaluate, checkpoint as "the model" and publish: ``(params, buffers)``.

        The live ones, with whatever a wrapper's state substitutes (the EMA weights of
        `fengine.ema`): a state in ``extra`` takes part by defining
        ``eval_weights(params, buffers) -> (params, buffers)``.
        """
        params, buffers = self.params, self.buffers
        for sub in self.extra.values():
            swap = getattr(sub, "eval_weights", None)
            if callable(swap):
                params, buffers = swap(params, buffers)
        return params, buffers

    def load_into(self, model: nn.Module | None = None, *, weights: str = "eval") -> nn.Module:
        """Copy the trained weights into ``model`` (default: the module this state was built
        from) and return it, for inference or ``torch.save(model.state_dict())``: `fit` trains
        the state's own tensors, so the module keeps its initial weights until this is called.
        ``weights``: ``"eval"`` (those evaluation uses: the EMA ones when the step keeps an EMA)
        or ``"live"``."""
        if weights not in ("eval", "live"):
            raise ValueError(
                f"TrainState.load_into: weights must be 'eval' or 'live', got {weights!r}"
            )
        target = model if model is not None else self.model
        if target is None:
            raise ValueError("TrainState.load_into: this state has no module; pass model=")
        params, buffers = self.eval_weights() if weights == "eval" else (self.params, self.buffers)
        mine = {**dict(target.named_parameters()), **dict(target.named_buffers())}
        theirs = {**params, **buffers}
        if set(mine) != set(theirs):
            raise ValueError(
                "TrainState.load_into: the module's parameters and buffers are not the state's: "
                f"missing from the module {sorted(set(theirs) - set(mine))[:5]}, not in the state "
                f"{sorted(set(mine) - set(theirs))[:5]}"
            )
        wrong = [(n, tuple(mine[n].shape), tuple(t.shape)) for n, t in theirs.items()
                 if mine[n].shape != t.shape]  # fmt: skip
        if wrong:
            raise ValueError(
                f"TrainState.load_into: shapes differ (name, module, state): {wrong[:5]}"
            )
        with torch.no_grad():
            for name, t in theirs.items():
                mine[name].copy_(t)
        return target

    def replace(self, **changes: Any) -> TrainState:
        """A new state with ``changes``, sharing this one's tensors (`clone` copies them).

        The two are aliases: a step that consumes either (donation) consumes both, and a later
        step, save or evaluation of the other raises `DonatedStateError`, since its tensors
        were updated in place. Copies the field dict instead of running the frozen dataclass
        ``__init__``: it is called a few times per training step, and this is ~5x cheaper
        (eagerly; a compiled step traces the constructor, once).
        """
        if not changes.keys() <= _ALL_SET:
            unknown = sorted(set(changes) - _ALL_SET)
            raise TypeError(
                f"TrainState.replace: unknown fields {unknown}; fields are {list(STATE_FIELDS)}"
            )
        if _OLD_DYNAMO and torch.compiler.is_compiling():  # it cannot trace __dict__.update
            return TrainState(**{f: changes[f] if f in changes else getattr(self, f) for f in _ALL})
        mine = self.__dict__
        if "_aliases" not in mine:  # one cell for this state and every state made from it
            mine["_aliases"] = [None]
        new = object.__new__(TrainState)
        fields = new.__dict__
        fields.update(mine)
        fields.update(changes)
        return new

    # -- donation -------------------------------------------------------
    @property
    def is_donated(self) -> bool:
        return False

    def _mark_donated(self, to: str, keep: TrainState | None = None) -> None:
        """Consume this state: from now on reading any field raises `DonatedStateError`.

        Implemented by switching the instance's class, so live states pay nothing
        for the check on attribute access. Its aliases (`replace`) are marked in their
        shared cell, and `check_live` consumes them where they are next used; ``keep``
        (the state the step returned, made from this one) starts a cell of its own.
        """
        aliases = self.__dict__.get("_aliases")
        if aliases is not None:
            aliases[0] = to
        if keep is not None:
            keep.__dict__.pop("_aliases", None)
        object.__setattr__(self, "_donated_to", to)
        object.__setattr__(self, "__class__", _DonatedTrainState)

    def check_live(self) -> None:
        """Raise `DonatedStateError` if this state, or a state it shares tensors with (made by or
        from it through `replace`), was consumed: a step, save or evaluation of it would see
        tensors another step updated in place."""
        aliases = self.__dict__.get("_aliases")
        if aliases is not None and aliases[0] is not None and not self.is_donated:
            self._mark_donated(aliases[0])
        if self.is_donated:
            self.step  # noqa: B018 - raises, naming the step that consumed it

    def clone(self) -> TrainState:
        """A deep copy: every tensor cloned, so the copy shares no storage."""
        return TrainState(
            **{f: clone_tree(getattr(self, f)) for f in STATE_FIELDS}, model=self.model
        )

    def __repr__(self) -> str:
        n = sum(t.numel() for t in self.params.values())
        return (
            f"TrainState(step={self.step}, epoch={self.epoch}, batch_in_epoch={self.batch_in_epoch}, "
            f"seed={self.seed}, params={len(self.params)} tensors/{n} values, "
            f"buffers={len(self.buffers)}, extra={sorted(self.extra)})"
        )


class _DonatedTrainState(TrainState):
    """A `TrainState` that was donated to a step: every field access raises."""

    def __getattribute__(self, name: str) -> Any:
        if name in _GUARDED:
            step = object.__getattribute__(self, "__dict__")["step"]
            to = object.__getattribute__(self, "__dict__")["_donated_to"]
            raise DonatedStateError(
                f"state at step {step} was donated to {to}; its tensors were updated in place. "
                "Use the state that step returned, or build the step with donate=False to keep this one."
            )
        return object.__getattribute__(self, name)

    @property
    def is_donated(self) -> bool:
        return True

    def __repr__(self) -> str:
        return f"TrainState(<donated to {self.__dict__['_donated_to']}>)"


def trainable(params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The params that receive gradients (``requires_grad=True``)."""
    return {k: v for k, v in params.items() if v.requires_grad}


def clone_tree(tree: Any) -> Any:
    """Clone every tensor of a pytree, keeping ``requires_grad`` on leaves."""
    return pytree.tree_map(
        lambda x: (
            x.detach().clone().requires_grad_(x.requires_grad) if isinstance(x, torch.Tensor) else x
        ),
        tree,
    )


def _flatten(state: TrainState):
    return [getattr(state, f) for f in STATE_FIELDS], state.model


def _unflatten(children, model) -> TrainState:
    return TrainState(**dict(zip(STATE_FIELDS, children)), model=model)


def _flatten_with_keys(state: TrainState):
    children, ctx = _flatten(state)
    return [(pytree.GetAttrKey(f), c) for f, c in zip(STATE_FIELDS, children)], ctx


def _refuse(state: _DonatedTrainState):
    return state.params, None  # raises DonatedStateError


pytree.register_pytree_node(
    _DonatedTrainState, _refuse, _unflatten, serialized_type_name="fengine.DonatedTrainState"
)
pytree.register_pytree_node(
    TrainState,
    _flatten,
    _unflatten,
    serialized_type_name="fengine.TrainState",
    flatten_with_keys_fn=_flatten_with_keys,
)
