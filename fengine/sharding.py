"""Sharded training: FSDP2 (``torch.distributed.fsdp.fully_shard``) under the functional step.

A model that does not fit one device is sharded with FSDP2 and keeps fengine's step,
wrappers, loop and checkpoints::

    info = fe.distributed.setup()                        # under torchrun
    model = fe.distributed.shard(build_model(), units=[TransformerBlock])
    step = fe.train_step(loss_fn, optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(3e-4)),
                         fe.amp("bfloat16"), fe.accumulate(4), fe.ema(0.999), fe.fsdp())
    state = step.init(model, seed=0)                     # shares the sharded params: no copies
    state = fe.fit(state, step, fe.data.Loader(ds, 8, seed=0, rank=info.rank,
                   world_size=info.world_size), max_epochs=3, work_dir="w")

Design
------
*The module owns the parameters.* `shard` applies ``fully_shard`` to the chosen units and
then to the root (one mesh over the default process group). FSDP2 replaces each
parameter by a DTensor that holds this rank's shard (``Shard(0)``), all-gathers from
exactly those objects in its pre-forward hooks and reduce-scatters gradients into their
``.grad`` in its post-backward hooks. A copy of a sharded parameter would never be seen
by FSDP, so a sharded state does not copy: `TrainState.create` (so ``step.init``) takes a
sharded module's parameters and buffers themselves (``state.params[n] is`` the module's
parameter), and everything that changes them works in place: the optimizers' foreach
kernels, EMA's lerp, `fengine.distributed.sync_buffers`, and `fengine.checkpoint.load`,
which writes a checkpoint's values into them (as torch's ``set_model_state_dict`` does).
There is one set of weights per process; a state of a sharded model cannot be cloned
into an independent one (``donate=False`` is refused at the first step).

*Gradients by backward.* ``torch.autograd.grad`` with respect to sharded parameters
sees none of FSDP's hooks, so the step's base gradient computation refuses a sharded
model. `fengine.fsdp` is a forward-stage wrapper written innermost (after ``amp``,
``accumulate`` and forward wrappers) that replaces it: it runs ``part.loss_fn`` on the
module under the same derived RNG key (``fold_in(seed, step, micro)``), calls
``(loss * weight).backward()`` (FSDP reduce-scatters: each rank gets its shard of the
mean gradient over all ranks), and hands the parameters' ``.grad`` (DTensors) on as
`fengine.Grads`, clearing them. With ``accumulate(k)`` the micro-batch gradients are
reduce-scattered one by one and summed shard-wise (memory: sharded gradients only; k
reduce-scatters per update); ``fsdp(defer_reduce=True)`` instead turns FSDP's gradient
sync off for all but the last micro-batch of the group (`accumulate` publishes the
position, `fengine.wrappers.accumulate.micro_batch_position`), so one reduce-scatter
per update, at the cost of full-size unsharded gradients held through the group.

*The rest is DTensor arithmetic.* Gradients, optimizer moments and EMA weights are
DTensors sharded like the parameters, so the optimizers' ``torch._foreach_*`` kernels,
clipping and EMA run unchanged on the local shards, bit for bit as ``torch.optim``
does on an FSDP2 model. The global norm of `fengine.optim.clip_by_global_norm` is the
norm of the full gradient (DTensor reduces the shards' norms across ranks, as in
``clip_grad_norm_``) and is returned as a plain tensor. fp16 loss scaling agrees across
ranks: DTensor's ``_amp_foreach_non_finite_check_and_unscale_`` all-reduces (max) the
found-inf flag over the mesh (torch's ShardedGradScaler does the same), so every rank
skips together.

*Checkpoints are gathered.* `gather_state` all-gathers every sharded leaf of a state
(a collective: every rank calls it; `fengine.fit` does, before rank 0 writes), so a
checkpoint holds full tensors under the same names as a run without sharding: the same
file format, world-size independent. `fengine.checkpoint.load` reads the full tensors on
every rank and keeps each rank's shard (no communication): a checkpoint of a 2-process
sharded run resumes in 2 processes, in N, or in 1 process without sharding.

*Evaluation.* `fengine.bind.bind` on a sharded module leaves FSDP's parameters in their
slots (FSDP sets them itself) and, for weights that are not the live ones (EMA),
copies them into the parameters for the pass and back after.

Refused, with a message: ``fsdp()`` together with ``data_parallel()`` (FSDP already
reduces gradients); ``fsdp()`` written before a forward-stage wrapper; a sharded model
in a step without ``fsdp()``, or ``fsdp()`` with a model that is not sharded; a state
whose params are not the sharded module's (a clone, ``donate=False``); saving a state
with sharded leaves without gathering them.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.utils._pytree as pytree
from torch import nn


if TYPE_CHECKING:
    from fengine.state import TrainState

__all__ = ["gather_state", "is_dtensor", "is_sharded", "reshard", "shard"]


# torch.distributed.tensor takes ~0.7 s to import: fengine imports it only when sharding is
# used. Until something imported it, no DTensor (and no FSDP module) can exist.
def _dtensor_type() -> type | None:
    mod = sys.modules.get("torch.distributed.tensor")
    return getattr(mod, "DTensor", None) if mod is not None else None


def _fsdp_type() -> type | None:
    mod = sys.modules.get("torch.distributed.fsdp")
    return getattr(mod, "FSDPModule", None) if mod is not None else None


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a DTensor (a tensor sharded or replicated across processes)."""
    cls = _dtensor_type()
    return cls is not None and isinstance(t, cls)


