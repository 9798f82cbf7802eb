"""`fsdp`: the gradient computation of a model sharded by FSDP2 (see `fengine.sharding`).

A forward-stage wrapper that replaces the step's base gradient computation, so it is
written innermost: after `amp`, `accumulate` and forward wrappers (writing it last is
simplest). Per (micro-)batch it runs ``loss_fn(model, batch)`` on the sharded module under
the derived RNG key, ``(loss * weight).backward()`` (FSDP all-gathers each unit before
its forward and reduce-scatters its gradients after its backward), then hands on the
params' ``.grad`` (this rank's shards of the mean gradient over all ranks) and clears
them. Everything after it (amp's unscale and skip, ``tx``, EMA) sees sharded gradients
and params and works on the local shards.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from fengine.checks import check_bool
from fengine.distributed import rank
from fengine.rng import seeded_default_generators
from fengine.sharding import check_owned, check_root
from fengine.state import TrainState
from fengine.step import GradFn, Grads, Part, is_base_grad_fn, rng_key, run_loss
from fengine.wrappers.accumulate import _Accumulate, micro_batch_position
from fengine.wrappers.base import Wrapper, once
from fengine.wrappers.data_parallel import _DataParallel


__all__ = ["fsdp"]


class _Fsdp(Wrapper):
    def __init__(self, defer_reduce: bool, diff_rank_seed: bool) -> None:
        self.defer_reduce, self.diff_rank_seed = defer_reduce, diff_rank_seed

    def validate(self, before: Sequence[Wrapper]) -> None:
        once(_Fsdp, "fsdp", before)
        if any(isinstance(w, _DataParallel) for w in before):
            raise ValueError(fsdp_with_data_parallel)
        if any(isinstance(w, _Accumulate) and w.weight is not None for w in before):
            raise ValueError(
                "fsdp() with accumulate(weight=...): FSDP averages the ranks' gradients equally, "
                "so micro-batch weights would not count across ranks (data_parallel() weighs them); "
                "give each rank equal batches and drop weight="
            )

    def forward(self, grad_fn: GradFn, part: Part) -> GradFn:
        if not is_base_grad_fn(grad_fn):
            raise ValueError(
                "fsdp() is written before a forward/backward wrapper (amp, accumulate, forward_wrapper, "
                "data_parallel(diff_rank_seed=True)); it computes the gradients itself, so it must be the "
                "innermost one: write fsdp() after them (last)"
            )
        multi, defer, diff = part.name is not None, self.defer_reduce, self.diff_rank_seed
        cache: dict[str, Any] = {}

        def sharded(state: TrainState, batch: Any, *, weight: Any = None, micro: int = 0) -> Grads:
            params = state.params
            if cache.get("params") is not params or cache.get("buffers") is not state.buffers:
                check_owned(state, "fsdp")
                cuda = {p.device for p in params.values() if p.device.type == "cuda"}
                cache.update(params=params, buffers=state.buffers, names=part.owned(params),
                             trainable=[p for p in params.values() if p.requires_grad],
                             devices=tuple(cuda))  # fmt: skip
            model = check_root(state.model, "fsdp")
            if not model.training:
                model.train()
            if diff:  # MMEngine's diff_rank_seed, as data_parallel(diff_rank_seed=True)
                micro = micro + ((rank() + 1) << 32)
            key = rng_key(state, part, micro, multi)
            if defer:  # reduce-scatter once per update: after the last micro-batch's backward
                pos = micro_batch_position()
                model.set_requires_gradient_sync(pos is None or pos[0] == pos[1] - 1)
            with seeded_default_generators(key, cache["devices"]):
                loss, metrics = run_loss(part, model, batch, params)
                (loss if weight is None else loss * weight).backward()
            # amp's autocast may span several micro-batches: its cache of cast weights must not
            # outlive this backward (FSDP re-gathers the weights; a cached cast taken from the
            # last micro-batch's all-gather gives wrong gradients: measured, not rounding)
            torch.clear_autocast_cache()
            grads = {}
            for n in cache["names"]:
                g = params[n].grad
                if g is not None:
                    grads[n] = g
            for p in cache["trainable"]:  # every part's: a backward reaches all of them
                p.grad = None
            return Grads(loss.detach(), grads, metrics)

        return sharded

    def __repr__(self) -> str:
        return f"fsdp(defer_reduce={self.defer_reduce}, diff_rank_seed={self.diff_rank_seed})"


fsdp_with_data_parallel = (
    "fsdp() and data_parallel() in one step: FSDP already reduce-scatters the gradients across ranks "
    "in its backward hooks, and data_parallel() would average them again; use fsdp() alone for a "
    "sharded model (data_parallel() is for a replicated one)"
)


def fsdp(*, defer_reduce: bool = False, diff_rank_seed: bool = False) -> Wrapper:
    """Train a model sharded with FSDP2 (`fengine.distributed.shard`); write it last.

    Replaces the step's ``torch.autograd.grad`` with ``backward()`` through FSDP's hooks:
    each rank's forward runs on its own batch, gradients are reduce-scattered (the mean
    over ranks; each rank keeps its shard) and handed to ``tx`` as DTensors. The state
    must be built by ``step.init(model)`` on the sharded model (it shares, not copies, the
    sharded params). With `fengine.accumulate`, each micro-batch's gradients are
    reduce-scattered and summed shard-wise (sharded gradient memory, k reduce-scatters);
    ``defer_reduce=True`` syncs only after the last micro-batch of a group (FSDP's
    ``set_requires_gradient_sync``: one reduce-scatter, but full-size gradients held
    meanwhile). ``diff_rank_seed``: each rank draws its own dropout (default: shared keys,
    as `data_parallel`). In a `fengine.multi_step`, each part's backward also computes the
    other parts' gradients, which are dropped (as ``loss.backward()`` + one optimizer per
    part would).
    """
    return _Fsdp(
        check_bool("fsdp", "defer_reduce", defer_reduce),
        check_bool("fsdp", "diff_rank_seed", diff_rank_seed),
    )
