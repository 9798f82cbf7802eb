"""The environment the bits depend on besides code and config, as recorded and as replayed.

A run's bits depend on the torch build, the device type, the number of intra-op threads
(reduction order) and whether deterministic algorithms are on. The run log records them
per segment; replay says up front what differs, and by default sets the thread count and
the deterministic-algorithms flag to the recorded ones (``keep=True`` keeps the process's).
"""

from __future__ import annotations

import platform
from typing import Any

import torch
import torch.utils._pytree as pytree

import fengine
from fengine import distributed
from fengine.state import TrainState


__all__ = ["apply", "device_note", "environment", "notes"]


def environment(state: TrainState | None = None) -> dict[str, Any]:
    """This process's facts (``device``: the type of ``state``'s tensors, else ``"cpu"``)."""
    devices = [x.device.type for x in pytree.tree_leaves(state) if isinstance(x, torch.Tensor)]
    return {
        "fengine": fengine.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": devices[0] if devices else "cpu",
        "threads": torch.get_num_threads(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "world_size": distributed.world_size(),
    }


def notes(recorded: list[tuple[str, dict[str, Any]]], keep: bool) -> list[str]:
    """One note per difference between each ``(who, env)`` recorded and this process."""
    now, out = environment(), []
    for who, env in recorded:
        if env["threads"] != now["threads"]:
            n, m = env["threads"], now["threads"]
            act = (
                f"keeping {m} (--keep-settings)"
                if keep
                else f"using {n} (--keep-settings keeps {m})"
            )
            out.append(
                f"note: {who} recorded with {n} thread{'s' * (n != 1)}, replaying with {m}: "
                f"bits depend on the thread count; {act}"
            )
        if env["deterministic"] != now["deterministic"]:
            on = {True: "on", False: "off"}
            act = "keeping this process's (--keep-settings)" if keep else "using the recorded one"
            out.append(
                f"note: {who} recorded with deterministic algorithms {on[env['deterministic']]}, "
                f"replaying with them {on[now['deterministic']]}; {act}"
            )
        for what in ("torch", "python", "fengine"):
            if env[what] != now[what]:
                out.append(
                    f"note: {who} recorded with {what} {env[what]}, replaying with {now[what]}: "
                    "bits may differ between versions"
                )
    return list(dict.fromkeys(out))


def device_note(who: str, env: dict[str, Any], state: TrainState) -> str | None:
    now = environment(state)["device"]
    if env["device"] == now:
        return None
    return f"note: {who} recorded on {env['device']}, replays on {now}: bits differ between devices"


def apply(env: dict[str, Any]) -> None:
    """Set this process's thread count and deterministic-algorithms flag to ``env``'s."""
    torch.set_num_threads(env["threads"])
    torch.use_deterministic_algorithms(env["deterministic"])
