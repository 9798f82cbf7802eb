"""Which recipe replay may run, importing it, and rebuilding a segment with its ``from_config``.

A run log is data, and data must not choose the code that runs: replay runs the
recipe the user names (``--recipe PATH``), or the one the run log names when it lies
under the current directory or under the source checkout fengine is imported from
(the directory holding the ``fengine`` package, when it has a ``pyproject.toml``),
and not inside the work dir being replayed. The recipe's SHA-256 must equal the
one each replayed segment recorded.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

import fengine
from fengine.replay.log import LOG_NAME, ReplayError, Segment, code_hash, file_hash
from fengine.state import TrainState
from fengine.step import Step


__all__ = ["build", "check_code", "load_recipe", "resolve_recipe", "trusted_roots"]


def trusted_roots() -> list[Path]:
    """Where a recipe named by a run log may be run from without ``--recipe``: the current
    directory and, when fengine is imported from a source checkout, that project."""
    roots = [Path.cwd().resolve()]
    project = Path(fengine.__file__).resolve().parent.parent
    if (project / "pyproject.toml").is_file() and project not in roots:
        roots.append(project)
    return roots


def resolve_recipe(recorded: str | None, given: str | Path | None, work_dir: Path) -> Path:
    """The recipe to run: ``given`` (the user's), else the recorded one if it is trusted."""
    log = work_dir / LOG_NAME
    if given is not None:
        path = Path(given).resolve()
        if not path.is_file():
            raise ReplayError(f"--recipe {given}: no such file; pass the script that ran")
        return path
    if recorded is None:
        raise ReplayError(f"{log} names no recipe: pass --recipe PATH to the script that ran")
    path = Path(recorded).resolve()
    roots = trusted_roots()
    where = ""
    if path.is_relative_to(work_dir.resolve()):
        where = "inside the work dir itself"
    elif not any(path.is_relative_to(r) for r in roots):
        where = (
            f"outside the current directory and fengine's project ({', '.join(map(str, roots))})"
        )
    if where:
        raise ReplayError(
            f"{log} names the recipe {path}, {where}, and replay runs only a recipe you name "
            f"there: pass --recipe {path} if you trust it"
        )
    if not path.is_file():
        raise ReplayError(f"recipe {path} (named by {log}) not found: pass --recipe PATH")
    return path


def check_code(
    recipe: Path, segments: list[Segment], force: bool, out: Callable[[str], Any]
) -> None:
    """Refuse (or with ``force`` warn) when the recipe or fengine differ from what a segment recorded."""
    problems = []
    fengine_now, recipe_now = code_hash(), file_hash(recipe)
    for seg in segments:
        code = seg.record["code"]
        if code["recipe"] != recipe_now:
            problems.append(
                f"the recipe {recipe} differs from the one segment {seg.number} recorded "
                f"(sha256 {recipe_now[:12]} vs {str(code['recipe'])[:12]})"
            )
        if code["fengine"] != fengine_now:
            problems.append(f"fengine's sources changed since segment {seg.number} was recorded")
    for msg in dict.fromkeys(problems):
        if not force:
            raise ReplayError(
                f"{msg}, so results may legitimately differ: pass --force to replay anyway"
            )
        out(f"warning: {msg}")


def load_recipe(path: Path, out: Callable[[str], Any]) -> ModuleType:
    """Import the recipe (saying so first) and check its ``from_config`` hook."""
    out(f"running recipe {path}")
    spec = importlib.util.spec_from_file_location("_fengine_replayed_recipe", path)
    if spec is None or spec.loader is None:
        raise ReplayError(f"recipe {path} cannot be imported: pass --recipe PATH to a .py file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the recipe runs
    spec.loader.exec_module(module)
    hook = getattr(module, "from_config", None)
    if not callable(hook):
        raise ReplayError(f"recipe {path} defines no from_config(config, *, max_epochs, max_steps)")
    params = inspect.signature(hook).parameters
    if not {"max_epochs", "max_steps"} <= set(params) and not any(
        p.kind is p.VAR_KEYWORD for p in params.values()
    ):
        raise ReplayError(
            f"recipe {path}: from_config must take max_epochs= and max_steps= (each segment's "
            "horizon); add them and pass them on to the config"
        )
    return module


def _described(e: BaseException) -> str:
    """``Type: message`` of an error, the message shortened (an allocator's runs long)."""
    text = " ".join(str(e).split())
    text = text if len(text) <= 300 else text[:297] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _threads_note(seg: Segment) -> str:
    """A hint when the segment recorded more threads than this machine has CPUs: replay sets the
    recorded count (4096 threads' stacks alone exhaust a 4 GB address space)."""
    threads, cpus = seg.record["env"]["threads"], os.cpu_count() or 1
    if threads <= cpus or torch.get_num_threads() != threads:  # few, or not set (--keep-settings)
        return ""
    return (
        f"; note: the segment recorded env.threads={threads}, which replay sets (this machine has "
        f"{cpus} CPUs): --keep-settings keeps this process's"
    )


def build(
    module: ModuleType, seg: Segment, recipe: Path, paths: Mapping[str, str] | None = None
) -> Any:
    """The segment's experiment: ``from_config(config, max_epochs=, max_steps=, paths=)``.

    ``paths``: the files the user confirmed (``--path NAME=VALUE``); passed to a hook that takes
    ``paths`` (`fengine.cli.from_record` takes every path from there, never from the run log).
    """
    h = seg.horizon
    kwargs: dict[str, Any] = {"max_epochs": h["max_epochs"], "max_steps": h["max_steps"]}
    params = inspect.signature(module.from_config).parameters
    if "paths" in params or any(p.kind is p.VAR_KEYWORD for p in params.values()):
        kwargs["paths"] = dict(paths or {})
    elif paths:
        raise ReplayError(
            f"recipe {recipe}: its from_config takes no paths=, so --path cannot reach it; add "
            "paths=None to it and pass it on to fengine.cli.from_record"
        )
    try:
        exp = module.from_config(seg.record["config"], **kwargs)
    except ReplayError:
        raise
    except Exception as e:  # noqa: BLE001 - the run log is untrusted: whatever its config makes
        # the recipe raise (a type or range it refuses, a size it cannot allocate: RuntimeError,
        # MemoryError, OverflowError; a SystemError from an import out of memory) is one line
        raise ReplayError(
            f"segment {seg.number}'s recorded config cannot be rebuilt by recipe {recipe} (a "
            f"damaged or edited run log, {seg.path}:{seg.line}, or a changed recipe): "
            f"{_described(e)}{_threads_note(seg)}"
        ) from e
    if not (
        isinstance(getattr(exp, "state", None), TrainState)
        and isinstance(getattr(exp, "step", None), Step)
        and hasattr(exp, "train_data")
    ):
        raise ReplayError(
            f"recipe {recipe}: from_config must return an object with state, step and train_data"
        )
    return exp
