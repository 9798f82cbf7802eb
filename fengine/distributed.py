"""torch.distributed, as torchrun launches it: the process group, who this rank is, and collectives.

``torchrun --nproc_per_node=N script.py`` starts N processes with ``WORLD_SIZE``,
``RANK``, ``LOCAL_RANK`` and the rendezvous address in the environment. `setup`
initialises the default process group from them (gloo on CPU, nccl on CUDA, one
device per local rank). A process launched that way that trains without a process
group would silently train N independent copies: `fengine.fit` refuses it.

Everything here is a no-op in a single process, so the same script runs either way.
"""

from __future__ import annotations

import atexit
import datetime
import logging
import math
import numbers
import os
import pickle
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple, TypeVar

import torch
import torch.distributed as dist

from fengine.sharding import shard as shard  # FSDP2: see fengine.sharding


__all__ = [
    "DistInfo",
    "MainRankError",
    "barrier",
    "computed_by_main",
    "check_launch",
    "gather_objects",
    "is_main",
    "launched_rank",
    "launched_world_size",
    "rank",
    "setup",
    "shard",
    "sync_buffers",
    "world_size",
]


_T = TypeVar("_T")


class MainRankError(RuntimeError):
    """Raised on the other ranks when rank 0's part of `computed_by_main` failed with an error
    that cannot travel (it does not pickle)."""


class DistInfo(NamedTuple):
    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if _active() else 0


def world_size() -> int:
    return dist.get_world_size() if _active() else 1


def is_main() -> bool:
    """Rank 0, the one that writes files (logs, checkpoints, run logs)."""
    return rank() == 0


def launched_world_size() -> int:
    """``WORLD_SIZE`` as torchrun set it (1 when not launched by torchrun)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise RuntimeError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number") from None


def launched_rank() -> int:
    """``RANK`` as torchrun set it (0 when not launched by torchrun): known before `setup`."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        raise RuntimeError(f"RANK={os.environ['RANK']!r} is not a number") from None


def setup(device: str | torch.device | None = None, *, timeout_s: float = 1800.0) -> DistInfo:
    """Initialise the default process group from torchrun's environment and pick this rank's device.

    ``device`` "cpu", "cuda" or "cuda:N" (default: cuda when available, else cpu). Under
    torchrun, "cuda" means ``cuda:LOCAL_RANK`` (one device per process) and the backend is
    nccl; on CPU it is gloo. Without torchrun (``WORLD_SIZE`` unset or 1) nothing is
    initialised. Safe to call twice. ``timeout_s``: how long a collective (and the rendezvous)
    waits for the other ranks, in seconds.
    """
    timeout = _timeout(timeout_s)
    try:
        want = torch.device(device) if device is not None else None
    except (RuntimeError, TypeError):
        raise ValueError(
            f"--device must be 'cpu', 'cuda' or 'cuda:N' (a torch device), got {device!r}"
        ) from None
    if want is None:
        want = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if want.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            f"--device {want} but CUDA is not available here (torch {torch.__version__})"
        )
    world = launched_world_size()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if want.type == "cuda" and want.index is None:
        want = torch.device("cuda", local if world > 1 else torch.cuda.current_device())
    if want.type == "cuda":
        torch.cuda.set_device(want)
    if world > 1 and not _active():
        backend = "nccl" if want.type == "cuda" else "gloo"
        try:
            dist.init_process_group(backend, timeout=timeout)
            atexit.register(
                _teardown
            )  # a live gloo/nccl group at interpreter exit aborts the process
        except Exception as e:  # noqa: BLE001 - whatever the rendezvous raised, say what was tried
            raise RuntimeError(
                f"launched with WORLD_SIZE={world} but the {backend} process group could not be "
                f"initialised from the environment (MASTER_ADDR={os.environ.get('MASTER_ADDR')}, "
                f"MASTER_PORT={os.environ.get('MASTER_PORT')}): {e}"
            ) from e
    if (
        rank() != 0
    ):  # one console: other ranks only say what goes wrong (MMEngine's MMLogger does the same)
        logging.getLogger("fengine").setLevel(logging.WARNING)
    return DistInfo(rank(), world_size(), local, want)


