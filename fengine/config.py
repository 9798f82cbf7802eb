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
from pathlib import Path, PurePath
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
    """Rebuild the dataclass ``cls`` from `to_dict` output. Unknown keys, a null for a field
    that is not Optional and a value of the wrong type or length are errors naming the field."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"from_dict: {cls!r} is not a dataclass")
    return _build(cls, data, cls.__name__)


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise TypeError(f"from_dict: {where}: expected a dict for {cls.__name__}, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = set(data) - fields
    if unknown:
        at = "" if where == cls.__name__ else f"{where}: "
        raise ValueError(
            f"from_dict: {at}{cls.__name__} has no fields {sorted(unknown)}; fields are {sorted(fields)}"
        )
    return cls(
        **{name: _convert(hints[name], value, f"{where}.{name}") for name, value in data.items()}
    )


def _name(tp: Any) -> str:
    return tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None and len(options) < len(typing.get_args(tp)):
            return None
        if len(options) == 1:  # Optional[X]: X's own error names what is wrong
            return _convert(options[0], value, where)
        for option in options:
            try:
                return _convert(option, value, where)
            except (TypeError, ValueError):
                continue
        raise ValueError(f"from_dict: {where}: {value!r} fits none of {_name(tp)}")
    if value is None:
        raise TypeError(
            f"from_dict: {where}: got null, expected {_name(tp)} (the field is not Optional)"
        )
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    if tp is Path:
        if not isinstance(value, (str, PurePath)):
            raise TypeError(f"from_dict: {where}: expected a path (str), got {value!r}")
        return Path(value)
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise ValueError(f"from_dict: {where}: {value!r} is not one of {typing.get_args(tp)}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"from_dict: {where}: expected a list for {_name(tp)}, got {value!r}")
        args = typing.get_args(tp) or (Any, ...)
        if origin is list or (len(args) == 2 and args[1] is Ellipsis):
            items = [_convert(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
            return items if origin is list else tuple(items)
        if len(value) != len(args):
            raise ValueError(
                f"from_dict: {where}: expected {len(args)} items for {_name(tp)}, got {value!r}"
            )
        return tuple(_convert(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if tp in (int, float, str, bool):
        number = isinstance(value, int) and not isinstance(value, bool)
        if tp is float and number:
            return float(value)
        if not isinstance(value, tp) or (tp is int and not number):
            raise TypeError(f"from_dict: {where}: expected {tp.__name__}, got {value!r}")
    return value
