"""Importing the recipe a run log names, and rebuilding a segment with its ``from_config``.

The recipe's SHA-256 must equal the one each replayed segment recorded.
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from fengine.replay.log import LOG_NAME, ReplayError, Segment, code_hash, file_hash
from fengine.state import TrainState
from fengine.step import Step


__all__ = ["build", "check_code", "load_recipe", "resolve_recipe"]


def resolve_recipe(recorded: str | None, work_dir: Path) -> Path:
    """The recipe the run log names."""
    log = work_dir / LOG_NAME
    if recorded is None:
        raise ReplayError(f"{log} names no recipe to rebuild the run from")
    path = Path(recorded)
    if not path.is_file():
        raise ReplayError(f"recipe {path} (named by {log}) not found")
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


def load_recipe(path: Path) -> ModuleType:
    """Import the recipe and check its ``from_config`` hook."""
    spec = importlib.util.spec_from_file_location("_fengine_replayed_recipe", path)
    if spec is None or spec.loader is None:
        raise ReplayError(f"recipe {path} cannot be imported: it must be a .py file")
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


def build(module: ModuleType, seg: Segment, recipe: Path) -> Any:
    """The segment's experiment: ``from_config(config, max_epochs=, max_steps=)``."""
    h = seg.horizon
    exp = module.from_config(
        seg.record["config"], max_epochs=h["max_epochs"], max_steps=h["max_steps"]
    )
    if not (
        isinstance(getattr(exp, "state", None), TrainState)
        and isinstance(getattr(exp, "step", None), Step)
        and hasattr(exp, "train_data")
    ):
        raise ReplayError(
            f"recipe {recipe}: from_config must return an object with state, step and train_data"
        )
    return exp
