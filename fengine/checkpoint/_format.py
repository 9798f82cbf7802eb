"""The file format: constants, errors, the safetensors header with fengine's metadata, and its validation."""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import math
import os
import re
import reprlib
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fengine.checkpoint._io import NotRegularFile, open_regular
from fengine.checkpoint._tree import name_of, prefixes
from fengine.config import unique_keys


if TYPE_CHECKING:
    from fengine.state import TrainState


FORMAT_VERSION = 1
FORMAT = "fengine.checkpoint"
BLOCK = 16 << 20  # bytes of tensor data per CRC-32 block
SUFFIX = ".safetensors"
_MAX_HEADER = 100_000_000  # safetensors' own limit on the JSON header

DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, attr)
    for name, attr in (
        ("F64", "float64"),
        ("F32", "float32"),
        ("F16", "float16"),
        ("BF16", "bfloat16"),
        ("I64", "int64"),
        ("I32", "int32"),
        ("I16", "int16"),
        ("I8", "int8"),
        ("U64", "uint64"),
        ("U32", "uint32"),
        ("U16", "uint16"),
        ("U8", "uint8"),
        ("BOOL", "bool"),
        ("F8_E4M3", "float8_e4m3fn"),
        ("F8_E4M3FNUZ", "float8_e4m3fnuz"),
        ("F8_E5M2", "float8_e5m2"),
        ("F8_E5M2FNUZ", "float8_e5m2fnuz"),
        ("C64", "complex64"),
    )
    if hasattr(torch, attr)
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

USE_LOAD_PARAMS = "to load its weights use fengine.checkpoint.load_params(path, into)"


# ======================================================================= errors
class CheckpointError(ValueError):
    """A file that is not a usable checkpoint (missing, truncated, corrupted, foreign), or a mismatch."""


class CheckpointMismatchError(CheckpointError):
    """The file's structure does not match the template (or, for `load_params`, strict loading failed).

    Attributes list every problem by name: ``missing``, ``unexpected``,
    ``shape`` and ``dtype`` (``(name, in file, in template)``) and ``kind``
    (tensor vs. non-tensor leaf).
    """

    def __init__(self, message: str, *, missing=(), unexpected=(), shape=(), dtype=(), kind=()):
        super().__init__(message)
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.shape = list(shape)
        self.dtype = list(dtype)
        self.kind = list(kind)


def err(path: Path, problem: str) -> CheckpointError:
    return CheckpointError(f"{path}: {problem}")


def listing(title: str, items: list[str], cap: int = 50) -> str:
    """An indented list for an error message or report, at most ``cap`` lines."""
    more = f"\n    ... and {len(items) - cap} more" if len(items) > cap else ""
    return f"  {title} ({len(items)}):\n" + "\n".join(f"    {s}" for s in items[:cap]) + more


# ======================================================================= writing the header
def n_blocks(total: int, block: int) -> int:
    return math.ceil(total / block) if total else 0


def encode_header(table: dict, metadata: dict[str, str], align: int = 8) -> bytes:
    """The safetensors header: 8-byte little-endian length, then JSON padded with spaces so the data
    starts ``align``-byte aligned (8; a page for direct I/O)."""
    raw = json.dumps(
        {"__metadata__": metadata, **table}, separators=(",", ":"), ensure_ascii=True
    ).encode("ascii")
    raw += b" " * (-(8 + len(raw)) % align)
    return len(raw).to_bytes(8, "little") + raw


