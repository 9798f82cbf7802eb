"""What the log says before training: MMEngine's environment banner and its ``Config:`` text.

`environment` collects the facts MMEngine's ``collect_env`` and runner print (platform,
Python, CUDA and its devices, library versions; seed, deterministic flags, threads,
distributed setup); `format_banner` lays them out as MMEngine does (a 60-dash frame with
``System environment:`` and ``Runtime environment:``); `format_config` writes a resolved
config the way MMEngine's ``Config.pretty_text`` reads (``key = value``, ``dict(...)``).
"""

from __future__ import annotations

import importlib.metadata
import sys
from collections.abc import Mapping
from typing import Any

import torch

from fengine.events import Snapshot


__all__ = ["environment", "format_banner", "format_config"]

_DASH = "-" * 60


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(snap: Snapshot | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(system, runtime)``: MMEngine's ``System environment`` and ``Runtime environment``.

    The runtime part reads the run (world size, every rank's device) and the state's
    ``seed`` from ``snap`` when given.
    """
    import fengine

    system: dict[str, Any] = {"sys.platform": sys.platform, "Python": sys.version.replace("\n", "")}
    cuda = torch.cuda.is_available()
    system["CUDA available"] = cuda
    if cuda:
        names: dict[str, list[str]] = {}
        for k in range(torch.cuda.device_count()):
            names.setdefault(torch.cuda.get_device_name(k), []).append(str(k))
        for name, ids in names.items():
            system["GPU " + ",".join(ids)] = name
        system["CUDA"] = torch.version.cuda
        system["cuDNN"] = torch.backends.cudnn.version()
    system["PyTorch"] = torch.__version__
    for label, dist in (("TorchVision", "torchvision"), ("NumPy", "numpy")):
        v = _version(dist)
        if v is not None:
            system[label] = v
    system["fengine"] = fengine.__version__

    runtime: dict[str, Any] = {}
    state = snap.state if snap is not None else None
    seed = getattr(state, "seed", None)
    if seed is not None:
        runtime["seed"] = seed
    runtime["deterministic"] = torch.are_deterministic_algorithms_enabled()
    runtime["cudnn_benchmark"] = torch.backends.cudnn.benchmark
    runtime["cudnn_deterministic"] = torch.backends.cudnn.deterministic
    runtime["threads"] = torch.get_num_threads()
    run = snap.run if snap is not None else None
    world = run.world_size if run is not None else 1
    runtime["Distributed training"] = world > 1
    runtime["world_size"] = world
    if run is not None and run.devices:
        runtime["devices"] = ", ".join(run.devices)
    return system, runtime


def format_banner(system: Mapping[str, Any], runtime: Mapping[str, Any]) -> str:
    """MMEngine's ``Runner._log_env`` message, byte for byte in its layout."""
    sys_info = "\n    " + "\n    ".join(f"{k}: {v}" for k, v in system.items())
    run_info = "\n    " + "\n    ".join(f"{k}: {v}" for k, v in runtime.items())
    return (
        "\n" + _DASH + "\nSystem environment:" + sys_info + "\n"
        "\nRuntime environment:" + run_info + "\n" + _DASH + "\n"
    )


def _value(v: Any, indent: int) -> str:
    if isinstance(v, Mapping):
        if not v:
            return "dict()"
        pad = " " * (indent + 4)
        if all(isinstance(k, str) and k.isidentifier() for k in v):
            items = [f"{pad}{k}={_value(x, indent + 4)}" for k, x in v.items()]
            return "dict(\n" + ",\n".join(items) + ")"
        items = [f"{pad}{k!r}: {_value(x, indent + 4)}" for k, x in v.items()]
        return "{\n" + ",\n".join(items) + "}"
    if isinstance(v, (list, tuple)):
        inner = ", ".join(_value(x, indent) for x in v)
        return f"[{inner}]" if isinstance(v, list) else f"({inner}{',' if len(v) == 1 else ''})"
    return repr(v)


def format_config(config: Mapping[str, Any]) -> str:
    """A resolved config as MMEngine prints one (``Config.pretty_text``): a ``key = value`` line
    per top-level key, nested mappings as ``dict(...)``, one entry per line."""
    lines = []
    for k, v in config.items():
        name = k if isinstance(k, str) and k.isidentifier() else repr(k)
        lines.append(f"{name} = {_value(v, 0)}")
    return "\n".join(lines) + "\n"
