"""Argument checks shared by the public constructors: one wording for each kind of mistake."""

from __future__ import annotations

from typing import Any


__all__ = ["check_bool"]


def check_bool(where: str, name: str, value: Any) -> bool:
    """``value`` if it is a bool: a string such as ``"false"`` (from a config) would be truthy."""
    if not isinstance(value, bool):
        raise TypeError(f"{where}: {name} must be a bool (True or False), got {value!r:.80}")
    return value
