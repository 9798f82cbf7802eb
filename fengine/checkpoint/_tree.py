"""Leaf names: a state's pytree paths as ``/``-joined names, and nested containers rebuilt from saved paths."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import torch.utils._pytree as pytree


def is_empty_dict(x: Any) -> bool:
    """Empty dicts are leaves (pytree would drop them), so they survive a round trip."""
    return type(x) is dict and not x


def _escape(text: str) -> str:
    return text.replace("%", "%25").replace("/", "%2F")


def name_of(path: list) -> str:
    """A leaf's name from its JSON path components: ``[["a", "params"], ["k", "fc.weight"]]`` -> ``params/fc.weight``."""
    return "/".join(str(key) if kind == "i" else _escape(str(key)) for kind, key in path)


def _component(key: Any, where: list[list]) -> list:
    """A pytree key as a JSON component: ``["a", attr]`` / ``["i", index]`` / ``["k", dict key]``."""
    if isinstance(key, pytree.GetAttrKey):
        return ["a", key.name]
    if isinstance(key, pytree.SequenceKey):
        return ["i", key.idx]
    if isinstance(key, pytree.MappingKey):
        k = key.key
        if isinstance(k, str) or (isinstance(k, int) and not isinstance(k, bool)):
            return ["k", k]
        raise TypeError(
            f"checkpoint: dict key {k!r} under {name_of(where) or 'the state'} is not a str or int"
        )
    raise TypeError(
        f"checkpoint: unsupported pytree key {key!r} under {name_of(where) or 'the state'}"
    )


@dataclasses.dataclass
class Leaf:
    name: str
    path: list  # JSON components: ["a", attr] / ["i", index] / ["k", key]
    value: Any


def flatten(tree: Any) -> tuple[list[Leaf], Any]:
    """Leaves with readable names (empty dicts are leaves too) and the treespec."""
    flat, spec = pytree.tree_flatten_with_path(tree, is_leaf=is_empty_dict)
    leaves: list[Leaf] = []
    seen: set[str] = set()
    for keys, value in flat:
        comps: list[list] = []
        for k in keys:
            comps.append(_component(k, comps))
        name = name_of(comps)
        if name in seen:
            raise TypeError(
                f"checkpoint: two leaves of the state are both named {name!r} (an int and a str dict key?)"
            )
        seen.add(name)
        leaves.append(Leaf(name, comps, value))
    return leaves, spec


def prefixes(name: str) -> Iterator[str]:
    """The proper ``/``-prefixes of a name: ``a/b/c`` -> ``a``, ``a/b``."""
    i = name.find("/")
    while i >= 0:
        yield name[:i]
        i = name.find("/", i + 1)


def adoptable(entries: list, prefix_len: int) -> bool:
    """Only plain nested dicts/lists may be taken from the file (not namedtuples: the template must know them)."""
    for e in entries:
        comps = e[2][prefix_len:]
        if not comps or any(kind not in ("k", "i") for kind, _ in comps):
            return False
    return True


def rebuild(entries: list, prefix_len: int, values: dict[str, Any]) -> Any:
    """Nested dicts (mapping keys) / lists (indices) from the file entries below an empty-dict leaf."""
    root: dict = {}
    for e in entries:
        comps = e[2][prefix_len:]
        node = root
        for kind, key in comps[:-1]:
            node = node.setdefault((kind, key), {})
        kind, key = comps[-1]
        node[(kind, key)] = {} if e[1] == "empty" else values[e[0]]

    def finish(node: Any) -> Any:
        if not isinstance(node, dict) or not node or not all(isinstance(k, tuple) for k in node):
            return node
        if all(k[0] == "i" for k in node) and sorted(k[1] for k in node) == list(range(len(node))):
            return [finish(node[("i", i)]) for i in range(len(node))]
        return {k[1]: finish(v) for k, v in node.items()}

    return finish(root)