def _timeout(timeout_s: Any) -> datetime.timedelta:
    """``setup``'s ``timeout_s`` checked before any rendezvous, so a bad value is named as such
    (not as an unreachable MASTER_ADDR), and in one process too."""
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, numbers.Real):
        raise TypeError(
            f"setup: timeout_s must be a number of seconds (an int or float), got "
            f"{type(timeout_s).__name__} {timeout_s!r:.80}"
        )
    try:
        seconds = float(timeout_s)
        if seconds > 0 and math.isfinite(seconds):
            return datetime.timedelta(seconds=seconds)
    except OverflowError:  # beyond a float, or a timedelta
        most = datetime.timedelta.max.total_seconds()
        raise ValueError(
            f"setup: timeout_s={timeout_s!r:.80} is too large: at most {most:.0f} seconds"
        ) from None
    raise ValueError(f"setup: timeout_s must be a finite number of seconds > 0, got {timeout_s!r}")


def _teardown() -> None:
    if _active():
        dist.destroy_process_group()


def check_launch() -> None:
    """Refuse to train N independent copies: launched by torchrun but no process group."""
    world = launched_world_size()
    if world > 1 and not _active():
        raise RuntimeError(
            f"this process was launched as one of WORLD_SIZE={world} (torchrun) but no process group is "
            "initialised, so each process would train its own copy; call fengine.distributed.setup() "
            "before building the state (recipes do) and add fengine.data_parallel() to the step"
        )


def barrier() -> None:
    if _active() and world_size() > 1:
        dist.barrier()


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` in rank order (a collective; ``[obj]`` in one process)."""
    if not _active() or world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def computed_by_main(compute: Callable[[], _T]) -> _T:
    """``compute()`` run on rank 0 and its value on every rank (one broadcast; in one process,
    the call). Rank 0's error is raised there and on every other rank (the same exception, or a
    `MainRankError` naming it if it does not pickle): none is left waiting for a value."""
    if not _active() or world_size() == 1:
        return compute()
    box: list[Any] = [None]
    error: Exception | None = None
    if rank() == 0:
        try:
            box[0] = ("value", compute())
        except Exception as e:  # noqa: BLE001 - whatever it is, the other ranks must hear of it
            error = e
            try:
                pickle.loads(pickle.dumps(e))
                box[0] = ("error", e)
            except Exception:  # noqa: BLE001 - an exception that does not travel: its text does
                box[0] = ("error", MainRankError(f"rank 0 failed: {type(e).__name__}: {e}"))
    dist.broadcast_object_list(box, src=0)
    if error is not None:
        raise error
    kind, value = box[0]
    if kind == "error":
        value.add_note("(raised on rank 0, which computes this for every rank)")
        raise value
    return value


def unequal_counts(count: int | None) -> list[int] | None:
    """Every rank's ``count`` in rank order if they differ (a collective), else None; a rank
    that cannot count (None) makes it None: nothing to compare."""
    counts = gather_objects(count)
    return counts if None not in counts and len(set(counts)) > 1 else None


def agree(flag: bool, device: torch.device) -> bool:
    """True on every rank if it is true on any (e.g. a preemption signal seen by one rank)."""
    if not _active() or world_size() == 1:
        return flag
    t = torch.tensor([int(flag)], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def broadcast_from_main(tensors: Iterable[torch.Tensor]) -> None:
    """Copy rank 0's values into every rank's ``tensors`` in place (DDP's start: the replicas
    begin from rank 0's weights), one broadcast per device and dtype."""
    if not _active() or world_size() == 1:
        return
    for group in _by_device_dtype(tensors):
        with torch.no_grad():
            flat = torch.cat([t.detach().reshape(-1) for t in group])
            dist.broadcast(flat, src=0)
            torch._foreach_copy_(group, [v.view_as(t) for v, t in zip(_split(flat, group), group)])


def sync_buffers(buffers: Mapping[str, torch.Tensor]) -> None:
    """Average floating-point buffers (BatchNorm statistics) across ranks in place: MMEngine's
    SyncBuffersHook, run by `fit` after each training epoch."""
    if not _active() or world_size() == 1:
        return
    floats = [b for b in buffers.values() if b.is_floating_point()]
    for group in _by_device_dtype(floats):
        flat = torch.cat([b.reshape(-1) for b in group])
        dist.all_reduce(flat)
        flat.div_(world_size())
        torch._foreach_copy_(group, [v.view_as(b) for v, b in zip(_split(flat, group), group)])


def _by_device_dtype(tensors: Iterable[torch.Tensor]) -> list[list[torch.Tensor]]:
    groups: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    return list(groups.values())


def _split(flat: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(torch.split(flat, [t.numel() for t in like]))
