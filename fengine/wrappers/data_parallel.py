"""`data_parallel`: average gradients across torch.distributed ranks, once per update.

A gradient-stage wrapper: it runs after the whole gradient computation (all the
micro-batches of `accumulate`), so it communicates once per update, and before
`amp` unscales and checks: every rank then sees the same (possibly inf) gradients
and skips or raises together, as DDP + GradScaler do. Gradients are flattened into
buckets (one all-reduce per bucket of ``bucket_mb``, not one per tensor), divided
by the world size before the sum as DDP does (so the bits match DDP), or, when
`accumulate(weight=...)` reports sample/token counts, weighted by each rank's share
of the global count. A param unused on every rank gets no gradient (as DDP with
``find_unused_parameters``); one unused on some ranks contributes zeros there.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from fengine.checks import check_bool
from fengine.distributed import rank, world_size
from fengine.state import TrainState
from fengine.step import ApplyFn, GradFn, Grads, Metrics, Part
from fengine.wrappers.amp import _Amp
from fengine.wrappers.base import Wrapper, _CheckFinite, once


__all__ = ["data_parallel"]


class _DataParallel(Wrapper):
    def __init__(self, bucket_mb: float, diff_rank_seed: bool) -> None:
        self.bucket_bytes, self.diff_rank_seed = int(float(bucket_mb) * 2**20), diff_rank_seed

    def validate(self, before: Sequence[Wrapper]) -> None:
        once(_DataParallel, "data_parallel", before)
        from fengine.wrappers.fsdp import _Fsdp, fsdp_with_data_parallel

        if any(isinstance(w, _Fsdp) for w in before):
            raise ValueError(fsdp_with_data_parallel)
        late = [w for w in before if isinstance(w, (_Amp, _CheckFinite))]
        if late:
            raise ValueError(
                f"data_parallel() is written after {late[0]!r}: gradients must be averaged before they are "
                "unscaled and checked, so every rank skips or raises together; write data_parallel() first"
            )

    def forward(self, grad_fn: GradFn, part: Part) -> GradFn:
        if not self.diff_rank_seed:
            return grad_fn

        def per_rank(state: TrainState, batch: Any, *, weight: Any = None, micro: int = 0) -> Grads:
            # MMEngine's diff_rank_seed: rank r draws from its own streams, micro + (r + 1) * 2**32
            return grad_fn(state, batch, weight=weight, micro=micro + ((rank() + 1) << 32))

        return per_rank

    def gradient(self, apply: ApplyFn, part: Part) -> ApplyFn:
        cache: dict[str, Any] = {}

        def averaged(state: TrainState, g: Grads) -> tuple[TrainState, Metrics]:
            world = world_size()
            if world == 1:
                return apply(state, g)
            params = state.params
            if cache.get("params") is not params:
                cache.update(params=params, names=part.owned(params))
            names: list[str] = cache["names"]
            grads = [g.grads[n] if n in g.grads else torch.zeros_like(params[n]) for n in names]
            share = None if g.weight is None else _share(g.weight, grads[0].device)
            reduced, counts = _all_reduce_mean(
                grads, [n in g.grads for n in names], world, share, self.bucket_bytes
            )
            if len(g.grads) == len(
                names
            ):  # this rank had every gradient, so every one is used somewhere
                kept = dict(zip(names, reduced))
            else:  # one host read, only on ranks that lacked a gradient; all ranks reach the same set
                kept = {n: t for n, t, c in zip(names, reduced, counts.tolist()) if c > 0}
            return apply(state, g._replace(grads=kept))

        return averaged

    def __repr__(self) -> str:
        return f"data_parallel(bucket_mb={self.bucket_bytes / 2**20:g}, diff_rank_seed={self.diff_rank_seed})"


def _share(weight: Any, device: torch.device) -> torch.Tensor:
    """This rank's weight over the global total (one scalar all-reduce; a tensor weight is not
    read on the host)."""
    if isinstance(weight, torch.Tensor):
        w = weight.detach().to(device, torch.float64).reshape(1)
    else:
        w = torch.tensor([float(weight)], dtype=torch.float64, device=device)
    total = w.clone()
    dist.all_reduce(total)
    return w / total


def _all_reduce_mean(
    grads: list[torch.Tensor],
    present: list[bool],
    world: int,
    share: torch.Tensor | None,
    bucket_bytes: int,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The mean over ranks of ``grads`` (weighted by ``share`` if given), one all-reduce per bucket
    of same device and dtype; also how many ranks had each gradient (riding in the first bucket)."""
    buckets: list[list[int]] = []
    last, size = None, 0
    for i in sorted(
        range(len(grads)), key=lambda i: (str(grads[i].device), str(grads[i].dtype), i)
    ):
        t = grads[i]
        nbytes = t.numel() * t.element_size()
        if not buckets or (t.device, t.dtype) != last or size + nbytes > bucket_bytes:
            buckets.append([])
            last, size = (t.device, t.dtype), 0
        buckets[-1].append(i)
        size += nbytes
    out: dict[int, torch.Tensor] = {}
    counts = torch.zeros(0)
    for b, idx in enumerate(buckets):
        parts = [grads[i].reshape(-1) for i in idx]
        n = sum(p.numel() for p in parts)
        extra = (
            [torch.tensor(present, dtype=parts[0].dtype, device=parts[0].device)] if b == 0 else []
        )
        flat = torch.cat(parts + extra)
        if share is None:
            flat[:n].div_(world)  # DDP divides before the sum: the same bits as DDP
        else:
            flat[:n].mul_(share.to(flat.dtype))
        dist.all_reduce(flat)
        if b == 0:
            counts = flat[n:]
        for i, view in zip(idx, torch.split(flat[:n], [p.numel() for p in parts])):
            out[i] = view.view_as(grads[i])
    return [out[i] for i in range(len(grads))], counts


def data_parallel(bucket_mb: float = 25.0, *, diff_rank_seed: bool = False) -> Wrapper:
    """Average gradients across the ranks of the default process group (`fengine.distributed.setup`).

    Write it before `amp` and `check_finite`. ``bucket_mb``: gradient bytes per all-reduce
    (DDP's default 25). ``diff_rank_seed``: each rank draws its own dropout (MMEngine's
    ``randomness=dict(diff_rank_seed=True)``); by default all ranks share the derived keys,
    as MMEngine's default. In one process it does nothing.
    """
    if (
        isinstance(bucket_mb, bool)
        or not isinstance(bucket_mb, numbers.Real)
        or not math.isfinite(bucket_mb * 2**20)
        or int(bucket_mb * 2**20) < 1
    ):
        raise ValueError(
            f"data_parallel: bucket_mb must be a finite number of megabytes > 0 (at least one "
            f"byte), got {bucket_mb!r}"
        )
    return _DataParallel(bucket_mb, check_bool("data_parallel", "diff_rank_seed", diff_rank_seed))