def is_sharded(model: nn.Module | None) -> bool:
    """Whether ``model`` (or a submodule) was sharded by FSDP2 (``fully_shard``)."""
    cls = _fsdp_type()
    return (
        cls is not None and model is not None and any(isinstance(m, cls) for m in model.modules())
    )


def foreach_copy_(
    dst: list[torch.Tensor], src: list[torch.Tensor] | tuple[torch.Tensor, ...]
) -> None:
    """``torch._foreach_copy_``, also for DTensors sharded alike (DTensor has no sharding rule
    for it): the local shards are copied."""
    if dst and is_dtensor(dst[0]):
        torch._foreach_copy_([d.to_local() for d in dst], [s.to_local() for s in src])  # type: ignore[attr-defined]
    else:
        torch._foreach_copy_(dst, src)


Units = Iterable[str] | type | tuple[type, ...] | Callable[[str, nn.Module], bool] | None


def shard(
    model: nn.Module,
    units: Units = None,
    *,
    mesh: Any = None,
    reshard_after_forward: bool | None = None,
    mp_policy: Any = None,
) -> nn.Module:
    """Shard ``model`` with FSDP2: ``fully_shard`` each unit, then the root; returns ``model``.

    ``units`` chooses the submodules that become their own FSDP units (each is all-gathered
    just before its forward and freed after): submodule names (``["layers.0", "layers.1"]``),
    a module class or tuple of classes (``TransformerBlock``), or a predicate
    ``(name, module) -> bool``; None: the root only (one all-gather of the whole model).
    Units are sharded innermost first, as FSDP2 requires. ``mesh`` defaults to a 1-D mesh
    over the default process group (`fengine.distributed.setup` first) on its device type
    (cuda for nccl, else cpu). ``reshard_after_forward`` and ``mp_policy`` are passed to
    ``fully_shard`` (FSDP2's ``MixedPrecisionPolicy``; `fengine.amp`'s autocast composes
    with fp32 sharded params without one). Train it with a step that has `fengine.fsdp`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"shard: model must be an nn.Module, got {type(model).__name__}")
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "shard: no process group; FSDP shards across the ranks of one. Launch with torchrun "
            "and call fengine.distributed.setup() before sharding"
        )
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if is_sharded(model):
        raise ValueError("shard: the model is sharded already (a submodule is an FSDP module)")
    chosen = _units(model, units)
    if mesh is None:
        device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
        mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    kw: dict[str, Any] = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    if mp_policy is not None:
        kw["mp_policy"] = mp_policy
    for _, module in reversed(chosen):  # pre-order reversed: every unit after the units inside it
        fully_shard(module, **kw)
    fully_shard(model, **kw)
    from fengine.bind import forget

    forget(model)  # a binding found before sharding names slots FSDP has since replaced
    return model


def _units(model: nn.Module, units: Units) -> list[tuple[str, nn.Module]]:
    named = [(n, m) for n, m in model.named_modules() if n]  # not the root: it is sharded last
    if units is None:
        return []
    if isinstance(units, type) or (
        isinstance(units, tuple) and units and all(isinstance(u, type) for u in units)
    ):
        classes: Any = units
        return [(n, m) for n, m in named if isinstance(m, classes)]
    if isinstance(units, str):
        raise TypeError(
            f"shard: units must be a list of submodule names, a module class or a predicate; "
            f"got the string {units!r} (write [{units!r}])"
        )
    if callable(units):
        pick = units
        return [(n, m) for n, m in named if pick(n, m)]
    wanted = list(units)
    by_name = dict(named)
    unknown = [u for u in wanted if u not in by_name]
    if unknown:
        raise ValueError(
            f"shard: the model has no submodule(s) {unknown}; its submodules are "
            f"{[n for n, _ in named][:20]}{' ...' if len(named) > 20 else ''}"
        )
    keep = set(wanted)
    return [(n, m) for n, m in named if n in keep]


def _fsdp_modules(model: nn.Module) -> list[Any]:
    cls = _fsdp_type()
    return [m for m in model.modules() if cls is not None and isinstance(m, cls)]


def reshard(model: nn.Module) -> None:
    """Put every FSDP unit of ``model`` back in its sharded state (frees all-gathered params: the
    root keeps its own after a forward without backward, e.g. an evaluation)."""
    for m in _fsdp_modules(model):
        m.reshard()


def module_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A sharded module's own parameters (the sharded DTensors FSDP all-gathers from) and buffers."""
    reshard(model)
    return dict(model.named_parameters()), dict(model.named_buffers())


