"""Recipe configs: frozen dataclasses, to and from plain JSON, with a stable hash.

Recipes define their config as a (nested) frozen dataclass and parse it with
tyro (`fengine.cli`). The resolved config is written next to the checkpoints as
JSON; ``--config`` and replay rebuild the same dataclass from that JSON (or YAML)
with `from_dict`, which fills missing fields with their defaults and refuses
unknown ones. ``Annotated[...]`` metadata (`fengine.cli.Range`) is ignored here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from pathlib import Path
from typing import Any


__all__ = ["config_hash", "from_dict", "to_dict"]


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dict of a dataclass config (paths as strings, tuples as lists)."""
    # a dataclass *class* passes is_dataclass too, but asdict needs an instance
    if not dataclasses.is_dataclass(cfg) or isinstance(cfg, type):
        what = f"the class {cfg.__name__}" if isinstance(cfg, type) else type(cfg).__name__
        raise TypeError(f"to_dict: expected a dataclass instance, got {what}")
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def config_hash(config: Any) -> str:
    """SHA-256 of the canonical JSON of a config (dataclass or dict)."""
    data = to_dict(config) if dataclasses.is_dataclass(config) else config
    return hashlib.sha256(
        json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()


def from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Rebuild the dataclass ``cls`` from `to_dict` output; unknown keys are an error."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"from_dict: {cls!r} is not a dataclass")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = set(data) - fields
    if unknown:
        raise ValueError(
            f"from_dict: {cls.__name__} has no fields {sorted(unknown)}; fields are {sorted(fields)}"
        )
    return cls(
        **{
            name: _convert(hints[name], value, f"{cls.__name__}.{name}")
            for name, value in data.items()
        }
    )


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if value is None:
        return None
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        for option in options:
            try:
                return _convert(option, value, where)
            except (TypeError, ValueError):
                continue
        raise ValueError(f"{where}: {value!r} fits none of {options}")
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise TypeError(f"{where}: expected a dict for {tp.__name__}, got {value!r}")
        return from_dict(tp, value)
    if tp is Path:
        return Path(value)
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise ValueError(f"{where}: {value!r} is not one of {typing.get_args(tp)}")
        return value
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, where) for v in value)
        return tuple(_convert(a, v, where) for a, v in zip(args, value))
    if origin is list:
        (arg,) = typing.get_args(tp) or (Any,)
        return [_convert(arg, v, where) for v in value]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and not isinstance(value, tp):
        raise TypeError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value