def header_digest(table: Mapping, metadata: Mapping[str, str]) -> str:
    """SHA-256 of the tensor table and all metadata but the digest itself, in a canonical JSON form."""
    canon = {
        "tensors": table,
        "metadata": {k: v for k, v in metadata.items() if k != "fengine.header_digest"},
    }
    return hashlib.sha256(
        json.dumps(canon, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    ).hexdigest()


def position(state: TrainState) -> dict[str, int]:
    """``fengine.position``; raises `DonatedStateError` for a consumed state, ``ValueError`` for one no file could hold."""
    state.check_live()  # an alias of a consumed state: its tensors are another step's
    pos = {k: getattr(state, k) for k in POSITION}
    for k, v in pos.items():
        if not is_int(v):
            raise ValueError(f"checkpoint: state.{k} must be an int from 0 to 2**64 - 1, got {v!r}")
    return pos


def _json_default(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=repr)
    if isinstance(obj, enum.Enum):
        return obj.value
    raise TypeError(f"{type(obj).__name__} is not JSON-serialisable")


def _dump_meta(meta: Mapping[str, Any] | None) -> str:
    if meta is None:
        meta = {}
    if not isinstance(meta, Mapping):
        raise TypeError(f"save: meta must be a dict, got {type(meta).__name__}")
    try:
        return json.dumps(dict(meta), default=_json_default, ensure_ascii=False)
    except (TypeError, ValueError) as e:
        raise TypeError(
            f"save: meta must be JSON-serialisable (str/int/float/bool/None/list/dict, dataclasses, paths): {e}"
        ) from None


def metadata(
    kind: str, pos: dict[str, int], meta: Mapping[str, Any] | None, **fields: str
) -> dict[str, str]:
    """fengine's safetensors metadata, without the digests (`write_file` adds those); ``fields`` become ``fengine.<name>``."""
    fe = sys.modules.get("fengine")
    versions = {
        "fengine": getattr(fe, "__version__", "unknown"),
        "torch": torch.__version__,
        "python": ".".join(map(str, sys.version_info[:3])),
    }
    return {
        "fengine.format": FORMAT,
        "fengine.format_version": str(FORMAT_VERSION),
        "fengine.kind": kind,
        "fengine.position": json.dumps(pos),
        **{f"fengine.{k}": v for k, v in fields.items()},
        "fengine.meta": _dump_meta(meta),
        "fengine.versions": json.dumps(versions),
    }


# ======================================================================= checking fields
# Every field of the header is checked here, before anything else reads it: a file whose digests
# were recomputed after an edit passes the digests but not these checks. A failed check raises
# `Invalid`; `read_header` / `require_fengine` turn it into one `CheckpointError` naming the file.
MAX_NDIM = 64  # dimensions of a tensor
MAX_DEPTH = 100  # components of a leaf's pytree path
MIN_BLOCK, MAX_BLOCK = 1 << 10, 1 << 30  # bytes per CRC-32 block (fengine writes BLOCK)
POSITION = ("step", "epoch", "batch_in_epoch", "seed")
_U64 = 2**64
_VERSION = re.compile(r"[1-9][0-9]{0,8}")
_CRC = re.compile(r"[0-9a-f]{8}")
_KEY_TYPES: dict[str, tuple[type, ...]] = {"a": (str,), "i": (int,), "k": (str, int)}
_SCALAR_TYPES = (type(None), bool, int, float, str)
_NOTHING = object()

_short = reprlib.Repr()
_short.maxlevel, _short.maxstring, _short.maxother, _short.maxlist, _short.maxdict = 3, 80, 80, 6, 4


class Invalid(Exception):
    """A header field failed its check: ``field`` must be ``expected``, and was ``got``."""

    def __init__(self, field: str, expected: str, got: Any = _NOTHING):
        super().__init__(field)
        self.field, self.expected, self.got = field, expected, got

    def error(self, path: Path) -> CheckpointError:
        got = "" if self.got is _NOTHING else f", got {_short.repr(self.got)}"
        return err(path, f"corrupt header: {self.field} must be {self.expected}{got}")


def need(ok: Any, field: str, expected: str, got: Any = _NOTHING) -> None:
    if not ok:
        raise Invalid(field, expected, got)


def is_int(x: Any, lo: int = 0, hi: int = _U64 - 1) -> bool:
    """An int (not a bool) in [lo, hi]."""
    return type(x) is int and lo <= x <= hi


def parse_json(text: str, field: str) -> Any:
    """JSON without duplicate keys; anything else (deep nesting, huge ints included) raises `Invalid`."""
    try:
        return json.loads(text, object_pairs_hook=unique_keys)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, duplicates, the int digit limit
        raise Invalid(field, f"valid JSON ({str(e)[:200]})") from None


def _span(name: str, info: Any) -> tuple[int, int]:
    """A tensor table entry's ``(begin, end)`` in the data, once dtype, shape and offsets agree."""
    f = f"tensor {name!r}"
    need(
        type(info) is dict and sorted(info) == ["data_offsets", "dtype", "shape"],
        f,
        'an object with exactly "dtype", "shape" and "data_offsets"',
        info,
    )
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    need(type(dtype) is str and dtype in DTYPES, f"{f} dtype", f"one of {', '.join(DTYPES)}", dtype)
    need(
        type(shape) is list and len(shape) <= MAX_NDIM and all(is_int(d) for d in shape),
        f"{f} shape",
        f"a list of at most {MAX_NDIM} non-negative ints",
        shape,
    )
    need(math.prod(d or 1 for d in shape) < 2**63, f"{f} shape", "a size torch can hold", shape)
    need(
        type(offsets) is list
        and len(offsets) == 2
        and all(is_int(o) for o in offsets)
        and offsets[0] <= offsets[1],
        f"{f} data_offsets",
        "[begin, end] with 0 <= begin <= end",
        offsets,
    )
    nbytes = math.prod(shape) * DTYPES[dtype].itemsize
    need(
        offsets[1] - offsets[0] == nbytes,
        f"{f} data_offsets",
        f"{nbytes} bytes apart (shape {shape} of {dtype})",
        offsets,
    )
    return offsets[0], offsets[1]


def _json_field(md: Mapping[str, str], key: str, default: str | None = None) -> Any:
    text = md.get(key, default)
    if text is None:
        raise Invalid(key, "present")
    return parse_json(text, key)


def _data_digest(md: Mapping[str, str], total: int) -> dict[str, Any]:
    f = "fengine.data_digest"
    d = _json_field(md, f)
    need(
        type(d) is dict and sorted(d) == ["algorithm", "block_size", "blocks"],
        f,
        'an object with exactly "algorithm", "block_size" and "blocks"',
        d,
    )
    need(d["algorithm"] == "crc32", f"{f} algorithm", "'crc32'", d["algorithm"])
    need(
        is_int(d["block_size"], MIN_BLOCK, MAX_BLOCK),
        f"{f} block_size",
        f"an int from {MIN_BLOCK} to {MAX_BLOCK}",
        d["block_size"],
    )
    n, blocks = n_blocks(total, d["block_size"]), d["blocks"]
    need(
        type(blocks) is list
        and len(blocks) == n
        and all(type(b) is str and _CRC.fullmatch(b) for b in blocks),
        f"{f} blocks",
        f"a list of {n} CRC-32s of 8 lowercase hex digits (one per block of the {total} data bytes)",
        blocks,
    )
    return d


def _component_ok(c: Any) -> bool:
    return (
        type(c) is list
        and len(c) == 2
        and type(c[0]) is str
        and type(c[1]) in _KEY_TYPES.get(c[0], ())
        and not (c[0] == "i" and c[1] < 0)
    )


def _structure(s: Any, tensors: Mapping[str, Any]) -> list:
    """``fengine.structure``: well-formed entries, names that are their paths, a tree, the file's tensors exactly."""
    need(type(s) is list, "fengine.structure", "a list of leaf entries", s)
    names: set[str] = set()
    for i, e in enumerate(s):
        f = f"fengine.structure[{i}]"
        kind = e[1] if type(e) is list and len(e) > 1 else None
        need(
            kind in ("tensor", "scalar", "empty") and len(e) == (4 if kind == "tensor" else 3),
            f,
            "[name, 'tensor', path, device] or [name, 'scalar' / 'empty', path]",
            e,
        )
        need(type(e[0]) is str, f"{f} name", "a string", e[0])
        path = e[2]
        need(
            type(path) is list and 1 <= len(path) <= MAX_DEPTH and all(map(_component_ok, path)),
            f"{f} path",
            f"a list of 1 to {MAX_DEPTH} components ['a', attribute] / ['i', index >= 0] / ['k', str or int key]",
            path,
        )
        need(e[0] == name_of(path), f"{f} name", f"{name_of(path)!r}, its path joined by '/'", e[0])
        need(e[0] not in names, f"{f} name", "unique", e[0])
        if kind == "tensor":
            need(type(e[3]) is str and e[3], f"{f} device", "a device type such as 'cpu'", e[3])
        names.add(e[0])
    inner = next((p for n in names for p in prefixes(n) if p in names), None)
    need(inner is None, "fengine.structure", "a tree (no leaf has leaves below it)", inner)
    listed = {e[0] for e in s if e[1] == "tensor"}
    need(
        listed == set(tensors),
        "fengine.structure",
        "a list of exactly the file's tensors",
        sorted(listed ^ set(tensors))[:5],
    )
    return s


def weight_keys(structure: list) -> dict[str, str]:
    """State-dict names of a training checkpoint's weights -> file keys (``fc1.weight`` -> ``params/fc1.weight``)."""
    out: dict[str, dict[str, str]] = {"params": {}, "buffers": {}}
    for name, kind, path, *_ in structure:
        if kind == "tensor" and len(path) == 2 and path[0][1] in out and path[1][0] == "k":
            out[path[0][1]][str(path[1][1])] = name
    return {**out["params"], **out["buffers"]}


def _parse(h: Header) -> Info:
    """fengine's metadata, every field checked (the format marker and the header digest already were)."""
    md = h.metadata
    version = md.get("fengine.format_version", "")
    need(
        _VERSION.fullmatch(version),
        "fengine.format_version",
        f"a version number up to {FORMAT_VERSION}",
        version,
    )
    kind = md.get("fengine.kind", "")
    need(kind in ("train_state", "params"), "fengine.kind", "'train_state' or 'params'", kind)
    pos = _json_field(md, "fengine.position")
    need(
        type(pos) is dict and sorted(pos) == sorted(POSITION),
        "fengine.position",
        f"an object with exactly {', '.join(POSITION)}",
        pos,
    )
    for k in POSITION:
        need(is_int(pos[k]), f"fengine.position {k}", "an int from 0 to 2**64 - 1", pos[k])
    meta = _json_field(md, "fengine.meta")
    need(type(meta) is dict, "fengine.meta", "a JSON object", meta)
    versions = _json_field(md, "fengine.versions")
    need(
        type(versions) is dict and all(type(v) is str for v in versions.values()),
        "fengine.versions",
        "an object of strings",
        versions,
    )
    digest = _data_digest(md, h.total)
    if kind == "params":
        for key in ("fengine.structure", "fengine.scalars", "fengine.eval_weights"):
            need(key not in md, key, "absent from a params file")
        return Info(int(version), kind, pos, [], {}, meta, versions, digest, {})

    structure = _structure(_json_field(md, "fengine.structure"), h.table)
    scalars = _json_field(md, "fengine.scalars")
    need(
        type(scalars) is dict and all(type(v) in _SCALAR_TYPES for v in scalars.values()),
        "fengine.scalars",
        "an object of ints, floats, bools, strings and nulls",
        scalars,
    )
    listed = {e[0] for e in structure if e[1] == "scalar"}
    need(
        set(scalars) == listed,
        "fengine.scalars",
        "the values of exactly the scalars fengine.structure lists",
        sorted(set(scalars) ^ listed)[:5],
    )
    for k in POSITION:  # the state's own fields are leaves too: both records must agree
        need(
            k not in scalars or (type(scalars[k]) is int and scalars[k] == pos[k]),
            f"fengine.position {k}",
            f"equal to the {k} leaf in fengine.scalars ({_short.repr(scalars.get(k))})",
            pos[k],
        )
    swaps = _json_field(md, "fengine.eval_weights", "{}")  # absent in files from before 0.2
    weights = weight_keys(structure)
    need(
        type(swaps) is dict
        and all(k in weights and type(v) is str and v in h.table for k, v in swaps.items()),
        "fengine.eval_weights",
        "an object mapping weight names (params / buffers) to tensors of the file",
        swaps,
    )
    return Info(int(version), kind, pos, structure, scalars, meta, versions, digest, swaps)


# ======================================================================= reading the header
@dataclasses.dataclass
class Header:
    path: Path
    size: int
    data_start: int
    table: dict[str, dict]  # name -> {"dtype", "shape", "data_offsets"}
    metadata: dict[str, str]
    order: list[str]  # names sorted by offset
    total: int  # bytes of tensor data
    identity: tuple[int, ...]  # (device, inode, size, mtime) when the header was read


def identity(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def open_checkpoint(path: Path) -> tuple[int, os.stat_result]:
    """`open_regular`, with every refusal a `CheckpointError` naming ``path``."""
    try:
        return open_regular(path)
    except NotRegularFile as e:
        hint = (
            " (fengine.checkpoint.latest(work_dir) finds the newest checkpoint in one)"
            if e.kind == "a directory"
            else ""
        )
        raise err(path, f"is {e.kind}, not a checkpoint file{hint}") from None
    except FileNotFoundError:
        raise err(path, "no such file") from None
    except (OSError, ValueError) as e:  # ValueError: a NUL in the path
        raise err(path, f"cannot open: {getattr(e, 'strerror', None) or e}") from None


def foreign(first: bytes) -> str | None:
    """What a file that is not safetensors looks like, from its first bytes."""
    if first[:4] == b"PK\x03\x04":
        return "a zip archive (torch.save's .pth format)"
    if first[:1] == b"\x80" and first[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "a pickle (a legacy torch .pth file?)"
    return None


def read_header(path: Path) -> Header:
    """Read and check a safetensors header: valid JSON, every tensor entry well-formed, the tensors tiling the data exactly."""
    fd, st = open_checkpoint(path)
    with os.fdopen(fd, "rb") as f:
        size = st.st_size
        first = f.read(8)
        n = int.from_bytes(first, "little") if len(first) == 8 else -1
        raw = f.read(n) if 0 <= n <= min(size - 8, _MAX_HEADER) else b""
    if not raw.startswith(b"{"):
        kind = foreign(first)
        if kind:
            raise err(path, f"is {kind}, not a fengine checkpoint; {USE_LOAD_PARAMS}")
        if size < 8:
            raise err(
                path,
                f"truncated: {size} bytes, less than a safetensors header"
                if size
                else "is empty (truncated)",
            )
        if n > size - 8:
            raise err(
                path,
                f"truncated or corrupt: the header length field says {n} bytes but the file has {size} (not a complete safetensors file)",
            )
        if n > _MAX_HEADER:
            raise err(path, f"corrupt: header length {n} exceeds the safetensors limit")
        raise err(path, "not a safetensors file (no JSON header), or its header is corrupt")
    try:
        try:
            header = parse_json(raw.decode("utf-8"), "the JSON header")
        except UnicodeDecodeError as e:
            raise Invalid("the JSON header", f"UTF-8 ({e.reason} at byte {e.start})") from None
        need(type(header) is dict, "the JSON header", "an object", header)
        meta = header.pop("__metadata__", None)
        meta = {} if meta is None else meta
        need(
            type(meta) is dict and all(type(v) is str for v in meta.values()),
            "__metadata__",
            "a string-to-string map",
            meta,
        )
        spans = sorted((*_span(name, info), name) for name, info in header.items())
    except Invalid as e:
        raise e.error(path) from None
    expected = 0
    for begin, end, name in spans:
        if begin != expected:
            raise err(
                path,
                f"corrupt header: tensor {name!r} starts at byte {begin} of the data, expected {expected}",
            )
        expected = end
    data_start = 8 + n
    have = size - data_start
    if have < expected:
        raise err(
            path,
            f"truncated: the header describes {expected} bytes of tensor data, the file has {have}",
        )
    if have > expected:
        raise err(path, f"corrupt: {have - expected} unexpected bytes after the tensor data")
    return Header(
        path, size, data_start, header, meta, [s[2] for s in spans], expected, identity(st)
    )


@dataclasses.dataclass
class Info:
    """fengine's metadata, parsed and checked."""

    version: int
    kind: str  # "train_state" or "params"
    position: dict[str, int]
    structure: list  # [name, kind, path, (device)] per leaf; kind is "tensor" / "scalar" / "empty"
    scalars: dict[str, Any]
    meta: dict[str, Any]
    versions: dict[str, str]
    digest: dict[str, Any]  # {"algorithm": "crc32", "block_size", "blocks": [hex, ...]}
    eval_weights: dict[str, str]  # weight name -> file key, where the eval weights differ (EMA)


def require_fengine(h: Header, want: str | None = None) -> Info:
    """Parse and verify fengine's metadata (header digest included); ``want`` a kind, or any."""
    md, path = h.metadata, h.path
    if md.get("fengine.format") != FORMAT:
        if any(k.startswith("fengine.") for k in md):
            raise err(
                path,
                f"corrupt header: fengine.format must be {FORMAT!r}, got {md.get('fengine.format')!r:.80} "
                "(the file has fengine metadata, so its format marker is damaged)",
            )
        raise err(
            path,
            f"a safetensors file without fengine metadata, so not a fengine checkpoint; {USE_LOAD_PARAMS}",
        )
    version = md.get("fengine.format_version", "")
    if _VERSION.fullmatch(version) and int(version) > FORMAT_VERSION:
        raise err(
            path,
            f"written in checkpoint format {version} by a newer fengine; this one reads up to {FORMAT_VERSION}",
        )
    if md.get("fengine.header_digest") != header_digest(h.table, md):
        raise err(
            path,
            "corrupt header: its SHA-256 digest does not match (tensor table or metadata altered)",
        )
    try:
        info = _parse(h)
    except Invalid as e:
        raise e.error(path) from None
    if want == "train_state" and info.kind != "train_state":
        raise err(
            path,
            f"a params-only fengine file (kind {info.kind!r}, e.g. from publish), not a training checkpoint; {USE_LOAD_PARAMS}",
        )
    return info
