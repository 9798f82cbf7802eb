"""Recipe configs: frozen dataclasses, to and from plain JSON, with a stable hash.

Recipes define their config as a (nested) frozen dataclass and parse it with
tyro (`fengine.cli`). The resolved config is written next to the checkpoints as
JSON; ``--config`` and replay rebuild the same dataclass from that JSON (or YAML)
with `from_dict`, which fills missing fields with their defaults and refuses
unknown ones. ``Annotated[...]`` metadata (`fengine.cli.Range`) is ignored here.

An Enum is written by its member's name (as tyro's flags spell it). A field typed as a union
of two or more dataclasses (tyro's subcommands, ``opt: Adam | SGD``) is written with the class
it holds under ``"__type__"`` (``{"__type__": "SGD", "lr": 0.5}``): only the union's own
classes are accepted back, by name, so a file never names another class to build.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import enum
import hashlib
import json
import re
import reprlib
import types
import typing
from pathlib import Path, PurePath
from typing import Any


__all__ = ["TYPE_KEY", "config_hash", "from_dict", "to_dict", "unique_keys"]

TYPE_KEY = "__type__"
"""The key under which `to_dict` records the class a union-of-dataclasses field holds."""

_repr = reprlib.Repr()
_repr.maxlevel, _repr.maxstring, _repr.maxother, _repr.maxlist, _repr.maxdict = 2, 80, 80, 6, 4
_repr.maxtuple = _repr.maxset = _repr.maxfrozenset = 6


def _show(value: Any) -> str:
    """``repr(value)`` cut short for an error message: a config file is untrusted, and its value
    may be megabytes of text or (through YAML aliases) a list of millions of items."""
    return _repr.repr(value)


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object's dict for ``json.loads(object_pairs_hook=...)``: a key given twice is a
    ``ValueError`` naming it (``json`` keeps the last one silently). Configs and checkpoint
    headers are untrusted files: an edit may hide behind the first value."""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"duplicate key {repr(key)[:80]}")
            seen.add(key)
    return out


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dict of a dataclass config (paths as strings, tuples as lists, an Enum by its
    member's name). A field typed as a union of dataclasses also records which one it holds,
    by class name under ``"__type__"``, so that `from_dict` rebuilds that same class."""
    # a dataclass *class* passes is_dataclass too, but asdict needs an instance
    if not dataclasses.is_dataclass(cfg) or isinstance(cfg, type):
        what = f"the class {cfg.__name__}" if isinstance(cfg, type) else type(cfg).__name__
        raise TypeError(f"to_dict: expected a dataclass instance, got {what}")
    return json.loads(json.dumps(_plain(cfg, type(cfg), type(cfg).__name__), default=str))


def _plain(value: Any, tp: Any, where: str) -> Any:
    """``value`` (annotated ``tp``) as dicts, lists and scalars, as `dataclasses.asdict` makes
    it, but with Enums by name and union-of-dataclasses fields tagged with their class."""
    if isinstance(value, enum.Enum):
        return value.name
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        hints = _hints(type(value))
        out = {
            f.name: _plain(getattr(value, f.name), hints.get(f.name, Any), f"{where}.{f.name}")
            for f in dataclasses.fields(value)
        }
        if _union_classes(tp, where) is not None:
            return {TYPE_KEY: type(value).__name__, **out}
        return out
    if isinstance(value, (list, tuple)):
        return [_plain(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(_item_types(tp, value))]
    if isinstance(value, dict):
        _, value_tp = _dict_types(tp)
        return {
            (k.name if isinstance(k, enum.Enum) else k): _plain(v, value_tp, f"{where}[{k!r}]")
            for k, v in value.items()
        }
    return value


def config_hash(config: Any) -> str:
    """SHA-256 of the canonical JSON of a config (dataclass or dict)."""
    data = to_dict(config) if dataclasses.is_dataclass(config) else config
    return hashlib.sha256(
        json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()


def from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Rebuild the dataclass ``cls`` from `to_dict` output. Unknown keys, a null for a field
    that is not Optional, a value of the wrong type or length, an unknown Enum name and a
    missing or unknown ``"__type__"`` of a union of dataclasses are errors naming the field."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"from_dict: {cls!r} is not a dataclass")
    return _build(cls, data, cls.__name__)


def _build(cls: type, data: Any, where: str) -> Any:
    """An instance of the dataclass ``cls`` from the dict ``data``, each field converted."""
    if not isinstance(data, dict):
        raise TypeError(
            f"from_dict: {where}: expected a dict for {cls.__name__}, got {_show(data)}"
        )
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = set(data) - fields
    if unknown:
        at = "" if where == cls.__name__ else f"{where}: "
        raise ValueError(
            f"from_dict: {at}{cls.__name__} has no fields {_show(sorted(unknown, key=repr))}; "
            f"fields are {sorted(fields)}"
        )
    return cls(
        **{name: _convert(hints[name], value, f"{where}.{name}") for name, value in data.items()}
    )


def _hints(cls: type) -> dict[str, Any]:
    """The resolved field annotations of ``cls``; none when they cannot be resolved (`to_dict` of
    a class defined in a function still works, as `dataclasses.asdict` did)."""
    try:
        return typing.get_type_hints(cls)
    except (NameError, TypeError):
        return {}


def _name(tp: Any) -> str:
    """A short readable name of a type annotation (``Adam | SGD``, ``tuple[int, int]``)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " | ".join(_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "None"
    return tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")


def _strip_optional(tp: Any) -> Any:
    """``X`` for ``X | None``; any other annotation unchanged."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(options) == 1:
            return options[0]
    return tp


def _union_classes(tp: Any, where: str) -> dict[str, type] | None:
    """The dataclasses of a union annotation by class name, when its values need a recorded
    ``"__type__"`` to be told apart: two or more dataclasses, or one beside a dict (whose
    value a dataclass's fields would also read); else None."""
    if typing.get_origin(tp) not in (typing.Union, types.UnionType):
        return None
    args = typing.get_args(tp)
    classes = [a for a in args if isinstance(a, type) and dataclasses.is_dataclass(a)]
    if len(classes) < 2 and not (classes and any(map(_takes_a_dict, args))):
        return None
    by_name = {c.__name__: c for c in classes}
    if len(by_name) < len(classes):
        raise TypeError(
            f"config field {where}: the union {_name(tp)} has two dataclasses of the same name; "
            f"a config records the class by name, so give them distinct names"
        )
    return by_name


def _takes_a_dict(tp: Any) -> bool:
    """A union option that a JSON object converts to: a dict or mapping type, or Any."""
    origin = typing.get_origin(tp) or tp
    return tp is Any or (isinstance(origin, type) and issubclass(origin, collections.abc.Mapping))


def _item_types(tp: Any, value: list | tuple) -> list[tuple[Any, Any]]:
    """Each item of the list or tuple ``value`` with its annotated type (Any when unknown)."""
    tp = _strip_optional(tp)
    args = typing.get_args(tp) if typing.get_origin(tp) in (list, tuple) else ()
    if len(args) == 1 or (len(args) == 2 and args[1] is Ellipsis):
        return [(v, args[0]) for v in value]
    if len(args) == len(value):
        return list(zip(value, args))
    return [(v, Any) for v in value]


def _dict_types(tp: Any) -> tuple[Any, Any]:
    """The key and value types of a ``dict[K, V]`` / ``Mapping[K, V]`` annotation (else Any)."""
    tp = _strip_optional(tp)
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (dict, collections.abc.Mapping) and len(args) == 2:
        return args[0], args[1]
    return Any, Any


def _convert(tp: Any, value: Any, where: str) -> Any:
    """``value`` (parsed JSON or YAML) checked against, and converted to, the annotation ``tp``."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        return _convert_union(tp, value, where)
    if value is None:
        raise TypeError(
            f"from_dict: {where}: got null, expected {_name(tp)} (the field is not Optional)"
        )
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return _convert_enum(tp, value, where)
    if tp is Path:
        if not isinstance(value, (str, PurePath)):
            raise TypeError(f"from_dict: {where}: expected a path (str), got {_show(value)}")
        return Path(value)
    if origin is typing.Literal:
        return _convert_literal(tp, value, where)
    container = origin or tp  # bare ``list``, ``tuple``, ``dict`` are checked too
    if container in (tuple, list):
        return _convert_sequence(tp, container, value, where)
    if container in (dict, collections.abc.Mapping):
        return _convert_dict(tp, value, where)
    if tp in (int, float, str, bool):
        number = isinstance(value, int) and not isinstance(value, bool)
        if tp is float and number:
            return float(value)
        if not isinstance(value, tp) or (tp is int and not number):
            raise TypeError(f"from_dict: {where}: expected {tp.__name__}, got {_show(value)}")
    return value


def _convert_union(tp: Any, value: Any, where: str) -> Any:
    """A union's value: null for an Optional; the class ``"__type__"`` names for a union of
    dataclasses (never the first class that happens to accept the fields); else the first
    option that accepts it."""
    args = typing.get_args(tp)
    options = [a for a in args if a is not type(None)]
    if value is None and len(options) < len(args):
        return None
    if len(options) == 1:  # Optional[X]: X's own error names what is wrong
        return _convert(options[0], value, where)
    classes = _union_classes(tp, where)
    if classes is not None and isinstance(value, dict):
        rest = [o for o in options if o not in classes.values()]
        if TYPE_KEY in value or not rest:
            return _build_tagged(tp, classes, value, where)
        options = rest  # a dict without a tag may still be another option's (a dict field)
    for option in options:
        try:
            return _convert(option, value, where)
        except (TypeError, ValueError):
            continue
    raise ValueError(f"from_dict: {where}: {_show(value)} fits none of {_name(tp)}")


def _build_tagged(tp: Any, classes: dict[str, type], data: dict, where: str) -> Any:
    """The dataclass of a union that ``data["__type__"]`` names: only the union's own classes,
    matched by name (a config file is untrusted and names no other class)."""
    allowed = sorted(classes)
    if TYPE_KEY not in data:
        raise ValueError(
            f'from_dict: {where}: a {_name(tp)} needs "{TYPE_KEY}" naming its class, one of '
            f"{allowed}; got none"
        )
    name = data[TYPE_KEY]
    if not isinstance(name, str) or name not in classes:
        raise ValueError(
            f'from_dict: {where}: "{TYPE_KEY}" is {_show(name)}, expected one of {allowed}'
        )
    return _build(classes[name], {k: v for k, v in data.items() if k != TYPE_KEY}, where)


def _convert_enum(tp: type[enum.Enum], value: Any, where: str) -> enum.Enum:
    """The member of ``tp`` that ``value`` names (`to_dict` writes the name); the text the
    previous `to_dict` wrote (``"Act.GELU"``, or the value of a str/int Enum) is read too."""
    if isinstance(value, tp):
        return value
    if isinstance(value, str) and value in tp.__members__:
        return tp[value]
    for member in tp:
        old = json.loads(json.dumps(member, default=str))
        if type(old) is type(value) and old == value:
            return member
    names = [m.name for m in tp]
    if isinstance(value, str):
        raise ValueError(
            f"from_dict: {where}: {_show(value)} is not a member of {tp.__name__}; members are {names}"
        )
    raise TypeError(
        f"from_dict: {where}: expected the name of a {tp.__name__} member, one of {names}; "
        f"got {_show(value)}"
    )


def _convert_literal(tp: Any, value: Any, where: str) -> Any:
    """The ``Literal`` choice equal to ``value`` and of its type (``True`` is not ``1``); an
    Enum choice by its name."""
    choices = typing.get_args(tp)
    for choice in choices:
        if isinstance(choice, enum.Enum):
            if value is choice or (isinstance(value, str) and value == choice.name):
                return choice
        elif type(value) is type(choice) and value == choice:
            return choice
    raise ValueError(f"from_dict: {where}: {_show(value)} is not one of {choices}")


def _convert_sequence(tp: Any, container: type, value: Any, where: str) -> Any:
    """A list, or a tuple of fixed or any length, each item converted to its type."""
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"from_dict: {where}: expected a list for {_name(tp)}, got {_show(value)}")
    args = typing.get_args(tp) or (Any, ...)
    if container is list or (len(args) == 2 and args[1] is Ellipsis):
        items = [_convert(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if container is list else tuple(items)
    if len(value) != len(args):
        raise ValueError(
            f"from_dict: {where}: expected {len(args)} items for {_name(tp)}, got {_show(value)}"
        )
    return tuple(_convert(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))


def _convert_dict(tp: Any, value: Any, where: str) -> dict:
    """A dict, its keys and values converted to the annotated types (a bare ``dict``: any)."""
    if not isinstance(value, dict):
        raise TypeError(
            f"from_dict: {where}: expected a dict (a mapping) for {_name(tp)}, got {_show(value)}"
        )
    key_tp, value_tp = _dict_types(tp)
    return {
        _convert_key(key_tp, k, f"{where}: key {_show(k)}"): _convert(
            value_tp, v, f"{where}[{_show(k)}]"
        )
        for k, v in value.items()
    }


def _convert_key(tp: Any, key: Any, where: str) -> Any:
    """A dict key: JSON writes every key as text, so an int or float key is read back from it."""
    if tp is int and isinstance(key, str) and re.fullmatch(r"[-+]?[0-9]+", key):
        return int(key)
    if tp is float and isinstance(key, str):
        try:
            return float(key)
        except ValueError:
            pass
    return _convert(tp, key, where)