def shared_tensors(
    model: nn.Module, device: str | torch.device | None
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """What `TrainState.create` takes from a sharded model: its own params and buffers, not copies."""
    params, buffers = module_tensors(model)
    have = {p.device for p in params.values()}
    if device is not None and have != {torch.device(device)}:
        raise ValueError(
            f"TrainState.create: the model is sharded (FSDP) on {sorted(map(str, have))}; its params "
            f"stay where fully_shard put them, so device={str(device)!r} cannot move them (omit device=)"
        )
    return params, buffers


def check_root(model: nn.Module | None, where: str) -> Any:
    """``model`` as an FSDP root, or a ValueError saying how to shard it."""
    cls = _fsdp_type()
    if model is None or cls is None or not isinstance(model, cls):
        what = "no model" if model is None else f"a {type(model).__name__} that is not sharded"
        if model is not None and is_sharded(model):
            what = "a model whose submodules are sharded but whose root is not"
        raise ValueError(
            f"{where}: the state has {what}; fsdp() trains a model sharded with "
            "fengine.distributed.shard(model, units=...) (fully_shard on the units and the root)"
        )
    return model


def check_owned(state: TrainState, where: str) -> None:
    """Refuse a state whose params or buffers are not its sharded module's own tensors."""
    model = check_root(state.model, where)
    params, buffers = module_tensors(model)
    fix = (
        "A sharded model's params live in the module (FSDP all-gathers from them): build the state "
        "with step.init(model) and keep using the states the step returns (donate=False, "
        "state.clone() and TrainState(...) copies are not supported with fsdp())."
    )
    for kind, mine, theirs in (
        ("params", params, state.params),
        ("buffers", buffers, state.buffers),
    ):
        if list(mine) != list(theirs):
            raise ValueError(
                f"{where}: state.{kind} names {sorted(set(theirs) ^ set(mine))[:5]} differ from the "
                f"sharded model's. {fix}"
            )
        copied = [n for n in mine if theirs[n] is not mine[n]]
        if copied:
            raise ValueError(
                f"{where}: state.{kind}[{copied[0]!r}] (and {len(copied) - 1} more) is not the sharded "
                f"model's own tensor. {fix}"
            )


def refuse_autograd(model: nn.Module | None) -> None:
    """The base gradient computation cannot train a sharded model: say what to add."""
    if is_sharded(model):
        raise ValueError(
            "the model is sharded (FSDP2 fully_shard): its gradients come from FSDP's backward hooks, "
            "which torch.autograd.grad does not run; add fengine.fsdp() to the step, written last "
            "(after amp, accumulate and forward wrappers)"
        )


# ======================================================================= checkpoints
def gather_state(state: TrainState, *, to: int | None = 0) -> TrainState:
    """``state`` with every sharded (DTensor) leaf gathered into a full CPU tensor.

    A collective: every rank must call it, in the same order (`fengine.fit` does before
    rank 0 writes a checkpoint). ``to``: the rank that keeps the result (others get
    ``state`` back unchanged, having only taken part); None: every rank keeps it. Tensors
    that are one object in ``state`` stay one object (EMA weights that alias live ones).
    A state without sharded leaves is returned as is, with no communication.
    """
    leaves, spec = pytree.tree_flatten(state)
    if not any(is_dtensor(x) for x in leaves):
        return state
    keep = to is None or dist.get_rank() == to
    memo: dict[int, torch.Tensor | None] = {}
    out = []
    for x in leaves:
        if is_dtensor(x):
            if (
                id(x) not in memo
            ):  # an all-gather per sharded tensor, in flatten order on every rank
                full = x.detach().full_tensor()
                memo[id(x)] = full.cpu() if keep else None
            out.append(memo[id(x)])
        else:
            out.append(x)
    return pytree.tree_unflatten(out, spec) if keep else state


def owned_ids(model: nn.Module | None) -> set[int]:
    """Ids of a sharded module's own tensors (empty for a model that is not sharded)."""
    if not is_sharded(model):
        return set()
    assert model is not None
    params, buffers = module_tensors(model)
    return {id(t) for t in (*params.values(), *buffers.values())}


def _local_part(full: torch.Tensor, like: Any) -> Any:
    """``full`` laid out as the DTensor ``like`` (this rank keeps its shard; no communication)."""
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(
        full.detach().to(like.device), like.device_mesh, like.placements, src_data_rank=None
    )


def load_leaf(full: torch.Tensor, like: torch.Tensor, owned: set[int]) -> torch.Tensor | None:
    """A checkpoint's full tensor placed as the template leaf ``like``: written into ``like`` when
    the sharded module owns it (its params and buffers), re-sharded like it when it is a DTensor;
    None when neither applies (the caller places it as usual)."""
    if id(like) in owned:
        with torch.no_grad():
            if is_dtensor(like):
                like.to_local().copy_(_local_part(full, like).to_local())  # type: ignore[attr-defined]
            else:
                like.copy_(full)
        return like
    if is_dtensor(like):
        return _local_part(full, like).requires_grad_(like.requires_grad)
    return None


# ======================================================================= evaluation
@contextlib.contextmanager
def bind_values(
    model: nn.Module,
    params: Mapping[str, torch.Tensor],
    buffers: Mapping[str, torch.Tensor],
    buffer_slots: Callable[..., Any],
) -> Iterator[None]:
    """`fengine.bind.bind` for a sharded module: FSDP keeps its parameters in their slots, so
    weights other than the live ones (EMA) are copied into them for the scope and back after
    (local shards: no communication); buffers are bound as usual by ``buffer_slots``. For
    evaluation (under ``torch.no_grad``)."""
    live, _ = module_tensors(model)
    missing = [n for n in live if n not in params]
    if missing:
        raise KeyError(
            f"the state has no params[{missing[0]!r}], which the model uses; was the state built from this model?"
        )
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for n, p in live.items():
                src = params[n]
                if src is not p:
                    saved.append((p, p.detach().clone()))
                    p.detach().copy_(src if is_dtensor(src) else _local_part(src, p))
        with buffer_slots(params, buffers):
            yield
    finally:
        with torch.no_grad():
            for p, value in saved:
                p.detach().copy_(value)
        reshard(model)
